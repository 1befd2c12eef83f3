"""The paper's ablations as sweeps on cached features (``tmass ablate``, ``make ablate``).

A sweep is a named list of variants; each variant is a training configuration plus an
evaluation setting, run for several seeds. Variants that train the same configuration
share their runs (T-MASS with the linear radius, s+sup losses and alpha 0.8 is the same
model in Tables 4, 5 and 6 and Fig. 6), and finished runs and evaluations are reused, so
a sweep can be interrupted and restarted, and sweeps can be added one at a time.

    radius    Table 5   w/o R (X-Pool) | R = S | R = theta S | R = W S + b
    loss      Table 6   L_ce on t (X-Pool) | L_ce + L_s | L_s | L_s + alpha L_sup
    trials    Table 4   M = 0 (w/o sampling), 5, 10, 20 on the final model
    support   Fig. 6    alpha in 0, 0.2, ..., 1.0 (X-Pool as reference)
    frames    Fig. 7    4, 8, 12 frames (cached frames uniformly subsampled)
    tc-mgc    TC-MGC's switches: all on | w/o SR | w/o SDR | w/o LSA | none (needs word tokens)
    heads     every registered head (tmass.train.registry), built-in or plugin, with
              its default loss terms: the heads compared on equal terms
    losses    every registered loss (tmass.train.losses) x meanP, X-Pool, T-MASS, each
              head with its paper loss terms (T-MASS: the loss on t_s and the support
              text); the default loss shares its runs with the heads sweep

Every number is from the leak-free evaluator on the features' test split, with
checkpoints selected on a validation hold-out of the train split. ``with_reference``
adds the audit protocol's R@1 beside it, labelled as leaking. Outputs per sweep:
``<sweep>.md`` and ``<sweep>.csv`` (mean ± std over seeds) and ``<sweep>.png``, each
saying what made the numbers (:func:`provenance`): the encoder, the test features and
their manifest hash, the split's size and chance level, the protocol and how the
checkpoints were selected.
"""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from tmass.train.registry import head_names
from tmass.train.runs import mark_run

METRICS = ("R1", "R5", "R10", "MdR", "MnR")
FINAL = {"head": {"head": "tmass", "radius": "linear"}, "train": {"loss_terms": ("s", "sup"), "support_weight": 0.8}}
XPOOL = {"head": {"head": "xpool"}, "train": {"loss_terms": ("ce",)}}


@dataclass(frozen=True)
class Variant:
    """One row of a sweep: what to train (overrides of HeadConfig / TrainConfig, the
    number of frames kept) and how to evaluate it (trials)."""

    name: str
    head: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    frames: int | None = None
    trials: int = 20
    x: float | None = None  # position on a line plot's axis

    def run_key(self) -> str:
        """Runs are shared by variants that train the same thing."""
        parts = [self.head.get("head", "tmass")]
        for key, value in sorted({**self.head, **self.train}.items()):
            if key != "head":
                parts.append(f"{key}={','.join(value) if isinstance(value, tuple) else value}")
        if self.frames:
            parts.append(f"frames={self.frames}")
        return "_".join(parts).replace("/", "-")


def _final(name: str, **changes) -> Variant:
    head = {**FINAL["head"], **changes.pop("head", {})}
    train = {**FINAL["train"], **changes.pop("train", {})}
    return Variant(name, head, train, **changes)


@dataclass(frozen=True)
class Sweep:
    name: str
    title: str
    variants: tuple[Variant, ...]
    x_label: str | None = None  # None: categorical (bars); else a line plot over Variant.x


