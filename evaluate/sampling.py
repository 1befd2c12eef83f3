"""Keyed noise for T-MASS inference, and the fused CPU kernel that pools, samples and scores.

The stochastic text of pair (t, v), trial m, is ``t + eps[t, v, m] * exp(R(t, v))``.
Here ``eps`` is a pure function of (seed, id of t, id of v, m, coordinate), drawn from a
counter-based generator instead of a sequential stream. Then a pair's noise cannot
depend on where the pair sits in the computation: scores do not change with the chunk
size, the gallery's order or which other videos are in it. That is the property the
leak tests check, and a sequential RNG would break it.

Generator: Philox4x32-10 (Salmon et al., SC'11; cuRAND's and PyTorch's CUDA generator).

    counter = (block, text_key_lo, text_key_hi, video_key_lo)    key = (video_key_hi, seed)
    block   = m * ceil(dim / 4) + d // 4,  lane d % 4 of the four 32-bit outputs

Keys are the first 8 bytes of BLAKE2b of the id string. The noise mode is named and
passed explicitly (``NOISE_MODES``): ``fresh`` keys eps by (text, video), the paper's
protocol; ``shared`` draws it with the video key 0 for every video, giving the same
eps[t, m] for a text against all videos, a variance-reduction choice.

    uniform prior: eps = (x >> 8) * 2**-24                      in [0, 1)
    normal prior:  Box-Muller on lanes (0, 1) and (2, 3), u1 = ((x >> 8) + 1) * 2**-24

Two implementations produce the same bits: ``philox_torch`` (any device: the naive
reference scorer and the CUDA path) and the numba kernel :func:`pool_and_score` (the
CPU fast path, fused with pooling and scoring so that eps never exists in memory).
Tests hold them equal, and hold Philox to its published known-answer vectors.

Every numba function here is compiled with ``cache=True``: the machine code is kept in
``evaluate/__pycache__`` (or, where that is not writable, numba's per-user cache
directory; ``NUMBA_CACHE_DIR`` overrides both), so only the first run on a machine pays
the compilation, about 10 s per kernel variant.
"""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import numba as nb
import numpy as np
import torch

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
NOISE_MODES = ("fresh", "shared")  # eps keyed by (text, video), or by text alone
_MASK32 = 0xFFFFFFFF
_U24 = 1.0 / (1 << 24)


def id_keys(ids: list[str]) -> np.ndarray:
    """Stable 64-bit keys of id strings, ``[n]`` uint64."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest(), "little") for i in ids],
        dtype=np.uint64,
    )


def _split(keys: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    keys = np.asarray(keys, dtype=np.uint64)
    lo = torch.from_numpy((keys & np.uint64(_MASK32)).astype(np.int64)).to(device)
    hi = torch.from_numpy((keys >> np.uint64(32)).astype(np.int64)).to(device)
    return lo, hi


def philox_torch(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcastable).

    A 32x32-bit product needs 64 bits; int64 multiplication wraps, and masking the
    wrapped result recovers the unsigned high and low words exactly."""
    for _ in range(PHILOX_ROUNDS):
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        hi0, lo0 = (p0 >> 32) & _MASK32, p0 & _MASK32
        hi1, lo1 = (p1 >> 32) & _MASK32, p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def keyed_noise(
    text_keys: np.ndarray,
    video_keys: np.ndarray,
    seed: int,
    trials: int,
    dim: int,
    prior: str = "uniform",
    prior_std: float = 1.0,
    device="cpu",
    noise: str = "fresh",
) -> torch.Tensor:
    """eps for every pair: text_keys ``[n_text]``, video_keys ``[n_video]`` (uint64)
    -> ``[n_text, n_video, trials, dim]`` float32 on ``device``. ``noise="shared"``
    draws every video's eps with the video key 0."""
    if noise == "shared":
        video_keys = np.zeros(len(video_keys), dtype=np.uint64)
    blocks = -(-dim // 4)
    t_lo, t_hi = _split(text_keys, device)
    v_lo, v_hi = _split(video_keys, device)
    block = torch.arange(trials * blocks, device=device, dtype=torch.int64)
    shape = (-1, 1, 1)
    lanes = philox_torch(
        block.view(1, 1, -1),
        t_lo.view(shape),
        t_hi.view(shape),
        v_lo.view(1, -1, 1),
        v_hi.view(1, -1, 1),
        torch.full((1, 1, 1), int(seed) & _MASK32, device=device, dtype=torch.int64),
    )
    bits = torch.stack(lanes, dim=-1)  # [n_text, n_video, trials*blocks, 4]
    if prior == "uniform":
        eps = (bits >> 8).to(torch.float32) * _U24
    else:
        u1 = ((bits[..., 0::2] >> 8) + 1).to(torch.float32) * _U24
        u2 = (bits[..., 1::2] >> 8).to(torch.float32) * _U24
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = 2.0 * math.pi * u2
        pair = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)  # [..., 2, 2]
        eps = pair.flatten(-2) * prior_std
    n_text, n_video = len(text_keys), len(video_keys)
    return eps.reshape(n_text, n_video, trials, blocks * 4)[..., :dim]


