"""The frozen CLIP encoder: open_clip model loading (fail-fast on weights) and batched
image/text encoding.

``model`` is any open_clip architecture name (``ViT-B-32``, ``ViT-B-16``, ...) or the
path of an open_clip model-config JSON file (its file stem becomes the model name; tests
use this for a tiny architecture). ``pretrained`` is one of:

* an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...): the weights must
  be loadable *now*; when the download host cannot be reached the load fails within
  seconds with a message saying how to run offline. It never falls back to random
  weights: features from a random encoder would poison every later result.
* a local checkpoint file (open_clip or OpenAI format); its SHA-256 is recorded.
* ``none``: random initialisation (seeded, so every process builds identical weights),
  for tests and offline plumbing runs; logged loudly and flagged ``random_init``.
* ``auto``: the demo's choice only: ``openai`` weights for ``model`` if loadable, else
  the demo encoder (:mod:`tmass.extract.demo_encoder`: a small CLIP this project trained
  on rendered shapes, with its own architecture ``tmass-demo``), labelled as such in
  every output.

A checkpoint written by :mod:`tmass.extract.demo_encoder` always loads with its own
config ``tmass-demo`` (the name resolves like any open_clip model), whatever ``model``
says: it fits no other architecture. :attr:`Encoder.label` says in words what encoded
the features (random init, a pretrained tag, a checkpoint and its SHA-256, or the demo
encoder).

Embeddings are returned as CLIP computes them (not L2-normalised), in float32. On a GPU
the forward passes run under float16 autocast; everything runs in ``inference_mode``.
:func:`videos_per_batch` is the rule of ``--batch-size auto`` on CUDA.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from tmass.extract import demo_encoder

log = logging.getLogger("tmass.extract")

AUTO = "auto"
NONE = "none"
AUTO_TAG = "openai"  # what `auto` tries before falling back to the demo encoder
PROBE_TIMEOUT_S = 3.0
OFFLINE_HELP = (
    "To run offline pass --pretrained none (random init: plumbing and tests only, the "
    "features carry no pretrained knowledge) or --pretrained /path/to/checkpoint.pt (a "
    "local open_clip or OpenAI checkpoint); weights already in the Hugging Face cache "
    "load with HF_HUB_OFFLINE=1."
)


class EncoderError(Exception):
    """The requested model or weights cannot be loaded; the message says how to go on."""


@dataclass
class Encoder:
    """A loaded open_clip model with its own preprocessing and tokenizer.

    ``weights`` is what was actually loaded: a tag, a checkpoint path or ``none``
    (for ``auto`` it tells which way the choice went); ``label`` says it in words."""

    model: object
    preprocess: object  # PIL image -> [3, image_size, image_size] float32, the model's own
    tokenizer: object  # list[str] -> [n_text, context_length] int64
    device: str
    name: str
    weights: str
    random_init: bool
    embed_dim: int
    logit_scale: float
    image_size: int
    checkpoint_sha256: str | None = None
    model_config: dict = field(default_factory=dict)
    preprocess_cfg: dict = field(default_factory=dict)
    label: str = ""

    def _autocast(self):
        import contextlib

        import torch

        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _pixels(self, pixels):
        """``pixels [n, 3, size, size]`` on the device, float32. Loader batches arrive pinned,
        and in fp16 under amp-fp16 (half the bytes to copy), so the copy is asynchronous;
        widening to float32 on the device is exact for the model: autocast rounds the
        first layer's (a convolution's) input to fp16 anyway."""
        return pixels.to(self.device, non_blocking=True).float()

    def encode_images(self, pixels) -> np.ndarray:
        """``pixels [n, 3, image_size, image_size]`` (preprocessed) -> ``[n, embed_dim]``."""
        import torch

        with torch.inference_mode(), self._autocast():
            out = self.model.encode_image(self._pixels(pixels))
        return out.float().cpu().numpy()

    def auto_batch_size(self, num_frames: int) -> int:
        """Videos per image batch for ``--batch-size auto``: on CUDA, :func:`videos_per_batch`
        for the memory this device has free now (what the caching allocator holds unused
        counts as free, so later partitions get the same answer); on the CPU, or for an
        image tower the rule does not model (no ViT width and patch size: a ResNet, a timm
        tower), :data:`CPU_BATCH_SIZE`."""
        vision = self.model_config.get("vision_cfg", {})
        if not self.device.startswith("cuda") or not {"width", "patch_size"} <= vision.keys():
            return CPU_BATCH_SIZE
        import torch

        device = torch.device(self.device)
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return videos_per_batch(free, vision["width"], num_frames, self.image_size, vision["patch_size"])

    def _tokens(self, texts: list[str]):
        """Token ids ``[n, context_length]`` on the device (through pinned memory on CUDA)."""
        ids = self.tokenizer(texts)
        if self.device.startswith("cuda"):
            ids = ids.pin_memory()
        return ids.to(self.device, non_blocking=True)

    def _encode_ids(self, ids):
        """``model.encode_text(ids)``, over the batch's longest caption only.

        open_clip runs every caption over all context positions (77 for CLIP), mostly
        padding. The text transformer is causal: the output at EOT, which CLIP keeps
        (argmax pooling), never sees a later position, so the positions after the
        batch's last EOT can be dropped, with the positional embedding and the causal
        mask cut to the same length. Models that pool otherwise or attend both ways run
        untrimmed. The tests hold the two equal."""
        import torch

        model = self.model
        if getattr(model, "text_pool_type", None) != "argmax" or getattr(model, "attn_mask", None) is None:
            return model.encode_text(ids)
        eot = ids.argmax(dim=-1)  # [n]: the EOT id is the largest
        n = int(eot.max()) + 1 if len(ids) else 1
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(ids[:, :n]).to(cast) + model.positional_embedding[:n].to(cast)  # [n_text, n, width]
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
        x = x[torch.arange(len(x), device=x.device), eot]  # [n_text, width]
        projection = model.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """``texts [n]`` -> ``[n, embed_dim]``; captions beyond the context length are
        truncated by the tokenizer (77 tokens for CLIP)."""
        import torch

        with torch.inference_mode(), self._autocast():
            out = self._encode_ids(self._tokens(texts))
        return out.float().cpu().numpy()

    def token_support(self, text_tokens: bool, patch_grid: int) -> None:
        """Raise :class:`EncoderError` unless this model can give the token-level features
        asked for: a CLIP text transformer pooled at EOT, a ViT image tower whose
        ``ln_post`` runs before pooling, and a patch grid at least G x G."""
        model, visual = self.model, getattr(self.model, "visual", None)
        if text_tokens and not (hasattr(model, "ln_final") and getattr(model, "text_pool_type", None) == "argmax"):
            raise EncoderError(f"--text-tokens needs an open_clip CLIP text transformer pooled at the EOT token; {self.name} has none")
        if patch_grid:
            plain_vit = (hasattr(visual, "grid_size") and getattr(visual, "attn_pool", None) is None
                         and not getattr(visual, "final_ln_after_pool", True) and getattr(visual, "pool_type", None) in ("tok", "avg"))
            if not plain_vit:
                raise EncoderError(f"--patch-grid needs a ViT image tower with ln_post before pooling; {self.name} has none")
            if patch_grid > min(visual.grid_size):
                raise EncoderError(f"--patch-grid {patch_grid} exceeds {self.name}'s grid of "
                                   f"{visual.grid_size[0]}x{visual.grid_size[1]} patches")

    def _capture(self, module):
        """Forward hook storing ``module``'s output of the next forward pass; remove it after."""
        captured: dict = {}
        return captured, module.register_forward_hook(lambda _module, _inputs, output: captured.setdefault("out", output))

    def encode_image_tokens(self, pixels, grid: int) -> tuple[np.ndarray, np.ndarray]:
        """``pixels [n, 3, size, size]`` -> embeddings ``[n, embed_dim]`` and patch tokens
        ``[n, grid * grid, embed_dim]``: the patch tokens as the image tower has them after
        ``ln_post``, average-pooled to ``grid x grid`` cells (row-major; adaptive bins when
        grid does not divide the patch grid), then projected like the pooled token (the
        projection is linear, so pooling first gives the mean of projected patches)."""
        import torch
        import torch.nn.functional as F

        visual = self.model.visual
        captured, hook = self._capture(visual.ln_post)
        try:
            with torch.inference_mode(), self._autocast():
                out = self.model.encode_image(self._pixels(pixels))
                tokens = captured["out"][:, 1:]  # [n, rows * cols, width]: the class token dropped
                rows, cols = visual.grid_size
                cells = tokens.reshape(len(tokens), rows, cols, -1).permute(0, 3, 1, 2)  # [n, width, rows, cols]
                pooled = F.adaptive_avg_pool2d(cells.float(), grid).flatten(2).transpose(1, 2)  # [n, grid * grid, width]
                patches = pooled @ visual.proj.float()
        finally:
            hook.remove()
        return out.float().cpu().numpy(), patches.float().cpu().numpy()

    def encode_text_tokens(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``texts [n]`` -> embeddings ``[n, embed_dim]``, tokens ``[n, n_token, embed_dim]``
        and mask ``[n, n_token]``: every token's output of the text transformer after
        ``ln_final``, through the text projection, as :meth:`encode_texts` treats the EOT
        token (whose row equals the embedding). n_token is the longest caption (SOT to EOT)
        among ``texts``; rows past a caption's EOT are zero and masked."""
        import torch

        ids = self._tokens(texts)
        captured, hook = self._capture(self.model.ln_final)
        try:
            with torch.inference_mode(), self._autocast():
                out = self._encode_ids(ids)
                projection = self.model.text_projection
                tokens = captured["out"]  # [n, context_length or fewer (trimmed), width]
                tokens = projection(tokens) if isinstance(projection, torch.nn.Linear) else tokens @ projection
        finally:
            hook.remove()
        eot = ids.argmax(dim=-1)  # open_clip's argmax pooling: the EOT id is the largest
        n_token = int(eot.max()) + 1 if len(texts) else 0
        mask = torch.arange(n_token, device=ids.device)[None] <= eot[:, None]
        tokens = tokens[:, :n_token].float() * mask[..., None]
        return out.float().cpu().numpy(), tokens.cpu().numpy(), mask.cpu().numpy()


def precision_for(device: str) -> str:
    return "amp-fp16" if device.startswith("cuda") else "fp32"


CPU_BATCH_SIZE = 16  # videos per image batch where the rule below does not apply
ACTIVATION_COPIES = 16  # [tokens, width] tensors live at a ViT block's peak, see image_bytes
AUTO_MEMORY_FRACTION = 0.5
AUTO_MAX_VIDEOS = 64


def image_bytes(width: int, image_size: int, patch_size: int) -> int:
    """Device memory one image takes at the peak of a ViT image tower's fp16 forward pass,
    a deliberate overestimate: the frame itself in fp16 and float32 (6 bytes a value),
    :data:`ACTIVATION_COPIES` fp16 tensors ``[tokens, width]`` (residual stream, LayerNorm
    output, q, k, v, attention output, the MLP's 4x-wide hidden before and after GELU,
    with room to spare) and fp16 attention scores ``[heads, tokens, tokens]`` (heads of
    width 64), tokens = (image_size / patch_size)^2 patches + the class token."""
    tokens = (image_size // patch_size) ** 2 + 1
    return 3 * image_size**2 * 6 + 2 * (ACTIVATION_COPIES * tokens * width + max(1, width // 64) * tokens**2)


def videos_per_batch(free_bytes: int, width: int, num_frames: int, image_size: int, patch_size: int) -> int:
    """The rule of ``--batch-size auto`` on CUDA: as many videos (``num_frames`` images each,
    :func:`image_bytes` per image) as fit in :data:`AUTO_MEMORY_FRACTION` of the GPU's free
    memory, the rest left to the allocator's fragmentation, kernel workspaces and the
    caption batches (videos x frames captions at once); at least 1, at most
    :data:`AUTO_MAX_VIDEOS`, so that a partition still has several batches for decoding
    to overlap with (a 512-video shard: 8 or more)."""
    per_video = num_frames * image_bytes(width, image_size, patch_size)
    return max(1, min(AUTO_MAX_VIDEOS, int(free_bytes * AUTO_MEMORY_FRACTION) // per_video))


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EncoderError(f"--device {device}: torch sees no CUDA GPU on this machine; use --device cpu (or auto)")
    return device


def register_model(model: str) -> tuple[str, dict]:
    """The open_clip name of ``model`` and its architecture config; a JSON config file is
    registered with open_clip first (in every process that loads it)."""
    import open_clip
    from open_clip.factory import add_model_config, get_model_config

    if model == demo_encoder.NAME:
        demo_encoder.register()
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise EncoderError(f"model config file {path} does not exist")
        add_model_config(path)
        model = path.stem
    config = get_model_config(model)
    if config is None:
        raise EncoderError(
            f"unknown open_clip model {model!r}; known: {', '.join(open_clip.list_models())}, "
            "or pass the path of an open_clip model-config JSON file")
    return model, config


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or "/" in pretrained or Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors", ".npz"}


def _download_host_problem(cfg: dict) -> str | None:
    """Why the host a Hugging Face tag downloads from cannot be reached, or None.

    huggingface_hub retries an unreachable host for about a minute before it gives up;
    a plain TCP connect answers in seconds. Skipped in offline mode (the hub library then
    reads only its cache, instantly) and behind a proxy (a direct connect says nothing)."""
    from huggingface_hub import constants

    if not cfg.get("hf_hub") or constants.is_offline_mode():
        return None
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{endpoint.hostname}:{port} is unreachable ({exc})"
    return None


def fetch_pretrained(name: str, tag: str) -> str:
    """Local path of the weights of an open_clip pretrained tag, downloading them if the
    host is reachable; raises :class:`EncoderError` quickly otherwise."""
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    cfg = get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise EncoderError(
            f"{tag!r} is neither an open_clip pretrained tag for {name} (known: {', '.join(tags) or 'none'}) "
            f"nor an existing checkpoint file. {OFFLINE_HELP}")
    problem = _download_host_problem(cfg)
    if problem is None:
        try:
            path = download_pretrained(cfg)
        except Exception as exc:  # the hub client raises a zoo of types; all mean "not loadable"
            problem = str(exc).splitlines()[0]
        else:
            if path:
                return path
            problem = "open_clip has no download source for it"
    raise EncoderError(f"cannot load pretrained weights {tag!r} for {name}: {problem}. {OFFLINE_HELP}")


def load_encoder(model: str, pretrained: str, device: str = "auto", seed: int = 0) -> Encoder:
    """Build the encoder; see the module docstring for what ``pretrained`` accepts."""
    import open_clip
    import torch

    from tmass.features.format import sha256_file

    name, config = register_model(model)
    device = resolve_device(device)
    sha256 = None
    if pretrained == NONE:
        weights = NONE
    elif pretrained == AUTO:
        try:
            fetch_pretrained(name, AUTO_TAG)
            weights = AUTO_TAG
        except EncoderError as exc:
            log.warning("--pretrained auto: %s weights not loadable (%s); using the %s", AUTO_TAG, exc, demo_encoder.LABEL)
            weights = str(demo_encoder.CHECKPOINT)
    elif Path(pretrained).is_file():
        weights = pretrained
    elif _looks_like_path(pretrained):
        raise EncoderError(f"checkpoint file {pretrained} does not exist. {OFFLINE_HELP}")
    else:
        fetch_pretrained(name, pretrained)
        weights = pretrained
    if weights == NONE:
        label = f"{name}, RANDOM-INIT (no pretrained knowledge)"
    elif Path(weights).is_file():
        sha256 = sha256_file(Path(weights))
        label = demo_encoder.label_of(Path(weights)) or f"{name}, checkpoint {Path(weights).name} (sha256 {sha256[:12]})"
        if label == demo_encoder.LABEL and name != demo_encoder.NAME:
            name, config = register_model(demo_encoder.NAME)
    else:
        label = f"{name}, open_clip pretrained weights {weights!r}"

    # Seeded so that every process (dask workers, a resumed run) builds identical random
    # weights; fork_rng keeps the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None if weights == NONE else weights, device=device)
    clip.eval()
    if weights == NONE:
        log.warning("RANDOM-INIT ENCODER %s (--pretrained %s): these features carry no pretrained knowledge", name, pretrained)
    size = clip.visual.preprocess_cfg["size"]
    return Encoder(
        model=clip,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        device=device,
        name=name,
        weights=weights,
        random_init=weights == NONE,
        embed_dim=int(config["embed_dim"]),
        logit_scale=float(clip.logit_scale.exp().item()),
        image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
        checkpoint_sha256=sha256,
        model_config=config,
        preprocess_cfg=dict(clip.visual.preprocess_cfg),
        label=label,
    )


_CACHE: dict[tuple, Encoder] = {}


def _file_state(path: str) -> tuple | None:
    """What changes when a file is replaced or rewritten in place (None: not a file)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def get_encoder(model: str, pretrained: str, device: str = "auto", seed: int = 0) -> Encoder:
    """:func:`load_encoder`, memoised per process: a dask worker loads its model once and
    reuses it for every partition it runs, until the checkpoint or model-config file
    changes on disk (a long-lived worker must not keep encoding with replaced weights)."""
    files = (_file_state(model), _file_state(pretrained))
    key = (model, pretrained, resolve_device(device), seed, files)
    if key not in _CACHE:
        encoder = load_encoder(model, pretrained, device, seed)
        # runners ask for what `auto` resolved to: the same model, not a second copy
        _CACHE[key] = _CACHE[(model, encoder.weights, *key[2:4], (files[0], _file_state(encoder.weights)))] = encoder
    return _CACHE[key]
