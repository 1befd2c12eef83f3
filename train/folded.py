"""X-Pool's pooling for training, with its dim x dim products moved from pairs to frames.

``XPoolFusion.forward`` applies ``out_proj`` and ``linear_proj`` to every (text, video)
pair: two ``[B*B, dim] x [dim, dim]`` products per step, forward and backward, which
are most of a training step's time on a CPU. Both maps are affine, and what they act on
is an attention-weighted average over frames (the weights w[t, v, :] sum to 1), so they
can be applied once per frame instead, ``[B*n_frames, dim]`` rows (12 per video instead
of 32 per video at batch 32). Per head h and frame f of video v, with
``centre(x) = x - mean_dim(x)`` and LayerNorm ``norm_attn`` = (gamma, beta, eps)::

    U[v,hf] = centre(W_out[:, h] @ value[v,f,h])                  per frame
    Z[v,hf] = W_lin @ (gamma * U[v,hf])                           per frame
    c(t,v)  = sum_hf w[t,v,hf] U[v,hf] + centre(b_out)            = centre(out_proj(attended))
    s(t,v)  = 1 / sqrt(mean_dim(c^2) + eps)                       LayerNorm's 1/std
    pooled  = gamma * c * s + beta                                = norm_attn(out_proj(attended))
    lin     = (sum_hf w Z + W_lin (gamma * centre(b_out))) * s
              + W_lin beta + b_lin                                = linear_proj(pooled)
    out     = norm_out(pooled + dropout(lin))

Only the attention weights and two weighted sums over frames are per pair, and
:func:`pool_folded` keeps the per-pair ``[n_text, n_video, dim]`` work to those two sums
and what the dropout mask touches: |c|^2 comes from each video's Gram matrix of its U
(``[n_frames+1]^2`` numbers per video), gamma is folded into U, and the centring into
W_out. Training (:func:`folded_xpool`) also folds the key projection into the query,
``q . (W_k LN(f) + b_k) = (W_k^T q) . LN(f) + q . b_k``, so the frames are projected by
W_v alone, and norm_in's affine into W_v and the query. Parameters are the module's own, read by name; nothing here is learned
separately. The tests hold this function equal to the module's forward pass in eval
mode, and in train mode with the same dropout mask. In train mode the mask is drawn by
:func:`dropout_mask`: the same distribution as ``nn.Dropout`` (same rate, same 1/(1-p)
scaling) from other random draws, at a third of the cost of torch's per-element
Bernoulli on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tmass.train.heads import XPoolFusion


@dataclass
class FoldedFrames:
    """The per-frame half of the folding (see the module doc), for one gallery.

    u, z ``[n_video, heads*n_frames, dim]``; bias, lin_bias, lin_shift ``[dim]``:
    centre(b_out), W_lin (gamma * centre(b_out)) and W_lin beta + b_lin. Shared by
    training (:func:`folded_xpool`) and the evaluator's CPU kernel."""

    u: torch.Tensor
    z: torch.Tensor
    bias: torch.Tensor
    lin_bias: torch.Tensor
    lin_shift: torch.Tensor

    def __getitem__(self, videos: slice) -> "FoldedFrames":
        """The folded frames of the videos ``videos`` (a gallery chunk)."""
        return dataclasses.replace(self, u=self.u[videos], z=self.z[videos])


def fold_frames(fusion: XPoolFusion, frames: torch.Tensor) -> FoldedFrames:
    """frames ``[n_video, n_frames, dim]`` -> their folded vectors (per frame, not per pair)."""
    n_video, n_frames, _ = frames.shape
    return fold_values(fusion, fusion.v_proj(fusion.norm_in(frames)).view(n_video, n_frames, fusion.num_heads, fusion.head_dim))


