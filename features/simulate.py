"""Simulated feature shards: the shard format without CLIP, for tests and benchmarks.

The generator models what T-MASS is about: a video shows more than its caption says.

World (shared by the train and test splits of one seed):
    * ``n_concepts`` latent concepts with unit directions ``c_k`` in R^dim; how often a
      concept appears follows a Zipf law (``p_k ~ 1 / (k + 1) ** zipf``), so frequent
      concepts recur across many videos and make hard negatives.
    * The two encoders disagree a little: images see concept k as ``c_k``, texts as
      ``A c_k`` with ``A`` a random orthogonal matrix near the identity
      (``text_rotation`` sets how far). A learned projection can undo part of it.
    * CLIP's modality gap: every image embedding is offset by ``g_img`` and every text
      embedding by ``g_txt`` (random directions, length ``gap``, nearly orthogonal).

Video (``n_frames`` frames):
    * ``n_scenes`` ~ U{min_scenes..max_scenes} scenes cut the frames into contiguous
      segments (scene changes); scene s shows concept ``k_s`` (distinct within a video).
    * A video-level context ``u_v`` (lighting, style: seen by every frame, never named by
      a caption) and per-frame noise.
    * frame = ``image_scale * (normalise(c_{k_s} + context * u_v + frame_noise * n) + g_img)``

Caption (``captions_per_video`` per video, drawn independently):
    * names a random non-empty subset of the video's scenes: each scene is mentioned
      with probability ``mention``, at least one always is. So a caption covers only
      part of the video, and mean pooling over frames dilutes it with unmentioned scenes
      while text-conditioned pooling can attend to the mentioned ones.
    * text = ``text_scale * (normalise(sum_s A c_{k_s} / sqrt(n_named) + text_noise * n) + g_txt)``

Word tokens (``text_tokens``; a separate random stream, so the embeddings above do not
change): a caption is ``[SOT, words..., EOT]``. Each named scene contributes one word
that names its concept, ``text_scale * (normalise(A c_{k_s} + word_noise * n) + g_txt)``,
and up to ``fillers`` filler words come from a shared vocabulary of
``filler_vocabulary`` directions that name nothing; the words appear in random order.
SOT is one fixed direction; the EOT token is the caption embedding itself, as CLIP
pools its text at EOT.

Patch tokens (``patch_grid`` G): in each scene its concept fills a random rectangle of
the G x G grid (at least one cell, the same in every frame of the scene); the other
cells show the video's background ``b_v``, a direction no caption names:
patch = ``image_scale * (normalise(c_{k_s} or b_v + context * u_v + frame_noise * n) + g_img)``.

The ``random`` preset instead draws every frame and caption embedding from a plain
Gaussian (no structure at all, shapes of MSR-VTT's 1k-A test split): retrieval on it
must sit at chance, which is what the leak tests measure. Its tokens and patches are
Gaussian too (EOT still the caption embedding).

Embeddings are scaled to norms close to CLIP ViT-B/32's (about 10 for images and 8 for
texts) and stored like real extracted features: float16, not normalised.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tmass.features.format import (
    FeatureMeta,
    check_split_dir,
    read_shard_record,
    shard_name,
    write_manifest,
    write_text_shard,
    write_video_shard,
    writing_split,
)

CLIP_LOGIT_SCALE = 100.0  # exp(logit_scale) of OpenAI's CLIP, the value a real manifest carries


@dataclass(frozen=True)
class SplitShape:
    n_videos: int
    captions_per_video: int


@dataclass(frozen=True)
class SimulationConfig:
    """One preset of the generator; every field is a parameter of the model above."""

    name: str
    train: SplitShape
    test: SplitShape
    dim: int = 512
    n_frames: int = 12
    structured: bool = True
    n_concepts: int = 1000
    zipf: float = 0.7
    min_scenes: int = 2
    max_scenes: int = 4
    mention: float = 0.4
    context: float = 0.8
    frame_noise: float = 0.6
    text_noise: float = 0.6
    text_rotation: float = 0.6
    gap: float = 0.8
    image_scale: float = 10.0
    text_scale: float = 8.0
    word_noise: float = 0.6
    fillers: int = 3
    filler_vocabulary: int = 50
    videos_per_shard: int = 2048


PRESETS = {
    "tiny": SimulationConfig(
        "tiny", SplitShape(256, 4), SplitShape(64, 2), dim=64, n_concepts=96, videos_per_shard=128
    ),
    "msrvtt": SimulationConfig("msrvtt", SplitShape(9000, 20), SplitShape(1000, 1)),
    "vatex": SimulationConfig("vatex", SplitShape(25991, 10), SplitShape(1500, 10)),
    "random": SimulationConfig(
        "random", SplitShape(1000, 1), SplitShape(1000, 1), structured=False
    ),
}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclass
class _World:
    concepts: np.ndarray  # [n_concepts, dim], unit rows (image-side view)
    text_concepts: np.ndarray  # [n_concepts, dim], A c_k (text-side view)
    popularity: np.ndarray  # [n_concepts], sums to 1
    gap_image: np.ndarray  # [dim]
    gap_text: np.ndarray  # [dim]
    start_word: np.ndarray  # [dim], unit: the SOT token's direction
    filler_words: np.ndarray  # [filler_vocabulary, dim], unit rows


def _make_world(cfg: SimulationConfig, rng: np.random.Generator) -> _World:
    dim = cfg.dim
    concepts = _unit(rng.standard_normal((cfg.n_concepts, dim)))
    # QR of a perturbed identity is an orthogonal matrix close to the identity.
    q, r = np.linalg.qr(np.eye(dim) + cfg.text_rotation * rng.standard_normal((dim, dim)) / np.sqrt(dim))
    rotation = q * np.sign(np.diag(r))
    popularity = 1.0 / np.arange(1, cfg.n_concepts + 1) ** cfg.zipf
    gaps = _unit(rng.standard_normal((2, dim))) * cfg.gap
    words = _unit(rng.standard_normal((1 + cfg.filler_vocabulary, dim)))  # drawn last: the rest is as before
    return _World(concepts, concepts @ rotation.T, popularity / popularity.sum(), gaps[0], gaps[1], words[0], words[1:])


@dataclass
class _Scenes:
    """What one video shows and what its captions name (the latent state the tokens and
    patches are drawn from). ``named [captions_per_video, n_scenes]`` bool."""

    concepts: np.ndarray  # [n_scenes] concept ids
    scene_of_frame: np.ndarray  # [n_frames]
    context: np.ndarray  # [dim]
    named: np.ndarray


def _simulate_block(cfg: SimulationConfig, world: _World | None, n_videos: int, captions_per_video: int, rng: np.random.Generator):
    """frames ``[n_videos, n_frames, dim]`` and texts ``[n_videos * captions_per_video, dim]``
    (captions of video i are rows i*cpv .. i*cpv+cpv-1), float32, and each video's
    :class:`_Scenes` (empty for the structureless preset)."""
    dim, n_frames = cfg.dim, cfg.n_frames
    n_texts = n_videos * captions_per_video
    if world is None:  # the structureless `random` preset
        frames = rng.standard_normal((n_videos, n_frames, dim), dtype=np.float32)
        texts = rng.standard_normal((n_texts, dim), dtype=np.float32)
        return frames * cfg.image_scale / np.sqrt(dim), texts * cfg.text_scale / np.sqrt(dim), []
    scenes = []

    frames = np.empty((n_videos, n_frames, dim), dtype=np.float32)
    texts = np.empty((n_texts, dim), dtype=np.float32)
    for v in range(n_videos):
        n_scenes = int(rng.integers(cfg.min_scenes, cfg.max_scenes + 1))
        scene_concepts = rng.choice(cfg.n_concepts, size=n_scenes, replace=False, p=world.popularity)
        cuts = np.sort(rng.choice(np.arange(1, n_frames), size=n_scenes - 1, replace=False))
        scene_of_frame = np.searchsorted(cuts, np.arange(n_frames), side="right")  # [n_frames]
        context = rng.standard_normal(dim) / np.sqrt(dim)
        noise = rng.standard_normal((n_frames, dim)) / np.sqrt(dim)
        x = world.concepts[scene_concepts[scene_of_frame]] + cfg.context * context + cfg.frame_noise * noise
        frames[v] = cfg.image_scale * (_unit(x) + world.gap_image)

        named = rng.random((captions_per_video, n_scenes)) < cfg.mention  # [n_captions, n_scenes]
        named[np.arange(captions_per_video), rng.integers(n_scenes, size=captions_per_video)] = True
        y = named @ world.text_concepts[scene_concepts] / np.sqrt(named.sum(axis=1, keepdims=True))
        y = y + cfg.text_noise * rng.standard_normal((captions_per_video, dim)) / np.sqrt(dim)
        texts[v * captions_per_video : (v + 1) * captions_per_video] = cfg.text_scale * (_unit(y) + world.gap_text)
        scenes.append(_Scenes(scene_concepts, scene_of_frame, context, named))
    return frames, texts, scenes


def _simulate_tokens(cfg: SimulationConfig, world: _World | None, scenes: list[_Scenes], texts: np.ndarray,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Word tokens of the captions ``texts [n_text, dim]``: token_embedding
    ``[n_text, n_token, dim]`` float32 and token_mask ``[n_text, n_token]`` (n_token: the
    longest caption here)."""
    dim, scale = cfg.dim, cfg.text_scale
    captions = []  # per caption: its word vectors, before SOT and EOT
    if world is None:
        for _ in range(len(texts)):
            captions.append(rng.standard_normal((int(rng.integers(1, 5)), dim)) * scale / np.sqrt(dim))
    else:
        for video in scenes:
            for named in video.named:
                names = world.text_concepts[video.concepts[named]]
                fillers = world.filler_words[rng.integers(cfg.filler_vocabulary, size=int(rng.integers(cfg.fillers + 1)))]
                words = np.concatenate([names, fillers])[rng.permutation(len(names) + len(fillers))]
                noisy = words + cfg.word_noise * rng.standard_normal(words.shape) / np.sqrt(dim)
                captions.append(scale * (_unit(noisy) + world.gap_text))
    n_token = 2 + max((len(c) for c in captions), default=0)
    tokens = np.zeros((len(texts), n_token, dim), np.float32)
    mask = np.zeros((len(texts), n_token), bool)
    start = scale * (world.start_word + world.gap_text) if world is not None else rng.standard_normal(dim) * scale / np.sqrt(dim)
    for i, words in enumerate(captions):
        tokens[i, 0], tokens[i, 1:1 + len(words)], tokens[i, 1 + len(words)] = start, words, texts[i]
        mask[i, :2 + len(words)] = True
    return tokens, mask


