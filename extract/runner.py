"""Partitions, the per-partition runner, the distributors and the split driver.

Shape (after clip-retrieval's inference stage): a *reader* decodes and samples frames
(:mod:`tmass.extract.video`, run in DataLoader worker processes so decoding overlaps the
model), a *mapper* encodes them (:mod:`tmass.extract.encoder`), a *writer* stores one
numbered shard pair per partition; :func:`run_partition` combines the three for one
partition. A *distributor* only maps :func:`run_partition` over partitions:
:func:`run_sequential` in this process, :func:`dask_distributor` on a dask cluster. Both
run the very same function, so both give the same features.

A partition is a contiguous block of ``shard_size`` videos of the split's sorted ids,
with their captions; the same inputs always give the same partitions, so a re-run maps
to the same shard numbers. An incremental split (``SplitData.incremental``: a folder of
videos that grows) is planned differently, so that adding videos never reshuffles
complete shards: ``partitions.json`` keeps the video ids of every partition planned so
far, each partition keeps its videos that are still there, and new videos follow in new
partitions (sorted among themselves), in the order they were first seen.

Partition ``p`` writes, each file atomically, in this order::

    partition-<p>.json  {"inputs": digest of its video ids and captions,
                         "failed": videos that could not be decoded, [{id, path, reason}, ...]}
    videos-<p>.h5       frames [n_ok, num_frames, dim], frame_mask, frame_index
    texts-<p>.h5        embeddings [n_text, dim] of the captions of the decoded videos only

A partition whose two shards exist is complete (its json exists too, being written
first): a re-run skips it and rereads its records and failures, unless its inputs changed
since (the annotation was edited), in which case it is extracted again. The manifest is
written last, once every partition is complete, so a killed run leaves no manifest and
no partial shard. :func:`~tmass.features.format.writing_split` holds the directory: one
run at a time, and a resume must share the first run's features metadata (encoder,
checkpoint SHA-256, model config, preprocessing, ...) and the settings in
:data:`IDENTITY`; ``extract-config.json`` records the whole configuration.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tmass.extract.datasets import Caption, SplitData, Video
from tmass.extract.encoder import AUTO, Encoder, EncoderError, get_encoder, precision_for, resolve_device
from tmass.extract.video import DECODER, SHORT_CLIP_POLICY, VideoError, read_frames
from tmass.features.format import (
    FeatureMeta,
    ShardRecord,
    check_split_dir,
    model_tag,
    read_shard_record,
    shard_name,
    write_json_atomic,
    write_manifest,
    write_text_shard,
    write_video_shard,
    writing_split,
)

log = logging.getLogger("tmass.extract")

CONFIG_FILE = "extract-config.json"
PLAN_FILE = "partitions.json"  # incremental splits only
LOG_FILE = "extract.log"


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of one extraction run (defaults: the papers' protocol). A resumed run
    must share the features' metadata they lead to and the fields in :data:`IDENTITY`."""

    dataset: str = "demo"
    model: str = "ViT-B-32"
    pretrained: str = "openai"
    num_frames: int = 12
    sampling: str = "uniform"
    seed: int = 0
    shard_size: int = 512
    caption_field: str | None = None
    text_tokens: bool = False  # also store every caption token in the joint space (token_embedding)
    patch_grid: int = 0  # G > 0: also store each frame's patch tokens pooled to G x G (patch_embedding)
    # videos per image-encoder batch (x num_frames images); "auto": on CUDA sized to the
    # GPU's free memory and the model (encoder.videos_per_batch), on the CPU 16
    batch_size: int | str = "auto"
    device: str = "auto"
    loader_workers: int | None = None  # decode processes per runner; None: cores - 1, at most 8
    torch_threads: int | None = None  # None: torch's default


# What a resume must share beyond the features' metadata (which pins dataset, encoder,
# weights, frames, sampling and seed): the partitioning and the captions read.
IDENTITY = ("shard_size", "caption_field")


@dataclass(frozen=True)
class PartitionJob:
    """Everything a runner needs, picklable for dask. ``weights`` is what the driver's
    encoder loaded (it resolves ``auto``), so every worker loads exactly that."""

    config: ExtractConfig
    weights: str
    meta: FeatureMeta
    split_dir: str
    index: int
    videos: tuple[Video, ...]
    captions: tuple[Caption, ...]
    progress: bool = True