# ------------------------------------------------------------------------- CPU kernel

_NB_M0, _NB_M1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
_NB_W0, _NB_W1 = np.uint32(PHILOX_W0), np.uint32(PHILOX_W1)
_NB_MASK = np.uint64(_MASK32)
_NB_32 = np.uint64(32)
_NB_8 = np.uint32(8)


@nb.njit(inline="always", cache=True)
def _philox_nb(c0, c1, c2, c3, k0, k1):
    for _ in range(PHILOX_ROUNDS):
        p0 = np.uint64(c0) * _NB_M0
        p1 = np.uint64(c2) * _NB_M1
        hi0 = np.uint32(p0 >> _NB_32)
        lo0 = np.uint32(p0 & _NB_MASK)
        hi1 = np.uint32(p1 >> _NB_32)
        lo1 = np.uint32(p1 & _NB_MASK)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = np.uint32(k0 + _NB_W0)
        k1 = np.uint32(k1 + _NB_W1)
    return c0, c1, c2, c3


@nb.njit(inline="always", cache=True)
def _eps4(x0, x1, x2, x3, normal, std):
    """Four eps values from four Philox words (see the module docstring)."""
    if not normal:
        return (
            np.float32(x0 >> _NB_8) * np.float32(_U24),
            np.float32(x1 >> _NB_8) * np.float32(_U24),
            np.float32(x2 >> _NB_8) * np.float32(_U24),
            np.float32(x3 >> _NB_8) * np.float32(_U24),
        )
    r01 = math.sqrt(-2.0 * math.log(np.float32((x0 >> _NB_8) + np.uint32(1)) * np.float32(_U24)))
    a01 = 2.0 * math.pi * (np.float32(x1 >> _NB_8) * np.float32(_U24))
    r23 = math.sqrt(-2.0 * math.log(np.float32((x2 >> _NB_8) + np.uint32(1)) * np.float32(_U24)))
    a23 = 2.0 * math.pi * (np.float32(x3 >> _NB_8) * np.float32(_U24))
    return (
        np.float32(r01 * math.cos(a01) * std),
        np.float32(r01 * math.sin(a01) * std),
        np.float32(r23 * math.cos(a23) * std),
        np.float32(r23 * math.sin(a23) * std),
    )


@nb.njit(parallel=True, cache=True)
def keyed_noise_numba(text_keys, video_keys, seed, trials, dim, normal, std):
    """The numba twin of :func:`keyed_noise` (for tests): ``[n_text, n_video, trials, dim]``."""
    blocks = (dim + 3) // 4
    out = np.empty((len(text_keys), len(video_keys), trials, blocks * 4), dtype=np.float32)
    for t in nb.prange(len(text_keys)):
        t_lo, t_hi = np.uint32(text_keys[t] & _NB_MASK), np.uint32(text_keys[t] >> _NB_32)
        for v in range(len(video_keys)):
            v_lo, v_hi = np.uint32(video_keys[v] & _NB_MASK), np.uint32(video_keys[v] >> _NB_32)
            for m in range(trials):
                for b in range(blocks):
                    x = _philox_nb(np.uint32(m * blocks + b), t_lo, t_hi, v_lo, v_hi, np.uint32(seed))
                    e = _eps4(x[0], x[1], x[2], x[3], normal, std)
                    for lane in range(4):
                        out[t, v, m, 4 * b + lane] = e[lane]
    return out[..., :dim]


