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

Readers look datasets up by name and ignore names they do not know, so additions are
backward compatible and bump only the minor format version. Reserved for token-level
heads: ``token_embedding [n_text, n_token, token_dim]`` float16 with
``token_mask [n_text, n_token]`` bool in text shards.

Every shard carries the split's metadata (:class:`FeatureMeta`) as HDF5 attributes,
plus ``kind`` and ``format_version``, so a single file is self-describing and readable
with plain h5py (and stackable with ``dask.array.from_array``) without this package.

``manifest.json`` lists the shards with their row counts, byte sizes and SHA-256, the
metadata, the per-kind totals and the inputs that extraction skipped (``failed``: id,
path, reason). Shards and manifest are written atomically (temporary name, fsync,
rename): a file with a final name is always complete, which is what makes extraction
resumable and a killed job harmless.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from tmass import __version__

FORMAT_VERSION = "1.0"
MANIFEST = "manifest.json"
VIDEO_SHARD_PREFIX = "videos-"
TEXT_SHARD_PREFIX = "texts-"

_STR = h5py.string_dtype(encoding="utf-8")
_ROWS_PER_CHECK = 4096  # rows read at once when scanning values; bounds memory of `check`


class FeatureFormatError(Exception):
    """A features directory violates the format. ``problems`` lists every fault found,
    each naming the file it is in."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


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


def _commit(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` and rename it to ``final`` so that ``final`` is complete or absent."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _record(path: Path, kind: str, rows: int) -> ShardRecord:
    return ShardRecord(path.name, kind, rows, path.stat().st_size, sha256_file(path))


def _write_shard(path: Path, kind: str, meta: FeatureMeta, columns: dict) -> ShardRecord:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    rows = len(next(iter(columns.values())))
    try:
        with h5py.File(tmp, "w") as h5:
            h5.attrs.update(meta.h5_attrs())
            h5.attrs["kind"] = kind
            h5.attrs["format_version"] = FORMAT_VERSION
            h5.attrs["software_version"] = __version__
            for name, values in columns.items():
                if values.dtype.kind in "OU":
                    h5.create_dataset(name, data=np.asarray(values, dtype=object), dtype=_STR)
                else:
                    h5.create_dataset(name, data=values)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _record(path, kind, rows)


def _as_str_array(values: Sequence[str], what: str, path: Path) -> np.ndarray:
    array = np.asarray(list(values), dtype=object)
    for value in array:
        if not isinstance(value, str):
            raise ValueError(f"{path}: {what} must be strings, got {type(value).__name__}")
    return array


def write_video_shard(
    path: Path,
    meta: FeatureMeta,
    video_ids: Sequence[str],
    frames: np.ndarray,
    frame_mask: np.ndarray | None = None,
    frame_index: np.ndarray | None = None,
) -> ShardRecord:
    """Write one video shard atomically.

    ``frames`` is ``[n_video, n_frames, dim]`` (stored as float16); ``frame_mask``
    ``[n_video, n_frames]`` bool (default: all real); ``frame_index``
    ``[n_video, n_frames]`` int (default: 0..n_frames-1, -1 where masked)."""
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
    return _write_shard(path, "videos", meta, columns)


def write_text_shard(
    path: Path,
    meta: FeatureMeta,
    text_ids: Sequence[str],
    video_ids: Sequence[str],
    captions: Sequence[str],
    embeddings: np.ndarray,
) -> ShardRecord:
    """Write one text shard atomically. ``embeddings`` is ``[n_text, dim]``; row i is
    caption i, which describes video ``video_ids[i]``."""
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
    tmp = _tmp_name(final)
    try:
        with open(tmp, "w") as fh:
            json.dump(manifest, fh, indent=2)
            fh.write("\n")
        _commit(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def manifest_sha256(split_dir: Path) -> str:
    """Identity of a split's features, recorded by training and evaluation runs."""
    return sha256_file(Path(split_dir) / MANIFEST)


# ----------------------------------------------------------------------------- reading


@dataclass
class VideoBatch:
    """Rows of one video shard. frames ``[n_video, n_frames, dim]`` float16,
    frame_mask ``[n_video, n_frames]`` bool."""

    video_ids: list[str]
    frames: np.ndarray
    frame_mask: np.ndarray


@dataclass
class TextBatch:
    """Rows of one text shard. embeddings ``[n_text, dim]`` float16; ``video_ids[i]``
    is the video caption i describes."""

    text_ids: list[str]
    video_ids: list[str]
    captions: list[str]
    embeddings: np.ndarray


