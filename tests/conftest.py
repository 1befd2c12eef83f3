"""Shared fixtures. Tests never touch the network: features are simulated, CLIP models are
random-initialised, videos are rendered by the project itself."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing may reach a hub
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory) -> Path:
    """A simulated `tiny` features directory (train/ and test/), written once per session.
    Tests that modify features must copy it first (see `tiny_copy`)."""
    from tmass.features.simulate import simulate

    out = tmp_path_factory.mktemp("features") / "sim-tiny"
    simulate("tiny", out, seed=0, progress=False)
    return out


@pytest.fixture
def tiny_copy(tiny_features, tmp_path) -> Path:
    """A private, modifiable copy of the tiny features."""
    dst = tmp_path / "sim-tiny"
    shutil.copytree(tiny_features, dst)
    return dst