SWEEPS = {
    "radius": Sweep("radius", "Table 5: similarity-aware radius", (
        Variant("w/o R (X-Pool)", **XPOOL),
        _final("R = S (sim)", head={"radius": "sim"}),
        _final("R = theta S (scalar)", head={"radius": "scalar"}),
        _final("R = W S + b (linear)"),
    )),
    "loss": Sweep("loss", "Table 6: text representation and loss terms", (
        Variant("t, L_ce (X-Pool)", **XPOOL),
        _final("t_s, L_ce + L_s", train={"loss_terms": ("ce", "s")}),
        _final("t_s, L_s", train={"loss_terms": ("s",)}),
        _final("t_s, L_s + a L_sup"),
    )),
    "trials": Sweep("trials", "Table 4: sampling trials M at inference", tuple(
        _final("w/o sampling" if m == 0 else f"M = {m}", trials=m, x=m) for m in (0, 5, 10, 20)
    ), x_label="trials M"),
    "support": Sweep("support", "Fig. 6: support text weight alpha", tuple(
        _final(f"alpha = {a:g}", train={"support_weight": a}, x=a) for a in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    ), x_label="support weight alpha"),
    "frames": Sweep("frames", "Fig. 7: frames per video", tuple(
        _final(f"{n} frames", frames=n, x=n) for n in (4, 8, 12)
    ), x_label="frames per video"),
    # all switches on is the heads sweep's TC-MGC run (same head and train settings)
    "tc-mgc": Sweep("tc-mgc", "TC-MGC: similarity reorganisation, decorrelation, linear softmax aggregation", tuple(
        Variant(name, head={"head": "tc-mgc", **off}, train={"loss_terms": ("ce",)})
        for name, off in (("SR + SDR + LSA", {}), ("w/o SR", {"sr": False}), ("w/o SDR", {"sdr": False}),
                          ("w/o LSA", {"lsa": False}), ("none", {"sr": False, "sdr": False, "lsa": False}))
    )),
}
# the configurations the paper's tables train, so that the heads sweep shares their runs
PAPER_VARIANTS = {"xpool": XPOOL, "tmass": FINAL}
LOSS_HEADS = ("meanp", "xpool", "tmass")  # the paper's heads, for the losses sweep
SWEEP_NAMES = (*SWEEPS, "heads", "losses")


def heads_sweep() -> Sweep:
    """Every registered head, named by its display name, with its default loss terms."""
    from tmass.train.registry import head_names, head_spec

    variants = []
    for name in head_names():
        spec = head_spec(name)
        setting = PAPER_VARIANTS.get(name, {"head": {"head": name}, "train": {"loss_terms": spec.loss_terms}})
        variants.append(Variant(spec.display, **setting))
    return Sweep("heads", "Every registered head, default loss terms", tuple(variants))


def losses_sweep() -> Sweep:
    """Every registered loss with each of :data:`LOSS_HEADS`, named "head / loss"."""
    from tmass.train.losses import DEFAULT_LOSS, loss_names
    from tmass.train.registry import head_spec

    variants = []
    for loss in loss_names():
        for name in LOSS_HEADS:
            spec = head_spec(name)
            setting = PAPER_VARIANTS.get(name, {"head": {"head": name}, "train": {"loss_terms": spec.loss_terms}})
            train = setting["train"] if loss == DEFAULT_LOSS else {**setting["train"], "loss": loss}
            variants.append(Variant(f"{spec.display} / {loss}", head=setting["head"], train=train))
    return Sweep("losses", "Every registered loss with meanP, X-Pool and T-MASS", tuple(variants))


def sweep_named(name: str) -> Sweep:
    return {"heads": heads_sweep, "losses": losses_sweep}.get(name, lambda: SWEEPS[name])()


@dataclass
class SweepConfig:
    """Settings shared by every run of a sweep. Defaults are the paper's training
    settings; ``make ablate`` shortens them (see the Makefile) to fit a CPU."""

    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 5
    max_steps: int = 0  # > 0: every run stops after this many steps (TrainConfig.max_steps)
    lr: float = 1e-5
    batch_size: int = 32
    jobs: int = 1  # training runs in parallel (processes); threads are split between them
    with_reference: bool = False
    device: str = "auto"
    scheduler: str | None = None  # a dask.distributed cluster's address: train there instead (run_on_cluster)


def subsample_frames(features: Path, out: Path, n_frames: int) -> Path:
    """A copy of a features directory keeping ``n_frames`` of each video's cached frames,
    uniformly spaced (Fig. 7). Written once, reused."""
    from tmass.features.format import load_split, shard_name, write_manifest, write_text_shard, write_video_shard

    if all((out / split / "manifest.json").exists() for split in ("train", "test")):
        return out
    for split in ("train", "test"):
        arrays = load_split(features / split, text_tokens=False, patches=False)  # the copy keeps frames only
        keep = np.linspace(0, arrays.frames.shape[1] - 1, n_frames).round().astype(int)
        meta = dataclasses.replace(arrays.meta, num_frames=n_frames,
                                   extra={**arrays.meta.extra, "subsampled_from": str(features), "frames_kept": keep.tolist()})
        owner = [arrays.video_ids[i] for i in arrays.text_to_video]
        records = [
            write_video_shard(out / split / shard_name("videos", 0), meta, arrays.video_ids,
                              arrays.frames[:, keep], arrays.frame_mask[:, keep]),
            write_text_shard(out / split / shard_name("texts", 0), meta, arrays.text_ids, owner,
                             arrays.captions, arrays.text_embeddings),
        ]
        write_manifest(out / split, meta, records)
    return out


