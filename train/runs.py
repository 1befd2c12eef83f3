"""Run directories: what kind each one is, and which is the latest training run.

Every directory the tools write results into carries ``run.json``, a small marker
``{"kind": "train" | "report" | "sweep", "software_version": ..., "created": ...}``. A
command that needs a training run (``make eval``) takes the latest directory of kind
``train`` and never mistakes a report or a sweep for one.

``python -m tmass.train.runs RUNS`` prints the latest training run under ``RUNS``
(exit status 2, with a one-line reason, when there is none).

One process at a time works in a training run: :func:`lock_run` holds ``.lock`` in it.
"""

from __future__ import annotations

import fcntl
import json
import sys
import time
from pathlib import Path

from tmass import __version__

MARKER = "run.json"
LOCK = ".lock"
KINDS = ("train", "report", "sweep")


def mark_run(directory: Path, kind: str) -> None:
    """Write ``directory/run.json`` unless it is there already (a resumed run keeps its
    creation time); a directory of another kind is refused."""
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}; known: {', '.join(KINDS)}")
    directory = Path(directory)
    found = run_kind(directory)
    if found == kind:
        return
    if found is not None:
        raise ValueError(f"{directory} holds a {found} output, not a {kind}; choose another directory")
    directory.mkdir(parents=True, exist_ok=True)
    marker = {"kind": kind, "software_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (directory / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def run_kind(directory: Path) -> str | None:
    """The kind in ``directory``'s marker, or None when it has none. A training run
    written before markers existed is recognised by its ``config.json`` (train and head
    settings)."""
    directory = Path(directory)
    for name in (MARKER, "config.json"):
        try:
            data = json.loads((directory / name).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        if name == MARKER:
            return data.get("kind")
        if "train" in data and "head" in data:
            return "train"
    return None


def latest_run(root: Path, kind: str = "train") -> Path | None:
    """The sub-directory of ``root`` of that kind that was written to last, or None. A
    training run counts from its last logged step (``log.jsonl``), so evaluating an
    older run (which writes eval.json) does not make it the latest."""
    runs = [d for d in Path(root).glob("*/") if d.is_dir() and run_kind(d) == kind]
    if not runs:
        return None

    def written(run: Path) -> float:
        for name in ("log.jsonl", MARKER, "config.json"):
            if (run / name).is_file():
                return (run / name).stat().st_mtime
        return 0.0

    return max(runs, key=written)


class RunBusyError(FileExistsError):
    """Another process holds the run directory."""


def lock_run(directory: Path):
    """Hold ``directory/.lock`` with an exclusive flock while the returned file stays open.
    A second process on the same run is refused at once (:class:`RunBusyError`, one
    line). The kernel drops the lock when its holder dies, ``kill -9`` included, so a
    killed run never blocks the next one; the file is not inherited by programs the
    holder starts."""
    path = Path(directory) / LOCK
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunBusyError(f"{directory}: another process is working in this run (it holds {path}); "
                           f"wait for it to end or choose another --out") from None
    return handle


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0] if args else "runs")
    run = latest_run(root)
    if run is None:
        print(f"no training run under {root}/ (none has a {MARKER} of kind train): make train first, or pass RUN=...",
              file=sys.stderr)
        return 2
    print(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
