"""Training data on cached features: the validation hold-out and the per-epoch pair order.

A training example is one (caption, video) pair of the train split: caption i and video
``text_to_video[i]``. Everything stays in memory as stored (float16); a batch is cast to
float32 on the fly.

Several captions of one video in a batch: column j of a batch's videos is the video of
caption j, so a video appears once per caption of it. ``Batch.positives`` marks every
(caption, column) pair that shows the caption's own video; losses decide what to do
with the off-diagonal ones (see each loss's docstring).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tmass.features.format import SplitArrays, load_split
from tmass.train.heads.base import TOKEN_FIELDS, TextFeatures, VideoFeatures

_HASH_BYTES = 8  # of a video id's SHA-256, read as an integer in [0, 2**64)


def held_out_videos(video_ids: list[str], fraction: float) -> np.ndarray:
    """Boolean mask ``[n_video]``: the videos set aside for validation.

    A video is held out when the first 8 bytes of SHA-256(video id) fall below
    ``fraction`` of their range: deterministic, independent of shard order and of the
    other ids, and stable when the split grows (a video never changes side)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    threshold = int(fraction * 2 ** (8 * _HASH_BYTES))
    return np.array(
        [int.from_bytes(hashlib.sha256(v.encode("utf-8")).digest()[:_HASH_BYTES], "big") < threshold for v in video_ids],
        dtype=bool,
    )


def subset_videos(arrays: SplitArrays, keep: np.ndarray) -> SplitArrays:
    """The videos where ``keep`` ``[n_video]`` is True, with all their captions and
    ``text_to_video`` re-indexed. ``manifest_sha256`` stays the parent split's."""
    rows = np.flatnonzero(keep)
    new_row = np.full(len(keep), -1, dtype=np.int64)
    new_row[rows] = np.arange(len(rows))
    texts = np.flatnonzero(keep[arrays.text_to_video])
    return dataclasses.replace(
        arrays,
        video_ids=[arrays.video_ids[i] for i in rows],
        frames=arrays.frames[rows],
        frame_mask=arrays.frame_mask[rows],
        text_ids=[arrays.text_ids[i] for i in texts],
        captions=[arrays.captions[i] for i in texts],
        text_embeddings=arrays.text_embeddings[texts],
        text_to_video=new_row[arrays.text_to_video[texts]],
        token_embeddings=None if arrays.token_embeddings is None else arrays.token_embeddings[texts],
        token_mask=None if arrays.token_mask is None else arrays.token_mask[texts],
        patch_embeddings=None if arrays.patch_embeddings is None else arrays.patch_embeddings[rows],
    )


def split_validation(arrays: SplitArrays, fraction: float) -> tuple[SplitArrays, SplitArrays | None]:
    """(train, validation) from one split, holding out ``fraction`` of its videos with all
    their captions (see :func:`held_out_videos`); validation is None when fraction is 0."""
    if fraction == 0:
        return arrays, None
    held = held_out_videos(arrays.video_ids, fraction)
    if held.all() or not held.any():
        raise ValueError(
            f"validation fraction {fraction} holds out {int(held.sum())} of {len(held)} videos; "
            "choose a fraction that leaves both sides non-empty (or 0 to disable validation)"
        )
    return subset_videos(arrays, ~held), subset_videos(arrays, held)


def declared_only(arrays: SplitArrays, needs) -> SplitArrays:
    """``arrays`` without the token features that ``needs`` (a head's declared features,
    ``HeadSpec.features``) does not name, so that no hold-out, batch or evaluation of a
    frames-only head slices, copies or moves word and patch tokens (the largest arrays)
    it never reads. Applied wherever a run's data is assembled: ``train`` and the train
    bench (per head, on features loaded once)."""
    unread = [field for need in TOKEN_FIELDS.keys() - set(needs) for _, _, field in TOKEN_FIELDS[need]]
    return dataclasses.replace(arrays, **dict.fromkeys(unread, None))


def load_declared(split_dir, needs) -> SplitArrays:
    """The split ``split_dir`` with the token features ``needs`` (a head's declared
    features) names and no others: the rest are never read from disk, which
    :func:`declared_only` cannot spare a split already in memory (word and patch tokens of
    a full dataset are several GB)."""
    return load_split(split_dir, text_tokens="word_tokens" in needs, patches="patch_tokens" in needs)


