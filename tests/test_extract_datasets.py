"""Dataset adapters on their annotation files as distributed: the real MSR-VTT split CSVs
where present, and for the other datasets files written here byte for byte in the native
format (encoding, BOM, quoting, line endings) at the standard protocol's split sizes.
Also: captions arrive exactly, videos are found under their shipped names, skip reasons,
the folder dataset end to end, and the rendered demo set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_extract import SMALL_DEMO, extract, tiny_model  # noqa: F401 (tiny_model is a fixture)

import tmass.extract.video as video
from tmass.extract.datasets import LayoutError, load_split
from tmass.extract.demo import COLOURS, DemoSpec, demo_clip, render_demo, write_clip
from tmass.extract.video import VideoError, read_frames
from tmass.features.format import check_split, load_split as load_features

MSRVTT_FIXTURES = Path(__file__).parents[2] / "shared/fixtures/msrvtt"
needs_msrvtt = pytest.mark.skipif(not MSRVTT_FIXTURES.is_dir(), reason=f"real MSR-VTT files not present at {MSRVTT_FIXTURES}")
BOM = "\ufeff"

# Captions that must arrive character for character: str.splitlines() splits the first
# three, strip() eats the spaces of the fourth, a quote-aware reader truncates the fifth.
EXACT = [
    "a man\u2028walks in",
    "she waves\x85then leaves",
    "a page\x0cbreak",
    "  café crème, 日本語 — naïve  ",
    '"Quoted" at the start, "inner" quotes, commas',
]
MULTILINE = 'two lines,\r\nwith "quotes"'  # a quoted CSV field may span lines


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def _write(path: Path, text: str, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(((BOM if bom else "") + text).encode("utf-8"))
    return path


# ------------------------------------------------------------------------------- MSR-VTT


def _msrvtt_root(tmp_path: Path) -> Path:
    root = tmp_path / "msrvtt"
    root.mkdir()
    for name in ("MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv"):
        os.symlink(MSRVTT_FIXTURES / name, root / name)
    sentences = [{"video_id": f"video{v}", "caption": f"caption {k} of video {v}", "sen_id": 20 * v + k}
                 for v in range(10000) for k in (1, 0)]  # out of order on purpose: sen_id decides
    sentences[0]["caption"] = EXACT[3]  # video0's caption 1
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}, ensure_ascii=False))
    _touch(root / "videos" / "all" / "video0.mp4")
    return root


@needs_msrvtt
def test_msrvtt_reads_the_real_split_files_at_the_1k_a_protocol_sizes(tmp_path):
    root = _msrvtt_root(tmp_path)
    test = load_split("msrvtt", root, "test")
    assert len(test.videos) == 1000 and len(test.captions) == 1000  # 1k-A: one caption per video
    assert [v.id for v in test.videos] == sorted(v.id for v in test.videos)
    first = next(c for c in test.captions if c.video_id == "video9770")
    assert first.text == "a person is connecting something to system" and first.text_id == "video9770#0"

    train = load_split("msrvtt", root, "train")
    assert len(train.videos) == 9000 and len(train.captions) == 18000
    assert not {v.id for v in train.videos} & {v.id for v in test.videos}  # the 9k and 1k-A splits are disjoint
    video0 = [c.text for c in train.captions if c.video_id == "video0"]
    assert video0 == ["caption 0 of video 0", EXACT[3]]  # sen_id order, whitespace kept
    paths = {v.id: v.path for v in train.videos}
    assert paths["video0"] == root / "videos/all/video0.mp4"  # found on disk
    assert paths["video1"] == root / "videos/all/video1.mp4"  # missing: where it was expected


def test_msrvtt_test_csv_keeps_every_caption_exactly(tmp_path):
    """BOM, CRLF line endings, quoted fields with newlines, quotes, U+2028 and friends."""
    texts = [*EXACT, MULTILINE]
    rows = [f"ret{i},msr{i},video{i},{_csv_field(t)}" for i, t in enumerate(texts)]
    _write(tmp_path / "MSRVTT_JSFUSION_test.csv", "\r\n".join(["key,vid_key,video_id,sentence", *rows]) + "\r\n", bom=True)
    (tmp_path / "videos").mkdir()
    test = load_split("msrvtt", tmp_path, "test")
    assert {c.video_id: c.text for c in test.captions} == {f"video{i}": t for i, t in enumerate(texts)}
    assert test.failed == []


# --------------------------------------------------------------------------------- VATEX


def test_vatex_reads_the_official_json_and_lists_at_protocol_sizes(tmp_path):
    """25,991 train and 1,500 test videos (the test ids come from the validation json's
    3,000); CRLF id lists; UTF-8 json with the Chinese captions beside the English."""
    def entry(i):
        english = [f"video {i} english {k}" for k in range(10)]
        if i == 0:
            english[:len(EXACT)] = EXACT
        return {"videoID": f"v{i:05d}_000001_000011", "enCap": english, "chCap": ["一个人在做饭"] * 10}

    train_ids, valid_ids = range(25991), range(25991, 25991 + 3000)
    for name, ids in (("vatex_training_v1.0.json", train_ids), ("vatex_validation_v1.0.json", valid_ids)):
        _write(tmp_path / name, json.dumps([entry(i) for i in ids], ensure_ascii=False))
    _write(tmp_path / "train_list.txt", "".join(f"v{i:05d}_000001_000011\r\n" for i in reversed(train_ids)))
    _write(tmp_path / "test_list.txt", "".join(f"v{i:05d}_000001_000011\r\n" for i in valid_ids[:1500]))
    (tmp_path / "videos").mkdir()
    train, test = load_split("vatex", tmp_path, "train"), load_split("vatex", tmp_path, "test")
    assert (len(train.videos), len(train.captions)) == (25991, 259910)
    assert (len(test.videos), len(test.captions)) == (1500, 15000)  # all 10 English captions are queries
    assert [c.text for c in train.captions[:len(EXACT)]] == EXACT
    assert test.captions[9].text_id == "v25991_000001_000011#9" and "english" in test.captions[9].text
    _write(tmp_path / "test_list.txt", "zzz\n")
    with pytest.raises(LayoutError, match="in neither official json"):
        load_split("vatex", tmp_path, "test")


# -------------------------------------------------------------------------------- DiDeMo

# what DiDeMo's Flickr names end with: every container, any case, none, a bare dot
DIDEMO_ENDINGS = [".mov", ".mp4", ".avi", ".m4v", ".3gp", ".3g2", ".mts", ".m2ts", ".mpg", ".wmv", ".flv", ".webm",
                  ".mkv", ".ogv", ".MOV", ".MP4", ".AVI", "", "."]


def _didemo_name(i: int) -> str:
    return f"{10000 + i}@N0{i % 9}_{3600000 + i}_{i:08x}{DIDEMO_ENDINGS[i % len(DIDEMO_ENDINGS)]}"


def test_didemo_splits_are_the_official_lists_at_protocol_sizes(tmp_path):
    """8,395 train, 1,065 val and 1,004 test videos; a video the json describes but the
    list does not name (the community test json has one) is not in the split."""
    sizes, first = {"train": 8395, "val": 1065, "test": 1004}, 0
    for split, size in sizes.items():
        names = [_didemo_name(first + i) for i in range(size + (split == "test"))]  # test: one more in the json
        items = [{"video": n, "description": f"{n} part {k}", "times": [[k, k]]} for n in names for k in range(2)]
        _write(tmp_path / f"{split}_data.json", json.dumps(items))
        _write(tmp_path / f"{split}_list.txt", "".join(f"{n}\n" for n in names[:size]))
        first += size + 1
    (tmp_path / "videos").mkdir()
    for split, size in sizes.items():
        data = load_split("didemo", tmp_path, split)
        assert (len(data.videos), len(data.captions)) == (size, size), split
    test = load_split("didemo", tmp_path, "test")
    assert _didemo_name(first - 1) not in {v.id for v in test.videos}  # in test_data.json, not in test_list.txt
    assert {v.id for v in test.videos} >= {_didemo_name(8395 + 1 + 1065 + 1 + k) for k in range(19)}  # ids as listed


def test_didemo_paragraph_joins_the_descriptions_exactly(tmp_path):
    items = [{"video": "1234@N00_5678_abc.mov", "description": d, "times": [[k, k]]} for k, d in enumerate(EXACT)]
    items.insert(2, {"video": "9999@N00_1111_def.mov", "description": "a dog barks", "times": [[2, 2]]})
    _write(tmp_path / "test_data.json", json.dumps(items, ensure_ascii=False), bom=True)
    _write(tmp_path / "test_list.txt", "9999@N00_1111_def.mov\r\n1234@N00_5678_abc.mov\r\n")
    (tmp_path / "videos").mkdir()
    test = load_split("didemo", tmp_path, "test")
    assert [(c.video_id, c.text) for c in test.captions] == [
        ("1234@N00_5678_abc.mov", " ".join(EXACT)), ("9999@N00_1111_def.mov", "a dog barks")]
    _write(tmp_path / "test_list.txt", "1234@N00_5678_abc.mov\nnot-described.mov\n")
    with pytest.raises(LayoutError, match="1 listed videos have no description in test_data.json"):
        load_split("didemo", tmp_path, "test")


def test_videos_are_found_under_their_shipped_names(tmp_path):
    wanted = {  # annotation name -> file on disk
        "a@N00_1_x.mov": "a@N00_1_x.mov",          # exact
        "b@N00_2_y.3gp": "b@N00_2_y.3gp.mp4",      # transcoded, extension appended
        "c@N00_3_z.MOV": "c@N00_3_z.webm",         # transcoded, extension replaced
        "d@N00_4_w": "d@N00_4_w",                   # no extension
        "e@N00_5_v.": "e@N00_5_v.",                 # a bare dot
        "f@N00_6_u.": "f@N00_6_u.M2TS",             # a bare dot, then a container in capitals
        "g@N00_7_t": "sub/g@N00_7_t.Mp4",           # no extension, at depth
        "h.v1.2.avi": "h.v1.2.ogv",                 # the stem ends at the last dot, not the first
        "i@N00_9_s.mov": "i@N00_9_s.mov",           # exact wins over the stem's other file below
    }
    for disk in [*wanted.values(), "i@N00_9_s.mp4", "h.mp4", "h.v1.mkv"]:
        _touch(tmp_path / "videos" / disk)
    names = [*wanted, "j@N00_10_missing.mov"]
    _write(tmp_path / "test_data.json", json.dumps([{"video": n, "description": "d"} for n in names]))
    _write(tmp_path / "test_list.txt", "\n".join(names))
    paths = {v.id: v.path for v in load_split("didemo", tmp_path, "test").videos}
    assert paths == {**{n: tmp_path / "videos" / d for n, d in wanted.items()},
                     "j@N00_10_missing.mov": tmp_path / "videos/j@N00_10_missing.mov"}


def test_two_files_that_could_be_one_video_are_an_error_naming_both(tmp_path):
    for disk in ("k@N00_1_x.mp4", "k@N00_1_x.mov.mkv"):
        _touch(tmp_path / "videos" / disk)
    _write(tmp_path / "test_data.json", json.dumps([{"video": "k@N00_1_x.mov", "description": "d"}]))
    _write(tmp_path / "test_list.txt", "k@N00_1_x.mov\n")
    with pytest.raises(LayoutError) as error:
        load_split("didemo", tmp_path, "test")
    assert "k@N00_1_x.mov: " in str(error.value) and "k@N00_1_x.mp4" in str(error.value)
    assert "k@N00_1_x.mov.mkv" in str(error.value) and "keep one file per video" in str(error.value)


# --------------------------------------------------------------------------------- LSMDC

LSMDC_TIMES = "00.00.51.926\t00.00.54.129\t00.00.51.000\t00.00.55.000"


def test_lsmdc_public_test_keeps_every_caption_exactly(tmp_path, monkeypatch):
    """The 1,000-clip public test: UTF-8 with a BOM, tab-separated, no quoting; the first
    row's caption begins with a quote character. The video folder is listed once."""
    clips = [f"00{1 + i // 100:02d}_Movie_{i // 100}_00.00.{i % 60:02d}.{i:03d}-00.01.00.000" for i in range(1000)]
    texts = [EXACT[4], *EXACT[:4], *(f"SOMEONE does thing {i}." for i in range(5, 1000))]
    _write(tmp_path / "LSMDC16_challenge_1000_publictect.csv",
           "".join(f"{c}\t{LSMDC_TIMES}\t{t}\n" for c, t in zip(clips, texts)), bom=True)
    movie = clips[0].rsplit("_", 1)[0]
    _touch(tmp_path / "videos" / movie / f"{clips[0]}.avi")
    walks, walk = [], os.walk
    monkeypatch.setattr(os, "walk", lambda *a, **k: walks.append(a) or walk(*a, **k))
    test = load_split("lsmdc", tmp_path, "test")
    assert (len(test.videos), len(test.captions), test.failed) == (1000, 1000, [])
    assert {c.video_id: c.text for c in test.captions} == dict(zip(clips, texts))
    paths = {v.id: v.path for v in test.videos}
    assert paths[clips[0]] == tmp_path / "videos" / movie / f"{clips[0]}.avi"  # found at depth
    assert paths[clips[1]] == tmp_path / "videos" / f"{clips[1]}.avi"  # missing: where it was expected
    assert len(walks) == 1