def fold_values(fusion: XPoolFusion, values: torch.Tensor) -> FoldedFrames:
    """Value vectors ``[n_video, n_frames, heads, head_dim]`` -> folded ``u, z [n_video,
    heads*n_frames, dim]``. Frames' values for a gallery (:func:`fold_frames`), or, for
    one text, each video's attention-weighted values (one "frame" per video whose weight
    is 1 in every head: the evaluator's single-text path)."""
    n_video, n_frames, heads, head_dim = values.shape
    dim = heads * head_dim
    w_out = fusion.out_proj.weight
    w_out = (w_out - w_out.mean(dim=0)).view(dim, heads, head_dim)  # centre(W_out x) = (W_out - mean_rows W_out) x
    u = torch.einsum("dhc,vfhc->vhfd", w_out, values).reshape(n_video, heads * n_frames, dim)
    bias = fusion.out_proj.bias - fusion.out_proj.bias.mean()
    gamma, beta, w_lin = fusion.norm_attn.weight, fusion.norm_attn.bias, fusion.linear_proj.weight
    return FoldedFrames(u, (u * gamma) @ w_lin.T, bias, w_lin @ (gamma * bias), w_lin @ beta + fusion.linear_proj.bias)


def folded_xpool(fusion: XPoolFusion, text: torch.Tensor, frames: torch.Tensor,
                 frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``fusion(text, frames, frame_mask)``, computed frame-wise (see the module doc).

    text ``[n_text, dim]``, frames ``[n_video, n_frames, dim]``, frame_mask
    ``[n_video, n_frames]`` -> pooled ``[n_text, n_video, dim]``."""
    n_text, (n_video, n_frames, dim) = text.shape[0], frames.shape
    heads, head_dim = fusion.num_heads, fusion.head_dim
    norm, w_v = fusion.norm_in, fusion.v_proj.weight
    # norm_in(f) = g * unit + b: its affine goes into the weights (no frame-sized gradient of norm_in)
    unit = F.layer_norm(frames, (dim,), eps=norm.eps)  # [n_video, n_frames, dim]
    q = fusion.q_proj(norm(text)).view(n_text, heads, head_dim)
    query_keys = torch.einsum("thc,hcd->thd", q, fusion.k_proj.weight.view(heads, head_dim, dim))  # W_k^T q
    # q . (W_k b + b_k) is the same for every frame (the softmax drops it); kept so that
    # b_k has the module's gradient (zero up to rounding)
    offset = query_keys @ norm.bias + (q * fusion.k_proj.bias.view(heads, head_dim)).sum(-1)  # [n_text, heads]
    logits = (torch.einsum("thd,vfd->tvhf", query_keys * norm.weight, unit) + offset[:, None, :, None]) / math.sqrt(head_dim)
    if frame_mask is not None:
        logits = logits.masked_fill(~frame_mask[None, :, None, :], float("-inf"))
    weights = logits.softmax(dim=-1).flatten(2)  # [n_text, n_video, heads*n_frames]
    values = F.linear(unit, w_v * norm.weight, w_v @ norm.bias + fusion.v_proj.bias)  # v_proj(norm_in(frames))
    return pool_folded(fusion, weights, fold_values(fusion, values.view(n_video, n_frames, heads, head_dim)))


def pool_folded(fusion: XPoolFusion, weights: torch.Tensor, folded: FoldedFrames) -> torch.Tensor:
    """The per-pair half of the folding: attention weights ``[n_text, n_video,
    heads*n_frames]`` (head-major, as ``attention_weights(...).flatten(2)``) and the
    folded frames of those n_video videos -> pooled ``[n_text, n_video, dim]``
    (contiguous). Training and the evaluator's torch scorer
    (:mod:`tmass.evaluate.scores`) both pool here."""
    n_text, n_video, _ = weights.shape
    dim = folded.u.shape[-1]
    gamma, beta, eps = fusion.norm_attn.weight, fusion.norm_attn.bias, fusion.norm_attn.eps
    by_video = weights.transpose(0, 1)  # [n_video, n_text, k], the batched products' layout
    # |c|^2 = w' G w' with w' = (w, 1) and G the Gram matrix of (U, centre(b_out)) per video
    frames_bias = torch.cat([folded.u, folded.bias.expand(n_video, 1, dim)], dim=1)  # [n_video, k+1, dim]
    gram = frames_bias @ frames_bias.transpose(1, 2)  # [n_video, k+1, k+1]
    w1 = torch.cat([by_video, by_video.new_ones(n_video, n_text, 1)], dim=-1)  # [n_video, n_text, k+1]
    square = ((w1 @ gram) * w1).sum(-1).clamp_min(0)  # [n_video, n_text]
    inv_std = (square / dim + eps).rsqrt().T  # [n_text, n_video]
    mask = dropout_mask(fusion.dropout, (n_text, n_video, dim), weights.device)
    # the biases ride in the products as a frame of weight 1 (w1's last column)
    attended = frames_bias * gamma  # [n_video, k+1, dim]: gamma * (U, centre(b_out))
    linear = torch.cat([folded.z, folded.lin_bias.expand(n_video, 1, dim)], dim=1)
    if mask is None:  # pooled + lin = s * (gamma c + sum w Z + W_lin (gamma b)) + beta + lin_shift: one product
        residual = torch.addcmul(beta + folded.lin_shift, (w1 @ (attended + linear)).transpose(0, 1), inv_std[..., None])
    else:  # two products [n_video, n_text, dim]; the mask's 1 / (1 - p) goes into the linear branch's frames
        scale = 1.0 / (1.0 - fusion.dropout.p)
        residual = _DroppedResidual.apply(w1 @ attended, w1 @ (linear * scale), inv_std, mask, beta,
                                          folded.lin_shift * scale)
    return fusion.norm_out(residual)


class _DroppedResidual(torch.autograd.Function):
    """``pooled + dropout(lin)`` of the module doc, from the two weighted sums, in three
    passes over ``[n_text, n_video, dim]`` forward (autograd's graph of the same line
    takes six) and five back, saving one such tensor besides the mask:

        y = s * (attended + mask * linear) + beta + mask * shift

    attended, linear ``[n_video, n_text, dim]`` (the batched products' layout), s
    ``[n_text, n_video]``, mask ``[n_text, n_video, dim]`` (1 kept, 0 dropped), beta,
    shift ``[dim]`` -> y ``[n_text, n_video, dim]``, contiguous."""

    @staticmethod
    def forward(ctx, attended, linear, inv_std, mask, beta, shift):
        mixed = torch.empty(mask.shape, dtype=torch.promote_types(attended.dtype, mask.dtype), device=mask.device)
        torch.addcmul(attended.transpose(0, 1), mask, linear.transpose(0, 1), out=mixed)  # attended + mask * linear
        out = torch.addcmul(beta, mixed, inv_std[..., None]).addcmul_(mask, shift)
        ctx.save_for_backward(mixed, inv_std, mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        mixed, inv_std, mask = ctx.saved_tensors
        n_text, n_video, dim = grad.shape
        grad = grad.contiguous()
        rows = n_text * n_video
        grad_inv_std = torch.linalg.vecdot(grad, mixed)
        grad_attended = grad.new_empty(n_video, n_text, dim)
        grad_linear = grad.new_empty(n_video, n_text, dim)
        torch.mul(grad, inv_std[..., None], out=grad_attended.transpose(0, 1))
        torch.mul(grad_attended.transpose(0, 1), mask, out=grad_linear.transpose(0, 1))
        # d/d shift = sum of grad * mask = sum of grad_linear / s (one product, no temporary)
        grad_shift = grad_linear.view(rows, dim).T @ inv_std.T.reciprocal().reshape(rows)
        return grad_attended, grad_linear, grad_inv_std, None, grad.sum((0, 1)), grad_shift


_INT32_DRAWS = 2**31  # torch's int32 random_() is uniform on [0, 2**31)


def dropout_mask(dropout: torch.nn.Dropout, shape: tuple[int, ...], device=None) -> torch.Tensor | None:
    """The kept elements of ``dropout`` on a tensor of ``shape``: a float32 mask, 1 with
    probability 1 - p (to within 2**-31) and 0 otherwise (the caller scales by
    1 / (1 - p)); None in eval mode or at p = 0.

    The mask compares uniform int32 draws of torch's global generator with a threshold.
    On a CPU that is about 3x cheaper than ``nn.Dropout``'s Bernoulli draws, which took
    a seventh of a T-MASS training step. The comparison runs in place on the draws' bits
    read as float32: for non-negative int32 the float order of the bit patterns is the
    integer order (those at or above 0x7F800000, read as inf or NaN, compare False, as
    they would as integers above the threshold), and it writes the float 0/1 mask with
    no second tensor."""
    if not dropout.training or dropout.p == 0:
        return None
    draws = torch.empty(shape, dtype=torch.int32, device=device).random_()
    threshold = struct.unpack("<f", struct.pack("<i", round((1.0 - dropout.p) * _INT32_DRAWS)))[0]
    return draws.view(torch.float32).lt_(threshold)

