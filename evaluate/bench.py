"""Evaluation benchmark: seconds and peak memory of T-MASS inference at the MSR-VTT 1k-A
and VATEX test scales, fast path beside the naive reference, in one run.

    python -m tmass.evaluate.bench            # both scales, then every registered head
    python -m tmass.evaluate.bench --quick    # MSR-VTT scale only
    python -m tmass.evaluate.bench --no-heads # the T-MASS cases only

On CUDA (``--device cuda``) ``fast`` is the torch scorer, and each case also reports its
peak GPU memory; the header names the device, and ``--json`` writes every figure.

Each case runs in its own process so that its peak RSS is its own. Features are random
(timing does not depend on values), the head an untrained T-MASS head with the linear
radius, M = 20 trials. The naive path is linear in the number of pairs; it is timed on a
slice of the queries and extrapolated, and the table says so.

The heads table scores every registered head at the MSR-VTT 1k-A scale on random
features of the kinds it declares (word tokens: HEAD_TOKENS per caption; patch tokens:
a 2 x 2 grid), untrained, through the evaluator's default path (``fast``: a head's fast
path where it offers one, its own ``score`` otherwise), M = 20 for stochastic heads, and
gives each CPU time as a multiple of X-Pool's.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import click

SCALES = {
    "msrvtt": dict(label="MSR-VTT 1k-A", n_text=1000, n_video=1000),
    "vatex": dict(label="VATEX test", n_text=15000, n_video=1500),
}
NAIVE_TEXTS = {"msrvtt": 25, "vatex": 6}  # queries timed on the naive path, then extrapolated
HEAD_TOKENS, HEAD_PATCHES = 24, 4  # MSR-VTT captions: about 9 words (+ SOT, EOT), padded; 2 x 2 grid


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
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}


def _head_case(name: str, device: str) -> dict:
    """Every pair of MSR-VTT 1k-A scored by the untrained head ``name``."""
    import numpy as np
    import torch

    from tmass.evaluate.scores import EvalConfig, score_features
    from tmass.train.heads import TextFeatures, VideoFeatures
    from tmass.train.registry import head_spec

    spec = head_spec(name)
    n_text, n_video = SCALES["msrvtt"]["n_text"], SCALES["msrvtt"]["n_video"]
    g = torch.Generator().manual_seed(0)
    text = TextFeatures(torch.randn(n_text, 512, generator=g))
    if "word_tokens" in spec.features:
        text.tokens = torch.randn(n_text, HEAD_TOKENS, 512, generator=g)
        text.token_mask = torch.arange(HEAD_TOKENS)[None, :] < torch.randint(6, HEAD_TOKENS + 1, (n_text, 1), generator=g)
    video = VideoFeatures(torch.randn(n_video, 12, 512, generator=g))
    if "patch_tokens" in spec.features:
        video.patches = torch.randn(n_video, 12, HEAD_PATCHES, 512, generator=g)
    torch.manual_seed(0)
    head = spec.build(spec.make_config(embed_dim=512, num_frames=12))
    config = EvalConfig(trials=20 if head.stochastic else 0, path="fast", device=device, progress=False)
    ids_t, ids_v = [f"t{i}" for i in range(n_text)], [f"v{i}" for i in range(n_video)]
    score_features(head, text[:2], ids_t[:2], video[:2], ids_v[:2], config)  # warm-up
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    scores = score_features(head, text, ids_t, video, ids_v, config)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    assert np.isfinite(scores).all()
    return {"seconds": seconds, "cpu_seconds": cpu, "trials": config.trials,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run_case(*case) -> dict:
    """A case (T-MASS: scale, path, noise, n_text, device; a head: name, device) in its own process."""
    out = subprocess.run([sys.executable, "-m", "tmass.evaluate.bench", "--case", json.dumps(case)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--quick", is_flag=True, help="MSR-VTT scale only.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--skip-naive", is_flag=True)
@click.option("--heads/--no-heads", default=True, show_default=True,
              help="Also time every registered head at the MSR-VTT 1k-A scale.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write every figure as JSON.")
@click.option("--case", hidden=True)
def main(quick: bool, device: str, skip_naive: bool, heads: bool, json_path: Path | None, case: str | None):
    if case:
        args = json.loads(case)
        click.echo(json.dumps(_case(*args) if len(args) == 5 else _head_case(*args)))
        return
    from tmass.train.trainer import device_name, resolve_device

    dev = resolve_device(device)
    device = str(dev)
    report = {"device": device_name(dev), "cases": [], "heads": {}}
    click.echo(f"device: {report['device']}; T-MASS linear radius, M = 20, 12 frames, dim 512; "
               f"path fast: {'the numba kernel' if dev.type == 'cpu' else 'the torch scorer'}")
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
            gpu = f", peak GPU {result['peak_cuda_mib']:.0f} MiB" if dev.type == "cuda" else ""
            click.echo(f"{name:28}{path:7}{noise:8}{result['seconds'] * scale_up:10.1f}{result['cpu_seconds'] * scale_up:9.1f}"
                       f"{result['peak_rss_mib']:9.0f} MiB  {note}{gpu}")
            report["cases"].append({"case": name, "path": path, "noise": noise, **result,
                                    "seconds": result["seconds"] * scale_up, "cpu_seconds": result["cpu_seconds"] * scale_up,
                                    "extrapolated_from_texts": None if n_text == spec["n_text"] else n_text})

    if heads:
        from tmass.train.registry import display_name, head_names

        click.echo(f"\nevery registered head, MSR-VTT 1k-A 1000x1000, untrained, random features "
                   f"({HEAD_TOKENS} word tokens, {HEAD_PATCHES} patches per frame where declared), path fast")
        click.echo(f"{'head':12}{'trials':>7}{'seconds':>10}{'CPU s':>9}{'peak RSS':>12}{'x X-Pool CPU':>14}")
        results = report["heads"] = {name: _run_case(name, device) for name in head_names()}
        xpool = results.get("xpool", {}).get("cpu_seconds")  # CPU time: less sensitive to other load
        for name, r in results.items():
            ratio = f"{r['cpu_seconds'] / xpool:14.1f}" if xpool else f"{'':14}"
            click.echo(f"{display_name(name):12}{r['trials']:7d}{r['seconds']:10.1f}{r['cpu_seconds']:9.1f}"
                       f"{r['peak_rss_mib']:9.0f} MiB{ratio}")
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
