"""``tmass check-head NAME``: the leak-free contract, checked on any registered head.

A head is leak-free when every score s(t, v) is a function of the caption t, the video
v and the head's weights alone. :func:`check_head` tests what follows from that, through
the evaluator's own scoring, on random features of the shapes the head declares
(frames, word tokens, patch tokens):

    chance       untrained, on structureless random features, text-to-video R@1 is at
                 chance: the number of queries ranking their own video first is
                 Binomial(n_text, 1 / n_video), and a two-sided exact binomial test at
                 p < 0.001 fails the head
    sizes        a query set and a gallery of different sizes score; a subset of the
                 queries against a subset of the gallery gives exactly the
                 corresponding block of the full score matrix
    permutation  a permuted gallery permutes the score columns and nothing else
    chunks       scores do not depend on the chunk size (one pair, 7 pairs, all)
    seed         the same seed builds the same head and gives the same scores; for a
                 stochastic head another seed gives other scores (its noise is used)
    fast path    each fast path the head offers equals its generic path (on the CPU:
                 the numba kernel and the torch scorer)

All but ``chance`` run on a head whose weights are moved away from their
initialisation (seeded), so that an identity or zero init cannot hide a leak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import click

DIM, FRAMES, TOKENS, PATCHES = 32, 6, 8, 4
CHANCE_TEXTS, CHANCE_VIDEOS = 150, 50  # three queries per video; chance R@1 is 2 %
N_TEXT, N_VIDEO = 23, 17  # the structural checks: unequal on purpose
TRIALS = 4  # stochastic heads' samples per pair (the chance check uses the paper's 20)
ALPHA = 1e-3  # the chance check's significance level
TOLERANCE = 1e-5  # float rounding between chunkings; a leak moves scores far more


@dataclass
class Result:
    """One property of the contract: held or not, and the numbers that say so."""

    name: str
    ok: bool
    detail: str


def _binomial_p(hits: int, n: int, p: float) -> float:
    """Two-sided exact binomial test: twice the smaller tail, at most 1."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    return min(1.0, 2 * min(sum(pmf[: hits + 1]), sum(pmf[hits:])))


