"""The shard format: round trip, plain-h5py/dask readability, validation of every fault."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import dask.array as da
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from tmass.cli import main
from tmass.features.format import (
    FeatureFormatError,
    FeatureMeta,
    check_split,
    load_split,
    open_split,
    shard_name,
    write_manifest,
    write_text_shard,
    write_video_shard,
)


def _meta(dim=8, frames=4) -> FeatureMeta:
    return FeatureMeta(
        dataset="unit", split="test", model="ViT-B-32", pretrained="none", embed_dim=dim,
        num_frames=frames, frame_sampling="uniform", logit_scale=100.0, random_init=True,
    )


def _write_split(split_dir, rng, n_videos=(5, 3), captions_per_video=3, dim=8, frames=4):
    """Two shard pairs with several captions per video and one padded clip."""
    meta = _meta(dim, frames)
    records, written = [], {"video_ids": [], "frames": [], "mask": [], "text_ids": [], "owner": [], "captions": [], "emb": []}
    for shard, n in enumerate(n_videos):
        ids = [f"v{shard}-{i}" for i in range(n)]
        x = rng.standard_normal((n, frames, dim)).astype(np.float32) * 7
        mask = np.ones((n, frames), bool)
        mask[0, -1] = False  # a clip one frame short
        owner = [v for v in ids for _ in range(captions_per_video)]
        text_ids = [f"{v}#{c}" for v in ids for c in range(captions_per_video)]
        caps = [f"caption {c} of {v} — ünïcode" for v in ids for c in range(captions_per_video)]
        emb = rng.standard_normal((len(text_ids), dim)).astype(np.float32)
        records.append(write_video_shard(split_dir / shard_name("videos", shard), meta, ids, x, mask))
        records.append(write_text_shard(split_dir / shard_name("texts", shard), meta, text_ids, owner, caps, emb))
        for key, val in (("video_ids", ids), ("frames", [x]), ("mask", [mask]), ("text_ids", text_ids), ("owner", owner), ("captions", caps), ("emb", [emb])):
            written[key] += val
    write_manifest(split_dir, meta, records)
    return written


def test_round_trip_is_bit_identical_as_float16(tmp_path):
    written = _write_split(tmp_path, np.random.default_rng(0))
    arrays = load_split(tmp_path)
    assert arrays.video_ids == written["video_ids"]
    assert arrays.text_ids == written["text_ids"]
    assert arrays.captions == written["captions"]
    assert arrays.frames.dtype == np.float16 and arrays.text_embeddings.dtype == np.float16
    expected_frames = np.concatenate(written["frames"]).astype(np.float16)
    assert np.array_equal(arrays.frames.view(np.uint16), expected_frames.view(np.uint16))
    expected_emb = np.concatenate(written["emb"]).astype(np.float16)
    assert np.array_equal(arrays.text_embeddings.view(np.uint16), expected_emb.view(np.uint16))
    assert np.array_equal(arrays.frame_mask, np.concatenate(written["mask"]))
    # caption -> video mapping survives, as one index array
    assert [arrays.video_ids[j] for j in arrays.text_to_video] == written["owner"]
    assert arrays.meta == _meta()


def test_streaming_reader_matches_in_memory_loader(tmp_path):
    _write_split(tmp_path, np.random.default_rng(1))
    split = open_split(tmp_path)
    arrays = split.load()
    frames = np.concatenate([b.frames for b in split.iter_videos()])
    texts = list(split.iter_texts())
    assert np.array_equal(frames, arrays.frames)
    assert sum((b.video_ids for b in texts), []) == [arrays.video_ids[j] for j in arrays.text_to_video]
    assert len(texts) == 2  # one batch per shard: memory bounded by a shard


def test_shards_stack_with_plain_h5py_and_dask(tmp_path):
    """A user without our package can read the shards: dask over h5py equals our reader."""
    _write_split(tmp_path, np.random.default_rng(2))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    files = [tmp_path / s["file"] for s in manifest["shards"] if s["kind"] == "videos"]
    handles = [h5py.File(f, "r") for f in files]
    try:
        stacked = da.concatenate([da.from_array(h["frames"], chunks=(2, -1, -1)) for h in handles]).compute()
        assert handles[0].attrs["model"] == "ViT-B-32" and handles[0].attrs["embed_dim"] == 8
    finally:
        for h in handles:
            h.close()
    assert np.array_equal(stacked, load_split(tmp_path).frames)


def test_manifest_is_self_describing(tmp_path):
    _write_split(tmp_path, np.random.default_rng(3))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"] == {"videos": 8, "texts": 24}
    for key in ("format_version", "software_version", "created"):
        assert manifest[key]
    for key in ("model", "pretrained", "embed_dim", "num_frames", "frame_sampling", "logit_scale", "random_init"):
        assert key in manifest["meta"]
    assert all(len(s["sha256"]) == 64 and s["rows"] > 0 for s in manifest["shards"])
    assert not list(tmp_path.glob(".*tmp*")), "atomic writes leave no temporary files"


# --------------------------------------------------------------------- corruption


def _only_fault(problems, file_name, words):
    assert problems, "a corrupted split must not pass check"
    joined = "\n".join(problems)
    assert file_name in joined, joined
    assert any(w in joined for w in words), joined


def test_check_passes_on_simulated_tiny(tiny_features):
    for split in ("train", "test"):
        assert check_split(tiny_features / split) == []


def test_check_names_a_deleted_shard(tiny_copy):
    (tiny_copy / "test" / "videos-00000.h5").unlink()
    _only_fault(check_split(tiny_copy / "test"), "videos-00000.h5", ["missing"])


def test_check_names_a_truncated_shard(tiny_copy):
    path = tiny_copy / "test" / "texts-00000.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _only_fault(check_split(tiny_copy / "test"), "texts-00000.h5", ["truncated"])


def test_check_names_a_wrong_dim(tiny_copy):
    """Rewrite a shard with embeddings of another width (manifest entry kept up to date
    but for the dim): the fault reported is the dim, not only a checksum."""
    path = tiny_copy / "train" / "texts-00001.h5"
    with h5py.File(path, "r+") as h5:
        emb = h5["embedding"][:]
        del h5["embedding"]
        h5.create_dataset("embedding", data=emb[:, : emb.shape[1] // 2])
    _only_fault(check_split(tiny_copy / "train"), "texts-00001.h5", ["dim 32"])


def test_check_names_a_nan_row(tiny_copy):
    path = tiny_copy / "train" / "videos-00001.h5"
    with h5py.File(path, "r+") as h5:
        row = h5["frames"][5]
        row[3, 7] = np.nan
        h5["frames"][5] = row
    problems = check_split(tiny_copy / "train")
    _only_fault(problems, "videos-00001.h5", ["NaN"])
    assert any("row 5" in p for p in problems)
    with pytest.raises(FeatureFormatError, match="videos-00001.h5"):
        load_split(tiny_copy / "train", verify_checksums=False)  # values are checked on load too


def test_check_names_duplicate_and_unknown_ids(tmp_path):
    meta = _meta()
    rng = np.random.default_rng(4)
    recs = [
        write_video_shard(tmp_path / shard_name("videos", 0), meta, ["a", "b"], rng.standard_normal((2, 4, 8))),
        write_video_shard(tmp_path / shard_name("videos", 1), meta, ["b"], rng.standard_normal((1, 4, 8))),
        write_text_shard(tmp_path / shard_name("texts", 0), meta, ["t1", "t2"], ["a", "ghost"], ["x", "y"], rng.standard_normal((2, 8))),
    ]
    write_manifest(tmp_path, meta, recs)
    problems = check_split(tmp_path)
    assert any("duplicate video ids" in p and "'b'" in p for p in problems)
    assert any("unknown videos" in p and "ghost" in p for p in problems)
    with pytest.raises(FeatureFormatError):
        open_split(tmp_path)


def test_writer_rejects_shapes_that_disagree_with_meta(tmp_path):
    with pytest.raises(ValueError, match="expected"):
        write_video_shard(tmp_path / "v.h5", _meta(), ["a"], np.zeros((1, 3, 8)))
    assert not list(tmp_path.iterdir()), "a rejected write leaves nothing behind"


# --------------------------------------------------------------------- CLI and packaging


def test_cli_simulate_then_check_and_info(tmp_path):
    runner = CliRunner()
    out = tmp_path / "f"
    result = runner.invoke(main, ["features", "simulate", "--preset", "tiny", "--out", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(main, ["features", "check", str(out)]).exit_code == 0
    info = runner.invoke(main, ["features", "info", str(out)])
    assert info.exit_code == 0 and "256 videos x 12 frames" in info.output and "1024 captions" in info.output
    (out / "test" / "texts-00000.h5").unlink()
    failed = runner.invoke(main, ["features", "check", str(out)])
    assert failed.exit_code == 1 and "texts-00000.h5" in failed.output


def test_simulation_is_deterministic_in_seed(tmp_path):
    from tmass.features.simulate import simulate

    a = load_split(simulate("tiny", tmp_path / "a", seed=5, progress=False)["test"])
    b = load_split(simulate("tiny", tmp_path / "b", seed=5, progress=False)["test"])
    c = load_split(simulate("tiny", tmp_path / "c", seed=6, progress=False)["test"])
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.text_embeddings, b.text_embeddings)
    assert not np.array_equal(a.frames, c.frames)


def test_install_shadows_no_common_module(tmp_path):
    """`evaluate`, `train`, `features`, `extract` must not be importable at top level
    (run outside the repository so the checkout itself is not on sys.path)."""
    code = (
        "import importlib.util, tmass.evaluate, tmass.train, tmass.features, tmass.extract\n"
        "import os\n"
        "for name in ('evaluate', 'train', 'features', 'extract'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    assert spec is None or 'site-packages' in str(spec.origin), (name, spec)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_every_command_has_help():
    runner = CliRunner()

    def walk(cmd, path):
        result = runner.invoke(main, path + ["--help"])
        assert result.exit_code == 0, (path, result.output)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, path + [name])

    walk(main, [])


# --------------------------------------------------------------------- outputs never mix


def _tree(directory) -> dict:
    """Every file under ``directory`` with its size and modification time."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_check_catches_a_mixed_split(tmp_path):
    """Shards of another run listed in a consistent manifest (what a resume into a
    directory of other features produced) are a mixed split, named shard by shard."""
    from tmass.features.format import read_shard_record
    from tmass.features.simulate import simulate

    mine, other = simulate("tiny", tmp_path / "a", seed=0, progress=False), simulate("tiny", tmp_path / "b", seed=1, progress=False)
    for name in ("videos-00001.h5", "texts-00001.h5"):
        shutil.copy(other["train"] / name, mine["train"] / name)
    meta = open_split(mine["test"]).meta
    records = [read_shard_record(p) for p in sorted(mine["train"].glob("*.h5"))]
    write_manifest(mine["train"], dataclasses.replace(meta, split="train"), records)
    problems = check_split(mine["train"])
    assert len(problems) == 2 and all("mixed split" in p and "seed: 0 in the manifest, 1 in this shard" in p for p in problems)
    assert {p.split(":")[0].rsplit("/", 1)[1] for p in problems} == {"videos-00001.h5", "texts-00001.h5"}
    result = CliRunner().invoke(main, ["features", "check", str(tmp_path / "a")])
    assert result.exit_code == 1 and "videos-00001.h5: made otherwise than the manifest says" in result.output