@dataclass
class SplitArrays:
    """A whole split in memory, as stored (float16), in shard order.

    ``text_to_video[i]`` is the row in ``frames`` of the video that caption i
    describes: the single index array that replaces per-video caption lists.

    frames ``[n_video, n_frames, dim]``, frame_mask ``[n_video, n_frames]``,
    text_embeddings ``[n_text, dim]``, text_to_video ``[n_text]`` int64.
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
        if not manifest_path.is_file():
            raise FeatureFormatError([f"{manifest_path}: missing (not a features split directory)"])
        try:
            self.manifest = json.loads(manifest_path.read_text())
            self.meta = FeatureMeta.from_json(self.manifest["meta"])
            self.shards = [ShardRecord(**s) for s in self.manifest["shards"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise FeatureFormatError([f"{manifest_path}: unreadable manifest ({exc!r})"]) from exc
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
            self.video_ids += _decode(h5["video_id"][:])
        else:
            if h5["embedding"].shape[1] != dim:
                problems.append(f"{path}: text embeddings have dim {h5['embedding'].shape[1]}, manifest says embed_dim {dim}")
            self.text_ids += _decode(h5["text_id"][:])
            self.text_video_ids += _decode(h5["video_id"][:])
            self.captions += _decode(h5["caption"][:])
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

    def iter_videos(self) -> Iterator[VideoBatch]:
        """One batch per video shard, in shard order; memory bounded by a shard."""
        for record in self._records("videos"):
            path = self.shard_path(record)
            with h5py.File(path, "r") as h5:
                frames = h5["frames"][:]
                mask = h5["frame_mask"][:]
                ids = _decode(h5["video_id"][:])
            _raise_on_bad_rows(path, "frames", frames, ids)
            yield VideoBatch(ids, frames, mask)

    def iter_texts(self) -> Iterator[TextBatch]:
        """One batch per text shard, in shard order."""
        for record in self._records("texts"):
            path = self.shard_path(record)
            with h5py.File(path, "r") as h5:
                batch = TextBatch(
                    _decode(h5["text_id"][:]),
                    _decode(h5["video_id"][:]),
                    _decode(h5["caption"][:]),
                    h5["embedding"][:],
                )
            _raise_on_bad_rows(path, "embedding", batch.embeddings, batch.text_ids)
            yield batch

    def load(self) -> SplitArrays:
        """The whole split in memory (float16, as stored), for training and evaluation."""
        videos = list(self.iter_videos())
        texts = list(self.iter_texts())
        dim, n_frames = self.meta.embed_dim, self.meta.num_frames
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
        )

    def check_values(self) -> list[str]:
        """Scan every row for NaN/inf and every clip for an all-masked frame set.
        Reads block by block (memory bounded by the block, not the shard); covers the
        shards whose structure was sound; returns the problems rather than raising."""
        problems = []
        for record in self.readable:
            path = self.shard_path(record)
            name = "frames" if record.kind == "videos" else "embedding"
            with h5py.File(path, "r") as h5:
                for start in range(0, record.rows, _ROWS_PER_CHECK):
                    block = slice(start, start + _ROWS_PER_CHECK)
                    ids = _decode(h5["video_id" if record.kind == "videos" else "text_id"][block])
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


def _raise_on_bad_rows(path: Path, name: str, values: np.ndarray, ids: list[str], offset: int = 0) -> None:
    # reduce over every axis but the first: reshape(len, -1) is ambiguous for a 0-row shard
    finite = np.isfinite(values).all(axis=tuple(range(1, values.ndim)))
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise FeatureFormatError(
            [f"{path}: {len(bad)} rows of '{name}' hold NaN or inf, e.g. row {offset + bad[0]} (id {ids[bad[0]]!r})"]
        )


def open_split(split_dir: Path, verify_checksums: bool = True) -> FeatureSplit:
    return FeatureSplit(split_dir, verify_checksums)


def load_split(split_dir: Path, verify_checksums: bool = True) -> SplitArrays:
    return FeatureSplit(split_dir, verify_checksums).load()


def check_split(split_dir: Path) -> list[str]:
    """Every fault of a split directory (structure, checksums, values); [] when sound."""
    try:
        split = FeatureSplit(split_dir, verify_checksums=True, raise_on_problems=False)
    except FeatureFormatError as exc:  # the manifest itself is unusable
        return exc.problems
    return split.problems + split.check_values()


def find_splits(directory: Path) -> list[Path]:
    """Split directories (those holding a manifest) at or below ``directory``."""
    directory = Path(directory)
    return sorted(p.parent for p in directory.rglob(MANIFEST))
