"""``tmass train``: train a registered head on a features directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from tmass.train.config import DerivedOptionsCommand, given_options

DEFAULT_HEAD = "tmass"
# ctx.meta key of the evaluator that validates and tests a run (trainer.Evaluator); the
# ``tmass`` group above hands in the leak-free one, since train/ never imports evaluate/
EVALUATOR_KEY = "tmass.evaluator"


def _head_configs() -> dict[str, type]:
    """Each registered head's config class."""
    from tmass.train.registry import head_names, head_spec

    return {name: head_spec(name).config for name in head_names()}


def _config_fields() -> dict[str, tuple[str, str, list[tuple[str, type]]]]:
    """Option -> (section, field, [(owner, config class), ...]): every setting of
    TrainConfig, of each registered head's config and each registered loss's config.
    Sections are "train", "head" and "loss" (the loss's fields go to
    ``TrainConfig.loss_options``). A head or loss field named like a setting of another
    section is offered as ``--head-NAME`` or ``--loss-NAME``."""
    from tmass.train.config import cli_fields
    from tmass.train.losses import loss_class, loss_names
    from tmass.train.registry import CONFIG_FIELDS
    from tmass.train.trainer import TrainConfig

    fields = {name: ("train", name, [("", TrainConfig)]) for name in cli_fields(TrainConfig)}
    for section, configs in (("head", _head_configs()), ("loss", {n: loss_class(n).Config for n in loss_names()})):
        for owner, cls in configs.items():
            for name in cli_fields(cls):
                if section == "head" and name in CONFIG_FIELDS:  # set from the features
                    continue
                option = name if fields.get(name, (section,))[0] == section else f"{section}_{name}"
                fields.setdefault(option, (section, name, []))[2].append((owner, cls))
    return fields


def _derived_options() -> list[click.Option]:
    from tmass.train.config import options_for

    head = click.Option(["--head"], type=click.Choice(list(_head_configs())), default=DEFAULT_HEAD,
                        show_default=True, help="Registered head to train.")
    return [head] + options_for({option: (field, owners) for option, (_, field, owners) in _config_fields().items()})


