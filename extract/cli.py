"""``tmass extract``: videos -> frozen CLIP frame and caption embeddings -> feature shards."""

from __future__ import annotations

import logging
import sys
from contextlib import nullcontext
from pathlib import Path

import click

from tmass.extract.datasets import ADAPTERS, CHARADES_FIELDS, DATASET_SPLITS, SPLITS
from tmass.extract.runner import ExtractConfig
from tmass.extract.video import SAMPLING_MODES

DEFAULTS = ExtractConfig()  # the papers' protocol; one source for options and config

EXIT_SKIPPED = 3  # finished, but some inputs were skipped (listed in the manifest's `failed`)


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear the progress bars."""

    def emit(self, record):
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _batch_size(ctx, param, value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"{value!r} is neither a positive whole number of videos nor 'auto'")
    return int(value)


def _gpu_workers(device: str) -> int:
    """One local dask worker per visible GPU when ``device`` resolves to CUDA and there
    are several; else 0 (this process; one GPU needs no cluster)."""
    if device not in ("auto", "cuda"):
        return 0
    import torch

    count = torch.cuda.device_count()
    return count if count > 1 else 0


@click.command()
@click.option("--dataset", type=click.Choice(list(ADAPTERS)), default=DEFAULTS.dataset, show_default=True,
              help="Annotation format to read (see tmass.extract.datasets for each layout).")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Dataset directory. [default: data/<dataset>; the demo renders itself there]")
@click.option("--split", type=click.Choice([*SPLITS, "all"]), default="all", show_default=True,
              help="all: every split the dataset has (folder: its one split, named all).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Features root: writes OUT/<dataset>/<model>__<weights>/<split>/.")
@click.option("--model", default=DEFAULTS.model, show_default=True,
              help="open_clip architecture (ViT-B-16 is the paper's second backbone) or a model-config JSON file.")
@click.option("--pretrained", default=DEFAULTS.pretrained, show_default=True,
              help="open_clip pretrained tag, local checkpoint path, 'none' (random init) or 'auto' (demo only).")
@click.option("--num-frames", type=click.IntRange(1), default=DEFAULTS.num_frames, show_default=True)
@click.option("--sampling", type=click.Choice(SAMPLING_MODES), default=DEFAULTS.sampling, show_default=True,
              help="Segment middles (the papers' protocol) or a random frame per segment.")
@click.option("--batch-size", default=str(DEFAULTS.batch_size), show_default=True, callback=_batch_size, metavar="N|auto",
              help="Videos per image-encoder batch (each contributes --num-frames images), or auto: on CUDA "
                   "as many as fit in half the GPU's free memory by the model's activation size (at most 64), "
                   "on the CPU 16.")
@click.option("--shard-size", type=click.IntRange(1), default=DEFAULTS.shard_size, show_default=True,
              help="Videos per partition (one shard pair each; the unit of resuming and of dask tasks).")
@click.option("--workers", type=click.IntRange(0), default=None,
              help="Start a local dask cluster of N worker processes (0: run in this process); worker i uses "
                   "GPU i mod n_gpus. [default: one per visible GPU where --device resolves to CUDA and there "
                   "are several, else 0]")
@click.option("--scheduler", default=None, help="Join an existing dask cluster at this address instead.")
@click.option("--device", default=DEFAULTS.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--loader-workers", type=click.IntRange(0), default=None,
              help="Decode processes per runner. [default: cores - 1, at most 8]")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True,
              help="Seeds random frame sampling and random-init weights.")
@click.option("--caption-field", type=click.Choice(CHARADES_FIELDS), default=None,
              help="charades only: the column used as caption. [default: script]")
@click.option("--text-tokens", is_flag=True,
              help="Also store every caption token in the joint space (token_embedding, token_mask) for token-level heads.")
@click.option("--patch-grid", type=click.IntRange(0), default=DEFAULTS.patch_grid, show_default=True,
              help="G > 0: also store each frame's patch tokens average-pooled to a G x G grid (patch_embedding).")
@click.option("--overwrite", is_flag=True,
              help="Replace split directories that hold features made otherwise, each as a whole.")
@click.option("-v", "--verbose", is_flag=True, help="Log per-batch timings to the console too.")
def extract(dataset, data_root, split, out, model, pretrained, num_frames, sampling, batch_size, shard_size,
            workers, scheduler, device, loader_workers, seed, caption_field, text_tokens, patch_grid, overwrite, verbose):
    """Encode a dataset's videos and captions with a frozen open_clip model.

    Re-running the same command resumes: complete partitions are kept, the rest is
    extracted. A split directory holding features made otherwise (other model, weights,
    checkpoint contents, frames, preprocessing, or simulated) is refused untouched;
    --overwrite replaces it. Unreadable videos and unusable captions are skipped and listed in the
    manifest's `failed`. Exit status: 0 all inputs encoded, 3 some were skipped, 1 error.
    Each split directory also gets extract-config.json and extract.log (per-batch timings).
    """
    from tmass.extract.datasets import LayoutError, load_split
    from tmass.extract.encoder import AUTO, EncoderError, get_encoder
    from tmass.extract.runner import check_out, dask_distributor, extract_split, run_sequential, share_cores
    from tmass.features.format import FeatureWriteError, SplitDirError

    log = logging.getLogger("tmass.extract")
    log.setLevel(logging.DEBUG)
    log.propagate = False  # open_clip's bare logging.warning() configures the root logger
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        log.addHandler(handler)
    for handler in log.handlers:
        if isinstance(handler, _TqdmHandler):
            handler.setLevel(logging.DEBUG if verbose else logging.INFO)

    if workers and scheduler:
        raise click.UsageError("--workers starts a local cluster and --scheduler joins a running one; give one of them")
    if workers is None:
        workers = 0 if scheduler else _gpu_workers(device)
    if pretrained == AUTO and dataset != "demo":
        raise click.UsageError("--pretrained auto is for the demo only: real datasets need an explicit choice of weights")
    data_root = data_root or Path("data") / dataset
    config = ExtractConfig(dataset=dataset, model=model, pretrained=pretrained, num_frames=num_frames,
                           sampling=sampling, seed=seed, shard_size=shard_size, caption_field=caption_field,
                           batch_size=batch_size, device=device, loader_workers=loader_workers,
                           text_tokens=text_tokens, patch_grid=patch_grid)
    distributed = bool(workers or scheduler)
    try:
        # the encoder first: weights that cannot load are said before the demo is rendered
        # or a dataset is indexed. The driver's copy only supplies metadata when dask
        # workers do the encoding.
        encoder = get_encoder(model, pretrained, "cpu" if distributed else device, seed)
        encoder.token_support(text_tokens, patch_grid)
        names = DATASET_SPLITS[dataset] if split == "all" else [split]
        splits = [load_split(dataset, data_root, s, caption_field) for s in names]
        if not overwrite:
            check_out(splits, config, out, encoder)
    except (LayoutError, EncoderError, ValueError, SplitDirError) as exc:
        raise click.ClickException(str(exc)) from exc

    reports = []
    try:
        with dask_distributor(workers, scheduler) if distributed else nullcontext(run_sequential) as distributor:
            for data in splits:
                reports.append(extract_split(data, share_cores(config, workers), out, encoder, distributor,
                                             overwrite=overwrite))
    except (SplitDirError, FeatureWriteError, EncoderError) as exc:
        raise click.ClickException(str(exc)) from exc

    for report in reports:
        click.echo(str(report.split_dir))
    if any(report.failed for report in reports):
        raise SystemExit(EXIT_SKIPPED)
