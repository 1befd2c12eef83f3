"""The first-run experience: the shipped demo encoder (loads through the user's checkpoint
path, has signal, reproduces), run directories that say their kind, a make loop that
re-runs, `make help`, and the examples in `tmass --help`."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tmass.cli import main
from tmass.extract import demo_encoder
from tmass.extract.demo import DemoSpec, demo_clip, render_demo
from tmass.extract.encoder import load_encoder
from tmass.features.format import sha256_file
from tmass.train.runs import latest_run, mark_run, run_kind

REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_weights_are_the_recorded_ones():
    assert demo_encoder.CHECKPOINT.stat().st_size <= 20 * 2**20
    assert sha256_file(demo_encoder.CHECKPOINT) == demo_encoder.CHECKPOINT_SHA256


@pytest.fixture(scope="module")
def encoder():
    """The demo encoder loaded the way a user's checkpoint is: --model NAME --pretrained FILE."""
    return load_encoder(demo_encoder.NAME, str(demo_encoder.CHECKPOINT), device="cpu")


def test_the_demo_encoder_loads_through_the_checkpoint_path_and_says_what_it_is(encoder):
    assert (encoder.name, encoder.random_init, encoder.label) == ("tmass-demo", False, demo_encoder.LABEL)
    assert encoder.checkpoint_sha256 == demo_encoder.CHECKPOINT_SHA256
    # any --model: the checkpoint only fits its own architecture
    assert load_encoder("ViT-B-32", str(demo_encoder.CHECKPOINT), device="cpu").name == "tmass-demo"


def test_demo_encoder_features_match_captions_to_their_own_clips(encoder):
    """On demo test clips (never trained on), a caption is closer to its own clip's mean
    frame than to the other clips', on average and for most captions."""
    import torch
    from PIL import Image

    spec = DemoSpec()
    videos, captions, owner = [], [], []
    for row, index in enumerate(range(spec.n_train, spec.n_train + 12)):
        frames, clip_captions, _ = demo_clip(spec, index)
        pixels = torch.stack([encoder.preprocess(Image.fromarray(f)) for f in frames[::4]])
        videos.append(encoder.encode_images(pixels).mean(0))
        captions += clip_captions
        owner += [row] * len(clip_captions)
    video = np.stack(videos) / np.linalg.norm(videos, axis=1, keepdims=True)  # [n_video, dim]
    text = encoder.encode_texts(captions)
    text /= np.linalg.norm(text, axis=1, keepdims=True)  # [n_text, dim]
    cos = text @ video.T  # [n_text, n_video]
    matching = np.zeros_like(cos, dtype=bool)
    matching[np.arange(len(captions)), owner] = True
    assert cos[matching].mean() > cos[~matching].mean() + 0.1
    assert (cos.argmax(1) == np.asarray(owner)).mean() > 3 / len(videos)  # R@1 well above chance


def test_auto_falls_back_to_the_demo_encoder_offline():
    # tests run with HF_HUB_OFFLINE=1 and no cached OpenAI weights
    encoder = load_encoder("ViT-B-32", "auto", device="cpu")
    assert (encoder.name, encoder.weights, encoder.label) == ("tmass-demo", str(demo_encoder.CHECKPOINT), demo_encoder.LABEL)
    assert not encoder.random_init


def test_a_second_extraction_keeps_the_features_identity(tmp_path):
    """What a second `make demo` relies on: re-running the extraction reuses every shard and
    leaves the manifest (whose SHA-256 training runs record, to resume) unchanged."""
    root = render_demo(tmp_path / "data", DemoSpec(n_train=4, n_test=3, seconds=1.0), progress=False)
    args = ["extract", "--dataset", "demo", "--data-root", str(root), "--out", str(tmp_path / "features"),
            "--model", demo_encoder.NAME, "--pretrained", str(demo_encoder.CHECKPOINT), "--split", "test"]
    manifest = tmp_path / "features" / "demo" / "tmass-demo__tmass-demo" / "test" / "manifest.json"
    digests = []
    for _ in range(2):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        digests.append(sha256_file(manifest))
    assert digests[0] == digests[1]
    meta = json.loads(manifest.read_text())["meta"]
    assert meta["extra"]["encoder_label"] == demo_encoder.LABEL