@dataclass
class PartitionResult:
    """``stats``: counts and seconds of a partition run now; empty for one found complete."""

    index: int
    records: list[ShardRecord]
    failed: list[dict]
    stats: dict = field(default_factory=dict)


def partition_name(index: int) -> str:
    return f"partition-{index:05d}.json"


def inputs_digest(videos: Iterable[Video], captions: Iterable[Caption]) -> str:
    """Identity of a partition's inputs; paths are left out so that a moved data root
    does not count as a change."""
    content = [[v.id for v in videos], [[c.text_id, c.video_id, c.text] for c in captions]]
    return hashlib.sha256(json.dumps(content).encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------ reader


class VideoFrames:
    """Map-style dataset over a partition's videos: decode, sample and preprocess with
    the model's own transform (PIL per frame, exactly what ``preprocess(image)`` does)."""

    def __init__(self, videos: tuple[Video, ...], config: ExtractConfig, preprocess):
        self.videos, self.config, self.preprocess = videos, config, preprocess

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        video = self.videos[i]
        start = time.perf_counter()
        try:
            frames, index, mask = read_frames(video.path, self.config.num_frames, self.config.sampling, self.config.seed, video.id)
        except VideoError as exc:
            return {"id": video.id, "path": str(video.path), "reason": exc.reason}
        pixels = torch.stack([self.preprocess(Image.fromarray(frame)) for frame in frames])
        return video.id, pixels, index, mask, time.perf_counter() - start


@dataclass
class _Batch:
    """Decoded videos of one loader batch. pixels ``[n_real_frames, 3, size, size]``
    (real frames of every decoded video, in video then slot order), frame_index and
    frame_mask ``[n_ok, num_frames]``."""

    video_ids: list[str]
    pixels: object
    frame_index: np.ndarray
    frame_mask: np.ndarray
    failed: list[dict]
    decode_s: float

    def pin_memory(self):  # DataLoader(pin_memory=True) calls this on custom batch types
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def collate_videos(items: list, half: bool = False) -> _Batch:
    """Runs in the loader worker, so the concatenation (and with ``half`` the cast to
    fp16, for a model under amp-fp16: half the bytes to pin and copy) costs the model
    nothing."""
    import torch

    ok = [item for item in items if isinstance(item, tuple)]
    failed = [item for item in items if isinstance(item, dict)]
    if not ok:
        return _Batch([], None, None, None, failed, 0.0)
    return _Batch(
        video_ids=[item[0] for item in ok],
        pixels=torch.cat([item[1] for item in ok]).to(torch.float16 if half else torch.float32),
        frame_index=np.stack([item[2] for item in ok]),
        frame_mask=np.stack([item[3] for item in ok]),
        failed=failed,
        decode_s=sum(item[4] for item in ok),
    )


def _loader_workers(config: ExtractConfig) -> int:
    if multiprocessing.current_process().daemon:
        # daemonic processes (a dask worker on a cluster we did not start) may not fork
        if config.loader_workers:
            log.warning("running in a daemonic process: decoding in the runner itself, without overlap")
        return 0
    if config.loader_workers is not None:
        return config.loader_workers
    cores = config.torch_threads or os.cpu_count() or 2
    return max(1, min(8, cores - 1))


def _die_with(parent: int, worker_id: int) -> None:
    """``worker_init_fn`` of the decode workers: Linux kills them when their runner dies.
    Otherwise a killed runner leaves them behind, for seconds when forked and for good
    when spawned (in a dask worker), blocked on a queue nobody reads."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the runner died before the line above
        os._exit(1)


def _device(config: ExtractConfig) -> str:
    """This process's device: dask workers of a local cluster share the GPUs round-robin."""
    device = resolve_device(config.device)
    if device == "cuda":
        import torch

        try:
            from distributed import get_worker

            name = get_worker().name
        except (ImportError, ValueError):
            return device
        if isinstance(name, int):
            return f"cuda:{name % torch.cuda.device_count()}"
    return device


# ------------------------------------------------------------------------------ runner


def run_partition(job: PartitionJob) -> PartitionResult:
    """Decode, encode and write one partition; the same function for every distributor."""
    import torch
    from torch.utils.data import DataLoader

    config, meta = job.config, job.meta
    start = time.perf_counter()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    encoder = get_encoder(config.model, job.weights, _device(config), config.seed)
    if encoder.checkpoint_sha256 != meta.checkpoint_sha256:
        raise EncoderError(f"{job.weights}: the checkpoint changed during extraction (SHA-256 {meta.checkpoint_sha256} "
                           f"at the start, {encoder.checkpoint_sha256} now); restore it, or extract anew with --overwrite")
    if (encoder.embed_dim, encoder.image_size) != (meta.embed_dim, meta.image_size):
        raise RuntimeError(f"worker encoder {encoder.name} does not match the split's metadata")
    batch_size = encoder.auto_batch_size(config.num_frames) if config.batch_size == AUTO else config.batch_size
    log.debug("%s partition %05d on %s: %d videos per image batch (--batch-size %s)", meta.split, job.index,
              encoder.device, batch_size, config.batch_size)
    # With loader workers, the DataLoader decodes the next batches (2 per worker) while
    # this process encodes the current one: decoding overlaps the model.
    workers = _loader_workers(config)
    where = "in loader workers" if workers else "in the runner, not overlapped"
    loader = DataLoader(
        VideoFrames(job.videos, config, encoder.preprocess), batch_size=batch_size,
        num_workers=workers, pin_memory=encoder.device.startswith("cuda"),
        collate_fn=functools.partial(collate_videos, half=precision_for(encoder.device) == "amp-fp16"),
        worker_init_fn=functools.partial(_die_with, os.getpid()),
    )
    stats: Counter = Counter()
    grid = meta.patch_grid
    ok_ids, frames, masks, indices, patches, failed = [], [], [], [], [], []
    bar = tqdm(total=len(job.videos), desc=f"{meta.split} partition {job.index}", unit="video",
               disable=not job.progress, leave=False)
    waited = time.perf_counter()
    for number, batch in enumerate(loader):
        wait = time.perf_counter() - waited
        failed += batch.failed
        encode = 0.0
        if batch.video_ids:
            tick = time.perf_counter()
            if grid:
                embeddings, cells = encoder.encode_image_tokens(batch.pixels, grid)
                block = np.zeros((len(batch.video_ids), meta.num_frames, grid * grid, meta.embed_dim), np.float32)
                block[batch.frame_mask] = cells
                patches.append(block)
            else:
                embeddings = encoder.encode_images(batch.pixels)
            encode = time.perf_counter() - tick
            block = np.zeros((len(batch.video_ids), meta.num_frames, meta.embed_dim), np.float32)
            block[batch.frame_mask] = embeddings  # padding slots stay zero (short-clip policy)
            ok_ids += batch.video_ids
            frames.append(block)
            masks.append(batch.frame_mask)
            indices.append(batch.frame_index)
            stats.update(frames=len(embeddings))
        stats.update(wait_s=wait, encode_s=encode, decode_s=batch.decode_s, batches=1,
                     inline_decode_s=0.0 if workers else batch.decode_s)
        log.debug("%s partition %05d batch %d: %d videos decoded, %d failed; waited on loader %.3fs, "
                  "decode %.3fs (%s), image model %.3fs", meta.split, job.index, number,
                  len(batch.video_ids), len(batch.failed), wait, batch.decode_s, where, encode)
        bar.update(len(batch.video_ids) + len(batch.failed))
        waited = time.perf_counter()
    bar.close()

    decoded = set(ok_ids)
    captions = [c for c in job.captions if c.video_id in decoded]  # a caption of a failed video would dangle
    tick = time.perf_counter()
    texts, tokens, token_mask = _encode_captions(encoder, [c.text for c in captions], batch_size * config.num_frames,
                                                 meta.text_tokens)
    stats.update(text_s=time.perf_counter() - tick)

    tick = time.perf_counter()
    split_dir = Path(job.split_dir)
    write_json_atomic(split_dir / partition_name(job.index), {"inputs": inputs_digest(job.videos, job.captions), "failed": failed})
    shape = (0, meta.num_frames)
    records = [
        write_video_shard(
            split_dir / shard_name("videos", job.index), meta, ok_ids,
            np.concatenate(frames) if frames else np.zeros((*shape, meta.embed_dim)),
            np.concatenate(masks) if masks else np.zeros(shape, bool),
            np.concatenate(indices) if indices else np.zeros(shape, np.int32),
            (np.concatenate(patches) if patches else np.zeros((*shape, grid * grid, meta.embed_dim))) if grid else None),
        write_text_shard(
            split_dir / shard_name("texts", job.index), meta, [c.text_id for c in captions],
            [c.video_id for c in captions], [c.text for c in captions], texts, tokens, token_mask),
    ]
    stats.update(write_s=time.perf_counter() - tick, wall_s=time.perf_counter() - start,
                 videos=len(ok_ids), failed=len(failed), texts=len(captions))
    log.debug("%s partition %05d written: %d videos, %d captions, %d failed; write %.3fs",
              meta.split, job.index, len(ok_ids), len(captions), len(failed), stats["write_s"])
    return PartitionResult(job.index, records, failed, dict(stats))


def _encode_captions(encoder: Encoder, texts: list[str], chunk: int, tokens: bool):
    """Embeddings ``[n_text, dim]`` of ``texts`` in chunks of ``chunk``; with ``tokens``
    also token_embedding ``[n_text, n_token, dim]`` and token_mask ``[n_text, n_token]``,
    n_token the longest caption (shorter chunks padded with masked zeros), else None."""
    chunks = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
    if not tokens:
        return np.concatenate([encoder.encode_texts(c) for c in chunks] or [np.zeros((0, encoder.embed_dim))]), None, None
    parts = [encoder.encode_text_tokens(c) for c in chunks]
    n_token = max((p[1].shape[1] for p in parts), default=0)
    pad = [((0, 0), (0, n_token - p[1].shape[1])) for p in parts]
    return (np.concatenate([p[0] for p in parts] or [np.zeros((0, encoder.embed_dim))]),
            np.concatenate([np.pad(p[1], (*w, (0, 0))) for p, w in zip(parts, pad)] or [np.zeros((0, 0, encoder.embed_dim))]),
            np.concatenate([np.pad(p[2], w) for p, w in zip(parts, pad)] or [np.zeros((0, 0), bool)]))


# ------------------------------------------------------------------------ distributors

Distributor = Callable[[list[PartitionJob]], Iterator[PartitionResult]]


def run_sequential(jobs: list[PartitionJob]) -> Iterator[PartitionResult]:
    for job in jobs:
        yield run_partition(job)


@contextmanager
def dask_distributor(workers: int = 0, scheduler: str | None = None) -> Iterator[Distributor]:
    """A distributor on dask: joins ``scheduler`` if given, else starts a LocalCluster of
    ``workers`` processes (one thread each) for the duration of the block. Those die
    with this process (dask's own parent-alive pipe), and their decode workers with them
    (:func:`_die_with`)."""
    import dask
    import distributed

    # dask worker processes are daemons by default, and a daemon may not start the
    # loader's decode processes
    with dask.config.set({"distributed.worker.daemon": False}):
        if scheduler:
            cluster, client = None, distributed.Client(scheduler)
        else:
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=None, silence_logs=logging.WARNING)
            client = distributed.Client(cluster)
        log.info("dask: %s", client)

        def run(jobs: list[PartitionJob]) -> Iterator[PartitionResult]:
            futures = client.map(run_partition, jobs, pure=False)
            for future in distributed.as_completed(futures):
                yield future.result()

        try:
            yield run
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


