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
__all__ = sorted([*_EXPORTS, "split_metrics"])


def split_metrics(head, arrays, trials: int, seed: int, device: str) -> dict:
    """The trainer's evaluator (``tmass.train.trainer.Evaluator``): leak-free metrics of
    ``head`` on a split, without a progress bar. The ``tmass`` command and sweeps hand it
    to training (train/ never imports this package); torch loads on the first call."""
    from tmass.evaluate.scores import EvalConfig, evaluate_head

    return evaluate_head(head, arrays, EvalConfig(trials=trials, seed=seed, device=device, progress=False))


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"tmass.evaluate.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tmass.evaluate' has no attribute {name!r}")
