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

import functools
from dataclasses import dataclass

import torch

from tmass.train.config import setting
from tmass.train.data import Batch
from tmass.train.losses import Scores
from tmass.train.losses.infonce import symmetric_infonce
from tmass.train.losses.relevance import PseudoLabelConfig, PseudoLabelLoss


@dataclass
class NDCGLabels:
    """What NDCG@K reads from a batch's lists besides the scores, made once per batch.

    An item without gain adds nothing to DCG, so only the items with a gain get a rank:
    ``gain`` ``[n_list, n_gain]`` (each list's positive gains, largest first, over the
    list's IDCG@K / ln 2, padded with zeros to the list with most) and their ``columns``
    ``[n_list, n_gain]`` in the list; ``outside`` ``[n_list, n_item]`` bool (items not in
    the list; None: none); ``cut``: the K of NDCG@K (the list's length for K = 0)."""

    gain: torch.Tensor
    columns: torch.Tensor
    outside: torch.Tensor | None
    cut: int


@functools.lru_cache(maxsize=8)
def _discounts(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[n]``: 1 / ln(1 + rank) at ranks 1 .. n (the ideal list's discounts over ln 2)."""
    return torch.arange(2, n + 2, dtype=dtype, device=device).log().reciprocal()


def ndcg_labels(relevance: torch.Tensor, valid: torch.Tensor | None, k: int) -> NDCGLabels:
    """The labels of lists with relevance ``[n_list, n_item]`` and valid ``[n_list,
    n_item]`` bool (the items of each list; None: every item), for NDCG@k."""
    with torch.no_grad():
        gain = torch.exp2(relevance).sub_(1.0)  # [n_list, n_item]
        if valid is not None:
            gain = gain * valid
        ideal, columns = gain.sort(dim=1, descending=True)
        cut = relevance.shape[1] if k == 0 else k
        top = ideal[:, :cut]
        # IDCG / ln 2, so that a rank's discount is 1 / ln(1 + rank): one operation on the ranks
        idcg = (top @ _discounts(top.shape[1], top.dtype, top.device)).clamp_min(1e-12)
        # sorted, the lists' gains are positive in their first n_gain columns at most
        n_gain = max(sum(top > 0 for top in ideal.amax(dim=0).tolist()), 1)
        outside = None if valid is None else ~valid
        return NDCGLabels(ideal[:, :n_gain] / idcg[:, None], columns[:, :n_gain], outside, cut)


def list_ndcg(scores: torch.Tensor, labels: NDCGLabels, temperature: float) -> torch.Tensor:
    """Smooth NDCG@K ``[n_list]`` of lists with scores ``[n_list, n_item]``; see the module docstring."""
    scaled = scores / temperature  # [n_list, n_item]
    if labels.outside is not None:
        # an item outside the list sits far below every other (sigmoid 0 above them)
        scaled = scaled.masked_fill(labels.outside, torch.finfo(scores.dtype).min / 4)
    ranked = scaled.gather(1, labels.columns)  # [n_list, n_gain]
    # 1 + sum over b != a is the full sum plus 1/2: its b = a term is sigmoid(0)
    rank = 0.5 + torch.sigmoid(scaled[:, None, :] - ranked[:, :, None]).sum(dim=2)  # [n_list, n_gain]
    return (labels.gain.masked_fill(rank > labels.cut + 0.5, 0.0) / torch.log1p(rank)).sum(dim=1)


def smooth_ndcg(scores: torch.Tensor, relevance: torch.Tensor, valid: torch.Tensor | None, k: int,
                temperature: float) -> torch.Tensor:
    """Smooth NDCG@k ``[n_list]`` of lists: scores, relevance ``[n_list, n_item]`` and
    valid ``[n_list, n_item]`` bool (the items of each list; None: every item)."""
    return list_ndcg(scores, ndcg_labels(relevance, valid, k), temperature)


@dataclass(frozen=True)
class SmoothNDCGConfig(PseudoLabelConfig):
    ndcg_k: int = setting(10, bounds="[0, inf)", help="NDCG@K: the top K of each list count (0: the whole list).")
    rank_temperature: float = setting(
        0.05, bounds="(0, inf)",
        help="Temperature of the smooth rank's sigmoid of similarity differences (smaller: closer to hard ranks).")
    ndcg_weight: float = setting(1.0, bounds="[0, inf)",
                                 help="Weight of the listwise 1 - S-NDCG term added to InfoNCE.")


class SmoothNDCG(PseudoLabelLoss):
    """InfoNCE plus the listwise Smooth-NDCG; reports ``infonce`` and ``ndcg`` (1 - S-NDCG)."""

    name = "s-ndcg"
    Config = SmoothNDCGConfig

    def list_labels(self, relevance: torch.Tensor, valid: torch.Tensor | None) -> NDCGLabels:
        return ndcg_labels(relevance, valid, self.cfg.ndcg_k)

    def __call__(self, batch: Batch, scores: Scores) -> dict[str, torch.Tensor]:
        positives = self.of(batch).positives
        exclude = None  # other captions of a caption's video, where the batch holds any
        if positives is not None:
            exclude = positives & ~torch.eye(len(positives), dtype=torch.bool, device=positives.device)
        pairwise = symmetric_infonce(scores.logits, exclude)
        cfg = self.cfg
        ndcg = list_ndcg(*self.lists(batch, scores.cos), cfg.rank_temperature)
        listwise = 1.0 - ndcg.mean()
        return {"infonce": pairwise, "ndcg": listwise, "total": torch.add(pairwise, listwise, alpha=cfg.ndcg_weight)}
