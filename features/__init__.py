"""The feature-shard format (the contract between stages), its reader and writer,
validation, and simulated features. See :mod:`tmass.features.format`."""

from tmass.features.format import (
    FeatureFormatError,
    FeatureMeta,
    FeatureSplit,
    SplitArrays,
    check_split,
    load_split,
    manifest_sha256,
    model_tag,
    open_split,
)

__all__ = [
    "FeatureFormatError",
    "FeatureMeta",
    "FeatureSplit",
    "SplitArrays",
    "check_split",
    "load_split",
    "manifest_sha256",
    "model_tag",
    "open_split",
]
