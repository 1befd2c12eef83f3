"""BCLS, Binary and Continuous Label Supervision (Li et al.): ``triplet-sn`` learns the
binary labels, ``kendall`` adds the continuous pseudo labels to it.

**triplet-sn**, triplet loss with soft negative mining. Instead of the hardest negative
alone, every negative n of an anchor counts, weighted by its softmax share of hardness::

    w_n   = softmax_n(s_n / mining_temperature)
    L_i   = sum_n w_n [margin + s_n - s_p]_+

per text against the videos and per video against the texts, ``total = mean t2v + mean
v2t`` (as ``triplet-hn``). ``mining_temperature -> 0`` is Triplet-HN, a large one the
triplet loss averaged over negatives. The weights keep their gradient: the loss is one
smooth function of the similarities (a soft maximum of the hinges), where detached
weights would make it a different function at every step. Other captions of the same
video are never negatives.

**kendall**: Triplet-SN plus ``kendall_weight`` times a Kendall ranking loss between the
predicted similarities and the continuous pseudo labels r (:mod:`.relevance`). For a
list (a caption's videos, each distinct video once; or a video's captions) Kendall's tau
averages ``sign(s_a - s_b) sign(r_a - r_b)`` over pairs; the loss is ``1 - tau`` with
the sign of the predicted difference smoothed to ``tanh((s_a - s_b) /
kendall_temperature)`` (differentiable) and the pair ordered so that ``r_a > r_b``.

Sliding window and hard samples (SW-HS), against the pseudo labels' noise and the
quadratic number of pairs: the list is sorted by pseudo label (ties: the model's
higher score first, so the window after an item holds its hardest equally-labelled
rivals), each item is compared only with the next ``window`` items in that order
(neighbours in label order; far-apart pairs are rarely wrong), a pair whose labels
differ by ``label_noise`` or less is skipped (its order is noise), and of an item's
remaining pairs only the hardest (least agreeing) counts. So each item adds at most one
term, as in a triplet loss. The window, noise threshold and the hardest-per-item
choice are our reading of the abstract; the defaults are ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tmass.train.config import Checked, setting
from tmass.train.data import Batch
from tmass.train.losses import Scores, TwoWayLoss
from tmass.train.losses.relevance import PseudoLabelConfig, PseudoLabelLoss


def soft_negative_triplet(cos: torch.Tensor, positives: torch.Tensor, margin: float,
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos ``[n, n]`` text-major with pair i on the diagonal, positives ``[n, n]`` bool ->
    (mean over texts, mean over videos) of the softly mined hinge above."""
    positive = cos.diagonal()  # [n]
    # a positive's hinge is -inf, clamped to 0: its weight is 0 anyway
    negatives = cos.masked_fill(positives, float("-inf"))
    sims = torch.stack([negatives, negatives.T])  # [direction (t2v, v2t), anchor, candidate]: both at once
    hinge = (margin + sims - positive[:, None]).clamp_min(0)
    weights = torch.softmax(sims / temperature, dim=2)
    # an anchor without negatives: NaN weights -> 0
    t2v, v2t = (weights.nan_to_num(0.0) * hinge).sum(dim=2).mean(dim=1)
    return t2v, v2t


@dataclass
class KendallLabels:
    """What the smooth Kendall loss reads from a batch's lists besides the scores, made
    once per batch. Only the order among equal labels depends on the scores, so the
    labels in sorted order, and with them which pairs count, do not.

    ``label`` ``[n_list, n_item]``: the pseudo labels, -inf outside the list (sorted
    last); ``unusable`` ``[n_list, n_item, window]`` bool: item p of a sorted list and
    item p + 1 + w form no counted pair; ``weight`` ``[n_list, n_item]``: 1 / n for the n items
    with a counted pair, 0 for the rest (None when no pair counts)."""

    label: torch.Tensor
    unusable: torch.Tensor
    weight: torch.Tensor | None


def _after(x: torch.Tensor, window: int, pad: float) -> torch.Tensor:
    """``[n_list, n_item, window]``: for item p of each list, items p + 1 .. p + window
    (``pad`` past the end); a view of the padded lists."""
    return F.pad(x, (0, window), value=pad)[:, 1:].unfold(1, window, 1)


