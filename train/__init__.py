"""Heads trained on cached CLIP features: meanP, X-Pool and T-MASS (:mod:`tmass.train.heads`),
their losses (:mod:`tmass.train.losses`), the resumable trainer (:mod:`tmass.train.trainer`)
and the paper's ablation sweeps (:mod:`tmass.train.sweep`)."""