def test_simulate_refuses_other_features_untouched_and_overwrite_replaces_them(tmp_path):
    runner = CliRunner()
    out = tmp_path / "f"
    assert runner.invoke(main, ["features", "simulate", "--out", str(out), "--seed", "0"]).exit_code == 0
    before = _tree(out)
    refused = runner.invoke(main, ["features", "simulate", "--out", str(out), "--seed", "1"])
    assert refused.exit_code == 1 and refused.output.count("\n") == 1 and "Traceback" not in refused.output
    assert f"Error: {out / 'train'} holds features made otherwise (provenance.json: seed: 0 then, 1 now)" in refused.output
    assert _tree(out) == before, "a refused run touches nothing"

    again = runner.invoke(main, ["features", "simulate", "--out", str(out), "--seed", "0"])
    assert again.exit_code == 0 and "already complete" in again.output
    assert {k: v for k, v in _tree(out).items() if not k.endswith(".lock")} == {k: v for k, v in before.items() if not k.endswith(".lock")}

    replaced = runner.invoke(main, ["features", "simulate", "--out", str(out), "--seed", "1", "--overwrite"])
    assert replaced.exit_code == 0 and check_split(out / "train") == []
    with h5py.File(out / "train" / "videos-00001.h5", "r") as h5:
        assert json.loads(h5.attrs["extra"])["seed"] == 1


