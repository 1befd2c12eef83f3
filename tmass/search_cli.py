"""``tmass index`` and ``tmass search``: search your own videos (see :mod:`tmass.search`).

Heavy imports (torch, faiss, open_clip) happen inside the commands, so ``tmass --help``
stays instant."""

from __future__ import annotations

from pathlib import Path

import click

from tmass.search import FIRST_STAGES, IndexConfig, SearchConfig

INDEX_DEFAULTS = IndexConfig()
SEARCH_DEFAULTS = SearchConfig()


def _split_dir(features: Path) -> Path:
    if (features / "manifest.json").is_file():
        return features
    splits = sorted(p.parent for p in features.glob("*/manifest.json"))
    if len(splits) == 1:
        return splits[0]
    found = ", ".join(p.name for p in splits) or "none"
    raise click.BadParameter(f"{features} is not a split directory (splits under it: {found}); pass one, e.g. {features}/test",
                             param_hint="--features")


@click.command(name="index")
@click.option("--features", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A features split (or a directory holding exactly one).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Index directory to write.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A run's best.pt: its head re-ranks the first stage's candidates. Without: CLIP cosines with meanP videos.")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Where the videos are (for the frame strips of --html); ids are paths under it, or the dataset's layout.")
@click.option("--model", help="The open_clip model-config JSON file of the extraction, when open_clip does not ship the model.")
@click.option("--first-stage", type=click.Choice(FIRST_STAGES), default=INDEX_DEFAULTS.first_stage, show_default=True,
              help="flat: exact inner product; ivf: inverted file (approximate); auto: flat up to 1M videos.")
@click.option("--nprobe", type=click.IntRange(1), default=INDEX_DEFAULTS.nprobe, show_default=True,
              help="IVF lists searched per query.")
def index(features, out, checkpoint, data_root, model, first_stage, nprobe):
    """Build a search index over the videos of a features split."""
    from tmass.search import SearchError, build_index, describe_encoder

    try:
        info = build_index(_split_dir(features), out, checkpoint, data_root, model, IndexConfig(first_stage, nprobe))
    except SearchError as exc:
        raise click.ClickException(str(exc)) from exc
    for warning in info["warnings"]:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    click.echo(f"{out}: {info['n_videos']} videos, encoder {describe_encoder(info['encoder'])}, "
               f"{'head ' + info['head']['name'] if info['head'] else 'no head (CLIP cosines)'}, first stage {info['first_stage']}; "
               f"query encoder {info['query_encoder_check']['status']}")


@click.command()
@click.argument("query", required=False)
@click.option("--index", "index_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--video", type=click.Path(dir_okay=False, path_type=Path),
              help="Search with a video file instead of text (its meanP embedding, cosine ranking).")