def _frames_of(variant: Variant, cached: int, features: Path) -> Variant:
    """``variant`` as trained on features caching ``cached`` frames per video: keeping all
    of them is the plain variant (same runs, no copy of the features)."""
    if variant.frames is not None and variant.frames > cached:
        raise ValueError(f"{variant.name}: {features} caches only {cached} frames per video")
    return dataclasses.replace(variant, frames=None) if variant.frames == cached else variant


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when the process that started it dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """Processes for training runs in parallel. Spawned, not forked: a forked child of a
    process whose OpenMP threads (torch, numba) already ran deadlocks in libgomp. Each
    worker dies with the sweep, so a killed sweep leaves no orphan still training into a
    run directory that the restarted sweep resumes."""
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_die_with_parent)


def run_on_cluster(address: str, jobs: list[tuple]) -> None:
    """Train and evaluate ``jobs`` (as :func:`_train_one` takes them) on the
    dask.distributed cluster at ``address``, one job per worker at a time: where workers
    declare a ``GPU`` resource (``dask worker --resources GPU=1``, one worker per GPU)
    only those take jobs, each holding one GPU; else every worker takes one. A job uses
    its worker's threads. Run directories must be on a file system the workers share;
    finished runs are skipped and unfinished ones resumed there, as in a local sweep."""
    from distributed import Client, as_completed
    from tqdm import tqdm

    try:
        client = Client(address, timeout="20s")
    except OSError as exc:
        raise ValueError(f"--scheduler {address}: no dask scheduler answers there ({exc})") from None
    with client:
        workers = client.scheduler_info()["workers"]  # address -> info (nthreads, resources)
        if not workers:
            raise ValueError(f"--scheduler {address}: the cluster has no workers")
        gpu = {w for w, info in workers.items() if info.get("resources", {}).get("GPU", 0) >= 1}
        idle = sorted(gpu or workers)
        resources = {"GPU": 1} if gpu else None
        pending, running, done = list(jobs), {}, as_completed()
        with tqdm(total=len(jobs), desc=f"runs (train, evaluate) on {len(idle)} dask workers", unit="run") as bar:
            while pending or running:
                while idle and pending:
                    worker, job = idle.pop(), pending.pop(0)
                    job = (*job[:-1], workers[worker].get("nthreads", 1))
                    future = client.submit(_train_one, job, workers=[worker], allow_other_workers=False,
                                           resources=resources, pure=False)
                    running[future] = worker
                    done.add(future)
                future = next(done)
                idle.append(running.pop(future))
                future.result()  # a failed run stops the sweep, as locally
                bar.update()


def _train_one(job: tuple) -> str:
    """Train one (variant, seed) run unless it already finished, then make its test
    evaluations (``(trials, protocol)`` pairs) unless cached; runs in a worker process, so
    a sweep's evaluations run in parallel with each other and with its training rather
    than one by one after it."""
    features, run_dir, head_overrides, train_overrides, evaluations, threads = job
    import torch

    from tmass.evaluate import split_metrics
    from tmass.train.registry import head_spec
    from tmass.train.trainer import TrainConfig, train

    torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").exists():
        resume = (run_dir / "last.pt").exists()
        head_cfg = head_spec(head_overrides.get("head", "tmass")).make_config(**head_overrides)
        train(Path(features), run_dir, TrainConfig(**train_overrides), head_cfg, resume=resume, progress=False,
              evaluate=split_metrics)
    for trials, protocol in evaluations:
        try:
            _evaluate_run(run_dir, Path(features), trials, protocol, train_overrides["device"])
        except ValueError:
            if protocol == PROTOCOL:
                raise
            # the audit reproduces X-Pool-style pooling; a head without it has none (the table says NaN)
    return str(run_dir)


