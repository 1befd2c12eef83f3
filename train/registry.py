"""The head registry: which heads exist, what each needs, and how to build one.

Everything that names heads reads this registry and nothing else: ``tmass train --head``
(choices and default loss terms), checkpoints (a head name and its config, rebuilt here),
the evaluator (generic scoring, or a fast path the head offers), ``tmass ablate`` (the
``heads`` sweep), ``tmass report`` and figures (display names) and ``tmass check-head``.

A head is one module that defines a :class:`HeadSpec`. Registering it is one line:
an entry of :data:`HEADS` below, or, for a head in a user's own package, an entry point
of the same form in group ``tmass.heads``::

    [project.entry-points."tmass.heads"]
    mine = "my_package.head:SPEC"

Both name a ``module:attribute``, imported on first use, so listing the names (as
``--head``'s choices do) imports no head and no torch. This module is torch-free.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from tmass.train.config import Checked, setting

ENTRY_POINT_GROUP = "tmass.heads"

# The features a head may declare it needs (see tmass.features.format):
#   frames        frames [n_video, n_frames, dim] + frame_mask; every head gets the
#                 caption embedding [n_text, dim]
#   word_tokens   token_embedding [n_text, n_token, dim] + token_mask
#   patch_tokens  patch_embedding [n_video, n_frames, G*G, dim]
FEATURES = ("frames", "word_tokens", "patch_tokens")

# Fast paths a head may offer; each is an optimisation of the head's own scoring, and
# the tests hold it equal to the generic path for every head that offers it.
#   folded-xpool  X-Pool pooling applied per frame: training (train/folded.py) and the
#                 evaluator's fused numba kernel (evaluate/sampling.py). Offered by heads
#                 built on ``tmass.train.heads.Head`` with an ``XPoolFusion`` pooling.
FAST_PATHS = ("folded-xpool",)

# Fields every head config has: the registry name, and what the trainer fills in from
# the features manifest (width, frame count, CLIP's logit scale).
CONFIG_FIELDS = ("head", "embed_dim", "num_frames", "logit_scale")

HEADS = {
    "meanp": "tmass.train.heads.xpool:MEANP",
    "xpool": "tmass.train.heads.xpool:XPOOL",
    "tmass": "tmass.train.heads.xpool:TMASS",
    "ea": "tmass.train.heads.ea:SPEC",
    "tc-mgc": "tmass.train.heads.tcmgc:SPEC",
    "prota": "tmass.train.heads.prota:SPEC",
    "visern": "tmass.train.heads.visern:SPEC",
}


@dataclass
class BaseHeadConfig(Checked):
    """The fields every head's config carries (:data:`CONFIG_FIELDS`); a new head's config
    may subclass it. Configs stay plain, torch-free dataclasses: a checkpoint stores one
    as a dict, and command-line options are derived from their fields
    (:func:`tmass.train.config.setting`)."""

    head: str = setting("", cli=False, help="The registered head's name.")
    embed_dim: int = setting(512, cli=False, help="CLIP embedding width (from the features).")
    num_frames: int = setting(12, cli=False, help="Frames per video (from the features).")
    logit_scale: float = setting(100.0, cli=False, help="Initial exp(logit scale) (from the features).")


@dataclass(frozen=True)
class HeadSpec:
    """What a head module declares.

    * ``config``: its torch-free config dataclass, with :data:`CONFIG_FIELDS` among its
      fields; ``build(config)`` returns the head, an ``nn.Module`` subclass of
      ``tmass.train.heads.RetrievalHead`` whose ``score`` maps text features of n_text
      queries and video features of n_video videos to scores ``[n_text, n_video]``,
      each a function of its own (text, video) pair only (``tmass check-head`` checks).
    * ``features``: which of :data:`FEATURES` it reads.
    * ``loss_terms``: its default training loss terms.
    * ``stochastic``: it scores with sampled noise (the evaluator draws it keyed by the
      pair's ids, so it stays a function of the pair).
    * ``fast_paths``: optimisations it offers (:data:`FAST_PATHS`).
    * ``display``: its name in tables, legends and logs; ``summary``: one line of help.
    """

    name: str
    display: str
    config: type
    build: Callable[[Any], Any]
    summary: str = ""
    features: frozenset[str] = frozenset({"frames"})
    loss_terms: tuple[str, ...] = ("ce",)
    stochastic: bool = False
    fast_paths: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "features", frozenset(self.features))
        unknown = sorted(self.features - set(FEATURES)) + [p for p in self.fast_paths if p not in FAST_PATHS]
        if unknown:
            raise ValueError(f"head {self.name!r} declares unknown features or fast paths {unknown}; "
                             f"known: {FEATURES + FAST_PATHS}")
        if not dataclasses.is_dataclass(self.config):
            raise TypeError(f"head {self.name!r}: config must be a dataclass, got {self.config!r}")
        missing = set(CONFIG_FIELDS) - {f.name for f in dataclasses.fields(self.config)}
        if missing:
            raise TypeError(f"head {self.name!r}: config {self.config.__name__} lacks fields {sorted(missing)} "
                            "(subclass tmass.train.registry.BaseHeadConfig)")

    def make_config(self, **fields) -> Any:
        """The head's config with ``fields`` set; fields it does not have are ignored
        (a shared option such as ``--radius`` means nothing to a head without one)."""
        known = {f.name for f in dataclasses.fields(self.config)}
        return self.config(**{k: v for k, v in fields.items() if k in known and k != "head"}, head=self.name)


def _plugins() -> dict[str, str]:
    """Entry points of group ``tmass.heads``: name -> ``module:attribute``."""
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in HEADS:
            warnings.warn(f"entry point {ep.value!r} may not replace the built-in head {ep.name!r}; ignored",
                          stacklevel=2)
        else:
            found[ep.name] = ep.value
    return found


def head_names() -> tuple[str, ...]:
    """Every registered head: built-ins in registry order, then plugins by name."""
    return (*HEADS, *sorted(_plugins()))


@cache
def _load(target: str) -> HeadSpec:
    module, _, attribute = target.partition(":")
    spec = getattr(importlib.import_module(module), attribute)
    if not isinstance(spec, HeadSpec):
        raise TypeError(f"{target} is a {type(spec).__name__}, not a tmass.train.registry.HeadSpec")
    return spec


def head_spec(name: str) -> HeadSpec:
    """The spec registered as ``name`` (ValueError naming the choices if none is)."""
    target = HEADS.get(name) or _plugins().get(name)
    if target is None:
        raise ValueError(f"unknown head {name!r}; choose from {', '.join(head_names())}")
    spec = _load(target)
    if spec.name != name:
        raise ValueError(f"{target} declares head {spec.name!r} but is registered as {name!r}")
    return spec


def display_name(name: str) -> str:
    """``name``'s display name; an unregistered name (an old run's) is shown as is."""
    try:
        return head_spec(name).display
    except ValueError:
        return name


def config_from_dict(data: dict) -> Any:
    """A head config from its dict (a checkpoint's ``head_config``, a run's config.json)."""
    return head_spec(data["head"]).make_config(**data)


def build_head(config: Any) -> Any:
    """The head ``config`` describes (``config.head`` names its registry entry)."""
    return head_spec(config.head).build(config)