def test_overwrite_deletes_nothing_but_features(tmp_path):
    from tmass.features.format import SplitDirError
    from tmass.features.simulate import simulate

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "thesis.tex").write_text("precious")
    with pytest.raises(SplitDirError, match=r"thesis.tex.*--overwrite deletes only feature files"):
        simulate("tiny", tmp_path, progress=False, overwrite=True)
    assert (tmp_path / "train" / "thesis.tex").read_text() == "precious"


def test_an_interrupted_simulation_resumes_to_the_same_features(tiny_features, tmp_path):
    from tmass.features.simulate import simulate

    out = tmp_path / "sim"
    shutil.copytree(tiny_features, out)
    (out / "train" / "manifest.json").unlink()
    (out / "train" / "texts-00001.h5").unlink()
    kept = (out / "train" / "videos-00000.h5").stat().st_mtime_ns
    simulate("tiny", out, seed=0, progress=False)
    assert (out / "train" / "videos-00000.h5").stat().st_mtime_ns == kept
    resumed, fresh = load_split(out / "train"), load_split(tiny_features / "train")
    assert resumed.text_ids == fresh.text_ids and np.array_equal(resumed.text_embeddings, fresh.text_embeddings)


_FULL_DISK_WRITER = """
import os, resource, sys
from pathlib import Path
import numpy as np
from tmass.features.format import FeatureMeta, FeatureWriteError, sha256_file, write_video_shard
meta = FeatureMeta("unit", "test", "m", "none", 8, 4, "uniform", 100.0)
path = Path(sys.argv[1]) / "videos-00000.h5"
write_video_shard(path, meta, ["a"], np.ones((1, 4, 8)))
before = sha256_file(path)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # Python ignores SIGXFSZ: writes fail with EFBIG
try:
    write_video_shard(path, meta, [str(i) for i in range(500)], np.ones((500, 4, 8)))
except FeatureWriteError as exc:
    print("error:", exc)
print("intact:", sha256_file(path) == before, sorted(os.listdir(path.parent)))
"""


