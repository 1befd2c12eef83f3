"""The X-Pool family of heads: meanP, X-Pool and T-MASS, registered as ``meanp``,
``xpool`` and ``tmass``. They are nested variants of one module, :class:`Head`, built
from one config, :class:`HeadConfig` (axis names: :mod:`tmass.train.heads.base`).

Pieces (paper section 3.3, X-Pool section 3):

* pooling: ``MeanPooling`` (CLIP4Clip's meanP) or ``XPoolFusion`` (text-conditioned
  cross attention). Both map text ``[n_text, dim]`` and frames ``[n_video, n_frames, dim]``
  to pooled videos ``[n_text, n_video, dim]``.
* ``Radius`` (T-MASS only): log-radius R(t, v) from the cosine similarities S(t, v) of t
  to each frame of v (Eq. 6-7); the text mass is ``t + eps * exp(R)`` (Eq. 5).
* a learnable logit scale, initialised from the CLIP model's (stored in the features
  manifest) and clamped at ``LOGIT_SCALE_MAX`` after each optimiser step (as CLIP and the
  reference do), never in the forward pass, so its gradient always flows.

Scores (``Head.score``): meanP and X-Pool ``cos(t, p(v|t))``; T-MASS with M samples of
the text mass ``max_m cos(t + eps_m * exp(R(t, v)), p(v|t))`` (Eq. 10), or
``cos(t, p(v|t))`` without sampling. X-Pool and T-MASS offer the ``folded-xpool`` fast
path: training folds the pooling per frame (:mod:`tmass.train.folded`) and the
evaluator runs a fused numba kernel on CPU (:mod:`tmass.evaluate.sampling`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tmass.train.config import check_choices, setting
from tmass.train.heads.base import PRIORS, Noise, RetrievalHead, TextFeatures, VideoFeatures, logit_scale_parameter
from tmass.train.registry import HeadSpec


RADII = ("sim", "scalar", "linear")


@dataclass
class HeadConfig:
    """A head's architecture. Defaults are the paper's (T-MASS on ViT-B/32 features)."""

    head: str = "tmass"  # meanp | xpool | tmass
    embed_dim: int = 512
    num_frames: int = 12
    num_heads: int = setting(1, bounds="[1, inf)", help="X-Pool attention heads.")
    dropout: float = setting(0.3, bounds="[0, 1)", help="Dropout on X-Pool's residual linear branch.")
    radius: str = setting("linear", choices=RADII,
                          help="T-MASS radius (Table 5): R = S, R = theta*S, or R = W S + b.")
    prior: str = setting("uniform", choices=PRIORS,
                         help="Distribution of eps in t_s = t + eps * exp(R): U(0, 1) or N(0, prior_std^2).")
    prior_std: float = setting(1.0, bounds="(0, inf)", help="Std of the normal prior (the reference uses 3e-3 on LSMDC).")
    logit_scale: float = 100.0  # initial exp(logit_scale), from the features manifest

    def __post_init__(self):
        if self.head not in POOLINGS:
            raise ValueError(f"unknown head {self.head!r}; choose from {sorted(POOLINGS)}")
        check_choices(self)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads (--num-heads) {self.num_heads} does not divide the features' dim {self.embed_dim}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None, dim: int) -> torch.Tensor:
    if mask is None:
        return values.mean(dim)
    weights = mask.to(values.dtype)
    return (values * weights).sum(dim) / weights.sum(dim).clamp_min(1.0)


class MeanPooling(nn.Module):
    """CLIP4Clip's meanP: the average of the L2-normalised real frames. Parameter-free,
    so the pooled video does not depend on the text."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()

    def forward(self, text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """text ``[n_text, dim]``, frames ``[n_video, n_frames, dim]``,
        frame_mask ``[n_video, n_frames]`` -> pooled ``[n_text, n_video, dim]`` (a view)."""
        mask = frame_mask.unsqueeze(-1) if frame_mask is not None else None
        pooled = _masked_mean(F.normalize(frames, dim=-1), mask, dim=1)  # [n_video, dim]
        return pooled.unsqueeze(0).expand(text.shape[0], -1, -1)


class XPoolFusion(nn.Module):
    """X-Pool's text-conditioned pooling, as its paper and code define it.

    One LayerNorm (``norm_in``) is shared by text and frames; queries come from the text,
    keys and values from the frames; softmax over frames (padding frames excluded);
    ``out_proj``; LayerNorm; a residual linear branch with dropout; LayerNorm. Every
    linear layer starts as the identity with zero bias, so the untrained head is a fixed,
    known function of its inputs.
    """

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.head_dim = dim // cfg.num_heads
        self.norm_in = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm_attn = nn.LayerNorm(dim)
        self.linear_proj = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(cfg.dropout)
        for layer in (self.q_proj, self.k_proj, self.v_proj, self.out_proj, self.linear_proj):
            nn.init.eye_(layer.weight)
            nn.init.zeros_(layer.bias)

    def attention_weights(self, text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax over frames: text ``[n_text, dim]``, frames ``[n_video, n_frames, dim]``
        -> weights ``[n_text, n_video, num_heads, n_frames]``."""
        n_text, (n_video, n_frames, _) = text.shape[0], frames.shape
        q = self.q_proj(self.norm_in(text)).view(n_text, self.num_heads, self.head_dim)
        k = self.k_proj(self.norm_in(frames)).view(n_video, n_frames, self.num_heads, self.head_dim)
        logits = torch.einsum("thc,vfhc->tvhf", q, k) / math.sqrt(self.head_dim)
        if frame_mask is not None:
            logits = logits.masked_fill(~frame_mask[None, :, None, :], float("-inf"))
        return logits.softmax(dim=-1)

    def forward(self, text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """text ``[n_text, dim]``, frames ``[n_video, n_frames, dim]``,
        frame_mask ``[n_video, n_frames]`` -> pooled ``[n_text, n_video, dim]``."""
        n_video, n_frames, dim = frames.shape
        weights = self.attention_weights(text, frames, frame_mask)  # [n_text, n_video, heads, n_frames]
        values = self.v_proj(self.norm_in(frames)).view(n_video, n_frames, self.num_heads, self.head_dim)
        attended = torch.einsum("tvhf,vfhc->tvhc", weights, values).reshape(text.shape[0], n_video, dim)
        pooled = self.norm_attn(self.out_proj(attended))
        return self.norm_out(pooled + self.dropout(self.linear_proj(pooled)))


POOLINGS = {"meanp": MeanPooling, "xpool": XPoolFusion, "tmass": XPoolFusion}


def frame_similarity(text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """S(t, v) of Eq. 6: cosine of each text with each frame.

    Pairwise: text ``[n_text, dim]``, frames ``[n_video, n_frames, dim]``
    -> ``[n_text, n_video, n_frames]``. Paired (row i of text with video i): text
    ``[n, dim]``, frames ``[n, n_frames, dim]`` via :func:`paired_frame_similarity`.
    Padding frames get similarity 0, so they add nothing to any radius.
    """
    sims = torch.einsum("td,vfd->tvf", F.normalize(text, dim=-1), F.normalize(frames, dim=-1))
    return sims if frame_mask is None else sims * frame_mask.to(sims.dtype)


def paired_frame_similarity(text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """S(t_i, v_i) for aligned rows: text ``[n, dim]``, frames ``[n, n_frames, dim]`` -> ``[n, n_frames]``."""
    sims = torch.einsum("nd,nfd->nf", F.normalize(text, dim=-1), F.normalize(frames, dim=-1))
    return sims if frame_mask is None else sims * frame_mask.to(sims.dtype)


class Radius(nn.Module):
    """Similarity-aware log-radius R(t, v) (Table 5); the text mass radius is exp(R).

    * ``linear``: R = W S + b with W ``[dim, n_frames]``, identity-initialised (so R's
      first n_frames coordinates start equal to S, the rest 0) and b = 0; the paper's
      final model and the reference default.
    * ``scalar``: R = theta * mean(S), theta learnable (init 1), broadcast over dim.
    * ``sim``: R = mean(S), nothing learned.

    The mean over the n_frames slots keeps exp(R) independent of the frame count (for
    ``scalar`` theta absorbs any factor). Padding frames have S = 0 (see
    :func:`frame_similarity`), so a short clip's radius shrinks towards exp(0) = 1
    rather than reading padding as evidence.
    """

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.kind = cfg.radius
        if self.kind == "linear":
            self.linear = nn.Linear(cfg.num_frames, cfg.embed_dim)
            nn.init.eye_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        elif self.kind == "scalar":
            self.theta = nn.Parameter(torch.ones(()))

    def forward(self, sims: torch.Tensor) -> torch.Tensor:
        """sims ``[..., n_frames]`` -> log-radius ``[..., dim]`` (linear) or ``[..., 1]``
        (sim, scalar; broadcasts over dim)."""
        if self.kind == "linear":
            return self.linear(sims)
        mean = sims.mean(dim=-1, keepdim=True)
        return mean * self.theta if self.kind == "scalar" else mean


def stochastic_text(text: torch.Tensor, log_radius: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 5: ``t_s = t + eps * exp(R)``; all three broadcast to a common shape
    (e.g. text ``[n, dim]``, log_radius ``[n, dim]``, noise ``[n, dim]``)."""
    return text + noise * log_radius.exp()


def support_text(text: torch.Tensor, log_radius: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Eq. 8: the support text ``t + exp(R) * (v - t) / |v - t|``, a point on the surface
    of the text mass in the direction of the video. Rows aligned:
    text ``[n, dim]``, log_radius ``[n, dim]`` or ``[n, 1]``, video ``[n, dim]`` -> ``[n, dim]``.

    With a scalar radius it lies at distance exp(R) from t along v - t; with the
    linear radius the product is elementwise, as in Eq. 8."""
    return text + log_radius.exp() * F.normalize(video - text, dim=-1)


class Head(RetrievalHead):
    """A head of the X-Pool family: pooling, optional T-MASS radius, learnable logit scale."""

    def __init__(self, cfg: HeadConfig):
        super().__init__(cfg)
        self.pooling = POOLINGS[cfg.head](cfg)
        self.radius = Radius(cfg) if cfg.head == "tmass" else None
        self.log_logit_scale = logit_scale_parameter(cfg.logit_scale)

    @property
    def noise(self) -> Noise | None:
        """T-MASS samples eps of the text mass from its prior; the others sample nothing."""
        return Noise(self.cfg.prior, self.cfg.prior_std, self.cfg.embed_dim) if self.radius is not None else None

    def pool(self, text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """text ``[n_text, dim]``, frames ``[n_video, n_frames, dim]`` -> ``[n_text, n_video, dim]``."""
        return self.pooling(text, frames, frame_mask)

    def score(self, text: TextFeatures, video: VideoFeatures, eps: torch.Tensor | None = None) -> torch.Tensor:
        """``cos(t, p(v|t))``, or with eps ``[n_text, n_video, trials, dim]`` the best of the
        trials ``max_m cos(t + eps_m * exp(R(t, v)), p(v|t))`` -> ``[n_text, n_video]``."""
        t = text.embedding
        pooled = self.pool(t, video.frames, video.frame_mask)  # [n_text, n_video, dim]
        if eps is None:
            return _cos(t[:, None, :], pooled)
        radius = self.radius(frame_similarity(t, video.frames, video.frame_mask)).exp()  # [n_text, n_video, dim or 1]
        return sample_scores(t, radius, pooled, eps)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


def sample_scores(text, radius, pooled, eps, own=None) -> torch.Tensor:
    """T-MASS scoring with materialised samples t_m = t + eps_m * r (Eq. 10).

    text ``[n_text, dim]``, radius r = exp(R) ``[n_text, n_video, dim]`` (or ``[..., 1]``),
    pooled ``[n_text, n_video, dim]``, eps ``[n_text, n_video, trials, dim]`` -> scores
    ``[n_text, n_video]``: the best trial's cosine with the pooled video. ``own``
    ``[n_text, n_video, dim]`` is the audit protocol's: the trial is still chosen against
    ``pooled``, but scored against ``own`` (see :mod:`tmass.evaluate.scores`)."""
    sampled = text[:, None, None, :] + eps * radius[:, :, None, :]  # [n_text, n_video, trials, dim]
    cos = _cos(sampled, pooled[:, :, None, :])  # [n_text, n_video, trials]
    if own is None:
        return cos.max(dim=-1).values
    best = cos.argmax(dim=-1)  # [n_text, n_video]
    chosen = sampled.gather(2, best[:, :, None, None].expand(-1, -1, 1, sampled.shape[-1])).squeeze(2)
    return _cos(chosen, own)


MEANP = HeadSpec("meanp", "meanP", HeadConfig, Head, summary="mean of the frames; only the logit scale learns")
XPOOL = HeadSpec("xpool", "X-Pool", HeadConfig, Head, fast_paths=("folded-xpool",),
                 summary="text-conditioned cross-attention pooling of the frames")
TMASS = HeadSpec("tmass", "T-MASS", HeadConfig, Head, loss_terms=("s", "sup"), stochastic=True,
                 fast_paths=("folded-xpool",), summary="X-Pool plus the stochastic text mass t + eps * exp(R)")
