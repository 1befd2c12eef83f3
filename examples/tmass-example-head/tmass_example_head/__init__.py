"""An example tmass head from outside tmass: a caption scored by its best frames.

    s(t, v) = sum over real frames f of softmax_f(tau cos(t, f)) cos(t, f)   [n_text, n_video]

a soft maximum of the caption-frame cosines, with the temperature tau learnable
(starting at 10; large tau: the best frame alone). It is registered by the entry point
in pyproject.toml, group ``tmass.heads``; nothing in tmass names it. Each score reads
one caption and one video, so it is leak-free, and ``tmass check-head best-frame``
shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tmass.train.config import setting
from tmass.train.heads import RetrievalHead, TextFeatures, VideoFeatures
from tmass.train.heads.base import logit_scale_parameter
from tmass.train.registry import BaseHeadConfig, HeadSpec


@dataclass
class BestFrameConfig(BaseHeadConfig):
    head: str = setting("best-frame", cli=False, help="The registered head's name.")
    temperature: float = setting(10.0, help="Initial tau of the soft maximum over frames.")


class BestFrame(RetrievalHead):
    def __init__(self, cfg: BestFrameConfig):
        super().__init__(cfg)
        self.log_tau = nn.Parameter(torch.tensor(float(cfg.temperature)).log())
        self.log_logit_scale = logit_scale_parameter(cfg.logit_scale)

    def score(self, text: TextFeatures, video: VideoFeatures, eps: torch.Tensor | None = None) -> torch.Tensor:
        """text ``[n_text, dim]``, frames ``[n_video, n_frames, dim]`` -> ``[n_text, n_video]``."""
        sims = torch.einsum("td,vfd->tvf", F.normalize(text.embedding, dim=-1), F.normalize(video.frames, dim=-1))
        logits = sims * self.log_tau.exp()
        if video.frame_mask is not None:
            logits = logits.masked_fill(~video.frame_mask[None], float("-inf"))
        return (logits.softmax(dim=-1) * sims).sum(-1)


SPEC = HeadSpec("best-frame", "Best frame", BestFrameConfig, BestFrame,
                summary="soft maximum over frames of the caption-frame cosine (an example plugin)")
