"""Excitation and aggregation (``ea``): a learned replacement for CLIP4Clip's mean pooling.

The seed paper (related-abstracts-b.txt) recalibrates each frame's features with an
excitation module that captures non-mutually-exclusive relations among the frames, then
aggregates the recalibrated frames with an aggregation module that learns their
exclusiveness. Its "sequential" and "tight" types need the CLIP backbone or a fusion
transformer; on cached features this is its plain type: the video embedding is a
function of the video's frames alone, scored against the caption by cosine.

Per video, with x_f the L2-normalised frame f, m_f = 1 for real frames (0 for padding),
r = ``reduction`` and [a ; b] concatenation (axis names: :mod:`tmass.train.heads.base`)::

    c    = sum_f m_f x_f / sum_f m_f                                 context   [n_video, dim]
    g_f  = 2 sigmoid(W_2 relu(W_1 [x_f ; c] + b_1) + b_2)            excitation  [.., n_frames, dim]
    y_f  = g_f * x_f                                                 recalibrated frames
    a_f  = softmax over real f of (w_a . relu(W_3 y_f + b_3) + b_a)  aggregation  [.., n_frames]
    v    = sum_f a_f y_f                                             video       [n_video, dim]
    s(t, v) = cos(t, v)                                              score       [n_text, n_video]

W_1 ``[dim / r, 2 dim]``, W_2 ``[dim, dim / r]``, W_3 ``[dim / r, dim]``, w_a ``[dim / r]``.

Choices where the abstract is silent:

* The excitation is SE-Net's (squeeze, bottleneck MLP, sigmoid gates) applied per frame
  and per channel, fed the frame together with the video's mean frame, so a frame's
  gates depend on the other frames ("relations among frame features") and several
  frames can be kept at once (sigmoid, not softmax: "non-mutually-exclusive").
* The aggregation is a softmax over the real frames ("exclusiveness"): frames compete
  for weight, as attention pooling does, from a one-hidden-layer scoring MLP.
* Gates are 2 sigmoid(.), and W_2, b_2 and w_a start at zero: the untrained head has
  g_f = 1 and uniform weights, so it *is* meanP (mean of the normalised real frames),
  and training starts from the baseline the paper improves on. Bottleneck r = 4.
* Frames are L2-normalised first, as meanP averages them. Padding frames get no
  weight and add nothing to the context.
* The video embedding ignores the text, so the head is leak-free by construction and
  a gallery's videos are embedded once per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tmass.train.config import setting
from tmass.train.heads.base import RetrievalHead, TextFeatures, VideoFeatures, logit_scale_parameter
from tmass.train.registry import BaseHeadConfig, HeadSpec


@dataclass
class EAConfig(BaseHeadConfig):
    """The excitation-and-aggregation head's settings."""

    head: str = setting("ea", cli=False, help="The registered head's name.")
    reduction: int = setting(4, bounds="[1, inf)",
                             help="Bottleneck ratio r of the excitation and aggregation MLPs (dim / r hidden units).")

    def __post_init__(self):
        super().__post_init__()
        if self.embed_dim % self.reduction:
            raise ValueError(f"reduction (--reduction) {self.reduction} does not divide the features' dim "
                             f"{self.embed_dim}")


class ExcitationAggregation(RetrievalHead):
    """Frames ``[n_video, n_frames, dim]`` -> one embedding per video; cosine with the text."""

    def __init__(self, cfg: EAConfig):
        super().__init__(cfg)
        dim, hidden = cfg.embed_dim, cfg.embed_dim // cfg.reduction
        self.excite_in = nn.Linear(2 * dim, hidden)
        self.excite_out = nn.Linear(hidden, dim)
        self.aggregate_in = nn.Linear(dim, hidden)
        self.aggregate_out = nn.Linear(hidden, 1)
        for layer in (self.excite_out, self.aggregate_out):  # untrained: g = 1, uniform weights (meanP)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.log_logit_scale = logit_scale_parameter(cfg.logit_scale)

    def embed(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """frames ``[n_video, n_frames, dim]``, frame_mask ``[n_video, n_frames]`` -> ``[n_video, dim]``."""
        x = F.normalize(frames, dim=-1)
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if frame_mask is None else frame_mask
        weights = mask.to(x.dtype)[..., None]  # [n_video, n_frames, 1]
        context = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # [n_video, dim]
        pair = torch.cat((x, context[:, None, :].expand_as(x)), dim=-1)  # [n_video, n_frames, 2 dim]
        y = 2 * torch.sigmoid(self.excite_out(F.relu(self.excite_in(pair)))) * x
        logits = self.aggregate_out(F.relu(self.aggregate_in(y))).squeeze(-1)  # [n_video, n_frames]
        attention = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return torch.einsum("vf,vfd->vd", attention, y)

    def score(self, text: TextFeatures, video: VideoFeatures, eps: torch.Tensor | None = None) -> torch.Tensor:
        """cos(t, v): text ``[n_text, dim]`` against each video's embedding -> ``[n_text, n_video]``."""
        videos = self.embed(video.frames, video.frame_mask)
        return F.normalize(text.embedding, dim=-1) @ F.normalize(videos, dim=-1).T


SPEC = HeadSpec("ea", "EA", EAConfig, ExcitationAggregation,
                summary="excitation (frame-wise recalibration) and aggregation (softmax over frames) pooling")
