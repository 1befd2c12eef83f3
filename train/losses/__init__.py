"""Training losses: the registry, and the loss terms of T-MASS (paper Eq. 5, 8-9) over any registered loss.

**A loss** is a subclass of :class:`Loss` in a module of its own, with a config dataclass
(``Loss.Config``: its settings, each with its default and help text in the field's
metadata, see :mod:`tmass.train.config`), called on one :class:`~tmass.train.data.Batch`
and the :class:`Scores` of one text variant against the batch's videos. It returns named
scalar tensors, at least ``total`` (its own weighted sum of any other parts it reports).
Registering a loss is one line in :data:`LOSSES` or, from another package, an entry point
in the group ``tmass.losses`` (``name = "package.module:LossClass"``). ``tmass train
--loss NAME`` lists every registered name, and each config field becomes an option.

Built in: ``infonce`` (symmetric cross-entropy, Eq. 1-2; the default) and ``triplet-hn``
(VSE++'s max-violation triplet); from the seed papers (related-abstracts-a): ``s-ndcg``
(listwise Smooth-NDCG plus InfoNCE), ``selhn`` (selectively hard negatives),
``triplet-sn`` and ``kendall`` (BCLS: soft negative mining; Kendall rank correlation
with continuous pseudo labels), ``unified`` (the unified pair-similarity loss, which
holds Triplet-HN and VLC as special cases). Pseudo labels: :mod:`.relevance`.

**Loss terms** (Table 6 of the paper; ``--loss-terms`` is a comma list of them) are the
text variants the chosen loss is applied to, each scored against the same pooled videos
(video j pooled on the deterministic caption t_i):

    ce    the CLIP text embedding t                      (X-Pool, meanP)
    s     one stochastic sample t_s = t + eps * exp(R)   (T-MASS, Eq. 5)
    sup   the support text t + exp(R) (v - t)/|v - t|    (T-MASS, Eq. 8),
          weighted by ``support_weight`` (alpha of Eq. 9)

Table 6's rows are ``ce`` (X-Pool), ``ce,s``, ``s`` and ``s,sup`` (the final T-MASS). The
log names a term by its variant (``ce``, ``s``, ``sup``: the loss's ``total`` on it), a
loss's other parts by ``variant.part``, and the weighted sum over variants ``total``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import ClassVar

import torch
import torch.nn.functional as F

from tmass.train.data import Batch
from tmass.train.folded import folded_xpool
from tmass.train.heads import RetrievalHead, paired_frame_similarity, stochastic_text, support_text
from tmass.train.heads.base import require_tokens
from tmass.train.registry import head_spec

# name -> "module:class"; imported on first use
LOSSES = {
    "infonce": "tmass.train.losses.infonce:InfoNCE",
    "triplet-hn": "tmass.train.losses.triplet:TripletHN",
    "s-ndcg": "tmass.train.losses.sndcg:SmoothNDCG",
    "selhn": "tmass.train.losses.selhn:SelHN",
    "triplet-sn": "tmass.train.losses.bcls:TripletSN",
    "kendall": "tmass.train.losses.bcls:Kendall",
    "unified": "tmass.train.losses.unified:Unified",
}
ENTRY_POINT_GROUP = "tmass.losses"
DEFAULT_LOSS = "infonce"

LOSS_TERMS = ("ce", "s", "sup")
STOCHASTIC_TERMS = ("s", "sup")  # need the T-MASS radius
SUPPORT_VIDEOS = ("paired", "batch-mean")
POOLING_PATHS = ("folded", "module")


@dataclass
class Scores:
    """One text variant of a batch scored against the batch's videos, text-major.

    ``cos`` ``[B_text, B_video]``: cosine similarities; ``logits`` ``[B_text, B_video]``:
    the same times the head's learnable logit scale (what a softmax loss uses)."""

    cos: torch.Tensor
    logits: torch.Tensor


