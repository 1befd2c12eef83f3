"""``tmass report``: compare evaluated runs in one table, with training curves and a
retrieval gallery. It reads runs (evaluate/), features (features/) and, for the gallery,
videos (extract/), so it lives on top of the stages."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _features_of(data: dict) -> dict:
    """What an eval.json was measured on, from its split's manifest: ``dataset``,
    ``encoder`` (label), ``random_init``, and ``key``, the (dataset, encoder, test
    split) that runs compared in one table share; the split is its manifest hash, so
    the same features at two paths compare and re-extracted ones at one path do not.
    An unreadable manifest is said in ``problem``, not fatal."""
    from tmass.features.format import FeatureFormatError, open_split

    split = data.get("features_manifest_sha256") or data["split"]
    try:
        meta = open_split(Path(data["split"]), verify_checksums=False).meta
    except FeatureFormatError as exc:
        facts = {"dataset": "unknown", "encoder": data.get("encoder", "unknown"), "random_init": False,
                 "problem": exc.problems[0]}
    else:
        facts = {"dataset": meta.dataset, "encoder": meta.encoder_label(), "random_init": meta.random_init,
                 "pretrained": meta.pretrained}
    return {**facts, "key": (facts["dataset"], facts["encoder"], split)}


def _split_lines(evals: list[dict], facts: dict) -> list[str]:
    """What the evaluated split of one table is: its size, chance level and encoder. A
    random-init encoder is said in capitals, since its numbers measure the pipeline, not
    the method."""
    lines = []
    for split in dict.fromkeys(e["split"] for e in evals):
        e = next(e for e in evals if e["split"] == split)
        line = (f"Split: {split} ({e['n_text']} captions x {e['n_video']} videos; "
                f"chance t2v R@1 = {100 / e['n_video']:.3g} %)")
        if "problem" in facts:
            lines.append(f"{line}; encoder unknown ({facts['problem']})")
            continue
        line += f"; encoder: {facts['encoder']} (--pretrained {facts['pretrained']})"
        if facts["random_init"]:
            line += (" -- RANDOM-INIT ENCODER: the features carry no pretrained knowledge, so these numbers "
                     "test the pipeline, not the method")
        lines.append(line)
    return lines


def _chosen(run: Path, data: dict) -> str:
    """How long the run trained and which checkpoint was evaluated and what chose it: the
    run's own sentences (metrics.json), else the selection label of eval.json."""
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    chosen = "; ".join(metrics[key] for key in ("trained", "chosen") if metrics.get(key))
    return chosen or data.get("selection", "unknown")


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where to write comparison.md / comparison.csv and the gallery.")
@click.option("--eval-json", default="eval.json", show_default=True,
              help="File name, inside each run, of the `tmass eval --json` output to compare.")
@click.option("--gallery-dataset", help="Dataset adapter whose videos the last run's scores refer to (e.g. demo).")
@click.option("--gallery-data-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Its --data-root; with the last run's sims.npy (`tmass eval --save-sims`) draws a retrieval gallery "
                   "(the captioned video framed green, its title ticked).")
