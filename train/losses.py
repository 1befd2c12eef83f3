"""Training losses: symmetric InfoNCE and the loss terms of T-MASS (paper Eq. 1-2, 5, 8-9).

Every score matrix is text-major, ``[n_text, n_video]``; in a training batch row i of
the texts and row i of the videos form a pair, so the targets are the diagonal.

Loss terms (Table 6 of the paper; ``--loss-terms`` is a comma list of them):

    ce    InfoNCE on the CLIP text embedding t                      (X-Pool, meanP)
    s     InfoNCE on one stochastic sample t_s = t + eps * exp(R)   (T-MASS, Eq. 5)
    sup   InfoNCE on the support text t + exp(R) (v - t)/|v - t|    (T-MASS, Eq. 8),
          weighted by ``support_weight`` (alpha of Eq. 9)

Table 6's rows are ``ce`` (X-Pool), ``ce,s``, ``s`` and ``s,sup`` (the final T-MASS).
In every term the pooled videos are the same: video j pooled on the deterministic
caption t_i; only the text side of the cosine changes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from tmass.train.folded import folded_xpool
from tmass.train.heads import Head, XPoolFusion, paired_frame_similarity, stochastic_text, support_text

LOSS_TERMS = ("ce", "s", "sup")
STOCHASTIC_TERMS = ("s", "sup")  # need the T-MASS radius
DEFAULT_TERMS = {"meanp": ("ce",), "xpool": ("ce",), "tmass": ("s", "sup")}
SUPPORT_VIDEOS = ("paired", "batch-mean")
POOLING_PATHS = ("folded", "module")


def symmetric_infonce(logits: torch.Tensor) -> torch.Tensor:
    """Mean of the text-to-video and video-to-text cross entropies (Eq. 1-2).

    logits ``[n, n]`` text-major (row i: text i against every video, already multiplied
    by the logit scale); pair i is (text i, video i), so the targets are the diagonal.
    """
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def parse_loss_terms(terms: str | Iterable[str] | None, head: str) -> tuple[str, ...]:
    """A comma list (or sequence) of loss terms, checked against the head; ``None`` or
    ``""`` gives the head's default (``ce`` for meanp/xpool, ``s,sup`` for tmass).
    Returned in canonical order, without repeats."""
    if terms is None or terms == "" or terms == ():
        return DEFAULT_TERMS[head]
    names = [t.strip() for t in terms.split(",")] if isinstance(terms, str) else [str(t).strip() for t in terms]
    unknown = [t for t in names if t not in LOSS_TERMS]
    if unknown or not names:
        raise ValueError(f"unknown loss terms {unknown or names}; choose from {', '.join(LOSS_TERMS)}")
    stochastic = [t for t in names if t in STOCHASTIC_TERMS]
    if stochastic and head != "tmass":
        raise ValueError(
            f"loss terms {', '.join(stochastic)} need the T-MASS radius (stochastic text), "
            f"but head {head!r} has none; use --head tmass or --loss-terms ce"
        )
    return tuple(t for t in LOSS_TERMS if t in names)


def support_videos(pooled: torch.Tensor, support_video: str = "paired") -> torch.Tensor:
    """The video embedding v_i of pair i in the support text (Eq. 8), ``[B, dim]``, from
    the batch's pooled videos ``[B(text), B(video), dim]``; see :func:`batch_losses`."""
    if support_video == "paired":
        return pooled.diagonal(dim1=0, dim2=1).T  # pooled[i, i]
    return pooled.mean(dim=0)  # pooled[:, i].mean(0)


def batch_losses(
    head: Head,
    text: torch.Tensor,
    frames: torch.Tensor,
    frame_mask: torch.Tensor | None,
    terms: tuple[str, ...],
    support_weight: float = 0.8,
    support_video: str = "paired",
    generator: torch.Generator | None = None,
    pooling_path: str = "folded",
) -> dict[str, torch.Tensor]:
    """The loss terms of one batch of pairs and their weighted ``total``.

    text ``[B, dim]`` (caption i), frames ``[B, n_frames, dim]`` and frame_mask
    ``[B, n_frames]`` (the video of caption i). Returns scalar tensors keyed by term,
    plus ``total = ce + s + support_weight * sup`` over the selected terms.

    T-MASS radius: R_i = R(t_i, v_i) from text i and its own video's frames, ``[B, dim]``
    (linear) or ``[B, 1]``; one stochastic sample t_s,i per text per step (noise from
    ``generator``), scored against every video of the batch, as the reference does.

    Support text (Eq. 8) needs "the" video embedding v of the pair, but X-Pool's video
    embedding depends on the text it is pooled on. ``support_video``:

    * ``paired`` (default): v_i = video i pooled on its own caption i, ``pooled[i, i]``.
      This is Eq. 8 read literally, and a function of the pair alone: the support text
      of a pair does not change with which other captions happen to share its batch.
    * ``batch-mean``: v_i = video i pooled on each caption of the batch, averaged
      (``pooled[:, i].mean(0)``), which is what the reference code does.

    ``pooling_path``: ``folded`` computes X-Pool's pooling with
    :func:`tmass.train.folded.folded_xpool` (the same function with a cheaper dropout
    mask: 26 instead of 36 ms per T-MASS step on 2 CPU cores); ``module`` calls the
    head's own forward pass.
    """
    if support_video not in SUPPORT_VIDEOS:
        raise ValueError(f"unknown support video {support_video!r}; choose from {SUPPORT_VIDEOS}")
    if any(t in STOCHASTIC_TERMS for t in terms) and not head.stochastic:
        raise ValueError(f"loss terms {terms} need a T-MASS head (head {head.cfg.head!r} has no radius)")
    if pooling_path not in POOLING_PATHS:
        raise ValueError(f"unknown pooling path {pooling_path!r}; choose from {POOLING_PATHS}")
    if pooling_path == "folded" and isinstance(head.pooling, XPoolFusion):
        pooled = folded_xpool(head.pooling, text, frames, frame_mask)  # [B(text), B(video), dim]
    else:
        pooled = head.pool(text, frames, frame_mask)
    # cos(x_i, pooled[i, j]) for several text variants x at once: one batched product
    # and one division by the pooled norms, instead of normalising [B, B, dim] per term.
    inv_norm = pooled.norm(dim=-1).clamp_min(1e-12).reciprocal()  # [B, B]
    variants = {}
    if "ce" in terms:
        variants["ce"] = text
    if head.stochastic and ("s" in terms or "sup" in terms):
        log_radius = head.radius(paired_frame_similarity(text, frames, frame_mask))
        if "s" in terms:
            noise = head.sample_noise(tuple(text.shape), generator=generator, device=text.device)
            variants["s"] = stochastic_text(text, log_radius, noise)
        if "sup" in terms:
            variants["sup"] = support_text(text, log_radius, support_videos(pooled, support_video))
    stacked = F.normalize(torch.stack(list(variants.values())), dim=-1)  # [K, B, dim]
    logits = torch.einsum("ktd,tvd->ktv", stacked, pooled) * (inv_norm * head.logit_scale())
    losses = {name: symmetric_infonce(logits[k]) for k, name in enumerate(variants)}
    weights = {"ce": 1.0, "s": 1.0, "sup": support_weight}
    losses["total"] = sum(weights[name] * loss for name, loss in losses.items())
    return losses
