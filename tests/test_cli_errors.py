"""Every user mistake ends in one line naming the culprit, never a traceback.

Each case runs a real ``tmass`` command through click's CliRunner on real (simulated)
features and a real checkpoint, and asserts: a non-zero exit, no traceback, no exception
escaping click, and the option or file at fault named in the message (with the fix
where one is known). The cases are the ordinary mistakes of a new user."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

from tmass.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny simulated features, an untrained X-Pool checkpoint, and broken variants."""
    from tmass.features.simulate import simulate

    root = tmp_path_factory.mktemp("cli-errors")
    features = root / "features" / "sim-tiny"
    simulate("tiny", features, seed=0, progress=False)
    run = root / "run"
    result = CliRunner().invoke(main, ["train", "--features", str(features), "--head", "xpool", "--epochs", "0",
                                       "--no-final-eval", "--no-progress", "--device", "cpu", "--out", str(run)])
    assert result.exit_code == 0, result.output
    (root / "empty.pt").write_bytes(b"")
    (root / "truncated.pt").write_bytes((run / "best.pt").read_bytes()[:2000])
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pt")
    (root / "text.pt").write_text("not a checkpoint\n")
    broken = root / "broken"
    shutil.copytree(features, broken)
    (broken / "test" / "manifest.json").write_text("{")
    notfeatures = root / "notfeatures"
    (notfeatures / "test").mkdir(parents=True)
    (notfeatures / "test" / "notes.txt").write_text("hello")
    return {"root": root, "features": features, "run": run, "ckpt": run / "best.pt", "broken": broken,
            "notfeatures": notfeatures}


def _eval(s, *extra, features=None, checkpoint=None):
    return ["eval", "--features", str(features or s["features"]), "--checkpoint", str(checkpoint or s["ckpt"]),
            "--device", "cpu", *extra]


def _train(s, *extra, features=None):
    return ["train", "--features", str(features or s["features"]), "--out", str(s["root"] / "new-run"),
            "--no-progress", "--device", "cpu", *extra]


def _config(s, name, body):
    path = s["root"] / name
    path.write_text(body)
    return str(path)


def _ablate(s, *extra):
    return ["ablate", "--features", str(s["features"]), "--out", str(s["root"] / "sweep"), *extra]