def test_a_write_beyond_the_disk_limit_is_one_clear_error_and_keeps_the_last_shard(tmp_path):
    result = subprocess.run([sys.executable, "-c", _FULL_DISK_WRITER, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    error, intact = result.stdout.strip().splitlines()
    assert error.startswith(f"error: {tmp_path / 'videos-00000.h5'}: cannot write: File too large;")
    assert intact == "intact: True ['videos-00000.h5']"


def test_simulate_on_a_full_disk_exits_with_one_line(tmp_path):
    """The command itself, under a file size limit: exit 1 and one line naming the shard."""
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = subprocess.run([sys.executable, "-c", "from tmass.cli import main; main()", "features", "simulate",
                             "--out", str(tmp_path / "f")], capture_output=True, text=True, preexec_fn=limit)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"Error: {tmp_path / 'f' / 'train' / 'videos-00000.h5'}: cannot write: File too large" in result.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only; skipped where mounting is not permitted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_keeps_the_last_complete_shard(small_disk):
    result = subprocess.run([sys.executable, "-c", "from tmass.cli import main; main()", "features", "simulate",
                             "--out", str(small_disk)], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{small_disk / 'train' / 'texts-00000.h5'}: cannot write: no space left on device" in result.stderr
    with h5py.File(small_disk / "train" / "videos-00000.h5", "r") as h5:  # the shard before is complete
        assert h5["frames"].shape == (128, 12, 64)
    assert not list(small_disk.rglob(".*tmp*"))


# --------------------------------------------------------------------- token-level features


def test_simulated_tokens_and_patches_round_trip_with_structure(tmp_path):
    """Word tokens end in the caption embedding (EOT) and name what the video's patches
    show; the reader exposes both, pads shards to the longest caption, and says None
    when a split has none."""
    from tmass.features.simulate import simulate

    split = simulate("tiny", tmp_path / "tok", seed=2, progress=False, text_tokens=True, patch_grid=3)["train"]
    arrays = load_split(split)
    n_text, n_token, dim = arrays.token_embeddings.shape
    assert (n_text, dim) == arrays.text_embeddings.shape and arrays.token_mask.shape == (n_text, n_token)
    assert arrays.patch_embeddings.shape == (256, 12, 9, 64)
    assert arrays.token_mask[:, :3].all() and not arrays.token_embeddings[~arrays.token_mask].any()
    eot = arrays.token_mask.sum(axis=1) - 1
    assert np.array_equal(arrays.token_embeddings[np.arange(n_text), eot], arrays.text_embeddings)

    def unit(x):
        x = x.astype(np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)

    # a caption's words (between SOT and EOT) find what they name among its own video's
    # patches: the best word-patch cosine is higher there than in another video
    words = unit(arrays.token_embeddings)
    is_word = arrays.token_mask.copy()
    is_word[:, 0] = False
    is_word[np.arange(n_text), eot] = False
    patches = unit(arrays.patch_embeddings).reshape(256, -1, dim)
    own = arrays.text_to_video
    best = [np.where(is_word[..., None], np.einsum("twd,tpd->twp", words, patches[v]), -1).max(axis=(1, 2))
            for v in (own, (own + 128) % 256)]
    assert (best[0] > best[1]).mean() > 0.85 and best[0].mean() > best[1].mean() + 0.1, (best[0].mean(), best[1].mean())

    plain = load_split(simulate("tiny", tmp_path / "plain", seed=2, progress=False)["train"])
    assert plain.token_embeddings is None and plain.token_mask is None and plain.patch_embeddings is None
    assert np.array_equal(plain.frames, arrays.frames), "tokens come from their own random stream"
    info = CliRunner().invoke(main, ["features", "info", str(tmp_path / "tok")])
    assert "token_embedding" in info.output and "3x3 grid, [n_video, 12, 9, 64]" in info.output


def test_shards_missing_declared_tokens_are_named(tmp_path):
    meta = dataclasses.replace(_meta(), text_tokens=True, patch_grid=2)
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="declares patch_embedding"):
        write_video_shard(tmp_path / "v.h5", meta, ["a"], rng.standard_normal((1, 4, 8)))
    with pytest.raises(ValueError, match="token_embedding has shape"):
        write_text_shard(tmp_path / "t.h5", meta, ["t"], ["a"], ["x"], rng.standard_normal((1, 8)),
                         rng.standard_normal((1, 3, 4)), np.ones((1, 3), bool))
    records = [write_video_shard(tmp_path / shard_name("videos", 0), meta, ["a"], rng.standard_normal((1, 4, 8)),
                                 patches=rng.standard_normal((1, 4, 4, 8))),
               write_text_shard(tmp_path / shard_name("texts", 0), meta, ["t"], ["a"], ["x"], rng.standard_normal((1, 8)),
                                rng.standard_normal((1, 3, 8)), np.ones((1, 3), bool))]
    write_manifest(tmp_path, meta, records)
    assert check_split(tmp_path) == []
    with h5py.File(tmp_path / shard_name("texts", 0), "r+") as h5:
        del h5["token_mask"]
    problems = check_split(tmp_path)
    assert any("texts-00000.h5: token_embedding is (1, 3, 8) with token_mask missing" in p for p in problems), problems
