"""`python -m tmass.train.bench --head`: which heads it times (one, a comma list, all
registered heads, plugins included) and how a head whose token features are missing is
skipped, on the tiny simulated features with one or two timed steps; the speed itself is
the benchmark's business (`make bench-train`), not a test's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tmass.train import registry
from tmass.train.bench import EPOCH_TARGET_S, main
from tmass.train.registry import head_names, head_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tmass-example-head"  # a plugin head: best-frame
TOKEN_HEADS = {"tc-mgc": "word tokens: extract with --text-tokens", "prota": "word tokens: extract with --text-tokens",
               "visern": "patch tokens: extract with --patch-grid G"}


def run(features, *args):
    return CliRunner().invoke(main, ["--features", str(features), *args])


def test_all_times_every_registered_head_and_skips_those_lacking_tokens_in_one_line(tiny_features, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))  # as if installed: its entry point, importable
    monkeypatch.setattr(registry, "_plugins", lambda: {"best-frame": "tmass_example_head:SPEC"})
    assert set(TOKEN_HEADS) < set(head_names())  # the built-in token heads this test expects skipped
    out = tmp_path / "train.json"
    result = run(tiny_features, "--head", "all", "--steps", "1", "--json", str(out))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    figures = json.loads(out.read_text())["heads"]
    assert [r["head"] for r in figures] == list(head_names()) and "best-frame" in head_names()
    assert len(lines) == len(figures)  # one line per head, in registry order
    for line, r in zip(lines, figures):
        if r["head"] in TOKEN_HEADS:
            assert r == {"head": r["head"], "skipped": f"head {r['head']} needs {TOKEN_HEADS[r['head']]} "
                                                        f"({tiny_features / 'train'} has none)"}
            assert line == f"skipped: {r['skipped']}"
            continue
        assert r["timed_steps"] == 1 and r["steps_per_epoch"] == 1024 // 32 and r["pairs"] == 1024
        assert r["seconds_per_epoch"] == pytest.approx(r["seconds_per_step"] * 32)
        assert r["target_seconds_per_epoch"] == EPOCH_TARGET_S
        assert r["meets_target"] == (r["seconds_per_epoch"] <= EPOCH_TARGET_S)
        assert line.startswith(f"{r['head']} ") and line.endswith(
            f"target {EPOCH_TARGET_S} s/epoch: {'PASS' if r['meets_target'] else 'MISS'}")
        # X-Pool's pooling path is named only for the heads that pool as X-Pool does
        assert r["pooling_path"] == ("folded" if "folded-xpool" in head_spec(r["head"]).fast_paths else None)


def test_a_comma_list_times_those_heads_in_its_order_on_token_features(tiny_token_features, tmp_path):
    out = tmp_path / "train.json"
    result = run(tiny_token_features, "--head", "visern,meanp,tc-mgc", "--steps", "2", "--json", str(out))
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())["heads"]
    assert [r["head"] for r in figures] == ["visern", "meanp", "tc-mgc"]
    assert all(r["timed_steps"] == 2 and "skipped" not in r for r in figures)
    assert [line.split(" ")[0] for line in result.output.splitlines()] == ["visern", "meanp", "tc-mgc"]


def test_one_head_keeps_its_flat_figures_and_nothing_to_time_is_one_error_line(tiny_features, tmp_path):
    out = tmp_path / "meanp.json"
    result = run(tiny_features, "--head", "meanp", "--steps", "1", "--json", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["head"] == "meanp" and len(result.output.splitlines()) == 1

    result = run(tiny_features, "--head", "visern,prota")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output == (f"Error: head visern needs {TOKEN_HEADS['visern']} ({tiny_features / 'train'} has none); "
                             f"head prota needs {TOKEN_HEADS['prota']} ({tiny_features / 'train'} has none)\n")

    result = run(tiny_features, "--head", "meanp,nope")
    assert result.exit_code == 2 and "unknown head 'nope'; choose from meanp, xpool" in result.output