def test_lsmdc_train_lists_malformed_lines_and_keeps_several_sentences_per_clip(tmp_path):
    clip = "0001_American_Beauty_00.00.51.926-00.00.54.129"
    lines = [f"{clip}\t{LSMDC_TIMES}\tSOMEONE looks out.", f"{clip}\t{LSMDC_TIMES}\tShe smiles.",
             "a malformed line without tabs", f"0002_As_Good_00.01.10.000-00.01.12.000\t{LSMDC_TIMES}\tHe opens the door."]
    _write(tmp_path / "LSMDC16_annos_training.csv", "\r\n".join(lines) + "\r\n")
    (tmp_path / "videos").mkdir()
    train = load_split("lsmdc", tmp_path, "train")
    assert [(c.text_id, c.text) for c in train.captions[:2]] == [(f"{clip}#0", "SOMEONE looks out."), (f"{clip}#1", "She smiles.")]
    assert train.failed == [{"id": "line 3", "path": str(tmp_path / "LSMDC16_annos_training.csv"),
                             "reason": "malformed annotation line (1 tab-separated fields, expected 6)"}]
    with pytest.raises(LayoutError, match="LSMDC16_challenge_1000_publictect.csv"):
        load_split("lsmdc", tmp_path, "test")


# ------------------------------------------------------------------------------ Charades

