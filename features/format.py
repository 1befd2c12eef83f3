"""The feature-shard format: the only contract between extract, train and evaluate.

Layout of a features directory (one per dataset and CLIP model)::

    <root>/<dataset>/<model-tag>/<split>/
        manifest.json
        videos-00000.h5  videos-00001.h5  ...
        texts-00000.h5   texts-00001.h5   ...

Video shard, one row per video (HDF5 datasets at the file's root):

    video_id     [n_video]                  variable-length UTF-8 string
    frames       [n_video, n_frames, dim]   float16, CLIP image embeddings exactly as the
                                            model returns them (not L2-normalised)
    frame_mask   [n_video, n_frames]        bool, True for a real frame; False marks padding
                                            of a clip that had fewer frames than requested
    frame_index  [n_video, n_frames]        int32, source frame number of each sampled
                                            frame (-1 where masked)

Text shard, one row per caption:

    text_id      [n_text]                   string, unique within the split
    video_id     [n_text]                   string, the video this caption describes; many
                                            captions may name one video (VATEX has 10)
    caption      [n_text]                   string
    embedding    [n_text, dim]              float16, CLIP text embedding, not normalised

Token-level features, for token-level heads, present when the metadata says so:

    token_embedding [n_text, n_token, dim]  float16, text shards when ``text_tokens``:
                                            every token of the caption through the text
                                            transformer, ``ln_final`` and the text
                                            projection (the EOT token is ``embedding``);
                                            n_token is the shard's longest caption
    token_mask   [n_text, n_token]          bool, True for the caption's tokens (SOT to EOT)
    patch_embedding [n_video, n_frames, G*G, dim]
                                            float16, video shards when ``patch_grid`` is
                                            G > 0: each frame's patch tokens through
                                            ``ln_post`` and the image projection,
                                            average-pooled to a G x G grid (row-major;
                                            adaptive pooling when G does not divide the
                                            patch grid); zero rows where a frame is masked

Readers look datasets up by name and ignore names they do not know, so additions are
backward compatible and bump only the minor format version.

Every shard carries the split's metadata (:class:`FeatureMeta`) as HDF5 attributes,
plus ``kind`` and ``format_version``, so a single file is self-describing and readable
with plain h5py (and stackable with ``dask.array.from_array``) without this package.

``manifest.json`` lists the shards with their row counts, byte sizes and SHA-256, the
metadata, the per-kind totals and the inputs that extraction skipped (``failed``: id,
path, reason). Shards and manifest are written atomically (temporary name, fsync,
rename): a file with a final name is always complete, which is what makes extraction
resumable and a killed job harmless. A shard is assembled in memory and written with
plain file I/O after a free-space check, so a full disk is a one-line
:class:`FeatureWriteError` naming the file, never an HDF5 crash.

Outputs never mix. :func:`provenance` is what made a split (source, model, weights and
their hash, model config, frame count, sampling, preprocessing, preset, seed, ...);
every shard must agree with its manifest on it (:meth:`FeatureSplit` reports a mixed
split). :func:`features_identity`, a part of it, is what a training split and the splits
its heads score must share (the encoder's space). A writer holds the directory with :func:`writing_split`: one writer at a time
(a POSIX lock, which forked children do not inherit and which dies with its process),
``provenance.json`` records the writer's identity before the first shard, and a
directory holding features made otherwise is refused untouched unless the writer
replaces the split as a whole (``overwrite``).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fnmatch
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from tmass import __version__

FORMAT_VERSION = "1.0"
MANIFEST = "manifest.json"
STAMP = "provenance.json"  # the writer's identity, recorded before its first shard
LOCK = ".lock"
VIDEO_SHARD_PREFIX = "videos-"
TEXT_SHARD_PREFIX = "texts-"
# What tmass's writers keep in a split directory; `overwrite` deletes these and nothing else.
SPLIT_FILES = (MANIFEST, STAMP, LOCK, "videos-*.h5", "texts-*.h5", ".*.tmp-*",
               "partition-*.json", "partitions.json", "extract-config.json", "extract.log", ".extract.lock")
# FeatureMeta.extra keys that describe the software that ran, not the features it made
_RUN_NOTES = ("software",)

_STR = h5py.string_dtype(encoding="utf-8")
_ROWS_PER_CHECK = 4096  # rows read at once when scanning values; bounds memory of `check`


class FeatureWriteError(Exception):
    """A file of a split could not be written (disk full, file size limit, permission);
    the message is one line naming the file. Whatever was complete before stays intact."""


class SplitDirError(Exception):
    """A split directory cannot take this writer: another process is writing into it, or
    it holds features made otherwise. The message is one line with the way out."""


class FeatureFormatError(Exception):
    """A features directory violates the format. ``problems`` lists every fault found,
    each naming the file it is in."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def summary(self) -> str:
        """One line for a command's error: the first fault, and how to see the others."""
        more = len(self.problems) - 1
        return self.problems[0] + (f" (and {more} more: tmass features check lists them all)" if more else "")


