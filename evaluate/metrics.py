"""Retrieval metrics from a score matrix ``[n_text, n_video]`` (text rows, video columns).

Ranks are 1-based. **Ties count against the query**: the rank of the target is the number
of candidates scoring at least as high as it (itself included), so a constant score
matrix ranks every target last instead of first, and no degenerate scorer can look good.

* text-to-video: caption t ranks every gallery video; its target is
  ``text_to_video[t]``.
* video-to-text: video v ranks every caption; with several captions per video (VATEX,
  10) its rank is that of its best-ranked own caption, i.e. one plus the number of
  *other videos'* captions scoring at least as high as v's best caption. Videos without
  a caption among the queries have no v2t rank and are left out (``n`` says how many
  were ranked).
* R@K = percentage of queries with rank <= K; MdR / MnR = median / mean rank.

DSL (dual softmax, :func:`dual_softmax`) re-weights every score by a softmax over *all
queries*; it is transductive (it needs the whole query set at once) and is therefore
reported separately from, never instead of, the plain metrics.

**Audit protocol** (``protocol="reference"``): the official T-MASS evaluator's own
definitions, on its score matrix (see :mod:`tmass.evaluate.scores`). It stacks each
video's captions in query order into slots k = 0, 1, ... (:func:`caption_slots`),
padding videos with fewer captions, so a score is undefined (NaN) where the gallery
video has no caption in the query's slot. Then:

* t2v: an undefined score ranks ahead of the target (torch's descending sort puts NaN
  first); a query whose own score is undefined is left out.
* v2t: video v ranks the *videos*, each by the best of its captions' scores against v
  (undefined ones ignored), not the captions one by one.
* DSL (:func:`reference_dual_softmax`): for each slot k and gallery video v, a softmax
  over the k-th captions of all videos; where any video has no k-th caption the whole
  column is undefined, so with unequal caption counts t2v keeps only the slots that every
  video fills.

Ties count against the query in both protocols.
"""

from __future__ import annotations

import numpy as np

RECALL_AT = (1, 5, 10)
DSL_TEMPERATURE = 100.0  # the inverse temperature the DSL papers and T-MASS's code use