def report(runs, out, eval_json, gallery_dataset, gallery_data_root):
    """Compare evaluated runs: print a table, write it, draw each run's training curves
    and, for the last run, a retrieval gallery.

    Numbers are compared only on the same test features: runs measured on different
    datasets, encoders or test splits (the features' manifest hash) go into separate
    tables, each under its own header (dataset, split, size, chance level, encoder);
    comparison.csv names each row's dataset, encoder and split."""
    import csv

    import numpy as np

    from tmass.evaluate.figures import plot_gallery, plot_training_curves
    from tmass.train.registry import display_name

    from tmass.train.runs import mark_run

    try:
        mark_run(out, "report")
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    rows, evals = [], []
    for run in runs:
        path = run / eval_json
        if not path.is_file():
            raise click.ClickException(f"{path}: missing; run `tmass eval --json {path}` first")
        data = json.loads(path.read_text())
        evals.append(data)
        rows.append({"run": str(run), "head": display_name(data["head"]), "protocol": data["protocol"], "trials": data["trials"],
                     "selection": _chosen(run, data),
                     **{f"t2v_{k}": data["t2v"][k] for k in ("R1", "R5", "R10", "MdR", "MnR")},
                     **{f"v2t_{k}": data["v2t"][k] for k in ("R1", "R5", "R10", "MdR", "MnR")}})
        if (run / "log.jsonl").is_file():
            click.echo(f"figure {plot_training_curves(run)}")
    facts = [_features_of(data) for data in evals]
    groups = {}  # (dataset, encoder, test split) -> row indices, in the order given
    for i, f in enumerate(facts):
        groups.setdefault(f["key"], []).append(i)
    sections = []
    for number, members in enumerate(groups.values(), 1):
        f = facts[members[0]]
        lines = [f"## Table {number} of {len(groups)}: {f['dataset']}, {evals[members[0]]['split']}",
                 f"Protocol: {', '.join(sorted({rows[i]['protocol'] for i in members}))}",
                 *_split_lines([evals[i] for i in members], f), "",
                 "| run | head | trials | t2v R@1 | R@5 | R@10 | MdR | MnR | v2t R@1 | R@5 | R@10 | checkpoint chosen |",
                 "|---" * 12 + "|"]
        for r in (rows[i] for i in members):
            audit = "" if r["protocol"] == "leak-free" else f" [{r['protocol']}]"  # an audit row says it leaks
            lines.append(f"| {r['run']} | {r['head']}{audit} | {r['trials']} | {r['t2v_R1']:.1f} | {r['t2v_R5']:.1f} | {r['t2v_R10']:.1f} "
                         f"| {r['t2v_MdR']:g} | {r['t2v_MnR']:.1f} | {r['v2t_R1']:.1f} | {r['v2t_R5']:.1f} | {r['v2t_R10']:.1f} "
                         f"| {r['selection']} |")
        sections.append("\n".join(lines))
    table = "\n\n".join(sections)
    if len(groups) > 1:
        click.echo(f"{len(groups)} tables: these runs were measured on different datasets, encoders or test splits")
    (out / "comparison.md").write_text(table + "\n")
    ordered = [i for members in groups.values() for i in members]
    with open(out / "comparison.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["table", "dataset", "encoder", "split", *rows[0]])
        writer.writeheader()
        number = {i: n for n, members in enumerate(groups.values(), 1) for i in members}
        writer.writerows({"table": number[i], "dataset": facts[i]["dataset"], "encoder": facts[i]["encoder"],
                          "split": evals[i]["split"], **rows[i]} for i in ordered)
    click.echo(table)
    if gallery_dataset and gallery_data_root:
        from tmass.extract.datasets import load_split as load_annotations
        from tmass.extract.video import read_frames

        last = runs[-1]
        data = json.loads((last / eval_json).read_text())
        scores = np.load(last / "sims.npy")
        from tmass.features.format import load_split

        arrays = load_split(Path(data["split"]), text_tokens=False, patches=False)
        videos = {v.id: v.path for v in load_annotations(gallery_dataset, gallery_data_root, arrays.meta.split).videos}
        paths = [videos[v] for v in arrays.video_ids]
        written = plot_gallery(scores, arrays.captions, arrays.text_to_video, lambda v, n: read_frames(paths[v], n)[0],
                               out / "gallery.png",
                               title=f"{display_name(data['head'])} on {gallery_dataset} {arrays.meta.split}: top 5 videos per caption "
                                     f"(green: the captioned video), {data['protocol']} scores"
                                     + f"\nencoder: {arrays.meta.encoder_label()}"
                                     + (" -- RANDOM-INIT ENCODER" if arrays.meta.random_init else ""))
        click.echo(f"figure {written}")
