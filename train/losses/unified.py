"""``unified``: the unified loss of pair-similarity optimisation (Li et al., "Unified Loss
of Pair Similarity Optimization for Vision-Language Retrieval", 2022).

For an anchor (text i with its video in column i, positive similarity s_p = cos(i, i))
and its negatives n (every column not showing text i's video)::

    L_i = tau * log(1 + sum_n exp((s_n - s_p + margin) / tau))

the same for each video against the texts, and ``total = mean_i L_i(t2v) + mean_j L_j(v2t)``.

The log-sum-exp weights each negative by its softmax share, VLC's hard-sample
weighting, and the margin is the triplet loss's. Two settings reduce it (the tests
check both numerically):

* ``temperature -> 0``: ``tau log(1 + sum exp(x_n / tau)) -> max(0, max_n x_n)``, the
  max-violation triplet ``[margin + max_n s_n - s_p]_+``, i.e. ``triplet-hn`` (the error
  is at most ``tau log(B)``);
* ``margin = 0``: ``L_i / tau = -log(e^{s_p/tau} / (e^{s_p/tau} + sum_n e^{s_n/tau}))``,
  VLC's (InfoNCE's) cross entropy with logit scale 1/tau, so ``total / (2 tau)`` is
  ``infonce`` with ``same_video="excluded"`` on logits ``cos / tau``.

Scaled by tau the loss keeps the triplet loss's size whatever the temperature, so the
learning rate of triplet runs carries over. The temperature is a setting, not the head's
learnable logit scale: the reduction to Triplet-HN needs it to go to 0. Other captions
of the same video are never negatives. The defaults (margin 0.2 as VSE++, tau 0.05)
are ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tmass.train.config import Checked, setting
from tmass.train.losses import TwoWayLoss


def unified_pair_loss(cos: torch.Tensor, positives: torch.Tensor, margin: float,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos ``[n, n]`` text-major with pair i on the diagonal, positives ``[n, n]`` bool ->
    (mean over texts, mean over videos) of ``tau log(1 + sum_n exp((s_n - s_p + m)/tau))``."""
    positive = cos.diagonal()  # [n]
    zero = torch.zeros_like(positive)[:, None]  # the "1 +" inside the log

    def direction(violation: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:  # [anchor, candidate]
        logits = violation.masked_fill(positives, float("-inf")) / temperature
        return temperature * torch.logsumexp(torch.cat([zero, logits], dim=1), dim=1)

    t2v = direction(cos - positive[:, None] + margin, positives)
    v2t = direction((cos - positive[None, :] + margin).T, positives.T)  # rows: videos
    return t2v.mean(), v2t.mean()


@dataclass(frozen=True)
class UnifiedConfig(Checked):
    margin: float = setting(0.2, bounds="[0, inf)", help="Margin on cosine similarities (as the triplet loss's).")
    temperature: float = setting(
        0.05, bounds="(0, inf)",
        help="tau: -> 0 gives Triplet-HN; with margin 0 the loss is tau times VLC at logit scale 1/tau.")


class Unified(TwoWayLoss):
    """The unified pair-similarity loss; reports its two directions as parts."""

    name = "unified"
    Config = UnifiedConfig

    def directions(self, cos: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return unified_pair_loss(cos, positives, self.cfg.margin, self.cfg.temperature)