def _evaluate_run(run_dir: Path, features: Path, trials: int, protocol: str, device: str) -> dict:
    """Leak-free (or audit) test metrics of a run's best.pt, cached in the run directory."""
    cache = run_dir / f"eval-{protocol}-m{trials}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from tmass.evaluate.scores import EvalConfig, evaluate_head
    from tmass.train.data import load_declared
    from tmass.train.registry import head_spec
    from tmass.train.trainer import load_checkpoint

    head, _ = load_checkpoint(run_dir / "best.pt")
    report = evaluate_head(head, load_declared(features / "test", head_spec(head.cfg.head).features),
                           EvalConfig(trials=trials, protocol=protocol, device=device, progress=False))
    partial = cache.with_suffix(".partial")  # a worker killed with its sweep mid-write leaves no truncated cache
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(cache)
    return report


PROTOCOL = "leak-free"  # of every sweep number; the audit column says it leaks
AUDIT_COLUMN = "R1_reference_AUDIT_leaks"


def provenance(features: Path, run_dirs: list[Path]) -> dict:
    """What made a sweep's numbers, for its tables and plot: the encoder, the test split
    (path, manifest SHA-256 prefix, captions x videos), the protocol, and the checkpoint
    selection of ``run_dirs`` (each run's metrics.json; runs that disagree are all named)."""
    from tmass.features.format import manifest_sha256, open_split

    test = open_split(Path(features) / "test", verify_checksums=False)
    selections = dict.fromkeys(json.loads((Path(d) / "metrics.json").read_text())["selection"] for d in run_dirs)
    return {"encoder": test.meta.encoder_label(), "features": str(test.path),
            "manifest_sha256": manifest_sha256(test.path)[:12], "n_text": len(test.text_ids),
            "n_video": len(test.video_ids), "protocol": PROTOCOL, "selection": "; ".join(selections)}


def provenance_lines(prov: dict) -> list[str]:
    """:func:`provenance` in words, one fact per line (tables, plot titles)."""
    return [f"encoder: {prov['encoder']}",
            f"test features: {prov['features']} (manifest sha256 {prov['manifest_sha256']}), "
            f"{prov['n_text']} captions x {prov['n_video']} videos, chance t2v R@1 = {100 / prov['n_video']:.3g} %",
            f"protocol: {prov['protocol']}; checkpoints: {prov['selection']}"]


def _refuse_missing_tokens(sweeps: list[Sweep], meta, features: Path) -> None:
    """ValueError, one line, before any run starts, naming the heads of ``sweeps`` whose
    token features the features (``meta``: the train split's manifest) lack, grouped by
    the extract option that stores them."""
    from tmass.train.heads.base import missing_tokens, unextracted
    from tmass.train.registry import head_spec

    lacking: dict[str, list[str]] = {}  # token feature -> the heads that need it
    for head in dict.fromkeys(v.head.get("head", "tmass") for sweep in sweeps for v in sweep.variants):
        for need in unextracted(meta, head_spec(head).features):
            lacking.setdefault(need, []).append(head)
    if lacking:
        raise ValueError(f"{features}: " + "; ".join(str(missing_tokens(need, heads)) for need, heads in lacking.items()))


def _refuse_other_runs(jobs: list[tuple]) -> None:
    """ValueError, one line, before any run starts, when a job's run directory holds a
    finished run made otherwise (other training length, learning rate, batch size, head
    settings or train features): runs are keyed by variant and seed only, and reusing such
    a run would put its numbers under this sweep's settings."""
    from tmass.features.format import manifest_sha256

    not_compared = ("device", "final_eval")  # where a run trains; the sweep evaluates runs itself
    stale = []
    for features, target, head_overrides, train_overrides, _, _ in jobs:
        config_path = Path(target) / "config.json"
        if not (Path(target) / "metrics.json").exists() or not config_path.exists():
            continue
        config = json.loads(config_path.read_text())
        asked = json.loads(json.dumps({"train": {k: v for k, v in train_overrides.items() if k not in not_compared},
                                       "head": head_overrides}))  # tuples as the JSON record has them
        diffs = [f"{k} {config[part].get(k)!r} (asked: {v!r})" for part in ("train", "head")
                 for k, v in asked[part].items() if config[part].get(k) != v]
        if config.get("features_manifest_sha256", {}).get("train") != manifest_sha256(Path(features) / "train"):
            diffs.append(f"train features {config.get('features')} (asked: {features})")
        if diffs:
            stale.append((target, diffs))
    if stale:
        target, diffs = stale[0]
        more = f" (and {len(stale) - 1} more runs)" if len(stale) > 1 else ""
        raise ValueError(f"{target}: a finished run made with {', '.join(diffs)}{more}; "
                         "give this sweep another --out, or delete those runs")