def _summary(ranks: np.ndarray) -> dict:
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {f"R{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_AT}
    out["MdR"] = float(np.median(ranks))
    out["MnR"] = float(np.mean(ranks))
    out["n"] = int(len(ranks))
    return out


def _check(scores: np.ndarray, text_to_video: np.ndarray, undefined_ok: bool = False) -> None:
    n_text, n_video = scores.shape
    if text_to_video.shape != (n_text,):
        raise ValueError(f"text_to_video has shape {text_to_video.shape}, expected ({n_text},) for scores {scores.shape}")
    if n_text and (text_to_video.min() < 0 or text_to_video.max() >= n_video):
        raise ValueError("text_to_video points outside the gallery")
    if not (np.isfinite(scores) | (undefined_ok & np.isnan(scores))).all():
        raise ValueError("score matrix holds NaN or inf")


def caption_slots(text_to_video: np.ndarray) -> np.ndarray:
    """Slot k of each caption: how many captions of its video come before it in query
    order, ``[n_text]`` (the official evaluator's per-video caption index)."""
    text_to_video = np.asarray(text_to_video)
    order = np.argsort(text_to_video, kind="stable")
    grouped = text_to_video[order]
    slots = np.empty(len(text_to_video), dtype=np.int64)
    slots[order] = np.arange(len(order)) - np.searchsorted(grouped, grouped, side="left")
    return slots


def t2v_ranks(scores: np.ndarray, text_to_video: np.ndarray) -> np.ndarray:
    """scores ``[n_text, n_video]`` -> rank of each caption's video ``[n_text]``."""
    scores, text_to_video = np.asarray(scores), np.asarray(text_to_video)
    _check(scores, text_to_video)
    target = scores[np.arange(len(scores)), text_to_video]
    return (scores >= target[:, None]).sum(axis=1)


def v2t_ranks(scores: np.ndarray, text_to_video: np.ndarray) -> np.ndarray:
    """scores ``[n_text, n_video]`` -> rank of each captioned video's best caption
    ``[n_captioned_video]`` (videos in gallery order)."""
    scores, text_to_video = np.asarray(scores), np.asarray(text_to_video)
    _check(scores, text_to_video)
    n_text, n_video = scores.shape
    own = scores[np.arange(n_text), text_to_video]  # [n_text] score of each caption with its video
    best = np.full(n_video, -np.inf)
    np.maximum.at(best, text_to_video, own)  # [n_video] best own-caption score
    at_least = (scores >= best[None, :]).sum(axis=0)  # all captions, own ones included
    own_at_least = np.zeros(n_video, dtype=np.int64)
    np.add.at(own_at_least, text_to_video, own >= best[text_to_video])
    captioned = np.isfinite(best)
    return (at_least - own_at_least + 1)[captioned]


def reference_t2v_ranks(scores: np.ndarray, text_to_video: np.ndarray) -> np.ndarray:
    """Audit protocol: scores ``[n_text, n_video]`` (NaN: undefined) -> rank of each
    caption's video ``[n_defined]``, undefined scores ranked ahead of the target and
    queries with an undefined target left out."""
    scores, text_to_video = np.asarray(scores), np.asarray(text_to_video)
    _check(scores, text_to_video, undefined_ok=True)
    target = scores[np.arange(len(scores)), text_to_video]
    with np.errstate(invalid="ignore"):
        ahead = (scores >= target[:, None]) | np.isnan(scores)
    return ahead.sum(axis=1)[~np.isnan(target)]


def reference_v2t_ranks(scores: np.ndarray, text_to_video: np.ndarray) -> np.ndarray:
    """Audit protocol: scores ``[n_text, n_video]`` (NaN: undefined) -> rank of each video
    among the videos ``[n_video]``, each ranked by its best caption's score against the
    query video (the reference's max over caption slots)."""
    scores, text_to_video = np.asarray(scores), np.asarray(text_to_video)
    _check(scores, text_to_video, undefined_ok=True)
    n_video = scores.shape[1]
    order = np.argsort(text_to_video, kind="stable")
    grouped = text_to_video[order]
    owners, starts = np.unique(grouped, return_index=True)
    best = np.full((n_video, n_video), -np.inf)  # [owner video a, query video v]
    best[owners] = np.maximum.reduceat(np.where(np.isnan(scores), -np.inf, scores)[order], starts, axis=0)
    if len(owners) < n_video:
        raise ValueError("the reference protocol needs a caption for every gallery video")
    own = np.diagonal(best)
    return (best >= own[None, :]).sum(axis=0)


def reference_dual_softmax(scores: np.ndarray, text_to_video: np.ndarray, temperature: float = DSL_TEMPERATURE) -> np.ndarray:
    """The audit protocol's DSL: ``s'(t, v) = s(t, v) * softmax(temperature * s(., v))``
    with the softmax over the captions in t's slot, one per video; a (slot, video) column
    that a video cannot fill, or that holds an undefined score, is undefined (NaN).
    scores ``[n_text, n_video]`` -> ``[n_text, n_video]``."""
    scores = np.asarray(scores)
    slots = caption_slots(text_to_video)
    out = np.full(scores.shape, np.nan, dtype=np.float32)
    for k in range(int(slots.max(initial=-1)) + 1):
        rows = np.flatnonzero(slots == k)  # one caption per video that has a k-th one
        if len(rows) < scores.shape[1]:
            continue  # the reference pads the missing ones with NaN, which fills the column
        block = scores[rows].astype(np.float64)
        logits = temperature * block
        logits -= logits.max(axis=0, keepdims=True)  # NaN propagates down its column
        prior = np.exp(logits)
        out[rows] = block * prior / prior.sum(axis=0, keepdims=True)
    return out


def dual_softmax(scores: np.ndarray, temperature: float = DSL_TEMPERATURE) -> np.ndarray:
    """DSL: ``s'(t, v) = s(t, v) * softmax_t(temperature * s(., v))``, the softmax taken
    over all queries (text axis) for each video. Transductive."""
    logits = temperature * np.asarray(scores, dtype=np.float64)
    logits -= logits.max(axis=0, keepdims=True)
    prior = np.exp(logits)
    prior /= prior.sum(axis=0, keepdims=True)
    return (scores * prior).astype(np.float32)


def retrieval_metrics(scores: np.ndarray, text_to_video: np.ndarray, directions: str = "both",
                      protocol: str = "leak-free") -> dict:
    """``{"t2v": {...}, "v2t": {...}}`` with R1 R5 R10 MdR MnR n for the requested
    directions (``t2v``, ``v2t`` or ``both``), ranked by ``protocol``'s definitions
    (``reference``: the audit's, see the module docstring)."""
    t2v, v2t = (reference_t2v_ranks, reference_v2t_ranks) if protocol == "reference" else (t2v_ranks, v2t_ranks)
    out = {}
    if directions in ("t2v", "both"):
        out["t2v"] = _summary(t2v(scores, text_to_video))
    if directions in ("v2t", "both"):
        out["v2t"] = _summary(v2t(scores, text_to_video))
    return out