CHARADES_HEADER = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length"


def _charades_row(vid: str, script: str, descriptions: str) -> str:
    return f"{vid},HR43,Kitchen,6,7,Yes,{_csv_field(script)},food;stove,{_csv_field(descriptions)},c092 11.9 21.2,24.83"


def test_charades_reads_the_official_csvs_at_protocol_sizes(tmp_path):
    """7,985 train and 1,863 test videos; UTF-8 with a BOM, CRLF, quoted fields that
    hold commas, quotes and line breaks."""
    for split, size in (("train", 7985), ("test", 1863)):
        rows = [_charades_row(f"{split[:2].upper()}{i:04d}", f"A person cooks {i}, then eats.", "They eat.")
                for i in range(size)]
        _write(tmp_path / f"Charades_v1_{split}.csv", "\r\n".join([CHARADES_HEADER, *rows]) + "\r\n", bom=True)
    (tmp_path / "Charades_v1_480").mkdir()
    train, test = load_split("charades", tmp_path, "train"), load_split("charades", tmp_path, "test")
    assert (len(train.videos), len(train.captions), len(test.videos), len(test.captions)) == (7985, 7985, 1863, 1863)
    assert train.captions[0].text == "A person cooks 0, then eats." and train.videos[0].id == "TR0000"


def test_charades_keeps_every_caption_exactly_in_either_field(tmp_path):
    rows = [_charades_row(f"V{i}", text, f"desc {i}") for i, text in enumerate([*EXACT, MULTILINE])]
    rows.append('N11GT,P0MG,Stairs,6,7,Yes,,stairs,A person walks up the stairs.,c008 0 5,12.0')
    rows.append("SHORT,P0MG,Stairs")  # a truncated row
    _write(tmp_path / "Charades_v1_test.csv", "\n".join([CHARADES_HEADER, *rows]) + "\n")
    (tmp_path / "Charades_v1_480").mkdir()
    script = load_split("charades", tmp_path, "test")
    assert [c.text for c in script.captions] == [*EXACT, MULTILINE]
    assert [(f["id"], f["reason"]) for f in script.failed] == [
        ("line 10", "malformed annotation row (fewer fields than the header's 11)"), ("N11GT#0", "empty caption")]
    assert script.notes == {"caption_field": "script"}
    descriptions = load_split("charades", tmp_path, "test", caption_field="descriptions")
    assert {c.video_id: c.text for c in descriptions.captions} == {
        "N11GT": "A person walks up the stairs.", **{f"V{i}": f"desc {i}" for i in range(6)}}
    with pytest.raises(ValueError, match="charades only"):
        load_split("lsmdc", tmp_path, "test", caption_field="script")