class RowIds(Sequence):
    """The ids of ``rows`` (a tensor, possibly on a GPU), read to the host on first use:
    a batch's caption ids cost a device synchronisation only when a loss reads them."""

    def __init__(self, ids: list[str], rows: torch.Tensor):
        self._ids, self._rows, self._resolved = ids, rows, None

    def _list(self) -> list[str]:
        if self._resolved is None:
            self._resolved = [self._ids[r] for r in self._rows.tolist()]
        return self._resolved

    def __getitem__(self, index):
        return self._list()[index]

    def __len__(self) -> int:
        return len(self._rows)

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


def epoch_order(n_pairs: int, seed: int, epoch: int) -> torch.Tensor:
    """The pair order of one epoch, ``[n_pairs]`` int64: a permutation drawn from a
    generator seeded by (seed, epoch) alone, so a resumed run can rebuild any epoch's
    order without replaying the ones before it."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return torch.randperm(n_pairs, generator=generator)


@dataclass
class Batch:
    """B (caption, video) pairs: caption i with its own video, which is column i of the
    videos (so B_text = B_video = B).

    text_rows ``[B]`` int64: the captions' rows in the split; video_rows ``[B]`` int64:
    each caption's video row (``text_to_video[text_rows]``), repeated when captions share
    a video; text_ids: the B caption ids (:class:`RowIds` from :class:`PairData`);
    text ``[B, dim]``: CLIP text embeddings;
    frames ``[B, n_frames, dim]`` and frame_mask ``[B, n_frames]``: column i's video.
    Token features, when the split has them (None otherwise): tokens
    ``[B, n_token, dim]`` and token_mask ``[B, n_token]`` (caption i's words), patches
    ``[B, n_frames, n_patch, dim]`` (column i's video)."""

    text_rows: torch.Tensor
    video_rows: torch.Tensor
    text_ids: Sequence[str]
    text: torch.Tensor
    frames: torch.Tensor
    frame_mask: torch.Tensor
    tokens: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    patches: torch.Tensor | None = None

    def features(self) -> tuple[TextFeatures, VideoFeatures]:
        """The batch as a head's scoring reads it: B queries and the B videos of their columns."""
        return (TextFeatures(self.text, self.tokens, self.token_mask),
                VideoFeatures(self.frames, self.frame_mask, self.patches))

    @property
    def positives(self) -> torch.Tensor:
        """``[B_text, B_video]`` bool: caption i describes the video in column j. True on
        the diagonal, and off it wherever two captions of one video share the batch."""
        return self.video_rows[:, None] == self.video_rows[None, :]


class PairData:
    """One split's pairs as tensors on ``device`` (float16, as stored), moved there once:
    a batch is gathered on the device from device-side rows, with no host transfer and
    no synchronisation. Token features, when the split has them, stay the split's host
    arrays (they are the largest) and are sliced per batch (one transfer per step)."""

    def __init__(self, arrays: SplitArrays, device: torch.device | str = "cpu"):
        self.text = torch.as_tensor(arrays.text_embeddings, device=device)  # [n_text, dim]
        self.frames = torch.as_tensor(arrays.frames, device=device)  # [n_video, n_frames, dim]
        self.frame_mask = torch.as_tensor(arrays.frame_mask, device=device)  # [n_video, n_frames]
        self.text_to_video = torch.as_tensor(arrays.text_to_video, device=device)  # [n_text]
        self.text_ids = list(arrays.text_ids)
        self.video_ids = list(arrays.video_ids)
        self.tokens, self.token_mask, self.patches = arrays.token_embeddings, arrays.token_mask, arrays.patch_embeddings

    def __len__(self) -> int:
        return self.text.shape[0]

    @property
    def device(self) -> torch.device:
        return self.text.device

    def batch(self, rows: torch.Tensor) -> Batch:
        """The pairs of caption ``rows`` ``[B]`` (best on :attr:`device`), float32 embeddings."""
        rows = rows.to(self.text.device)
        videos = self.text_to_video[rows]

        def host(array, index):  # a token array's rows, float32 on the pairs' device
            if array is None:
                return None
            value = torch.from_numpy(array[index.cpu().numpy()]).to(self.text.device)
            return value.float() if value.is_floating_point() else value

        return Batch(
            text_rows=rows, video_rows=videos, text_ids=RowIds(self.text_ids, rows),
            text=self.text[rows].float(), frames=self.frames[videos].float(), frame_mask=self.frame_mask[videos],
            tokens=host(self.tokens, rows), token_mask=host(self.token_mask, rows), patches=host(self.patches, videos),
        )
