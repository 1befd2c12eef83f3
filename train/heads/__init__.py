"""Retrieval heads on cached CLIP features. :mod:`tmass.train.heads.base` holds what every
head shares (features in, the scoring contract, the logit scale), each other module is
one head (or one family of heads) registered in :mod:`tmass.train.registry`:
:mod:`~tmass.train.heads.xpool` (meanP, X-Pool, T-MASS).

The names below are re-exported so that ``from tmass.train.heads import Head`` reads
as it always has.
"""

from tmass.train.heads.base import (
    LOGIT_SCALE_MAX,
    Noise,
    RetrievalHead,
    TextFeatures,
    VideoFeatures,
)
from tmass.train.heads.xpool import (
    Head,
    HeadConfig,
    MeanPooling,
    Radius,
    XPoolFusion,
    frame_similarity,
    paired_frame_similarity,
    sample_scores,
    stochastic_text,
    support_text,
)

__all__ = [
    "LOGIT_SCALE_MAX", "Head", "HeadConfig", "MeanPooling", "Noise", "Radius", "RetrievalHead", "TextFeatures",
    "VideoFeatures", "XPoolFusion", "frame_similarity", "paired_frame_similarity", "sample_scores", "stochastic_text",
    "support_text",
]
