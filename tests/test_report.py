"""Sweeps, comparison report and figures on the tiny simulated features."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from tmass.cli import main
from tmass.evaluate.figures import (CORRECT_COLOUR, gallery_figure, gallery_queries, similarity_figure, sweep_figure,
                                    training_curves_figure)
from tmass.sweep import SWEEPS, SweepConfig, Variant, _frames_of, _train_one, run_sweeps, subsample_frames


def test_trials_sweep_trains_once_and_reuses_runs(tiny_features, tmp_path):
    cfg = SweepConfig(seeds=(0,), epochs=1, lr=1e-3, jobs=2)  # worker processes, as `make ablate` runs them
    rows = run_sweeps(["trials"], tiny_features, tmp_path, cfg)["trials"]
    assert [r["variant"] for r in rows] == ["w/o sampling", "M = 5", "M = 10", "M = 20"]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, "the four trial counts evaluate one trained model"
    assert sorted(p.name for p in (runs[0] / "seed0").glob("eval-*.json")) == [
        f"eval-leak-free-m{m}.json" for m in (0, 10, 20, 5)]
    stamp = (runs[0] / "seed0" / "metrics.json").stat().st_mtime_ns
    again = run_sweeps(["trials"], tiny_features, tmp_path, cfg)["trials"]
    assert (runs[0] / "seed0" / "metrics.json").stat().st_mtime_ns == stamp, "finished runs are reused"
    assert again == rows
    table = (tmp_path / "trials.md").read_text()
    assert "leak-free" in table and "| M = 20 |" in table
    with open(tmp_path / "trials.csv") as fh:
        assert [r["variant"] for r in csv.DictReader(fh)] == [r["variant"] for r in rows]
    assert (tmp_path / "trials.png").exists()
    figure = sweep_figure(SWEEPS["trials"], rows)  # the plotted data: one point per variant, in order
    for ax, metric in zip(figure.axes, ("R1", "MnR")):
        (bars,) = ax.containers
        line = bars.lines[0]  # the data line of the errorbar (the rest are caps and bars)
        assert list(line.get_xdata()) == [r["x"] for r in rows] and list(line.get_ydata()) == [r[metric] for r in rows]
    assert "trials M" == figure.axes[0].get_xlabel() and "leak-free" in figure._suptitle.get_text()


@pytest.mark.parametrize("head", ["xpool", "ea"])
def test_a_sweep_worker_trains_its_run_then_makes_its_evaluations(tiny_features, tmp_path, head):
    """Each run's evaluations are made where it was trained (in parallel with the other
    runs), as the sweep would make them; the audit is skipped for a head without it."""
    from tmass.evaluate.scores import EvalConfig, evaluate_head
    from tmass.features.format import load_split
    from tmass.train.trainer import load_checkpoint

    run = tmp_path / head
    train = {"epochs": 1, "max_steps": 2, "lr": 1e-3, "batch_size": 16, "seed": 0, "final_eval": False, "device": "cpu"}
    assert _train_one((str(tiny_features), str(run), {"head": head}, train, ((5, "leak-free"), (5, "reference")), 1)) == str(run)
    assert (run / "metrics.json").exists()
    expected = evaluate_head(load_checkpoint(run / "best.pt")[0], load_split(tiny_features / "test"),
                             EvalConfig(trials=5, progress=False))
    assert json.loads((run / "eval-leak-free-m5.json").read_text()) == json.loads(json.dumps(expected))
    assert (run / "eval-reference-m5.json").exists() == (head == "xpool")


def _chance_lines(ax) -> list:
    return [line for line in ax.get_lines() if line.get_label().startswith("chance")]


def test_sweep_outputs_say_what_made_them(tiny_features, tmp_path):
    """Tables and plot carry the encoder, the test features and their manifest hash, the
    split's size, the protocol and the selection; the R@1 axis draws the chance level."""
    from tmass.features.format import load_split, manifest_sha256

    cfg = SweepConfig(seeds=(0,), epochs=1, lr=1e-3, with_reference=True)
    rows = run_sweeps(["trials"], tiny_features, tmp_path, cfg)["trials"]
    test = load_split(tiny_features / "test")
    n_text, n_video = len(test.text_ids), len(test.video_ids)
    selection = json.loads(next((tmp_path / "runs").glob("*/seed0/metrics.json")).read_text())["selection"]
    table = (tmp_path / "trials.md").read_text()
    for fact in (test.meta.encoder_label(), str(tiny_features / "test"), manifest_sha256(tiny_features / "test")[:12],
                 f"{n_text} captions x {n_video} videos", f"chance t2v R@1 = {100 / n_video:.3g} %",
                 "protocol: leak-free", selection, "(AUDIT, leaks)"):
        assert fact in table, fact
    with open(tmp_path / "trials.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert {r["encoder"] for r in csv_rows} == {test.meta.encoder_label()} and {r["protocol"] for r in csv_rows} == {"leak-free"}
    assert {(r["n_text"], r["n_video"], r["selection"]) for r in csv_rows} == {(str(n_text), str(n_video), selection)}
    assert "R1_reference_AUDIT_leaks" in csv_rows[0]
    figure = sweep_figure(SWEEPS["trials"], rows, n_video, "encoder: demo")
    (chance,) = _chance_lines(figure.axes[0])
    assert list(chance.get_ydata()) == [100 / n_video] * 2 and not _chance_lines(figure.axes[1])
    assert "encoder: demo" in figure._suptitle.get_text()


def test_a_sweep_trains_on_a_dask_cluster_and_resumes_there(tiny_features, tmp_path):
    """--scheduler: the runs go to the cluster's workers, one per GPU-declaring worker at
    a time (here every worker declares one), and a rerun reuses the finished runs."""
    from distributed import LocalCluster

    cfg = SweepConfig(seeds=(0, 1), epochs=1, lr=1e-3, device="cpu")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as cluster:
        cfg = dataclasses.replace(cfg, scheduler=cluster.scheduler_address)
        rows = run_sweeps(["trials"], tiny_features, tmp_path, cfg)["trials"]
        finished = sorted((tmp_path / "runs").glob("*/seed*/metrics.json"))
        assert len(finished) == 2, "one model per seed, trained on the cluster"
        stamps = [path.stat().st_mtime_ns for path in finished]
        assert run_sweeps(["trials"], tiny_features, tmp_path, cfg)["trials"] == rows
        assert [path.stat().st_mtime_ns for path in finished] == stamps, "finished runs are reused"
    result = CliRunner().invoke(main, ["ablate", "--features", str(tiny_features), "--out", str(tmp_path / "x"),
                                       "--scheduler", "tcp://127.0.0.1:1", "--jobs", "2"])
    assert result.exit_code == 2 and "--scheduler" in result.output and "Traceback" not in result.output


def test_ablate_passes_max_steps_to_every_run(tiny_features, tmp_path):
    result = CliRunner().invoke(main, ["ablate", "--features", str(tiny_features), "--out", str(tmp_path), "--sweeps",
                                       "trials", "--seeds", "0,1", "--epochs", "1", "--max-steps", "5", "--lr", "1e-3",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    runs = sorted((tmp_path / "runs").glob("*/seed*"))
    assert len(runs) == 2
    for run in runs:
        assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 5
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["steps"] == 5 and metrics["trained"].startswith("trained 5 steps (0.")
    assert "; 5 steps, lr 0.001, batch 32." in (tmp_path / "trials.md").read_text()
    # the same --out with another length: refused in one line before anything is trained
    # or rewritten (runs are keyed by variant and seed; reusing them would mislabel them)
    stamps = [path.stat().st_mtime_ns for path in sorted(tmp_path.rglob("*")) if path.is_file()]
    again = CliRunner().invoke(main, ["ablate", "--features", str(tiny_features), "--out", str(tmp_path), "--sweeps",
                                      "trials", "--seeds", "0,1", "--epochs", "1", "--max-steps", "6", "--lr", "1e-3",
                                      "--device", "cpu"])
    assert again.exit_code == 1 and "Traceback" not in again.output
    lines = [line for line in again.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert "max_steps 5 (asked: 6)" in lines[0] and "(and 1 more runs)" in lines[0] and "another --out" in lines[0]
    assert [path.stat().st_mtime_ns for path in sorted(tmp_path.rglob("*")) if path.is_file()] == stamps


def test_shared_configurations_share_runs():
    keys = {v.name: v.run_key() for s in ("radius", "loss", "trials", "support") for v in SWEEPS[s].variants}
    final = keys["R = W S + b (linear)"]
    assert keys["t_s, L_s + a L_sup"] == keys["M = 20"] == keys["alpha = 0.8"] == final
    assert keys["w/o R (X-Pool)"] == keys["t, L_ce (X-Pool)"] != final
    assert Variant("x", frames=4).run_key() != Variant("x").run_key()


def test_all_cached_frames_is_the_plain_run(tmp_path):
    twelve, four = (next(v for v in SWEEPS["frames"].variants if v.frames == n) for n in (12, 4))
    final = next(v for v in SWEEPS["radius"].variants if v.name == "R = W S + b (linear)")
    assert _frames_of(twelve, 12, tmp_path).run_key() == final.run_key()
    assert _frames_of(four, 12, tmp_path).run_key() == four.run_key() != twelve.run_key()
    with pytest.raises(ValueError, match="caches only 8 frames"):
        _frames_of(twelve, 8, tmp_path)


def test_frame_subsampling_keeps_uniformly_spaced_frames(tiny_features, tmp_path):
    from tmass.features.format import check_split, load_split

    out = subsample_frames(tiny_features, tmp_path / "f4", 4)
    full, sub = load_split(tiny_features / "test"), load_split(out / "test")
    assert sub.frames.shape[1] == 4 and sub.meta.num_frames == 4
    assert np.array_equal(sub.frames, full.frames[:, [0, 4, 7, 11]])
    assert np.array_equal(sub.text_embeddings, full.text_embeddings) and check_split(out / "train") == []


def test_report_compares_evaluated_runs(tiny_features, tmp_path):
    runner = CliRunner()
    runs = []
    for head, epochs in (("meanp", "0"), ("tmass", "1")):
        run = tmp_path / head
        assert runner.invoke(main, ["train", "--features", str(tiny_features), "--head", head, "--epochs", epochs,
                                    "--lr", "1e-3", "--no-final-eval", "--no-progress", "--out", str(run)]).exit_code == 0
        result = runner.invoke(main, ["eval", "--features", str(tiny_features), "--checkpoint", str(run / "best.pt"),
                                      "--trials", "3", "--json", str(run / "eval.json"), "--figures", str(run / "fig")])
        assert result.exit_code == 0, result.output
        runs.append(run)
    assert (runs[1] / "fig" / "similarity-analysis.png").exists()
    assert not (runs[0] / "fig").exists(), "meanP has no text mass to analyse"
    result = runner.invoke(main, ["report", *map(str, runs), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "report" / "comparison.md").read_text()
    assert "leak-free" in table and len([line for line in table.splitlines() if line.startswith(f"| {tmp_path}")]) == 2
    n_video = json.loads((runs[1] / "eval.json").read_text())["n_video"]
    assert f"chance t2v R@1 = {100 / n_video:.3g} %" in table and "encoder: " in table
    assert table.count("validation: ") == 2, "each row says what its checkpoint was selected on"
    per_epoch = json.loads((runs[1] / "config.json").read_text())["pairs"]["train"] // 32  # each row says how long it trained
    assert "trained 0 steps (0 epochs); best.pt" in table and f"trained {per_epoch} steps (1 epoch); best.pt" in table
    r1 = json.loads((runs[1] / "eval.json").read_text())["t2v"]["R1"]
    assert f"| {r1:.1f} |" in table
    assert all((run / "training-curves.png").exists() for run in runs)
    assert table.count("## Table") == 1, "runs on the same features share one table"

    val = [json.loads(line) for line in (runs[1] / "log.jsonl").read_text().splitlines() if '"val"' in line][-1]
    curves = training_curves_figure(runs[1])
    (chance,) = _chance_lines(curves.axes[1])
    assert list(chance.get_ydata()) == [100 / val["videos"]] * 2, "chance of the validation split, not the test split"
    assert not _chance_lines(training_curves_figure(runs[0]).axes[1]), "a run that never validated has no R@1 curve"


def test_report_puts_runs_on_other_features_in_their_own_table(tiny_features, tmp_path):
    """Two test splits (same dataset and encoder, other features): two tables, each
    with its own header, and the CSV names each row's table, dataset, encoder and split."""
    from tmass.features.simulate import simulate

    other = tmp_path / "other"
    simulate("tiny", other, seed=1, progress=False)
    runner = CliRunner()
    runs = []
    for name, features in (("a", tiny_features), ("b", other), ("c", tiny_features)):
        runs.append(tmp_path / name)
        result = runner.invoke(main, ["train", "--features", str(features), "--head", "meanp", "--epochs", "0",
                                      "--no-final-eval", "--no-progress", "--out", str(runs[-1])])
        assert result.exit_code == 0 and "encoder: " in result.output, result.output
        result = runner.invoke(main, ["eval", "--features", str(features), "--checkpoint", str(runs[-1] / "best.pt"),
                                      "--json", str(runs[-1] / "eval.json")])
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["report", *map(str, runs), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "2 tables" in result.output
    tables = (tmp_path / "report" / "comparison.md").read_text().split("## Table ")[1:]
    assert len(tables) == 2
    assert str(tiny_features / "test") in tables[0].splitlines()[0] and str(other / "test") in tables[1].splitlines()[0]
    assert [line.split(" | ")[0] for line in tables[0].splitlines() if line.startswith(f"| {tmp_path}")] == \
        [f"| {runs[0]}", f"| {runs[2]}"], "runs on the same features together, in the order given"
    with open(tmp_path / "report" / "comparison.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [(r["run"], r["table"]) for r in csv_rows] == [(str(runs[0]), "1"), (str(runs[2]), "1"), (str(runs[1]), "2")]
    assert all(r["encoder"] and r["dataset"] for r in csv_rows)


def test_similarity_analysis_reads_the_margins():
    """Each panel holds two histograms (t, then t_s) of one value per query: the highest
    irrelevant score, the relevant score and their difference; audit NaNs are left out."""
    rng = np.random.default_rng(0)
    point = rng.normal(0.2, 0.05, (40, 30)).astype(np.float32)
    mass = point + 0.05
    mass[0, 5] = np.nan  # an undefined audit score (caption 0 does not describe video 5)
    targets = np.arange(40) % 30
    rows = np.arange(40)
    irrelevant = [np.where(np.arange(30) == targets[:, None], -np.inf, np.nan_to_num(s, nan=-np.inf)).max(1)
                  for s in (point, mass)]
    relevant = [point[rows, targets], mass[rows, targets]]
    expected = (irrelevant, relevant, [r - i for r, i in zip(relevant, irrelevant)])
    figure = similarity_figure(point, mass, targets)
    for ax, (with_t, with_ts) in zip(figure.axes, expected):
        bars = ax.patches
        counts_t, counts_ts = np.array([b.get_height() for b in bars[:49]]), np.array([b.get_height() for b in bars[49:]])
        edges = [b.get_x() for b in bars[:49]] + [bars[48].get_x() + bars[48].get_width()]
        assert np.array_equal(counts_t, np.histogram(with_t, edges)[0]) and counts_t.sum() == 40
        assert np.array_equal(counts_ts, np.histogram(with_ts, edges)[0]) and counts_ts.sum() == 40
    assert figure.axes[1].get_legend().get_texts()[1].get_text() == f"selected t_s (mean {relevant[1].mean():.3f})"


def test_gallery_shows_one_caption_per_video():
    text_to_video = np.repeat(np.arange(12), 4)  # [n_text]: four captions per video, grouped
    chosen = gallery_queries(text_to_video, 5)
    assert len(set(text_to_video[chosen])) == 5 and text_to_video[chosen][[0, -1]].tolist() == [0, 11]
    assert len(gallery_queries(text_to_video[:8], 5)) == 2, "never more rows than videos"


def test_gallery_marks_the_captioned_video():
    """Exactly the strips of each query's own video are framed in the hit colour and
    ticked; a query whose video is not in its top 5 has no mark."""
    from matplotlib.colors import to_rgba

    text_to_video = np.arange(6)  # [n_text]: one caption per video
    scores = np.zeros((6, 6), dtype=np.float32)  # [n_text, n_video]
    scores[np.arange(6), (np.arange(6) + 1) % 6] = 3.0  # every query's top video is the next one
    scores[np.arange(6), np.arange(6)] = 2.0  # its own video second ...
    scores[5, 5] = -1.0  # ... except query 5's, ranked last (6th), off the top 5
    figure = gallery_figure(scores, [f"caption {i}" for i in range(6)], text_to_video,
                            lambda v, n: np.zeros((n, 4, 4, 3), dtype=np.uint8), queries=6, top=5)
    rows = gallery_queries(text_to_video, 6)
    axes = np.array(figure.axes).reshape(len(rows), 5)
    marked = {(row, k) for row in range(len(rows)) for k in range(5)
              if axes[row, k].spines["top"].get_edgecolor() == to_rgba(CORRECT_COLOUR)}
    ticked = {(row, k) for row in range(len(rows)) for k in range(5) if axes[row, k].get_title().endswith("✓")}
    expected = {(row, 1) for row, q in enumerate(rows) if q != 5}
    assert marked == ticked == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_sweep_workers_die_with_the_sweep(tmp_path):
    """A sweep killed outright must not leave workers training into its run directories."""
    script = (
        "import os, time\n"
        "from tmass.sweep import worker_pool\n"
        "pool = worker_pool(1)\n"
        "print(pool.submit(os.getpid).result(), flush=True)\n"
        "pool.submit(time.sleep, 120)\n"
        "time.sleep(120)\n"
    )
    log = tmp_path / "sweep.err"  # the killed parent's resource tracker complains there
    with open(log, "w") as err:
        parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=err, text=True)
    line = parent.stdout.readline()
    assert line.strip().isdigit(), log.read_text()
    worker = int(line)
    os.kill(worker, 0)  # alive while the sweep is
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:  # gone, or a zombie waiting for init to reap it
            if open(f"/proc/{worker}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    pytest.fail(f"worker {worker} outlived its sweep")