# --------------------------------------------------------------------- layouts and bytes


def test_non_utf8_captions_are_skipped_not_fatal(tmp_path):
    (tmp_path / "test_data.json").write_bytes(
        b'[{"video": "a.mp4", "description": "fine"}, {"video": "b.mp4", "description": "bad \xff byte"}]')
    _write(tmp_path / "test_list.txt", "a.mp4\nb.mp4\n")
    (tmp_path / "videos").mkdir()
    data = load_split("didemo", tmp_path, "test")
    assert [c.video_id for c in data.captions] == ["a.mp4"]
    assert data.failed == [{"id": "b.mp4#0", "path": str(tmp_path / "test_data.json"), "reason": "caption is not valid UTF-8"}]


@pytest.mark.parametrize("dataset", ["msrvtt", "vatex", "didemo", "lsmdc", "charades", "folder"])
def test_a_wrong_layout_says_what_was_expected_and_what_was_found(dataset, tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "readme.txt").write_text("")
    split = "all" if dataset == "folder" else "test"
    if dataset != "folder":  # any folder is a folder dataset; it only needs videos
        with pytest.raises(LayoutError) as error:
            load_split(dataset, tmp_path, split)
        message = str(error.value)
        assert "Expected layout:\nDATA_ROOT/" in message and "Found: clips/, readme.txt" in message
    with pytest.raises(LayoutError, match="does not exist"):
        load_split(dataset, tmp_path / "nowhere", split)
    with pytest.raises(LayoutError, match="is a file, not a folder"):
        load_split(dataset, tmp_path / "readme.txt", split)