# ------------------------------------------------------------------------------ driver


def plan_partitions(data: SplitData, shard_size: int, earlier: Sequence[Sequence[str]] = ()
                    ) -> list[tuple[tuple[Video, ...], tuple[Caption, ...]]]:
    """Blocks of ``shard_size`` videos with their captions. ``earlier``: the video ids of
    the partitions planned before (incremental splits); each keeps its videos still in
    the split, and the videos not in any follow in new blocks, in ``data``'s order."""
    by_video: dict[str, list[Caption]] = {}
    for caption in data.captions:
        by_video.setdefault(caption.video_id, []).append(caption)
    present = {v.id: v for v in data.videos}
    groups = [[present[i] for i in ids if i in present] for ids in earlier]
    planned = {i for ids in earlier for i in ids}
    new = [v for v in data.videos if v.id not in planned]
    groups += [new[first:first + shard_size] for first in range(0, len(new), shard_size)]
    return [(tuple(g), tuple(c for v in g for c in by_video.get(v.id, []))) for g in groups]


def _incremental_plan(split_dir: Path, data: SplitData, shard_size: int):
    """Plan an incremental split after the partitions of earlier runs, and record the plan.
    (Another folder never extends these features: its ``data_root`` differs, and a split
    directory refuses features made otherwise.)"""
    path = split_dir / PLAN_FILE
    earlier = json.loads(path.read_text())["partitions"] if path.is_file() else []
    blocks = plan_partitions(data, shard_size, earlier)
    write_json_atomic(path, {"partitions": [[v.id for v in videos] for videos, _ in blocks]})
    return blocks