def random_features(spec, n_text: int, n_video: int, seed: int):
    """Structureless features of the kinds ``spec`` declares: (TextFeatures, text ids,
    VideoFeatures, video ids). One clip is two frames short; token lengths vary."""
    import torch

    from tmass.train.heads import TextFeatures, VideoFeatures

    g = torch.Generator().manual_seed(seed)
    text = TextFeatures(torch.randn(n_text, DIM, generator=g))
    if "word_tokens" in spec.features:
        text.tokens = torch.randn(n_text, TOKENS, DIM, generator=g)
        text.token_mask = torch.arange(TOKENS)[None, :] < torch.randint(1, TOKENS + 1, (n_text, 1), generator=g)
    mask = torch.ones(n_video, FRAMES, dtype=torch.bool)
    mask[n_video // 2, -2:] = False
    video = VideoFeatures(torch.randn(n_video, FRAMES, DIM, generator=g), mask)
    if "patch_tokens" in spec.features:
        video.patches = torch.randn(n_video, FRAMES, PATCHES, DIM, generator=g)
    return text, [f"t{i}" for i in range(n_text)], video, [f"v{i}" for i in range(n_video)]


def build(spec, seed: int, perturb: bool):
    """The head ``spec`` registers at the check's sizes, built under ``seed``; with
    ``perturb`` every weight but the logit scale gets seeded noise."""
    import torch

    torch.manual_seed(seed)
    head = spec.build(spec.make_config(embed_dim=DIM, num_frames=FRAMES, logit_scale=100.0))
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in head.named_parameters():
                if name != "log_logit_scale" and param.is_floating_point():
                    param.add_(0.2 * torch.randn(param.shape, generator=g))
    return head.eval()


def check_head(name: str, seed: int = 0) -> list[Result]:
    """Every property of the module docstring for head ``name``, in order."""
    import numpy as np
    import torch

    from tmass.evaluate.metrics import retrieval_metrics
    from tmass.evaluate.scores import EvalConfig, score_features
    from tmass.train.registry import head_spec

    spec = head_spec(name)

    def scores(head, features, **config):
        text, text_ids, video, video_ids = features
        settings = {"trials": TRIALS, "seed": seed, "device": "cpu", "progress": False, "path": "naive", **config}
        return score_features(head, text, text_ids, video, video_ids, EvalConfig(**settings))

    def differs(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max()) if a.shape == b.shape else math.inf

    results = []
    untrained = build(spec, seed, perturb=False)
    chance = scores(untrained, random_features(spec, CHANCE_TEXTS, CHANCE_VIDEOS, seed + 2), trials=20, path="fast")
    r1 = retrieval_metrics(chance, np.arange(CHANCE_TEXTS) % CHANCE_VIDEOS, "t2v")["t2v"]["R1"]
    hits = round(r1 * CHANCE_TEXTS / 100)
    p = _binomial_p(hits, CHANCE_TEXTS, 1 / CHANCE_VIDEOS)
    results.append(Result("chance", p >= ALPHA, f"untrained, random features: t2v R@1 {r1:.1f} % ({hits} of "
                          f"{CHANCE_TEXTS} queries), chance {100 / CHANCE_VIDEOS:.1f} %; binomial p = {p:.2g}"))

    head = build(spec, seed, perturb=True)
    features = random_features(spec, N_TEXT, N_VIDEO, seed + 3)
    text, text_ids, video, video_ids = features
    full = scores(head, features)
    rows, cols = np.arange(3, 12), np.arange(1, N_VIDEO, 3)
    part = scores(head, (text[torch.from_numpy(rows)], [text_ids[i] for i in rows],
                         video[torch.from_numpy(cols)], [video_ids[i] for i in cols]))
    gap = differs(part, full[np.ix_(rows, cols)])
    results.append(Result("sizes", full.shape == (N_TEXT, N_VIDEO) and np.isfinite(full).all() and gap <= TOLERANCE,
                          f"{N_TEXT} x {N_VIDEO} scores {full.shape}, finite {bool(np.isfinite(full).all())}; "
                          f"{len(rows)} x {len(cols)} sub-problem vs its block: max |diff| {gap:.2g}"))

    perm = np.random.default_rng(seed).permutation(N_VIDEO)
    permuted = scores(head, (text, text_ids, video[torch.from_numpy(perm)], [video_ids[i] for i in perm]))
    gap = differs(permuted, full[:, perm])
    results.append(Result("permutation", gap <= TOLERANCE, f"permuted gallery vs permuted columns: max |diff| {gap:.2g}"))

    gaps = {size: differs(scores(head, features, chunk_pairs=size), full) for size in (1, 7)}
    results.append(Result("chunks", max(gaps.values()) <= TOLERANCE,
                          "vs all pairs at once: " + ", ".join(f"{s} pairs max |diff| {g:.2g}" for s, g in gaps.items())))

    again = scores(build(spec, seed, perturb=True), features)
    same = differs(again, full)
    detail = f"rebuilt and rescored with seed {seed}: max |diff| {same:.2g}"
    ok = same == 0.0
    if untrained.stochastic:
        other = differs(scores(head, features, seed=seed + 1), full)
        ok = ok and other > 0
        detail += f"; seed {seed + 1}: max |diff| {other:.2g} (must differ: the noise is used)"
    results.append(Result("seed", ok, detail))

    for fast_path in spec.fast_paths:  # the numba kernel (fast on CPU) and the torch scorer
        gaps = {path: max(differs(scores(head, features, path=path, trials=trials), scores(head, features, trials=trials))
                          for trials in (0, TRIALS)) for path in ("fast", "torch")}
        results.append(Result(f"fast path {fast_path}", max(gaps.values()) <= TOLERANCE,
                              "vs generic path, with and without sampling: "
                              + ", ".join(f"{path} max |diff| {gap:.2g}" for path, gap in gaps.items())))
    return results


@click.command(name="check-head")
@click.argument("names", nargs=-1)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the head, its features and the noise.")
def check_head_command(names, seed):
    """Check that registered heads are leak-free (default: every registered head).

    Runs the contract on each: scores at chance when untrained on random features,
    unequal query and gallery sizes, a permuted gallery, chunk sizes, seeds, and each
    fast path against the generic one. Prints one line per property and exits 1 if any
    fails."""
    from tmass.train.registry import head_names, head_spec

    known = head_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise click.BadParameter(f"unknown heads {', '.join(unknown)}; registered: {', '.join(known)}",
                                 param_hint="NAMES")
    failed = []
    for name in names or known:
        spec = head_spec(name)
        click.echo(f"{name} ({spec.display}{': ' + spec.summary if spec.summary else ''}): "
                   f"dim {DIM}, {FRAMES} frames, seed {seed}")
        try:
            results = check_head(name, seed)
        except Exception as exc:  # a head that cannot be built or scored fails; the other heads still run
            results = [Result("runs", False, f"building or scoring it raised {type(exc).__name__}: {exc}")]
        for r in results:
            click.echo(f"  {'PASS' if r.ok else 'FAIL'}  {r.name:22} {r.detail}")
        bad = [r.name for r in results if not r.ok]
        failed += [f"{name}: {b}" for b in bad]
        click.echo(f"  {name}: " + (f"FAILED {', '.join(bad)}" if bad else f"all {len(results)} properties hold"))
    if failed:
        raise click.ClickException("the leak-free contract fails: " + "; ".join(failed))