class Loss:
    """Base class of every loss; see the module docstring. Subclasses set ``name`` and
    ``Config`` and implement ``__call__``."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, cfg=None):
        self.cfg = cfg if cfg is not None else self.Config()

    def prepare(self, text_ids: list[str], video_ids: list[str]) -> None:
        """Called once before the first step with the training split's caption and video
        ids (a batch's ``text_rows`` and ``video_rows`` index them): a loss that reads
        per-pair data from a file maps it here. Most losses need nothing."""

    def __call__(self, batch: Batch, scores: Scores) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class TwoWayLoss(Loss):
    """A loss on the batch's cosines and positives alone, one term per direction:
    subclasses give ``directions(cos [B_text, B_video], positives [B_text, B_video])
    -> (text-to-video, video-to-text)`` scalars, reported as the parts ``t2v`` and
    ``v2t`` and summed into ``total``."""

    def directions(self, cos: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, batch: Batch, scores: Scores) -> dict[str, torch.Tensor]:
        t2v, v2t = self.directions(scores.cos, batch.positives)
        return {"t2v": t2v, "v2t": v2t, "total": t2v + v2t}


def _plugins() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def loss_names() -> tuple[str, ...]:
    """Every registered loss: the built-in ones, then those of installed plugins."""
    return tuple(LOSSES) + tuple(sorted(name for name in _plugins() if name not in LOSSES))


def loss_class(name: str) -> type[Loss]:
    """The class registered as ``name`` (imports its module)."""
    if name in LOSSES:
        module, attr = LOSSES[name].split(":")
        return getattr(importlib.import_module(module), attr)
    plugins = _plugins()
    if name not in plugins:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(loss_names())}")
    return plugins[name].load()


def build_loss(name: str, options: dict | None = None) -> Loss:
    """The loss ``name`` configured by ``options`` (field -> value; unknown fields are an error)."""
    cls = loss_class(name)
    from tmass.train.config import build_config

    return cls(build_config(cls.Config, options or {}, where=f"loss {name}"))


def parse_loss_terms(terms: str | Iterable[str] | None, head: str) -> tuple[str, ...]:
    """A comma list (or sequence) of loss terms, checked against the head; ``None`` or
    ``""`` gives the head's default from the registry (``ce``; ``s,sup`` for tmass).
    Returned in canonical order, without repeats."""
    spec = head_spec(head)
    if terms is None or terms == "" or terms == ():
        return spec.loss_terms
    names = [t.strip() for t in terms.split(",")] if isinstance(terms, str) else [str(t).strip() for t in terms]
    unknown = [t for t in names if t not in LOSS_TERMS]
    if unknown or not names:
        raise ValueError(f"unknown loss terms {unknown or names}; choose from {', '.join(LOSS_TERMS)}")
    stochastic = [t for t in names if t in STOCHASTIC_TERMS]
    if stochastic and not spec.stochastic:
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
    head: RetrievalHead,
    batch: Batch,
    loss: Loss,
    terms: tuple[str, ...],
    support_weight: float = 0.8,
    support_video: str = "paired",
    generator: torch.Generator | None = None,
    pooling_path: str = "folded",
) -> dict[str, torch.Tensor]:
    """The loss terms of one batch of pairs and their weighted ``total``.

    ``batch``: B pairs, caption i with its video (``batch.text`` ``[B, dim]``,
    ``batch.frames`` ``[B, n_frames, dim]``, ``batch.frame_mask`` ``[B, n_frames]``).
    ``loss`` is applied to each text variant in ``terms``; returns its ``total`` keyed by
    the variant, its other parts as ``variant.part``, and
    ``total = ce + s + support_weight * sup`` over the selected terms.

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
    :func:`tmass.train.folded.folded_xpool` (the same function, its dim x dim products
    per frame instead of per pair; see that module for what it costs); ``module`` calls
    the head's own forward pass.
    """
    if support_video not in SUPPORT_VIDEOS:
        raise ValueError(f"unknown support video {support_video!r}; choose from {SUPPORT_VIDEOS}")
    if any(t in STOCHASTIC_TERMS for t in terms) and not head.stochastic:
        raise ValueError(f"loss terms {terms} need a T-MASS head (head {head.cfg.head!r} has no radius)")
    if pooling_path not in POOLING_PATHS:
        raise ValueError(f"unknown pooling path {pooling_path!r}; choose from {POOLING_PATHS}")
    if not hasattr(head, "pool"):  # any other head: the loss on its own scores (the generic contract)
        if terms != ("ce",):
            raise ValueError(f"head {head.cfg.head!r} scores pairs itself; it trains on loss term ce only, not {terms}")
        text, video = batch.features()
        require_tokens(text, video, head_spec(head.cfg.head).features, head.cfg.head)
        cos, extra = head.train_scores(text, video)  # [B, B], the head's own terms
        losses = _weighted(batch, loss, ("ce",), cos[None], cos[None] * head.logit_scale(), support_weight)
        for name, value in extra.items():
            losses[f"head.{name}"] = value
            losses["total"] = losses["total"] + value
        return losses
    text, frames, frame_mask = batch.text, batch.frames, batch.frame_mask
    if pooling_path == "folded" and "folded-xpool" in head_spec(head.cfg.head).fast_paths:
        pooled = folded_xpool(head.pooling, text, frames, frame_mask)  # [B(text), B(video), dim]
    else:
        pooled = head.pool(text, frames, frame_mask)
    # cos(x_i, pooled[i, j]) for several text variants x at once: one batched product
    # and one division by the pooled norms, instead of normalising [B, B, dim] per term.
    inv_norm = _InverseNorm.apply(pooled)  # [B, B]
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
    # pooled @ x^T, so that pooled's gradient comes back contiguous, as its LayerNorm wants it
    dots = torch.bmm(pooled, stacked.permute(1, 2, 0)).permute(2, 0, 1)  # [K, B, B]
    # logits: the scale goes into the [B, B] inverse norms, not over the [K, B, B] cosines
    return _weighted(batch, loss, tuple(variants), dots * inv_norm, dots * (inv_norm * head.logit_scale()),
                     support_weight)


class _InverseNorm(torch.autograd.Function):
    """``1 / max(|x|, 1e-12)`` over the last axis: x ``[..., dim]`` -> ``[...]``. Its
    gradient, ``-x / |x|^3`` (0 where clamped), is one pass over x; autograd's for
    ``x.norm().clamp_min().reciprocal()`` takes three over the pooled videos."""

    @staticmethod
    def forward(ctx, x):
        norm = torch.linalg.vector_norm(x, dim=-1)
        inv = norm.clamp_min(1e-12).reciprocal()
        ctx.save_for_backward(x, inv, norm >= 1e-12)
        return inv

    @staticmethod
    def backward(ctx, grad):
        x, inv, unclamped = ctx.saved_tensors
        return x * (-grad * inv.pow(3) * unclamped)[..., None]


def _weighted(batch: Batch, loss: Loss, variants: tuple[str, ...], cos: torch.Tensor, logits: torch.Tensor,
              support_weight: float) -> dict[str, torch.Tensor]:
    """``loss`` on each text variant's cosines and logits ``[K, B, B]`` (text-major), and
    ``total = ce + s + support_weight * sup`` over the variants."""
    weights = {"ce": 1.0, "s": 1.0, "sup": support_weight}
    losses = {}
    for k, name in enumerate(variants):
        parts = loss(batch, Scores(cos=cos[k], logits=logits[k]))
        losses[name] = parts["total"]
        losses.update({f"{name}.{part}": value for part, value in parts.items() if part != "total"})
    losses["total"] = sum(weights[name] * losses[name] for name in variants)
    return losses