class KernelInputs(NamedTuple):
    """Everything the fused kernel reads, by name. ``dimp`` is dim padded to a multiple
    of 4 (Philox's word count); :func:`pool_and_score` pads and fills in what the
    caller leaves None, and the kernel reads this very structure.

    text        ``[n_text, dim]``
    logits      ``[heads, n_text, n_video * n_frames]`` attention logits (the masked
                softmax over frames happens in the kernel)
    frame_mask  ``[n_video, n_frames]`` bool
    u, z        ``[n_video, heads * n_frames, dim]`` folded frame vectors and
    consts      ``[7, dim]`` of :class:`tmass.evaluate.scores.FoldedXPool`
    eps_attn, eps_out  the two LayerNorms' epsilons
    radius      exp(R) ``[n_text, n_video, dim]``; None: no sampling (s = cos(t, p))
    own         ``[n_video, n_slot, dim]``, video v pooled on its own captions (audit
                protocol only; None otherwise), and
    own_slot    ``[n_text]`` int64, the slot each text is scored against
    eps_shared  ``[n_text, trials, dimp]`` (shared noise; filled in here)
    text_keys, video_keys  uint64 ``[n_text]``, ``[n_video]``
    seed, trials, prior_std, dim
    """

    text: np.ndarray
    logits: np.ndarray
    frame_mask: np.ndarray
    u: np.ndarray
    z: np.ndarray
    consts: np.ndarray
    eps_attn: float
    eps_out: float
    text_keys: np.ndarray
    video_keys: np.ndarray
    seed: int
    trials: int
    prior_std: float
    radius: np.ndarray | None = None
    own: np.ndarray | None = None
    own_slot: np.ndarray | None = None
    eps_shared: np.ndarray | None = None
    dim: int = 0


