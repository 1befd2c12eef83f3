"""Training speed on cached features: seconds per epoch of each head at a given batch size.

    python -m tmass.train.bench --features /tmp/sim-msrvtt-tok --head all --steps 500   # make bench-train

Times ``steps`` optimiser steps of the real training step (``Trainer.step``: batch
gather and float32 cast, forward, all loss terms, backward, clipping, AdamW, logging
scalars) over every (caption, video) pair of the train split, after a short warm-up, and
extrapolates to one epoch; ``--full-epoch`` times the whole epoch instead. ``--head``
takes one head, a comma list or ``all`` (every registered head, plugins included): they
are timed one after another in this process on the features loaded once, each line
saying whether its epoch meets :data:`EPOCH_TARGET_S`; a head whose token features the
split lacks is skipped with one line naming the extract option. ``--amp bf16`` and
``--compile`` time those training options (``TrainConfig.amp``, ``.compile``); the
figures name the device (GPU model, or CPU model and threads), and ``--json`` writes them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import click

from tmass.train.registry import head_names

WARMUP_STEPS = 20  # untimed: first-call allocations and kernel selection
# issue 14: an epoch of every head on simulated MSR-VTT within 3 minutes on the 2-core CPU machine
EPOCH_TARGET_S = 180


def skipped_heads(features: Path, heads: Iterable[str]) -> dict[str, str]:
    """The heads among ``heads`` that ``features/train`` cannot train (it lacks a token
    feature the head declares), each with the one-line reason naming the extract option;
    read from the manifest alone."""
    from tmass.features.format import read_manifest
    from tmass.train.heads.base import missing_tokens, unextracted
    from tmass.train.registry import head_spec

    split_dir = Path(features) / "train"
    meta = read_manifest(split_dir)[1]
    skipped = {}
    for head in heads:
        lacking = unextracted(meta, head_spec(head).features)
        if lacking:
            skipped[head] = str(missing_tokens(lacking[0], head, where=split_dir))
    return skipped


def bench(features: Path, heads: Sequence[str] = ("tmass",), steps: int = 500, batch_size: int = 32,
          device: str = "cpu", full_epoch: bool = False, pooling_path: str = "folded", amp: str = "off",
          compile: bool = False) -> Iterator[dict]:
    """Each head's figures in turn, as it is timed: seconds per step and per epoch (the
    epoch figure is extrapolated from ``steps`` timed steps unless ``full_epoch``) and
    whether the epoch meets :data:`EPOCH_TARGET_S`; a head the features cannot train
    (:func:`skipped_heads`) yields ``{"head", "skipped": reason}`` instead.

    The heads run one after another in this process on one copy of the split: the
    token features of simulated MSR-VTT take about 5 GB at peak, so a process per head
    would read and check them again for every head (or hold several copies if run at
    once), and sequential heads never contend with each other for the cores."""
    import torch

    from tmass.train.data import PairData, declared_only, load_declared
    from tmass.train.registry import head_spec
    from tmass.train.trainer import Trainer, TrainConfig, device_name, resolve_configs, resolve_device

    skipped = skipped_heads(features, heads)
    dev = resolve_device(device)
    arrays = None
    for head in heads:
        if head in skipped:
            yield {"head": head, "skipped": skipped[head]}
            continue
        if arrays is None:  # not read at all when every head is skipped; the tokens some timed head declares
            arrays = load_declared(Path(features) / "train",
                                   set().union(*(head_spec(h).features for h in heads if h not in skipped)))
        # each head is given the token features it declares, no more (see declared_only)
        data = PairData(declared_only(arrays, head_spec(head).features), dev)
        cfg = TrainConfig(epochs=1, batch_size=batch_size, device=device, pooling_path=pooling_path, amp=amp,
                          compile=compile)
        cfg, head_cfg = resolve_configs(cfg, head_spec(head).make_config(), arrays)
        trainer = Trainer(cfg, head_cfg, data, dev)
        if trainer.steps_per_epoch <= WARMUP_STEPS:
            raise ValueError(f"{features}: {trainer.steps_per_epoch} steps of batch {batch_size} in an epoch, "
                             f"fewer than the {WARMUP_STEPS} warm-up steps and one timed step; lower --batch-size")
        timed = (trainer.steps_per_epoch - WARMUP_STEPS if full_epoch
                 else min(steps, trainer.steps_per_epoch - WARMUP_STEPS))
        batches = trainer.epoch_batches(0)
        for _ in range(WARMUP_STEPS):
            trainer.step(next(batches))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        for _ in range(timed):
            trainer.step(next(batches))  # reading the step's record synchronises every step
        per_step = (time.perf_counter() - start) / timed
        per_epoch = per_step * trainer.steps_per_epoch
        yield {
            "head": head, "batch_size": batch_size, "amp": amp, "compile": compile,
            # X-Pool's pooling paths; None for a head without X-Pool pooling
            "pooling_path": pooling_path if "folded-xpool" in head_spec(head).fast_paths else None,
            "device": str(dev), "device_name": device_name(dev), "threads": torch.get_num_threads(),
            "pairs": len(trainer.data), "steps_per_epoch": trainer.steps_per_epoch, "timed_steps": timed,
            "seconds_per_step": per_step, "steps_per_second": 1 / per_step,
            "seconds_per_epoch": per_epoch, "extrapolated": not full_epoch,
            "target_seconds_per_epoch": EPOCH_TARGET_S, "meets_target": per_epoch <= EPOCH_TARGET_S,
        }
        del trainer  # its head and optimiser state go before the next head's are built


def bench_losses(features: Path, losses: list[str], head: str = "tmass", steps: int = 100, rounds: int = 5,
                 batch_size: int = 32, device: str = "cpu", full_epoch: bool = False) -> dict[str, float]:
    """Seconds per step of each loss in ``losses`` with ``head``, measured fairly on a
    shared machine: one process, one trainer per loss on the same batches, timed in
    ``rounds`` interleaved rounds of ``steps / rounds`` steps each (so a burst of load
    from elsewhere hits every loss alike), after a warm-up. ``full_epoch``: the rounds
    cover every step of the epoch after the warm-up."""
    import torch

    from tmass.train.data import PairData, load_declared
    from tmass.train.registry import head_spec
    from tmass.train.trainer import Trainer, TrainConfig, resolve_configs, resolve_device

    arrays = load_declared(Path(features) / "train", head_spec(head).features)
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


def _names(value: str, choices: Sequence[str], option: str, what: str) -> list[str]:
    """A comma list of ``choices`` (or ``all``: every one), or BadParameter naming ``option``."""
    names = list(choices) if value == "all" else [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise click.BadParameter(f"unknown {what} {unknown[0] if unknown else value!r}; choose from "
                                 f"{', '.join(choices)} (a comma list, or all)", param_hint=option)
    return names


def _line(r: dict) -> str:
    """One head's figures (or why it was skipped) in one line."""
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    how = f"extrapolated from {r['timed_steps']} steps" if r["extrapolated"] else "whole epoch timed"
    options = ", ".join(filter(None, (r["pooling_path"] and f"{r['pooling_path']} pooling",
                                      "bf16" if r["amp"] == "bf16" else "", "compiled" if r["compile"] else "")))
    verdict = "PASS" if r["meets_target"] else "MISS"
    return (f"{r['head']}{f' ({options})' if options else ''} batch {r['batch_size']} on {r['device_name']}: "
            f"{r['seconds_per_step'] * 1e3:.1f} ms/step, {r['steps_per_second']:.1f} steps/s, "
            f"{r['seconds_per_epoch']:.0f} s/epoch of {r['pairs']} pairs ({r['steps_per_epoch']} steps; {how}); "
            f"target {r['target_seconds_per_epoch']} s/epoch: {verdict}")