def run_sweeps(names: list[str], features: Path, out: Path, cfg: SweepConfig) -> dict[str, list[dict]]:
    """Train what is missing, evaluate, write tables and plots; returns the rows per sweep."""
    from tqdm import tqdm

    features, out = Path(features), Path(out)
    from tmass.features.format import open_split

    meta = open_split(features / "train", verify_checksums=False).meta
    sweeps = [dataclasses.replace(sweep, variants=tuple(_frames_of(v, meta.num_frames, features) for v in sweep.variants))
              for sweep in map(sweep_named, names)]
    _refuse_missing_tokens(sweeps, meta, features)
    mark_run(out, "sweep")

    def features_for(variant: Variant) -> Path:
        return subsample_frames(features, out / f"features-{variant.frames}f", variant.frames) if variant.frames else features

    def run_dir(variant: Variant, seed: int) -> Path:
        return out / "runs" / variant.run_key() / f"seed{seed}"

    by_run: dict[Path, tuple] = {}  # variants that differ only in what is evaluated share a run
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    protocols = (PROTOCOL, "reference") if cfg.with_reference else (PROTOCOL,)
    for sweep in sweeps:
        for variant in sweep.variants:
            for seed in cfg.seeds:
                target = run_dir(variant, seed)
                evaluations = tuple((variant.trials, p) for p in protocols)
                if target in by_run:
                    job = by_run[target]
                    by_run[target] = (*job[:4], tuple(dict.fromkeys(job[4] + evaluations)), threads)
                    continue
                train_overrides = {"epochs": cfg.epochs, "max_steps": cfg.max_steps, "lr": cfg.lr,
                                   "batch_size": cfg.batch_size, "seed": seed, "final_eval": False, "device": cfg.device,
                                   **variant.train}
                by_run[target] = (str(features_for(variant)), str(target), variant.head, train_overrides, evaluations,
                                  threads)
    jobs = list(by_run.values())
    _refuse_other_runs(jobs)
    (out / "sweep-config.json").write_text(json.dumps({"features": str(features), "sweeps": names,
                                                       **dataclasses.asdict(cfg)}, indent=2) + "\n")
    if cfg.scheduler:
        run_on_cluster(cfg.scheduler, jobs)
    elif cfg.jobs == 1:
        for job in tqdm(jobs, desc="runs (train, evaluate)", unit="run"):
            _train_one(job)
    else:
        with worker_pool(cfg.jobs) as pool:
            futures = [pool.submit(_train_one, job) for job in jobs]
            try:  # the bar counts runs as they finish, not in submission order
                for future in tqdm(as_completed(futures), total=len(jobs), desc="runs (train, evaluate)", unit="run"):
                    future.result()  # a failed run stops the sweep
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the runs not yet started do not start
                raise

    results = {}
    for sweep in sweeps:
        rows = []
        for variant in sweep.variants:
            reports = [_evaluate_run(run_dir(variant, s), features_for(variant), variant.trials, PROTOCOL, cfg.device)
                       for s in cfg.seeds]
            row = {"variant": variant.name, "x": variant.x, "seeds": len(cfg.seeds)}
            for metric in METRICS:
                values = [r["t2v"][metric] for r in reports]
                row[metric] = float(np.mean(values))
                row[f"{metric}_std"] = float(np.std(values))
            if cfg.with_reference:
                try:
                    audit = [_evaluate_run(run_dir(variant, s), features_for(variant), variant.trials, "reference",
                                           cfg.device) for s in cfg.seeds]
                    row[AUDIT_COLUMN] = float(np.mean([r["t2v"]["R1"] for r in audit]))
                except ValueError:  # the audit reproduces X-Pool-style pooling; other heads have none to audit
                    row[AUDIT_COLUMN] = float("nan")
            rows.append(row)
        prov = provenance(features, [run_dir(v, s) for v in sweep.variants for s in cfg.seeds])
        _write_tables(sweep, rows, out, cfg, prov)
        from tmass.evaluate.figures import plot_sweep

        plot_sweep(sweep, rows, out / f"{sweep.name}.png", prov["n_video"], "\n".join(provenance_lines(prov)))
        results[sweep.name] = rows
    return results