def _make_kernel(normal: bool, audit: bool, shared: bool):
    """Compile the fused kernel for one (prior, protocol, noise): the flags are compile-time
    constants, so the hot loops carry no branches and vectorise (a runtime prior flag
    costs 12x on the uniform prior: Box-Muller's log/cos stop vectorisation even when
    not taken). With shared noise eps depends on (text, trial) only, so it is drawn once
    per text outside the kernel and read from cache instead of running Philox per pair.
    numba caches each specialisation on disk."""

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def kernel(a):
        text, logits, frame_mask, u, z, radius = a.text, a.logits, a.frame_mask, a.u, a.z, a.radius
        own, own_slot, eps_shared, text_keys, video_keys = a.own, a.own_slot, a.eps_shared, a.text_keys, a.video_keys
        seed, trials, std, dim = np.uint32(a.seed), a.trials, np.float32(a.prior_std), a.dim
        eps_attn, eps_out = np.float32(a.eps_attn), np.float32(a.eps_out)
        heads, n_text, n_video_frames = logits.shape
        n_video, n_frames = frame_mask.shape
        n_mix = heads * n_frames
        dimp = text.shape[1]  # dim padded to a multiple of 4
        blocks = dimp // 4
        consts = a.consts
        bias, lin_bias, lin_shift, g_attn, b_attn, g_out, b_out = consts[0], consts[1], consts[2], consts[3], consts[4], consts[5], consts[6]
        scores = np.empty((n_text, n_video), dtype=np.float32)
        for v in nb.prange(n_video):  # video-major: u[v], z[v] stay in cache across texts
            o = np.empty(dimp, dtype=np.float32)
            y = np.empty(dimp, dtype=np.float32)
            weights = np.empty(n_mix, dtype=np.float32)
            v_lo, v_hi = np.uint32(video_keys[v] & _NB_MASK), np.uint32(video_keys[v] >> _NB_32)
            u_v, z_v = u[v], z[v]
            for t in range(n_text):
                # -- attention: softmax over v's real frames, per head
                for h in range(heads):
                    top = np.float32(-np.inf)
                    for f in range(n_frames):
                        if frame_mask[v, f] and logits[h, t, v * n_frames + f] > top:
                            top = logits[h, t, v * n_frames + f]
                    total = np.float32(0.0)
                    for f in range(n_frames):
                        e = np.float32(math.exp(logits[h, t, v * n_frames + f] - top)) if frame_mask[v, f] else np.float32(0.0)
                        weights[h * n_frames + f] = e
                        total += e
                    for f in range(n_frames):
                        weights[h * n_frames + f] /= total
                # -- pooling p(v|t): two weighted sums over frames (u is centred, so
                # norm_attn needs only the mean square), the residual, then norm_out
                for d in range(dimp):
                    o[d] = bias[d]
                    y[d] = lin_bias[d]
                for k in range(n_mix):
                    w = weights[k]
                    for d in range(dimp):
                        o[d] += w * u_v[k, d]
                        y[d] += w * z_v[k, d]
                square = np.float32(0.0)
                for d in range(dim):
                    square += o[d] * o[d]
                rstd = np.float32(1.0 / math.sqrt(square / dim + eps_attn))
                for d in range(dimp):
                    y[d] = g_attn[d] * o[d] * rstd + b_attn[d] + y[d] * rstd + lin_shift[d]
                mean = np.float32(0.0)
                for d in range(dim):
                    mean += y[d]
                mean /= dim
                var = np.float32(0.0)
                for d in range(dim):
                    var += (y[d] - mean) * (y[d] - mean)
                rstd = np.float32(1.0 / math.sqrt(var / dim + eps_out))
                for d in range(dimp):  # o now holds p(v|t); padding stays 0 (zero gamma, beta)
                    o[d] = g_out[d] * (y[d] - mean) * rstd + b_out[d]

                # -- score: cos(t, p), or the best of `trials` samples of the text mass
                tr = text[t]
                orow = own[v, own_slot[t]] if audit else o
                tt = np.float32(0.0)
                tp = np.float32(0.0)
                pp = np.float32(0.0)
                to = np.float32(0.0)
                oo = np.float32(0.0)
                for d in range(dimp):
                    tt += tr[d] * tr[d]
                    tp += tr[d] * o[d]
                    pp += o[d] * o[d]
                    if audit:
                        to += tr[d] * orow[d]
                        oo += orow[d] * orow[d]
                norm_p = math.sqrt(max(pp, 1e-30))
                norm_own = math.sqrt(max(oo, 1e-30))
                if trials == 0:
                    if audit:
                        scores[t, v] = to / (math.sqrt(max(tt, 1e-30)) * norm_own)
                    else:
                        scores[t, v] = tp / (math.sqrt(max(tt, 1e-30)) * norm_p)
                    continue
                t_lo, t_hi = np.uint32(text_keys[t] & _NB_MASK), np.uint32(text_keys[t] >> _NB_32)
                rr = radius[t, v]
                best = np.float32(-np.inf)
                chosen = np.float32(0.0)
                for m in range(trials):
                    a_p = np.float32(0.0)  # eps . (r * p)
                    b_t = np.float32(0.0)  # eps . (r * t)
                    c_r = np.float32(0.0)  # eps^2 . r^2
                    a_own = np.float32(0.0)  # eps . (r * own), audit only
                    for blk in range(blocks):
                        d = 4 * blk
                        if shared:
                            e0, e1, e2, e3 = eps_shared[t, m, d], eps_shared[t, m, d + 1], eps_shared[t, m, d + 2], eps_shared[t, m, d + 3]
                        else:
                            x0, x1, x2, x3 = _philox_nb(np.uint32(m * blocks + blk), t_lo, t_hi, v_lo, v_hi, seed)
                            e0, e1, e2, e3 = _eps4(x0, x1, x2, x3, normal, std)
                        r0, r1, r2, r3 = e0 * rr[d], e1 * rr[d + 1], e2 * rr[d + 2], e3 * rr[d + 3]
                        a_p += r0 * o[d] + r1 * o[d + 1] + r2 * o[d + 2] + r3 * o[d + 3]
                        b_t += r0 * tr[d] + r1 * tr[d + 1] + r2 * tr[d + 2] + r3 * tr[d + 3]
                        c_r += r0 * r0 + r1 * r1 + r2 * r2 + r3 * r3
                        if audit:
                            a_own += r0 * orow[d] + r1 * orow[d + 1] + r2 * orow[d + 2] + r3 * orow[d + 3]
                    norm_tm = math.sqrt(max(tt + 2.0 * b_t + c_r, 1e-30))
                    cos = (tp + a_p) / (norm_tm * norm_p)
                    if cos > best:
                        best = cos
                        if audit:
                            chosen = (to + a_own) / (norm_tm * norm_own)
                scores[t, v] = chosen if audit else best
        return scores

    return kernel


