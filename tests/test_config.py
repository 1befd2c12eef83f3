"""Configuration from one source: command-line options derived from (or checked against)
the config dataclasses, config files, exact re-runs from a run's config.json, and
one-line errors for mistakes in a file."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import click
import pytest
import torch
from click.testing import CliRunner

from tmass.cli import main
from tmass.evaluate.scores import EvalConfig
from tmass.train import losses as registry
from tmass.train.config import cli_fields, field_bounds, field_choices, field_default, option_type, setting
from tmass.train.heads.xpool import RADII, HeadConfig
from tmass.train.losses import Loss, loss_class, loss_names
from tmass.train.registry import CONFIG_FIELDS, head_names, head_spec
from tmass.train.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params(command) -> dict[str, click.Parameter]:
    with click.Context(command) as ctx:
        return {p.name: p for p in command.get_params(ctx)}


def _check_option(option: click.Option, f: dataclasses.Field):
    default = field_default(f)
    assert option.default == (",".join(default) if isinstance(default, tuple) else default), f.name
    choices = field_choices(f)
    if choices and not isinstance(default, tuple):
        assert tuple(option.type.choices) == tuple(choices), f.name
    assert f.metadata["help"] in option.help, f.name
    _check_bounds(option, f)


def _check_bounds(option: click.Option, f: dataclasses.Field):
    """The option refuses what the field's bounds do (an option several heads or losses
    share must have one range)."""
    bounds = field_bounds(f)
    if bounds:
        assert (option.type.min, option.type.max, option.type.min_open, option.type.max_open) == \
               (bounds.low, bounds.high, bounds.low_open, bounds.high_open), f.name


def test_train_options_are_derived_from_the_config_dataclasses():
    params = _params(main.commands["train"])
    for f in dataclasses.fields(TrainConfig):
        if f.name in cli_fields(TrainConfig):
            _check_option(params[f.name], f)
    assert "loss_options" not in params  # set through each loss's own options
    assert tuple(params["loss"].type.choices) == loss_names()
    for name in loss_names():  # every registered loss's settings, each named after its field
        for f in dataclasses.fields(loss_class(name).Config):
            _check_option(params[f.name], f)
            assert re.search(rf"\[[^]]*\b{re.escape(name)}\b[^]]*\] {re.escape(f.metadata['help'])}", params[f.name].help)
    head_fields = {f.name: f for f in dataclasses.fields(HeadConfig)}
    for name in ("num_heads", "dropout", "radius", "prior", "prior_std"):
        _check_option(params[name], head_fields[name])
    assert tuple(params["radius"].type.choices) == RADII
    for head in head_names():  # every registered head's settings with bounds, as ranges
        config = head_spec(head).config
        for f in dataclasses.fields(config):
            if f.name in cli_fields(config) and f.name not in CONFIG_FIELDS:
                _check_bounds(params[f.name], f)
    for resolved in ("embed_dim", "num_frames", "logit_scale"):  # from the features, not the user
        assert resolved not in params


def test_eval_and_ablate_options_agree_with_the_configs():
    """``tmass eval`` and ``tmass ablate`` keep their own option lists; where an option is
    a config's setting, its default and choices are the config's."""
    shared = {}
    for command, config in ((main.commands["eval"], EvalConfig), (main.commands["ablate"], TrainConfig)):
        fields = {f.name: f for f in dataclasses.fields(config)}
        for param in _params(command).values():
            name = param.opts[0].lstrip("-").replace("-", "_") if param.opts else param.name
            if name not in fields:
                continue
            shared.setdefault(command.name, set()).add(name)
            assert param.default == field_default(fields[name]), (command.name, name)
            if isinstance(param.type, click.Choice):
                assert tuple(param.type.choices) == tuple(field_choices(fields[name]) or param.type.choices)
            if field_bounds(fields[name]):  # the same range, so a bad value is refused by the option
                given, derived = param.type, option_type(config, name)
                assert type(given) is type(derived), (command.name, name)
                assert [getattr(given, a) for a in ("min", "max", "min_open", "max_open")] == \
                       [getattr(derived, a) for a in ("min", "max", "min_open", "max_open")], (command.name, name)
    assert {"trials", "seed", "protocol", "noise", "path", "chunk_pairs", "device"} <= shared["eval"]
    assert {"epochs", "max_steps", "lr", "batch_size", "device"} <= shared["ablate"]


def test_the_train_command_is_built_without_torch():
    code = "import sys, tmass.train.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def _toml(tmp_path, features, body: str):
    path = tmp_path / "run.toml"
    path.write_text(f'features = "{os.path.relpath(features, tmp_path)}"\n' + body)
    return path


TINY_RUN = """
[train]
epochs = 1
lr = 1e-3
loss = "triplet-hn"
val_fraction = 0.0
eval_trials = 0
seed = 1

