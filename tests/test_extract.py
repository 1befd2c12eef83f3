"""The extract stage end to end on rendered clips with a tiny random-init open_clip model:
frame sampling, equality with open_clip's own preprocessing, manifest contents, bad inputs,
resume after kill -9, the dask path, offline behaviour."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from tmass.cli import main
from tmass.extract.demo import DemoSpec, demo_clip, render_demo, write_clip
from tmass.extract.video import read_frames, sample_indices, video_rng
from tmass.features.format import check_split, load_split

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SMALL_DEMO = DemoSpec(n_train=4, n_test=5, width=64, height=48, seconds=2.0, fps=10)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of an open_clip config for a 2-layer ViT/text tower of width 64 (model name
    ``tiny-clip``): the real code path at a fraction of ViT-B-32's cost."""
    path = tmp_path_factory.mktemp("models") / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    return render_demo(tmp_path_factory.mktemp("demo"), SMALL_DEMO, progress=False)


def extract(*args, expect=0):
    result = CliRunner().invoke(main, ["extract", *map(str, args)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


def _shards(split_dir: Path, kind: str) -> dict:
    """Every dataset of every shard of one kind, concatenated in shard order."""
    out: dict = {}
    for path in sorted(split_dir.glob(f"{kind}-*.h5")):
        with h5py.File(path, "r") as h5:
            for name in h5:
                out.setdefault(name, []).append(h5[name][:])
    return {k: np.concatenate(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- sampling


def test_uniform_sampling_takes_segment_middles():
    index, mask = sample_indices(24, 12)
    assert index.tolist() == list(range(0, 24, 2)) and mask.all()
    assert sample_indices(12, 12)[0].tolist() == list(range(12))
    assert sample_indices(100, 4)[0].tolist() == [12, 37, 62, 87]


def test_random_sampling_stays_in_its_segment_and_is_reproducible():
    index, _ = sample_indices(100, 4, "random", video_rng(0, "v1"))
    assert all(25 * i <= j < 25 * (i + 1) for i, j in enumerate(index))
    assert np.array_equal(index, sample_indices(100, 4, "random", video_rng(0, "v1"))[0])
    draws = {tuple(sample_indices(100, 4, "random", video_rng(0, f"v{i}"))[0]) for i in range(20)}
    assert len(draws) > 1


def test_short_clip_keeps_each_frame_once_and_masks_the_rest():
    index, mask = sample_indices(5, 8)
    assert index.tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    assert mask.tolist() == [True] * 5 + [False] * 3


def test_decoder_returns_the_sampled_frames(tmp_path):
    """Frame i of the clip is painted grey level 10 * i: decoding must hand back exactly
    the frames that sampling chose (decord seeks; a wrong seek would show here)."""
    frames = np.repeat(np.arange(24, dtype=np.uint8)[:, None, None, None] * 10, 48 * 64 * 3).reshape(24, 48, 64, 3)
    write_clip(tmp_path / "ramp.mp4", frames)
    decoded, index, mask = read_frames(tmp_path / "ramp.mp4", 6)
    assert index.tolist() == [1, 5, 9, 13, 17, 21] and mask.all()
    assert np.allclose(decoded.mean(axis=(1, 2, 3)), 10 * index, atol=2)


# ---------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def demo_features(tiny_model, demo_root, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("features")
    result = extract("--dataset", "demo", "--data-root", demo_root, "--out", out, "--model", tiny_model,
                     "--pretrained", "none", "--shard-size", 2, "--batch-size", 2)
    return out / "demo" / "tiny-clip__none", result.output


def test_extraction_writes_a_valid_split_per_split(demo_features):
    features, output = demo_features
    for split, n_videos in (("train", 4), ("test", 5)):
        split_dir = features / split
        assert str(split_dir) in output  # the command prints each directory it wrote
        assert check_split(split_dir) == []
        arrays = load_split(split_dir)
        assert arrays.frames.shape == (n_videos, 12, 32) and arrays.frame_mask.all()
        assert arrays.video_ids == sorted(arrays.video_ids)
        per_video = np.bincount(arrays.text_to_video, minlength=n_videos)
        assert per_video.min() >= SMALL_DEMO.min_captions and per_video.max() <= SMALL_DEMO.max_captions
        assert sorted(p.name for p in split_dir.glob("videos-*.h5")) == [f"videos-{i:05d}.h5" for i in range(-(-n_videos // 2))]
        assert (split_dir / "extract-config.json").is_file() and "image model" in (split_dir / "extract.log").read_text()


def test_manifest_records_model_weights_and_protocol(demo_features, tiny_model):
    features, _ = demo_features
    manifest = json.loads((features / "test" / "manifest.json").read_text())
    meta = manifest["meta"]
    assert (meta["dataset"], meta["split"], meta["model"], meta["pretrained"]) == ("demo", "test", "tiny-clip", "none")
    assert meta["random_init"] is True and meta["source"] == "open_clip" and meta["checkpoint_sha256"] is None
    assert (meta["embed_dim"], meta["num_frames"], meta["frame_sampling"], meta["image_size"]) == (32, 12, "uniform", 32)
    assert meta["logit_scale"] == pytest.approx(1 / 0.07)  # exp of open_clip's initial log(1/0.07)
    assert meta["extra"]["short_clip_policy"] == "mask" and meta["extra"]["decoder"].startswith("decord")
    assert meta["extra"]["weights"] == "none" and meta["extra"]["precision"] == "fp32"
    assert manifest["failed"] == [] and manifest["counts"]["videos"] == 5
    with h5py.File(features / "test" / "videos-00000.h5", "r") as h5:
        assert h5.attrs["random_init"] and h5.attrs["model"] == "tiny-clip"  # every shard says it too


def test_embeddings_equal_open_clip_on_its_own_preprocessing(demo_features, demo_root):
    """Our stored frame embedding is open_clip's ``encode_image(preprocess(PIL frame))``
    for the same frame, and the caption embedding its ``encode_text(tokenizer(caption))``,
    with the model built straight from open_clip (same seed, so the same random weights)."""
    import decord
    import open_clip
    import torch
    from PIL import Image

    arrays = load_split(demo_features[0] / "test")
    videos = _shards(demo_features[0] / "test", "videos")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=None)
    model.eval()
    row = 3
    reader = decord.VideoReader(str(demo_root / "videos" / f"{arrays.video_ids[row]}.mp4"))
    slots = [0, 5, 11]
    frames = [Image.fromarray(reader[int(videos["frame_index"][row, s])].asnumpy()) for s in slots]
    text_row = int(np.flatnonzero(arrays.text_to_video == row)[0])
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(f) for f in frames])).numpy()
        text = model.encode_text(open_clip.get_tokenizer("tiny-clip")([arrays.captions[text_row]])).numpy()
    np.testing.assert_allclose(arrays.frames[row, slots].astype(np.float32), image, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(arrays.text_embeddings[text_row].astype(np.float32), text[0], rtol=2e-3, atol=2e-3)


def test_random_sampling_through_the_pipeline_is_recorded_and_reproducible(tiny_model, demo_root, tmp_path):
    args = ["--dataset", "demo", "--data-root", demo_root, "--model", tiny_model, "--pretrained", "none",
            "--split", "test", "--num-frames", 4, "--sampling", "random", "--loader-workers", 0]
    indices = []
    for run in ("a", "b"):
        extract(*args, "--out", tmp_path / run)
        split_dir = tmp_path / run / "demo" / "tiny-clip__none" / "test"
        assert json.loads((split_dir / "manifest.json").read_text())["meta"]["frame_sampling"] == "random"
        indices.append(_shards(split_dir, "videos")["frame_index"])
    segment = int(SMALL_DEMO.fps * SMALL_DEMO.seconds) // 4  # clips of 20 frames divide evenly
    assert np.array_equal(indices[0], indices[1])
    assert ((indices[0] // segment) == np.arange(4)).all()  # one frame from each segment
    assert len({tuple(row) for row in indices[0]}) > 1  # ... a different one per video


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def messy_msrvtt(tmp_path_factory) -> Path:
    """An MSR-VTT 1k-A style test split with every kind of bad input next to good ones."""
    root = tmp_path_factory.mktemp("msrvtt")
    videos = root / "videos" / "all"
    good = demo_clip(SMALL_DEMO, 0)[0]
    write_clip(videos / "video1.mp4", good)
    write_clip(videos / "video2.mp4", good[::-1])
    write_clip(videos / "video3.mp4", good[:5])  # shorter than --num-frames 8
    (videos / "video4.mp4").write_bytes(b"")
    (videos / "video5.mp4").write_bytes((videos / "video1.mp4").read_bytes()[:1500])  # truncated
    (videos / "video6.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    write_clip(videos / "video8.mp4", np.zeros((10, 64, 64, 3), np.uint8), codec="libsvtav1")  # decord has no AV1
    rows = [("video1", "a good clip"), ("video1", "its second caption"), ("video1", "   "),
            ("video2", "another good clip"), ("video2", b"broken \xff\xfe bytes"), ("video3", "a short clip"),
            ("video4", "empty file"), ("video5", "truncated"), ("video6", "noise"), ("video7", "no file at all"),
            ("video8", "av1 codec")]
    lines = [b"key,vid_key,video_id,sentence"] + [
        f"ret{i},msr{v[5:]},{v},".encode() + (s if isinstance(s, bytes) else s.encode()) for i, (v, s) in enumerate(rows)]
    (root / "MSRVTT_JSFUSION_test.csv").write_bytes(b"\n".join(lines) + b"\n")
    return root


@pytest.fixture(scope="module")
def messy_run(messy_msrvtt, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("messy")
    result = extract("--dataset", "msrvtt", "--data-root", messy_msrvtt, "--split", "test", "--out", out,
                     "--model", tiny_model, "--pretrained", "none", "--num-frames", 8, "--shard-size", 3, expect=3)
    return out / "msrvtt" / "tiny-clip__none" / "test", result.output


def test_every_bad_input_is_skipped_recorded_and_reported(messy_run):
    split_dir, output = messy_run
    failed = {f["id"]: f for f in json.loads((split_dir / "manifest.json").read_text())["failed"]}
    reasons = {k: v["reason"] for k, v in failed.items()}
    assert reasons.pop("video4") == "zero-length file"
    assert reasons.pop("video7") == "missing file"
    assert reasons.pop("video8") == "no decodable video stream (unsupported codec?)"
    assert reasons.pop("video5").startswith("undecodable") and reasons.pop("video6").startswith("undecodable")
    assert reasons.pop("video1#2") == "empty caption"
    assert reasons.pop("video2#1") == "caption is not valid UTF-8"
    assert reasons == {}
    assert failed["video7"]["path"].endswith("videos/all/video7.mp4") and failed["video1#2"]["path"].endswith(".csv")
    assert "7 inputs skipped" in output and "zero-length file: 1" in output  # the end summary


def test_good_videos_survive_bad_neighbours_and_failed_videos_lose_their_captions(messy_run):
    split_dir, _ = messy_run
    assert check_split(split_dir) == []
    arrays = load_split(split_dir)
    assert arrays.video_ids == ["video1", "video2", "video3"]
    assert arrays.text_ids == ["video1#0", "video1#1", "video2#0", "video3#0"]
    assert arrays.frame_mask.sum(axis=1).tolist() == [8, 8, 5]  # the short clip is masked, not repeated
    padding = _shards(split_dir, "videos")["frame_index"][2]
    assert padding.tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    assert not arrays.frames[2, 5:].any() and np.isfinite(arrays.frames).all()


def test_a_partition_whose_videos_all_failed_still_completes(messy_run):
    """Partition 1 (video4, video5, video6) decoded nothing: it writes empty shards, so a
    resume knows it is done and the reader accepts the split."""
    split_dir, _ = messy_run
    with h5py.File(split_dir / "videos-00001.h5", "r") as h5:
        assert h5["frames"].shape == (0, 8, 32)
    assert len(json.loads((split_dir / "partition-00001.json").read_text())["failed"]) == 3


# ------------------------------------------------------------------- resume and dask


def _features(split_dir: Path) -> tuple:
    arrays = load_split(split_dir)
    return arrays.video_ids, arrays.text_ids, arrays.frames, arrays.frame_mask, arrays.text_embeddings


def test_resume_after_kill_9_equals_an_uninterrupted_run(tiny_model, demo_root, tmp_path):
    common = ["--dataset", "demo", "--data-root", demo_root, "--model", tiny_model, "--pretrained", "none",
              "--split", "train", "--shard-size", 1, "--batch-size", 1, "--loader-workers", 0]
    killed = tmp_path / "killed"
    split_dir = killed / "demo" / "tiny-clip__none" / "train"
    proc = subprocess.Popen([sys.executable, "-c", "from tmass.cli import main; main()", "extract", *map(str, common),
                             "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (split_dir / "texts-00000.h5").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (split_dir / "manifest.json").exists(), "the run finished before it could be killed"
    assert len(list(split_dir.glob("texts-*.h5"))) < SMALL_DEMO.n_train

    extract(*common, "--out", killed)
    extract(*common, "--out", tmp_path / "whole")
    resumed, whole = _features(split_dir), _features(tmp_path / "whole" / "demo" / "tiny-clip__none" / "train")
    for a, b in zip(resumed, whole):
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
    assert not list(split_dir.glob(".*tmp*")), "temporary files of the killed run are cleaned up"


def test_resume_keeps_failures_of_completed_partitions(messy_run, messy_msrvtt, tiny_model):
    split_dir, _ = messy_run
    before = json.loads((split_dir / "manifest.json").read_text())["failed"]
    (split_dir / "videos-00002.h5").unlink()  # partition 2 incomplete: rerun it alone
    out = split_dir.parents[2]
    extract("--dataset", "msrvtt", "--data-root", messy_msrvtt, "--split", "test", "--out", out, "--model", tiny_model,
            "--pretrained", "none", "--num-frames", 8, "--shard-size", 3, expect=3)
    assert sorted(map(str, json.loads((split_dir / "manifest.json").read_text())["failed"])) == sorted(map(str, before))


def test_resume_redoes_a_partition_whose_annotation_changed(tiny_model, tmp_path):
    root = tmp_path / "msrvtt"
    for i in (1, 2):
        write_clip(root / "videos" / "all" / f"video{i}.mp4", demo_clip(SMALL_DEMO, i)[0])
    csv = root / "MSRVTT_JSFUSION_test.csv"
    csv.write_text("key,vid_key,video_id,sentence\nret0,msr1,video1,one\nret1,msr2,video2,two\n")
    args = ["--dataset", "msrvtt", "--data-root", root, "--split", "test", "--out", tmp_path / "out", "--model",
            tiny_model, "--pretrained", "none", "--shard-size", 1, "--loader-workers", 0]
    extract(*args)
    split_dir = tmp_path / "out" / "msrvtt" / "tiny-clip__none" / "test"
    untouched = (split_dir / "texts-00000.h5").stat().st_mtime_ns
    csv.write_text(csv.read_text().replace("two", '"two, corrected"'))
    extract(*args)
    assert load_split(split_dir).captions == ["one", "two, corrected"]
    assert (split_dir / "texts-00000.h5").stat().st_mtime_ns == untouched


def _same_features(split_dir: Path, reference: Path) -> None:
    got, want = _features(split_dir), _features(reference)
    assert got[:2] == want[:2] and np.array_equal(got[3], want[3])
    for a, b in ((got[2], want[2]), (got[4], want[4])):  # float16; torch thread counts may differ
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-3, atol=1e-3)


def test_dask_local_cluster_gives_the_single_process_features(tiny_model, demo_root, demo_features, tmp_path):
    extract("--dataset", "demo", "--data-root", demo_root, "--out", tmp_path, "--model", tiny_model, "--pretrained",
            "none", "--shard-size", 2, "--batch-size", 2, "--split", "test", "--workers", 2)
    _same_features(tmp_path / "demo" / "tiny-clip__none" / "test", demo_features[0] / "test")


def test_joining_an_existing_cluster_gives_the_same_features(tiny_model, demo_root, demo_features, tmp_path):
    """A cluster we did not start has daemonic workers, which may not fork decode
    processes: the runner then decodes in-process, with the same result."""
    import distributed

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        extract("--dataset", "demo", "--data-root", demo_root, "--out", tmp_path, "--model", tiny_model, "--pretrained",
                "none", "--shard-size", 2, "--batch-size", 2, "--split", "test", "--scheduler", cluster.scheduler_address)
    _same_features(tmp_path / "demo" / "tiny-clip__none" / "test", demo_features[0] / "test")


def test_a_rerun_with_other_settings_is_refused(tiny_model, demo_root, demo_features):
    result = extract("--dataset", "demo", "--data-root", demo_root, "--out", demo_features[0].parents[1], "--model",
                     tiny_model, "--pretrained", "none", "--shard-size", 2, "--num-frames", 4, expect=1)
    assert "num_frames: 12 then, 4 now" in result.output


def _children(pid: int) -> list[int]:
    """Every process below ``pid`` (decode workers, dask workers, ...)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            found += [kid, *_children(kid)]
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent that will never reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(condition, what: str, timeout: float = 600.0):  # generous: a shared 2-core machine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_one_writer_at_a_time_and_a_killed_one_never_blocks(tiny_model, demo_root, tmp_path):
    """A running extraction (stopped mid-partition, its decode workers alive) holds the
    split: a second run is refused at once, naming it. Killed with -9, it blocks nothing
    (with flock, the decode workers it forked kept the lock for seconds)."""
    common = ["--dataset", "demo", "--data-root", demo_root, "--model", tiny_model, "--pretrained", "none",
              "--split", "train", "--shard-size", 1, "--batch-size", 1, "--loader-workers", 2, "--out", tmp_path]
    holder = subprocess.Popen([sys.executable, "-c", "from tmass.cli import main; main()", "extract", *map(str, common)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "demo" / "tiny-clip__none" / "train" / ".lock"
        _wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(holder.pid), "the lock")
        _wait_for(lambda: _children(holder.pid), "the decode workers")
        os.kill(holder.pid, signal.SIGSTOP)  # holds the directory for as long as the test needs
        refused = extract(*common, expect=1)
        assert f"another process (pid {holder.pid}) is writing into this split directory" in refused.output
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        extract(*common)  # at once: its forked decode workers, dying or not, hold no lock
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert check_split(tmp_path / "demo" / "tiny-clip__none" / "train") == []


@pytest.mark.slow
def test_local_dask_workers_and_their_decode_workers_die_with_a_killed_driver(tiny_model, demo_root, tmp_path):
    """kill -9 of `tmass extract --workers 2` mid-run: every process it started is gone
    within seconds (a spawned decode worker used to stay, blocked on its queue)."""
    split_dir = tmp_path / "demo" / "tiny-clip__none" / "test"
    driver = subprocess.Popen([sys.executable, "-c", "from tmass.cli import main; main()", "extract", "--dataset", "demo",
                               "--data-root", str(demo_root), "--model", tiny_model, "--pretrained", "none", "--split",
                               "test", "--shard-size", "1", "--batch-size", "1", "--workers", "2", "--out", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = []
    try:
        _wait_for(lambda: list(split_dir.glob("videos-*.h5")), "the first partition")

        def all_started():  # the second worker may start its decode worker after the first partition is written
            assert driver.poll() is None, "the extraction ended before two dask workers with decode workers were seen"
            kids = _children(driver.pid)
            return kids if len(kids) >= 4 else None

        started = _wait_for(all_started, "two dask workers, each with a decode worker", timeout=60)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 30
        while any(map(_alive, started)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in started if _alive(pid)], "processes outlived the extraction that started them"
    finally:
        for pid in started:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if driver.poll() is None:
            driver.kill()


def _tree(directory: Path) -> dict:
    """Every file under ``directory`` with its size and modification time."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_simulated_and_extracted_features_never_mix(tiny_model, demo_root, tmp_path):
    """The issue's case: simulating into a directory of extracted features (and back)."""
    from tmass.features.format import SplitDirError
    from tmass.features.simulate import simulate

    args = ["--dataset", "demo", "--data-root", demo_root, "--model", tiny_model, "--pretrained", "none",
            "--split", "test", "--shard-size", 2, "--out", tmp_path]
    tag_dir = tmp_path / "demo" / "tiny-clip__none"
    extract(*args)
    before = _tree(tmp_path)
    with pytest.raises(SplitDirError, match="made otherwise.*source: 'open_clip' then, 'simulated' now"):
        simulate("tiny", tag_dir, progress=False)
    assert _tree(tmp_path) == before, "a refused run touches nothing"
    rerun = extract(*args)
    assert "3 partitions were already complete" in rerun.output

    simulate("tiny", tag_dir, progress=False, overwrite=True)
    assert check_split(tag_dir / "test") == [] and load_split(tag_dir / "test").meta.source == "simulated"
    assert not list((tag_dir / "test").glob("partition-*.json")), "replaced as a whole"
    before = _tree(tmp_path)
    refused = extract(*args, expect=1)
    assert "made otherwise" in refused.output and "--overwrite" in refused.output
    assert "Traceback" not in refused.output and len(refused.output.strip().splitlines()) == 1
    assert _tree(tmp_path) == before
    extract(*args, "--overwrite")
    assert check_split(tag_dir / "test") == [] and load_split(tag_dir / "test").meta.source == "open_clip"


def test_resume_verifies_the_checkpoint_and_the_model_config(tiny_model, demo_root, tmp_path):
    """A checkpoint replaced at the same path, or a model config edited in place, would
    mix encoders: the resume compares with what the first run recorded and refuses."""
    import open_clip
    import torch

    from tmass.extract.encoder import register_model

    config = tmp_path / "tiny-clip.json"
    config.write_text(Path(tiny_model).read_text())
    checkpoint = tmp_path / "weights.pt"
    register_model(str(config))
    for seed in (1, 2):
        torch.manual_seed(seed)
        torch.save(open_clip.create_model("tiny-clip").state_dict(), tmp_path / f"seed{seed}.pt")
    checkpoint.write_bytes((tmp_path / "seed1.pt").read_bytes())
    args = ["--dataset", "demo", "--data-root", demo_root, "--model", config, "--split", "test", "--shard-size", 2,
            "--out", tmp_path / "out"]
    extract(*args, "--pretrained", checkpoint)
    split_dir = tmp_path / "out" / "demo" / "tiny-clip__weights" / "test"
    first = json.loads((split_dir / "manifest.json").read_text())["meta"]["checkpoint_sha256"]
    (split_dir / "videos-00001.h5").unlink()  # an interrupted run
    checkpoint.write_bytes((tmp_path / "seed2.pt").read_bytes())
    refused = extract(*args, "--pretrained", checkpoint, expect=1)
    assert f"checkpoint_sha256: '{first}' then" in refused.output
    assert not (split_dir / "videos-00001.h5").exists()

    extract(*args, "--pretrained", "none")
    config.write_text(json.dumps({**TINY_CONFIG, "text_cfg": {**TINY_CONFIG["text_cfg"], "layers": 1}}))
    refused = extract(*args, "--pretrained", "none", expect=1)
    assert "model_config:" in refused.output


def test_captions_run_over_their_longest_token_count_with_open_clips_embeddings(tiny_model):
    """encode_texts trims a batch to its longest caption (SOT to EOT) and gives
    open_clip's untrimmed encode_text embeddings; a caption past the context length
    is truncated as before (no trimming, the same result)."""
    import open_clip
    import torch

    from tmass.extract.encoder import load_encoder

    encoder = load_encoder(tiny_model, "none", "cpu", seed=0)
    model, tokenizer = encoder.model, open_clip.get_tokenizer("tiny-clip")
    seen = []
    hook = model.transformer.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[1]))
    for captions in (["a dog", "a man is cooking pasta in a small kitchen", "go"], ["word " * 100, "short"]):
        seen.clear()
        got = encoder.encode_texts(captions)
        longest = int(tokenizer(captions).argmax(dim=-1).max()) + 1
        with torch.inference_mode():
            expected = model.encode_text(tokenizer(captions)).numpy()
        assert seen[0] == longest and (longest < 77 or len(captions[0]) > 400)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    hook.remove()


def test_extraction_starts_one_worker_per_visible_gpu_by_default(monkeypatch):
    import torch

    from tmass.extract.cli import _gpu_workers

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [_gpu_workers(d) for d in ("auto", "cuda", "cuda:1", "cpu")] == [4, 4, 0, 0]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _gpu_workers("auto") == 0  # one GPU: this process, no cluster


def _batch_timings(log: str) -> list[tuple[float, float, float]]:
    """(waited on loader, decode, image model) seconds of every batch in an extract.log."""
    pattern = r"waited on loader ([\d.]+)s, decode ([\d.]+)s \([^)]*\), image model ([\d.]+)s"
    return [tuple(map(float, m)) for m in re.findall(pattern, log)]


@pytest.mark.parametrize("loader_workers", [1, 0])
def test_loader_workers_decode_the_next_batch_while_the_model_encodes(loader_workers, tiny_model, demo_root, tmp_path,
                                                                      monkeypatch):
    """Decoding (0.2 s a video, forked into the loader workers) and the model (0.4 s a
    batch) both slowed down: with a loader worker the model never waits for the next
    batch after the first, as extract.log's per-batch timings show; without one it
    waits for every batch's whole decode (the measurement can tell the two apart)."""
    from tmass.extract import runner
    from tmass.extract.encoder import Encoder

    read_frames, encode_images = runner.read_frames, Encoder.encode_images
    monkeypatch.setattr(runner, "read_frames", lambda *a, **k: (time.sleep(0.2), read_frames(*a, **k))[1])
    monkeypatch.setattr(Encoder, "encode_images", lambda self, p: (time.sleep(0.4), encode_images(self, p))[1])
    extract("--dataset", "demo", "--data-root", demo_root, "--model", tiny_model, "--pretrained", "none",
            "--split", "test", "--shard-size", 5, "--batch-size", 1, "--loader-workers", loader_workers, "--out", tmp_path)
    log = (tmp_path / "demo" / "tiny-clip__none" / "test" / "extract.log").read_text()
    timings = _batch_timings(log)
    assert len(timings) == 5 and all(model >= 0.4 and decode >= 0.2 for _, decode, model in timings)
    waited, decoded = sum(t[0] for t in timings[1:]), sum(t[1] for t in timings[1:])
    summary = next(line for line in log.splitlines() if "decode+preprocess" in line)
    if loader_workers:
        assert waited < 0.25 * decoded and "in loader workers, overlapped with the model" in summary
    else:
        assert waited >= decoded and "in the runner, not overlapped (--loader-workers 0)" in summary


def test_auto_batch_size_fills_half_the_free_gpu_memory_within_bounds():
    from tmass.extract.encoder import AUTO_MAX_VIDEOS, image_bytes, videos_per_batch

    assert image_bytes(768, 224, 16) > image_bytes(768, 224, 32) and image_bytes(1024, 224, 14) > image_bytes(768, 224, 14)
    per_video = 12 * image_bytes(768, 224, 16)
    for free in (2**30, 3 * 2**30, 8 * 2**30):
        n = videos_per_batch(free, 768, 12, 224, 16)
        assert 1 < n < AUTO_MAX_VIDEOS and n * per_video <= free / 2 < (n + 1) * per_video
        assert videos_per_batch(free, 768, 24, 224, 16) in (n // 2, (n + 1) // 2)  # twice the frames: half the videos
    assert videos_per_batch(2**20, 768, 12, 224, 16) == 1  # never none
    assert videos_per_batch(139 * 2**30, 768, 12, 224, 32) == AUTO_MAX_VIDEOS


def test_auto_batch_size_on_the_cpu_is_the_old_default_and_the_option_says_what_it_takes(tiny_model, tmp_path):
    from tmass.extract.encoder import CPU_BATCH_SIZE, load_encoder
    from tmass.extract.runner import ExtractConfig

    assert ExtractConfig().batch_size == "auto" and CPU_BATCH_SIZE == 16
    assert load_encoder(tiny_model, "none", "cpu").auto_batch_size(12) == CPU_BATCH_SIZE
    for bad in ("0", "lots"):
        refused = extract("--out", tmp_path, "--batch-size", bad, expect=2)
        assert "Invalid value for '--batch-size'" in refused.output and "'auto'" in refused.output


def test_fp16_frames_from_the_loader_are_widened_on_the_device(tiny_model, demo_root):
    """Under amp-fp16 the loader hands fp16 frames over (collate_videos(half=True)); the
    encoder widens them to float32 on its device, so they encode as the same frames
    rounded to fp16 would in float32."""
    import torch

    from tmass.extract.encoder import load_encoder
    from tmass.extract.runner import ExtractConfig, VideoFrames, collate_videos
    from tmass.extract.datasets import load_split as load_annotations

    encoder = load_encoder(tiny_model, "none", "cpu")
    data = load_annotations("demo", demo_root, "test")
    items = [VideoFrames(tuple(data.videos[:2]), ExtractConfig(), encoder.preprocess)[i] for i in range(2)]
    full, half = collate_videos(items), collate_videos(items, half=True)
    assert full.pixels.dtype == torch.float32 and half.pixels.dtype == torch.float16
    assert torch.equal(half.pixels, full.pixels.half()) and half.video_ids == full.video_ids
    np.testing.assert_array_equal(encoder.encode_images(half.pixels), encoder.encode_images(half.pixels.float()))


@pytest.mark.cuda
def test_on_cuda_pinned_fp16_frames_encode_as_float32_frames_do(tiny_model):
    """autocast rounds the first convolution's input to fp16 anyway: handing the frames
    over in fp16, pinned and copied asynchronously, changes no embedding."""
    import torch

    from tmass.extract.encoder import load_encoder

    encoder = load_encoder(tiny_model, "none", "cuda")
    pixels = torch.randn(24, 3, 32, 32)
    np.testing.assert_array_equal(encoder.encode_images(pixels.half().pin_memory()), encoder.encode_images(pixels))


@pytest.mark.cuda
def test_on_cuda_the_auto_batch_rule_overestimates_a_vit_b_32s_memory():
    """The rule's per-image bytes bound what each further image adds to the peak memory
    of a ViT-B/32 forward pass (the fixed part, fp16 copies of the weights, is left to
    the other half of the free memory); the batch it picks runs."""
    import torch

    from tmass.extract.encoder import AUTO_MAX_VIDEOS, image_bytes, load_encoder

    encoder = load_encoder("ViT-B-32", "none", "cuda")
    videos = encoder.auto_batch_size(12)
    assert 2 <= videos <= AUTO_MAX_VIDEOS

    def peak(images: int) -> int:
        pixels = torch.randn(images, 3, 224, 224).half().pin_memory()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        assert encoder.encode_images(pixels).shape == (images, 512)
        return torch.cuda.max_memory_allocated() - before

    small, large = 12, videos * 12
    assert (peak(large) - peak(small)) / (large - small) <= image_bytes(768, 224, 32)


@pytest.mark.cuda
def test_on_cuda_extraction_sizes_its_batches_by_default(tiny_model, demo_root, tmp_path):
    from tmass.extract.encoder import AUTO_MAX_VIDEOS

    extract("--dataset", "demo", "--data-root", demo_root, "--model", tiny_model, "--pretrained", "none",
            "--split", "test", "--device", "cuda", "--out", tmp_path)
    split_dir = tmp_path / "demo" / "tiny-clip__none" / "test"
    assert check_split(split_dir) == []
    assert f"{AUTO_MAX_VIDEOS} videos per image batch (--batch-size auto)" in (split_dir / "extract.log").read_text()
    assert json.loads((split_dir / "manifest.json").read_text())["meta"]["extra"]["precision"] == "amp-fp16"


def test_token_features_are_the_models_own_tokens(tiny_model, demo_root, tmp_path):
    """--text-tokens: every caption token through ln_final and the text projection, whose
    EOT row is the caption embedding; --patch-grid 2 on tiny-clip's 2x2 patches: each
    cell is one patch token as open_clip itself outputs it (output_tokens), projected."""
    import decord
    import open_clip
    import torch
    from PIL import Image

    extract("--dataset", "demo", "--data-root", demo_root, "--out", tmp_path, "--model", tiny_model, "--pretrained",
            "none", "--split", "test", "--shard-size", 2, "--text-tokens", "--patch-grid", 2)
    split_dir = tmp_path / "demo" / "tiny-clip__none" / "test"
    assert check_split(split_dir) == []
    arrays = load_split(split_dir)
    n_text = len(arrays.text_ids)
    eot = arrays.token_mask.sum(axis=1) - 1
    assert (arrays.token_mask == (np.arange(arrays.token_mask.shape[1]) <= eot[:, None])).all()  # SOT .. EOT
    np.testing.assert_allclose(arrays.token_embeddings[np.arange(n_text), eot].astype(np.float32),
                               arrays.text_embeddings.astype(np.float32), rtol=2e-3, atol=2e-3)
    ids = open_clip.get_tokenizer("tiny-clip")(arrays.captions)
    assert (eot == ids.argmax(dim=-1).numpy()).all()

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=None)
    model.eval()
    model.visual.output_tokens = True
    row, slots = 2, [0, 7]
    index = _shards(split_dir, "videos")["frame_index"]
    reader = decord.VideoReader(str(demo_root / "videos" / f"{arrays.video_ids[row]}.mp4"))
    pixels = torch.stack([preprocess(Image.fromarray(reader[int(index[row, s])].asnumpy())) for s in slots])
    with torch.no_grad():
        _, tokens = model.visual(pixels)
        cells = (tokens @ model.visual.proj).numpy()  # [2 frames, 4 patches, dim], row-major
    assert arrays.patch_embeddings.shape == (5, 12, 4, 32)
    np.testing.assert_allclose(arrays.patch_embeddings[row, slots].astype(np.float32), cells, rtol=2e-3, atol=2e-3)


def test_a_one_cell_grid_is_the_mean_of_the_projected_patch_tokens(tiny_model):
    import torch

    from tmass.extract.encoder import EncoderError, load_encoder

    encoder = load_encoder(tiny_model, "none", "cpu")
    pixels = torch.randn(3, 3, 32, 32)
    embeddings, cells = encoder.encode_image_tokens(pixels, 1)
    encoder.model.visual.output_tokens = True
    with torch.no_grad():
        _, tokens = encoder.model.visual(pixels)
        mean = (tokens @ encoder.model.visual.proj).mean(dim=1).numpy()
    encoder.model.visual.output_tokens = False
    np.testing.assert_allclose(cells[:, 0], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(embeddings, encoder.encode_images(pixels))
    with pytest.raises(EncoderError, match="--patch-grid 3 exceeds tiny-clip's grid of 2x2 patches"):
        encoder.token_support(False, 3)


# ----------------------------------------------------------------------------- offline


def test_pretrained_weights_fail_fast_offline_with_a_way_out(demo_root, tmp_path):
    """HF_HUB_OFFLINE=1 (conftest) and no cached weights: `--pretrained openai`, the
    default, stops at once and says how to run offline; nothing is written."""
    start = time.monotonic()
    result = extract("--dataset", "demo", "--data-root", demo_root, "--out", tmp_path, expect=1)
    assert time.monotonic() - start < 20
    assert "--pretrained none" in result.output and "openai" in result.output
    assert not list(tmp_path.iterdir())


def test_unreachable_hub_is_detected_in_seconds(monkeypatch):
    """Online mode but the hub host refuses connections (a closed local port stands in
    for a machine without internet): no minute of retries, a clear message instead."""
    from huggingface_hub import constants

    from tmass.extract.encoder import EncoderError, fetch_pretrained

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    start = time.monotonic()
    with pytest.raises(EncoderError, match="unreachable.*--pretrained none"):
        fetch_pretrained("ViT-B-32", "openai")
    assert time.monotonic() - start < 5


def test_auto_is_for_the_demo_only_and_falls_back_to_the_demo_encoder(tiny_model, demo_root, tmp_path):
    from tmass.extract.demo_encoder import CHECKPOINT

    result = extract("--dataset", "msrvtt", "--out", tmp_path, "--pretrained", "auto", expect=2)
    assert "demo only" in result.output
    extract("--dataset", "demo", "--data-root", demo_root, "--out", tmp_path, "--model", tiny_model,
            "--pretrained", "auto", "--split", "test")
    meta = json.loads((tmp_path / "demo" / "tmass-demo__auto" / "test" / "manifest.json").read_text())["meta"]
    assert meta["pretrained"] == "auto" and meta["random_init"] is False and meta["extra"]["weights"] == str(CHECKPOINT)


def test_the_extract_command_imports_nothing_heavy_until_it_runs():
    code = "import sys, tmass.extract.cli; print(any(m in sys.modules for m in ('torch', 'open_clip', 'decord')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
