"""Dataset adapters on small fixtures in each distributed format (the real MSR-VTT split
CSVs included), layout errors, caption screening, and the rendered demo set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tmass.extract.datasets import LayoutError, load_split
from tmass.extract.demo import COLOURS, DemoSpec, demo_clip, render_demo

MSRVTT_FIXTURES = Path(__file__).parents[2] / "shared/fixtures/msrvtt"
needs_msrvtt = pytest.mark.skipif(not MSRVTT_FIXTURES.is_dir(), reason=f"{MSRVTT_FIXTURES} not present")


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _msrvtt_root(tmp_path: Path) -> Path:
    root = tmp_path / "msrvtt"
    root.mkdir()
    for name in ("MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv"):
        os.symlink(MSRVTT_FIXTURES / name, root / name)
    sentences = [{"video_id": f"video{v}", "caption": f"caption {k} of video {v}", "sen_id": 20 * v + k}
                 for v in range(10000) for k in (1, 0)]  # out of order on purpose: sen_id decides
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    _touch(root / "videos" / "all" / "video0.mp4")
    return root


@needs_msrvtt
def test_msrvtt_reads_the_real_split_files(tmp_path):
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
    assert video0 == ["caption 0 of video 0", "caption 1 of video 0"]
    paths = {v.id: v.path for v in train.videos}
    assert paths["video0"] == root / "videos/all/video0.mp4"  # found on disk
    assert paths["video1"] == root / "videos/all/video1.mp4"  # missing: where it was expected


def test_vatex_uses_english_captions_and_the_id_lists(tmp_path):
    def entry(vid):
        return {"videoID": vid, "enCap": [f"{vid} english {k}" for k in range(10)], "chCap": ["中文"] * 10}

    (tmp_path / "vatex_training_v1.0.json").write_text(json.dumps([entry("a_000001_000011"), entry("b_000002_000012")]))
    (tmp_path / "vatex_validation_v1.0.json").write_text(json.dumps([entry("c_000003_000013"), entry("d_000004_000014")]))
    (tmp_path / "train_list.txt").write_text("b_000002_000012\na_000001_000011\n")
    (tmp_path / "test_list.txt").write_text("d_000004_000014\n")
    _touch(tmp_path / "videos" / "d_000004_000014.mp4")
    train, test = load_split("vatex", tmp_path, "train"), load_split("vatex", tmp_path, "test")
    assert [v.id for v in train.videos] == ["a_000001_000011", "b_000002_000012"]
    assert len(test.captions) == 10 and all("english" in c.text for c in test.captions)  # all 10 are queries
    assert test.captions[9].text_id == "d_000004_000014#9"
    (tmp_path / "test_list.txt").write_text("zzz\n")
    with pytest.raises(LayoutError, match="in neither official json"):
        load_split("vatex", tmp_path, "test")


def test_didemo_joins_descriptions_into_one_paragraph(tmp_path):
    items = [
        {"video": "1234@N00_5678_abc.mov", "description": "a man walks in.", "times": [[0, 1]]},
        {"video": "9999@N00_1111_def.mov", "description": "a dog barks", "times": [[2, 2]]},
        {"video": "1234@N00_5678_abc.mov", "description": " he sits down ", "times": [[3, 4]]},
    ]
    (tmp_path / "test_data.json").write_text(json.dumps(items))
    _touch(tmp_path / "videos" / "1234@N00_5678_abc.mp4")  # transcoded: same stem, other extension
    test = load_split("didemo", tmp_path, "test")
    assert [c.text for c in test.captions] == ["a man walks in. he sits down", "a dog barks"]
    assert test.videos[0].path == tmp_path / "videos/1234@N00_5678_abc.mp4"


def test_lsmdc_reads_tab_separated_annotations(tmp_path):
    lines = [
        "0001_American_Beauty_00.00.51.926-00.00.54.129\t00.00.51.926\t00.00.54.129\t00.00.51.000\t00.00.55.000\tSOMEONE looks out.",
        "0001_American_Beauty_00.00.51.926-00.00.54.129\t00.00.51.926\t00.00.54.129\t00.00.51.000\t00.00.55.000\tShe smiles.",
        "0002_As_Good_As_It_Gets_00.01.10.000-00.01.12.000\t0\t0\t0\t0\tHe opens the door.",
        "a malformed line without tabs",
    ]
    (tmp_path / "LSMDC16_annos_training.csv").write_text("\n".join(lines) + "\n")
    _touch(tmp_path / "videos/0001_American_Beauty/0001_American_Beauty_00.00.51.926-00.00.54.129.avi")
    train = load_split("lsmdc", tmp_path, "train")
    assert [c.text_id for c in train.captions][:2] == [f"0001_American_Beauty_00.00.51.926-00.00.54.129#{k}" for k in (0, 1)]
    assert train.videos[0].path.parent.name == "0001_American_Beauty"  # found at depth
    assert train.failed == [{"id": "line 4", "path": str(tmp_path / "LSMDC16_annos_training.csv"),
                             "reason": "malformed annotation line (1 tab-separated fields, expected 6)"}]
    with pytest.raises(LayoutError, match="LSMDC16_challenge_1000_publictect.csv"):
        load_split("lsmdc", tmp_path, "test")


def test_charades_uses_the_script_unless_told_otherwise(tmp_path):
    header = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length"
    rows = ['46GP8,HR43,Kitchen,6,7,Yes,"A person cooks, then eats.",food;stove,A person is cooking.;They eat.,c092 11.9 21.2,24.83',
            'N11GT,P0MG,Stairs,6,7,Yes,,stairs,A person walks up the stairs.,c008 0 5,12.0']
    (tmp_path / "Charades_v1_test.csv").write_text("\n".join([header, *rows]) + "\n")
    (tmp_path / "Charades_v1_480").mkdir()
    script = load_split("charades", tmp_path, "test")
    assert [c.text for c in script.captions] == ["A person cooks, then eats."]
    assert script.failed[0]["id"] == "N11GT#0" and script.failed[0]["reason"] == "empty caption"
    assert script.notes == {"caption_field": "script"}
    descriptions = load_split("charades", tmp_path, "test", caption_field="descriptions")
    assert [c.text for c in descriptions.captions] == ["A person is cooking.;They eat.", "A person walks up the stairs."]
    with pytest.raises(ValueError, match="charades only"):
        load_split("lsmdc", tmp_path, "test", caption_field="script")


def test_non_utf8_captions_are_skipped_not_fatal(tmp_path):
    (tmp_path / "test_data.json").write_bytes(
        b'[{"video": "a.mp4", "description": "fine"}, {"video": "b.mp4", "description": "bad \xff byte"}]')
    (tmp_path / "videos").mkdir()
    data = load_split("didemo", tmp_path, "test")
    assert [c.video_id for c in data.captions] == ["a"]
    assert data.failed == [{"id": "b#0", "path": str(tmp_path / "test_data.json"), "reason": "caption is not valid UTF-8"}]


@pytest.mark.parametrize("dataset", ["msrvtt", "vatex", "didemo", "lsmdc", "charades"])
def test_a_wrong_layout_says_what_was_expected_and_what_was_found(dataset, tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "readme.txt").write_text("")
    with pytest.raises(LayoutError) as error:
        load_split(dataset, tmp_path, "test")
    message = str(error.value)
    assert "Expected layout:\nDATA_ROOT/" in message and "Found: clips/, readme.txt" in message
    with pytest.raises(LayoutError, match="does not exist"):
        load_split(dataset, tmp_path / "nowhere", "test")


@needs_msrvtt
def test_missing_video_folder_is_a_layout_error(tmp_path):
    os.symlink(MSRVTT_FIXTURES / "MSRVTT_JSFUSION_test.csv", tmp_path / "MSRVTT_JSFUSION_test.csv")
    with pytest.raises(LayoutError, match=r"no video folder \(looked for videos/all/, vids/, videos/\)"):
        load_split("msrvtt", tmp_path, "test")


# -------------------------------------------------------------------------------- demo

def _bare(phrase: str) -> list[str]:
    return [w for w in phrase.split() if w not in COLOURS and w not in ("a", "an")]


TINY = DemoSpec(n_train=3, n_test=2, width=32, height=32, seconds=1.0, fps=8)


def test_demo_clips_are_deterministic_and_captions_say_less_than_the_video():
    frames, captions, scenes = demo_clip(DemoSpec(), 7)
    again = demo_clip(DemoSpec(), 7)
    assert np.array_equal(frames, again[0]) and (captions, scenes) == again[1:]
    assert frames.shape == (40, 120, 160, 3) and frames.dtype == np.uint8
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
