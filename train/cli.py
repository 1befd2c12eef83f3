"""``tmass train``: train a registered head on a features directory."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from tmass.train.registry import head_names

# ctx.meta key of the evaluator that validates and tests a run (trainer.Evaluator); the
# ``tmass`` group above hands in the leak-free one, since train/ never imports evaluate/
EVALUATOR_KEY = "tmass.evaluator"

# option name -> (config, field): which config each command-line option sets
_FIELDS = {
    "head": ("head", "head"), "radius": ("head", "radius"), "prior": ("head", "prior"),
    "prior_std": ("head", "prior_std"), "dropout": ("head", "dropout"), "num_heads": ("head", "num_heads"),
    "loss_terms": ("train", "loss_terms"), "support_weight": ("train", "support_weight"),
    "support_video": ("train", "support_video"), "pooling_path": ("train", "pooling_path"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"), "lr": ("train", "lr"), "weight_decay": ("train", "weight_decay"),
    "warmup_fraction": ("train", "warmup_fraction"), "grad_clip": ("train", "grad_clip"), "seed": ("train", "seed"),
    "val_fraction": ("train", "val_fraction"), "val_trials": ("train", "val_trials"),
    "val_every": ("train", "val_every"), "select_on": ("train", "select_on"),
    "eval_trials": ("train", "eval_trials"), "final_eval": ("train", "final_eval"),
    "checkpoint_every": ("train", "checkpoint_every"), "device": ("train", "device"),
}


@click.command()
@click.option("--features", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Features directory with train/ and test/ splits (taken from the run with --resume).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory to write.")
@click.option("--head", type=click.Choice(head_names()), default="tmass", show_default=True, help="Registered head to train.")
@click.option("--radius", type=click.Choice(["sim", "scalar", "linear"]), default="linear", show_default=True,
              help="T-MASS radius (Table 5): R = S, R = theta*S, or R = W S + b.")
@click.option("--prior", type=click.Choice(["uniform", "normal"]), default="uniform", show_default=True,
              help="Distribution of eps in t_s = t + eps * exp(R): U(0, 1) or N(0, prior_std^2).")
@click.option("--prior-std", type=float, default=1.0, show_default=True,
              help="Std of the normal prior (the reference uses 3e-3 on LSMDC).")
@click.option("--support-weight", type=float, default=0.8, show_default=True, help="alpha of Eq. 9, on the sup term.")
@click.option("--support-video", type=click.Choice(["paired", "batch-mean"]), default="paired", show_default=True,
              help="Video of the support text: the video pooled on its own caption, or (the reference) "
                   "averaged over the batch's captions.")
@click.option("--pooling-path", type=click.Choice(["folded", "module"]), default="folded", show_default=True,
              help="X-Pool pooling at train time: frame-wise folded (fast, same function) or the head's module.")
@click.option("--loss-terms", default="", show_default="ce for meanp/xpool, s,sup for tmass",
              help="Comma list from ce (t), s (stochastic t_s), sup (support text): Table 6's rows.")
@click.option("--epochs", type=int, default=5, show_default=True, help="0 writes the initial model (baselines, audits).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-5, show_default=True, help="Peak learning rate (reference: 3e-5 on MSR-VTT).")
@click.option("--weight-decay", type=float, default=0.2, show_default=True)
@click.option("--warmup-fraction", type=float, default=0.1, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True, help="Max gradient norm; 0 disables.")
@click.option("--dropout", type=float, default=0.3, show_default=True, help="On X-Pool's residual branch.")
@click.option("--num-heads", type=int, default=1, show_default=True, help="X-Pool attention heads.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-fraction", type=float, default=0.05, show_default=True,
              help="Train-split videos held out (with their captions) to select best.pt; 0: best = last.")
@click.option("--val-trials", type=int, default=0, show_default=True,
              help="T-MASS sampling trials when validating (0: deterministic t, fast).")
@click.option("--val-every", type=int, default=0, show_default=True, help="Steps between validations; 0: each epoch end.")
@click.option("--select-on", type=click.Choice(["val", "test"]), default="val", show_default=True,
              help="Select best.pt on the test split instead: optimistic, and labelled so everywhere.")
@click.option("--eval-trials", type=int, default=20, show_default=True, help="T-MASS trials for the final test metrics.")
@click.option("--final-eval/--no-final-eval", default=True, show_default=True, help="Evaluate best.pt on test at the end.")
@click.option("--checkpoint-every", type=int, default=1000, show_default=True, help="Steps between writes of last.pt.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--stop-after", type=int, default=None, hidden=True, help="Stop after this many steps (planned interruption).")
@click.option("--progress/--no-progress", default=True, help="Progress bar per epoch.")
@click.pass_context
def train(ctx, features, out, resume, stop_after, progress, **options):
    """Train a head on cached CLIP features; write config, logs, checkpoints and metrics to --out."""
    from tmass.train.registry import head_spec
    from tmass.train.trainer import TrainConfig, train as run_training

    values = {"train": {}, "head": {}}
    for name, (which, field) in _FIELDS.items():
        values[which][field] = options[name]
    values["train"]["loss_terms"] = tuple(t for t in options["loss_terms"].split(",") if t.strip())
    if resume:
        features, values = _resumed_values(ctx, out, features, values)
    elif features is None:
        raise click.UsageError("--features is required (unless --resume)")
    try:
        cfg = TrainConfig(**values["train"])
        head_cfg = head_spec(values["head"]["head"]).make_config(**values["head"])
        metrics = run_training(features, out, cfg, head_cfg, resume=resume, stop_after=stop_after, progress=progress,
                               evaluate=ctx.meta.get(EVALUATOR_KEY))
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    if "test" in metrics:
        t2v, v2t = metrics["test"]["t2v"], metrics["test"]["v2t"]
        click.echo(f"test t2v R@1 {t2v['R1']:.1f} R@5 {t2v['R5']:.1f} R@10 {t2v['R10']:.1f} MdR {t2v['MdR']:g} MnR {t2v['MnR']:.1f}"
                   f" | v2t R@1 {v2t['R1']:.1f}  ({metrics['selection']})")
    click.echo(f"run written to {out}")


def _resumed_values(ctx, out: Path, features: Path | None, values: dict) -> tuple[Path, dict]:
    """The run's saved settings; an option given on the command line must agree with them
    (``--device`` excepted: a run may move between machines)."""
    config_path = out / "config.json"
    if not config_path.exists():
        raise click.ClickException(f"{config_path}: no run to resume")
    saved = json.loads(config_path.read_text())
    saved_features = Path(saved["features"])
    if features is not None and features.resolve() != saved_features:
        raise click.ClickException(f"--features {features} differs from the run's {saved_features}")
    merged = {"train": dict(saved["train"]), "head": dict(saved["head"])}
    conflicts = []
    for name, (which, field) in _FIELDS.items():
        if ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE:
            continue
        given, was = values[which][field], merged[which].get(field)
        if name == "device":
            merged[which][field] = given
        elif name == "loss_terms":
            if given and set(given) != set(was):
                conflicts.append(f"--loss-terms {','.join(given)} (run: {','.join(was)})")
        elif given != was:
            conflicts.append(f"--{name.replace('_', '-')} {given} (run: {was})")
    if conflicts:
        raise click.ClickException("--resume continues the run as configured; these options differ: " + "; ".join(conflicts))
    return saved_features, merged
