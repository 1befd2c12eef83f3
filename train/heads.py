"""Heads that turn cached CLIP features into retrieval embeddings: meanP, X-Pool, T-MASS.

Axis names, used in every docstring of this package and of ``tmass.evaluate``:

    n_text    captions (queries for text-to-video)
    n_video   videos
    n_frames  sampled frames per video
    dim       CLIP embedding width

Every pairwise tensor is text-major, ``[n_text, n_video, ...]``, and so is every score
matrix. (X-Pool's own code returns its pooled videos as ``[n_video, n_text, dim]``; we
keep one orientation throughout, since mixing the two is how the official T-MASS
evaluator came to score text b against video i pooled on caption i.)

Pieces (paper section 3.3, X-Pool section 3):

* pooling: ``MeanPooling`` (CLIP4Clip's meanP) or ``XPoolFusion`` (text-conditioned
  cross attention). Both map text ``[n_text, dim]`` and frames ``[n_video, n_frames, dim]``
  to pooled videos ``[n_text, n_video, dim]``.
* ``Radius`` (T-MASS only): log-radius R(t, v) from the cosine similarities S(t, v) of t
  to each frame of v (Eq. 6-7); the text mass is ``t + eps * exp(R)`` (Eq. 5).
* a learnable logit scale, initialised from the CLIP model's (stored in the features
  manifest) and clamped at ``LOGIT_SCALE_MAX`` after each optimiser step (as CLIP and the
  reference do), never in the forward pass, so its gradient always flows.

``Head(HeadConfig)`` is the only constructor; adding a head means one module and
one entry in ``POOLINGS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_SCALE_MAX = 100.0  # CLIP's cap on exp(logit_scale); X-Pool and T-MASS keep it


@dataclass
class HeadConfig:
    """A head's architecture. Defaults are the paper's (T-MASS on ViT-B/32 features)."""

    head: str = "tmass"  # meanp | xpool | tmass
    embed_dim: int = 512
    num_frames: int = 12
    num_heads: int = 1  # X-Pool's attention heads
    dropout: float = 0.3  # on X-Pool's residual linear branch
    radius: str = "linear"  # sim | scalar | linear (T-MASS, Table 5)
    prior: str = "uniform"  # uniform: eps ~ U(0, 1); normal: eps ~ N(0, prior_std^2)
    prior_std: float = 1.0
    logit_scale: float = 100.0  # initial exp(logit_scale), from the features manifest

    def __post_init__(self):
        if self.head not in POOLINGS:
            raise ValueError(f"unknown head {self.head!r}; choose from {sorted(POOLINGS)}")
        if self.radius not in RADII:
            raise ValueError(f"unknown radius {self.radius!r}; choose from {RADII}")
        if self.prior not in ("uniform", "normal"):
            raise ValueError(f"unknown prior {self.prior!r}; choose uniform or normal")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")


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
RADII = ("sim", "scalar", "linear")


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


class Head(nn.Module):
    """A retrieval head: pooling, optional T-MASS radius, learnable logit scale."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.pooling = POOLINGS[cfg.head](cfg)
        self.radius = Radius(cfg) if cfg.head == "tmass" else None
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(min(cfg.logit_scale, LOGIT_SCALE_MAX))))

    @property
    def stochastic(self) -> bool:
        return self.radius is not None

    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), a scalar tensor with its gradient (see :meth:`cap_logit_scale_`)."""
        return self.log_logit_scale.exp()

    @torch.no_grad()
    def cap_logit_scale_(self) -> None:
        """Clamp the scale at LOGIT_SCALE_MAX in place; the trainer calls it after each
        optimiser step. A clamp in the forward pass would zero the gradient at the cap,
        and float32(log 100) lies a hair above log 100, so a scale starting at CLIP's 100
        would never move."""
        self.log_logit_scale.clamp_(max=math.log(LOGIT_SCALE_MAX))

    def pool(self, text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """text ``[n_text, dim]``, frames ``[n_video, n_frames, dim]`` -> ``[n_text, n_video, dim]``."""
        return self.pooling(text, frames, frame_mask)

    def sample_noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """eps from the prior the head was configured with, ``shape`` e.g. ``[n, dim]``."""
        if self.cfg.prior == "uniform":
            return torch.rand(shape, generator=generator, device=device)
        return torch.randn(shape, generator=generator, device=device) * self.cfg.prior_std
