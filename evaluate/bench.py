"""Evaluation benchmark: seconds and peak memory of T-MASS inference at the MSR-VTT 1k-A
and VATEX test scales, fast path beside the naive reference, in one run.

    python -m tmass.evaluate.bench            # both scales
    python -m tmass.evaluate.bench --quick    # MSR-VTT scale only

Each case runs in its own process so that its peak RSS is its own. Features are random
(timing does not depend on values), the head an untrained T-MASS head with the linear
radius, M = 20 trials. The naive path is linear in the number of pairs; it is timed on a
slice of the queries and extrapolated, and the table says so.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time

import click

SCALES = {
    "msrvtt": dict(label="MSR-VTT 1k-A", n_text=1000, n_video=1000),
    "vatex": dict(label="VATEX test", n_text=15000, n_video=1500),
}
NAIVE_TEXTS = {"msrvtt": 25, "vatex": 6}  # queries timed on the naive path, then extrapolated


def _case(scale: str, path: str, noise: str, n_text: int, device: str) -> dict:
    import numpy as np
    import torch

    from tmass.evaluate.scores import EvalConfig, score_matrix
    from tmass.train.heads import Head, HeadConfig

    n_video = SCALES[scale]["n_video"]
    g = torch.Generator().manual_seed(0)
    text = torch.randn(n_text, 512, generator=g)
    frames = torch.randn(n_video, 12, 512, generator=g)
    ids_t, ids_v = [f"t{i}" for i in range(n_text)], [f"v{i}" for i in range(n_video)]
    head = Head(HeadConfig(head="tmass", embed_dim=512, num_frames=12))
    config = EvalConfig(trials=20, path=path, noise=noise, device=device, progress=False)
    score_matrix(head, text[:2], ids_t[:2], frames[:2], None, ids_v[:2], config)  # warm-up (numba cache, threads)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    scores = score_matrix(head, text, ids_t, frames, None, ids_v, config)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    assert np.isfinite(scores).all()
    return {"seconds": seconds, "cpu_seconds": cpu, "pairs": n_text * n_video,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run_case(scale: str, path: str, noise: str, n_text: int, device: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tmass.evaluate.bench", "--case", json.dumps([scale, path, noise, n_text, device])],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--quick", is_flag=True, help="MSR-VTT scale only.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--skip-naive", is_flag=True)
@click.option("--case", hidden=True)
def main(quick: bool, device: str, skip_naive: bool, case: str | None):
    if case:
        click.echo(json.dumps(_case(*json.loads(case))))
        return
    import torch

    click.echo(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
               f"device {device}; T-MASS linear radius, M = 20, 12 frames, dim 512")
    click.echo("seconds: wall clock; CPU: all threads' CPU time (less sensitive to other load on the machine)")
    click.echo(f"{'case':28}{'path':7}{'noise':8}{'seconds':>10}{'CPU s':>9}{'peak RSS':>12}  note")
    for scale in (["msrvtt"] if quick else ["msrvtt", "vatex"]):
        spec = SCALES[scale]
        name = f"{spec['label']} {spec['n_text']}x{spec['n_video']}"
        runs = [("fast", "fresh", spec["n_text"]), ("fast", "shared", spec["n_text"])]
        if not skip_naive:
            runs.append(("naive", "fresh", NAIVE_TEXTS[scale]))
        for path, noise, n_text in runs:
            result = _run_case(scale, path, noise, n_text, device)
            scale_up = spec["n_text"] / n_text
            note = "" if n_text == spec["n_text"] else f"extrapolated from {n_text}x{spec['n_video']} pairs"
            click.echo(f"{name:28}{path:7}{noise:8}{result['seconds'] * scale_up:10.1f}{result['cpu_seconds'] * scale_up:9.1f}"
                       f"{result['peak_rss_mib']:9.0f} MiB  {note}")


if __name__ == "__main__":
    main()
