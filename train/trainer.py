"""Train a head on cached features: config, schedule, one step, checkpoints, the run.

Read top to bottom:

1. ``lr_at``: the learning rate of step s, a pure function (cosine with linear warm-up).
2. ``TrainConfig``: every training setting, defaults from the paper (section 4.1).
3. ``Trainer``: head + AdamW + noise generator; ``step(rows)`` is one optimiser step.
4. checkpoints: ``last.pt`` (everything needed to resume bit-exactly) and ``best.pt``.
5. ``train``: the run: data, validation hold-out, loop, logs, selection, final metrics.

A run directory holds ``config.json`` (resolved configs, features and their manifest
hashes, software version, selection label), ``log.jsonl`` (one record per step, plus
validation records), ``train.log`` (a line per epoch), ``last.pt``, ``best.pt`` and
``metrics.json``.

Determinism: the head starts from a fixed (identity) init; dropout draws from torch's
global generator, seeded with ``seed``; the stochastic text from its own generator; the
pair order of epoch e from a generator seeded by (seed, e). All three are in ``last.pt``,
so on CPU a resumed run ends with the same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tmass import __version__
from tmass.features.format import SplitArrays, features_identity, identity_mismatch, read_manifest
from tmass.train.config import check_choices, setting
from tmass.train.data import PairData, epoch_order, load_declared, split_validation
from tmass.train.heads import RetrievalHead
from tmass.train.heads.base import require_extracted
from tmass.train.losses import (
    DEFAULT_LOSS, LOSS_TERMS, POOLING_PATHS, SUPPORT_VIDEOS, batch_losses, build_loss, loss_names, parse_loss_terms,
)
from tmass.train.registry import build_head, config_from_dict, head_spec
from tmass.train.runs import lock_run, mark_run

AMP_MODES = ("off", "bf16")
CHECKPOINT_VERSION = 1
SELECTION_LABELS = {
    "val": "validation: {fraction:g} of the train split's videos held out",
    "test": "test-split (optimistic)",
    "none": "none: no validation, best = last",
}
RUN_FILES = ("config.json", "log.jsonl", "train.log", "last.pt", "best.pt", "metrics.json")
# Parameters AdamW does not decay. Decaying the log logit scale pulls the scale towards
# 1: with it decayed, a 5-epoch T-MASS run at lr 3e-5 on simulated MSR-VTT ended with a
# scale of 66 instead of CLIP's 100. The reference trains it with CLIP's weights at lr
# 1e-6, where the decay is negligible; open_clip excludes it from decay.
NO_DECAY = ("log_logit_scale",)


# ----------------------------------------------------------------------------- schedule


def lr_at(step: int, total: int, base_lr: float, warmup_fraction: float = 0.1) -> float:
    """Learning rate of optimiser step ``step`` (0-based) out of ``total``.

    Linear warm-up from 0 over the first ``int(warmup_fraction * total)`` steps, then a
    half cosine from ``base_lr`` to 0 at ``total``: CLIP's schedule, as X-Pool and T-MASS
    use it (Hugging Face's ``get_cosine_schedule_with_warmup``, step for step)."""
    warmup = int(warmup_fraction * total)
    if step < warmup:
        return base_lr * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """How to train. Defaults are the paper's settings (ViT-B/32, all datasets but the
    learning rate of MSR-VTT, which is 3e-5 in the reference)."""

    epochs: int = setting(5, bounds="[0, inf)", help="Passes over the training pairs; 0 writes the initial model (baselines, audits).")
    max_steps: int = setting(
        0, bounds="[0, inf)",
        help="Stop after this many optimiser steps (0: the epochs decide): the same pairs and batches as the epochs' "
             "first steps, the warm-up and cosine schedule spanning these steps, validation also at the last one. "
             "--epochs must hold them (an error says how many epochs they need).")
    batch_size: int = setting(32, bounds="[2, inf)", help="Caption-video pairs per optimiser step (at least 2: a contrastive batch needs negatives).")
    lr: float = setting(1e-5, bounds="(0, inf)", help="Peak learning rate (the reference uses 3e-5 on MSR-VTT).")
    weight_decay: float = setting(0.2, bounds="[0, inf)", help="AdamW weight decay, on every parameter but the logit scale.")
    warmup_fraction: float = setting(0.1, bounds="[0, 1]", help="Fraction of the steps with a linear warm-up before the cosine decay.")
    grad_clip: float = setting(1.0, bounds="[0, inf)", help="Max gradient norm; 0 disables clipping.")
    seed: int = setting(0, help="Seeds the pair order, dropout and the stochastic text.")
    loss: str = setting(DEFAULT_LOSS, choices=loss_names, help="Loss applied to each loss term (the loss registry).")
    loss_options: dict = setting({}, cli=False, help="The loss's config fields; resolved to all of them.")
    loss_terms: tuple[str, ...] = setting(
        (), choices=LOSS_TERMS, help="Table 6's text variants the loss is applied to: ce (t), s (stochastic t_s), "
                                     "sup (support text); empty: the head's default (ce; s,sup for tmass).")
    support_weight: float = setting(0.8, bounds="[0, inf)", help="alpha of Eq. 9, the weight of the sup term.")
    support_video: str = setting(
        "paired", choices=SUPPORT_VIDEOS, help="Video of the support text: the video pooled on its own caption, "
                                               "or (the reference) averaged over the batch's captions.")
    pooling_path: str = setting(
        "folded", choices=POOLING_PATHS,
        help="X-Pool pooling at train time: frame-wise folded (fast, the same function) or the head's module.")
    val_fraction: float = setting(
        0.05, bounds="[0, 1)", help="Train-split videos held out (with their captions) to select best.pt; 0: best = last.")
    val_trials: int = setting(0, bounds="[0, inf)", help="T-MASS sampling trials when validating (0: the deterministic t, fast).")
    val_every: int = setting(0, bounds="[0, inf)", help="Steps between validations; 0: at the end of each epoch.")
    select_on: str = setting(
        "val", choices=("val", "test"),
        help="Select best.pt on the test split instead: optimistic, and labelled so everywhere.")
    eval_trials: int = setting(20, bounds="[0, inf)", help="T-MASS trials for the final test metrics (the paper's M).")
    final_eval: bool = setting(True, help="Evaluate best.pt on the test split at the end.")
    checkpoint_every: int = setting(1000, bounds="[1, inf)", help="Steps between writes of last.pt (also at each epoch end).")
    device: str = setting("auto", help="auto | cpu | cuda[:N]; not part of a run's identity.")
    amp: str = setting("off", choices=AMP_MODES,
                       help="Mixed precision of the forward pass: bf16 autocast (GPUs with bfloat16, recent CPUs) "
                            "or off (float32).")
    compile: bool = setting(False, help="torch.compile the loss computation (a GPU may gain after a compile of "
                                        "about a minute; on a CPU it does not pay); not part of a run's identity.")

    def __post_init__(self):
        self.loss_terms = tuple(self.loss_terms)
        check_choices(self)

    @property
    def selection(self) -> str:
        """The label every output of the run carries: what ``best.pt`` was selected on."""
        if self.select_on == "test":
            return SELECTION_LABELS["test"]
        if self.val_fraction == 0:
            return SELECTION_LABELS["none"]
        return SELECTION_LABELS["val"].format(fraction=self.val_fraction)

    def identity(self) -> dict:
        """The settings that determine the trained weights (``device`` and ``compile`` excluded)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "compile")}

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        """A saved config, with its loss's settings resolved as ``resolve_configs`` does (a
        run saved before the loss registry names none: InfoNCE's defaults, as it trained)."""
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        return dataclasses.replace(cfg, loss_options=dataclasses.asdict(build_loss(cfg.loss, cfg.loss_options).cfg))


def resolve_configs(cfg: TrainConfig, head_cfg: Any, arrays: SplitArrays) -> tuple[TrainConfig, Any]:
    """Fill in what the features and the head decide: loss terms (head default, checked
    against the head), every field of the loss's config (so a run's config.json names
    all of them), and the head's width, frame count and initial logit scale (from the
    features manifest)."""
    loss_options = dataclasses.asdict(build_loss(cfg.loss, cfg.loss_options).cfg)
    cfg = dataclasses.replace(cfg, loss_terms=parse_loss_terms(cfg.loss_terms, head_cfg.head), loss_options=loss_options)
    meta = arrays.meta
    head_cfg = dataclasses.replace(
        head_cfg, embed_dim=meta.embed_dim, num_frames=meta.num_frames, logit_scale=float(meta.logit_scale)
    )
    return cfg, head_cfg


# ----------------------------------------------------------------------------- one step


class Trainer:
    """A head, its AdamW optimiser and the generators of one run; ``step`` trains on a
    batch of caption rows. Holds no file: checkpoints are the caller's business."""

    def __init__(self, cfg: TrainConfig, head_cfg: Any, data: PairData, device: torch.device):
        self.cfg = cfg
        self.data = data
        self.device = device
        torch.manual_seed(cfg.seed)  # dropout draws from the global generator
        self.head = build_head(head_cfg).to(device)
        params = dict(self.head.named_parameters())
        groups = [
            {"params": [p for name, p in params.items() if name not in NO_DECAY]},
            {"params": [p for name, p in params.items() if name in NO_DECAY], "weight_decay": 0.0},
        ]
        # fused: one kernel per tensor; the per-op loop took a tenth of a CPU step. A resumed
        # checkpoint keeps the implementation it was saved with (load_state_dict restores it)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.noise = torch.Generator(device=device).manual_seed(cfg.seed)  # stochastic text
        self.loss = build_loss(cfg.loss, cfg.loss_options)
        self.loss.prepare(data.text_ids, data.video_ids)
        self.steps_per_epoch = len(data) // cfg.batch_size  # the last, incomplete batch is dropped
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(data)} training pairs are fewer than one batch of {cfg.batch_size}")
        if cfg.max_steps > cfg.epochs * self.steps_per_epoch:
            raise ValueError(f"--max-steps {cfg.max_steps} needs {-(-cfg.max_steps // self.steps_per_epoch)} epochs of "
                             f"{self.steps_per_epoch} steps, --epochs is {cfg.epochs}: raise --epochs or lower --max-steps")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch  # the schedule spans these
        self.epochs = -(-self.total_steps // self.steps_per_epoch)  # those it enters; the last may end early
        self.step_count = 0  # optimiser steps done
        self.losses = torch.compile(batch_losses) if cfg.compile else batch_losses

    def epoch_batches(self, epoch: int, start: int = 0, stop: int | None = None):
        """Caption rows of batches ``start .. stop`` (default: the epoch's end) of epoch
        ``epoch``, each ``[batch_size]``, on the data's device (the epoch's order is moved
        there once). A shorter run takes the same batches, fewer of them."""
        order = epoch_order(len(self.data), self.cfg.seed, epoch).to(self.data.device)
        size = self.cfg.batch_size
        for i in range(start, self.steps_per_epoch if stop is None else stop):
            yield order[i * size : (i + 1) * size]

    def step(self, rows: torch.Tensor) -> dict:
        """One optimiser step on the pairs of caption ``rows``; returns the log record.
        Reading the record's numbers to the host is the step's one synchronisation."""
        lr = lr_at(self.step_count, self.total_steps, self.cfg.lr, self.cfg.warmup_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp == "bf16"):
            losses = self.losses(
                self.head, self.data.batch(rows), self.loss, self.cfg.loss_terms,
                self.cfg.support_weight, self.cfg.support_video, self.noise, self.cfg.pooling_path,
            )
        self.optimizer.zero_grad(set_to_none=True)
        # meanP's only weight is the logit scale: a loss on cosines alone (triplet-hn and
        # the like) reaches no weight of it, and the run keeps the untrained model
        if losses["total"].requires_grad:
            losses["total"].backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.head.cap_logit_scale_()
        self.step_count += 1
        record = {"step": self.step_count, "epoch": (self.step_count - 1) // self.steps_per_epoch, "lr": lr}
        values = torch.stack([*(v.detach().float() for v in losses.values()), self.head.logit_scale().detach()])
        record.update(zip([*losses, "logit_scale"], values.tolist()))
        return record

    def rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "noise": self.noise.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        self.noise.set_state(state["noise"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)


# ----------------------------------------------------------------------------- checkpoints


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)``, then rename: a file with its final name is always complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def save_checkpoint(path: Path, trainer: Trainer, run: dict, full: bool) -> None:
    """``run``: features hashes, selection, best-so-far, ...; ``full`` adds what resuming
    needs (optimiser, generators)."""
    checkpoint = {
        "version": CHECKPOINT_VERSION,
        "software_version": __version__,
        "state_dict": trainer.head.state_dict(),
        "head_config": dataclasses.asdict(trainer.head.cfg),
        "train_config": dataclasses.asdict(trainer.cfg),
        "step": trainer.step_count,
        "epoch": trainer.step_count // trainer.steps_per_epoch,  # epochs completed
        **run,
    }
    if full:
        checkpoint["optimizer"] = trainer.optimizer.state_dict()
        checkpoint["rng"] = trainer.rng_state()
    _atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[RetrievalHead, dict]:
    """A trained head (eval mode) and the checkpoint's other entries, from ``best.pt`` or
    ``last.pt`` of a run. The head is rebuilt through the registry from the stored
    ``head_config`` (its ``head`` field names the registered head)."""
    checkpoint = read_checkpoint(path, device)
    head = build_head(config_from_dict(checkpoint["head_config"])).to(device)
    try:
        head.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:  # shapes or names that the registered head no longer has
        raise ValueError(f"its weights do not fit head {checkpoint['head_config'].get('head')!r}: "
                         f"{str(exc).splitlines()[0]}") from None
    return head.eval(), checkpoint


def read_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict:
    """A tmass checkpoint's entries; ValueError saying in one line what the file is
    instead (empty, truncated or corrupt, or something other than a tmass checkpoint)."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError("an empty file, not a checkpoint (was its writer killed? use the run's other .pt)")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"not a readable checkpoint (truncated or corrupt: {reason[:120]})") from None
    missing = [key for key in ("head_config", "state_dict") if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(f"not a tmass checkpoint (no {' or '.join(missing)}); pass a run's best.pt or last.pt")
    return checkpoint


# ----------------------------------------------------------------------------- the run


# (head, split, trials, seed, device) -> retrieval metrics, e.g. {"t2v": {"R1": ...}, ...}:
# validation and the final test metrics. Handed in by the caller (the tmass CLI and
# sweeps pass tmass.evaluate.split_metrics, the leak-free evaluator): train/ sits below
# evaluate/ and never imports it.
Evaluator = Callable[[RetrievalHead, SplitArrays, int, int, str], dict]


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU; otherwise the named device, which
    must exist here (ValueError saying what is there instead, before any work)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"{name}: torch sees no CUDA GPU on this machine; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name}: torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        raise ValueError(f"{name}: tmass runs on cpu or cuda[:N]")
    return device


def device_name(device: torch.device | str) -> str:
    """The device in words, for benchmark figures: ``cuda:0 (NVIDIA H200)`` or
    ``cpu (<CPU model>, N torch threads)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:  # not Linux
        pass
    return f"cpu ({model}, {torch.get_num_threads()} torch threads)"


def _evaluate(evaluate: Evaluator, head: RetrievalHead, arrays: SplitArrays, trials: int, seed: int,
              device: torch.device) -> dict:
    """``evaluate``'s metrics of ``head`` on a split, leaving the training state as it
    was: train/eval mode, every random generator and torch's CPU thread count (the
    evaluator's numba kernels share torch's OpenMP runtime and set its thread count to
    theirs, which would silently undo ``OMP_NUM_THREADS`` or ``torch.set_num_threads``)."""
    was_training, threads = head.training, torch.get_num_threads()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            head.eval()
            return evaluate(head, arrays, trials, seed, str(device))
    finally:
        head.train(was_training)
        torch.set_num_threads(threads)


class _RunLog:
    """``log.jsonl`` (machine) and ``train.log`` (human) of a run, appended line by line."""

    def __init__(self, out: Path, resume_step: int | None):
        self.jsonl_path, self.text_path = out / "log.jsonl", out / "train.log"
        if resume_step is not None and self.jsonl_path.exists():
            # Drop what was logged after the checkpoint we resume from: it will be redone.
            kept = [line for line in self.jsonl_path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
            _atomic_write(self.jsonl_path, lambda tmp: tmp.write_text("".join(k + "\n" for k in kept)))
        self.jsonl = open(self.jsonl_path, "a")
        self.text = open(self.text_path, "a")

    def record(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def say(self, line: str) -> None:
        self.text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self.text.flush()

    def close(self) -> None:
        self.jsonl.close()
        self.text.close()


def _r1(metrics: dict) -> float:
    return float(metrics["t2v"]["R1"])


def steps_in_words(steps: int, steps_per_epoch: int) -> str:
    """``1,000 steps (0.18 epoch)``: optimiser steps and the epochs they make."""
    epochs = steps / steps_per_epoch
    shown = f"{epochs:.2f}".rstrip("0").rstrip(".") if epochs >= 0.01 or epochs == 0 else f"{epochs:.1g}"
    return f"{steps:,} step{'s' * (steps != 1)} ({shown} epoch{'s' * (epochs == 0 or epochs > 1)})"


def _chosen(best: dict | None, trainer: Trainer) -> str:
    """Which state best.pt holds and what chose it, in one sentence (train.log, metrics.json)."""
    selection = trainer.cfg.selection
    if best is None:
        return f"best.pt is the last state ({selection})"
    where = f"{best['captions']} captions x {best['videos']} videos" if "captions" in best else best["split"]
    return (f"best.pt is the state after {steps_in_words(best['step'], trainer.steps_per_epoch)} of "
            f"{trainer.total_steps:,}, chosen by t2v R@1 {best['R1']:.2f} on {best['split']} ({where}; {selection})")


def train(
    features: Path,
    out: Path,
    cfg: TrainConfig,
    head_cfg: Any,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    evaluate: Evaluator | None = None,
) -> dict:
    """Train the head ``head_cfg`` describes (any registered head's config) on
    ``features/train``; write the run directory ``out``.

    ``features`` holds ``train/`` and ``test/`` splits. The head's width, frame count and
    initial logit scale come from the features. ``best.pt`` is selected by text-to-video
    R@1 on a hold-out of the train split's videos (``val_fraction``), or on the test split
    when ``select_on="test"`` (then every output says so), or is the last state when there
    is no validation. ``resume`` continues from ``out/last.pt`` (configs must match).
    ``cfg.max_steps`` makes the run that many steps long, however far into an epoch that
    is (the schedule spans them; the last step validates and checkpoints as an epoch's end
    does). ``stop_after`` ends the run after that many steps, writing ``last.pt`` (a
    planned interruption). ``evaluate`` computes validation and final test metrics (see
    :data:`Evaluator`); it may be None only when there are none (``val_fraction=0`` and
    ``final_eval=False``). Returns the metrics written to ``metrics.json``.
    """
    features, out = Path(features), Path(out)
    device = resolve_device(cfg.device)
    test_dir = features / "test"
    has_test = (test_dir / "manifest.json").exists()
    needs = head_spec(head_cfg.head).features
    # a head's token features, read from the manifests: refused before any array is read or any file written
    for split_dir in [features / "train"] + [test_dir] * has_test:
        require_extracted(read_manifest(split_dir)[1], needs, head_cfg.head, split_dir)
    # the token features it does not declare are never read: no hold-out, batch or evaluation holds them
    train_arrays = load_declared(features / "train", needs)
    test_arrays = load_declared(test_dir, needs) if has_test else None
    if test_arrays is None and (cfg.select_on == "test" or cfg.final_eval):
        raise FileNotFoundError(f"{test_dir}: no test split (needed for select_on=test or the final metrics)")
    cfg, head_cfg = resolve_configs(cfg, head_cfg, train_arrays)
    identity = features_identity(features / "train")
    mismatch = identity_mismatch(features_identity(test_dir), identity) if test_arrays is not None else ""
    if mismatch:
        raise ValueError(f"{test_dir} does not belong with {features / 'train'} (test vs train: {mismatch}); "
                         "extract both splits with the same model, weights and frame count")

    if cfg.select_on == "test":
        fit_arrays, val_arrays, val_split = train_arrays, test_arrays, "test"
    else:
        fit_arrays, val_arrays = split_validation(train_arrays, cfg.val_fraction)
        val_split = "val" if val_arrays is not None else None
    if evaluate is None and (val_split is not None or cfg.final_eval):
        raise ValueError("validation and final test metrics need an evaluator: pass evaluate= "
                         "(tmass.evaluate.split_metrics), or set val_fraction=0 and final_eval=False")
    hashes = {"train": train_arrays.manifest_sha256, "test": test_arrays.manifest_sha256 if test_arrays else None}
    config = {
        "train": dataclasses.asdict(cfg),
        "head": dataclasses.asdict(head_cfg),
        "features": str(features.resolve()),
        "features_manifest_sha256": hashes,
        "features_identity": identity,
        "software_version": __version__,
        "selection": cfg.selection,
        "encoder": train_arrays.meta.encoder_label(),
        "pairs": {"train": len(fit_arrays.text_ids), "val": len(val_arrays.text_ids) if val_split == "val" else 0},
    }

    trainer = Trainer(cfg, head_cfg, PairData(fit_arrays, device), device)
    run = {"features_manifest_sha256": hashes, "features_identity": identity, "selection": cfg.selection, "best": None}
    mark_run(out, "train")  # refuses a report or sweep directory
    lock = lock_run(out)  # until this function returns; a second process is refused
    try:
        if resume:
            run = _resume(out, trainer, config, run)
        elif any((out / name).exists() for name in RUN_FILES):
            raise FileExistsError(f"{out} already holds a run; pass resume=True (--resume) or choose another directory")
        else:
            write_json(out / "config.json", config)
        log = _RunLog(out, trainer.step_count if resume else None)
    except BaseException:
        lock.close()
        raise
    started = time.perf_counter()
    try:
        if not resume:
            log.record({"event": "start", "step": 0, "selection": cfg.selection, "total_steps": trainer.total_steps})
            log.say(f"start: {head_cfg.head} on {features}, {steps_in_words(trainer.total_steps, trainer.steps_per_epoch)};"
                    f" selection: {cfg.selection}")
        else:
            log.say(f"resumed at step {trainer.step_count}")

        def validate() -> None:
            if val_split is None:
                return
            metrics = _evaluate(evaluate, trainer.head, val_arrays, cfg.val_trials, cfg.seed, device)
            best = run["best"] is None or _r1(metrics) > run["best"]["R1"]
            log.record({"event": "val", "step": trainer.step_count, "epoch": trainer.step_count / trainer.steps_per_epoch,
                        "split": val_split, "captions": len(val_arrays.text_ids), "videos": len(val_arrays.video_ids),
                        "selection": cfg.selection, "best": best, **metrics})
            log.say(f"step {trainer.step_count}: {val_split} t2v R@1 {_r1(metrics):.2f}" + (" (best)" if best else ""))
            if best:
                run["best"] = {"R1": _r1(metrics), "step": trainer.step_count, "split": val_split, "metrics": metrics,
                               "epoch": trainer.step_count / trainer.steps_per_epoch,
                               "captions": len(val_arrays.text_ids), "videos": len(val_arrays.video_ids)}
                save_checkpoint(out / "best.pt", trainer, run, full=False)

        def checkpoint(best_too: bool = val_split is None) -> None:
            save_checkpoint(out / "last.pt", trainer, run, full=True)
            if best_too:  # nothing to select on: best = last
                save_checkpoint(out / "best.pt", trainer, run, full=False)

        if not resume:  # the initial model (--epochs 0: untrained baselines, audits); the
            checkpoint(best_too=True)  # first validation replaces best.pt
        first_epoch, first_batch = divmod(trainer.step_count, trainer.steps_per_epoch)
        for epoch in range(first_epoch, trainer.epochs):
            start = first_batch if epoch == first_epoch else 0
            stop = min(trainer.steps_per_epoch, trainer.total_steps - epoch * trainer.steps_per_epoch)
            bar = tqdm(trainer.epoch_batches(epoch, start, stop), total=stop, initial=start,
                       desc=f"epoch {epoch + 1}/{trainer.epochs}", unit="step", disable=not progress)
            epoch_loss = []
            for rows in bar:
                record = trainer.step(rows)
                log.record(record)
                epoch_loss.append(record["total"])
                bar.set_postfix(loss=f"{record['total']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
                # a --max-steps run may end inside an epoch: it validates and checkpoints there too
                end = trainer.step_count % trainer.steps_per_epoch == 0 or trainer.step_count == trainer.total_steps
                if end or (cfg.val_every and trainer.step_count % cfg.val_every == 0):
                    validate()
                if end or trainer.step_count % cfg.checkpoint_every == 0 or trainer.step_count == stop_after:
                    checkpoint()
                if trainer.step_count == stop_after:
                    log.say(f"stopped after step {stop_after} (stop_after); resume to continue")
                    return {"stopped_at": stop_after}
            bar.close()
            if epoch_loss:
                log.say(f"epoch {epoch + 1}: mean loss {sum(epoch_loss) / len(epoch_loss):.4f} over {len(epoch_loss)} "
                        f"steps" + (f" (the run ends {trainer.steps_per_epoch - stop} steps before the epoch's end)"
                                    if stop < trainer.steps_per_epoch else ""))

        metrics = {"selection": cfg.selection, "chosen": _chosen(run["best"], trainer), "encoder": config["encoder"],
                   "trained": f"trained {steps_in_words(trainer.step_count, trainer.steps_per_epoch)}",
                   "steps": trainer.step_count, "epochs": trainer.step_count / trainer.steps_per_epoch,
                   "best": run["best"], "train_seconds_this_session": round(time.perf_counter() - started, 2)}
        log.say(metrics["trained"])
        log.say(metrics["chosen"])
        if cfg.final_eval:
            best_head, best_ckpt = load_checkpoint(out / "best.pt", device)
            metrics["test"] = _evaluate(evaluate, best_head, test_arrays, cfg.eval_trials, cfg.seed, device)
            metrics["test"]["checkpoint"] = {"file": "best.pt", "step": best_ckpt["step"], "trials": cfg.eval_trials}
            log.say(f"test t2v R@1 {_r1(metrics['test']):.2f} (best.pt, step {best_ckpt['step']}, {cfg.eval_trials} trials)")
        write_json(out / "metrics.json", metrics)
        return metrics
    finally:
        log.close()
        lock.close()


def _resume(out: Path, trainer: Trainer, config: dict, run: dict) -> dict:
    """Restore ``trainer`` from ``out/last.pt``; the run must be the same one."""
    path = out / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: nothing to resume from")
    try:
        checkpoint = read_checkpoint(path, trainer.device)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    saved = TrainConfig.from_json(checkpoint["train_config"])
    problems = [
        f"{key}: checkpoint {saved.identity()[key]!r}, now {value!r}"
        for key, value in trainer.cfg.identity().items() if saved.identity().get(key) != value
    ]
    problems += [
        f"head.{key}: checkpoint {checkpoint['head_config'].get(key)!r}, now {value!r}"
        for key, value in dataclasses.asdict(trainer.head.cfg).items() if checkpoint["head_config"].get(key) != value
    ]
    if checkpoint["features_manifest_sha256"] != config["features_manifest_sha256"]:
        problems.append("features: manifest hashes differ from the checkpoint's (different features)")
    if problems:
        raise ValueError(f"cannot resume {path}: the run differs from the checkpoint's in " + "; ".join(problems)
                         + "; resume with the run's own settings, or train into another --out")
    trainer.head.load_state_dict(checkpoint["state_dict"])
    trainer.optimizer.load_state_dict(checkpoint["optimizer"])
    trainer.set_rng_state(checkpoint["rng"])
    trainer.step_count = checkpoint["step"]
    return {**run, "best": checkpoint["best"]}
