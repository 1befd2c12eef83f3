"""The demo encoder: a small CLIP this project trains on rendered shapes, so that the
offline demo has features with real signal (a random-init CLIP gives video embeddings
that are all alike, and every number sits at chance).

It is an ordinary open_clip model, described in open_clip's own model-config format
(``demo-encoder/tmass-demo.json``: a 3-layer ViT on 48x48 frames and a 2-layer text
transformer with CLIP's tokenizer, embedding width 64: small enough to train on a
contended 2-core CPU) and saved as an open_clip checkpoint (``demo-encoder/tmass-demo.pt``,
float16, a ``state_dict`` entry as open_clip_train writes it, 7.0 MiB). The demo loads it the way a user's own checkpoint is loaded:
``--model tmass-demo --pretrained extract/demo-encoder/tmass-demo.pt``; the model name
resolves because :func:`register` adds the config to open_clip's registry. Every output
made with it says :data:`LABEL`.

Training data: clips of the demo generator (:mod:`tmass.extract.demo`) rendered with
another seed (:attr:`EncoderTrainSpec.seed`), so none of them is a demo clip. Each step
takes a batch of clips, draws for each a caption the way the demo does (a subset of its
scenes, in order, colours sometimes left out) and one random frame of every scene the
caption names; the clip's image embedding is the mean over those frames. open_clip's
``ClipLoss`` (symmetric InfoNCE with a learned temperature) pulls each caption towards
the frames it is about. So the text tower learns what a partial caption refers to, and
frames of different scenes stay apart: what text-conditioned pooling needs. The shipped
weights, on 100 held-out clips (one caption each, chance R@1 1 %): R@1 16 % against the
mean of all frames, 27 % against the frames the caption names.

Reproduce the shipped weights (deterministic on CPU for a given torch version and thread
count; the spec fixes 1 thread)::

    make demo-encoder        # = python -m tmass.extract.demo_encoder --out extract/demo-encoder/tmass-demo.pt
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).with_name("demo-encoder")
NAME = "tmass-demo"  # the open_clip model name of the demo encoder's config
CONFIG = ASSETS / f"{NAME}.json"
CHECKPOINT = ASSETS / f"{NAME}.pt"
CHECKPOINT_SHA256 = "a629392a9f11b45e803cca62f06b1af0fe0c52f086adb0619b22dc90e37d0995"
LABEL = "tmass demo encoder (trained on rendered shapes, not OpenAI CLIP)"


def register() -> None:
    """Make the name ``tmass-demo`` resolve in open_clip (idempotent)."""
    from open_clip.factory import add_model_config

    add_model_config(CONFIG)


def label_of(checkpoint: Path) -> str | None:
    """The label stored in an open_clip checkpoint written by :func:`train_demo_encoder`,
    or None for any other checkpoint."""
    import torch

    try:
        data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file (safetensors, npz): not ours
        return None
    return data.get("tmass", {}).get("label") if isinstance(data, dict) else None


@dataclass(frozen=True)
class EncoderTrainSpec:
    """How the shipped demo encoder was trained."""

    clips: int = 800  # rendered training clips (the last `held_out` are only measured on)
    held_out: int = 100
    seed: int = 1  # the demo generator's seed for these clips; the demo itself renders seed 0
    steps: int = 500
    batch_size: int = 64  # clips per step
    lr: float = 1e-3
    warmup: int = 60
    weight_decay: float = 0.1
    threads: int = 1  # fixed: CPU results depend on the thread count (and 2 threads are slower on a busy 2-core machine)


def _frames(spec: EncoderTrainSpec, preprocess, progress: bool) -> tuple[np.ndarray, list]:
    """Every frame of every training clip after the model's resize and crop, ``[clips,
    n_frames, size, size, 3]`` uint8, and each clip's scenes."""
    from PIL import Image
    from tqdm import tqdm

    from tmass.extract.demo import DemoSpec, demo_scenes

    geometric = [t for t in preprocess.transforms if type(t).__name__ in ("Resize", "CenterCrop")]
    demo_spec = DemoSpec(seed=spec.seed)
    frames, scenes = [], []
    for index in tqdm(range(spec.clips), desc="render training clips", unit="clip", disable=not progress):
        clip, clip_scenes = demo_scenes(demo_spec, index)
        images = [Image.fromarray(frame) for frame in clip]
        for transform in geometric:
            images = [transform(image) for image in images]
        frames.append(np.stack([np.asarray(image) for image in images]))
        scenes.append(clip_scenes)
    return np.stack(frames), scenes


def _to_pixels(frames: np.ndarray, preprocess):
    """uint8 ``[n, size, size, 3]`` -> the model's normalised ``[n, 3, size, size]``."""
    import torch

    normalize = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
    return normalize(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0)


def _batch(frames: np.ndarray, scenes: list, clips: np.ndarray, rng: np.random.Generator):
    """Captions of ``clips`` (one each), the frames they name and, per frame, its clip's
    row in the batch."""
    from tmass.extract.demo import caption

    texts, picked, owner = [], [], []
    for row, clip in enumerate(clips):
        text, named = caption(scenes[clip], rng)
        texts.append(text)
        for scene, keep in zip(scenes[clip], named):
            if keep:
                picked.append(frames[clip, int(rng.integers(scene.start, scene.stop))])
                owner.append(row)
    return texts, np.stack(picked), np.asarray(owner)