def split_dir_for(out_root: Path, data: SplitData, encoder: Encoder, config: ExtractConfig) -> Path:
    return Path(out_root) / data.dataset / model_tag(encoder.name, config.pretrained) / data.split


def build_meta(data: SplitData, encoder: Encoder, config: ExtractConfig) -> FeatureMeta:
    import decord
    import open_clip
    import torch

    return FeatureMeta(
        dataset=data.dataset,
        split=data.split,
        model=encoder.name,
        pretrained=config.pretrained,
        embed_dim=encoder.embed_dim,
        num_frames=config.num_frames,
        frame_sampling=config.sampling,
        logit_scale=encoder.logit_scale,
        image_size=encoder.image_size,
        checkpoint_sha256=encoder.checkpoint_sha256,
        random_init=encoder.random_init,
        source="open_clip",
        text_tokens=config.text_tokens,
        patch_grid=config.patch_grid,
        extra={
            "weights": encoder.weights,
            "encoder_label": encoder.label,
            "short_clip_policy": SHORT_CLIP_POLICY,
            "decoder": f"{DECODER} {decord.__version__}",
            "model_config": encoder.model_config,
            "preprocess": encoder.preprocess_cfg,
            "precision": precision_for(resolve_device(config.device)),
            "text_context_length": encoder.model_config["text_cfg"].get("context_length", 77),
            "seed": config.seed,
            "software": {"open_clip": open_clip.__version__, "torch": torch.__version__},
            **data.notes,
        },
    )


