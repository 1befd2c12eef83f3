"""Search a collection of videos with text or a video: a two-stage index over a features split.

An index directory (``tmass index``) holds::

    index.json          provenance: the features split and its manifest hash, the encoder
                        (model, weights label, seed of a random init, whether the query
                        encoder reproduces the split's own caption embeddings), the head's
                        checkpoint and its sha256, the first stage, the data root
    video_ids.json      [n_video], row order of everything below
    first-stage.faiss   pooled video embeddings [n_video, dim], unit rows, in faiss
    frames.npy          [n_video, n_frames, dim] float32 (the stored float16 values,
                        upcast once: converting a shortlist per query cost more than
                        the rest of the search), with frame_mask.npy [n_video, n_frames]
                        and frame_norms.npy [n_video, n_frames] float32 (their L2 norms,
                        which best-frame narrowing needs for every shortlisted frame):
                        only with a head, which re-ranks on frames
    head.pt             a copy of the checkpoint (so the index outlives the run)
    model/<name>.json   the open_clip model config, when open_clip does not ship it

**Scores.** Without a head a video is meanP, the mean of its L2-normalised frames, and a
score is CLIP's cosine of the query with it. With a head, every reported score is the
head's own leak-free score, from :func:`tmass.evaluate.scores.score_matrix` with the
query's own id keying the T-MASS noise: so a (query, video) score does not depend on which
other videos are candidates, and equals what ``tmass eval`` gives the same pair.

**Two stages.** A text-conditioned head cannot be indexed (the pooled video depends on
the text), so the first stage works on text-independent proxies and the head scores
only K of the videos (``candidates``). faiss ranks the meanP embeddings by inner product
with the unit query and keeps a ``shortlist`` (1,000 by default); the shortlist's frames
then narrow it to K by their best frame, max_f cos(t, f), the proxy closest to X-Pool's
attention, which leans on the frames most like the text (on simulated MSR-VTT with K =
50 it keeps 96 % of the T-MASS head's exhaustive top 10, against 80 % for meanP); the
head scores those K and the best are reported. K >= n_video is exhaustive search.
``python -m tmass.search_bench`` measures how much of the exhaustive R@10 a given K keeps.

**First stage.** Exact (faiss ``IndexFlatIP``) up to :data:`EXACT_LIMIT` videos: one
query reads every embedding (40 ms per 100k videos, one thread, measured on the 2-core
machine under heavy load). Beyond, an
inverted file (``IndexIVFFlat``, ``sqrt(n)`` lists, ``nprobe`` = 64 of them searched) reads
about 6 % of a million videos per query. IVF rather than HNSW: its memory is the
vectors plus the list centroids, it trains in minutes on a CPU, and adding videos later
needs no graph rebuild; the price, a slightly approximate first stage, is what the
head's re-ranking of K candidates absorbs.

**Queries** are encoded by the model that made the features (model and weights from the
manifest; a random-init encoder is rebuilt from the same seed). ``tmass index`` checks
that this rebuilt encoder reproduces the split's stored caption embeddings and records
the result; a text or video query is refused when it did not. Simulated features have no
encoder: they are searched with the captions of a features split (``--query-features``).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmass import __version__
from tmass.features.format import (FeatureMeta, SplitArrays, features_identity, identity_mismatch, load_split,
                                  read_manifest, sha256_file)

INDEX_FORMAT = "2"  # 2: frame_norms.npy
INDEX_FILE = "index.json"
IDS_FILE = "video_ids.json"
FAISS_FILE = "first-stage.faiss"
FRAMES_FILE = "frames.npy"
MASK_FILE = "frame_mask.npy"
NORMS_FILE = "frame_norms.npy"
HEAD_FILE = "head.pt"
MODEL_DIR = "model"
EXACT_LIMIT = 1_000_000  # exact first stage up to here; an inverted file beyond
FIRST_STAGES = ("auto", "flat", "ivf")
CHECK_CAPTIONS = 4  # stored captions re-encoded to verify the query encoder
CHECK_MIN_COSINE = 0.999  # fp16 storage and GPU autocast stay far above this
STRIP_FRAMES = 4  # frames per hit in the HTML page and contact sheet
STRIP_HEIGHT = 72


class SearchError(Exception):
    """A user mistake or an unusable input; the message is one line naming the fix."""


@dataclass
class IndexConfig:
    """How the first stage is built."""

    first_stage: str = "auto"  # auto: flat (exact) up to EXACT_LIMIT videos, else ivf
    nprobe: int = 64  # IVF lists searched per query (ignored by flat)

    def __post_init__(self):
        if self.first_stage not in FIRST_STAGES:
            raise ValueError(f"first_stage must be one of {FIRST_STAGES}, got {self.first_stage!r}")


@dataclass
class SearchConfig:
    """One search. ``candidates`` is K, the first stage's output that the head re-ranks,
    ``shortlist`` the meanP depth that best-frame similarity narrows to K (both ignored
    without a head, where the first stage's cosine is the score). ``scoring``:
    the head's :class:`tmass.evaluate.scores.EvalConfig`; None is its defaults (the
    paper's M = 20), without a progress bar."""

    top: int = 10
    candidates: int = 200
    shortlist: int = 1000
    scoring: object = None  # EvalConfig; typed loosely so that importing this costs no torch

    def eval_config(self):
        from tmass.evaluate.scores import EvalConfig

        return self.scoring or EvalConfig(progress=False)


@dataclass
class Ranking:
    """One query's hits, best first: rows ``[top]`` into the index, scores ``[top]``."""

    query: str
    query_id: str
    rows: np.ndarray
    scores: np.ndarray
    seconds: dict


# ----------------------------------------------------------------------------- building


def describe_encoder(identity: dict) -> str:
    if identity["source"] == "simulated":
        return f"simulated features (seed {identity.get('seed')})"
    text = f"{identity['model']}, weights {identity['weights']}"
    if identity["weights"] == "none":
        text += f" -- RANDOM-INIT ENCODER (seed {identity.get('seed')}): no pretrained knowledge, rankings are noise"
    return text


def pool_frames(frames: np.ndarray, frame_mask: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """meanP: frames ``[n_video, n_frames, dim]``, frame_mask ``[n_video, n_frames]`` ->
    unit mean of the unit real frames ``[n_video, dim]`` float32 (chunked: frames may be
    float16 and large)."""
    out = np.empty((len(frames), frames.shape[2]), np.float32)
    for start in range(0, len(frames), chunk):
        block = frames[start:start + chunk].astype(np.float32)
        block /= np.maximum(np.linalg.norm(block, axis=-1, keepdims=True), 1e-12)
        mask = frame_mask[start:start + chunk, :, None]
        out[start:start + chunk] = (block * mask).sum(1) / np.maximum(mask.sum(1), 1)
    return _unit(out)


def frame_norms(frames: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """L2 norms of frames ``[n_video, n_frames, dim]`` -> ``[n_video, n_frames]`` float32."""
    out = np.empty(frames.shape[:2], np.float32)
    for start in range(0, len(frames), chunk):
        block = np.asarray(frames[start:start + chunk], np.float32)
        out[start:start + chunk] = np.sqrt(np.einsum("vfd,vfd->vf", block, block))
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def build_first_stage(pooled: np.ndarray, config: IndexConfig, chunk: int = 100_000):
    """A faiss inner-product index over unit rows ``[n_video, dim]`` (added in chunks, so a
    caller may pass a memory map)."""
    import faiss

    n, dim = pooled.shape
    kind = config.first_stage if config.first_stage != "auto" else ("flat" if n <= EXACT_LIMIT else "ivf")
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        # at least 39 training points per list keeps faiss's k-means sound
        # sqrt(n) lists: k-means over a million videos then trains in about a minute on two cores
        lists = int(max(1, min(round(np.sqrt(n)), n // 39)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(n, size=min(n, 64 * lists), replace=False)
        index.train(np.ascontiguousarray(pooled[np.sort(sample)], np.float32))
        index.nprobe = min(config.nprobe, lists)
    for start in range(0, n, chunk):
        index.add(np.ascontiguousarray(pooled[start:start + chunk], np.float32))
    return index


def first_stage_label(index) -> str:
    import faiss

    if isinstance(index, faiss.IndexIVF):
        return f"approximate (faiss IVF, {index.nlist} lists, nprobe {index.nprobe})"
    return "exact (faiss IndexFlatIP)"


def refuse_token_head(head, where: Path) -> None:
    """SearchError, one line, when ``head`` (loaded from ``where``) reads token features:
    an index keeps caption embeddings and frames only, and a text query has no word tokens."""
    from tmass.train.heads.base import TOKEN_FIELDS, missing_tokens
    from tmass.train.registry import head_names, head_spec

    needs = sorted(head_spec(head.cfg.head).features & set(TOKEN_FIELDS))
    if needs:
        plain = [name for name in head_names() if not head_spec(name).features & set(TOKEN_FIELDS)]
        fix = f"search keeps caption embeddings and frames only; index with a run of {', '.join(plain)}"
        raise SearchError(f"{where}: {missing_tokens(needs[0], head.cfg.head, fix)}")


def check_checkpoint(checkpoint: Path, meta: FeatureMeta, split_dir: Path) -> tuple[object, dict, str | None]:
    """Load a head and refuse one made for other features, or one that reads token
    features (:func:`refuse_token_head`). Returns (head, checkpoint entries, a warning
    or None)."""
    from tmass.train.trainer import load_checkpoint

    try:
        head, info = load_checkpoint(checkpoint, "cpu")
    except Exception as exc:  # torch.load raises many types for a file that is no checkpoint
        raise SearchError(f"{checkpoint}: not a readable tmass checkpoint ({type(exc).__name__}: {exc})") from exc
    refuse_token_head(head, checkpoint)
    if head.cfg.embed_dim != meta.embed_dim:
        raise SearchError(f"{checkpoint}: head has dim {head.cfg.embed_dim}, features {split_dir} have dim "
                          f"{meta.embed_dim}: index features made with the encoder the run was trained on")
    if getattr(head, "radius", None) is not None and head.cfg.radius == "linear" and head.cfg.num_frames != meta.num_frames:
        raise SearchError(f"{checkpoint}: linear radius expects {head.cfg.num_frames} frames, features "
                          f"{split_dir} have {meta.num_frames}")
    recorded = info.get("features_identity")
    if not recorded:
        return head, info, (f"{checkpoint} predates recorded feature identities: only its width and frame count "
                            "were checked against the features")
    mismatch = identity_mismatch(features_identity(split_dir), recorded)
    if mismatch:
        raise SearchError(f"{checkpoint} was trained on features of {describe_encoder(recorded)}, but {split_dir} "
                          f"differs ({mismatch}): index features extracted like the run's training split")
    return head, info, None


def _model_config(meta: FeatureMeta, model: str | None) -> tuple[str, dict]:
    """The open_clip name and config of the features' model; ``model`` (a name or a
    config JSON file) is needed only when open_clip does not ship the config."""
    from tmass.extract.encoder import EncoderError, register_model

    try:
        name, config = register_model(model or meta.model)
    except EncoderError as exc:
        if model:
            raise SearchError(f"--model {model}: {exc}") from exc
        raise SearchError(f"the features were made with model {meta.model!r}, which open_clip does not know: pass "
                          "--model CONFIG.json, the model-config file used for the extraction") from exc
    if name != meta.model:
        raise SearchError(f"--model {model} is open_clip model {name!r}, but the features were made with {meta.model!r}")
    return name, config


def video_files(video_ids: list[str], dataset: str, split: str, root) -> tuple[dict[str, Path], str | None]:
    """Where each video's file is, or why that is unknown: ids are paths relative to the
    data root (a folder of videos) or named by the dataset adapter's layout."""
    if not root:
        return {}, "frames not shown: the index does not know where the videos are (pass --data-root DIR)"
    root = Path(root)
    if not root.is_dir():
        return {}, f"frames not shown: data root {root} does not exist"
    if video_ids and (root / video_ids[0]).is_file():
        return {v: root / v for v in video_ids}, None
    from tmass.extract.datasets import LayoutError, load_split as load_annotations

    try:
        videos = load_annotations(dataset, root, split).videos
    except (LayoutError, ValueError, OSError) as exc:
        return {}, f"frames not shown: cannot map video ids to files under {root} ({str(exc).splitlines()[0]})"
    return {v.id: v.path for v in videos}, None


def encode_video_file(encoder, path: Path, num_frames: int, sampling: str, seed: int, video_id: str) -> np.ndarray:
    """A video file's frame embeddings ``[n_real_frames, dim]``, sampled and encoded as
    extraction does."""
    import torch
    from PIL import Image

    from tmass.extract.video import read_frames

    frames, _, _ = read_frames(Path(path), num_frames, "random" if sampling == "random" else "uniform", seed, video_id)
    return encoder.encode_images(torch.stack([encoder.preprocess(Image.fromarray(frame)) for frame in frames]))


def verify_query_encoder(encoder, arrays: SplitArrays, data_root) -> dict:
    """Does the rebuilt encoder give the split's own embeddings? Re-encodes up to
    :data:`CHECK_CAPTIONS` stored captions, or, in a split without captions, the first
    video (when its file can be found), and compares cosines."""
    from tmass.extract.video import VideoError

    if arrays.captions:
        rows = np.linspace(0, len(arrays.captions) - 1, min(CHECK_CAPTIONS, len(arrays.captions))).round().astype(int)
        again, stored, what = encoder.encode_texts([arrays.captions[r] for r in rows]), arrays.text_embeddings[rows], "captions"
    else:
        meta, video = arrays.meta, arrays.video_ids[0]
        paths, note = video_files(arrays.video_ids[:1], meta.dataset, meta.split, data_root)
        if video not in paths:
            return {"status": "unchecked", "reason": f"the split has no captions, and its videos cannot be read ({note})"}
        try:
            again = encode_video_file(encoder, paths[video], meta.num_frames, meta.frame_sampling, meta.extra.get("seed", 0), video)
        except VideoError as exc:
            return {"status": "unchecked", "reason": f"the split has no captions, and {paths[video]}: {exc.reason}"}
        stored, what = arrays.frames[0][arrays.frame_mask[0]], f"frames of {video}"
    cosine = float((_unit(again) * _unit(stored)).sum(-1).min()) if len(again) == len(stored) else -1.0
    status = "reproduced" if cosine >= CHECK_MIN_COSINE else "mismatch"
    return {"status": status, "checked": what, "min_cosine": round(cosine, 6)}


def build_index(split_dir: Path, out: Path, checkpoint: Path | None = None, data_root: Path | None = None,
                model: str | None = None, config: IndexConfig | None = None) -> dict:
    """Write an index of ``split_dir`` into ``out``; returns its ``index.json`` contents.
    Warnings (things not checkable) are in ``info["warnings"]``."""
    from tmass.extract.encoder import EncoderError, get_encoder
    from tmass.features.format import FeatureFormatError

    config = config or IndexConfig()
    split_dir, out = Path(split_dir), Path(out)
    warnings = []
    head = None
    head_info: dict = {}
    try:
        if checkpoint is not None:  # the head is checked from the manifest, before any features are read
            head, head_info, warning = check_checkpoint(Path(checkpoint), read_manifest(split_dir)[1], split_dir)
            warnings += [warning] if warning else []
        arrays = load_split(split_dir, text_tokens=False, patches=False)  # an index keeps no tokens
    except FeatureFormatError as exc:
        raise SearchError(f"{split_dir}: features fail validation: {exc.problems[0]}") from exc
    meta = arrays.meta
    if not arrays.video_ids:
        raise SearchError(f"{split_dir} holds no videos: nothing to index (were they all skipped? see the manifest's 'failed')")
    if (out / INDEX_FILE).exists():
        raise SearchError(f"{out} already holds an index: remove it or choose another --out")

    identity = features_identity(split_dir)
    model_cfg = None
    check = {"status": "unchecked", "reason": "simulated features have no encoder"}
    if meta.source == "open_clip":
        _, model_cfg = _model_config(meta, model)
        try:
            encoder = get_encoder(model or meta.model, identity["weights"], "cpu", identity.get("seed") or meta.extra.get("seed") or 0)
            check = verify_query_encoder(encoder, arrays, data_root or meta.extra.get("data_root"))
        except EncoderError as exc:
            check = {"status": "unchecked", "reason": f"encoder not loadable here: {exc}"}
        if check["status"] != "reproduced":
            warnings.append(f"query encoder {check['status']}: {check.get('reason') or check}")

    pooled = pool_frames(arrays.frames, arrays.frame_mask)
    first = build_first_stage(pooled, config)
    out.mkdir(parents=True, exist_ok=True)
    import faiss

    faiss.write_index(first, str(out / FAISS_FILE))
    (out / IDS_FILE).write_text(json.dumps(arrays.video_ids))
    if head is not None:
        np.save(out / FRAMES_FILE, arrays.frames.astype(np.float32))
        np.save(out / MASK_FILE, arrays.frame_mask)
        np.save(out / NORMS_FILE, frame_norms(arrays.frames))
        shutil.copyfile(checkpoint, out / HEAD_FILE)
    if model_cfg is not None:
        (out / MODEL_DIR).mkdir(exist_ok=True)
        (out / MODEL_DIR / f"{meta.model}.json").write_text(json.dumps(model_cfg, indent=2))
    info = {
        "format": INDEX_FORMAT,
        "software_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "features": str(split_dir.resolve()),
        "features_manifest_sha256": arrays.manifest_sha256,
        "dataset": meta.dataset,
        "split": meta.split,
        "n_videos": len(arrays.video_ids),
        "encoder": identity,
        "num_frames": meta.num_frames,
        "frame_sampling": meta.frame_sampling,
        "text_context_length": meta.extra.get("text_context_length"),
        "query_encoder_check": check,
        "head": None if head is None else {
            "name": head.cfg.head, "checkpoint": str(Path(checkpoint).resolve()),
            "checkpoint_sha256": sha256_file(Path(checkpoint)), "selection": head_info.get("selection", "unknown")},
        "first_stage": first_stage_label(first),
        "data_root": str(Path(data_root).resolve()) if data_root else meta.extra.get("data_root"),
        "warnings": warnings,
    }
    (out / INDEX_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


# ----------------------------------------------------------------------------- searching


@contextlib.contextmanager
def _one_thread():
    """faiss, torch and numba on one thread while queries run. A query's operations are
    small (a scan of the first stage, then products over K videos): on the shared
    2-core machine a second OpenMP or numba thread that must be waited for at every
    operation made each one 20 to 50 ms instead of under 1 ms (measured under load 13)."""
    import faiss
    import numba
    import torch

    saved = faiss.omp_get_max_threads(), torch.get_num_threads(), numba.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(saved[0])
        torch.set_num_threads(saved[1])
        numba.set_num_threads(saved[2])


class SearchIndex:
    """An index in memory: first stage, ids and (with a head) frames, memory-mapped, with
    their masks and norms (computed here when not given)."""

    def __init__(self, info: dict, video_ids: list[str], first_stage, frames=None, frame_mask=None, head=None,
                 path: Path | None = None, norms=None):
        self.info, self.video_ids, self.first_stage = info, video_ids, first_stage
        self.frames, self.frame_mask, self.head, self.path = frames, frame_mask, head, path
        self.frame_norms = frame_norms(frames) if norms is None and frames is not None else norms
        self._encoder = None

    @classmethod
    def open(cls, path: Path) -> SearchIndex:
        import faiss

        path = Path(path)
        if not (path / INDEX_FILE).is_file():
            raise SearchError(f"{path}: not an index (no {INDEX_FILE}); build one with `tmass index --features SPLIT --out {path}`")
        info = json.loads((path / INDEX_FILE).read_text())
        if info.get("format") != INDEX_FORMAT:
            raise SearchError(f"{path}: index format {info.get('format')}, this software reads {INDEX_FORMAT}: rebuild it")
        head = frames = mask = norms = None
        if info["head"]:
            from tmass.train.trainer import load_checkpoint

            head, _ = load_checkpoint(path / HEAD_FILE, "cpu")
            refuse_token_head(head, path / HEAD_FILE)  # an index built before token heads were refused
            frames = np.load(path / FRAMES_FILE, mmap_mode="r")
            mask = np.load(path / MASK_FILE, mmap_mode="r")
            norms = np.load(path / NORMS_FILE, mmap_mode="r")
        first = faiss.read_index(str(path / FAISS_FILE))
        return cls(info, json.loads((path / IDS_FILE).read_text()), first, frames, mask, head, path, norms)

    def describe(self) -> str:
        """One line saying what made every score this index gives."""
        info = self.info
        line = f"{info['n_videos']} videos of {info['dataset']}/{info['split']}; encoder {describe_encoder(info['encoder'])}; "
        if info["head"]:
            h = info["head"]
            line += f"scores: {h['name']} head {h['checkpoint']} (selected on {h['selection']}), leak-free"
        else:
            line += "scores: CLIP cosine with meanP videos (no head)"
        return line + f"; first stage {info['first_stage']}"

    # -- queries ------------------------------------------------------------------

    def check_features(self, split_dir: Path) -> None:
        """Refuse query features made otherwise than the index's (another encoder)."""
        theirs = features_identity(split_dir)
        mismatch = identity_mismatch(theirs, self.info["encoder"])
        if mismatch:
            raise SearchError(f"{split_dir} was made with {describe_encoder(theirs)}, the index with "
                              f"{describe_encoder(self.info['encoder'])} ({mismatch}): query with features made alike")

    def encoder(self, device: str = "cpu"):
        """The query encoder: the features' own model and weights (see the module doc)."""
        from tmass.extract.encoder import EncoderError, get_encoder

        if self._encoder is not None:
            return self._encoder
        identity, check = self.info["encoder"], self.info["query_encoder_check"]
        if identity["source"] != "open_clip":
            raise SearchError(f"the index holds {describe_encoder(identity)}: there is no CLIP model to encode a text or "
                              "video query; search with --query-features SPLIT (captions of features made alike)")
        if check["status"] == "mismatch":
            raise SearchError(f"the rebuilt {identity['model']} encoder does not reproduce the indexed features' captions "
                              f"(cosine {check['min_cosine']}), so its queries would not match: use --query-features")
        model = identity["model"]
        if self.path is not None and (self.path / MODEL_DIR / f"{model}.json").is_file():
            model = str(self.path / MODEL_DIR / f"{model}.json")
        weights = identity["weights"]
        if identity["checkpoint_sha256"] and (not Path(weights).is_file() or sha256_file(Path(weights)) != identity["checkpoint_sha256"]):
            raise SearchError(f"encoder weights {weights} are missing or not the file the features were made with (sha256 differs)")
        try:
            self._encoder = get_encoder(model, weights, device, identity.get("seed") or 0)
        except EncoderError as exc:
            raise SearchError(str(exc).splitlines()[0]) from exc
        return self._encoder

    def encode_text(self, text: str, device: str = "cpu") -> tuple[np.ndarray, str | None]:
        """A text query -> ``[1, dim]`` and a warning when CLIP truncates it."""
        if not text.strip():
            raise SearchError("the query is empty: give some words, --video FILE or --query-features SPLIT")
        encoder = self.encoder(device)
        warning = None
        context = getattr(encoder.tokenizer, "context_length", None)
        if context and hasattr(encoder.tokenizer, "encode"):
            tokens = len(encoder.tokenizer.encode(text)) + 2  # start and end tokens
            if tokens > context:
                warning = (f"the query is {tokens} tokens, longer than CLIP's context of {context}: "
                           f"only its first {context - 2} tokens are searched")
        return encoder.encode_texts([text]), warning

    def encode_video(self, path: Path, device: str = "cpu") -> np.ndarray:
        """A video file -> its meanP embedding ``[1, dim]``, sampled and encoded as the
        indexed videos were."""
        from tmass.extract.video import VideoError

        try:
            frames = encode_video_file(self.encoder(device), path, self.info["num_frames"], self.info["frame_sampling"],
                                       self.info["encoder"].get("seed") or 0, Path(path).name)
        except VideoError as exc:
            raise SearchError(f"--video {path}: {exc.reason}") from exc
        return pool_frames(frames[None], np.ones((1, len(frames)), bool))

    # -- ranking ------------------------------------------------------------------

    def first_candidates(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """A unit query ``[dim]`` -> first-stage (cosines, rows), each ``[<= k]``, best first
        (an approximate index may find fewer than k)."""
        cosines, rows = self.first_stage.search(np.ascontiguousarray(query[None], np.float32), k)
        keep = rows[0] >= 0
        return cosines[0][keep], rows[0][keep]

    def best_frame(self, query: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Narrow sorted ``rows`` to the k with the highest max_f cos(query, f); returns
        them (sorted) with their frames ``[k, n_frames, dim]`` float32 and frame_mask."""
        frames = np.asarray(self.frames[rows], np.float32)  # [n_rows, n_frames, dim]
        mask = np.asarray(self.frame_mask[rows])
        if len(rows) > k:
            sims = frames @ query / np.maximum(self.frame_norms[rows], 1e-12)  # [n_rows, n_frames]
            best = np.where(mask, sims, -np.inf).max(axis=1)
            keep = np.sort(np.argsort(-best, kind="stable")[:k])
            rows, frames, mask = rows[keep], frames[keep], mask[keep]
        return rows, frames, mask

    def rank(self, queries: np.ndarray, query_ids: list[str], labels: list[str], config: SearchConfig,
             use_head: bool = True) -> list[Ranking]:
        """queries ``[n_query, dim]`` (raw embeddings) -> one :class:`Ranking` each. The head
        scores each query's K candidates, sorted by row so that ties break as in an
        exhaustive pass; ``use_head=False`` ranks by the first stage (video queries)."""
        head = self.head if use_head else None
        n = len(self.video_ids)
        k = min(n, config.candidates if head is not None else config.top)
        depth = max(k, min(n, config.shortlist)) if head is not None else k
        with _one_thread():
            return [self._rank_one(queries[q], query_ids[q], labels[q], head, k, depth, config) for q in range(len(queries))]

    def _rank_one(self, raw: np.ndarray, query_id: str, label: str, head, k: int, depth: int,
                  config: SearchConfig) -> Ranking:
        """One query ``[dim]``: first stage to ``depth``, best frames to ``k``, the head."""
        import torch

        from tmass.evaluate.scores import score_matrix

        start = time.perf_counter()
        query = _unit(raw)
        scores, rows = self.first_candidates(query, depth)
        first = time.perf_counter() - start
        narrow = 0.0
        if head is not None:
            rows, frames, mask = self.best_frame(query, np.sort(rows), k)
            narrow = time.perf_counter() - start - first
            scores = score_matrix(head, torch.from_numpy(np.asarray(raw, np.float32)[None]), [query_id],
                                  torch.from_numpy(frames), torch.from_numpy(mask), [self.video_ids[r] for r in rows],
                                  config.eval_config())[0]
        order = np.argsort(-scores, kind="stable")[:config.top]
        total = time.perf_counter() - start
        return Ranking(label, query_id, rows[order], scores[order],
                       {"first_stage": first, "narrow": narrow, "head": total - first - narrow, "total": total})

    # -- output -------------------------------------------------------------------

    def video_paths(self, data_root: Path | None = None) -> tuple[dict[str, Path], str | None]:
        return video_files(self.video_ids, self.info["dataset"], self.info["split"], data_root or self.info.get("data_root"))


def hits(index: SearchIndex, ranking: Ranking) -> list[dict]:
    return [{"rank": r + 1, "video_id": index.video_ids[row], "score": float(score)}
            for r, (row, score) in enumerate(zip(ranking.rows, ranking.scores))]


def write_json(path: Path, index: SearchIndex, rankings: list[Ranking], config: SearchConfig, kind: str) -> None:
    """Hits in rank order, each with its video_id and score, under what made them."""
    data = {
        "index": str(index.path) if index.path else None,
        "made_by": index.describe(),
        "index_info": index.info,
        "query_kind": kind,
        "search": {"top": config.top, **({"candidates": config.candidates, "shortlist": config.shortlist}
                                         if index.head is not None and kind != "video" else {}),
                   "scoring": dataclasses.asdict(config.eval_config()) if index.head is not None and kind != "video" else "cosine"},
        "results": [{"query": r.query, "query_id": r.query_id, "seconds": {k: round(v, 6) for k, v in r.seconds.items()},
                     "hits": hits(index, r)} for r in rankings],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _strip(path: Path):
    """A hit's frame strip (PIL image), :data:`STRIP_FRAMES` frames side by side."""
    from PIL import Image

    from tmass.extract.video import read_frames

    frames, _, _ = read_frames(path, STRIP_FRAMES)
    images = [Image.fromarray(f) for f in frames]
    images = [im.resize((max(1, im.width * STRIP_HEIGHT // im.height), STRIP_HEIGHT)) for im in images]
    strip = Image.new("RGB", (sum(im.width for im in images), STRIP_HEIGHT))
    x = 0
    for im in images:
        strip.paste(im, (x, 0))
        x += im.width
    return strip


def write_html(path: Path, index: SearchIndex, rankings: list[Ranking], data_root: Path | None = None) -> tuple[Path, list[str]]:
    """A page with each hit's frame strip, and beside it a PNG contact sheet of the same
    (``<page>.png``). Returns the sheet's path and notes (videos not shown, and why)."""
    import html

    from PIL import Image, ImageDraw

    from tmass.extract.video import VideoError

    paths, note = index.video_paths(data_root)
    notes = [note] if note else []
    rows_html, sheet_rows = [], []
    for ranking in rankings:
        rows_html.append(f"<h2>{html.escape(ranking.query)}</h2><table>")
        for hit in hits(index, ranking):
            cell = ""
            if hit["video_id"] in paths:
                try:
                    strip = _strip(paths[hit["video_id"]])
                except VideoError as exc:
                    notes.append(f"{hit['video_id']}: {exc.reason}")
                else:
                    buffer = io.BytesIO()
                    strip.save(buffer, format="PNG")
                    cell = f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'
                    sheet_rows.append((f"{ranking.query[:40]} #{hit['rank']} {hit['score']:.4f} {hit['video_id']}", strip))
            rows_html.append(f"<tr><td>{hit['rank']}</td><td>{hit['score']:.4f}</td>"
                             f"<td>{html.escape(hit['video_id'])}</td><td>{cell}</td></tr>")
        rows_html.append("</table>")
    sheet = path.with_suffix(".png")
    label_width = 420
    canvas = Image.new("RGB", (label_width + max([s.width for _, s in sheet_rows], default=200),
                               max(1, len(sheet_rows)) * (STRIP_HEIGHT + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, strip) in enumerate(sheet_rows):
        canvas.paste(strip, (label_width, i * (STRIP_HEIGHT + 4)))
        draw.text((4, i * (STRIP_HEIGHT + 4) + STRIP_HEIGHT // 2 - 6), label, fill="black")
    if not sheet_rows:
        draw.text((4, 0), "no frames: see the page", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(sheet)
    notes_html = "".join(f"<p class=note>{html.escape(n)}</p>" for n in notes)
    path.write_text(
        "<!doctype html><meta charset=utf-8><title>tmass search</title>"
        "<style>body{font-family:sans-serif} td{padding:2px 8px} .note{color:#a40}</style>"
        f"<p>{html.escape(index.describe())}</p>{notes_html}"
        f'<p>contact sheet: <a href="{sheet.name}">{sheet.name}</a></p>' + "".join(rows_html) + "\n")
    return sheet, notes