def test_splits_are_each_datasets_own():
    with pytest.raises(ValueError, match="msrvtt has the splits train, test, not 'val'"):
        load_split("msrvtt", Path("."), "val")


@needs_msrvtt
def test_missing_video_folder_is_a_layout_error(tmp_path):
    os.symlink(MSRVTT_FIXTURES / "MSRVTT_JSFUSION_test.csv", tmp_path / "MSRVTT_JSFUSION_test.csv")
    with pytest.raises(LayoutError, match=r"no video folder \(looked for videos/all/, vids/, videos/\)"):
        load_split("msrvtt", tmp_path, "test")


# ------------------------------------------------------------------------ skip reasons


def _reason(path: Path) -> str:
    with pytest.raises(VideoError) as error:
        read_frames(path, 4)
    return error.value.reason


def test_skip_reasons_say_what_happened(tmp_path, monkeypatch):
    assert _reason(tmp_path / "nowhere.mp4") == "missing file"
    (tmp_path / "dir.mp4").mkdir()
    assert _reason(tmp_path / "dir.mp4") == "a directory, not a video file"
    assert _reason(_touch(tmp_path / "empty.mp4")) == "zero-length file"
    os.mkfifo(tmp_path / "pipe.mp4")
    assert _reason(tmp_path / "pipe.mp4") == "not a regular file"
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    assert _reason(tmp_path / "noise.mp4") == "undecodable: Invalid data found when processing input"
    os.symlink(tmp_path / "gone.mp4", tmp_path / "dangling.mp4")
    assert _reason(tmp_path / "dangling.mp4") == "missing file"

    # tests run as root, where chmod 000 does not deny reads: deny the open instead
    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(video, "open", denied, raising=False)
    assert _reason(tmp_path / "noise.mp4") == "permission denied"


