"""Visual semantic enhanced reasoning network (``visern``, related-abstracts-a.txt, ViSERN).

Each frame's regions (its patch tokens, pooled to a G x G grid at extraction) are the
vertices of a fully connected semantic correlation graph; graph convolutions whose
propagation follows a random walk on that graph reason over the regions, and the
reasoned regions are aggregated into frame features and those into the video
embedding, scored against the caption by cosine. Axis names:
:mod:`tmass.train.heads.base`.

Per frame, with x_p the L2-normalised region p (p over the n_patch = G*G cells), f the
frame's CLIP embedding, l = 1 .. ``layers``, x^0 = x::

    R_pq     = <W_phi x_p, W_psi x_q> / sqrt(dim)          semantic correlation     [n_patch, n_patch]
    P        = D^-1 exp(R),  D = diag(sum_q exp(R_pq))     random-walk transition (rows sum to 1)
    x^l      = x^{l-1} + W_g^l (P x^{l-1})                 graph convolution, residual
    g        = W_o mean_p x^L_p                            reasoned regions -> frame  [dim]
    y        = f / |f| + g                                 frame feature
    v        = sum_j m_j y_j / |y_j| / sum_j m_j            video (mean over real frames)
    s(t, v)  = cos(t, v)                                   score  [n_text, n_video]

W_phi, W_psi ``[dim / reduction, dim]``, W_g^l and W_o ``[dim, dim]``.

Choices where the abstract is silent:

* The affinity is an embedded dot product (two learned maps, as in non-local blocks),
  and the random-walk rule is its row-normalised exponential: P_pq is the probability
  of walking from region p to q, so a region gathers the regions semantically close to
  it and "redundancy is suppressed" because weights compete within a row.
* Reasoning is residual and W_o starts at zero: untrained, y = f and the head is meanP
  (mean of normalised frames), so training starts from the baseline. The frame keeps
  CLIP's own embedding because the backbone is frozen here; the reasoned regions are
  what the head learns to add. W_g starts at the identity (one plain random-walk step).
* One graph per frame (regions of one frame); frames are averaged (ViSERN encodes the
  frame sequence further; on cached features, meanP's mean is the honest stand-in).
* The video embedding ignores the text: leak-free by construction, no noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tmass.train.config import setting
from tmass.train.heads.base import RetrievalHead, TextFeatures, VideoFeatures, logit_scale_parameter
from tmass.train.registry import BaseHeadConfig, HeadSpec


@dataclass
class ViSERNConfig(BaseHeadConfig):
    """ViSERN's settings."""

    head: str = setting("visern", cli=False, help="The registered head's name.")
    layers: int = setting(1, bounds="[1, inf)", help="ViSERN's random-walk graph convolution layers.")
    graph_reduction: int = setting(4, bounds="[1, inf)",
                                   help="ViSERN's affinity embedding width is dim / graph_reduction.")

    def __post_init__(self):
        super().__post_init__()
        if self.embed_dim % self.graph_reduction:
            raise ValueError(f"graph_reduction (--graph-reduction) {self.graph_reduction} does not divide the "
                             f"features' dim {self.embed_dim}")


class ViSERN(RetrievalHead):
    """Patches ``[n_video, n_frames, n_patch, dim]`` and frames ``[n_video, n_frames, dim]``
    -> one embedding per video; cosine with the text."""

    def __init__(self, cfg: ViSERNConfig):
        super().__init__(cfg)
        dim, hidden = cfg.embed_dim, cfg.embed_dim // cfg.graph_reduction
        self.phi = nn.Linear(dim, hidden, bias=False)
        self.psi = nn.Linear(dim, hidden, bias=False)
        self.convolutions = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(cfg.layers))
        for conv in self.convolutions:
            nn.init.eye_(conv.weight)
        self.out = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.out.weight)
        self.log_logit_scale = logit_scale_parameter(cfg.logit_scale)

    def embed(self, video: VideoFeatures) -> torch.Tensor:
        """Video features -> ``[n_video, dim]`` (module doc)."""
        x = F.normalize(video.patches, dim=-1)  # [n_video, n_frames, n_patch, dim]
        for conv in self.convolutions:
            affinity = torch.einsum("vfpd,vfqd->vfpq", self.phi(x), self.psi(x)) / math.sqrt(x.shape[-1])
            x = x + conv(affinity.softmax(-1) @ x)  # random walk: rows of P sum to 1
        y = F.normalize(video.frames, dim=-1) + self.out(x.mean(2))  # [n_video, n_frames, dim]
        y = F.normalize(y, dim=-1)
        mask = video.frame_mask if video.frame_mask is not None else torch.ones(y.shape[:2], dtype=torch.bool,
                                                                                device=y.device)
        weights = mask.to(y.dtype)[..., None]
        return (y * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def score(self, text: TextFeatures, video: VideoFeatures, eps: torch.Tensor | None = None) -> torch.Tensor:
        """cos(t, v) ``[n_text, n_video]``."""
        return F.normalize(text.embedding, dim=-1) @ F.normalize(self.embed(video), dim=-1).T


SPEC = HeadSpec("visern", "ViSERN", ViSERNConfig, ViSERN, features={"frames", "patch_tokens"},
                summary="regions (pooled patch tokens) as a fully connected graph, random-walk graph convolution, "
                        "reasoned regions added to the frames, mean over frames")