def _simulate_patches(cfg: SimulationConfig, world: _World | None, scenes: list[_Scenes], n_videos: int, grid: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Patch tokens pooled to ``grid x grid``: ``[n_videos, n_frames, grid * grid, dim]`` float32."""
    dim, n_frames, cells = cfg.dim, cfg.n_frames, grid * grid
    if world is None:
        return rng.standard_normal((n_videos, n_frames, cells, dim), dtype=np.float32) * cfg.image_scale / np.sqrt(dim)
    patches = np.empty((n_videos, n_frames, cells, dim), np.float32)
    row, col = np.divmod(np.arange(cells), grid)
    for v, video in enumerate(scenes):
        background = _unit(rng.standard_normal(dim))
        inside = np.empty((len(video.concepts), cells), bool)  # [n_scenes, cells]: where each scene's concept is
        for s in range(len(video.concepts)):
            top, left = rng.integers(grid, size=2)
            bottom, right = rng.integers(top, grid) + 1, rng.integers(left, grid) + 1
            inside[s] = (top <= row) & (row < bottom) & (left <= col) & (col < right)
        shown = np.where(inside[video.scene_of_frame][..., None], world.concepts[video.concepts[video.scene_of_frame]][:, None],
                         background)  # [n_frames, cells, dim]
        noise = rng.standard_normal((n_frames, cells, dim)) / np.sqrt(dim)
        patches[v] = cfg.image_scale * (_unit(shown + cfg.context * video.context + cfg.frame_noise * noise) + world.gap_image)
    return patches


def _meta(cfg: SimulationConfig, split: str, seed: int, text_tokens: bool, patch_grid: int) -> FeatureMeta:
    return FeatureMeta(
        dataset=f"sim-{cfg.name}",
        split=split,
        model="simulated",
        pretrained="none",
        embed_dim=cfg.dim,
        num_frames=cfg.n_frames,
        frame_sampling="simulated",
        logit_scale=CLIP_LOGIT_SCALE,
        random_init=False,
        source="simulated",
        text_tokens=text_tokens,
        patch_grid=patch_grid,
        extra={"preset": cfg.name, "seed": seed, "generator": dataclasses.asdict(cfg)},
    )


def simulate(preset: str | SimulationConfig, out_dir: Path, seed: int = 0, progress: bool = True,
             overwrite: bool = False, text_tokens: bool = False, patch_grid: int = 0) -> dict[str, Path]:
    """Write the train and test splits of a preset under ``out_dir`` (``out_dir/train``,
    ``out_dir/test``); returns the split directories. Deterministic in ``seed``.
    ``text_tokens`` adds word tokens, ``patch_grid`` G > 0 patch tokens on a G x G grid.

    A split directory holding features made otherwise (extracted, another preset or
    seed) raises :class:`~tmass.features.format.SplitDirError` before anything is
    written, unless ``overwrite`` replaces it. Re-running resumes an interrupted run
    (every shard has its own random stream) and leaves a complete split as it is."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    out_dir = Path(out_dir)
    splits = (("train", cfg.train), ("test", cfg.test))
    if not overwrite:  # both splits before either is written
        for split, _ in splits:
            check_split_dir(out_dir / split, _meta(cfg, split, seed, text_tokens, patch_grid))
    world_seed, *split_seeds = np.random.SeedSequence(seed).spawn(3)
    world = _make_world(cfg, np.random.default_rng(world_seed)) if cfg.structured else None
    written = {}
    for (split, shape), split_seed in zip(splits, split_seeds):
        meta = _meta(cfg, split, seed, text_tokens, patch_grid)
        split_dir = written[split] = out_dir / split
        with writing_split(split_dir, meta, overwrite=overwrite) as complete:
            if complete:
                if progress:
                    tqdm.write(f"{split_dir}: already complete (same preset and seed); nothing written")
                continue
            n_shards = -(-shape.n_videos // cfg.videos_per_shard)
            shard_rngs = [np.random.default_rng(s) for s in split_seed.spawn(n_shards)]
            token_rngs = [np.random.default_rng(s) for s in split_seed.spawn(n_shards)]  # the next children
            records = []
            for shard in tqdm(range(n_shards), desc=f"simulate {cfg.name}/{split}", unit="shard", disable=not progress):
                paths = [split_dir / shard_name(kind, shard) for kind in ("videos", "texts")]
                if all(path.is_file() for path in paths):  # written by an interrupted run of the same settings
                    records += [read_shard_record(path) for path in paths]
                    continue
                first = shard * cfg.videos_per_shard
                n = min(cfg.videos_per_shard, shape.n_videos - first)
                frames, texts, scenes = _simulate_block(cfg, world, n, shape.captions_per_video, shard_rngs[shard])
                tokens = _simulate_tokens(cfg, world, scenes, texts, token_rngs[shard]) if text_tokens else (None, None)
                patches = _simulate_patches(cfg, world, scenes, n, patch_grid, token_rngs[shard]) if patch_grid else None
                video_ids = [f"{split}-video{first + i:06d}" for i in range(n)]
                owner = [vid for vid in video_ids for _ in range(shape.captions_per_video)]
                text_ids = [f"{vid}-cap{c:02d}" for vid in video_ids for c in range(shape.captions_per_video)]
                captions = [f"simulated caption {c} of {vid}" for vid in video_ids for c in range(shape.captions_per_video)]
                records.append(write_video_shard(paths[0], meta, video_ids, frames, patches=patches))
                records.append(write_text_shard(paths[1], meta, text_ids, owner, captions, texts, *tokens))
            write_manifest(split_dir, meta, records)
    return written
