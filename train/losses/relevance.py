"""Pseudo labels: how relevant each video of a batch is to each caption, in [0, 1].

The listwise and continuous-label losses (``s-ndcg``, ``kendall``) rank a batch's videos
for a caption by relevance rather than by a binary match. By default the relevance comes
from the batch's own CLIP text embeddings (the shards' ``text_embedding``), as the RSC
module of the S-NDCG paper and BCLS's pseudo labels do: a video is partly relevant to a
caption that resembles one of its own captions.

    c[i, k]  = cos(t_i, t_k)                        caption-caption, ``[B, B]``
    c[i, j]  = max_{k: caption k shows video j} c[i, k]   a video by its best caption
    r[i, j]  = clamp((c[i, j] - floor) / (1 - floor), 0, 1), and 1 where positive

**Max, not mean, over a video's captions.** Column j's video is known through the
captions of it that the batch holds (usually one; on VATEX-like data often several).
The max makes a positive exactly 1 (caption i is one of its own video's captions) and
does not dilute a paraphrase match as more of the video's captions are drawn; the mean
would make a video's relevance depend on how many of its captions the batch happens to
hold.

**The floor.** CLIP text embeddings of unrelated captions are far from orthogonal
(cosines of 0.5 to 0.8 are common), so raw cosines would call every video half
relevant. Cosines at or below ``relevance_floor`` count as irrelevant, and the rest are
stretched linearly to [0, 1].

**A relevance file** (``--relevance FILE``) replaces the pseudo labels with a matrix a
user supplies: ``.npz`` with ``relevance`` ``[n_text, n_video]``, ``text_ids`` and
``video_ids``, or ``.npy`` holding the matrix with ``FILE.ids.json`` beside it
(``{"text_ids": [...], "video_ids": [...]}``, the layout ``tmass eval --save-sims``
writes). Every caption and video of the training split must be in it; values must be
finite and in [0, 1]. The positives stay 1 whatever the file says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tmass.train.config import Checked, setting
from tmass.train.data import Batch
from tmass.train.losses import Loss


@dataclass(frozen=True)
class PseudoLabelConfig(Checked):
    """The relevance settings every pseudo-label loss shares (one option each)."""

    relevance: str = setting(
        "", help="Relevance matrix file (.npz: relevance, text_ids, video_ids; .npy with FILE.ids.json) instead of "
                 "the pseudo labels from caption-caption similarity of the shards' text embeddings.")
    relevance_floor: float = setting(
        0.5, bounds="[0, 1)",
        help="Caption-caption cosine at or below which a video counts as irrelevant to a caption (pseudo labels).")


def caption_relevance(text: torch.Tensor, positives: torch.Tensor | None, floor: float) -> torch.Tensor:
    """Pseudo labels ``[B_text, B_video]`` in [0, 1] from a batch's CLIP text embeddings
    ``text`` ``[B, dim]`` and its ``positives`` ``[B, B]`` (see the module docstring; None
    when no two captions share a video: the identity); no gradient."""
    with torch.no_grad():
        text = F.normalize(text, dim=-1)
        cos = text @ text.T  # [B_text, B_text(caption k)]; caption k shows column k's video
        if positives is None:
            return cos.sub_(floor).div_(1.0 - floor).clamp_(0.0, 1.0).fill_diagonal_(1.0)
        # a video by its best caption: each caption's cosine into its video's first column
        # (a max), then back out to every column of that video
        first = first_column_of(positives).expand_as(cos)  # [B_text, B_video]
        cos = torch.full_like(cos, float("-inf")).scatter_reduce_(1, first, cos, "amax").gather(1, first)
        return cos.sub_(floor).div_(1.0 - floor).clamp_(0.0, 1.0).masked_fill_(positives, 1.0)


def first_column_of(positives: torch.Tensor) -> torch.Tensor:
    """``[B_video]`` int64 from a batch's positives ``[B, B]``: the first column showing
    each column's video (its own index for a video the batch holds once)."""
    return positives.to(torch.uint8).argmax(dim=0)  # argmax returns the first of equal maxima


def first_columns(positives: torch.Tensor) -> torch.Tensor:
    """``[B_video]`` bool from a batch's positives ``[B, B]``: the first column of each
    distinct video. Several captions of one video repeat its column; a list of videos for
    a caption keeps each video once."""
    first = first_column_of(positives)
    return first == torch.arange(len(first), device=first.device)


@dataclass
class BatchLists:
    """What a pseudo-label loss reads from a batch alone, made once per batch (T-MASS
    scores several text variants on one batch).

    ``positives`` ``[B, B]`` (the batch's) and ``videos`` (the columns of the distinct
    videos ``[n_distinct]``), both None when no two captions share a video;
    ``relevance`` ``[B_text, B_video]``; ``labels``: the loss's
    :meth:`PseudoLabelLoss.list_labels` of its lists."""

    positives: torch.Tensor | None
    relevance: torch.Tensor
    videos: torch.Tensor | None
    labels: object


