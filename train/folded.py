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

Only the attention weights and two weighted sums over frames are per pair. Parameters
are the module's own, read by name; nothing here is learned separately. The tests hold
this function equal to the module's forward pass in eval mode, and in train mode with
dropout off. In train mode the dropout mask is drawn by :func:`fast_dropout`: the same
distribution as ``nn.Dropout`` (same rate, same 1/(1-p) scaling) from other random draws,
at a third of the cost of torch's per-element Bernoulli on a CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

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
    w_out = fusion.out_proj.weight.view(dim, heads, head_dim)
    u = torch.einsum("dhc,vfhc->vhfd", w_out, values).reshape(n_video, heads * n_frames, dim)
    u = u - u.mean(dim=-1, keepdim=True)
    bias = fusion.out_proj.bias - fusion.out_proj.bias.mean()
    gamma, beta, w_lin = fusion.norm_attn.weight, fusion.norm_attn.bias, fusion.linear_proj.weight
    return FoldedFrames(u, (u * gamma) @ w_lin.T, bias, w_lin @ (gamma * bias), w_lin @ beta + fusion.linear_proj.bias)


def folded_xpool(fusion: XPoolFusion, text: torch.Tensor, frames: torch.Tensor,
                 frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``fusion(text, frames, frame_mask)``, computed frame-wise (see the module doc).

    text ``[n_text, dim]``, frames ``[n_video, n_frames, dim]``, frame_mask
    ``[n_video, n_frames]`` -> pooled ``[n_text, n_video, dim]``."""
    weights = fusion.attention_weights(text, frames, frame_mask).flatten(2)  # [n_text, n_video, heads*n_frames]
    return pool_folded(fusion, weights, fold_frames(fusion, frames))


def pool_folded(fusion: XPoolFusion, weights: torch.Tensor, folded: FoldedFrames) -> torch.Tensor:
    """The per-pair half of the folding: attention weights ``[n_text, n_video,
    heads*n_frames]`` (head-major, as ``attention_weights(...).flatten(2)``) and the
    folded frames of those n_video videos -> pooled ``[n_text, n_video, dim]``. Training
    and the evaluator's torch scorer (:mod:`tmass.evaluate.scores`) both pool here."""
    centred = torch.einsum("tvk,vkd->tvd", weights, folded.u) + folded.bias  # [n_text, n_video, dim]
    inv_std = (centred.pow(2).mean(dim=-1, keepdim=True) + fusion.norm_attn.eps).rsqrt()
    pooled = centred * inv_std * fusion.norm_attn.weight + fusion.norm_attn.bias
    linear = (torch.einsum("tvk,vkd->tvd", weights, folded.z) + folded.lin_bias) * inv_std + folded.lin_shift
    return fusion.norm_out(pooled + fast_dropout(linear, fusion.dropout))


_INT32_DRAWS = 2**31  # torch's int32 random_() is uniform on [0, 2**31)


def fast_dropout(x: torch.Tensor, dropout: torch.nn.Dropout) -> torch.Tensor:
    """``dropout(x)`` in distribution: in train mode each element is kept with probability
    1 - p (to within 2**-31) and scaled by 1 / (1 - p); the identity in eval mode.

    The mask compares uniform int32 draws of torch's global generator with a threshold.
    On a CPU that is about 3x cheaper than ``nn.Dropout``'s Bernoulli draws, which took
    a seventh of a T-MASS training step."""
    if not dropout.training or dropout.p == 0:
        return x
    keep = 1.0 - dropout.p
    draws = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_()
    return x * (draws < round(keep * _INT32_DRAWS)).to(x.dtype).mul_(1.0 / keep)
