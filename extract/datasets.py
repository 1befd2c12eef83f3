"""Dataset adapters: the annotation formats the community distributes -> videos and captions.

Each adapter reads one dataset's files under ``--data-root`` and returns a
:class:`SplitData`: the split's videos (sorted by id, each with the path its file should
have) and its captions (``text_id`` = ``<video_id>#<k>``, k the caption's position among
that video's captions in the annotation). Each adapter's docstring is its expected
directory layout; a root that does not match raises :class:`LayoutError` quoting that
layout and listing what was found.

Annotation files are read as UTF-8 with undecodable bytes kept as escapes, so one bad
caption costs that caption, not the file: a caption that is empty or not valid UTF-8 is
skipped and recorded in ``SplitData.failed`` (id, path, reason). A video listed in the
annotation but absent on disk is kept: the decoder records it as ``missing file``.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "test")
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".flv", ".wmv", ".ts"}


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
    ``captions`` follow the video order; ``failed`` lists captions rejected on reading."""

    dataset: str
    split: str
    videos: list[Video]
    captions: list[Caption]
    failed: list[dict] = field(default_factory=list)
    notes: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


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


def _index_videos(folder: Path) -> dict[str, Path]:
    """Video files at any depth under ``folder``, by file stem."""
    index = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() in VIDEO_EXTENSIONS:
                index.setdefault(stem, Path(directory) / name)
    return index


def _read_text(path: Path) -> str:
    # surrogateescape keeps undecodable bytes as lone surrogates, caught per caption
    return path.read_text(encoding="utf-8", errors="surrogateescape")


