"""Configuration from one source: the config dataclasses.

Every setting of ``tmass train`` is a dataclass field (``TrainConfig``, each head's and
each loss's config) declared with :func:`setting`: its default, its help text and, where
it has them, its choices live there and nowhere else. From them come

* the command-line options (:func:`options_for`): ``lr`` becomes ``--lr``, with the
  field's help, choices and default;
* configuration files (:func:`read_config_file`): TOML, or a run's ``config.json``, with
  the same sections as ``config.json`` (``[train]``, ``[train.loss_options]``,
  ``[head]``, and ``features``); a mistake in one is reported as one line naming the file
  and the key;
* :func:`build_config`: a config from plain values (a file's, the command line's), each
  checked against its field's type and choices.

``tmass eval`` and ``tmass ablate`` keep their own options; tests/test_config.py holds
their defaults and choices equal to ``EvalConfig``'s and ``TrainConfig``'s.

This module is torch-free. Configs that live beside torch code are read when a command
first needs its options (:class:`DerivedOptionsCommand`), so ``tmass --help`` loads no
model code.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import click

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

FILE_SECTIONS = ("train", "head")  # besides the top-level "features"


def setting(default, help: str, choices=None, cli: bool = True, bounds: str | None = None):
    """A config field: ``default``, one-sentence-or-so ``help``, ``choices`` (a tuple, or a
    function returning one, for registries), ``bounds`` for a number (an interval such as
    ``"[0, inf)"`` or ``"(0, 1)"``: the option rejects what falls outside, naming itself,
    before any work starts), and ``cli=False`` for fields set by the program rather than
    the user (a head's width comes from the features)."""
    if bounds is not None:
        Bounds.parse(bounds)  # a malformed interval fails at import, not at a user's first run
    kwargs = {"default_factory": lambda: dict(default)} if isinstance(default, dict) else {"default": default}
    return dataclasses.field(metadata={"help": help, "choices": choices, "cli": cli, "bounds": bounds}, **kwargs)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """A numeric interval, written as in mathematics: ``[0, inf)``, ``(0, 1]``."""

    low: float | None
    high: float | None
    low_open: bool
    high_open: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> Bounds:
        match = re.fullmatch(r"\s*([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])\s*", text)
        if not match:
            raise ValueError(f"bounds {text!r}: write an interval such as '[0, inf)'")
        left, low, high, right = match.groups()
        low, high = None if low == "-inf" else float(low), None if high == "inf" else float(high)
        return cls(low, high, left == "(" and low is not None, right == ")" and high is not None, text)

    def contains(self, value: float | None) -> bool:
        """``value`` lies within (None, an unset optional number, always does)."""
        if value is None:
            return True
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def click_type(self, kind: type) -> click.ParamType:
        """click.IntRange or click.FloatRange: click names the option and the range."""
        if kind is int:
            return click.IntRange(None if self.low is None else int(self.low), None if self.high is None else int(self.high),
                                  min_open=self.low_open, max_open=self.high_open)
        return click.FloatRange(self.low, self.high, min_open=self.low_open, max_open=self.high_open)


def field_bounds(f: dataclasses.Field) -> Bounds | None:
    text = f.metadata.get("bounds")
    return None if text is None else Bounds.parse(text)


def field_choices(f: dataclasses.Field) -> tuple | None:
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def field_default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def field_type(cls, name: str):
    """The type of field ``name`` of ``cls``, as a class: int, float, str, bool, tuple, dict."""
    hint = typing.get_type_hints(cls)[name]
    return typing.get_origin(hint) or hint


def cli_fields(cls) -> list[str]:
    """The names of the fields of config class ``cls`` that a user sets."""
    return [f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli", True)]


def check_value(cls, name: str, value):
    """``value`` for field ``name`` of ``cls``, converted where lossless (a list or a comma
    string for a tuple, an int for a float); ValueError saying what was expected."""
    kind = field_type(cls, name)
    if kind is tuple and isinstance(value, str):
        value = tuple(v.strip() for v in value.split(",") if v.strip())
    elif kind is tuple and isinstance(value, list):
        value = tuple(value)
    elif kind is float and type(value) is int:
        value = float(value)
    if kind in (bool, int, float, str, tuple, dict) and type(value) is not kind:
        raise ValueError(f"expected {'a list' if kind is tuple else kind.__name__}, got {value!r}")
    problem = field_problem({f.name: f for f in dataclasses.fields(cls)}[name], value, registries=True)
    if problem:
        raise ValueError(problem)
    return value


def field_problem(f: dataclasses.Field, value, registries: bool = False) -> str | None:
    """What is wrong with ``value`` for field ``f``: an item not among its choices, or a
    number outside its bounds (the one wording of both, wherever a value is checked);
    None if nothing. Choices from a registry (a function) only with ``registries``."""
    choices = f.metadata.get("choices")
    if callable(choices):
        choices = tuple(choices()) if registries else None
    for item in value if isinstance(value, tuple) else (value,):
        if choices and item not in choices:
            return f"{item!r} is not one of {', '.join(map(str, choices))}"
    bounds = field_bounds(f)
    if bounds and not bounds.contains(value):
        return f"{value!r} is not in {bounds.text}"
    return None


def check_choices(config) -> None:
    """ValueError ``field: what is wrong`` unless every field of ``config`` with fixed
    choices holds one of them (each item, for a tuple field) and every field with bounds
    lies within them: a config's ``__post_init__`` calls it, so that a config built
    directly is held to what its options and files are. Registry choices (functions) are
    checked where the name is looked up."""
    for f in dataclasses.fields(config):
        problem = field_problem(f, getattr(config, f.name))
        if problem:
            raise ValueError(f"{f.name}: {problem}")


class Checked:
    """Base of a settings dataclass (a head's or a loss's config): built directly, from a
    dict or from a file, it holds every field to its choices and bounds
    (:func:`check_choices`). A plain class, so frozen and mutable dataclasses both take it."""

    def __post_init__(self):
        check_choices(self)


def build_config(cls, values: dict, where: str):
    """``cls(**values)``, every value checked against its field; ValueError with one line
    ``where.key: what is wrong`` (``where`` names the source: a file, a section)."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
    checked = {}
    for name, value in values.items():
        try:
            checked[name] = check_value(cls, name, value)
        except ValueError as exc:
            raise ValueError(f"{where}.{name}: {exc}") from None
    try:
        return cls(**checked)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def read_config_file(path: Path) -> dict:
    """The sections of a TOML file or a run's ``config.json``: ``{"features": str | None,
    "train": {...}, "head": {...}}``. Keys are checked by :func:`build_config` later; here
    only the file's shape. A run's config.json also records provenance (hashes,
    versions), which is skipped."""
    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from None
    if path.suffix != ".json":
        unknown = sorted(set(data) - {"features", *FILE_SECTIONS})
        if unknown:
            raise ValueError(f"{path}: unknown key {unknown[0]!r}; a config file has features, "
                             f"{', '.join(f'[{s}]' for s in FILE_SECTIONS)}")
    sections = {"features": data.get("features")}
    for section in FILE_SECTIONS:
        value = data.get(section, {})
        if not isinstance(value, dict):
            raise ValueError(f"{path}: {section} must be a table of settings")
        sections[section] = dict(value)
    return sections


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def options_for(entries: dict[str, tuple[str, list[tuple[str, type]]]]) -> list[click.Option]:
    """Click options for config fields: ``{option: (field, [(owner, config class), ...])}``
    (the option is usually the field's name), where several owners (heads, losses) may
    declare a field of the same name and ``owner`` is "" for the command's own config.
    The help gives each distinct help text with the owners that give it. An option's
    default is its field's; where owners' defaults differ it is None and the help lists
    each. Whether a value was given is :func:`given_options`' business."""
    options = []
    for name, (field, owners) in entries.items():
        f = {g.name: g for g in dataclasses.fields(owners[0][1])}[field]
        defaults = {owner: field_default({g.name: g for g in dataclasses.fields(cls)}[field]) for owner, cls in owners}
        default = next(iter(defaults.values()))
        show = True
        if any(d != default for d in defaults.values()):
            default, show = None, "; ".join(f"{o}: {_show(d)}" for o, d in defaults.items())
        helps = {}  # help text -> the owners that give it
        for owner, cls in owners:
            g = {g.name: g for g in dataclasses.fields(cls)}[field]
            helps.setdefault(g.metadata.get("help", ""), []).append(owner)
        help_text = " ".join(f"[{', '.join(o)}] {h}" if o[0] else h for h, o in helps.items())
        kind, choices = field_type(owners[0][1], field), field_choices(f)
        if kind is bool:
            decls = [f"{option_name(name)}/--no-{name.replace('_', '-')}", name]
            options.append(click.Option(decls, default=default, help=help_text, show_default=show))
            continue
        click_type = option_type(owners[0][1], field)
        if kind is tuple:
            default = None if default is None else ",".join(default)
            help_text += " Comma list" + (f" from {', '.join(choices)}." if choices else ".")
        options.append(click.Option([option_name(name), name], type=click_type, default=default, help=help_text,
                                    show_default=show))
    return options


def option_type(cls, name: str) -> click.ParamType:
    """The click type of field ``name`` of config ``cls``: its choices, its bounds as a
    range, or its plain type (a tuple field is a comma list, a string). Commands that
    keep their own options (``tmass ablate``) take their types from here too."""
    f = {g.name: g for g in dataclasses.fields(cls)}[name]
    kind, choices, bounds = field_type(cls, name), field_choices(f), field_bounds(f)
    if kind is tuple:
        return click.STRING
    if choices:
        return click.Choice([str(c) for c in choices])
    if bounds:
        return bounds.click_type(kind)
    return {int: click.INT, float: click.FLOAT, bool: click.BOOL}.get(kind, click.STRING)


def given_options(ctx: click.Context, values: dict) -> dict:
    """The options of ``values`` the user gave (command line or environment), not defaulted."""
    explicit = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return {name: value for name, value in values.items() if ctx.get_parameter_source(name) in explicit}


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(value) or "(none)"
    return str(value)


class DerivedOptionsCommand(click.Command):
    """A click command whose config options are derived when first needed (parsing or
    help), so that building the command line (``tmass --help``) imports no model code.
    ``derive()`` returns the extra options."""

    def __init__(self, *args, derive, **kwargs):
        super().__init__(*args, **kwargs)
        self._derive = derive
        self._derived = False

    def get_params(self, ctx):
        if not self._derived:
            self.params.extend(self._derive())
            self._derived = True
        return super().get_params(ctx)
