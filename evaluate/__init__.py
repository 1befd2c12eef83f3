"""Leak-free T-MASS inference and retrieval metrics.

:mod:`tmass.evaluate.scores` computes s(t, v) for every caption-video pair (naive
reference and fast path), :mod:`tmass.evaluate.sampling` the keyed noise and the fused
CPU kernel, :mod:`tmass.evaluate.metrics` ranks and recalls.
"""

from tmass.evaluate.metrics import dual_softmax, retrieval_metrics
from tmass.evaluate.scores import EvalConfig, evaluate_head, metrics_report, score_matrix, score_split

__all__ = [
    "EvalConfig",
    "dual_softmax",
    "evaluate_head",
    "metrics_report",
    "retrieval_metrics",
    "score_matrix",
    "score_split",
]
