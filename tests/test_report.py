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
from tmass.evaluate.figures import gallery_queries, similarity_figure, sweep_figure
from tmass.sweep import SWEEPS, SweepConfig, Variant, _frames_of, run_sweeps, subsample_frames


def test_trials_sweep_trains_once_and_reuses_runs(tiny_features, tmp_path):
    cfg = SweepConfig(seeds=(0,), epochs=1, lr=1e-3, jobs=2)  # worker processes, as `make ablate` runs them
    rows = run_sweeps(["trials"], tiny_features, tmp_path, cfg)["trials"]
    assert [r["variant"] for r in rows] == ["w/o sampling", "M = 5", "M = 10", "M = 20"]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, "the four trial counts evaluate one trained model"
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
    assert f"chance t2v R@1 = {100 / n_video:.1f} %" in table and "encoder: " in table
    assert table.count("validation: ") == 2, "each row says what its checkpoint was selected on"
    r1 = json.loads((runs[1] / "eval.json").read_text())["t2v"]["R1"]
    assert f"| {r1:.1f} |" in table
    assert all((run / "training-curves.png").exists() for run in runs)


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