@click.command(cls=DerivedOptionsCommand, derive=_derived_options)
@click.option("--features", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Features directory with train/ and test/ splits (or the config file's 'features').")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory to write.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A whole configuration: a TOML file ([train], [train.loss_options], [head], features) or a "
                   "run's config.json, which re-runs that run exactly. Options given here override it.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--stop-after", type=int, default=None, hidden=True, help="Stop after this many steps (planned interruption).")
@click.option("--progress/--no-progress", default=True, help="Progress bar per epoch.")
@click.pass_context
def train(ctx, features, out, config_file, resume, stop_after, progress, **options):
    """Train a head on cached CLIP features; write config, logs, checkpoints and metrics to --out.

    Every setting has one default, in its config dataclass; a config file (--config)
    replaces the defaults it names, and options given on the command line replace both.
    Head and loss settings apply to the heads and losses named in brackets."""
    from tmass.features.format import FeatureFormatError
    from tmass.train.trainer import resolve_device, train as run_training

    given = given_options(ctx, options)
    if resume:
        if config_file is not None:
            raise click.UsageError("--resume continues the run with its own configuration; drop --config")
        config_file = out / "config.json"
        if not config_file.exists():
            raise click.ClickException(f"{config_file}: no run to resume")
    elif features is None and config_file is None:
        raise click.UsageError("--features is required (unless --config names them, or --resume)")
    try:
        features, cfg, head_cfg = _configs(features, config_file, given, resume)
        resolve_device(cfg.device)  # a GPU that is not there: said before any work
        metrics = run_training(features, out, cfg, head_cfg, resume=resume, stop_after=stop_after, progress=progress,
                               evaluate=ctx.meta.get(EVALUATOR_KEY))
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    except FeatureFormatError as exc:  # the test split, read after the train split
        raise click.ClickException(exc.summary()) from exc
    if "chosen" in metrics:  # a finished run (not one stopped by --stop-after)
        click.echo(f"encoder: {metrics['encoder']}\n{metrics['trained']}; {metrics['chosen']}")
    if "test" in metrics:
        t2v, v2t = metrics["test"]["t2v"], metrics["test"]["v2t"]
        click.echo(f"test t2v R@1 {t2v['R1']:.1f} R@5 {t2v['R5']:.1f} R@10 {t2v['R10']:.1f} MdR {t2v['MdR']:g} MnR {t2v['MnR']:.1f}"
                   f" | v2t R@1 {v2t['R1']:.1f}  ({metrics['test']['protocol']} protocol; {metrics['selection']})")
    click.echo(f"run written to {out}")


def _configs(features: Path | None, config_file: Path | None, given: dict, resume: bool):
    """(features, TrainConfig, head config) from the defaults, the config file's values
    and the options ``given`` on the command line, in that order of precedence. With
    ``resume`` the file is the run's config.json and a given option must agree with it
    (``--device`` excepted: a run may move between machines). ValueError names the file
    and key, or the option, that is wrong."""
    from tmass.features.format import FeatureFormatError, locate_features, open_split
    from tmass.train.config import build_config, check_value, option_name, read_config_file
    from tmass.train.losses import parse_loss_terms
    from tmass.train.trainer import TrainConfig

    sections = read_config_file(config_file) if config_file else {"features": None, "train": {}, "head": {}}
    if resume and features is not None and features.resolve() != Path(sections["features"]):
        raise ValueError(f"--features {features} differs from the run's {sections['features']}")
    if features is None:
        if not sections["features"]:
            raise ValueError(f"{config_file}: no features; give --features or set features in the file")
        features = (config_file.parent / sections["features"]).resolve()  # relative to the file
        if not features.is_dir():
            raise ValueError(f"{config_file}: features {sections['features']!r}: no such directory")
    try:
        features = locate_features(features, ("train",))
        meta = open_split(features / "train", verify_checksums=False).meta
    except FeatureFormatError as exc:
        raise click.BadParameter(exc.summary(), param_hint="--features") from None
    source = f"{config_file}: " if config_file else ""
    head = given.get("head") or sections["head"].get("head") or DEFAULT_HEAD
    head_configs = _head_configs()
    if head not in head_configs:
        raise ValueError(f"{source}head.head: unknown head {head!r}; choose from {', '.join(head_configs)}")
    file_train = dict(sections["train"])
    file_loss = file_train.pop("loss_options", {})
    if not isinstance(file_loss, dict):
        raise ValueError(f"{source}train.loss_options must be a table of the loss's settings")
    file_head = {k: v for k, v in sections["head"].items() if k != "head"}
    values = {"train": file_train, "head": file_head, "loss": dict(file_loss)}
    if config_file:  # the file alone must be right, so that its mistakes are named as its own
        train_cfg = build_config(TrainConfig, file_train, f"{source}train")
        build_config(head_configs[head], file_head, f"{source}head")
        _build_loss(train_cfg.loss, file_loss, f"{source}train.loss_options")
        try:
            parse_loss_terms(train_cfg.loss_terms, sections["head"].get("head") or DEFAULT_HEAD)
        except ValueError as exc:
            raise ValueError(f"{source}train.loss_terms: {exc}") from None

    conflicts = []
    fields = _config_fields()
    loss = given.get("loss") or file_train.get("loss") or TrainConfig().loss
    for option, value in given.items():
        if option == "head":
            if resume and value != sections["head"].get("head"):
                conflicts.append(f"--head {value} (run: {sections['head'].get('head')})")
            continue
        section, field, owners = fields[option]
        chosen = {"head": head, "loss": loss}.get(section)
        if chosen is not None and chosen not in dict(owners):
            raise ValueError(f"{option_name(option)} is a setting of {section} {', '.join(dict(owners))}, "
                             f"not of --{section} {chosen}")
        value = check_value(owners[0][1], field, value)  # a comma list becomes a tuple
        if resume and option != "device" and _differs(value, values[section].get(field)):
            shown = ",".join(value) if isinstance(value, tuple) else value
            conflicts.append(f"{option_name(option)} {shown} (run: {values[section].get(field)})")
        values[section][field] = value
    if conflicts:
        raise ValueError("--resume continues the run as configured; these options differ: " + "; ".join(conflicts))
    train_cfg = build_config(TrainConfig, values["train"], "train")
    loss_cfg = _build_loss(train_cfg.loss, values["loss"], "loss")
    train_cfg = dataclasses.replace(train_cfg, loss_options=dataclasses.asdict(loss_cfg))
    # the head's width and frame count are the features', so that a setting which must fit
    # them (--num-heads dividing the width) is checked against these features, not defaults
    fitted = {"head": head, "embed_dim": meta.embed_dim, "num_frames": meta.num_frames}
    return features, train_cfg, build_config(head_configs[head], {**values["head"], **fitted}, "head")


def _build_loss(name: str, values: dict, where: str):
    from tmass.train.config import build_config
    from tmass.train.losses import loss_class

    return build_config(loss_class(name).Config, values, where)


def _differs(given, saved) -> bool:
    """An option's value against a run's: loss terms as sets, an empty list meaning the default."""
    if isinstance(given, tuple):
        return bool(given) and set(given) != set(saved or ())
    return given != saved