@click.option("--query-features", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Search with the captions of a features split made by the index's encoder.")
@click.option("--query-id", multiple=True, help="With --query-features: only these text ids (repeatable).")
@click.option("--top", type=click.IntRange(1), default=SEARCH_DEFAULTS.top, show_default=True)
@click.option("--candidates", "-k", type=click.IntRange(1), default=SEARCH_DEFAULTS.candidates, show_default=True,
              help="K: first-stage candidates the head re-ranks (>= the index size: exhaustive).")
@click.option("--shortlist", type=click.IntRange(1), default=SEARCH_DEFAULTS.shortlist, show_default=True,
              help="meanP first-stage depth, narrowed to K by best-frame similarity.")
@click.option("--trials", type=click.IntRange(0), help="T-MASS samples per pair (0: w/o sampling). [default: tmass eval's]")
@click.option("--seed", type=int, help="Seed of the keyed noise. [default: tmass eval's]")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Where the videos are, if not recorded in the index (for --html).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the hits as JSON.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a page with each hit's frame strip, and a PNG contact sheet beside it.")
@click.option("--device", default="cpu", show_default=True, help="Device of the query encoder and the head.")
def search(query, index_dir, video, query_features, query_id, top, candidates, shortlist, trials, seed, data_root, json_path,
           html_path, device):
    """Rank the indexed videos for a text QUERY (or --video FILE, or --query-features SPLIT)."""
    import time

    from tmass.evaluate.scores import EvalConfig
    from tmass.features.format import FeatureFormatError, load_split
    from tmass.search import SearchError, SearchIndex, write_html, write_json

    if sum(x is not None for x in (query, video, query_features)) != 1:
        raise click.UsageError("give exactly one of QUERY, --video FILE or --query-features SPLIT")
    given = {k: v for k, v in (("trials", trials), ("seed", seed)) if v is not None}
    scoring = EvalConfig(progress=False, device=device, **given)
    config = SearchConfig(top, candidates, shortlist, scoring)
    try:
        began = time.perf_counter()
        idx = SearchIndex.open(index_dir)
        start = time.perf_counter()
        if query_features is not None:
            kind = "features"
            split_dir = _split_dir(query_features)
            try:
                arrays = load_split(split_dir, text_tokens=False, patches=False)  # no search reads tokens
            except FeatureFormatError as exc:
                raise SearchError(f"{split_dir}: features fail validation: {exc.problems[0]}") from exc
            idx.check_features(split_dir)
            rows = list(range(len(arrays.text_ids)))
            if query_id:
                where = {t: i for i, t in enumerate(arrays.text_ids)}
                unknown = [q for q in query_id if q not in where]
                if unknown:
                    raise SearchError(f"--query-id {unknown[0]} is not a text id of {split_dir}")
                rows = [where[q] for q in query_id]
            embeddings = arrays.text_embeddings[rows]
            ids, labels = [arrays.text_ids[r] for r in rows], [arrays.captions[r] for r in rows]
        elif video is not None:
            kind = "video"
            idx.encoder(device)  # loaded before the clock starts: a server keeps it
            start = time.perf_counter()
            embeddings, ids, labels = idx.encode_video(video, device), [str(video)], [f"video {video}"]
        else:
            kind = "text"
            idx.encoder(device)
            start = time.perf_counter()
            embeddings, warning = idx.encode_text(query, device)
            if warning:
                click.secho(f"warning: {warning}", fg="yellow", err=True)
            ids, labels = [query], [query]
        encoded = time.perf_counter() - start
        rankings = idx.rank(embeddings, ids, labels, config, use_head=kind != "video")
    except SearchError as exc:
        raise click.ClickException(str(exc)) from exc

    click.echo(f"index {index_dir}: {idx.describe()}")
    if kind == "video":
        click.echo("video query: cosine of meanP embeddings (the head scores text queries only)")
    elif idx.head is not None:
        click.echo(f"head scored {min(candidates, len(idx.video_ids))} candidates (best frames of a meanP shortlist of "
                   f"{min(max(shortlist, candidates), len(idx.video_ids))}); trials {scoring.trials}, "
                   f"seed {scoring.seed}, noise {scoring.noise}")
    for ranking in rankings:
        click.echo(f"\nquery: {ranking.query}")
        for rank, (row, score) in enumerate(zip(ranking.rows, ranking.scores), 1):
            click.echo(f"{rank:5d}  {score:8.4f}  {idx.video_ids[row]}")
        s = ranking.seconds
        click.echo(f"time: {1000 * s['total']:.1f} ms (first stage {1000 * s['first_stage']:.1f}, "
                   f"best frames {1000 * s['narrow']:.1f}, head {1000 * s['head']:.1f})")
    click.echo(f"query {'read' if kind == 'features' else 'encoded'} in {1000 * encoded:.1f} ms; index and encoder "
               f"loaded in {start - began:.2f} s")
    if json_path:
        write_json(json_path, idx, rankings, config, kind)
        click.echo(f"hits written to {json_path}")
    if html_path:
        sheet, notes = write_html(html_path, idx, rankings, data_root)
        for note in notes:
            click.secho(f"note: {note}", fg="yellow", err=True)
        click.echo(f"page written to {html_path}, contact sheet {sheet}")
