"""``triplet-hn``: the max-violation triplet loss of VSE++ (Faghri et al., 2018).

For text i with its video in column i, only the hardest negative counts, in both
directions::

    t2v_i = [margin + max_{j: not positive(i, j)} cos(i, j) - cos(i, i)]_+
    v2t_j = [margin + max_{i: not positive(i, j)} cos(i, j) - cos(j, j)]_+
    total = mean_i t2v_i + mean_j v2t_j

on cosine similarities (the logit scale plays no part, so it stays where it started).
VSE++ sums over the batch; the mean keeps the loss's size, and so the learning rate,
independent of the batch size. Other captions of the same video (``batch.positives``)
are never negatives; a row or column without any negative adds 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tmass.train.config import Checked, setting
from tmass.train.losses import TwoWayLoss


def max_violation_triplet(cos: torch.Tensor, positives: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos ``[n, n]`` text-major with pair i on the diagonal, positives ``[n, n]`` bool
    (True on the diagonal) -> the mean hinge of each text against its hardest negative
    video, and of each video against its hardest negative text (scalars)."""
    positive = cos.diagonal()  # [n]
    negatives = cos.masked_fill(positives, float("-inf"))  # [n_text, n_video]
    t2v = (margin + negatives.max(dim=1).values - positive).clamp_min(0)
    v2t = (margin + negatives.max(dim=0).values - positive).clamp_min(0)
    return t2v.mean(), v2t.mean()


@dataclass(frozen=True)
class TripletHNConfig(Checked):
    margin: float = setting(0.2, bounds="[0, inf)", help="Margin of the hinge, on cosine similarities (VSE++: 0.2).")


class TripletHN(TwoWayLoss):
    """VSE++'s max-violation triplet loss; reports its two directions as parts."""

    name = "triplet-hn"
    Config = TripletHNConfig

    def directions(self, cos: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return max_violation_triplet(cos, positives, self.cfg.margin)