def _pool(features, owner, n: int):
    """Mean of ``features [n_frames, dim]`` per batch row -> ``[n, dim]``."""
    import torch

    owner = torch.as_tensor(owner)
    sums = torch.zeros(n, features.shape[1]).index_add_(0, owner, features)
    return sums / torch.bincount(owner, minlength=n).unsqueeze(1)


def held_out_recall(model, tokenizer, preprocess, frames: np.ndarray, scenes: list, seed: int) -> dict:
    """Caption -> clip R@1 (%) on held-out clips, one caption each, with the clip pooled
    as the mean of all its frames (what meanP sees) and of the frames its caption names
    (what ideal text-conditioned pooling sees); chance is 100 / n clips."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng([seed, 1])
    texts, picked, owner = _batch(frames, scenes, np.arange(len(scenes)), rng)
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        every = torch.cat([model.encode_image(_to_pixels(clip[::3], preprocess)).mean(0, keepdim=True) for clip in frames])
        named = _pool(model.encode_image(_to_pixels(picked, preprocess)), owner, len(texts))

    def r1(videos):
        scores = text @ F.normalize(videos, dim=-1).T  # [n_text, n_video]
        return float((scores.argmax(1) == torch.arange(len(texts))).float().mean() * 100)

    return {"clips": len(texts), "chance": 100 / len(texts), "mean_of_all_frames": r1(every), "named_frames": r1(named)}


def train_demo_encoder(out: Path, spec: EncoderTrainSpec = EncoderTrainSpec(), progress: bool = True) -> dict:
    """Train the demo encoder and write it to ``out`` as an open_clip checkpoint; returns
    what was measured (held-out R@1, seconds, the file's SHA-256)."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss
    from tqdm import tqdm

    from tmass.features.format import sha256_file

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        register()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model, _, preprocess = open_clip.create_model_and_transforms(NAME)
            tokenizer = open_clip.get_tokenizer(NAME)
            frames, scenes = _frames(spec, preprocess, progress)
            n_fit = spec.clips - spec.held_out
            decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
            rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
            optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                                           {"params": rest, "weight_decay": 0.0}], lr=spec.lr)
            loss_fn = ClipLoss()
            rng = np.random.default_rng([spec.seed, 0])
            bar = tqdm(range(spec.steps), desc="train demo encoder", unit="step", disable=not progress)
            for step in bar:
                warm = min(1.0, (step + 1) / spec.warmup)
                for group in optimizer.param_groups:
                    group["lr"] = spec.lr * warm * 0.5 * (1 + np.cos(np.pi * step / spec.steps))
                clips = rng.choice(n_fit, size=spec.batch_size, replace=False)
                texts, picked, owner = _batch(frames, scenes, clips, rng)
                video = F.normalize(_pool(model.encode_image(_to_pixels(picked, preprocess)), owner, len(texts)), dim=-1)
                text = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
                loss = loss_fn(video, text, model.logit_scale.exp())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 destabilises training
                    model.logit_scale.clamp_(0, np.log(100))
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            model.eval()
            measured = held_out_recall(model, tokenizer, preprocess, frames[n_fit:], scenes[n_fit:], spec.seed)
    finally:
        torch.set_num_threads(threads)
    checkpoint = {
        "name": NAME,
        "step": spec.steps,
        "state_dict": {k: v.detach().half() for k, v in model.state_dict().items()},
        "tmass": {"label": LABEL, "train_spec": dataclasses.asdict(spec), "held_out": measured,
                  "software": {"open_clip": open_clip.__version__, "torch": str(torch.__version__)}},
    }
    buffer = io.BytesIO()  # torch.save names the archive after the file: save bytes, so the name never matters
    torch.save(checkpoint, buffer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    return {**measured, "seconds": round(time.perf_counter() - start, 1), "sha256": sha256_file(out),
            "bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> None:
    import click

    @click.command()
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=CHECKPOINT, show_default=True)
    @click.option("--steps", type=int, default=EncoderTrainSpec.steps, show_default=True)
    def cli(out, steps):
        """Train the demo encoder on rendered clips (not the demo's) and write its checkpoint."""
        result = train_demo_encoder(out, dataclasses.replace(EncoderTrainSpec(), steps=steps))
        click.echo(f"held-out caption -> clip R@1 over {result['clips']} clips (chance {result['chance']:.1f} %): "
                   f"{result['mean_of_all_frames']:.1f} % on the mean of all frames, "
                   f"{result['named_frames']:.1f} % on the frames the caption names")
        click.echo(f"{out}: {result['bytes'] / 2**20:.1f} MiB, sha256 {result['sha256']}, {result['seconds']:.0f} s")
        if out.resolve() == CHECKPOINT.resolve() and result["sha256"] != CHECKPOINT_SHA256:
            click.echo(f"note: differs from the recorded SHA-256 {CHECKPOINT_SHA256} "
                       "(another torch version or CPU gives other float rounding)", err=True)

    cli(argv)


if __name__ == "__main__":
    main()