def _read_json(path: Path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise LayoutError(f"{path}: not valid JSON ({exc})") from exc


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def _read_csv(path: Path, columns: list[str]) -> list[dict]:
    reader = csv.DictReader(_read_text(path).splitlines())
    header = reader.fieldnames or []
    missing = [c for c in columns if c not in header]
    if missing:
        raise LayoutError(f"{path}: expected columns {', '.join(columns)}; the header has {', '.join(header) or 'nothing'}")
    return list(reader)


def caption_problem(text: str) -> str | None:
    """Why a caption cannot be used, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "caption is not valid UTF-8"
    if not text.strip():
        return "empty caption"
    return None


def _assemble(dataset: str, split: str, video_ids: Iterable[str], captions: dict[str, list[str]],
              folder: Path, default_ext: str, source: Path, notes: dict | None = None) -> SplitData:
    """Videos (deduplicated, sorted) with paths from the folder index, and their
    captions; videos missing on disk get the path they were expected at."""
    index = _index_videos(folder)
    videos = [Video(v, index.get(v, folder / f"{v}{default_ext}")) for v in sorted(set(video_ids))]
    kept, failed = [], []
    for video in videos:
        for k, text in enumerate(captions.get(video.id, [])):
            text_id = f"{video.id}#{k}"
            problem = caption_problem(text)
            if problem:
                failed.append({"id": text_id, "path": str(source), "reason": problem})
            else:
                kept.append(Caption(text_id, video.id, text.strip()))
    if not videos:
        raise LayoutError(f"{source}: no videos for split {split!r}")
    return SplitData(dataset, split, videos, kept, failed, notes or {})


def _by_video(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for video_id, text in pairs:
        grouped.setdefault(video_id, []).append(text)
    return grouped


# ---------------------------------------------------------------------------- adapters


def msrvtt(root: Path, split: str) -> SplitData:
    """DATA_ROOT/
        MSRVTT_data.json          {"sentences": [{"video_id", "caption", "sen_id"}, ...]} (train captions)
        MSRVTT_train.9k.csv       train split: column video_id (9,000 videos, 20 captions each)
        MSRVTT_JSFUSION_test.csv  1k-A test: key,vid_key,video_id,sentence (1,000 videos, one caption each)
        videos/all/<video_id>.mp4 (or vids/ as X-Pool lays it out, or videos/)

    The test split needs only the test CSV and the videos."""
    if split == "test":
        _require(msrvtt, root, ["MSRVTT_JSFUSION_test.csv"])
        source = root / "MSRVTT_JSFUSION_test.csv"
        captions = _by_video((r["video_id"], r["sentence"]) for r in _read_csv(source, ["video_id", "sentence"]))
        ids = list(captions)
    else:
        _require(msrvtt, root, ["MSRVTT_data.json", "MSRVTT_train.9k.csv"])
        ids = [r["video_id"] for r in _read_csv(root / "MSRVTT_train.9k.csv", ["video_id"])]
        source = root / "MSRVTT_data.json"
        data = _read_json(source)
        if "sentences" not in data:
            raise LayoutError(f"{source}: no 'sentences' list (is this MSR-VTT's MSRVTT_data.json?)")
        wanted = set(ids)
        sentences = sorted((s for s in data["sentences"] if s["video_id"] in wanted), key=lambda s: s.get("sen_id", 0))
        captions = _by_video((s["video_id"], s["caption"]) for s in sentences)
    folder = _video_dir(msrvtt, root, ("videos/all", "vids", "videos"))
    return _assemble("msrvtt", split, ids, captions, folder, ".mp4", source)


def vatex(root: Path, split: str) -> SplitData:
    """DATA_ROOT/
        vatex_training_v1.0.json    official: [{"videoID", "enCap": [10 English], "chCap": [10 Chinese]}, ...]
        vatex_validation_v1.0.json  official validation set (the 1,500 retrieval test videos come from it)
        train_list.txt              retrieval train split: one videoID per line (25,991)
        test_list.txt               retrieval test split: one videoID per line (1,500)
        videos/<videoID>.mp4

    English captions only; all 10 captions of a test video are queries."""
    lists = {"train": "train_list.txt", "test": "test_list.txt"}
    _require(vatex, root, ["vatex_training_v1.0.json", "vatex_validation_v1.0.json", lists[split]])
    captions = {}
    for name in ("vatex_training_v1.0.json", "vatex_validation_v1.0.json"):
        for item in _read_json(root / name):
            captions[item["videoID"]] = list(item["enCap"])
    ids = _read_lines(root / lists[split])
    unknown = [v for v in ids if v not in captions]
    if unknown:
        raise LayoutError(f"{root / lists[split]}: {len(unknown)} ids are in neither official json, e.g. {unknown[:3]}")
    return _assemble("vatex", split, ids, captions, _video_dir(vatex, root, ["videos"]), ".mp4", root / lists[split])


def didemo(root: Path, split: str) -> SplitData:
    """DATA_ROOT/
        train_data.json   CLIP4Clip's: [{"video": "<file name>", "description": "...", "times": [[s, e], ...]}, ...]
        test_data.json
        videos/<file name>  (the json's "video" field; the same stem with another extension is accepted)

    Paragraph-to-video retrieval: all descriptions of a video, in annotation order, joined
    by spaces into one caption (the CLIP4Clip / X-Pool convention)."""
    name = f"{split}_data.json"
    _require(didemo, root, [name])
    pairs = [(Path(item["video"]).stem, item["description"]) for item in _read_json(root / name)]
    paragraphs = {v: [" ".join(d.strip() for d in texts if d.strip())] for v, texts in _by_video(pairs).items()}
    return _assemble("didemo", split, paragraphs, paragraphs, _video_dir(didemo, root, ["videos"]), ".mp4", root / name)


def lsmdc(root: Path, split: str) -> SplitData:
    """DATA_ROOT/
        LSMDC16_annos_training.csv             train, tab-separated, no header:
                                               clip_id, start_aligned, end_aligned, start_extracted, end_extracted, sentence
        LSMDC16_challenge_1000_publictect.csv  the 1,000-clip public test (the file name's typo is official), same columns
        videos/<movie>/<clip_id>.avi           (any depth under videos/; matched by file stem)

    A clip id may carry several sentences in train; each is a caption."""
    name = {"train": "LSMDC16_annos_training.csv", "test": "LSMDC16_challenge_1000_publictect.csv"}[split]
    _require(lsmdc, root, [name])
    pairs, failed = [], []
    for number, line in enumerate(_read_text(root / name).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 6:
            failed.append({"id": f"line {number}", "path": str(root / name), "reason": f"malformed annotation line ({len(fields)} tab-separated fields, expected 6)"})
            continue
        pairs.append((fields[0], fields[5]))
    captions = _by_video(pairs)
    data = _assemble("lsmdc", split, captions, captions, _video_dir(lsmdc, root, ["videos"]), ".avi", root / name)
    data.failed[:0] = failed
    return data


CHARADES_FIELDS = ("script", "descriptions")


def charades(root: Path, split: str, caption_field: str = "script") -> SplitData:
    """DATA_ROOT/
        Charades_v1_train.csv  official: id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length
        Charades_v1_test.csv
        Charades_v1_480/<id>.mp4 (or videos/)

    The caption is the ``script`` column by default (what the retrieval papers use), or
    ``descriptions`` (--caption-field descriptions)."""
    if caption_field not in CHARADES_FIELDS:
        raise ValueError(f"charades caption field must be one of {CHARADES_FIELDS}, got {caption_field!r}")
    name = f"Charades_v1_{split}.csv"
    _require(charades, root, [name])
    rows = _read_csv(root / name, ["id", caption_field])
    captions = _by_video((r["id"], r[caption_field]) for r in rows)
    folder = _video_dir(charades, root, ["Charades_v1_480", "videos"])
    return _assemble("charades", split, captions, captions, folder, ".mp4", root / name, {"caption_field": caption_field})


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


ADAPTERS: dict[str, Callable[..., SplitData]] = {
    "msrvtt": msrvtt, "vatex": vatex, "didemo": didemo, "lsmdc": lsmdc, "charades": charades, "demo": demo,
}


def load_split(dataset: str, root: Path, split: str, caption_field: str | None = None) -> SplitData:
    """Read one split of a dataset. ``caption_field`` applies to charades only."""
    if dataset not in ADAPTERS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(ADAPTERS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    if dataset != "demo" and not root.is_dir():
        raise LayoutError(f"{root}: data root does not exist.\nExpected layout for {dataset}:\n{_layout(ADAPTERS[dataset])}")
    if caption_field is not None:
        if dataset != "charades":
            raise ValueError("--caption-field applies to charades only")
        return charades(root, split, caption_field)
    return ADAPTERS[dataset](root, split)
