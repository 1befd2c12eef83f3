"""What every head shares: the features it is given, the scoring contract, the logit scale.

Axis names, used in every docstring of the heads and of ``tmass.evaluate``:

    n_text    captions (queries for text-to-video)
    n_video   videos
    n_frames  sampled frames per video
    n_token   word tokens per caption (padded; ``token_mask`` marks the real ones)
    n_patch   patch tokens per frame (a G x G grid, flattened)
    dim       CLIP embedding width

Every pairwise tensor is text-major, ``[n_text, n_video, ...]``, and so is every score
matrix. (X-Pool's own code returns its pooled videos as ``[n_video, n_text, dim]``; we
keep one orientation throughout, since mixing the two is how the official T-MASS
evaluator came to score text b against video i pooled on caption i.)

**The scoring contract.** ``head.score(text, video, eps=None)`` takes the features of
n_text queries (:class:`TextFeatures`) and of n_video videos (:class:`VideoFeatures`)
and returns scores ``[n_text, n_video]``, each a function of its own (text, video) pair
and the head's weights only: never of the other queries or videos it is batched with.
That is what makes a head leak-free, lets the evaluator score any chunk of pairs
(memory bounded by the chunk), and what ``tmass check-head`` verifies. A stochastic head
(``noise`` set) is also given ``eps`` ``[n_text, n_video, trials, noise.dim]``, drawn by
the evaluator as a function of (seed, text id, video id), and scores with those samples.
The same ``score`` is differentiable: the generic training loss is InfoNCE on it.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LOGIT_SCALE_MAX = 100.0  # CLIP's cap on exp(logit_scale); X-Pool and T-MASS keep it
PRIORS = ("uniform", "normal")


class _Features:
    """What TextFeatures and VideoFeatures share: dataclasses of tensors whose first axis
    is the item (query or video), sliced and moved together."""

    def __len__(self) -> int:
        return getattr(self, dataclasses.fields(self)[0].name).shape[0]

    def __getitem__(self, rows):
        """The items ``rows`` (a slice or an index tensor)."""
        return dataclasses.replace(self, **{name: value[rows] for name, value in self._tensors()})

    def to(self, device):
        """On ``device``, float tensors as float32 (masks stay bool)."""
        return dataclasses.replace(self, **{
            name: value.to(device, torch.float32) if value.is_floating_point() else value.to(device)
            for name, value in self._tensors()
        })

    def _tensors(self):
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


@dataclass
class TextFeatures(_Features):
    """The queries' features. embedding ``[n_text, dim]`` (every head); tokens
    ``[n_text, n_token, dim]`` and token_mask ``[n_text, n_token]`` (heads that declare
    ``word_tokens``; None otherwise)."""

    embedding: torch.Tensor
    tokens: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None


@dataclass
class VideoFeatures(_Features):
    """The videos' features. frames ``[n_video, n_frames, dim]`` and frame_mask
    ``[n_video, n_frames]`` (True: a real frame; None: all real); patches
    ``[n_video, n_frames, n_patch, dim]`` (heads that declare ``patch_tokens``)."""

    frames: torch.Tensor
    frame_mask: torch.Tensor | None = None
    patches: torch.Tensor | None = None


# feature a head may declare (tmass.train.registry.FEATURES) -> the SplitArrays fields
# (tmass.features.format) it reads, as (TextFeatures or VideoFeatures field, array) pairs
TOKEN_FIELDS = {
    "word_tokens": (("text", "tokens", "token_embeddings"), ("text", "token_mask", "token_mask")),
    "patch_tokens": (("video", "patches", "patch_embeddings"),),
}
_EXTRACT_OPTION = {"word_tokens": "--text-tokens", "patch_tokens": "--patch-grid G"}
_MANIFEST_FIELD = {"word_tokens": "text_tokens", "patch_tokens": "patch_grid"}  # FeatureMeta: set when extracted


def missing_tokens(need: str, heads: str | list[str] = "", fix: str = "", where=None) -> ValueError:
    """The one-line error for heads (a name or names) whose token feature ``need`` is
    missing (from the split ``where``, if given); ``fix`` replaces the default advice
    (the extract option that stores it)."""
    heads = [heads] if isinstance(heads, str) and heads else list(heads)
    who = (f"head {heads[0]} needs" if len(heads) == 1 else f"heads {', '.join(heads)} need" if heads
           else "the head needs")
    return ValueError(f"{who} {need.replace('_', ' ')}: {fix or f'extract with {_EXTRACT_OPTION[need]}'}"
                      + (f" ({where} has none)" if where is not None else ""))


def require_tokens(text: TextFeatures, video: VideoFeatures, needs, head: str = "") -> None:
    """ValueError, one line naming ``head``, the missing feature and the extract option,
    when ``text`` or ``video`` lack a token feature that ``needs`` (a head's declared
    features) names."""
    for need in sorted(set(needs) & set(TOKEN_FIELDS)):
        if any(getattr(text if side == "text" else video, name) is None for side, name, _ in TOKEN_FIELDS[need]):
            raise missing_tokens(need, head)


def unextracted(meta, needs) -> list[str]:
    """The token features ``needs`` (a head's declared features) names that a split
    lacks, read from its manifest alone (``meta``, its FeatureMeta: ``text_tokens``,
    ``patch_grid``), so that a command can refuse before it loads or writes anything."""
    return [need for need in sorted(set(needs) & set(TOKEN_FIELDS)) if not getattr(meta, _MANIFEST_FIELD[need])]


def require_extracted(meta, needs, head: str = "", where=None) -> None:
    """:func:`require_tokens` from a split's manifest alone (see :func:`unextracted`);
    the message names the split ``where``."""
    missing = unextracted(meta, needs)
    if missing:
        raise missing_tokens(missing[0], head, where=where)


def split_features(arrays, needs, head: str = "") -> tuple[TextFeatures, VideoFeatures]:
    """A split's (``tmass.features.format.SplitArrays``) features as a head reads them,
    as stored (float16 arrays become float16 tensors): the caption embeddings and frames
    always, and the token features ``needs`` (a head's declared features) names. A
    feature the split lacks is a ValueError that says how to extract it."""
    text = TextFeatures(torch.from_numpy(arrays.text_embeddings))
    video = VideoFeatures(torch.from_numpy(arrays.frames), torch.from_numpy(arrays.frame_mask))
    for need in set(needs) & set(TOKEN_FIELDS):
        for side, name, field in TOKEN_FIELDS[need]:
            value = getattr(arrays, field)
            setattr(text if side == "text" else video, name, None if value is None else torch.from_numpy(value))
    require_tokens(text, video, needs, head)
    return text, video


# Float32 values of one word-by-frame block (4 MiB): its temporaries stay in cache,
# where a pass over them costs a fraction of one in memory.
BLOCK_ELEMENTS = 2**20


def map_video_blocks(fn, n_video: int, per_video: int) -> list:
    """``fn(videos)`` for slices of ``n_video`` videos, each block about BLOCK_ELEMENTS
    values when a video contributes ``per_video`` (e.g. n_frames x n_text x n_token
    word-frame similarities; at least one video per block), results in order: how the
    heads that compare every word with every frame keep their temporaries in cache.

    Without gradients (evaluation) the blocks run on ``torch.get_num_threads()`` Python
    threads, each running torch on one thread: a block is a dozen short ops, and on
    torch's own threads as many OpenMP parallel regions, whose spinning barriers cost
    more than the ops on a loaded machine (ProTA at MSR-VTT 1k-A scale, 2 cores at load
    7: 29 CPU s and 62 s wall that way, 7 and 11 s this way). With gradients (training
    batches, usually one block) they run in order, on torch's threads."""
    step = max(1, BLOCK_ELEMENTS // max(per_video, 1))
    blocks = [slice(v, min(v + step, n_video)) for v in range(0, n_video, step)]
    threads = torch.get_num_threads()
    if len(blocks) == 1 or threads == 1 or torch.is_grad_enabled():
        return [fn(videos) for videos in blocks]

    def run(videos):
        with torch.no_grad():
            return fn(videos)

    torch.set_num_threads(1)  # new threads start with torch's thread count of the moment
    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(run, blocks))
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Noise:
    """What a stochastic head samples: ``dim`` values per (text, video, trial) from
    ``prior``: ``uniform`` U(0, 1) or ``normal`` N(0, std^2)."""

    prior: str
    std: float
    dim: int


def logit_scale_parameter(initial: float) -> nn.Parameter:
    """log exp(logit_scale), learnable, starting at ``initial`` capped at LOGIT_SCALE_MAX.
    Every head holds one named ``log_logit_scale`` (the trainer keeps it out of weight
    decay by that name); create it after the head's modules so that parameters keep the
    order they have always had."""
    return nn.Parameter(torch.tensor(math.log(min(initial, LOGIT_SCALE_MAX))))


class RetrievalHead(nn.Module):
    """Base class of every head: the config, the logit scale, the scoring contract (see
    the module doc). Subclasses implement :meth:`score`; stochastic ones return a
    :class:`Noise` from ``noise``."""

    log_logit_scale: nn.Parameter

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg

    @property
    def noise(self) -> Noise | None:
        """What the head samples at scoring time; None for a deterministic head."""
        return None

    @property
    def stochastic(self) -> bool:
        return self.noise is not None

    def score(self, text: TextFeatures, video: VideoFeatures, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``[n_text, n_video]``, each a function of its own pair (module doc)."""
        raise NotImplementedError

    def train_scores(self, text: TextFeatures, video: VideoFeatures) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training's view of one batch (B queries, the B videos of their columns): the
        cosine scores ``[B, B]`` the loss is applied to, and the head's own extra loss
        terms (named scalars, already weighted; a regulariser such as TC-MGC's SDR),
        which the generic training path adds to the total. Default: ``score``, none."""
        return self.score(text, video), {}

    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), a scalar tensor with its gradient (see :meth:`cap_logit_scale_`)."""
        return self.log_logit_scale.exp()

    @torch.no_grad()
    def cap_logit_scale_(self) -> None:
        """Clamp the scale at LOGIT_SCALE_MAX in place; the trainer calls it after each
        optimiser step. A clamp in the forward pass would zero the gradient at the cap,
        and float32(log 100) lies a hair above log 100, so a scale starting at CLIP's 100
        would never move."""
        self.log_logit_scale.clamp_(max=math.log(LOGIT_SCALE_MAX))

    def sample_noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """eps from the head's prior, ``shape`` e.g. ``[n, dim]`` (training; the evaluator
        draws keyed noise instead)."""
        if self.noise.prior == "uniform":
            return torch.rand(shape, generator=generator, device=device)
        return torch.randn(shape, generator=generator, device=device) * self.noise.std