def identity_settings(config: ExtractConfig) -> dict:
    """The run settings a resume must share beyond the features' metadata."""
    return {key: getattr(config, key) for key in IDENTITY}


def check_out(splits: list[SplitData], config: ExtractConfig, out_root: Path, encoder: Encoder) -> None:
    """Refuse, before any work and touching nothing, when a split directory of this run
    holds features made otherwise (raises :class:`~tmass.features.format.SplitDirError`)."""
    for data in splits:
        check_split_dir(split_dir_for(out_root, data, encoder, config), build_meta(data, encoder, config),
                        identity_settings(config))


def _completed(split_dir: Path, index: int, digest: str) -> PartitionResult | None:
    names = [shard_name("videos", index), shard_name("texts", index)]
    if not all((split_dir / n).is_file() for n in [*names, partition_name(index)]):
        return None
    done = json.loads((split_dir / partition_name(index)).read_text())
    if done["inputs"] != digest:
        log.info("%s: the inputs of partition %d changed since it was extracted; extracting it again", split_dir, index)
        return None
    return PartitionResult(index, [read_shard_record(split_dir / n) for n in names], done["failed"])


@contextmanager
def _log_to(path: Path):
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


@dataclass
class SplitReport:
    split_dir: Path
    videos: int
    texts: int
    failed: list[dict]
    resumed: int  # partitions found complete
    stats: dict  # summed over the partitions run now
    wall_s: float

    def lines(self) -> list[str]:
        reasons = Counter(f["reason"].split(":")[0] for f in self.failed)
        head = f"{self.split_dir}: {self.videos} videos, {self.texts} captions; {len(self.failed)} inputs skipped"
        if reasons:
            head += " (" + ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common()) + ")"
        if self.resumed:
            head += f"; {self.resumed} partitions were already complete"
        s = self.stats
        if not s.get("frames"):
            return [head]
        model_s = s["encode_s"] + s["text_s"]
        return [
            head,
            f"  {int(s['frames'])} frames in {self.wall_s:.1f} s: {s['frames'] / self.wall_s:.1f} frames/s",
            f"  image model {s['encode_s']:.1f} s, text model {s['text_s']:.1f} s, writing {s['write_s']:.1f} s; "
            f"decode+preprocess {s['decode_s']:.1f} s "
            f"({s['decode_s'] / (s['decode_s'] + model_s):.0%} of decode+model time), "
            + (f"{s['inline_decode_s']:.1f} s of it in the runner, not overlapped (--loader-workers 0)"
               if s.get("inline_decode_s") else "in loader workers, overlapped with the model"),
            f"  bottleneck: {'the model' if s['wait_s'] < model_s else 'decoding'} "
            f"(the model waited {s['wait_s']:.1f} s for decoded frames)",
        ]


