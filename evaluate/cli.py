"""``tmass eval``: leak-free retrieval metrics of a trained head on a features split."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click


def _split_dir(features: Path, split: str) -> Path:
    """``features`` may be a split directory itself or a features directory holding splits."""
    if (features / "manifest.json").is_file():
        return features
    candidate = features / split
    if not (candidate / "manifest.json").is_file():
        raise click.ClickException(f"{features}: neither a split directory nor holding a '{split}/' split with a manifest.json")
    return candidate


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
@click.option("--trials", type=int, default=20, show_default=True,
              help="T-MASS samples per text-video pair, best kept (paper: 20); 0 = w/o sampling.")
@click.option("--direction", type=click.Choice(["t2v", "v2t", "both"]), default="both", show_default=True)
@click.option("--dsl", is_flag=True,
              help="Also report DSL (dual softmax) metrics. Transductive: uses all queries at once.")
@click.option("--protocol", type=click.Choice(["leak-free", "reference"]), default="leak-free", show_default=True,
              help="'reference' is an AUDIT mode reproducing the official T-MASS evaluator, which scores each "
                   "query against videos pooled on their own captions (leaks ground truth). Never for reporting.")
@click.option("--noise", type=click.Choice(["fresh", "shared"]), default="fresh", show_default=True,
              help="fresh: eps per (text, video, trial) as in the paper; shared: one eps per (text, trial) "
                   "across all videos (variance reduction).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the keyed noise.")
@click.option("--chunk-pairs", type=int, default=16384, show_default=True,
              help="Text-video pairs scored at once; bounds memory, never changes a score.")
@click.option("--path", "path_", type=click.Choice(["fast", "naive"]), default="fast", show_default=True,
              help="naive: the reference implementation (slow; for checks).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--save-sims", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the [n_text, n_video] score matrix (.npy; rows and columns in shard order).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write metrics, labels, config and hashes as JSON.")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path),
              help="Write the paper's Fig. 5 analysis here (T-MASS heads: t against the selected t_s).")
def evaluate(features, checkpoint, split, trials, direction, dsl, protocol, noise, seed, chunk_pairs, path_, device,
             save_sims, json_path, figures):
    """Score every caption against every video of a split with a trained head and print
    R@1/5/10, MdR and MnR for text-to-video and video-to-text."""
    import numpy as np

    from tmass import __version__
    from tmass.evaluate.scores import EvalConfig, metrics_report, resolve_device, score_split
    from tmass.features.format import FeatureFormatError, load_split, sha256_file
    from tmass.train.trainer import load_checkpoint

    split_dir = _split_dir(features, split)
    try:
        arrays = load_split(split_dir)
    except FeatureFormatError as exc:
        raise click.ClickException(f"features fail validation:\n{exc}") from exc
    config = EvalConfig(trials=trials, seed=seed, protocol=protocol, noise=noise, path=path_,
                        chunk_pairs=chunk_pairs, device=device)
    head, info = load_checkpoint(checkpoint, resolve_device(device))
    if head.cfg.embed_dim != arrays.meta.embed_dim:
        raise click.ClickException(
            f"{checkpoint}: head has dim {head.cfg.embed_dim}, features {split_dir} have dim {arrays.meta.embed_dim}")
    if head.radius is not None and head.cfg.radius == "linear" and head.cfg.num_frames != arrays.meta.num_frames:
        raise click.ClickException(
            f"{checkpoint}: linear radius expects {head.cfg.num_frames} frames, features {split_dir} have {arrays.meta.num_frames}")
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
    click.echo(_table(report))
    if save_sims:
        save_sims.parent.mkdir(parents=True, exist_ok=True)
        np.save(save_sims, scores)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if figures and head.stochastic and trials > 0:
        from tmass.evaluate.figures import plot_similarity_analysis

        point = score_split(head, arrays, dataclasses.replace(config, trials=0))
        written = plot_similarity_analysis(point, scores, arrays.text_to_video, figures / "similarity-analysis.png",
                                           f"Fig. 5 analysis, {checkpoint}: text t vs selected t_s (M = {trials}), "
                                           f"protocol {report['protocol']}")
        click.echo(f"figure {written}")
    elif figures:
        click.echo("no Fig. 5 analysis: it needs a T-MASS head and --trials > 0", err=True)


def _split_lines(evals: list[dict]) -> list[str]:
    """What each evaluated split is: its size, chance level and encoder. A random-init
    encoder is said in capitals, since its numbers measure the pipeline, not the method."""
    from tmass.features.format import FeatureFormatError, open_split

    lines = []
    for split in dict.fromkeys(e["split"] for e in evals):
        e = next(e for e in evals if e["split"] == split)
        line = (f"Split: {split} ({e['n_text']} captions x {e['n_video']} videos; "
                f"chance t2v R@1 = {100 / e['n_video']:.1f} %)")
        try:
            meta = open_split(Path(split), verify_checksums=False).meta
        except FeatureFormatError as exc:
            lines.append(f"{line}; encoder unknown ({exc.problems[0]})")
            continue
        weights = meta.extra.get("weights", meta.pretrained)
        line += f"; encoder {meta.model}, weights {weights}" + (f" (--pretrained {meta.pretrained})" if weights != meta.pretrained else "")
        if meta.random_init:
            line += (" -- RANDOM-INIT ENCODER: the features carry no pretrained knowledge, so these numbers "
                     "test the pipeline, not the method")
        lines.append(line)
    return lines


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where to write comparison.md / comparison.csv and the gallery.")
@click.option("--eval-json", default="eval.json", show_default=True,
              help="File name, inside each run, of the `tmass eval --json` output to compare.")
@click.option("--gallery-dataset", help="Dataset adapter whose videos the last run's scores refer to (e.g. demo).")
@click.option("--gallery-data-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Its --data-root; with the last run's sims.npy (`tmass eval --save-sims`) draws a retrieval gallery.")
def report(runs, out, eval_json, gallery_dataset, gallery_data_root):
    """Compare evaluated runs: print a table, write it, draw each run's training curves
    and, for the last run, a retrieval gallery."""
    import csv

    import numpy as np

    from tmass.evaluate.figures import plot_gallery, plot_training_curves

    out.mkdir(parents=True, exist_ok=True)
    rows, evals = [], []
    for run in runs:
        path = run / eval_json
        if not path.is_file():
            raise click.ClickException(f"{path}: missing; run `tmass eval --json {path}` first")
        data = json.loads(path.read_text())
        evals.append(data)
        rows.append({"run": str(run), "head": data["head"], "protocol": data["protocol"], "trials": data["trials"],
                     "selection": data.get("selection", "unknown"),
                     **{f"t2v_{k}": data["t2v"][k] for k in ("R1", "R5", "R10", "MdR", "MnR")},
                     **{f"v2t_{k}": data["v2t"][k] for k in ("R1", "R5", "R10", "MdR", "MnR")}})
        if (run / "log.jsonl").is_file():
            click.echo(f"figure {plot_training_curves(run)}")
    lines = ["| run | head | trials | t2v R@1 | R@5 | R@10 | MdR | MnR | v2t R@1 | R@5 | R@10 | checkpoint selected on |",
             "|---" * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['head']} | {r['trials']} | {r['t2v_R1']:.1f} | {r['t2v_R5']:.1f} | {r['t2v_R10']:.1f} "
                     f"| {r['t2v_MdR']:g} | {r['t2v_MnR']:.1f} | {r['v2t_R1']:.1f} | {r['v2t_R5']:.1f} | {r['v2t_R10']:.1f} "
                     f"| {r['selection']} |")
    protocols = sorted({r["protocol"] for r in rows})
    table = "\n".join([f"Protocol: {', '.join(protocols)}", *_split_lines(evals), "", *lines])
    (out / "comparison.md").write_text(table + "\n")
    with open(out / "comparison.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    click.echo(table)
    if gallery_dataset and gallery_data_root:
        from tmass.extract.datasets import load_split as load_annotations

        last = runs[-1]
        data = json.loads((last / eval_json).read_text())
        scores = np.load(last / "sims.npy")
        from tmass.features.format import load_split

        arrays = load_split(Path(data["split"]))
        videos = {v.id: v.path for v in load_annotations(gallery_dataset, gallery_data_root, arrays.meta.split).videos}
        written = plot_gallery(scores, arrays.captions, arrays.text_to_video, [videos[v] for v in arrays.video_ids],
                               out / "gallery.png",
                               title=f"{data['head']} on {gallery_dataset} {arrays.meta.split}: top 5 videos per caption "
                                     f"(green: the captioned video), {data['protocol']} scores"
                                     + (" -- RANDOM-INIT ENCODER" if arrays.meta.random_init else ""))
        click.echo(f"figure {written}")
