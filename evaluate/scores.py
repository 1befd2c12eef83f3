"""Leak-free T-MASS inference: the score s(t, v) of every caption t against every video v.

For a T-MASS head (paper Eq. 5-10):

    p(v|t) = X-Pool pooling of v's frames conditioned on t             [n_text, n_video, dim]
    r(t,v) = exp(R(S(t, v))), S = cosine of t with each frame of v      [n_text, n_video, dim]
    s(t,v) = max_m cos(t + eps_m(t, v) * r(t, v), p(v|t))              [n_text, n_video]

with ``trials`` = M draws of eps from the head's prior; M = 0 is "w/o sampling":
s = cos(t, p(v|t)). X-Pool heads use s = cos(t, p(v|t)), meanP s = cos(t, mean frame).

**Leak-free by construction.** Every quantity above is computed from t, v and the
head's weights, never from another caption or video, and eps is a pure function of
(seed, t's id, v's id) (see :mod:`tmass.evaluate.sampling`). So the query and gallery sizes
are independent, a permuted gallery permutes the columns and nothing else, and chunking
does not change a score. The tests check all three.

**Audit mode** (``protocol="reference"``) reproduces the official T-MASS evaluator so a
user can measure its leak on their own features. There, the trial is chosen against
p(v|t), but caption k of any video (k counting each video's captions in query order) is
scored as cos(t*, p(v|t_{v,k})) with t_{v,k} *v's own k-th caption*: every query is
compared with a video already pooled towards the right answer. Where v has no k-th
caption the reference's padding makes the score undefined; it is NaN here too, and the
metrics treat it as the reference does (:mod:`tmass.evaluate.metrics`). On
structureless random features this alone lifts R@1 far above chance.

Two implementations share the noise and are tested equal:

* ``naive``: the head's own ``score`` on [n_text, n_video, ...] chunks and the sampled
  texts materialised as ``[n_text, n_video, trials, dim]``: the reference, kept simple.
  It is the generic path: every registered head is scored this way unless it offers a
  fast path (``HeadSpec.fast_paths``).
* ``fast``: for heads offering ``folded-xpool`` (X-Pool, T-MASS), on CPU, X-Pool's out_proj, LayerNorm affine and residual linear commute
  with the attention-weighted sum over frames, so the dim x dim products are applied
  once per frame, not once per pair (:class:`FoldedXPool`). Per pair only the attention
  weights (one GEMM for all pairs), two weighted sums over frames, O(n_frames * dim), and
  the sampling, O(trials * dim), remain; a fused numba kernel does both without ever
  materialising pooled videos or eps. On CUDA the head's own forward pass is already
  fast; there ``fast`` means large chunks with materialised eps.

Memory is bounded by ``chunk_pairs`` text-video pairs at a time, never by
n_text x n_video x dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tmass.evaluate.metrics import caption_slots, dual_softmax, reference_dual_softmax, retrieval_metrics
from tmass.evaluate.sampling import NOISE_MODES, KernelInputs, id_keys, keyed_noise, pool_and_score
from tmass.features.format import SplitArrays
from tmass.train.folded import fold_frames
from tmass.train.heads import RetrievalHead, TextFeatures, VideoFeatures, XPoolFusion, frame_similarity, sample_scores
from tmass.train.heads.base import split_features
from tmass.train.registry import head_spec
from tmass.train.trainer import resolve_device

PROTOCOLS = ("leak-free", "reference")
PATHS = ("fast", "naive")


@dataclass
class EvalConfig:
    """Inference settings. Defaults are the paper's (M = 20 trials, fresh noise)."""

    trials: int = 20
    seed: int = 0
    protocol: str = "leak-free"  # leak-free | reference (audit of the official evaluator)
    noise: str = "fresh"  # fresh: eps per (t, v, m), as in the paper; shared: eps per (t, m)
    path: str = "fast"  # fast | naive (the reference implementation)
    chunk_pairs: int = 16384  # text-video pairs held at once: bounds memory
    device: str = "auto"  # auto | cpu | cuda[:N]
    progress: bool = True

    def __post_init__(self):
        for name, allowed in (("protocol", PROTOCOLS), ("noise", NOISE_MODES), ("path", PATHS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.trials < 0:
            raise ValueError("trials must be >= 0")


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


class FoldedXPool:
    """X-Pool on a fixed gallery, folded for the CPU kernel.

    out_proj, the LayerNorm affine and the residual linear commute with the attention-
    weighted sum over frames, so they are applied once per frame
    (:func:`tmass.train.folded.fold_frames`, the same folding training uses); per pair
    only the attention logits (one GEMM per chunk, here) and two weighted sums over
    frames remain (in :func:`tmass.evaluate.sampling.pool_and_score`). The tests hold
    the result equal to ``XPoolFusion.forward``."""

    def __init__(self, fusion: XPoolFusion, frames: torch.Tensor):
        """frames ``[n_video, n_frames, dim]``."""
        self.fusion = fusion
        n_video, n_frames, _ = frames.shape
        heads, head_dim = fusion.num_heads, fusion.head_dim
        # head-major keys [heads, n_video, n_frames, head_dim]: a chunk's logits are one
        # strided GEMM per head, with no copy of the keys
        normed = fusion.norm_in(frames)
        self.keys = fusion.k_proj(normed).view(n_video, n_frames, heads, head_dim).permute(2, 0, 1, 3).contiguous()
        folded = fold_frames(fusion, frames)
        self.u, self.z = folded.u, folded.z
        self.consts = torch.stack((
            folded.bias, folded.lin_bias, folded.lin_shift,
            fusion.norm_attn.weight, fusion.norm_attn.bias, fusion.norm_out.weight, fusion.norm_out.bias,
        ))  # [7, dim], the order pool_and_score reads them in

    def logits(self, text: torch.Tensor, videos: slice) -> torch.Tensor:
        """Scaled dot products of each text's query with each frame's key, one GEMM per
        head: text ``[n_text, dim]`` -> ``[heads, n_text, n_video_chunk * n_frames]``
        (the masked softmax over frames happens in the kernel)."""
        fusion = self.fusion
        heads, _, _, head_dim = self.keys.shape
        q = fusion.q_proj(fusion.norm_in(text)).view(len(text), heads, head_dim).transpose(0, 1)  # [heads, n_text, head_dim]
        keys = self.keys[:, videos].flatten(1, 2)  # [heads, n_vc*n_frames, head_dim]
        return q @ keys.transpose(1, 2) / head_dim**0.5


VIDEOS_PER_CHUNK = 256  # tiles of many texts x some videos keep the logits GEMM well-shaped


def _chunks(n_text: int, n_video: int, chunk_pairs: int):
    video_step = max(1, min(n_video, chunk_pairs, VIDEOS_PER_CHUNK))
    text_step = max(1, chunk_pairs // video_step)
    for v0 in range(0, n_video, video_step):
        for t0 in range(0, n_text, text_step):
            yield slice(t0, min(t0 + text_step, n_text)), slice(v0, min(v0 + video_step, n_video))


def own_caption_index(text_to_video: np.ndarray, n_video: int) -> np.ndarray:
    """For the audit protocol: the query row of each video's k-th caption,
    ``[n_video, n_slot]`` with n_slot the most captions of any video, -1 where a video has
    fewer (k as in :func:`tmass.evaluate.metrics.caption_slots`)."""
    text_to_video = np.asarray(text_to_video)
    slots = caption_slots(text_to_video)
    own = np.full((n_video, int(slots.max(initial=0)) + 1), -1, dtype=np.int64)
    own[text_to_video, slots] = np.arange(len(text_to_video))
    if (own[:, 0] < 0).any():
        raise ValueError(
            f"the reference protocol needs a caption for every gallery video; {int((own[:, 0] < 0).sum())} have none"
        )
    return own


def score_matrix(
    head: RetrievalHead,
    text: torch.Tensor,
    text_ids: list[str],
    frames: torch.Tensor,
    frame_mask: torch.Tensor | None,
    video_ids: list[str],
    config: EvalConfig,
    text_to_video: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`score_features` for a head that reads caption embeddings and frames only:
    text ``[n_text, dim]``, frames ``[n_video, n_frames, dim]``, frame_mask
    ``[n_video, n_frames]`` -> ``[n_text, n_video]`` float32."""
    return score_features(head, TextFeatures(text), text_ids, VideoFeatures(frames, frame_mask), video_ids, config,
                          text_to_video)


@torch.inference_mode()
def score_features(
    head: RetrievalHead,
    text_features: TextFeatures,
    text_ids: list[str],
    video_features: VideoFeatures,
    video_ids: list[str],
    config: EvalConfig,
    text_to_video: np.ndarray | None = None,
) -> np.ndarray:
    """Scores of every query against every gallery video: ``[n_text, n_video]`` float32
    (rows in ``text_ids`` order, columns in ``video_ids`` order).

    Pairs are scored a chunk at a time (at most ``config.chunk_pairs``) by the head's
    own ``score`` (the generic path), or by a fast path the head offers: on CPU, heads
    offering ``folded-xpool`` run the fused numba kernel. ``text_to_video`` ``[n_text]``
    is only used by the audit protocol (X-Pool family heads only), to find each video's
    own captions; there a score is NaN where the video has no caption in the query's slot
    (see the module docstring).
    """
    device = resolve_device(config.device)
    head = head.to(device).eval()
    text_features, video_features = text_features.to(device), video_features.to(device)
    text, frames, frame_mask = text_features.embedding, video_features.frames, video_features.frame_mask
    n_text, n_video = len(text), len(frames)
    if len(text_ids) != n_text or len(video_ids) != n_video:
        raise ValueError("ids and embeddings disagree in length")

    sampling = head.stochastic and config.trials > 0
    noise = head.noise
    text_keys, video_keys = id_keys(text_ids), id_keys(video_ids)

    own_pooled = None  # [n_video, n_slot, dim]: video v pooled on its own k-th caption (audit only)
    if config.protocol == "reference":
        if text_to_video is None:
            raise ValueError("the reference protocol needs text_to_video")
        if not hasattr(head, "pool"):
            raise ValueError(f"the reference protocol audits heads that pool a video per caption (X-Pool, T-MASS); "
                             f"{head.cfg.head} does not")
        own_index = own_caption_index(text_to_video, n_video)  # [n_video, n_slot]
        slots = caption_slots(text_to_video)  # [n_text]
        own_pooled = torch.zeros(n_video, own_index.shape[1], text.shape[1], device=device)
        for v, rows in enumerate(own_index):
            rows = torch.from_numpy(rows[rows >= 0]).to(device)
            own_pooled[v, : len(rows)] = head.pool(
                text[rows], frames[v : v + 1], None if frame_mask is None else frame_mask[v : v + 1])[:, 0]

    # The CPU fast path folds X-Pool's video side once; on CUDA the head's own forward
    # pass is fast enough and the sampling runs with materialised eps.
    folded = None
    if config.path == "fast" and device.type == "cpu" and "folded-xpool" in head_spec(head.cfg.head).fast_paths:
        folded = FoldedXPool(head.pooling, frames)

    # S(t, v) in the fast path: unit frames once per gallery, one GEMM per chunk
    unit_frames = F.normalize(frames, dim=-1) if sampling and folded is not None else None

    scores = np.empty((n_text, n_video), dtype=np.float32)
    chunk_pairs = config.chunk_pairs
    if sampling and folded is None:
        chunk_pairs = max(1, chunk_pairs // config.trials)  # eps is materialised there
    bar = tqdm(total=n_text * n_video, unit="pair", unit_scale=True, desc=f"score ({config.path})",
               disable=not config.progress)
    for ts, vs in _chunks(n_text, n_video, chunk_pairs):
        t, f = text[ts], frames[vs]
        m = frame_mask[vs] if frame_mask is not None else None
        own = own_pooled[vs] if own_pooled is not None else None  # [n_vc, n_slot, dim]
        eps = None  # [n_tc, n_vc, trials, noise.dim], keyed by the pairs' ids
        if sampling and folded is None:
            eps = keyed_noise(text_keys[ts], video_keys[vs], config.seed, config.trials, noise.dim,
                              noise.prior, noise.std, device, noise=config.noise)
        if folded is not None:
            radius = None  # exp(R): [n_tc, n_vc, dim or 1]
            if sampling:
                sims = (F.normalize(t, dim=-1) @ unit_frames[vs].flatten(0, 1).T).view(len(t), len(f), -1)
                radius = head.radius(sims if m is None else sims * m).exp_()  # = frame_similarity(t, f, m)
            inputs = KernelInputs(
                text=t.numpy(), logits=folded.logits(t, vs).numpy(),
                frame_mask=(m if m is not None else torch.ones(f.shape[:2], dtype=torch.bool)).numpy(),
                u=folded.u[vs].numpy(), z=folded.z[vs].numpy(), consts=folded.consts.numpy(),
                eps_attn=head.pooling.norm_attn.eps, eps_out=head.pooling.norm_out.eps,
                text_keys=text_keys[ts], video_keys=video_keys[vs],
                seed=config.seed, trials=config.trials, prior_std=noise.std if sampling else 1.0,
                radius=radius.expand(-1, -1, t.shape[1]).numpy() if sampling else None,
                own=own.numpy() if own is not None else None, own_slot=slots[ts] if own is not None else None,
            )
            chunk = torch.from_numpy(pool_and_score(inputs, prior=noise.prior if sampling else "uniform",
                                                    noise=config.noise))
        elif own is not None:  # audit: scored against the video pooled on its own caption
            own = own[:, torch.from_numpy(slots[ts]).to(device)].transpose(0, 1)  # [n_tc, n_vc, dim]
            if not sampling:
                chunk = _cos(t[:, None, :], own)
            else:
                radius = head.radius(frame_similarity(t, f, m)).exp()
                chunk = sample_scores(t, radius, head.pool(t, f, m), eps, own)
        else:  # the generic path: the head's own scoring of this chunk of pairs
            chunk = head.score(text_features[ts], video_features[vs], eps)
        scores[ts, vs] = chunk.float().cpu().numpy()
        bar.update((ts.stop - ts.start) * (vs.stop - vs.start))
    bar.close()
    if own_pooled is not None:
        scores[(own_index[:, slots] < 0).T] = np.nan  # v has no caption in t's slot
    return scores


def score_split(head: RetrievalHead, arrays: SplitArrays, config: EvalConfig) -> np.ndarray:
    """Every caption of a split against every video of it: ``[n_text, n_video]``, rows and
    columns in shard order. The head is given the features it declares (registry)."""
    text, video = split_features(arrays, head_spec(head.cfg.head).features)
    return score_features(head, text, arrays.text_ids, video, arrays.video_ids, config, text_to_video=arrays.text_to_video)


def metrics_report(scores: np.ndarray, text_to_video: np.ndarray, config: EvalConfig, directions: str = "both", dsl: bool = False) -> dict:
    """Metrics plus the labels every output carries (protocol, trials, noise, seed).
    With ``dsl`` the DSL-re-weighted metrics are added under ``"dsl"``, labelled
    transductive, beside (never instead of) the plain ones."""
    report = retrieval_metrics(scores, text_to_video, directions, config.protocol)
    if dsl and config.protocol == "reference":
        report["dsl"] = {
            "note": "transductive, as the reference computes it: a softmax over the k-th captions of all videos",
            **retrieval_metrics(reference_dual_softmax(scores, text_to_video), text_to_video, directions, config.protocol),
        }
    elif dsl:
        report["dsl"] = {
            "note": "transductive: DSL re-weights each score by a softmax over all queries at once",
            **retrieval_metrics(dual_softmax(scores), text_to_video, directions),
        }
    report.update(
        protocol=config.protocol if config.protocol == "leak-free" else "reference (AUDIT: leaks ground truth)",
        trials=config.trials,
        noise=config.noise,
        seed=config.seed,
    )
    return report


def evaluate_head(head: RetrievalHead, arrays: SplitArrays, config: EvalConfig | None = None, directions: str = "both", dsl: bool = False) -> dict:
    """Retrieval metrics of ``head`` on a split (see :func:`metrics_report`)."""
    config = config or EvalConfig()
    return metrics_report(score_split(head, arrays, config), arrays.text_to_video, config, directions, dsl)
