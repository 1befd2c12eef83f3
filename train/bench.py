"""Training speed on cached features: seconds per epoch of a head at a given batch size.

    python -m tmass.train.bench --features /tmp/sim-msrvtt --steps 500      # make bench-train

Times ``steps`` optimiser steps of the real training step (``Trainer.step``: batch
gather and float32 cast, forward, all loss terms, backward, clipping, AdamW, logging
scalars) over every (caption, video) pair of the train split, after a short warm-up, and
extrapolates to one epoch; ``--full-epoch`` times the whole epoch instead. ``--amp bf16``
and ``--compile`` time those training options (``TrainConfig.amp``, ``.compile``); the
figures name the device (GPU model, or CPU model and threads), and ``--json`` writes them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from tmass.train.registry import head_names

WARMUP_STEPS = 20  # untimed: first-call allocations and kernel selection


def bench(features: Path, head: str = "tmass", steps: int = 500, batch_size: int = 32,
          device: str = "cpu", full_epoch: bool = False, pooling_path: str = "folded", amp: str = "off",
          compile: bool = False) -> dict:
    """Measured seconds per step and per epoch (the epoch figure is extrapolated from
    ``steps`` timed steps unless ``full_epoch``)."""
    import torch

    from tmass.features.format import load_split
    from tmass.train.data import PairData
    from tmass.train.registry import head_spec
    from tmass.train.trainer import Trainer, TrainConfig, device_name, resolve_configs, resolve_device

    arrays = load_split(Path(features) / "train")
    cfg = TrainConfig(epochs=1, batch_size=batch_size, device=device, pooling_path=pooling_path, amp=amp,
                      compile=compile)
    cfg, head_cfg = resolve_configs(cfg, head_spec(head).make_config(), arrays)
    dev = resolve_device(device)
    trainer = Trainer(cfg, head_cfg, PairData(arrays, dev), dev)
    timed = trainer.steps_per_epoch - WARMUP_STEPS if full_epoch else min(steps, trainer.steps_per_epoch - WARMUP_STEPS)
    batches = trainer.epoch_batches(0)
    for _ in range(WARMUP_STEPS):
        trainer.step(next(batches))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for _ in range(timed):
        trainer.step(next(batches))  # reading the step's record synchronises every step
    seconds = time.perf_counter() - start
    per_step = seconds / timed
    return {
        "head": head, "pooling_path": pooling_path, "batch_size": batch_size, "amp": amp, "compile": compile,
        "device": str(dev), "device_name": device_name(dev), "threads": torch.get_num_threads(),
        "pairs": len(trainer.data), "steps_per_epoch": trainer.steps_per_epoch, "timed_steps": timed,
        "seconds_per_step": per_step, "steps_per_second": 1 / per_step,
        "seconds_per_epoch": per_step * trainer.steps_per_epoch, "extrapolated": not full_epoch,
    }


def bench_losses(features: Path, losses: list[str], head: str = "tmass", steps: int = 100, rounds: int = 5,
                 batch_size: int = 32, device: str = "cpu", full_epoch: bool = False) -> dict[str, float]:
    """Seconds per step of each loss in ``losses`` with ``head``, measured fairly on a
    shared machine: one process, one trainer per loss on the same batches, timed in
    ``rounds`` interleaved rounds of ``steps / rounds`` steps each (so a burst of load
    from elsewhere hits every loss alike), after a warm-up. ``full_epoch``: the rounds
    cover every step of the epoch after the warm-up."""
    import torch

    from tmass.features.format import load_split
    from tmass.train.data import PairData
    from tmass.train.registry import head_spec
    from tmass.train.trainer import Trainer, TrainConfig, resolve_configs, resolve_device

    arrays = load_split(Path(features) / "train")
    dev = resolve_device(device)
    data = PairData(arrays, dev)
    trainers = {}
    for loss in losses:
        cfg, head_cfg = resolve_configs(TrainConfig(epochs=1, batch_size=batch_size, device=device, loss=loss),
                                        head_spec(head).make_config(), arrays)
        trainers[loss] = Trainer(cfg, head_cfg, data, dev)
    steps_per_epoch = next(iter(trainers.values())).steps_per_epoch
    per_round = (steps_per_epoch - WARMUP_STEPS) // rounds if full_epoch else max(1, steps // rounds)
    if per_round < 1 or WARMUP_STEPS + rounds * per_round > steps_per_epoch:
        raise ValueError(f"{features}: fewer than {WARMUP_STEPS + rounds * per_round} steps in an epoch")
    batches = list(next(iter(trainers.values())).epoch_batches(0))  # the same batches for every loss
    for trainer in trainers.values():
        for rows in batches[:WARMUP_STEPS]:
            trainer.step(rows)
    seconds = dict.fromkeys(losses, 0.0)
    for r in range(rounds):
        chunk = batches[WARMUP_STEPS + r * per_round : WARMUP_STEPS + (r + 1) * per_round]
        for loss, trainer in trainers.items():
            start = time.perf_counter()
            for rows in chunk:
                trainer.step(rows)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds[loss] += time.perf_counter() - start
    return {loss: total / (rounds * per_round) for loss, total in seconds.items()}


@click.command()
@click.option("--features", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--head", type=click.Choice(head_names()), default="tmass", show_default=True)
@click.option("--steps", type=int, default=500, show_default=True, help="Timed steps (after a warm-up).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--full-epoch", is_flag=True, help="Time a whole epoch instead of extrapolating (with --losses: "
                                                  "every loss over the whole epoch, in interleaved rounds).")
@click.option("--pooling-path", type=click.Choice(["folded", "module"]), default="folded", show_default=True)
@click.option("--amp", type=click.Choice(["off", "bf16"]), default="off", show_default=True,
              help="bf16 autocast of the forward pass (TrainConfig.amp).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the loss computation (TrainConfig.compile).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the figures as JSON.")
@click.option("--losses", default="", help="Comma list of registered losses (or 'all'): seconds per step of each, "
                                           "timed in interleaved rounds in this process, and the ratio to the first.")
def main(features, head, steps, batch_size, device, full_epoch, pooling_path, amp, compile_, json_path, losses):
    """Print seconds per training epoch of HEAD on FEATURES/train."""
    if losses:
        from tmass.train.losses import loss_names

        names = list(loss_names()) if losses == "all" else [n.strip() for n in losses.split(",") if n.strip()]
        unknown = [n for n in names if n not in loss_names()]
        if unknown:
            raise click.BadParameter(f"unknown loss {unknown[0]!r}; choose from {', '.join(loss_names())}",
                                     param_hint="--losses")
        try:
            times = bench_losses(features, names, head, steps, batch_size=batch_size, device=device,
                                 full_epoch=full_epoch)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        for name, per_step in times.items():
            click.echo(f"{head} batch {batch_size} loss {name}: {per_step * 1e3:.1f} ms/step, "
                       f"{per_step / times[names[0]]:.2f}x {names[0]}" + (" (whole epoch)" if full_epoch else ""))
        return
    r = bench(features, head, steps, batch_size, device, full_epoch, pooling_path, amp, compile_)
    how = f"extrapolated from {r['timed_steps']} steps" if r["extrapolated"] else "whole epoch timed"
    if json_path:
        json_path.write_text(json.dumps(r, indent=2) + "\n")
    options = "".join((", bf16" if amp == "bf16" else "", ", compiled" if compile_ else ""))
    click.echo(
        f"{r['head']} ({r['pooling_path']} pooling{options}) batch {r['batch_size']} on {r['device_name']}: "
        f"{r['seconds_per_step'] * 1e3:.1f} ms/step, {r['steps_per_second']:.1f} steps/s, "
        f"{r['seconds_per_epoch']:.0f} s/epoch of {r['pairs']} pairs ({r['steps_per_epoch']} steps; {how})"
    )


if __name__ == "__main__":
    main()
