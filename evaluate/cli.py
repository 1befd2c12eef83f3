"""``tmass eval``: leak-free retrieval metrics of a trained head on a features split."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click


def _table(report: dict) -> str:
    rows = [f"{'':6}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'MdR':>7}{'MnR':>8}{'n':>7}"]
    for name, metrics in (("t2v", report.get("t2v")), ("v2t", report.get("v2t")),
                          ("t2v+DSL", report.get("dsl", {}).get("t2v")), ("v2t+DSL", report.get("dsl", {}).get("v2t"))):
        if metrics:
            rows.append(f"{name:8}{metrics['R1']:5.1f}{metrics['R5']:7.1f}{metrics['R10']:7.1f}"
                        f"{metrics['MdR']:7.1f}{metrics['MnR']:8.1f}{metrics['n']:7d}")
    return "\n".join(rows)


@click.command(name="eval")
@click.option("--features", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Features directory (with split subdirectories) or a split directory.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="A run's best.pt or last.pt.")
@click.option("--split", default="test", show_default=True, help="Split to evaluate when --features holds several.")
@click.option("--trials", type=click.IntRange(min=0), default=20, show_default=True,
              help="T-MASS samples per text-video pair, best kept (paper: 20); 0 = w/o sampling.")
@click.option("--direction", type=click.Choice(["t2v", "v2t", "both"]), default="both", show_default=True)
@click.option("--dsl", is_flag=True,
              help="Also report DSL (dual softmax) metrics. Transductive: uses all queries at once.")
@click.option("--protocol", type=click.Choice(["leak-free", "reference"]), default="leak-free", show_default=True,
              help="'reference' is an AUDIT mode reproducing the official T-MASS evaluator, which scores each "
                   "query against videos pooled on their own captions (leaks ground truth). Never for reporting. "
                   "As there, caption k of a video (k-th in query order) is scored against each video pooled on that "
                   "video's own k-th caption; with unequal caption counts a video lacking a k-th caption gets an "
                   "undefined score that ranks ahead of the target, and v2t and --dsl follow the reference's "
                   "definitions (v2t ranks videos by their best caption; DSL softmaxes over each slot's captions "
                   "and drops slots some video cannot fill).")
@click.option("--noise", type=click.Choice(["fresh", "shared"]), default="fresh", show_default=True,
              help="fresh: eps per (text, video, trial) as in the paper; shared: one eps per (text, trial) "
                   "across all videos (variance reduction).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the keyed noise.")
@click.option("--memory-gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Working memory of one chunk of pairs; chunks are sized from it and never change a score "
                   "[default: 2 on CPU, half the free GPU memory on CUDA].")
@click.option("--chunk-pairs", type=click.IntRange(min=1), default=None,
              help="At most this many text-video pairs at once (for checks) [default: as many as --memory-gb holds].")
@click.option("--path", "path_", type=click.Choice(["fast", "torch", "naive"]), default="fast", show_default=True,
              help="fast: the fused numba kernel on CPU, the torch scorer on other devices; torch: the torch "
                   "scorer on any device (same noise, same scores); naive: the reference implementation "
                   "(slow; for checks).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--save-sims", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the [n_text, n_video] score matrix with its ids: FILE.npz holds sims, text_ids and "
                   "video_ids; FILE.npy holds sims, with FILE.ids.json beside it (rows and columns in shard order).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write metrics, labels, config and hashes as JSON.")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path),
              help="Write the paper's Fig. 5 analysis here (T-MASS heads: t against the selected t_s).")
def evaluate(features, checkpoint, split, trials, direction, dsl, protocol, noise, seed, memory_gb, chunk_pairs, path_, device,
             save_sims, json_path, figures):
    """Score every caption against every video of a split with a trained head and print
    R@1/5/10, MdR and MnR for text-to-video and video-to-text."""
    import numpy as np

    from tmass import __version__
    from tmass.evaluate.scores import EvalConfig, metrics_report, resolve_device, score_split
    from tmass.features.format import (FeatureFormatError, features_identity, identity_mismatch, locate_split,
                                       read_manifest, sha256_file)
    from tmass.train.data import load_declared
    from tmass.train.heads.base import require_extracted
    from tmass.train.registry import head_spec
    from tmass.train.trainer import load_checkpoint

    try:
        device = str(resolve_device(device))  # a GPU that is not there: said before any work
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from exc
    try:
        split_dir = locate_split(features, split)
        meta = read_manifest(split_dir)[1]  # the checks below need no arrays: they come first
    except FeatureFormatError as exc:
        raise click.BadParameter(exc.summary(), param_hint="--features") from exc
    config = EvalConfig(trials=trials, seed=seed, protocol=protocol, noise=noise, path=path_,
                        memory_gb=memory_gb, chunk_pairs=chunk_pairs, device=device)
    try:
        head, info = load_checkpoint(checkpoint, resolve_device(device))
    except ValueError as exc:  # e.g. a plugin head that is no longer installed
        raise click.ClickException(f"{checkpoint}: {exc}") from exc
    recorded = info.get("features_identity")  # checkpoints from before it was recorded: dim and frames only
    mismatch = identity_mismatch(features_identity(split_dir), recorded) if recorded else ""
    if mismatch:
        raise click.ClickException(f"{checkpoint} was trained on other features than {split_dir} (these vs the run's: "
                                   f"{mismatch}); evaluate it on features extracted like its training split")
    if head.cfg.embed_dim != meta.embed_dim:
        raise click.ClickException(
            f"{checkpoint}: head has dim {head.cfg.embed_dim}, features {split_dir} have dim {meta.embed_dim}")
    if getattr(head, "radius", None) is not None and head.cfg.radius == "linear" and head.cfg.num_frames != meta.num_frames:
        raise click.ClickException(
            f"{checkpoint}: linear radius expects {head.cfg.num_frames} frames, features {split_dir} have {meta.num_frames}")
    try:
        require_extracted(meta, head_spec(head.cfg.head).features, head.cfg.head, split_dir)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        arrays = load_declared(split_dir, head_spec(head.cfg.head).features)
    except FeatureFormatError as exc:
        raise click.BadParameter(exc.summary(), param_hint="--features") from exc
    if protocol == "reference":
        click.secho("AUDIT MODE (--protocol reference): every query is scored against videos pooled on their own "
                    "captions, as the official evaluator does. These numbers leak ground truth.", fg="red", err=True)

    start = time.time()
    scores = score_split(head, arrays, config)
    elapsed = time.time() - start
    report = metrics_report(scores, arrays.text_to_video, config, direction, dsl)
    report.update(
        split=str(split_dir),
        n_text=len(arrays.text_ids),
        n_video=len(arrays.video_ids),
        head=head.cfg.head,
        selection=info.get("selection", "unknown"),
        checkpoint_epoch=info.get("epoch"),
        encoder=arrays.meta.encoder_label(),
        features_manifest_sha256=arrays.manifest_sha256,
        checkpoint=str(checkpoint),
        checkpoint_sha256=sha256_file(checkpoint),
        config=dataclasses.asdict(config),
        device=str(resolve_device(device)),
        seconds=round(elapsed, 2),
        software_version=__version__,
    )
    click.echo(f"{head.cfg.head} on {split_dir} ({report['n_text']} captions x {report['n_video']} videos), "
               f"protocol {report['protocol']}, trials {trials}, noise {noise}, selection {report['selection']}, "
               f"{elapsed:.1f} s")
    click.echo(f"encoder: {report['encoder']}")
    click.echo(_table(report))
    if save_sims:
        save_sims.parent.mkdir(parents=True, exist_ok=True)
        ids = {"text_ids": arrays.text_ids, "video_ids": arrays.video_ids}
        if save_sims.suffix == ".npz":
            np.savez(save_sims, sims=scores, **{k: np.array(v, dtype=str) for k, v in ids.items()})
        else:
            np.save(save_sims, scores)
            save_sims.with_suffix(".ids.json").write_text(json.dumps({"rows": "text_ids", "columns": "video_ids", **ids}) + "\n")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if figures and head.stochastic and trials > 0:
        from tmass.evaluate.figures import plot_similarity_analysis

        point = score_split(head, arrays, dataclasses.replace(config, trials=0))
        written = plot_similarity_analysis(point, scores, arrays.text_to_video, figures / "similarity-analysis.png",
                                           f"Fig. 5 analysis, {checkpoint}: text t vs selected t_s (M = {trials}), "
                                           f"protocol {report['protocol']}; encoder: {report['encoder']}")
        click.echo(f"figure {written}")
    elif figures:
        click.echo("no Fig. 5 analysis: it needs a T-MASS head and --trials > 0", err=True)
