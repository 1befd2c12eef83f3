"""``s-ndcg``: listwise Smooth-NDCG (the S-NDCG paper, "Integrating listwise ranking into
pairwise-based image-text retrieval") added to InfoNCE.

Each caption's list is every distinct video of the batch (a video repeated for several
of its captions counts once), each video's list every caption; every item has a
relevance r in [0, 1] (:mod:`.relevance`: RSC from caption-caption similarity, or a
relevance file), the positives 1. NDCG@K of a list with predicted similarities s::

    gain_a   = 2^{r_a} - 1
    rank_a   = 1 + sum_{b != a} sigmoid((s_b - s_a) / rank_temperature)   (smooth rank)
    DCG@K    = sum_{a: rank_a <= K} gain_a / log2(1 + rank_a)
    NDCG@K   = DCG@K / IDCG@K      (IDCG: the gains sorted, at ranks 1, 2, ..., K)

The cut ``rank_a <= K`` (on the smooth rank, K + 0.5 to split ties) passes no gradient;
the gradient flows through the smooth ranks in the discount. ``ndcg_k = 0`` keeps the whole
list. ``total = infonce + ndcg_weight * (1 - NDCG)``, with NDCG the mean over all
lists, the captions' and the videos' together; InfoNCE leaves other captions of the same video out
of its denominators (``same_video="excluded"``), so they are never negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tmass.train.config import setting
from tmass.train.data import Batch
from tmass.train.losses import Scores
from tmass.train.losses.infonce import symmetric_infonce
from tmass.train.losses.relevance import PseudoLabelConfig, PseudoLabelLoss


def smooth_ndcg(scores: torch.Tensor, relevance: torch.Tensor, valid: torch.Tensor, k: int,
                temperature: float) -> torch.Tensor:
    """Smooth NDCG@k ``[n_list]`` of lists: scores, relevance ``[n_list, n_item]`` and
    valid ``[n_list, n_item]`` bool (the items of each list); see the module docstring."""
    gain = (torch.pow(2.0, relevance) - 1.0) * valid  # [n_list, n_item]
    # an item outside the list sits far below every other (sigmoid 0 above them), and
    # 1 + sum over b != a is the full sum plus 1/2: its b = a term is sigmoid(0)
    scaled = (scores / temperature).masked_fill(~valid, torch.finfo(scores.dtype).min / 4)  # [n_list, n_item]
    rank = 0.5 + torch.sigmoid(scaled[:, None, :] - scaled[:, :, None]).sum(dim=2)  # [list, a]: sum over b above a
    with torch.no_grad():
        cut = scores.shape[1] if k == 0 else k
        kept_gain = gain * (rank <= cut + 0.5)
        ideal = gain.sort(dim=1, descending=True).values[:, :cut]
        positions = torch.arange(2, ideal.shape[1] + 2, device=scores.device, dtype=scores.dtype)
        idcg = (ideal / torch.log2(positions)).sum(dim=1).clamp_min(1e-12)
    return (kept_gain / torch.log2(1.0 + rank)).sum(dim=1) / idcg


@dataclass(frozen=True)
class SmoothNDCGConfig(PseudoLabelConfig):
    ndcg_k: int = setting(10, help="NDCG@K: the top K of each list count (0: the whole list).")
    rank_temperature: float = setting(
        0.05, help="Temperature of the smooth rank's sigmoid of similarity differences (smaller: closer to hard ranks).")
    ndcg_weight: float = setting(1.0, help="Weight of the listwise 1 - S-NDCG term added to InfoNCE.")

    def __post_init__(self):
        super().__post_init__()
        if self.ndcg_k < 0 or self.rank_temperature <= 0 or self.ndcg_weight < 0:
            raise ValueError("ndcg_k and ndcg_weight must be >= 0 and rank_temperature > 0")


class SmoothNDCG(PseudoLabelLoss):
    """InfoNCE plus the listwise Smooth-NDCG; reports ``infonce`` and ``ndcg`` (1 - S-NDCG)."""

    name = "s-ndcg"
    Config = SmoothNDCGConfig

    def __call__(self, batch: Batch, scores: Scores) -> dict[str, torch.Tensor]:
        positives = batch.positives
        exclude = positives & ~torch.eye(len(positives), dtype=torch.bool, device=positives.device)
        pairwise = symmetric_infonce(scores.logits, exclude)
        cfg = self.cfg
        ndcg = smooth_ndcg(*self.lists(batch, scores.cos), cfg.ndcg_k, cfg.rank_temperature)
        listwise = 1.0 - ndcg.mean()
        return {"infonce": pairwise, "ndcg": listwise, "total": pairwise + cfg.ndcg_weight * listwise}