[train.loss_options]
margin = 0.1

[head]
head = "tmass"
dropout = 0.1
"""


def test_a_config_file_then_options_then_an_exact_rerun_from_config_json(tiny_features, tmp_path):
    """A TOML file sets the run (features relative to the file); options given on the
    command line override it; the run's config.json re-runs it to the same weights."""
    config = _toml(tmp_path, tiny_features, TINY_RUN)
    first, second = tmp_path / "first", tmp_path / "second"
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--out", str(first), "--margin", "0.3",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    written = json.loads((first / "config.json").read_text())
    assert written["features"] == str(tiny_features.resolve())
    assert written["train"]["lr"] == 1e-3 and written["train"]["seed"] == 1 and written["train"]["epochs"] == 1
    assert written["train"]["loss"] == "triplet-hn" and written["train"]["loss_options"] == {"margin": 0.3}
    assert written["head"]["head"] == "tmass" and written["head"]["dropout"] == 0.1
    assert written["train"]["batch_size"] == TrainConfig().batch_size  # not in the file: the dataclass default

    result = CliRunner().invoke(main, ["train", "--config", str(first / "config.json"), "--out", str(second),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((second / "config.json").read_text()) == written
    a = torch.load(first / "last.pt", weights_only=False)
    b = torch.load(second / "last.pt", weights_only=False)
    assert a["step"] == b["step"] > 0
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    metrics = [json.loads((run / "metrics.json").read_text())["test"] for run in (first, second)]
    assert metrics[0]["t2v"] == metrics[1]["t2v"] and metrics[0]["v2t"] == metrics[1]["v2t"]


@pytest.mark.parametrize("body, message", [
    ("[train]\nlrr = 1e-3\n", "run.toml: train: unknown setting 'lrr'"),
    ("[train]\nepochs = 'two'\n", "run.toml: train.epochs: expected int, got 'two'"),
    ("[train]\nbatch_size = 1\n", "run.toml: train.batch_size: 1 is not in [2, inf)"),
    ("[head]\nradius = 'cubic'\n", "run.toml: head.radius: 'cubic' is not one of sim, scalar, linear"),
    ("[head]\nhead = 'xpoll'\n", "run.toml: head.head: unknown head 'xpoll'"),
    ("[trian]\nlr = 1e-3\n", "run.toml: unknown key 'trian'"),
    ("[train]\nloss = 'triplet-hn'\n[train.loss_options]\nmargn = 0.1\n",
     "run.toml: train.loss_options: unknown setting 'margn'"),
    ("[train\n", "run.toml: not valid TOML"),
])
def test_a_mistake_in_a_config_file_is_one_line_naming_the_file_and_key(tiny_features, tmp_path, body, message):
    config = _toml(tmp_path, tiny_features, body)
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_a_setting_of_another_loss_is_refused(tiny_features, tmp_path):
    result = CliRunner().invoke(main, ["train", "--features", str(tiny_features), "--out", str(tmp_path / "run"),
                                       "--margin", "0.1"])
    assert result.exit_code != 0
    assert "--margin is a setting of loss triplet-hn" in result.output and "not of --loss infonce" in result.output


@dataclasses.dataclass(frozen=True)
class _PluginConfig:
    margin: float = setting(0.5, help="Its own margin.")
    lr: float = setting(0.1, help="A loss setting named like a training setting.")


class _PluginLoss(Loss):
    name = "plugin"
    Config = _PluginConfig


def test_a_setting_shared_by_losses_is_one_option_and_a_clash_gets_a_prefix(monkeypatch, tiny_features):
    from tmass.train import cli as train_cli

    monkeypatch.setattr(registry, "_plugins", lambda: {"plugin": SimpleNamespace(name="plugin", load=lambda: _PluginLoss)})
    fields = train_cli._config_fields()
    section, field, owners = fields["margin"]
    assert (section, field) == ("loss", "margin") and owners[0] == ("triplet-hn", loss_class("triplet-hn").Config)
    assert owners[-1] == ("plugin", _PluginConfig)
    assert fields["loss_lr"] == ("loss", "lr", [("plugin", _PluginConfig)]) and fields["lr"][0] == "train"
    options = {o.name: o for o in train_cli._derived_options()}
    assert options["margin"].default is None
    assert options["margin"].show_default.startswith("triplet-hn: 0.2;") and options["margin"].show_default.endswith("; plugin: 0.5")
    assert "[plugin] Its own margin." in options["margin"].help
    assert options["loss_lr"].opts == ["--loss-lr"]
    _, cfg, _ = train_cli._configs(tiny_features, None, {"loss": "plugin", "loss_lr": 0.3, "lr": 1e-3}, resume=False)
    assert cfg.lr == 1e-3 and cfg.loss_options == {"margin": 0.5, "lr": 0.3}