def _write_tables(sweep: Sweep, rows: list[dict], out: Path, cfg: SweepConfig, prov: dict) -> None:
    """``<sweep>.csv`` (each row carries the provenance columns) and ``<sweep>.md``."""
    columns = ["variant", *[c for m in METRICS for c in (m, f"{m}_std")], "seeds"]
    if cfg.with_reference:
        columns.append(AUDIT_COLUMN)
    columns += list(prov)
    with open(out / f"{sweep.name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**row, **prov} for row in rows)
    header = "| variant | " + " | ".join(("R@1", "R@5", "R@10", "MdR", "MnR")) + " |"
    if cfg.with_reference:
        header += " R@1 reference protocol (AUDIT, leaks) |"
    lines = [
        f"## {sweep.title}",
        "",
        f"Text-to-video on the test split, {PROTOCOL} protocol, mean ± std over seeds {list(cfg.seeds)}; "
        f"{f'{cfg.max_steps:,} steps' if cfg.max_steps else f'{cfg.epochs} epochs'}, lr {cfg.lr:g}, batch {cfg.batch_size}.",
        "",
        *(f"- {line}" for line in provenance_lines(prov)),
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for row in rows:
        cells = [f"{row[m]:.1f} ± {row[m + '_std']:.1f}" for m in METRICS]
        if cfg.with_reference:
            cells.append(f"{row[AUDIT_COLUMN]:.1f}")
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    (out / f"{sweep.name}.md").write_text("\n".join(lines) + "\n")


@click.command()
@click.option("--features", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Features directory with train/ and test/ splits (e.g. simulated msrvtt).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Sweep directory: runs/, tables (.md, .csv) and plots (.png) per sweep.")
@click.option("--sweeps", default="radius,trials", show_default=True,
              help="Comma list from radius (Table 5), loss (Table 6), trials (Table 4), support (Fig. 6), frames (Fig. 7), "
                   "tc-mgc (TC-MGC's SR, SDR, LSA switches), "
                   f"heads (every registered head: {', '.join(head_names())}), "
                   "losses (every registered loss x meanP, X-Pool, T-MASS).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma list of seeds; tables show mean ± std.")
@click.option("--epochs", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Stop every run after this many optimiser steps (0: the epochs decide); --epochs must hold them.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Training runs in parallel (processes).")
@click.option("--with-reference", is_flag=True, help="Add the audit protocol's R@1 column (labelled; it leaks).")
@click.option("--device", default="auto", show_default=True)
@click.option("--scheduler", default=None,
              help="Train on the dask.distributed cluster at this address (e.g. tcp://host:8786), one run per worker "
                   "at a time, or per GPU where workers declare --resources GPU=1; --out must be on a file system the "
                   "workers share. Instead of --jobs.")
@click.pass_context
def ablate(ctx, features, out, sweeps, seeds, epochs, max_steps, lr, batch_size, jobs, with_reference, device, scheduler):
    """Run the paper's ablations as sweeps on cached features; finished runs are reused."""
    from tmass.features.format import FeatureFormatError

    if scheduler and ctx.get_parameter_source("jobs") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--scheduler runs one job per dask worker and --jobs sets local processes; give one of them")

    names = [s.strip() for s in sweeps.split(",") if s.strip()]
    unknown = [n for n in names if n not in SWEEP_NAMES]
    if unknown:
        raise click.BadParameter(f"unknown sweeps {unknown}; choose from {', '.join(SWEEP_NAMES)}", param_hint="--sweeps")
    try:
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"{seeds!r} is not a comma list of integers, e.g. 0,1,2", param_hint="--seeds") from None
    if not seed_list:
        raise click.BadParameter("give at least one seed, e.g. 0,1,2", param_hint="--seeds")
    cfg = SweepConfig(seeds=seed_list, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size,
                      jobs=jobs, with_reference=with_reference, device=device, scheduler=scheduler)
    try:
        results = run_sweeps(names, features, out, cfg)
    except (ValueError, FeatureFormatError) as exc:
        raise click.ClickException(str(exc)) from exc
    for name in results:
        click.echo((out / f"{name}.md").read_text())
        click.echo(f"table {out / (name + '.csv')}, plot {out / (name + '.png')}\n")
