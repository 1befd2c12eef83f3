"""Dataset adapters: the annotation formats the community distributes -> videos and captions.

Each adapter reads one dataset's files under ``--data-root`` and returns a
:class:`SplitData`: the split's videos (sorted by id, each with the path of its file) and
its captions (``text_id`` = ``<video_id>#<k>``, k the caption's position among that
video's captions in the annotation). Each adapter's docstring is its expected directory
layout and the standard protocol's split sizes; a root that does not match raises
:class:`LayoutError` quoting that layout and listing what was found. A dataset's splits
are :data:`DATASET_SPLITS`.

Reading rules, the same in every adapter:

* **Captions arrive exactly.** A caption is the annotation's field, character for
  character: no whitespace stripping, no Unicode normalisation, no line splitting. Files
  are decoded as UTF-8 with a leading byte-order mark dropped (``utf-8-sig``), so a BOM
  never eats the first row. Lines end only at ``\\n``, ``\\r\\n`` or ``\\r``, never at
  U+2028, U+0085 or a form feed (which ``str.splitlines`` would split). CSV files go
  through :mod:`csv` as a whole, so quoted fields keep embedded newlines, quotes and
  commas; tab-separated files (LSMDC) are read with quoting off, so a caption that
  begins with a quote character is kept whole. The one caption built rather than read
  is DiDeMo's paragraph (its descriptions joined by single spaces). Undecodable bytes
  are kept as escapes, so one bad caption costs that caption, not the file: a caption
  that is blank or not valid UTF-8 is skipped and recorded in ``SplitData.failed``
  (id, path, reason), as is a malformed annotation row.
* **Videos are found under the names the datasets ship them with.** The video folder is
  indexed once (every file at any depth; hidden files and folders, whose names start
  with a dot, are left out). A video named ``N`` in the annotation is the
  file named exactly ``N``; failing that, a file whose *stem* is ``N`` or ``N`` without
  its container extension (or trailing bare dot), with any extension of
  :data:`VIDEO_EXTENSIONS` in any case: ``abc.mov`` is found as ``abc.mov``, then as
  ``abc.mov.mp4`` or ``abc.MP4``. A stem is everything before the final extension
  (``a.b.mp4`` -> ``a.b``). Two files that could both be one video are a
  :class:`LayoutError` naming both, never an arbitrary pick. A video absent on disk is
  kept, with the path it was expected at: the decoder records it as ``missing file``.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")  # every named split; a dataset has some of them (DATASET_SPLITS)
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".mov", ".avi", ".m4v", ".3gp", ".3g2", ".mts", ".m2ts", ".ts", ".mpg", ".mpeg", ".wmv", ".flv",
    ".webm", ".mkv", ".ogv",
})


class LayoutError(Exception):
    """The data root does not hold what the adapter expects."""


@dataclass(frozen=True)
class Video:
    id: str
    path: Path


@dataclass(frozen=True)
class Caption:
    text_id: str
    video_id: str
    text: str


@dataclass
class SplitData:
    """One split as the adapter read it. ``videos`` are sorted by id and unique;
    ``captions`` follow the video order; ``failed`` lists captions rejected on reading.
    ``incremental``: videos may be added to the data root later, and extraction appends
    them in new partitions instead of re-planning the split (the ``folder`` dataset)."""

    dataset: str
    split: str
    videos: list[Video]
    captions: list[Caption]
    failed: list[dict] = field(default_factory=list)
    notes: dict = field(default_factory=dict)
    incremental: bool = False


# ------------------------------------------------------------------- reading annotations


def _layout(adapter: Callable) -> str:
    return inspect.getdoc(adapter).split("\n\n")[0]


def _listing(root: Path, limit: int = 20) -> str:
    if not root.is_dir():
        return f"{root} does not exist or is not a directory"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "an empty directory"


def _require(adapter: Callable, root: Path, files: Iterable[str]) -> None:
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise LayoutError(
            f"{root}: missing {', '.join(missing)}.\nExpected layout:\n{_layout(adapter)}\nFound: {_listing(root)}")


def _video_dir(adapter: Callable, root: Path, candidates: Iterable[str]) -> Path:
    for candidate in candidates:
        if (root / candidate).is_dir():
            return root / candidate
    raise LayoutError(
        f"{root}: no video folder (looked for {', '.join(c + '/' for c in candidates)}).\n"
        f"Expected layout:\n{_layout(adapter)}\nFound: {_listing(root)}")


def _read_text(path: Path) -> str:
    # utf-8-sig drops a BOM; surrogateescape keeps undecodable bytes as lone surrogates,
    # caught per caption by caption_problem
    return path.read_bytes().decode("utf-8-sig", errors="surrogateescape")


def _lines(path: Path) -> io.StringIO:
    """The file as a text stream whose lines end only at \\n, \\r\\n or \\r (newline=''
    leaves the endings to the csv module, which needs them untranslated)."""
    return io.StringIO(_read_text(path), newline="")


def _read_json(path: Path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise LayoutError(f"{path}: not valid JSON ({exc})") from exc


def _read_ids(path: Path) -> list[str]:
    """One id per line; surrounding whitespace and blank lines are not part of any id."""
    return [line.strip() for line in _lines(path) if line.strip()]


def _read_csv(path: Path, columns: list[str]) -> tuple[list[dict], list[dict]]:
    """Rows of a CSV file with a header, and the rows too short to hold ``columns``."""
    reader = csv.DictReader(_lines(path))
    header = reader.fieldnames or []
    missing = [c for c in columns if c not in header]
    if missing:
        raise LayoutError(f"{path}: expected columns {', '.join(columns)}; the header has {', '.join(header) or 'nothing'}")
    rows, failed = [], []
    for row in reader:
        if any(row[c] is None for c in columns):
            failed.append({"id": f"line {reader.line_num}", "path": str(path),
                           "reason": f"malformed annotation row (fewer fields than the header's {len(header)})"})
        else:
            rows.append(row)
    return rows, failed


def _read_tsv(path: Path, n_fields: int) -> tuple[list[list[str]], list[dict]]:
    """Rows of a headerless tab-separated file with quoting off (a field may begin with a
    quote character), and the lines that do not have ``n_fields`` fields."""
    reader = csv.reader(_lines(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    rows, failed = [], []
    for fields in reader:
        if not fields or fields == [""]:
            continue
        if len(fields) != n_fields:
            failed.append({"id": f"line {reader.line_num}", "path": str(path),
                           "reason": f"malformed annotation line ({len(fields)} tab-separated fields, expected {n_fields})"})
        else:
            rows.append(fields)
    return rows, failed


def caption_problem(text: str) -> str | None:
    """Why a caption cannot be used, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "caption is not valid UTF-8"
    if not text.strip():
        return "empty caption"
    return None


