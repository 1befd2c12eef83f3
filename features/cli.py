"""``tmass features``: inspect, validate and simulate feature directories."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def features():
    """Inspect, validate and simulate feature shards."""


def _splits_or_fail(directory: Path) -> list[Path]:
    from tmass.features.format import find_splits

    splits = find_splits(directory)
    if not splits:
        raise click.ClickException(f"{directory}: no manifest.json at or below this directory")
    return splits


@features.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
def info(directory: Path):
    """Print what every split at or below DIRECTORY holds."""
    import json

    from tmass.features.format import FeatureMeta

    for split_dir in _splits_or_fail(directory):
        manifest = json.loads((split_dir / "manifest.json").read_text())
        meta = manifest["meta"]
        counts = manifest["counts"]
        click.secho(f"{split_dir}", bold=True)
        click.echo(f"  dataset {meta['dataset']}  split {meta['split']}  source {meta.get('source')}")
        weights = meta["pretrained"] + (f" (sha256 {meta['checkpoint_sha256'][:12]})" if meta.get("checkpoint_sha256") else "")
        click.echo(f"  model {meta['model']}  weights {weights}  logit scale {meta['logit_scale']:g}")
        click.echo(f"  encoder: {FeatureMeta.from_json(meta).encoder_label()}")
        if meta.get("random_init"):
            click.secho("  RANDOM-INIT ENCODER: these features carry no pretrained knowledge", fg="red")
        click.echo(
            f"  {counts['videos']} videos x {meta['num_frames']} frames ({meta['frame_sampling']}), "
            f"{counts['texts']} captions, dim {meta['embed_dim']}"
            + (f", image size {meta['image_size']}" if meta.get("image_size") else "")
        )
        if meta.get("text_tokens"):
            click.echo("  token-level text: token_embedding [n_text, n_token, dim] with token_mask")
        if meta.get("patch_grid"):
            grid = meta["patch_grid"]
            click.echo(f"  patch tokens: patch_embedding on a {grid}x{grid} grid, [n_video, {meta['num_frames']}, {grid * grid}, {meta['embed_dim']}]")
        size = sum(s["bytes"] for s in manifest["shards"]) / 2**20
        click.echo(f"  {len(manifest['shards'])} shards, {size:.1f} MiB, format {manifest['format_version']}, written by tmass {manifest['software_version']}")
        if manifest["failed"]:
            click.secho(f"  {len(manifest['failed'])} inputs skipped at extraction (see manifest 'failed')", fg="yellow")


@features.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
def check(directory: Path):
    """Validate every split at or below DIRECTORY: manifest against shards, checksums,
    shapes, ids, NaN/inf rows. Exits 1 on any fault, naming the file."""
    from tmass.features.format import check_split

    faults = 0
    for split_dir in _splits_or_fail(directory):
        problems = check_split(split_dir)
        if problems:
            faults += len(problems)
            click.secho(f"FAIL {split_dir}", fg="red", err=True)
            for problem in problems:
                click.echo(f"  {problem}", err=True)
        else:
            click.secho(f"ok   {split_dir}", fg="green")
    if faults:
        raise SystemExit(1)


@features.command()
@click.option("--preset", type=click.Choice(["tiny", "msrvtt", "vatex", "random"]), default="tiny", show_default=True,
              help="Shapes and generator settings (see tmass.features.simulate).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Features directory to write; receives train/ and test/ splits.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True,
              help="Replace splits under OUT that hold features made otherwise (extracted, another preset or seed).")
@click.option("--text-tokens", is_flag=True, help="Also write word tokens (token_embedding, token_mask).")
@click.option("--patch-grid", type=click.IntRange(0), default=0, show_default=True,
              help="G > 0: also write patch tokens on a G x G grid (patch_embedding).")
def simulate(preset: str, out: Path, seed: int, overwrite: bool, text_tokens: bool, patch_grid: int):
    """Write simulated train and test splits in the shard format, without CLIP.

    Re-running the same command resumes an interrupted run or leaves complete splits as
    they are; a split directory holding other features is refused untouched."""
    from tmass.features.format import FeatureWriteError, SplitDirError
    from tmass.features.simulate import simulate as run

    try:
        written = run(preset, out, seed, overwrite=overwrite, text_tokens=text_tokens, patch_grid=patch_grid)
    except (SplitDirError, FeatureWriteError) as exc:
        raise click.ClickException(str(exc)) from None
    for split, path in written.items():
        click.echo(f"{split}: {path}")