# (case id, argv builder, what the message must name)
CASES = [
    # a folder one level off, or a file where a folder is expected
    ("eval-features-is-a-file", lambda s: _eval(s, features=s["features"] / "test" / "manifest.json"), "--features"),
    ("eval-features-one-level-up", lambda s: _eval(s, features=s["features"].parent), "did you mean"),
    ("train-features-is-a-split", lambda s: _train(s, features=s["features"] / "train"), "did you mean"),
    ("train-features-one-level-up", lambda s: _train(s, features=s["features"].parent), "did you mean"),
    ("eval-unknown-split", lambda s: _eval(s, "--split", "tset"), "tset"),
    ("info-on-a-shard-file", lambda s: ["features", "info", str(s["features"] / "test" / "texts-00000.h5")], "texts-00000.h5"),
    # features that are not features, a malformed manifest
    ("eval-features-is-a-run", lambda s: _eval(s, features=s["run"]), "run"),
    ("eval-not-features", lambda s: _eval(s, features=s["notfeatures"]), "notfeatures"),
    ("eval-malformed-manifest", lambda s: _eval(s, features=s["broken"]), "manifest.json"),
    ("train-malformed-manifest", lambda s: _train(s, features=s["broken"]), "manifest.json"),
    # checkpoints that are not checkpoints
    ("eval-empty-checkpoint", lambda s: _eval(s, checkpoint=s["root"] / "empty.pt"), "empty.pt"),
    ("eval-truncated-checkpoint", lambda s: _eval(s, checkpoint=s["root"] / "truncated.pt"), "truncated.pt"),
    ("eval-foreign-checkpoint", lambda s: _eval(s, checkpoint=s["root"] / "foreign.pt"), "foreign.pt"),
    ("eval-text-checkpoint", lambda s: _eval(s, checkpoint=s["root"] / "text.pt"), "text.pt"),
    ("eval-checkpoint-is-a-run", lambda s: _eval(s, checkpoint=s["run"]), "--checkpoint"),
    # values out of range
    ("eval-trials-negative", lambda s: _eval(s, "--trials", "-1"), "--trials"),
    ("eval-chunk-pairs-zero", lambda s: _eval(s, "--chunk-pairs", "0"), "--chunk-pairs"),
    ("eval-seed-not-a-number", lambda s: _eval(s, "--seed", "x"), "--seed"),
    ("train-epochs-negative", lambda s: _train(s, "--epochs", "-2"), "--epochs"),
    ("train-lr-zero", lambda s: _train(s, "--lr", "0"), "--lr"),
    ("train-batch-size-one", lambda s: _train(s, "--batch-size", "1"), "--batch-size"),
    ("train-val-fraction-one", lambda s: _train(s, "--val-fraction", "1"), "--val-fraction"),
    ("train-dropout-above-one", lambda s: _train(s, "--dropout", "1.5"), "--dropout"),
    ("train-max-steps-beyond-epochs", lambda s: _train(s, "--epochs", "1", "--max-steps", "1000"), "raise --epochs"),
    # a loss's or a head's setting: click's message from the field's bounds, or the check beyond them
    ("train-loss-margin-negative", lambda s: _train(s, "--loss", "triplet-hn", "--margin", "-1"),
     "Invalid value for '--margin': -1.0 is not in the range x>=0."),
    ("train-ea-reduction-zero", lambda s: _train(s, "--head", "ea", "--reduction", "0"),
     "Invalid value for '--reduction': 0 is not in the range x>=1."),
    ("train-ea-reduction-not-dividing", lambda s: _train(s, "--head", "ea", "--reduction", "3"), "--reduction"),
    ("train-config-loss-margin-negative",
     lambda s: _train(s, "--config", _config(s, "margin.toml", "[train]\nloss = 'kendall'\n"
                                                               "[train.loss_options]\nmargin = -1.0\n")),
     "margin.toml: train.loss_options.margin: -1.0 is not in [0, inf)"),
    ("ablate-max-steps-negative", lambda s: _ablate(s, "--max-steps", "-1"), "--max-steps"),
    ("ablate-jobs-zero", lambda s: _ablate(s, "--jobs", "0"), "--jobs"),
    ("ablate-seeds-not-numbers", lambda s: _ablate(s, "--seeds", "x"), "--seeds"),
    ("ablate-unknown-sweep", lambda s: _ablate(s, "--sweeps", "radus"), "--sweeps"),
    # options that need what is not there, or cannot go together
    ("train-num-heads-vs-features-dim", lambda s: _train(s, "--head", "xpool", "--num-heads", "7"), "--num-heads"),
    ("extract-workers-with-scheduler",
     lambda s: ["extract", "--dataset", "demo", "--data-root", str(s["root"] / "demo"), "--out", str(s["root"] / "x"),
                "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "--scheduler"),
    ("train-config-missing", lambda s: _train(s, "--config", str(s["root"] / "nope.toml")), "nope.toml"),
    ("train-resume-without-run", lambda s: ["train", "--out", str(s["root"] / "no-such-run"), "--resume"], "no-such-run"),
]
if not torch.cuda.is_available():
    CASES += [
        ("eval-device-cuda-without-gpu", lambda s: [*_eval(s)[:-2], "--device", "cuda"], "--device"),
        ("train-device-cuda-without-gpu", lambda s: [*_train(s)[:-2], "--device", "cuda"], "--device"),
        ("extract-device-cuda-without-gpu",
         lambda s: ["extract", "--dataset", "demo", "--data-root", str(s["root"] / "demo"), "--out", str(s["root"] / "x"),
                    "--pretrained", "none", "--device", "cuda"], "--device"),
    ]


@pytest.mark.parametrize("build, culprit", [pytest.param(b, c, id=i) for i, b, c in CASES])
def test_a_user_mistake_is_one_line_naming_the_culprit(setup, build, culprit, one_torch_thread):
    result = CliRunner().invoke(main, build(setup))
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"escaped click: {result.exception!r}\n{result.output}"
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert culprit.lower() in errors[0].lower(), result.output
    if culprit.startswith("Invalid value for"):  # click's own check of the option: a usage error
        assert result.exit_code == 2, result.output