def extract_split(data: SplitData, config: ExtractConfig, out_root: Path, encoder: Encoder,
                  distributor: Distributor = run_sequential, progress: bool = True,
                  overwrite: bool = False) -> SplitReport:
    """Extract one split into ``out_root/<dataset>/<model-tag>/<split>/``: run the
    partitions that are not complete yet, then write the manifest. A directory holding
    features made otherwise is refused, or with ``overwrite`` replaced as a whole."""
    start = time.perf_counter()
    split_dir = split_dir_for(out_root, data, encoder, config)
    meta = build_meta(data, encoder, config)
    with writing_split(split_dir, meta, identity_settings(config), overwrite):
        write_json_atomic(split_dir / CONFIG_FILE, {"config": dataclasses.asdict(config)})
        done, jobs = [], []
        blocks = (_incremental_plan(split_dir, data, config.shard_size) if data.incremental
                  else plan_partitions(data, config.shard_size))
        for index, (videos, captions) in enumerate(blocks):
            complete = _completed(split_dir, index, inputs_digest(videos, captions))
            if complete:
                done.append(complete)
            else:
                jobs.append(PartitionJob(config, encoder.weights, meta, str(split_dir), index, videos, captions,
                                         progress and distributor is run_sequential))
        with _log_to(split_dir / LOG_FILE):
            if encoder.random_init:
                log.warning("%s: RANDOM-INIT ENCODER (--pretrained %s): features carry no pretrained knowledge",
                            split_dir, config.pretrained)
            log.info("%s: %d videos, %d captions in %d partitions (%d already complete)", split_dir,
                     len(data.videos), len(data.captions), len(done) + len(jobs), len(done))
            ran = list(tqdm(distributor(jobs), total=len(jobs), desc=f"extract {data.dataset}/{data.split}",
                            unit="partition", disable=not progress or not jobs))
            results = sorted(done + ran, key=lambda r: r.index)
            failed = data.failed + [f for r in results for f in r.failed]
            records = [rec for r in results for rec in r.records]
            write_manifest(split_dir, meta, records, failed=failed)
            stats: Counter = Counter()
            for r in ran:
                stats.update(r.stats)
            report = SplitReport(
                split_dir, sum(rec.rows for rec in records if rec.kind == "videos"),
                sum(rec.rows for rec in records if rec.kind == "texts"), failed, len(done), dict(stats),
                time.perf_counter() - start)
            for line in report.lines():
                log.info(line)
        return report


def share_cores(config: ExtractConfig, workers: int) -> ExtractConfig:
    """Share this machine's cores among ``workers`` local dask workers, so that their
    torch threads and decode processes do not oversubscribe it."""
    if workers <= 0 or resolve_device(config.device) != "cpu" or config.torch_threads:
        return config
    return dataclasses.replace(config, torch_threads=max(1, (os.cpu_count() or 2) // workers))

