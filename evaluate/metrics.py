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


def _check(scores: np.ndarray, text_to_video: np.ndarray) -> None:
    n_text, n_video = scores.shape
    if text_to_video.shape != (n_text,):
        raise ValueError(f"text_to_video has shape {text_to_video.shape}, expected ({n_text},) for scores {scores.shape}")
    if n_text and (text_to_video.min() < 0 or text_to_video.max() >= n_video):
        raise ValueError("text_to_video points outside the gallery")
    if not np.isfinite(scores).all():
        raise ValueError("score matrix holds NaN or inf")


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


def dual_softmax(scores: np.ndarray, temperature: float = DSL_TEMPERATURE) -> np.ndarray:
    """DSL: ``s'(t, v) = s(t, v) * softmax_t(temperature * s(., v))``, the softmax taken
    over all queries (text axis) for each video. Transductive."""
    logits = temperature * np.asarray(scores, dtype=np.float64)
    logits -= logits.max(axis=0, keepdims=True)
    prior = np.exp(logits)
    prior /= prior.sum(axis=0, keepdims=True)
    return (scores * prior).astype(np.float32)


def retrieval_metrics(scores: np.ndarray, text_to_video: np.ndarray, directions: str = "both") -> dict:
    """``{"t2v": {...}, "v2t": {...}}`` with R1 R5 R10 MdR MnR n for the requested
    directions (``t2v``, ``v2t`` or ``both``)."""
    out = {}
    if directions in ("t2v", "both"):
        out["t2v"] = _summary(t2v_ranks(scores, text_to_video))
    if directions in ("v2t", "both"):
        out["v2t"] = _summary(v2t_ranks(scores, text_to_video))
    return out