@dataclass(frozen=True)
class FeatureMeta:
    """How a split's features were made; stored in the manifest and in every shard.

    ``logit_scale`` is CLIP's multiplier on cosine similarities (``exp`` of the model's
    ``logit_scale`` parameter; 100 for OpenAI's CLIP), from which training initialises
    its own learnable temperature. ``random_init`` is True when the encoder had random
    weights (tests, offline demo): such features say nothing about real retrieval.
    """

    dataset: str
    split: str
    model: str
    pretrained: str
    embed_dim: int
    num_frames: int
    frame_sampling: str
    logit_scale: float
    image_size: int | None = None
    checkpoint_sha256: str | None = None
    random_init: bool = False
    source: str = "open_clip"
    text_tokens: bool = False  # text shards hold token_embedding and token_mask
    patch_grid: int = 0  # G > 0: video shards hold patch_embedding pooled to G x G
    extra: dict = field(default_factory=dict)

    def encoder_label(self) -> str:
        """What encoded these features, in words, for every output to carry: the label
        extraction recorded (``extra['encoder_label']``: random init, a pretrained tag, a
        checkpoint and its SHA-256, or the demo encoder), else one built from the fields."""
        if self.extra.get("encoder_label"):
            return self.extra["encoder_label"]
        if self.random_init:
            return f"{self.model}, RANDOM-INIT (no pretrained knowledge)"
        return f"{self.model}, weights {self.extra.get('weights', self.pretrained)}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> FeatureMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def h5_attrs(self) -> dict:
        """Flat attributes for an HDF5 shard (HDF5 has no None; JSON-encode dicts)."""
        attrs = {}
        for key, value in self.to_json().items():
            if value is None:
                continue
            attrs[key] = json.dumps(value) if isinstance(value, dict) else value
        return attrs

    @classmethod
    def from_h5_attrs(cls, attrs) -> FeatureMeta:
        """The inverse of :meth:`h5_attrs`: the metadata a shard carries."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items() if k in known}
        if "extra" in data:
            data["extra"] = json.loads(data["extra"])
        return cls(**data)


def provenance(meta: FeatureMeta) -> dict:
    """What made a split's features, flat and JSON-normalised: every :class:`FeatureMeta`
    field but ``extra``, plus the keys of ``extra`` (weights, model config, preprocessing,
    decoder, preset, seed, ...) except software versions. Shards belong in one split only
    when these agree."""
    data = meta.to_json()
    extra = data.pop("extra") or {}
    data = {"source": data.pop("source"), **data}  # the telling difference first
    return json.loads(json.dumps(data | {k: v for k, v in extra.items() if k not in _RUN_NOTES}))


def _differing_keys(a: dict, b: dict) -> list:
    """The keys of ``a`` then ``b`` on which the two differ (a missing key is None)."""
    return [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]


def provenance_diff(before: dict, now: dict, then: str = "then", here: str = "now") -> list[str]:
    """``key: <before> then, <now> now`` for every key on which two provenances differ."""
    def short(value) -> str:
        text = repr(value)
        return text if len(text) <= 70 else text[:67] + "..."

    return [f"{k}: {short(before.get(k))} {then}, {short(now.get(k))} {here}" for k in _differing_keys(before, now)]


# The provenance keys that fix the space the embeddings live in: a head trained on one
# split scores another only when they agree. Frame sampling, preprocessing, the decoder
# or the dataset may differ (a test split is another dataset's split, sampled alike or not).
IDENTITY_KEYS = ("source", "model", "pretrained", "checkpoint_sha256", "random_init", "embed_dim", "num_frames",
                 "image_size")
SEEDED_KEYS = ("seed", "preset")  # where a seed made the weights: random init, simulated features


def features_identity(split: Path | dict) -> dict:
    """What splits trained and evaluated together must share: a projection of
    :func:`provenance` of ``split`` (a split directory or its parsed ``manifest.json``).
    :data:`IDENTITY_KEYS`; ``weights`` (the weights' name, else ``pretrained``); the
    format's major version; for random-init weights and simulated features also
    :data:`SEEDED_KEYS`. A training run records it in ``config.json`` and its
    checkpoints; ``tmass eval`` and ``tmass search`` compare it (:func:`identity_mismatch`).
    Runs keep this dict's keys and values: one recorded by an older run still compares."""
    manifest = split if isinstance(split, dict) else json.loads((Path(split) / MANIFEST).read_text())
    made = provenance(FeatureMeta.from_json(manifest["meta"]))
    identity = {key: made.get(key) for key in IDENTITY_KEYS}
    identity.update(weights=made.get("weights", made["pretrained"]),
                    format_version=str(manifest.get("format_version", "?")).split(".")[0])
    if made["random_init"] or made["source"] == "simulated":
        identity.update({key: made.get(key) for key in SEEDED_KEYS})
    return identity


def identity_mismatch(identity: dict, other: dict) -> str:
    """``key a vs b`` for each key on which two :func:`features_identity` differ, or ''."""
    return ", ".join(f"{k} {identity.get(k)!r} vs {other.get(k)!r}" for k in _differing_keys(identity, other))


@dataclass(frozen=True)
class ShardRecord:
    """One manifest entry: a shard file (name relative to the split directory)."""

    file: str
    kind: str  # "videos" | "texts"
    rows: int
    bytes: int
    sha256: str


def model_tag(model: str, pretrained: str) -> str:
    """Directory name for a (CLIP model, weights) pair, e.g. ``ViT-B-32__openai``.

    A local checkpoint path is reduced to its file stem, so that the tag stays a
    single path component."""
    weights = Path(pretrained).stem if ("/" in pretrained or os.sep in pretrained) else pretrained
    return f"{model}__{weights}".replace("/", "-")


def shard_name(kind: str, index: int) -> str:
    prefix = {"videos": VIDEO_SHARD_PREFIX, "texts": TEXT_SHARD_PREFIX}[kind]
    return f"{prefix}{index:05d}.h5"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` so that ``final`` is complete or untouched: a temporary
    name, fsync, rename. Checks free space first; any OS error (no space, file size
    limit, permission) becomes one :class:`FeatureWriteError` line naming ``final``."""
    final = Path(final)
    tmp = _tmp_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(final.parent).free
        if len(data) > free:
            raise OSError(errno.ENOSPC, f"no space left on device ({len(data) / 2**20:.1f} MiB to write, "
                                        f"{free / 2**20:.1f} MiB free)")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        raise FeatureWriteError(f"{final}: cannot write: {exc.strerror or exc}; the files written before it are intact "
                                "(free some space, or write elsewhere, then re-run the same command to resume)") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def _record(path: Path, kind: str, rows: int) -> ShardRecord:
    return ShardRecord(path.name, kind, rows, path.stat().st_size, sha256_file(path))


def _write_shard(path: Path, kind: str, meta: FeatureMeta, columns: dict) -> ShardRecord:
    """The shard is built in memory and written with plain file I/O: HDF5 never sees the
    disk, so a full disk cannot crash it (it segfaults on ENOSPC)."""
    path = Path(path)
    rows = len(next(iter(columns.values())))
    image = io.BytesIO()
    with h5py.File(image, "w") as h5:
        h5.attrs.update(meta.h5_attrs())
        h5.attrs["kind"] = kind
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["software_version"] = __version__
        for name, values in columns.items():
            if values.dtype.kind in "OU":
                h5.create_dataset(name, data=np.asarray(values, dtype=object), dtype=_STR)
            else:
                h5.create_dataset(name, data=values)
    write_bytes_atomic(path, image.getvalue())
    return _record(path, kind, rows)


def _as_str_array(values: Sequence[str], what: str, path: Path) -> np.ndarray:
    array = np.asarray(list(values), dtype=object)
    for value in array:
        if not isinstance(value, str):
            raise ValueError(f"{path}: {what} must be strings, got {type(value).__name__}")
    return array


def _token_column(path: Path, meta: FeatureMeta, name: str, values, expected: tuple, wanted: bool) -> dict:
    """``{name: values as float16}`` when ``meta`` asks for the column, checked against
    ``expected`` (None entries match any size); {} when it does not."""
    if not wanted:
        if values is not None:
            raise ValueError(f"{path}: {name} given but the metadata does not declare it")
        return {}
    if values is None:
        raise ValueError(f"{path}: the metadata declares {name}, none given")
    values = np.asarray(values)
    if values.ndim != len(expected) or any(e is not None and v != e for v, e in zip(values.shape, expected)):
        raise ValueError(f"{path}: {name} has shape {values.shape}, expected {expected}")
    return {name: values.astype(np.float16)}


def write_video_shard(
    path: Path,
    meta: FeatureMeta,
    video_ids: Sequence[str],
    frames: np.ndarray,
    frame_mask: np.ndarray | None = None,
    frame_index: np.ndarray | None = None,
    patches: np.ndarray | None = None,
) -> ShardRecord:
    """Write one video shard atomically.

    ``frames`` is ``[n_video, n_frames, dim]`` (stored as float16); ``frame_mask``
    ``[n_video, n_frames]`` bool (default: all real); ``frame_index``
    ``[n_video, n_frames]`` int (default: 0..n_frames-1, -1 where masked); ``patches``
    ``[n_video, n_frames, G*G, dim]``, given exactly when ``meta.patch_grid`` is G > 0."""
    path = Path(path)
    frames = np.asarray(frames)
    n_video = len(video_ids)
    expected = (n_video, meta.num_frames, meta.embed_dim)
    if frames.shape != expected:
        raise ValueError(f"{path}: frames have shape {frames.shape}, expected {expected}")
    if frame_mask is None:
        frame_mask = np.ones(expected[:2], dtype=bool)
    if frame_index is None:
        frame_index = np.broadcast_to(np.arange(meta.num_frames, dtype=np.int32), expected[:2])
        frame_index = np.where(frame_mask, frame_index, -1)
    columns = {
        "video_id": _as_str_array(video_ids, "video ids", path),
        "frames": frames.astype(np.float16),
        "frame_mask": np.asarray(frame_mask, dtype=bool),
        "frame_index": np.asarray(frame_index, dtype=np.int32),
    }
    for name in ("frame_mask", "frame_index"):
        if columns[name].shape != expected[:2]:
            raise ValueError(f"{path}: {name} has shape {columns[name].shape}, expected {expected[:2]}")
    columns |= _token_column(path, meta, "patch_embedding", patches,
                             (*expected[:2], meta.patch_grid ** 2, meta.embed_dim), meta.patch_grid > 0)
    return _write_shard(path, "videos", meta, columns)


def write_text_shard(
    path: Path,
    meta: FeatureMeta,
    text_ids: Sequence[str],
    video_ids: Sequence[str],
    captions: Sequence[str],
    embeddings: np.ndarray,
    tokens: np.ndarray | None = None,
    token_mask: np.ndarray | None = None,
) -> ShardRecord:
    """Write one text shard atomically. ``embeddings`` is ``[n_text, dim]``; row i is
    caption i, which describes video ``video_ids[i]``. ``tokens [n_text, n_token, dim]``
    and ``token_mask [n_text, n_token]`` are given exactly when ``meta.text_tokens``."""
    path = Path(path)
    embeddings = np.asarray(embeddings)
    n_text = len(text_ids)
    if embeddings.shape != (n_text, meta.embed_dim):
        raise ValueError(f"{path}: embeddings have shape {embeddings.shape}, expected {(n_text, meta.embed_dim)}")
    if not (len(video_ids) == len(captions) == n_text):
        raise ValueError(f"{path}: {n_text} text ids, {len(video_ids)} video ids, {len(captions)} captions")
    columns = {
        "text_id": _as_str_array(text_ids, "text ids", path),
        "video_id": _as_str_array(video_ids, "video ids", path),
        "caption": _as_str_array(captions, "captions", path),
        "embedding": embeddings.astype(np.float16),
    }
    columns |= _token_column(path, meta, "token_embedding", tokens, (n_text, None, meta.embed_dim), meta.text_tokens)
    if meta.text_tokens:
        token_mask = np.asarray(token_mask, dtype=bool)
        if token_mask.shape != columns["token_embedding"].shape[:2]:
            raise ValueError(f"{path}: token_mask has shape {token_mask.shape}, expected {columns['token_embedding'].shape[:2]}")
        columns["token_mask"] = token_mask
    return _write_shard(path, "texts", meta, columns)


def read_shard_record(path: Path) -> ShardRecord:
    """Recompute the manifest entry of an existing, complete shard (for resuming)."""
    path = Path(path)
    with h5py.File(path, "r") as h5:
        kind = str(h5.attrs["kind"])
        rows = len(h5["video_id"] if kind == "videos" else h5["text_id"])
    return _record(path, kind, rows)


def write_manifest(
    split_dir: Path,
    meta: FeatureMeta,
    shards: Sequence[ShardRecord],
    failed: Sequence[dict] = (),
    extra: dict | None = None,
) -> Path:
    """Assemble ``manifest.json`` for a split once all its shards exist.

    ``failed`` lists skipped inputs as dicts with ``id``, ``path`` and ``reason``."""
    split_dir = Path(split_dir)
    shards = sorted(shards, key=lambda r: r.file)
    manifest = {
        "format_version": FORMAT_VERSION,
        "software_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "meta": meta.to_json(),
        "counts": {
            kind: sum(r.rows for r in shards if r.kind == kind) for kind in ("videos", "texts")
        },
        "shards": [dataclasses.asdict(r) for r in shards],
        "failed": [dict(f) for f in failed],
        **(extra or {}),
    }
    final = split_dir / MANIFEST
    # A re-run that found every shard complete assembles the same manifest: keep the file
    # (its `created` too), so that the split's identity, the manifest SHA-256 that training
    # runs record, does not change and those runs still resume.
    if _same_but_created(final, manifest):
        return final
    write_json_atomic(final, manifest)
    return final


def _same_but_created(path: Path, manifest: dict) -> bool:
    try:
        before = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    now = json.loads(json.dumps(manifest))  # tuples -> lists, as the file holds them
    return isinstance(before, dict) and {k: v for k, v in before.items() if k != "created"} == {
        k: v for k, v in now.items() if k != "created"}


def manifest_sha256(split_dir: Path) -> str:
    """Identity of a split's features, recorded by training and evaluation runs."""
    return sha256_file(Path(split_dir) / MANIFEST)


# ------------------------------------------------------------------- one writer, one origin


def _found_identities(split_dir: Path) -> Iterator[tuple[Path, dict | None, bool]]:
    """``(file, identity or None if unreadable, whether it is a full writer identity)``
    for the stamp, the manifest and every shard in ``split_dir``."""
    stamp = split_dir / STAMP
    if stamp.is_file():
        try:
            yield stamp, json.loads(stamp.read_text())["identity"], True
        except (ValueError, KeyError, TypeError):
            yield stamp, None, True
    if (split_dir / MANIFEST).is_file():
        try:
            yield split_dir / MANIFEST, provenance(FeatureMeta.from_json(json.loads((split_dir / MANIFEST).read_text())["meta"])), False
        except (ValueError, KeyError, TypeError):
            yield split_dir / MANIFEST, None, False
    for shard in sorted([*split_dir.glob(f"{VIDEO_SHARD_PREFIX}*.h5"), *split_dir.glob(f"{TEXT_SHARD_PREFIX}*.h5")]):
        try:
            with h5py.File(shard, "r") as h5:
                yield shard, provenance(FeatureMeta.from_h5_attrs(h5.attrs)), False
        except (OSError, ValueError, KeyError, TypeError):
            yield shard, None, False


def check_split_dir(split_dir: Path, meta: FeatureMeta, settings: dict | None = None) -> None:
    """Raise :class:`SplitDirError` unless ``split_dir`` is new or holds only what a writer
    of ``meta`` (and the writer's own ``settings``: shard size, ...) made. Reads only."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        return
    mine = provenance(meta)
    for path, found, full in _found_identities(split_dir):
        if found is None:
            raise SplitDirError(f"{path}: unreadable, so this split cannot be resumed; pass --overwrite to replace "
                                "the split, or choose another --out")
        differ = provenance_diff(found, mine | (settings or {}) if full else mine)
        if differ:
            raise SplitDirError(f"{split_dir} holds features made otherwise ({path.name}: {'; '.join(differ[:3])}); "
                                "choose another --out, or pass --overwrite to replace the split")


def _replace_contents(split_dir: Path) -> None:
    """Empty a split directory for a new writer: the manifest goes first, so a crash
    half-way never leaves a readable split of old and new shards."""
    foreign = sorted(p.name for p in split_dir.iterdir()
                     if p.is_dir() or not any(fnmatch.fnmatch(p.name, pattern) for pattern in SPLIT_FILES))
    if foreign:
        raise SplitDirError(f"{split_dir} holds files that are not features ({', '.join(foreign[:3])}); --overwrite "
                            "deletes only feature files: move those away or choose another --out")
    (split_dir / MANIFEST).unlink(missing_ok=True)
    (split_dir / STAMP).unlink(missing_ok=True)
    _fsync_dir(split_dir)
    for path in split_dir.iterdir():
        if path.name != LOCK:
            path.unlink()


def _lock(fd: int, split_dir: Path) -> None:
    """A POSIX record lock (``lockf``), not ``flock``: it belongs to this process alone,
    so decode workers forked from it do not hold it after a ``kill -9``."""
    import fcntl

    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        raise SplitDirError(f"{split_dir}: another process{f' (pid {holder})' if holder else ''} is writing into this "
                            "split directory; wait for it to finish or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


@contextmanager
def writing_split(split_dir: Path, meta: FeatureMeta, settings: dict | None = None,
                  overwrite: bool = False) -> Iterator[bool]:
    """Hold ``split_dir`` for one writer of ``meta``; yields whether the split is already
    complete (its manifest exists, made the same way).

    A directory holding features made otherwise is refused before anything is touched
    (:func:`check_split_dir`), unless ``overwrite``, which empties it first. Another
    process holding the directory is refused at once. The writer's identity goes to
    ``provenance.json`` before the first shard, so a resume compares against what the
    first run recorded (a checkpoint replaced since shows in its SHA-256)."""
    split_dir = Path(split_dir)
    if not overwrite:
        check_split_dir(split_dir, meta, settings)
    split_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(split_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _lock(fd, split_dir)
        if overwrite:
            _replace_contents(split_dir)
        else:  # again, now that no other writer can change the directory under us
            check_split_dir(split_dir, meta, settings)
        for stale in split_dir.glob(".*.tmp-*"):  # left by a killed writer; never a final name
            stale.unlink()
        stamp = {"identity": provenance(meta) | (settings or {})}
        if not (split_dir / STAMP).is_file():  # else it says this already: checked above
            write_json_atomic(split_dir / STAMP, stamp)
        yield (split_dir / MANIFEST).is_file()
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- reading


@dataclass
class VideoBatch:
    """Rows of one video shard. frames ``[n_video, n_frames, dim]`` float16,
    frame_mask ``[n_video, n_frames]`` bool, patches ``[n_video, n_frames, G*G, dim]``
    float16 or None."""

    video_ids: list[str]
    frames: np.ndarray
    frame_mask: np.ndarray
    patches: np.ndarray | None = None


@dataclass
class TextBatch:
    """Rows of one text shard. embeddings ``[n_text, dim]`` float16; ``video_ids[i]``
    is the video caption i describes. tokens ``[n_text, n_token, dim]`` float16 and
    token_mask ``[n_text, n_token]`` bool, or None."""

    text_ids: list[str]
    video_ids: list[str]
    captions: list[str]
    embeddings: np.ndarray
    tokens: np.ndarray | None = None
    token_mask: np.ndarray | None = None


@dataclass
class SplitArrays:
    """A whole split in memory, as stored (float16), in shard order.

    ``text_to_video[i]`` is the row in ``frames`` of the video that caption i
    describes: the single index array that replaces per-video caption lists.

    frames ``[n_video, n_frames, dim]``, frame_mask ``[n_video, n_frames]``,
    text_embeddings ``[n_text, dim]``, text_to_video ``[n_text]`` int64.

    Token-level features, None unless the split has them: token_embeddings
    ``[n_text, n_token, dim]`` with token_mask ``[n_text, n_token]`` (n_token: the
    longest caption of the split; shorter shards are padded with masked zeros) and
    patch_embeddings ``[n_video, n_frames, G*G, dim]``.
    """

    meta: FeatureMeta
    video_ids: list[str]
    frames: np.ndarray
    frame_mask: np.ndarray
    text_ids: list[str]
    captions: list[str]
    text_embeddings: np.ndarray
    text_to_video: np.ndarray
    manifest_sha256: str
    token_embeddings: np.ndarray | None = None
    token_mask: np.ndarray | None = None
    patch_embeddings: np.ndarray | None = None


def _decode(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


_REQUIRED = {
    "videos": {"video_id": 1, "frames": 3, "frame_mask": 2, "frame_index": 2},
    "texts": {"text_id": 1, "video_id": 1, "caption": 1, "embedding": 2},
}


class FeatureSplit:
    """A validated split directory.

    Opening reads the manifest and every shard's header and id columns, and checks
    them against each other: shard present and readable, row counts, shapes against
    the manifest's ``embed_dim`` and ``num_frames``, duplicate ids, captions naming
    unknown videos, and (``verify_checksums``) each shard's SHA-256. Values (NaN or
    inf rows) are checked as rows are read, so a corrupt row never reaches a model.
    Any fault raises :class:`FeatureFormatError` listing every problem found.
    """

    def __init__(self, split_dir: Path, verify_checksums: bool = True, raise_on_problems: bool = True):
        self.path = Path(split_dir)
        manifest_path = self.path / MANIFEST
        self.manifest, self.meta, self.shards = read_manifest(self.path)
        self._provenance = provenance(self.meta)
        major = str(self.manifest.get("format_version", "?")).split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            raise FeatureFormatError(
                [f"{manifest_path}: format version {self.manifest.get('format_version')} "
                 f"cannot be read by this software (format {FORMAT_VERSION})"]
            )
        self.problems: list[str] = []
        self.readable: list[ShardRecord] = []
        self.video_ids: list[str] = []
        self.text_ids: list[str] = []
        self.text_video_ids: list[str] = []
        self.captions: list[str] = []
        for record in self.shards:
            self.problems += self._open_shard(record, verify_checksums)
        self.problems += self._check_ids()
        if self.problems and raise_on_problems:
            raise FeatureFormatError(self.problems)
        row = {vid: i for i, vid in enumerate(self.video_ids)}
        self.text_to_video = np.array([row.get(v, -1) for v in self.text_video_ids], dtype=np.int64)

    def shard_path(self, record: ShardRecord) -> Path:
        return self.path / record.file

    def _open_shard(self, record: ShardRecord, verify_checksums: bool) -> list[str]:
        path = self.shard_path(record)
        if not path.is_file():
            return [f"{path}: shard listed in the manifest is missing"]
        problems = []
        size_ok = path.stat().st_size == record.bytes
        if not size_ok:
            problems.append(f"{path}: {path.stat().st_size} bytes on disk, manifest says {record.bytes} (truncated or replaced)")
        try:
            h5 = h5py.File(path, "r")
        except OSError as exc:
            return problems + [f"{path}: not a readable HDF5 file ({exc})"]
        try:
            with h5:
                problems += self._read_header(h5, path, record)
        except (OSError, KeyError, ValueError) as exc:
            return problems + [f"{path}: unreadable contents ({exc})"]
        if problems:
            return problems
        self.readable.append(record)
        if verify_checksums and sha256_file(path) != record.sha256:
            problems.append(f"{path}: SHA-256 does not match the manifest (file changed after it was written)")
        return problems

    def _read_header(self, h5: h5py.File, path: Path, record: ShardRecord) -> list[str]:
        """Structure of one open shard against the manifest; collects its ids."""
        problems = []
        if h5.attrs.get("kind") != record.kind:
            problems.append(f"{path}: shard kind {h5.attrs.get('kind')!r}, manifest says {record.kind!r}")
            return problems
        for name, ndim in _REQUIRED[record.kind].items():
            if name not in h5:
                problems.append(f"{path}: dataset '{name}' is missing")
            elif h5[name].ndim != ndim or h5[name].shape[0] != record.rows:
                problems.append(f"{path}: dataset '{name}' has shape {h5[name].shape}, expected {ndim}-d with {record.rows} rows")
        if problems:
            return problems
        dim = self.meta.embed_dim
        if record.kind == "videos":
            want = (record.rows, self.meta.num_frames, dim)
            if h5["frames"].shape != want:
                problems.append(f"{path}: frames have shape {h5['frames'].shape}, expected {want} (embed_dim {dim}, num_frames {self.meta.num_frames} in the manifest)")
            if h5["frame_mask"].shape != want[:2]:
                problems.append(f"{path}: frame_mask has shape {h5['frame_mask'].shape}, expected {want[:2]}")
            if self.meta.patch_grid:
                grid = (*want[:2], self.meta.patch_grid ** 2, dim)
                if "patch_embedding" not in h5 or h5["patch_embedding"].shape != grid:
                    found = h5["patch_embedding"].shape if "patch_embedding" in h5 else "missing"
                    problems.append(f"{path}: patch_embedding is {found}, expected {grid} (patch_grid {self.meta.patch_grid} in the manifest)")
            self.video_ids += _decode(h5["video_id"][:])
        else:
            if h5["embedding"].shape[1] != dim:
                problems.append(f"{path}: text embeddings have dim {h5['embedding'].shape[1]}, manifest says embed_dim {dim}")
            if self.meta.text_tokens:
                tokens = h5["token_embedding"].shape if "token_embedding" in h5 else None
                mask = h5["token_mask"].shape if "token_mask" in h5 else None
                if tokens is None or len(tokens) != 3 or tokens[0] != record.rows or tokens[2] != dim or mask != tokens[:2]:
                    problems.append(f"{path}: token_embedding is {tokens or 'missing'} with token_mask {mask or 'missing'}, "
                                    f"expected [{record.rows}, n_token, {dim}] and [{record.rows}, n_token] (text_tokens in the manifest)")
            self.text_ids += _decode(h5["text_id"][:])
            self.text_video_ids += _decode(h5["video_id"][:])
            self.captions += _decode(h5["caption"][:])
        try:
            differ = provenance_diff(self._provenance, provenance(FeatureMeta.from_h5_attrs(h5.attrs)),
                                     "in the manifest", "in this shard")
        except (TypeError, ValueError) as exc:
            differ = [f"unreadable attributes ({exc})"]
        if differ:
            problems.append(f"{path}: made otherwise than the manifest says, a mixed split ({'; '.join(differ[:3])}); "
                            "re-create the split with --overwrite")
        return problems

    def _check_ids(self) -> list[str]:
        problems = []
        where = self.path / MANIFEST
        for what, ids in (("video", self.video_ids), ("text", self.text_ids)):
            if len(ids) != len(set(ids)):
                seen, dups = set(), []
                for i in ids:
                    if i in seen:
                        dups.append(i)
                    seen.add(i)
                problems.append(f"{self.path}: {len(dups)} duplicate {what} ids, e.g. {dups[:3]}")
        known = set(self.video_ids)
        unknown = sorted({v for v in self.text_video_ids if v not in known})
        if unknown:
            problems.append(f"{self.path}: captions point at {len(unknown)} unknown videos, e.g. {unknown[:3]}")
        counts = self.manifest.get("counts", {})
        for kind, ids in (("videos", self.video_ids), ("texts", self.text_ids)):
            if counts.get(kind) != len(ids):
                problems.append(f"{where}: counts.{kind} = {counts.get(kind)} but the shards hold {len(ids)} rows")
        return problems

    # -- streaming ------------------------------------------------------------------

    def _records(self, kind: str) -> list[ShardRecord]:
        return [r for r in self.shards if r.kind == kind]

    def iter_videos(self, patches: bool = True) -> Iterator[VideoBatch]:
        """One batch per video shard, in shard order; memory bounded by a shard.
        ``patches=False`` leaves a split's patch tokens unread (None)."""
        read_patches = patches and bool(self.meta.patch_grid)
        for record in self._records("videos"):
            path = self.shard_path(record)
            with h5py.File(path, "r") as h5:
                frames = h5["frames"][:]
                mask = h5["frame_mask"][:]
                ids = _decode(h5["video_id"][:])
                patch_rows = h5["patch_embedding"][:] if read_patches else None
            _raise_on_bad_rows(path, "frames", frames, ids)
            if patch_rows is not None:
                _raise_on_bad_rows(path, "patch_embedding", patch_rows, ids)
            yield VideoBatch(ids, frames, mask, patch_rows)

    def iter_texts(self, tokens: bool = True) -> Iterator[TextBatch]:
        """One batch per text shard, in shard order. ``tokens=False`` leaves a split's
        word tokens unread (None)."""
        read_tokens = tokens and self.meta.text_tokens
        for record in self._records("texts"):
            path = self.shard_path(record)
            with h5py.File(path, "r") as h5:
                batch = TextBatch(
                    _decode(h5["text_id"][:]),
                    _decode(h5["video_id"][:]),
                    _decode(h5["caption"][:]),
                    h5["embedding"][:],
                    *((h5["token_embedding"][:], h5["token_mask"][:]) if read_tokens else ()),
                )
            _raise_on_bad_rows(path, "embedding", batch.embeddings, batch.text_ids)
            if batch.tokens is not None:
                _raise_on_bad_rows(path, "token_embedding", batch.tokens, batch.text_ids)
            yield batch

    def load(self, text_tokens: bool = True, patches: bool = True) -> SplitArrays:
        """The whole split in memory (float16, as stored), for training and evaluation.
        ``text_tokens=False`` / ``patches=False`` leave the split's word / patch tokens
        unread (None in the result): they are its largest arrays (several GB on a full
        dataset), so a reader that never uses them should not hold them."""
        videos = list(self.iter_videos(patches))
        texts = list(self.iter_texts(text_tokens))
        dim, n_frames = self.meta.embed_dim, self.meta.num_frames
        grid = self.meta.patch_grid if patches else 0
        tokens = token_mask = patch_embeddings = None
        if text_tokens and self.meta.text_tokens:
            n_token = max((b.tokens.shape[1] for b in texts), default=0)
            tokens = _concat([_pad_axis1(b.tokens, n_token) for b in texts], (0, n_token, dim), np.float16)
            token_mask = _concat([_pad_axis1(b.token_mask, n_token) for b in texts], (0, n_token), bool)
        if grid:
            patch_embeddings = _concat([b.patches for b in videos], (0, n_frames, grid * grid, dim), np.float16)
        return SplitArrays(
            meta=self.meta,
            video_ids=list(self.video_ids),
            frames=_concat([b.frames for b in videos], (0, n_frames, dim), np.float16),
            frame_mask=_concat([b.frame_mask for b in videos], (0, n_frames), bool),
            text_ids=list(self.text_ids),
            captions=list(self.captions),
            text_embeddings=_concat([b.embeddings for b in texts], (0, dim), np.float16),
            text_to_video=self.text_to_video.copy(),
            manifest_sha256=manifest_sha256(self.path),
            token_embeddings=tokens,
            token_mask=token_mask,
            patch_embeddings=patch_embeddings,
        )

    def check_values(self) -> list[str]:
        """Scan every row for NaN/inf and every clip for an all-masked frame set.
        Reads block by block (memory bounded by the block, not the shard); covers the
        shards whose structure was sound; returns the problems rather than raising."""
        problems = []
        for record in self.readable:
            path = self.shard_path(record)
            names = ("frames", "patch_embedding") if record.kind == "videos" else ("embedding", "token_embedding")
            with h5py.File(path, "r") as h5:
                for start in range(0, record.rows, _ROWS_PER_CHECK):
                    block = slice(start, start + _ROWS_PER_CHECK)
                    ids = _decode(h5["video_id" if record.kind == "videos" else "text_id"][block])
                    for name in (n for n in names if n in h5):
                        try:
                            _raise_on_bad_rows(path, name, h5[name][block], ids, start)
                        except FeatureFormatError as exc:
                            problems += exc.problems
                    if record.kind == "videos":
                        empty = ~h5["frame_mask"][block].any(axis=1)
                        if empty.any():
                            problems.append(f"{path}: {int(empty.sum())} videos have no real frame (frame_mask all False), e.g. row {start + int(np.argmax(empty))}")
        return problems


def _concat(blocks: list[np.ndarray], empty_shape: tuple, dtype) -> np.ndarray:
    return np.concatenate(blocks) if blocks else np.zeros(empty_shape, dtype=dtype)


def _pad_axis1(values: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad (False for bool) axis 1 of ``values`` to ``size``: shards trim tokens to
    their own longest caption."""
    pad = [(0, 0)] * values.ndim
    pad[1] = (0, size - values.shape[1])
    return np.pad(values, pad)


def _raise_on_bad_rows(path: Path, name: str, values: np.ndarray, ids: list[str], offset: int = 0) -> None:
    # reduce over every axis but the first: reshape(len, -1) is ambiguous for a 0-row shard
    finite = np.isfinite(values).all(axis=tuple(range(1, values.ndim)))
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise FeatureFormatError(
            [f"{path}: {len(bad)} rows of '{name}' hold NaN or inf, e.g. row {offset + bad[0]} (id {ids[bad[0]]!r})"]
        )


def read_manifest(split_dir: Path) -> tuple[dict, FeatureMeta, list[ShardRecord]]:
    """A split's manifest alone, no shard opened: (the parsed ``manifest.json``, its
    FeatureMeta, its shard records); what a command checks before it reads any features.
    FeatureFormatError when the manifest is missing or unreadable."""
    manifest_path = Path(split_dir) / MANIFEST
    if not manifest_path.is_file():
        raise FeatureFormatError([f"{manifest_path}: missing (not a features split directory)"])
    try:
        manifest = json.loads(manifest_path.read_text())
        return manifest, FeatureMeta.from_json(manifest["meta"]), [ShardRecord(**s) for s in manifest["shards"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise FeatureFormatError([f"{manifest_path}: unreadable manifest ({exc!r})"]) from exc


def open_split(split_dir: Path, verify_checksums: bool = True) -> FeatureSplit:
    return FeatureSplit(split_dir, verify_checksums)


def load_split(split_dir: Path, verify_checksums: bool = True, text_tokens: bool = True,
               patches: bool = True) -> SplitArrays:
    """:meth:`FeatureSplit.load` of ``split_dir``: ``text_tokens`` / ``patches`` False
    leave those token features unread."""
    return FeatureSplit(split_dir, verify_checksums).load(text_tokens, patches)


def check_split(split_dir: Path) -> list[str]:
    """Every fault of a split directory (structure, checksums, values); [] when sound."""
    try:
        split = FeatureSplit(split_dir, verify_checksums=True, raise_on_problems=False)
    except FeatureFormatError as exc:  # the manifest itself is unusable
        return exc.problems
    return split.problems + split.check_values()


def locate_split(path: Path, split: str) -> Path:
    """The split directory a user means by ``path``: ``path`` itself when it is one,
    else ``path/split``. Otherwise FeatureFormatError with one line saying what ``path``
    is and, where one is near, which directory was probably meant."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if (path / split / MANIFEST).is_file():
        return path / split
    raise FeatureFormatError([f"{path}: {_what_is(path)}, and holds no '{split}/' split{_did_you_mean(path, (split,))}"])


def locate_features(path: Path, splits: Sequence[str]) -> Path:
    """The features directory (holding each of ``splits``) a user means by ``path``;
    FeatureFormatError with one line and a suggestion otherwise (a split directory given
    for its parent, a directory one level above the features)."""
    path = Path(path)
    if all((path / s / MANIFEST).is_file() for s in splits):
        return path
    missing = ", ".join(f"{s}/" for s in splits if not (path / s / MANIFEST).is_file())
    raise FeatureFormatError([f"{path}: {_what_is(path)}, and holds no {missing} split{_did_you_mean(path, splits)}"])


def _what_is(path: Path) -> str:
    if not path.exists():
        return "no such directory"
    if not path.is_dir():
        return "a file, not a features directory"
    if (path / MANIFEST).is_file():
        return "a split directory"
    if (path / "run.json").is_file() or (path / "config.json").is_file():
        return "a run directory, not features"
    return "not a features directory"


def _did_you_mean(path: Path, splits: Sequence[str]) -> str:
    """``"; did you mean X?"`` for the nearest directories holding ``splits``: the parent
    (a split directory given for its features directory), or one or two levels below
    ``path`` (a features root given for ``<root>/<dataset>/<model>``); no deeper, so a
    mistaken ``--features ~`` does not walk the whole disk."""
    holds = lambda d: all((d / s / MANIFEST).is_file() for s in splits)  # noqa: E731
    if path.exists() and holds(path.parent) and path.parent != path:
        return f"; did you mean {path.parent}?"
    found = []
    if path.is_dir():
        for pattern in (f"*/*/{MANIFEST}", f"*/*/*/{MANIFEST}"):
            for manifest in sorted(path.glob(pattern)):
                candidate = manifest.parent.parent
                if holds(candidate) and candidate not in found:
                    found.append(candidate)
    if not found:
        return " (tmass features info DIR shows what a directory holds)"
    return f"; did you mean {' or '.join(map(str, found[:3]))}?"


def find_splits(directory: Path) -> list[Path]:
    """Split directories (those holding a manifest) at or below ``directory``."""
    directory = Path(directory)
    return sorted(p.parent for p in directory.rglob(MANIFEST))
