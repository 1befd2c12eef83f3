"""``infonce``: symmetric InfoNCE, the mean of the text-to-video and video-to-text cross
entropies (paper Eq. 1-2, as CLIP, X-Pool and T-MASS train), and the default loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tmass.train.config import Checked, setting
from tmass.train.data import Batch
from tmass.train.losses import Loss, Scores

SAME_VIDEO = ("negative", "excluded")


def symmetric_infonce(logits: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the text-to-video and video-to-text cross entropies (Eq. 1-2).

    logits ``[n, n]`` text-major (row i: text i against every video, already multiplied
    by the logit scale); pair i is (text i, video i), so the targets are the diagonal.
    ``exclude`` ``[n, n]`` bool (optional, False on the diagonal): entries left out of
    both softmax denominators.
    """
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@dataclass(frozen=True)
class InfoNCEConfig(Checked):
    same_video: str = setting(
        "negative", choices=SAME_VIDEO,
        help="Another caption of a caption's video in the batch: 'negative' keeps the diagonal targets, so that "
             "video's second column counts as a negative (the reference's and the paper's loss); 'excluded' "
             "leaves it out of both softmax denominators, so it is never a negative.")


class InfoNCE(Loss):
    """Symmetric InfoNCE on ``scores.logits`` with the diagonal as targets.

    A batch of random pairs can hold two captions of one video (with batch 32, in about
    5 % of the batches on MSR-VTT's 9,000 training videos). By default the second copy
    of the video is a negative for the first caption, which keeps the paper's loss and
    every earlier run's numbers; ``same_video="excluded"`` removes such entries
    (``batch.positives`` off the diagonal) from both directions' denominators."""

    name = "infonce"
    Config = InfoNCEConfig

    def __call__(self, batch: Batch, scores: Scores) -> dict[str, torch.Tensor]:
        exclude = None
        if self.cfg.same_video == "excluded":
            positives = batch.positives
            exclude = positives & ~torch.eye(len(positives), dtype=torch.bool, device=positives.device)
        return {"total": symmetric_infonce(scores.logits, exclude)}
