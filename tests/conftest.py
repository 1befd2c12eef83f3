"""Shared fixtures. Tests never touch the network: features are simulated, CLIP models are
random-initialised, videos are rendered by the project itself."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing may reach a hub
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (e.g. a device parametrisation) run where a GPU is visible;
    elsewhere they are skipped, and ``-ra`` prints why in the summary."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="cuda: no CUDA GPU visible (run on a GPU machine: pytest -m cuda)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    """A test taking ``device`` runs on the CPU everywhere and on CUDA where there is one."""
    return request.param


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory) -> Path:
    """A simulated `tiny` features directory (train/ and test/), written once per session.
    Tests that modify features must copy it first (see `tiny_copy`)."""
    from tmass.features.simulate import simulate

    out = tmp_path_factory.mktemp("features") / "sim-tiny"
    simulate("tiny", out, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_token_features(tmp_path_factory) -> Path:
    """The simulated `tiny` features with word tokens and 2 x 2 patch tokens (the frames
    and captions are those of `tiny_features`: tokens come from their own random stream)."""
    from tmass.features.simulate import simulate

    out = tmp_path_factory.mktemp("features") / "sim-tiny-tokens"
    simulate("tiny", out, seed=0, progress=False, text_tokens=True, patch_grid=2)
    return out


@pytest.fixture
def tiny_copy(tiny_features, tmp_path) -> Path:
    """A private, modifiable copy of the tiny features."""
    dst = tmp_path / "sim-tiny"
    shutil.copytree(tiny_features, dst)
    return dst


@pytest.fixture(scope="module")
def one_torch_thread():
    """For a test module of tiny training runs: they gain nothing from a second thread,
    and two spinning threads on a shared 2-core machine can make a step ten times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
