"""Leak-free T-MASS inference and retrieval metrics.

:mod:`tmass.evaluate.scores` computes s(t, v) for every caption-video pair (naive
reference and fast path), :mod:`tmass.evaluate.sampling` the keyed noise and the fused
CPU kernel, :mod:`tmass.evaluate.metrics` ranks and recalls, :mod:`tmass.evaluate.figures`
every figure. The names below load on first use, so that importing the package (as
``tmass --help`` does) does not import torch.
"""

import importlib

_EXPORTS = {
    "EvalConfig": "scores",
    "evaluate_head": "scores",
    "metrics_report": "scores",
    "score_matrix": "scores",
    "score_split": "scores",
    "dual_softmax": "metrics",
    "retrieval_metrics": "metrics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"tmass.evaluate.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tmass.evaluate' has no attribute {name!r}")