# ----------------------------------------------------------------------------- folder


def test_folder_finds_every_video_at_any_depth_with_relative_ids(tmp_path):
    for name in ("b.mp4", "a/clip.MOV", "a/deeper/x.y.webm", "c/z.3G2", "notes.txt", ".hidden.mp4", ".cache/v.mp4",
                 "a/captions.csv.bak"):
        _touch(tmp_path / name)
    data = load_split("folder", tmp_path, "all")
    assert [v.id for v in data.videos] == ["a/clip.MOV", "a/deeper/x.y.webm", "b.mp4", "c/z.3G2"]
    assert data.videos[1].path == tmp_path / "a/deeper/x.y.webm"
    assert (data.captions, data.failed, data.incremental) == ([], [], True)
    assert data.notes == {"data_root": str(tmp_path.resolve())}


def test_folder_captions_csv_are_exact_and_matched_by_path(tmp_path):
    for name in ("a/clip.mp4", "a/clip.mov", "b.mkv"):
        _touch(tmp_path / name)
    rows = [("b.mkv", EXACT[0]), ("a/clip.mp4", MULTILINE), ("b", EXACT[3]), ("a/clip", "which one?"), ("c.mp4", "none")]
    _write(tmp_path / "captions.csv", "\r\n".join(["video_id,caption", *(f"{v},{_csv_field(t)}" for v, t in rows)]),
           bom=True)
    data = load_split("folder", tmp_path, "all")
    assert [(c.text_id, c.text) for c in data.captions] == [
        ("a/clip.mp4#0", MULTILINE), ("b.mkv#0", EXACT[0]), ("b.mkv#1", EXACT[3])]
    source = str(tmp_path / "captions.csv")
    assert data.failed == [
        {"id": "a/clip", "path": source, "reason": "caption names 2 video files (a/clip.mov, a/clip.mp4)"},
        {"id": "c.mp4", "path": source, "reason": "caption names no video file under the data root"}]


def test_folder_captions_jsonl_keep_a_raw_line_separator(tmp_path):
    _touch(tmp_path / "v.mp4")
    lines = [json.dumps({"video_id": "v.mp4", "caption": t}, ensure_ascii=False) for t in EXACT]
    _write(tmp_path / "captions.jsonl", "\n".join([*lines, "", "{not json", '{"video_id": "v.mp4"}']) + "\n")
    data = load_split("folder", tmp_path, "all")
    assert [c.text for c in data.captions] == EXACT
    assert [f["id"] for f in data.failed] == ["line 7", "line 8"]
    _write(tmp_path / "captions.csv", "video_id,caption\n")
    with pytest.raises(LayoutError, match="both captions.csv and captions.jsonl; keep one"):
        load_split("folder", tmp_path, "all")


def test_an_empty_folder_is_one_clear_line(tmp_path):
    _touch(tmp_path / "readme.txt")
    with pytest.raises(LayoutError) as error:
        load_split("folder", tmp_path, "all")
    assert "\n" not in str(error.value) and str(error.value).startswith(f"{tmp_path}: no video files at any depth")


def _clip(path: Path, index: int) -> None:
    write_clip(path.with_suffix(".mp4"), demo_clip(SMALL_DEMO, index)[0])
    path.with_suffix(".mp4").rename(path)


