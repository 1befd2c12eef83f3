"""`tmass index` and `tmass search`: index and search on simulated features and on tiny
extracted demo clips; two stages against exhaustive scoring; JSON and HTML outputs;
refusals (other encoder, empty split); text and video queries with a random-init CLIP
rebuilt from the extraction's seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tmass.cli import main
from tmass.evaluate.scores import EvalConfig, score_matrix
from tmass.features.format import load_split, write_manifest
from tmass.search import SearchConfig, SearchIndex, pool_frames
from tmass.train.trainer import load_checkpoint
from test_extract import SMALL_DEMO, TINY_CONFIG


def run(*args, expect=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def tmass_run(tiny_features, tmp_path_factory) -> Path:
    """An untrained T-MASS head (``--epochs 0``) on the tiny simulated features."""
    out = tmp_path_factory.mktemp("run") / "tmass"
    run("train", "--features", tiny_features, "--head", "tmass", "--epochs", 0, "--no-final-eval", "--no-progress",
        "--out", out)
    return out / "best.pt"


@pytest.fixture(scope="module")
def head_index(tiny_features, tmass_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "idx"
    run("index", "--features", tiny_features / "test", "--out", out, "--checkpoint", tmass_run)
    return out


def _search_json(tmp_path, *args) -> dict:
    path = tmp_path / "hits.json"
    run("search", *args, "--json", path)
    return json.loads(path.read_text())


def test_without_a_head_scores_are_clip_cosines_with_meanp_videos(tiny_features, tmp_path):
    run("index", "--features", tiny_features / "test", "--out", tmp_path / "idx")
    arrays = load_split(tiny_features / "test")
    data = _search_json(tmp_path, "--index", tmp_path / "idx", "--query-features", tiny_features / "test", "--top", 5)
    videos = pool_frames(arrays.frames, arrays.frame_mask)
    texts = arrays.text_embeddings.astype(np.float32)
    cosines = (texts / np.linalg.norm(texts, axis=1, keepdims=True)) @ videos.T  # [n_text, n_video]
    assert len(data["results"]) == len(arrays.text_ids)
    for q, result in enumerate(data["results"]):
        assert result["query_id"] == arrays.text_ids[q] and result["query"] == arrays.captions[q]
        assert [h["rank"] for h in result["hits"]] == [1, 2, 3, 4, 5]
        expected = np.sort(cosines[q])[::-1][:5]
        np.testing.assert_allclose([h["score"] for h in result["hits"]], expected, atol=1e-5)
        rows = [arrays.video_ids.index(h["video_id"]) for h in result["hits"]]
        np.testing.assert_allclose(cosines[q, rows], expected, atol=1e-5)
    assert "no head" in data["made_by"] and data["index_info"]["encoder"]["source"] == "simulated"


def test_two_stages_with_k_at_least_n_equal_exhaustive_scoring(head_index, tiny_features, tmass_run):
    arrays = load_split(tiny_features / "test")
    head, _ = load_checkpoint(tmass_run)
    config = EvalConfig(trials=5, progress=False)
    exhaustive = score_matrix(head, torch.from_numpy(arrays.text_embeddings), arrays.text_ids,
                              torch.from_numpy(arrays.frames), torch.from_numpy(arrays.frame_mask), arrays.video_ids, config)
    index = SearchIndex.open(head_index)
    queries = [0, 7, 33, 100]
    n_video = len(arrays.video_ids)
    for k in (n_video, 10 * n_video):
        rankings = index.rank(arrays.text_embeddings[queries], [arrays.text_ids[q] for q in queries], ["q"] * len(queries),
                              SearchConfig(top=n_video, candidates=k, scoring=config))
        for q, ranking in zip(queries, rankings):
            assert np.array_equal(ranking.rows, np.argsort(-exhaustive[q], kind="stable"))
            np.testing.assert_allclose(ranking.scores, exhaustive[q, ranking.rows], atol=1e-6)
    # fewer candidates: fewer videos, but each score is still the pair's own
    for q, ranking in zip(queries, index.rank(arrays.text_embeddings[queries], [arrays.text_ids[q] for q in queries],
                                              ["q"] * len(queries), SearchConfig(top=10, candidates=12, scoring=config))):
        assert len(ranking.rows) == 10
        np.testing.assert_allclose(ranking.scores, exhaustive[q, ranking.rows], atol=1e-6)
        assert np.all(np.diff(ranking.scores) <= 0)


def test_json_hits_are_in_rank_order_with_ids_scores_and_provenance(head_index, tiny_features, tmass_run, tmp_path):
    arrays = load_split(tiny_features / "test")
    data = _search_json(tmp_path, "--index", head_index, "--query-features", tiny_features / "test",
                        "--query-id", arrays.text_ids[3], "--top", 7, "--candidates", 20, "--trials", 5)
    (result,) = data["results"]
    hits = result["hits"]
    assert [h["rank"] for h in hits] == list(range(1, 8))
    assert all(set(h) == {"rank", "video_id", "score"} and h["video_id"] in arrays.video_ids for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert len({h["video_id"] for h in hits}) == 7
    info = data["index_info"]
    assert info["head"]["checkpoint_sha256"] and info["head"]["name"] == "tmass"
    assert info["features_manifest_sha256"] == arrays.manifest_sha256
    assert data["search"]["candidates"] == 20 and data["search"]["scoring"]["trials"] == 5
    assert "leak-free" in data["made_by"]


def test_features_from_another_encoder_are_refused(head_index, tiny_features, tmass_run, tmp_path):
    from tmass.features.simulate import simulate

    other = simulate("tiny", tmp_path / "other", seed=1, progress=False)
    result = run("search", "--index", head_index, "--query-features", other["test"], expect=1)
    assert "made with simulated features (seed 1)" in result.output and "seed 0" in result.output
    assert len(result.output.strip().splitlines()) == 1
    # a checkpoint trained on seed-0 features cannot index seed-1 features
    result = run("index", "--features", other["test"], "--out", tmp_path / "idx", "--checkpoint", tmass_run, expect=1)
    assert "was trained on features of simulated features (seed 0)" in result.output
    assert not (tmp_path / "idx").exists()


def test_simulated_indexes_refuse_text_queries_and_empty_splits_are_refused(head_index, tiny_features, tmp_path):
    result = run("search", "a dog", "--index", head_index, expect=1)
    assert "no CLIP model" in result.output and "--query-features" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    meta = load_split(tiny_features / "test").meta
    write_manifest(empty, meta, [])
    result = run("index", "--features", empty, "--out", tmp_path / "idx", expect=1)
    assert "holds no videos" in result.output


def test_an_ivf_first_stage_probing_every_list_equals_the_exact_one(tiny_features, tmp_path):
    run("index", "--features", tiny_features / "train", "--out", tmp_path / "flat")
    run("index", "--features", tiny_features / "train", "--out", tmp_path / "ivf", "--first-stage", "ivf", "--nprobe", 1000)
    args = ["--query-features", tiny_features / "train", "--query-id", "train-video000005-cap01", "--top", 10]
    flat = _search_json(tmp_path, "--index", tmp_path / "flat", *args)
    ivf = _search_json(tmp_path, "--index", tmp_path / "ivf", *args)
    assert "IVF" in ivf["made_by"]
    assert [h["video_id"] for h in ivf["results"][0]["hits"]] == [h["video_id"] for h in flat["results"][0]["hits"]]


# ------------------------------------------------------- extracted clips: text and video queries


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory):
    """Tiny random-init CLIP features of the small demo clips, indexed without a head."""
    from tmass.extract.demo import render_demo

    tmp = tmp_path_factory.mktemp("demo-search")
    model = tmp / "tiny-clip.json"
    model.write_text(json.dumps(TINY_CONFIG))
    root = render_demo(tmp / "demo", SMALL_DEMO, progress=False)
    run("extract", "--dataset", "demo", "--data-root", root, "--split", "test", "--out", tmp / "features",
        "--model", model, "--pretrained", "none", "--seed", 3)
    split = tmp / "features" / "demo" / "tiny-clip__none" / "test"
    run("index", "--features", split, "--out", tmp / "idx", "--model", model, "--data-root", root)
    return tmp / "idx", split, root


def test_the_query_encoder_is_rebuilt_from_the_extractions_seed(demo_index):
    index, _, _ = demo_index
    info = json.loads((index / "index.json").read_text())
    assert info["query_encoder_check"]["status"] == "reproduced"
    assert info["encoder"]["seed"] == 3 and info["encoder"]["weights"] == "none"
    assert (index / "model" / "tiny-clip.json").is_file()  # the index does not need the config file again


def test_a_text_query_ranks_by_cosine_and_writes_a_page_with_frame_strips(demo_index, tmp_path):
    index, split, _ = demo_index
    arrays = load_split(split)
    caption = arrays.captions[0]
    result = run("search", caption, "--index", index, "--top", 3, "--json", tmp_path / "hits.json",
                 "--html", tmp_path / "page.html")
    assert "RANDOM-INIT ENCODER" in result.output and " ms" in result.output
    hits = json.loads((tmp_path / "hits.json").read_text())["results"][0]["hits"]
    # the caption's stored embedding is what the rebuilt encoder gives: same cosines
    videos = pool_frames(arrays.frames, arrays.frame_mask)
    text = arrays.text_embeddings[0].astype(np.float32)
    cosines = videos @ (text / np.linalg.norm(text))
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(cosines)[::-1][:3], atol=2e-3)
    page = (tmp_path / "page.html").read_text()
    assert page.count("<img src=\"data:image/png;base64,") == 3 and "page.png" in page
    assert (tmp_path / "page.png").stat().st_size > 0


def test_a_long_query_is_truncated_with_a_warning(demo_index):
    index, _, _ = demo_index
    result = run("search", " ".join(["red circle moves left"] * 30), "--index", index)
    assert "longer than CLIP's context of 77" in result.output and "only its first 75 tokens" in result.output


def test_a_video_file_finds_itself_first(demo_index, tmp_path):
    index, split, root = demo_index
    arrays = load_split(split)
    target = arrays.video_ids[2]
    data = _search_json(tmp_path, "--index", index, "--video", root / "videos" / f"{target}.mp4", "--top", 3)
    assert data["query_kind"] == "video"
    first = data["results"][0]["hits"][0]
    assert first["video_id"] == target and first["score"] == pytest.approx(1.0, abs=2e-3)
    result = run("search", "--index", index, "--video", tmp_path / "missing.mp4", expect=1)
    assert "missing file" in result.output


def test_without_a_data_root_the_page_says_why_there_are_no_frames(demo_index, tmp_path):
    index, split, _ = demo_index
    import shutil

    info = json.loads((index / "index.json").read_text())
    moved = tmp_path / "idx"
    shutil.copytree(index, moved)
    (moved / "index.json").write_text(json.dumps({**info, "data_root": None}))
    run("search", "circle", "--index", moved, "--top", 2, "--html", tmp_path / "page.html")
    page = (tmp_path / "page.html").read_text()
    assert "frames not shown" in page and "<img" not in page


def test_eval_saves_sims_with_ids_and_search_gives_the_same_scores(head_index, tiny_features, tmass_run, tmp_path):
    run("eval", "--features", tiny_features, "--checkpoint", tmass_run, "--trials", 5, "--save-sims", tmp_path / "sims.npz")
    run("eval", "--features", tiny_features, "--checkpoint", tmass_run, "--trials", 5, "--save-sims", tmp_path / "sims.npy")
    saved = np.load(tmp_path / "sims.npz")
    ids = json.loads((tmp_path / "sims.ids.json").read_text())
    arrays = load_split(tiny_features / "test")
    assert list(saved["text_ids"]) == ids["text_ids"] == arrays.text_ids
    assert list(saved["video_ids"]) == ids["video_ids"] == arrays.video_ids
    np.testing.assert_array_equal(np.load(tmp_path / "sims.npy"), saved["sims"])
    text_id = arrays.text_ids[9]
    data = _search_json(tmp_path, "--index", head_index, "--query-features", tiny_features / "test", "--query-id", text_id,
                        "--trials", 5, "--top", 5, "--candidates", 16)
    row = ids["text_ids"].index(text_id)
    for hit in data["results"][0]["hits"]:
        assert hit["score"] == pytest.approx(float(saved["sims"][row, ids["video_ids"].index(hit["video_id"])]), abs=1e-6)


def test_a_folder_without_captions_is_checked_on_its_frames_and_shows_them(demo_index, tmp_path):
    import shutil

    _, _, root = demo_index
    folder = tmp_path / "my videos"
    (folder / "trip").mkdir(parents=True)
    for clip in sorted((root / "videos").glob("*.mp4"))[:3]:
        shutil.copy(clip, folder / "trip" / clip.name)
    model = demo_index[0] / "model" / "tiny-clip.json"
    run("extract", "--dataset", "folder", "--data-root", folder, "--out", tmp_path / "features", "--model", model,
        "--pretrained", "none")
    split = tmp_path / "features" / "folder" / "tiny-clip__none" / "all"
    run("index", "--features", split, "--out", tmp_path / "idx", "--model", model)
    check = json.loads((tmp_path / "idx" / "index.json").read_text())["query_encoder_check"]
    assert check["status"] == "reproduced" and check["checked"].startswith("frames of trip/")
    run("search", "a shape", "--index", tmp_path / "idx", "--top", 3, "--html", tmp_path / "page.html")
    assert (tmp_path / "page.html").read_text().count("<img") == 3  # the folder's path came from the features
