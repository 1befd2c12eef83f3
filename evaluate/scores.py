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

Three paths share the noise and are tested equal (``EvalConfig.path``):

* ``naive``: the head's own ``score`` on [n_text, n_video, ...] chunks and the sampled
  texts materialised as ``[n_text, n_video, trials, dim]``: the reference, kept simple.
  It is the generic path: every registered head is scored this way unless it offers a
  fast path (``HeadSpec.fast_paths``).
* ``torch`` (any device), for heads offering ``folded-xpool`` (X-Pool, T-MASS): X-Pool's
  out_proj, LayerNorm affine and residual linear commute with the attention-weighted
  sum over frames, so the dim x dim products are applied once per frame, not once per
  pair (:class:`FoldedXPool`). Per pair only the attention weights (one GEMM per chunk),
  two weighted sums over frames (batched GEMMs, :func:`tmass.train.folded.pool_folded`)
  and the sampling remain; eps is drawn by :func:`tmass.evaluate.sampling.keyed_noise`,
  the same bits as the numba kernel's, so CPU and CUDA scores agree. Other heads are
  scored by their own ``score``, chunks sized the same way.
* ``fast``: on CPU the fused numba kernel (:func:`tmass.evaluate.sampling.pool_and_score`:
  the same folding, and neither pooled videos nor eps ever exist in memory); on any other
  device the ``torch`` path. So ``fast``, the default, is the torch scorer on CUDA.

Memory: pairs are scored a chunk at a time, and a chunk holds as many pairs as
``EvalConfig.memory_gb`` allows by an estimate of each path's working set per pair
(:func:`chunk_size`), never n_text x n_video x dim: the torch and naive paths hold
``[pairs, trials, dim]`` eps per chunk, the numba kernel none.
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
from tmass.train.folded import FoldedFrames, fold_frames, fold_values, pool_folded
from tmass.train.heads import RetrievalHead, TextFeatures, VideoFeatures, XPoolFusion, frame_similarity, sample_scores
from tmass.train.heads.base import split_features
from tmass.train.registry import head_spec
from tmass.train.trainer import resolve_device

PROTOCOLS = ("leak-free", "reference")
PATHS = ("fast", "torch", "naive")
CPU_MEMORY_GB = 2.0  # a chunk's working memory on a CPU when EvalConfig.memory_gb is None
CUDA_MEMORY_SHARE = 0.5  # ... and on CUDA: this share of the device's free memory
# A chunk's working set per pair, in bytes, for sizing chunks (chunk_size): float32
# vectors of width dim alive at once (pooled video, residual, radius, their products),
# and per eps element (trial x coordinate) Philox's int64 words and temporaries (about
# six 8-byte words per 4-element block at once) plus the sampled texts and their cosines.
PAIR_VECTORS = 16
EPS_BYTES = 48


