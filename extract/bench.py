"""Extraction throughput: the whole pipeline against the model alone, same frames, same run.

    python -m tmass.extract.bench            # make bench-extract

Renders a set of demo clips (default 320x240, 10 s at 25 fps: MSR-VTT-like sizes), then
in one process, with one random-init encoder, alternates (ABBA order, ``--rounds`` times):

* **model alone**: the sampled frames, decoded and preprocessed up front (untimed), go
  through the image encoder batch by batch as extraction batches them, and the same
  captions through the text encoder: the model work extraction cannot avoid.
* **pipeline**: :func:`tmass.extract.runner.extract_split` on the same clips into a fresh
  directory: decoding in loader workers, encoding, writing shards and manifest; wall clock.

Both are frames/s (real frames sampled / seconds); their ratio is the share of the
model's speed that the whole extraction keeps (target >= 90 %). Alternating rounds and
taking medians keeps a busy neighbour on a shared machine from deciding the result.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click


def _decoded_batches(encoder, data, config) -> list:
    """The split's frames as extraction batches them, decoded and preprocessed."""
    from torch.utils.data import DataLoader

    from tmass.extract.runner import VideoFrames, collate_videos

    return list(DataLoader(VideoFrames(tuple(data.videos), config, encoder.preprocess),
                           batch_size=config.batch_size, collate_fn=collate_videos))


def _model_alone(encoder, batches: list, texts: list[str], chunk: int) -> tuple[float, float]:
    """Seconds of the image encoder over ``batches`` and of the text encoder over ``texts``."""
    tick = time.perf_counter()
    for batch in batches:
        encoder.encode_images(batch.pixels)
    images = time.perf_counter() - tick
    tick = time.perf_counter()
    for i in range(0, len(texts), chunk):
        encoder.encode_texts(texts[i:i + chunk])
    return images, time.perf_counter() - tick


def benchmark(videos: int, model: str, device: str, batch_size: int, num_frames: int, width: int, height: int,
              seconds: float, fps: int, rounds: int, workdir: Path) -> dict:
    import statistics

    import torch

    from tmass.extract.datasets import load_split
    from tmass.extract.demo import DemoSpec, render_demo
    from tmass.extract.encoder import get_encoder
    from tmass.extract.runner import ExtractConfig, extract_split, run_sequential

    spec = DemoSpec(n_train=0, n_test=videos, width=width, height=height, seconds=seconds, fps=fps)
    render_demo(workdir / "clips", spec)
    data = load_split("demo", workdir / "clips", "test")
    config = ExtractConfig(model=model, pretrained="none", num_frames=num_frames, batch_size=batch_size,
                           device=device, shard_size=videos)
    encoder = get_encoder(model, "none", device)
    encoder.encode_images(torch.zeros(batch_size, 3, encoder.image_size, encoder.image_size))  # warm-up

    batches = _decoded_batches(encoder, data, config)
    frames = sum(len(b.pixels) for b in batches)
    texts = [c.text for c in data.captions]
    model_fps, pipeline_fps, image_fps, stats = [], [], [], []
    for round_ in range(rounds):
        for step in ("model", "pipeline") if round_ % 2 == 0 else ("pipeline", "model"):
            if step == "model":
                images_s, texts_s = _model_alone(encoder, batches, texts, config.batch_size * config.num_frames)
                model_fps.append(frames / (images_s + texts_s))
                image_fps.append(frames / images_s)
            else:
                report = extract_split(data, config, workdir / f"features-{time.time_ns()}", encoder, run_sequential,
                                       progress=False)
                pipeline_fps.append(report.stats["frames"] / report.wall_s)
                stats.append({k: round(v, 2) for k, v in report.stats.items() if k.endswith("_s")} | {"wall_s": round(report.wall_s, 2)})
    ratios = [p / m for p, m in zip(pipeline_fps, model_fps)]
    return {
        "model": model, "device": encoder.device, "torch_threads": torch.get_num_threads(),
        "videos": videos, "frames": frames, "captions": len(data.captions),
        "clip": f"{width}x{height}, {seconds:g} s at {fps} fps", "batch_size": batch_size, "num_frames": num_frames,
        "rounds": rounds,
        "pipeline_frames_per_s": round(statistics.median(pipeline_fps), 2),
        "model_alone_frames_per_s": round(statistics.median(model_fps), 2),
        "image_encoder_alone_frames_per_s": round(statistics.median(image_fps), 2),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_per_round": [round(r, 3) for r in ratios],
        "model_alone_frames_per_s_per_round": [round(f, 2) for f in model_fps],
        "pipeline_frames_per_s_per_round": [round(f, 2) for f in pipeline_fps],
        "pipeline_stats_per_round": stats,
    }


@click.command()
@click.option("--videos", type=click.IntRange(1), default=24, show_default=True)
@click.option("--model", default="ViT-B-32", show_default=True, help="random init: no weights needed")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--num-frames", type=click.IntRange(1), default=12, show_default=True)
@click.option("--width", default=320, show_default=True)
@click.option("--height", default=240, show_default=True)
@click.option("--seconds", default=10.0, show_default=True)
@click.option("--fps", default=25, show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=4, show_default=True,
              help="Alternations of model-alone and pipeline runs (medians are reported).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where clips (kept, reused) and features go. [default: a temporary directory]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full result (every round) here.")
def main(videos, model, device, batch_size, num_frames, width, height, seconds, fps, rounds, workdir, json_path):
    """Frames/s of the whole extraction against the model alone on the same frames."""
    with tempfile.TemporaryDirectory() as tmp:
        result = benchmark(videos, model, device, batch_size, num_frames, width, height, seconds, fps, rounds,
                           workdir or Path(tmp))
    stats = result["pipeline_stats_per_round"][-1]
    click.echo(f"{result['model']} on {result['device']} ({result['torch_threads']} threads), {result['videos']} clips of "
               f"{result['clip']}, {result['num_frames']} frames each, medians of {result['rounds']} rounds:")
    click.echo(f"pipeline {result['pipeline_frames_per_s']} frames/s vs model alone "
               f"{result['model_alone_frames_per_s']} frames/s (image encoder alone "
               f"{result['image_encoder_alone_frames_per_s']}): {result['ratio']:.1%} kept")
    click.echo("last round, seconds: " + ", ".join(f"{k.removesuffix('_s')} {v}" for k, v in stats.items())
               + " (decode runs in loader workers, overlapped with the model)")
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