@click.command()
@click.option("--features", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--head", "heads", default="tmass", show_default=True,
              help=f"A registered head, a comma list of them, or all ({', '.join(head_names())}): timed one "
                   "after another in this process; a head whose token features FEATURES lacks is skipped.")
@click.option("--steps", type=click.IntRange(1), default=500, show_default=True, help="Timed steps (after a warm-up).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--full-epoch", is_flag=True, help="Time a whole epoch instead of extrapolating (with --losses: "
                                                  "every loss over the whole epoch, in interleaved rounds).")
@click.option("--pooling-path", type=click.Choice(["folded", "module"]), default="folded", show_default=True)
@click.option("--amp", type=click.Choice(["off", "bf16"]), default="off", show_default=True,
              help="bf16 autocast of the forward pass (TrainConfig.amp).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the loss computation (TrainConfig.compile).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the figures as JSON (one head: its figures; several: {\"heads\": [each head's]}).")
@click.option("--losses", default="", help="Comma list of registered losses (or 'all'): seconds per step of each, "
                                           "timed in interleaved rounds in this process, and the ratio to the first.")
def main(features, heads, steps, batch_size, device, full_epoch, pooling_path, amp, compile_, json_path, losses):
    """Print seconds per training epoch of each head of HEAD on FEATURES/train."""
    heads = _names(heads, head_names(), "--head", "head")
    if losses:
        from tmass.train.losses import loss_names

        if len(heads) > 1:
            raise click.BadParameter("--losses times the losses of one head; name one", param_hint="--head")
        head, names = heads[0], _names(losses, loss_names(), "--losses", "loss")
        try:
            times = bench_losses(features, names, head, steps, batch_size=batch_size, device=device,
                                 full_epoch=full_epoch)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        for name, per_step in times.items():
            click.echo(f"{head} batch {batch_size} loss {name}: {per_step * 1e3:.1f} ms/step, "
                       f"{per_step / times[names[0]]:.2f}x {names[0]}" + (" (whole epoch)" if full_epoch else ""))
        return
    from tmass.features.format import FeatureFormatError

    results = []
    try:
        skipped = skipped_heads(features, heads)
        if len(skipped) == len(heads):  # nothing to time: a user mistake, one line
            raise click.ClickException("; ".join(skipped.values()))
        for r in bench(features, heads, steps, batch_size, device, full_epoch, pooling_path, amp, compile_):
            click.echo(_line(r))
            results.append(r)
    except FeatureFormatError as exc:
        raise click.ClickException(exc.summary()) from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if json_path:
        json_path.write_text(json.dumps(results[0] if len(heads) == 1 else {"heads": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