@dataclass
class EvalConfig:
    """Inference settings. Defaults are the paper's (M = 20 trials, fresh noise)."""

    trials: int = 20
    seed: int = 0
    protocol: str = "leak-free"  # leak-free | reference (audit of the official evaluator)
    noise: str = "fresh"  # fresh: eps per (t, v, m), as in the paper; shared: eps per (t, m)
    path: str = "fast"  # fast (numba kernel on CPU, torch elsewhere) | torch | naive (the reference)
    memory_gb: float | None = None  # a chunk's working memory; None: CPU_MEMORY_GB, or a share of free CUDA memory
    chunk_pairs: int | None = None  # at most this many pairs at once (checks); None: as many as memory_gb holds
    device: str = "auto"  # auto | cpu | cuda[:N]
    progress: bool = True

    def __post_init__(self):
        for name, allowed in (("protocol", PROTOCOLS), ("noise", NOISE_MODES), ("path", PATHS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.trials < 0:
            raise ValueError("trials must be >= 0")
        if self.memory_gb is not None and self.memory_gb <= 0:
            raise ValueError("memory_gb must be > 0")
        if self.chunk_pairs is not None and self.chunk_pairs < 1:
            raise ValueError("chunk_pairs must be >= 1")


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


class FoldedXPool:
    """X-Pool on a fixed gallery, folded for the fused scorers (numba kernel, torch).

    out_proj, the LayerNorm affine and the residual linear commute with the attention-
    weighted sum over frames, so they are applied once per frame
    (:func:`tmass.train.folded.fold_frames`, the same folding training uses); per pair
    only the attention logits (one GEMM per chunk, here) and two weighted sums over
    frames remain (:func:`tmass.evaluate.sampling.pool_and_score` on CPU, :meth:`pool`
    anywhere). The tests hold the result equal to ``XPoolFusion.forward``."""

    def __init__(self, fusion: XPoolFusion, frames: torch.Tensor):
        """frames ``[n_video, n_frames, dim]``."""
        self.fusion = fusion
        n_video, n_frames, _ = frames.shape
        heads, head_dim = fusion.num_heads, fusion.head_dim
        # head-major keys [heads, n_video, n_frames, head_dim]: a chunk's logits are one
        # strided GEMM per head, with no copy of the keys
        normed = fusion.norm_in(frames)
        self.keys = fusion.k_proj(normed).view(n_video, n_frames, heads, head_dim).permute(2, 0, 1, 3).contiguous()
        self._set_folded(fold_frames(fusion, frames))

    def _set_folded(self, folded: FoldedFrames) -> None:
        fusion = self.fusion
        self.folded, self.u, self.z = folded, folded.u, folded.z
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

    def pool(self, text: torch.Tensor, videos: slice, frame_mask: torch.Tensor | None) -> torch.Tensor:
        """p(v|t) in torch: text ``[n_text, dim]``, the gallery chunk ``videos`` and its
        frame_mask ``[n_vc, n_frames]`` -> pooled ``[n_text, n_vc, dim]``."""
        heads, _, n_frames, _ = self.keys.shape
        logits = self.logits(text, videos).view(heads, len(text), -1, n_frames)  # [heads, n_text, n_vc, n_frames]
        if frame_mask is not None:
            logits = logits.masked_fill(~frame_mask, float("-inf"))
        weights = logits.softmax(dim=-1).permute(1, 2, 0, 3).flatten(2)  # [n_text, n_vc, heads*n_frames]
        return pool_folded(self.fusion, weights, self.folded[videos])

    def kernel_mask(self, frames: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        """The kernel's frame mask of a gallery chunk: frames ``[n_vc, n_frames, dim]`` ->
        ``[n_vc, n_frames]`` bool."""
        return frame_mask if frame_mask is not None else torch.ones(frames.shape[:2], dtype=torch.bool)


class OneTextXPool(FoldedXPool):
    """X-Pool for one text against a few videos (a search's K candidates), folded per
    (text, video) pair instead of per frame.

    :class:`FoldedXPool` projects every frame of the gallery (keys, values, out_proj,
    linear_proj): the right trade for many texts, but with one text it is n_frames times
    the work of projecting once per pair, and it dominated a search query. Here the key
    projection is folded into the query, q . (W_k LN(f) + b_k) = (W_k^T q) . LN(f) + q . b_k
    (q . b_k is the same for every frame, so the softmax over frames drops it), so frames
    are only LayerNormed; and the value projection commutes with the
    attention-weighted sum over frames (the weights sum to 1), so each video's weighted
    mean of LN(f) is projected once per head. Each video then folds
    (:func:`tmass.train.folded.fold_values`) as one "frame" per head whose softmax
    weight is 1, and the scorers finish as for a gallery. Every value is a function of
    the text and that one video, so scores stay chunk- and gallery-independent."""

    def __init__(self, fusion: XPoolFusion, text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor | None):
        """text ``[1, dim]``, frames ``[n_video, n_frames, dim]``, frame_mask ``[n_video, n_frames]``."""
        self.fusion = fusion
        heads, head_dim, dim = fusion.num_heads, fusion.head_dim, frames.shape[2]
        normed = fusion.norm_in(frames)  # [n_video, n_frames, dim]
        q = fusion.q_proj(fusion.norm_in(text)).view(heads, head_dim)
        query_keys = torch.einsum("hc,hcd->dh", q, fusion.k_proj.weight.view(heads, head_dim, dim))  # [dim, heads]
        logits = normed @ query_keys / head_dim**0.5
        if frame_mask is not None:  # logits [n_video, n_frames, heads]
            logits = logits.masked_fill(~frame_mask[..., None], float("-inf"))
        mixed = torch.einsum("vfh,vfd->vhd", logits.softmax(dim=1), normed)  # [n_video, heads, dim]
        values = torch.einsum("vhd,hcd->vhc", mixed, fusion.v_proj.weight.view(heads, head_dim, dim))
        self._set_folded(fold_values(fusion, (values + fusion.v_proj.bias.view(heads, head_dim))[:, None]))

    def logits(self, text: torch.Tensor, videos: slice) -> torch.Tensor:
        """Zeros ``[heads, 1, n_video_chunk]``: the attention is inside ``u`` and ``z``."""
        return torch.zeros(self.fusion.num_heads, len(text), len(self.u[videos]), device=self.u.device)

    def pool(self, text: torch.Tensor, videos: slice, frame_mask: torch.Tensor | None) -> torch.Tensor:
        """p(v|t) ``[1, n_vc, dim]`` (frame_mask is already in ``u`` and ``z``)."""
        folded = self.folded[videos]
        return pool_folded(self.fusion, torch.ones(len(text), len(folded.u), self.fusion.num_heads, device=folded.u.device),
                           folded)

    def kernel_mask(self, frames: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        return torch.ones((len(frames), 1), dtype=torch.bool, device=frames.device)


VIDEOS_PER_CHUNK = 256  # tiles of many texts x some videos keep the logits GEMM well-shaped


def memory_budget(config: EvalConfig, device: torch.device) -> int:
    """Bytes a chunk may hold (``config.memory_gb``, or its default for ``device``)."""
    if config.memory_gb is not None:
        return int(config.memory_gb * 2**30)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * CUDA_MEMORY_SHARE)
    return int(CPU_MEMORY_GB * 2**30)


def chunk_size(config: EvalConfig, device: torch.device, dim: int, n_mix: int, eps_trials: int) -> int:
    """Pairs per chunk: as many as the memory budget holds at PAIR_VECTORS vectors of
    width dim, three attention rows of ``n_mix`` (heads x frames) and ``eps_trials``
    materialised trials (EPS_BYTES per element) per pair, at most ``config.chunk_pairs``."""
    per_pair = 4 * (PAIR_VECTORS * dim + 3 * n_mix) + EPS_BYTES * eps_trials * dim
    pairs = max(1, memory_budget(config, device) // per_pair)
    return min(pairs, config.chunk_pairs) if config.chunk_pairs else pairs


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

    Pairs are scored a chunk at a time (sized by :func:`chunk_size`) by the head's own
    ``score`` (the generic path), or, for heads offering ``folded-xpool``, by the fused
    numba kernel (``fast`` on CPU) or the torch scorer (``torch``, and ``fast`` on other
    devices). Scores stay on the device until the end: one copy to the host, no
    synchronisation per chunk. ``text_to_video`` ``[n_text]``
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

    # The fused scorers fold X-Pool's video side once: the numba kernel (fast on CPU)
    # or torch (torch anywhere, fast off the CPU); other heads score themselves
    folded_path = config.path != "naive" and "folded-xpool" in head_spec(head.cfg.head).fast_paths
    kernel = folded_path and config.path == "fast" and device.type == "cpu"
    folded = None
    if folded_path:  # one text (a search query): fold per pair, else per frame of the gallery
        one_text = n_text == 1 and own_pooled is None
        folded = OneTextXPool(head.pooling, text, frames, frame_mask) if one_text else FoldedXPool(head.pooling, frames)

    # S(t, v) in the fused paths: unit frames once per gallery, one GEMM per chunk
    unit_frames = F.normalize(frames, dim=-1) if sampling and folded is not None else None

    n_mix = getattr(getattr(head, "pooling", None), "num_heads", 1) * frames.shape[1]
    eps_trials = config.trials if sampling and not kernel else 0  # eps materialised per chunk
    chunk_pairs = chunk_size(config, device, text.shape[1], n_mix, eps_trials)
    scores = torch.empty((n_text, n_video), device=device)
    bar = tqdm(total=n_text * n_video, unit="pair", unit_scale=True, desc=f"score ({config.path})",
               disable=not config.progress)
    for ts, vs in _chunks(n_text, n_video, chunk_pairs):
        t, f = text[ts], frames[vs]
        m = frame_mask[vs] if frame_mask is not None else None
        own = own_pooled[vs] if own_pooled is not None else None  # [n_vc, n_slot, dim]
        if own is not None and not kernel:  # audit: each text's slot, [n_tc, n_vc, dim]
            own = own[:, torch.from_numpy(slots[ts]).to(device)].transpose(0, 1)
        eps = None  # [n_tc, n_vc, trials, noise.dim], keyed by the pairs' ids
        if sampling and not kernel:
            eps = keyed_noise(text_keys[ts], video_keys[vs], config.seed, config.trials, noise.dim,
                              noise.prior, noise.std, device, noise=config.noise)
        radius = None  # exp(R): [n_tc, n_vc, dim or 1]
        if sampling and folded is not None:
            sims = (F.normalize(t, dim=-1) @ unit_frames[vs].flatten(0, 1).T).view(len(t), len(f), -1)
            radius = head.radius(sims if m is None else sims * m).exp_()  # = frame_similarity(t, f, m)
        if kernel:
            inputs = KernelInputs(
                text=t.numpy(), logits=folded.logits(t, vs).numpy(),
                frame_mask=folded.kernel_mask(f, m).numpy(),
                u=folded.u[vs].numpy(), z=folded.z[vs].numpy(), consts=folded.consts.numpy(),
                eps_attn=head.pooling.norm_attn.eps, eps_out=head.pooling.norm_out.eps,
                text_keys=text_keys[ts], video_keys=video_keys[vs],
                seed=config.seed, trials=config.trials, prior_std=noise.std if sampling else 1.0,
                radius=radius.expand(-1, -1, t.shape[1]).numpy() if sampling else None,
                own=own.numpy() if own is not None else None, own_slot=slots[ts] if own is not None else None,
            )
            chunk = torch.from_numpy(pool_and_score(inputs, prior=noise.prior if sampling else "uniform",
                                                    noise=config.noise))
        elif folded is not None or own is not None:
            pooled = folded.pool(t, vs, m) if folded is not None else head.pool(t, f, m)  # [n_tc, n_vc, dim]
            if not sampling:
                chunk = _cos(t[:, None, :], pooled if own is None else own)
            else:
                if radius is None:
                    radius = head.radius(frame_similarity(t, f, m)).exp()
                chunk = sample_scores(t, radius, pooled, eps, own)
        else:  # the generic path: the head's own scoring of this chunk of pairs
            chunk = head.score(text_features[ts], video_features[vs], eps)
        scores[ts, vs] = chunk
        bar.update((ts.stop - ts.start) * (vs.stop - vs.start))
    bar.close()
    scores = scores.cpu().numpy()
    if own_pooled is not None:
        scores[(own_index[:, slots] < 0).T] = np.nan  # v has no caption in t's slot
    return scores


def score_split(head: RetrievalHead, arrays: SplitArrays, config: EvalConfig) -> np.ndarray:
    """Every caption of a split against every video of it: ``[n_text, n_video]``, rows and
    columns in shard order. The head is given the features it declares (registry)."""
    text, video = split_features(arrays, head_spec(head.cfg.head).features, head.cfg.head)
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