def read_relevance(path: str) -> tuple[np.ndarray, list[str], list[str]]:
    """(matrix ``[n_text, n_video]``, text ids, video ids) of a relevance file; ValueError
    with one line naming the file and what is wrong."""
    file = Path(path)
    where = f"--relevance {file}"
    if not file.is_file():
        raise ValueError(f"{where}: no such file")
    try:
        if file.suffix == ".npz":
            with np.load(file, allow_pickle=False) as data:
                missing = [k for k in ("relevance", "text_ids", "video_ids") if k not in data]
                if missing:
                    raise ValueError(f"{where}: missing array {missing[0]!r}; an .npz holds relevance, text_ids, video_ids")
                matrix, text_ids, video_ids = data["relevance"], data["text_ids"].tolist(), data["video_ids"].tolist()
        elif file.suffix == ".npy":
            ids_file = file.with_suffix(".ids.json")
            if not ids_file.is_file():
                raise ValueError(f"{where}: no {ids_file.name} beside it (text_ids and video_ids)")
            ids = json.loads(ids_file.read_text())
            matrix, text_ids, video_ids = np.load(file, allow_pickle=False), ids.get("text_ids"), ids.get("video_ids")
            if not isinstance(text_ids, list) or not isinstance(video_ids, list):
                raise ValueError(f"{where}: {ids_file.name} needs lists text_ids and video_ids")
        else:
            raise ValueError(f"{where}: expected a .npz or .npy file")
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: cannot read ({exc})") from None
    if matrix.ndim != 2 or matrix.shape != (len(text_ids), len(video_ids)):
        raise ValueError(f"{where}: relevance has shape {matrix.shape}, expected [n_text, n_video] = "
                         f"[{len(text_ids)}, {len(video_ids)}] from its ids")
    for name, ids in (("text_ids", text_ids), ("video_ids", video_ids)):
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}: {name} repeat an id")
    if not np.issubdtype(matrix.dtype, np.number) or not np.isfinite(matrix).all() or matrix.min() < 0 or matrix.max() > 1:
        raise ValueError(f"{where}: relevance must be finite numbers in [0, 1]")
    return matrix.astype(np.float32), [str(t) for t in text_ids], [str(v) for v in video_ids]


class PseudoLabelLoss(Loss):
    """A loss that reads relevance ``[B_text, B_video]`` for its batch: from the
    captions, or from the relevance file (rows and columns picked by the batch's caption
    and video rows, mapped once in :meth:`prepare`)."""

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self._file = read_relevance(self.cfg.relevance) if self.cfg.relevance else None
        self._matrix = None  # [n_split_text, n_split_video], set by prepare
        self._last = None  # (batch, its relevance)

    def prepare(self, text_ids: list[str], video_ids: list[str]) -> None:
        if self._file is None:
            return
        matrix, file_text, file_video = self._file
        rows = {t: i for i, t in enumerate(file_text)}
        cols = {v: j for j, v in enumerate(file_video)}
        for kind, ids, known in (("caption", text_ids, rows), ("video", video_ids, cols)):
            missing = [i for i in ids if i not in known]
            if missing:
                raise ValueError(f"--relevance {self.cfg.relevance}: {len(missing)} training {kind} ids are not in it "
                                 f"(first: {missing[0]!r}); it needs a row per caption and a column per video")
        self._matrix = torch.from_numpy(matrix[np.ix_([rows[t] for t in text_ids], [cols[v] for v in video_ids])])

    def relevance(self, batch: Batch) -> torch.Tensor:
        """``[B_text, B_video]`` in [0, 1], 1 on the positives."""
        return self.of(batch).relevance

    def lists(self, batch: Batch, cos: torch.Tensor) -> tuple[torch.Tensor, object]:
        """The lists a listwise loss ranks, stacked: each caption's list of the batch's
        distinct videos, then each distinct video's list of the batch's captions. From
        cos ``[B_text, B_video]``: (scores ``[B_text + n_distinct, B]``, the lists'
        labels from :meth:`list_labels`, made once per batch)."""
        of = self.of(batch)
        return torch.cat([cos, cos.T if of.videos is None else cos.T.index_select(0, of.videos)]), of.labels

    def list_labels(self, relevance: torch.Tensor, valid: torch.Tensor | None) -> object:
        """What the loss reads from its lists besides their scores, from the lists'
        relevance ``[n_list, B]`` and valid items ``[n_list, B]`` bool (the items in each
        list; None: every item); once per batch. By default the two themselves."""
        return relevance, valid

    def of(self, batch: Batch) -> BatchLists:
        """What depends on the batch alone, computed once per batch."""
        if self._last is not None and self._last[0] is batch:
            return self._last[1]
        # the positives, where some video has two captions here (else the identity)
        positives = batch.positives if len(set(batch.video_rows.tolist())) < len(batch.video_rows) else None
        if self._file is None:
            relevance = caption_relevance(batch.text, positives, self.cfg.relevance_floor)
        elif self._matrix is None:
            raise ValueError(f"--relevance {self.cfg.relevance}: the loss was not prepared with the training split's ids")
        else:
            picked = self._matrix.to(batch.text.device)[batch.text_rows][:, batch.video_rows]
            relevance = picked.masked_fill(batch.positives if positives is None else positives, 1.0)
        if positives is None:
            videos, labels = None, self.list_labels(torch.cat([relevance, relevance.T]), None)
        else:
            first = first_columns(positives)
            videos = first.nonzero().squeeze(1)  # [n_distinct]
            valid = torch.cat([first.expand_as(positives), positives.new_ones(len(videos), len(first))])
            labels = self.list_labels(torch.cat([relevance, relevance.T.index_select(0, videos)]), valid)
        self._last = (batch, BatchLists(positives, relevance, videos, labels))
        return self._last[1]