def _by_video(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for video_id, text in pairs:
        grouped.setdefault(video_id, []).append(text)
    return grouped


# ---------------------------------------------------------------------- finding videos


def _container(name: str) -> str | None:
    """The name without its container extension or bare trailing dot, or None if it has
    neither."""
    stem, ext = os.path.splitext(name)
    return stem if ext == "." or ext.lower() in VIDEO_EXTENSIONS else None


class _VideoIndex:
    """Every file at any depth under a folder, listed once, by name (``relative``: by
    path relative to the folder, with / separators) and, for files with a container
    extension, by stem. Hidden files and folders (names starting with a dot) are left
    out."""

    def __init__(self, folder: Path, relative: bool = False):
        self.folder = folder
        self.exact: dict[str, list[Path]] = {}
        self.stems: dict[str, list[Path]] = {}
        for directory, dirs, names in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(n for n in names if not n.startswith(".")):
                path = Path(directory, name)
                key = path.relative_to(folder).as_posix() if relative else name
                self.exact.setdefault(key, []).append(path)
                stem, ext = os.path.splitext(key)
                if ext.lower() in VIDEO_EXTENSIONS:
                    self.stems.setdefault(stem, []).append(path)

    def videos(self) -> list[str]:
        """The keys of the files with a container extension, sorted."""
        return sorted(k for k in self.exact if os.path.splitext(k)[1].lower() in VIDEO_EXTENSIONS)

    def find(self, name: str) -> list[Path]:
        """The files that could be video ``name``: the exact name if present, else every
        file whose stem is the name with or without its container extension."""
        if name in self.exact:
            return self.exact[name]
        bare = _container(name)
        return self.stems.get(name, []) + (self.stems.get(bare, []) if bare is not None else [])

    def resolve(self, names: Iterable[str], default_ext: str) -> dict[str, Path]:
        """The path of each named video; a missing one gets the path it was expected at."""
        paths, clashes = {}, []
        for name in names:
            found = self.find(name)
            if len(found) > 1:
                clashes.append(f"{name}: {', '.join(str(p) for p in found)}")
            elif found:
                paths[name] = found[0]
            else:
                paths[name] = self.folder / (name if _container(name) is not None else name + default_ext)
        if clashes:
            raise LayoutError(f"{self.folder}: {len(clashes)} videos match more than one file ({'; '.join(clashes[:3])}"
                              f"{' ...' if len(clashes) > 3 else ''}); keep one file per video")
        return paths


def _screen(videos: list[Video], captions: dict[str, list[str]], source: Path) -> tuple[list[Caption], list[dict]]:
    """The captions of ``videos`` in video order, and those that cannot be used."""
    kept, failed = [], []
    for video in videos:
        for k, text in enumerate(captions.get(video.id, [])):
            text_id = f"{video.id}#{k}"
            problem = caption_problem(text)
            if problem:
                failed.append({"id": text_id, "path": str(source), "reason": problem})
            else:
                kept.append(Caption(text_id, video.id, text))
    return kept, failed


def _assemble(dataset: str, split: str, video_ids: Iterable[str], captions: dict[str, list[str]],
              folder: Path, default_ext: str, source: Path, failed: Iterable[dict] = (),
              notes: dict | None = None) -> SplitData:
    """Videos (deduplicated, sorted) with their files found in ``folder``, and their
    captions; ``failed`` holds rows already rejected while reading."""
    ids = sorted(set(video_ids))
    if not ids:
        raise LayoutError(f"{source}: no videos for split {split!r}")
    paths = _VideoIndex(folder).resolve(ids, default_ext)
    videos = [Video(v, paths[v]) for v in ids]
    kept, rejected = _screen(videos, captions, source)
    return SplitData(dataset, split, videos, kept, [*failed, *rejected], notes or {})


# ---------------------------------------------------------------------------- adapters


def msrvtt(root: Path, split: str) -> SplitData:
    """DATA_ROOT/
        MSRVTT_data.json          {"sentences": [{"video_id", "caption", "sen_id"}, ...]} (train captions)
        MSRVTT_train.9k.csv       train split: column video_id (9,000 videos, 20 captions each)
        MSRVTT_JSFUSION_test.csv  1k-A test: key,vid_key,video_id,sentence (1,000 videos, one caption each)
        videos/all/<video_id>.mp4 (or vids/ as X-Pool lays it out, or videos/)

    The standard protocol (1k-A): 9,000 train videos with their 180,000 captions, in
    ``sen_id`` order; 1,000 test videos with one caption each. The test split needs only
    the test CSV and the videos."""
    if split == "test":
        _require(msrvtt, root, ["MSRVTT_JSFUSION_test.csv"])
        source = root / "MSRVTT_JSFUSION_test.csv"
        rows, failed = _read_csv(source, ["video_id", "sentence"])
        captions = _by_video((r["video_id"], r["sentence"]) for r in rows)
        ids = list(captions)
    else:
        _require(msrvtt, root, ["MSRVTT_data.json", "MSRVTT_train.9k.csv"])
        rows, failed = _read_csv(root / "MSRVTT_train.9k.csv", ["video_id"])
        ids = [r["video_id"] for r in rows]
        source = root / "MSRVTT_data.json"
        data = _read_json(source)
        if "sentences" not in data:
            raise LayoutError(f"{source}: no 'sentences' list (is this MSR-VTT's MSRVTT_data.json?)")
        wanted = set(ids)
        sentences = sorted((s for s in data["sentences"] if s["video_id"] in wanted), key=lambda s: s.get("sen_id", 0))
        captions = _by_video((s["video_id"], s["caption"]) for s in sentences)
    folder = _video_dir(msrvtt, root, ("videos/all", "vids", "videos"))
    return _assemble("msrvtt", split, ids, captions, folder, ".mp4", source, failed)


def vatex(root: Path, split: str) -> SplitData:
    """DATA_ROOT/
        vatex_training_v1.0.json    official: [{"videoID", "enCap": [10 English], "chCap": [10 Chinese]}, ...]
        vatex_validation_v1.0.json  official validation set (the 1,500 retrieval test videos come from it)
        train_list.txt              retrieval train split: one videoID per line (25,991)
        test_list.txt               retrieval test split: one videoID per line (1,500)
        videos/<videoID>.mp4

    The standard protocol: 25,991 train and 1,500 test videos, as the lists say. English
    captions only; all 10 captions of a test video are queries."""
    lists = {"train": "train_list.txt", "test": "test_list.txt"}
    _require(vatex, root, ["vatex_training_v1.0.json", "vatex_validation_v1.0.json", lists[split]])
    captions = {}
    for name in ("vatex_training_v1.0.json", "vatex_validation_v1.0.json"):
        for item in _read_json(root / name):
            captions[item["videoID"]] = list(item["enCap"])
    ids = _read_ids(root / lists[split])
    unknown = [v for v in ids if v not in captions]
    if unknown:
        raise LayoutError(f"{root / lists[split]}: {len(unknown)} ids are in neither official json, e.g. {unknown[:3]}")
    return _assemble("vatex", split, ids, captions, _video_dir(vatex, root, ["videos"]), ".mp4", root / lists[split])


def didemo(root: Path, split: str) -> SplitData:
    """DATA_ROOT/
        {train,val,test}_list.txt   the split: one video name per line
        {train,val,test}_data.json  CLIP4Clip's: [{"video": "<name>", "description": "...", "times": [[s, e], ...]}, ...]
        videos/<name>               at any depth; transcoded copies (<name>.mp4, <stem>.mp4) are found too

    The standard protocol (CLIP4Clip's files): 8,395 train, 1,065 val and 1,004 test
    videos, the ones the list names; a video the json describes but the list does not
    name is not in the split. A video's id is its name as listed: a Flickr id, usually
    with the original extension (``.mov``, ``.3gp``, ``.MP4`` ...), sometimes with none or
    with a bare trailing dot. Paragraph-to-video retrieval: a video's descriptions, in
    annotation order, joined by single spaces into one caption (the CLIP4Clip / X-Pool
    convention)."""
    names = {"list": f"{split}_list.txt", "json": f"{split}_data.json"}
    _require(didemo, root, names.values())
    listed = _read_ids(root / names["list"])
    source = root / names["json"]
    descriptions = _by_video((item["video"], item["description"]) for item in _read_json(source))
    undescribed = [v for v in listed if v not in descriptions]
    if undescribed:
        raise LayoutError(f"{root / names['list']}: {len(undescribed)} listed videos have no description in {source.name}, "
                          f"e.g. {undescribed[:3]}")
    paragraphs = {v: [" ".join(descriptions[v])] for v in listed}
    return _assemble("didemo", split, listed, paragraphs, _video_dir(didemo, root, ["videos"]), "", source)


def lsmdc(root: Path, split: str) -> SplitData:
    """DATA_ROOT/
        LSMDC16_annos_training.csv             train, tab-separated, no header, no quoting:
                                               clip_id, start_aligned, end_aligned, start_extracted, end_extracted, sentence
        LSMDC16_challenge_1000_publictect.csv  the 1,000-clip public test (the file name's typo is official), same columns
        videos/<movie>/<clip_id>.avi           (any depth under videos/)

    The standard protocol: the 1,000 clips of the public test, one sentence each. A clip
    id may carry several sentences in train; each is a caption."""
    name = {"train": "LSMDC16_annos_training.csv", "test": "LSMDC16_challenge_1000_publictect.csv"}[split]
    _require(lsmdc, root, [name])
    rows, failed = _read_tsv(root / name, 6)
    captions = _by_video((fields[0], fields[5]) for fields in rows)
    return _assemble("lsmdc", split, captions, captions, _video_dir(lsmdc, root, ["videos"]), ".avi", root / name, failed)


CHARADES_FIELDS = ("script", "descriptions")


def charades(root: Path, split: str, caption_field: str = "script") -> SplitData:
    """DATA_ROOT/
        Charades_v1_train.csv  official: id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length
        Charades_v1_test.csv
        Charades_v1_480/<id>.mp4 (or videos/)

    The standard protocol: 7,985 train and 1,863 test videos, one caption each. The
    caption is the ``script`` column by default (what the retrieval papers use), or
    ``descriptions`` (--caption-field descriptions)."""
    if caption_field not in CHARADES_FIELDS:
        raise ValueError(f"charades caption field must be one of {CHARADES_FIELDS}, got {caption_field!r}")
    name = f"Charades_v1_{split}.csv"
    _require(charades, root, [name])
    rows, failed = _read_csv(root / name, ["id", caption_field])
    captions = _by_video((r["id"], r[caption_field]) for r in rows)
    folder = _video_dir(charades, root, ["Charades_v1_480", "videos"])
    return _assemble("charades", split, captions, captions, folder, ".mp4", root / name, failed,
                     {"caption_field": caption_field})


def demo(root: Path, split: str) -> SplitData:
    """DATA_ROOT/
        captions.json     [{"video_id", "split", "captions": [...], "scenes": [full description of each scene]}, ...]
        videos/<video_id>.mp4
        demo-info.json    generator version and settings (written last)

    Rendered into --data-root on first use (deterministic, no download); see
    tmass.extract.demo."""
    from tmass.extract.demo import render_demo

    render_demo(root)
    source = root / "captions.json"
    items = [item for item in _read_json(source) if item["split"] == split]
    captions = {item["video_id"]: item["captions"] for item in items}
    return _assemble("demo", split, captions, captions, root / "videos", ".mp4", source)


FOLDER_CAPTIONS = ("captions.csv", "captions.jsonl")


def folder(root: Path, split: str) -> SplitData:
    """DATA_ROOT/
        **/<name>.<ext>   every video file at any depth, <ext> one of VIDEO_EXTENSIONS in any case
        captions.csv      optional: columns video_id,caption (a header row, CSV quoting)
        captions.jsonl    optional, instead: one {"video_id": ..., "caption": ...} per line

    Any folder of videos, as one split named ``all``. A video's id is its path relative
    to DATA_ROOT with / separators (``trips/2023/dive.MOV``). Hidden files and folders
    (names starting with a dot) are left out. Captions are optional; a caption's
    video_id is matched like a dataset's video name (the exact path, then the path
    without its extension), and a caption naming no video, or two, is skipped and
    listed. Videos added later are extracted incrementally: an extraction keeps the
    partitions already made and appends the new videos in new ones. The features record
    the folder's absolute path (``data_root``), so another folder is never extracted
    into the same split directory."""
    index = _VideoIndex(root, relative=True)
    ids = index.videos()
    if not ids:
        raise LayoutError(f"{root}: no video files at any depth (looked for {', '.join(sorted(VIDEO_EXTENSIONS))}, any case)")
    present = [name for name in FOLDER_CAPTIONS if (root / name).is_file()]
    if len(present) > 1:
        raise LayoutError(f"{root}: both {' and '.join(present)}; keep one captions file")
    source = root / (present[0] if present else FOLDER_CAPTIONS[0])
    if not present:
        rows, failed = [], []
    elif source.suffix == ".csv":
        rows, failed = _read_csv(source, ["video_id", "caption"])
    else:
        rows, failed = _read_jsonl(source, ["video_id", "caption"])
    known = set(ids)
    captions: dict[str, list[str]] = {}
    for row in rows:
        matches = [m for m in (p.relative_to(root).as_posix() for p in index.find(row["video_id"])) if m in known]
        if len(matches) == 1:
            captions.setdefault(matches[0], []).append(row["caption"])
        else:
            failed.append({"id": row["video_id"], "path": str(source), "reason":
                           f"caption names {len(matches)} video files ({', '.join(matches)})" if matches
                           else "caption names no video file under the data root"})
    videos = [Video(v, root / v) for v in ids]
    kept, rejected = _screen(videos, captions, source)
    return SplitData("folder", split, videos, kept, [*failed, *rejected], {"data_root": str(root.resolve())},
                     incremental=True)


def _read_jsonl(path: Path, keys: list[str]) -> tuple[list[dict], list[dict]]:
    """Objects of a JSON-lines file holding ``keys``, and the lines that are not."""
    rows, failed = [], []
    for number, line in enumerate(_read_text(path).split("\n"), 1):  # a JSON string may hold a raw U+2028
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            row = {key: item[key] for key in keys}
            if not all(isinstance(value, str) for value in row.values()):
                raise TypeError
            rows.append(row)
        except (json.JSONDecodeError, KeyError, TypeError):
            failed.append({"id": f"line {number}", "path": str(path),
                           "reason": f"malformed annotation line (expected a JSON object with {', '.join(keys)})"})
    return rows, failed


ADAPTERS: dict[str, Callable[..., SplitData]] = {
    "msrvtt": msrvtt, "vatex": vatex, "didemo": didemo, "lsmdc": lsmdc, "charades": charades, "demo": demo,
    "folder": folder,
}
DATASET_SPLITS: dict[str, tuple[str, ...]] = {
    "msrvtt": ("train", "test"), "vatex": ("train", "test"), "didemo": ("train", "val", "test"),
    "lsmdc": ("train", "test"), "charades": ("train", "test"), "demo": ("train", "test"), "folder": ("all",),
}


def load_split(dataset: str, root: Path, split: str, caption_field: str | None = None) -> SplitData:
    """Read one split of a dataset. ``caption_field`` applies to charades only."""
    if dataset not in ADAPTERS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(ADAPTERS)}")
    if split not in DATASET_SPLITS[dataset]:
        raise ValueError(f"{dataset} has the splits {', '.join(DATASET_SPLITS[dataset])}, not {split!r}")
    root = Path(root)
    if dataset != "demo" and not root.is_dir():
        what = "is a file, not a folder" if root.is_file() else "does not exist"
        raise LayoutError(f"{root}: data root {what}.\nExpected layout for {dataset}:\n{_layout(ADAPTERS[dataset])}")
    if caption_field is not None:
        if dataset != "charades":
            raise ValueError("--caption-field applies to charades only")
        return charades(root, split, caption_field)
    return ADAPTERS[dataset](root, split)