_KERNELS: dict = {}


def _pad4(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    pad = -x.shape[-1] % 4
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x


def pool_and_score(inputs: KernelInputs, prior: str = "uniform", noise: str = "fresh") -> np.ndarray:
    """The CPU fast path of X-Pool/T-MASS scoring, fused: attention, pooling, sampling.

    ``inputs`` (:class:`KernelInputs`) -> scores ``[n_text, n_video]`` float32; ``prior``
    and ``noise`` (``NOISE_MODES``) pick the compiled variant.

    Per pair the work is O(heads * n_frames * dim) for the pooling and O(trials * dim)
    for the sampling, and neither the pooled videos nor eps ever exist in memory:
    cos(t_m, p) needs only ``eps . (r*p)``, ``eps . (r*t)`` and ``eps^2 . r^2`` beside the
    fixed |t|^2, t.p and |p|. In audit mode the trial is chosen against p(v|t) but
    scored against ``own[v, own_slot[t]]`` (v pooled on one of its own captions): the
    official evaluator's leak. dim is zero-padded to a multiple of 4; padding adds
    nothing to any sum.
    """
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
    dim = inputs.text.shape[-1]
    dimp = dim + (-dim % 4)
    sampling = inputs.radius is not None and inputs.trials > 0
    shared = sampling and noise == "shared"
    audit = inputs.own is not None
    key = (prior == "normal" and not shared, audit, shared)
    if key not in _KERNELS:
        _KERNELS[key] = _make_kernel(*key)
    seed = np.uint32(int(inputs.seed) & _MASK32)
    text_keys = np.asarray(inputs.text_keys, dtype=np.uint64)
    eps_shared = np.empty((0, 0, dimp), np.float32)
    if shared:
        eps_shared = _pad4(keyed_noise_numba(text_keys, np.zeros(1, np.uint64), seed, int(inputs.trials), dim,
                                             prior == "normal", np.float32(inputs.prior_std))[:, 0])
    ready = inputs._replace(
        text=_pad4(inputs.text), logits=np.ascontiguousarray(inputs.logits, dtype=np.float32),
        frame_mask=np.ascontiguousarray(inputs.frame_mask, dtype=np.bool_),
        u=_pad4(inputs.u), z=_pad4(inputs.z), consts=_pad4(inputs.consts),
        eps_attn=float(inputs.eps_attn), eps_out=float(inputs.eps_out),
        text_keys=text_keys, video_keys=np.asarray(inputs.video_keys, dtype=np.uint64),
        seed=int(seed), trials=int(inputs.trials) if sampling else 0, prior_std=float(inputs.prior_std),
        radius=_pad4(inputs.radius) if sampling else np.empty((0, 0, dimp), np.float32),
        own=_pad4(inputs.own) if audit else np.empty((0, 0, dimp), np.float32),
        own_slot=np.ascontiguousarray(inputs.own_slot, dtype=np.int64) if audit else np.empty(0, np.int64),
        eps_shared=eps_shared, dim=dim,
    )
    return _KERNELS[key](ready)