def test_training_the_demo_encoder_is_deterministic(tmp_path):
    spec = demo_encoder.EncoderTrainSpec(clips=10, held_out=4, steps=2, batch_size=4, warmup=1)
    first = demo_encoder.train_demo_encoder(tmp_path / "a.pt", spec, progress=False)
    second = demo_encoder.train_demo_encoder(tmp_path / "b.pt", spec, progress=False)
    assert first["sha256"] == second["sha256"]
    assert demo_encoder.label_of(tmp_path / "a.pt") == demo_encoder.LABEL


def test_latest_run_is_the_latest_training_run_never_a_report_or_sweep(tmp_path):
    for age, (name, kind) in enumerate((("old", "train"), ("new", "train"), ("compare", "report"), ("ablate", "sweep"))):
        mark_run(tmp_path / name, kind)
        os.utime(tmp_path / name / "run.json", (1e9 + age, 1e9 + age))
    (tmp_path / "old" / "eval.json").write_text("{}")  # evaluating an old run does not make it the latest
    assert latest_run(tmp_path) == tmp_path / "new"
    assert run_kind(tmp_path / "compare") == "report"
    with pytest.raises(ValueError, match="holds a train output"):
        mark_run(tmp_path / "new", "report")


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_make_help_lists_every_target_once():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), flags=re.M))
    result = _make("help")
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert sorted(listed) == sorted(targets)
    assert {"help", "clean", "demo", "train", "eval"} <= targets


@pytest.mark.slow
def test_make_train_twice_then_make_eval_after_a_report(tiny_features, tmp_path):
    """A second make train never stops at the first run's directory; make eval takes the
    latest training run even when a report was written after it."""
    stamp = tmp_path / "installed"
    stamp.touch()  # newer than setup.cfg: make does not reinstall
    common = [f"STAMP={stamp}", f"RUNS={tmp_path}", f"FEATURES_DIR={tiny_features}",
              "TRAIN_ARGS=--epochs 1 --no-progress --no-final-eval", "HEAD=xpool", "DATASET=sim"]
    first = _make("train", *common)
    assert first.returncode == 0, first.stdout + first.stderr
    second = _make("train", *common)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"training into {tmp_path}/sim-xpool-2" in second.stdout
    assert (tmp_path / "sim-xpool-2" / "best.pt").is_file()
    (tmp_path / "sim-xpool" / "eval.json").write_text("{}")  # evaluated later, trained earlier
    mark_run(tmp_path / "compare", "report")  # what `tmass report --out` leaves, newest of all
    result = _make("eval", *common, "TRIALS=0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "sim-xpool-2" / "eval.json").is_file()
    assert (tmp_path / "sim-xpool" / "eval.json").read_text() == "{}"


@pytest.mark.slow
def test_the_examples_in_tmass_help_run_offline(tmp_path, monkeypatch):
    """Each `tmass ...` line of the --help text, verbatim, in a fresh directory that has
    the repository's extract/ (for the shipped weights) and a small rendered demo set."""
    help_text = CliRunner().invoke(main, ["--help"]).output
    examples = [shlex.split(line.strip()) for line in help_text.splitlines() if line.strip().startswith("tmass ")]
    assert len(examples) >= 3
    (tmp_path / "extract").symlink_to(REPO / "extract")
    render_demo(tmp_path / "data" / "demo", DemoSpec(n_train=30, n_test=6, seconds=1.0), progress=False)
    monkeypatch.chdir(tmp_path)
    for argv in examples:
        result = CliRunner().invoke(main, argv[1:])
        assert result.exit_code == 0, f"{shlex.join(argv)}\n{result.output}{result.exception!r}"