def kendall_labels(relevance: torch.Tensor, valid: torch.Tensor | None, window: int,
                   label_noise: float) -> KendallLabels:
    """The labels of lists with relevance ``[n_list, n_item]`` and valid ``[n_list,
    n_item]`` bool (items in the list; None: every item)."""
    with torch.no_grad():
        label = relevance if valid is None else relevance.masked_fill(~valid, float("-inf"))
        ranked = label.sort(dim=1, descending=True).values
        if valid is not None:
            # sorted, an item outside the list is +inf, as the padding: no pair with one
            # of them clears label_noise (r - inf is -inf, inf - inf NaN)
            ranked = ranked.nan_to_num(neginf=float("inf"))
        usable = ranked[:, :, None] - _after(ranked, window, float("inf")) > label_noise
        counted = usable.any(dim=2)  # [n_list, n_item]
        n = int(counted.sum())
        return KendallLabels(label, ~usable, counted.to(relevance.dtype) / n if n else None)


def kendall_rank(scores: torch.Tensor, labels: KendallLabels, temperature: float) -> torch.Tensor:
    """``1 - tau`` (smooth Kendall, SW-HS; see the module docstring) of lists with scores
    ``[n_list, n_item]``. Returns a scalar; 0 (with a gradient path) when no pair counts."""
    if labels.weight is None:
        return scores.sum() * 0.0
    # order each list by label, ties by the model's score, both descending
    by_score = torch.argsort(scores.detach(), dim=1, descending=True)
    by_label = labels.label.gather(1, by_score).argsort(dim=1, descending=True, stable=True)
    s = scores.gather(1, by_score.gather(1, by_label))  # [n_list, n_item]
    agree = torch.tanh((s[:, :, None] - _after(s, labels.unusable.shape[2], 0.0)) / temperature)
    hardest = agree.masked_fill(labels.unusable, 2.0).amin(dim=2)  # [n_list, n_item]; 2 > any tanh
    return 1.0 - (hardest * labels.weight).sum()


def kendall_ranking(scores: torch.Tensor, relevance: torch.Tensor, valid: torch.Tensor | None, window: int,
                    label_noise: float, temperature: float) -> torch.Tensor:
    """``1 - tau`` over lists: scores, relevance ``[n_list, n_item]`` (predicted
    similarity, pseudo label), valid ``[n_list, n_item]`` bool (items in the list; None:
    every item)."""
    return kendall_rank(scores, kendall_labels(relevance, valid, window, label_noise), temperature)


@dataclass(frozen=True)
class TripletSNConfig(Checked):
    margin: float = setting(0.2, bounds="[0, inf)", help="Margin on cosine similarities (as the triplet loss's).")
    mining_temperature: float = setting(
        0.1, bounds="(0, inf)", help="Softmax temperature of the soft negative mining: -> 0 is the hardest "
                                     "negative alone, large is every negative alike.")


@dataclass(frozen=True)
class KendallConfig(TripletSNConfig, PseudoLabelConfig):
    kendall_weight: float = setting(1.0, bounds="[0, inf)",
                                    help="Weight of the Kendall ranking loss added to Triplet-SN.")
    kendall_temperature: float = setting(
        0.05, bounds="(0, inf)",
        help="Temperature of tanh((s_a - s_b) / T), the smooth sign of a predicted similarity difference.")
    window: int = setting(5, bounds="[1, inf)",
                          help="Sliding window: each item is compared with the next WINDOW items in label order.")
    label_noise: float = setting(0.05, bounds="[0, inf)",
                                 help="Pairs whose pseudo labels differ by this or less are skipped as noise.")


class TripletSN(TwoWayLoss):
    """Triplet loss with soft negative mining; reports its two directions as parts."""

    name = "triplet-sn"
    Config = TripletSNConfig

    def directions(self, cos: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return soft_negative_triplet(cos, positives, self.cfg.margin, self.cfg.mining_temperature)


class Kendall(PseudoLabelLoss):
    """BCLS: Triplet-SN on the binary labels plus the Kendall ranking loss on the pseudo
    labels, over each caption's list of distinct videos and each distinct video's list
    of captions (all lists' terms averaged together); reports ``triplet`` and
    ``kendall`` (the unweighted 1 - tau)."""

    name = "kendall"
    Config = KendallConfig

    def list_labels(self, relevance: torch.Tensor, valid: torch.Tensor | None) -> KendallLabels:
        return kendall_labels(relevance, valid, self.cfg.window, self.cfg.label_noise)

    def __call__(self, batch: Batch, scores: Scores) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        t2v, v2t = soft_negative_triplet(scores.cos, batch.positives, cfg.margin, cfg.mining_temperature)
        rank = kendall_rank(*self.lists(batch, scores.cos), cfg.kendall_temperature)
        triplet = t2v + v2t
        return {"triplet": triplet, "kendall": rank, "total": torch.add(triplet, rank, alpha=cfg.kendall_weight)}