def test_folder_extracts_incrementally_and_zero_captions_read_back(tiny_model, tmp_path):
    """Partitions already made keep their videos and files; videos added later go into
    new partitions, even one that sorts first; a split without captions is valid."""
    root, out = tmp_path / "mine", tmp_path / "out"
    _clip(root / "m.mp4", 0)
    _clip(root / "sub" / "n.MOV", 1)
    (root / "broken.mp4").write_bytes(b"not a video at all")
    args = ["--dataset", "folder", "--data-root", root, "--out", out, "--model", tiny_model, "--pretrained", "none",
            "--num-frames", 4, "--shard-size", 2, "--loader-workers", 0]
    first = extract(*args, expect=3)
    split_dir = out / "folder" / "tiny-clip__none" / "all"
    assert str(split_dir) in first.output
    before = {p.name: p.stat().st_mtime_ns for p in split_dir.glob("*-0000[01].h5")}
    arrays = load_features(split_dir)
    assert arrays.video_ids == ["m.mp4", "sub/n.MOV"] and arrays.text_ids == [] and arrays.text_embeddings.shape == (0, 32)
    assert check_split(split_dir) == []  # a split with videos and no captions is valid
    failed = json.loads((split_dir / "manifest.json").read_text())["failed"]
    assert [(f["id"], f["reason"].split(":")[0]) for f in failed] == [("broken.mp4", "undecodable")]

    _clip(root / "a-first.mp4", 2)
    (root / "captions.csv").write_text("video_id,caption\na-first.mp4,a new clip\n")
    extract(*args, expect=3)
    assert {p.name: p.stat().st_mtime_ns for p in split_dir.glob("*-0000[01].h5")} == before
    arrays = load_features(split_dir)
    assert arrays.video_ids == ["m.mp4", "sub/n.MOV", "a-first.mp4"] and arrays.captions == ["a new clip"]
    plan = json.loads((split_dir / "partitions.json").read_text())["partitions"]
    assert plan == [["broken.mp4", "m.mp4"], ["sub/n.MOV"], ["a-first.mp4"]]

    kept = {p.name: p.stat().st_mtime_ns for p in split_dir.glob("*-0000[02].h5")}
    (root / "sub" / "n.MOV").unlink()  # only its partition is extracted again, empty now
    extract(*args, expect=3)
    assert {p.name: p.stat().st_mtime_ns for p in split_dir.glob("*-0000[02].h5")} == kept
    assert load_features(split_dir).video_ids == ["m.mp4", "a-first.mp4"]

    other = tmp_path / "other"
    _clip(other / "m.mp4", 3)
    refused = extract(*[other if a == root else a for a in args], expect=1)
    assert "holds features made otherwise" in refused.output and "data_root: " in refused.output


# -------------------------------------------------------------------------------- demo

def _bare(phrase: str) -> list[str]:
    return [w for w in phrase.split() if w not in COLOURS and w not in ("a", "an")]


TINY = DemoSpec(n_train=3, n_test=2, width=32, height=32, seconds=1.0, fps=8)


def test_demo_clips_are_deterministic_and_captions_say_less_than_the_video():
    frames, captions, scenes = demo_clip(DemoSpec(), 7)
    again = demo_clip(DemoSpec(), 7)
    assert np.array_equal(frames, again[0]) and (captions, scenes) == again[1:]
    spec = DemoSpec()
    assert frames.shape == (round(spec.fps * spec.seconds), spec.height, spec.width, 3) and frames.dtype == np.uint8
    named, shown = [], []
    for index in range(50):
        _, captions, scenes = demo_clip(DemoSpec(), index)
        assert 3 <= len(captions) <= 5 and 2 <= len(scenes) <= 4
        assert len(set(captions)) == len(captions), "a repeated caption would count twice in every metric"
        for caption in captions:
            clauses = caption.split(", then ")
            # every clause describes one of the scenes, perhaps without its colour
            assert all(_bare(c) in map(_bare, scenes) for c in clauses)
            named.append(len(clauses))
            shown.append(len(scenes))
    assert np.mean(named) < 0.8 * np.mean(shown) and min(named) == 1


def test_demo_renders_once_and_reads_back(tmp_path):
    root = render_demo(tmp_path, TINY, progress=False)
    first = (root / "videos" / "demo0000.mp4").stat().st_mtime_ns
    render_demo(tmp_path, TINY, progress=False)
    load_split("demo", tmp_path, "train")  # the adapter accepts what is rendered there
    assert (root / "videos" / "demo0000.mp4").stat().st_mtime_ns == first
    train, test = load_split("demo", tmp_path, "train"), load_split("demo", tmp_path, "test")
    assert [v.id for v in train.videos] == ["demo0000", "demo0001", "demo0002"]
    assert [v.id for v in test.videos] == ["demo0003", "demo0004"]
    assert all(v.path.is_file() for v in train.videos + test.videos)
    info = json.loads((root / "demo-info.json").read_text())
    assert info["spec"]["n_train"] == 3
