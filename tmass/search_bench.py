"""Benchmark of ``tmass search``: how much of exhaustive scoring two stages keep, and how
fast a query is.

Recall: on the test split of each simulated preset (``--presets``: MSR-VTT 1k-A shape,
1,000 x 1,000; VATEX, 15,000 captions x 1,500 videos) and on a larger simulated gallery
(``--scaled``, 100,000 videos by default, where the meanP shortlist holds 2 % of it), a
T-MASS head (``--checkpoint``, else the untrained one, ``tmass train --epochs 0``) scores
every caption against every video, leak-free with M = 20. For each K the two-stage path
(meanP shortlist, best-frame narrowing to K, the head's top 10 among those K) is replayed
from that exhaustive matrix: every score is a function of its (caption, video) pair
alone, so the two-stage scores are the matrix's entries. A sample of captions also goes
through :meth:`tmass.search.SearchIndex.rank` itself, which must return the same top 10
with the same scores; the benchmark prints whether it did. It reports text-to-video R@10
(the captioned video in the top 10) of exhaustive scoring and of each K, their ratio, and
how much of the exhaustive top 10 each K keeps.

Latency (``--sizes``): n_video unit meanP embeddings generated in memory (Gaussian
directions; an exact first stage reads all of them whatever they are), and frames for the
shortlist drawn from a pool of :data:`FRAME_POOL` simulated videos (video i re-uses pool
row i mod the pool size: the cost after the first stage depends on the shortlist and K,
not on n). Per query: first stage, best frames, head, and the total, median and 90th
percentile over ``--queries`` simulated captions, for no head (CLIP cosine), X-Pool and
T-MASS (M = 20). The CLIP text encoder's time for one query (ViT-B-32, random init: the
same cost as pretrained) is measured once, beside.

    python -m tmass.search_bench                        # everything (the 1M case needs ~5 GiB)
    python -m tmass.search_bench --presets msrvtt --scaled '' --sizes 10000 --queries 10   # a quick look
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from tmass.search import SearchConfig

FRAME_POOL = 10_000
KS = (50, 200, 1000)
SHORTLISTS = (5000, 20000)  # other meanP depths replayed at K = 200, beside the configured one
SAMPLE_CHECK = 8  # captions run through the real two-stage search in the recall part


def _untrained_head(features: Path, head: str, work: Path) -> Path:
    """best.pt of ``tmass train --epochs 0`` (the head's initial weights) on ``features``."""
    from click.testing import CliRunner

    from tmass.cli import main

    out = work / f"untrained-{head}"
    if not (out / "best.pt").is_file():
        result = CliRunner().invoke(main, ["train", "--features", str(features), "--head", head, "--epochs", "0",
                                           "--val-fraction", "0", "--no-final-eval", "--no-progress", "--out", str(out)])
        if result.exit_code:
            raise click.ClickException(f"could not make an untrained {head} head: {result.output}{result.exception!r}")
    return out / "best.pt"


def _simulated(preset: str, work: Path, n_test: int | None = None) -> Path:
    """The preset's features, its test split resized to ``n_test`` videos of one caption
    if given (train cut to 64 videos: the test split and the generator's world do not
    depend on it)."""
    from tmass.features.simulate import PRESETS, SplitShape, simulate

    cfg = dataclasses.replace(PRESETS[preset], train=SplitShape(64, 1))
    if n_test:
        cfg = dataclasses.replace(cfg, test=SplitShape(n_test, 1))
    out = work / f"sim-{preset}{'-' + str(n_test) if n_test else ''}"
    if not (out / "test" / "manifest.json").is_file():
        simulate(cfg, out, seed=0)
    return out


def _best_frame_matrix(texts: np.ndarray, frames: np.ndarray, mask: np.ndarray, chunk: int = 2000) -> np.ndarray:
    """max_f cos(t, f) for every pair: unit texts ``[n_text, dim]``, frames ``[n_video,
    n_frames, dim]`` -> ``[n_text, n_video]``."""
    out = np.empty((len(texts), len(frames)), np.float32)
    for v in range(0, len(frames), chunk):
        f = frames[v:v + chunk].astype(np.float32)
        f /= np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
        sims = np.einsum("td,vfd->tvf", texts, f)
        out[:, v:v + chunk] = np.where(mask[None, v:v + chunk], sims, -np.inf).max(-1)
    return out


def _top(scores: np.ndarray, rows: np.ndarray, top: int) -> np.ndarray:
    """Best ``top`` of ``rows`` by score, ties to the lower row (as an exhaustive pass)."""
    rows = np.sort(rows)
    return rows[np.argsort(-scores[rows], kind="stable")[:top]]


def recall(preset: str, checkpoint: Path | None, work: Path, shortlist: int, n_test: int | None = None,
           n_queries: int | None = None) -> dict:
    """Two-stage against exhaustive scoring on a simulated test split (``n_test`` videos of
    one caption each, if given; ``n_queries`` captions spread evenly over it, if given). The two-stage path is
    replayed from the exhaustive scores, the meanP ranking and the best-frame matrix;
    :data:`SAMPLE_CHECK` captions also go through :meth:`SearchIndex.rank` itself, which
    must return the same top 10 with the same scores."""
    import torch

    from tmass.evaluate.scores import EvalConfig, score_matrix
    from tmass.features.format import load_split
    from tmass.search import IndexConfig, SearchConfig, SearchIndex, _unit, build_first_stage, pool_frames
    from tmass.train.trainer import load_checkpoint

    features = _simulated(preset, work, n_test)
    arrays = load_split(features / "test")
    n_text = min(n_queries or len(arrays.text_ids), len(arrays.text_ids))
    picked = np.linspace(0, len(arrays.text_ids) - 1, n_text).round().astype(int)  # spread over the videos
    texts, target = arrays.text_embeddings[picked], arrays.text_to_video[picked]
    text_ids = [arrays.text_ids[i] for i in picked]
    checkpoint = checkpoint or _untrained_head(features, "tmass", work)
    head, _ = load_checkpoint(checkpoint, "cpu")
    scoring = EvalConfig(trials=20, progress=True)
    start = time.perf_counter()
    exhaustive = score_matrix(head, torch.from_numpy(texts), text_ids, torch.from_numpy(arrays.frames),
                              torch.from_numpy(arrays.frame_mask), arrays.video_ids, scoring)
    exhaustive_s = time.perf_counter() - start
    first = build_first_stage(pool_frames(arrays.frames, arrays.frame_mask), IndexConfig("flat"))
    queries = _unit(texts)
    n_video = len(arrays.video_ids)
    depths = sorted({min(n_video, d) for d in (shortlist, *SHORTLISTS)})  # the shortlist, and others at K = 200
    _, meanp = first.search(queries, max(max(KS), depths[-1]))  # [n_text, depth], best first
    best_frame = _best_frame_matrix(queries, arrays.frames, arrays.frame_mask)
    everything = np.arange(n_video)
    exhaustive_top = np.stack([_top(exhaustive[q], everything, 10) for q in range(n_text)])
    hit = lambda top: 100 * float((top == target[:, None]).any(1).mean())  # noqa: E731
    result = {"preset": preset, "n_text": n_text, "n_video": n_video, "checkpoint": str(checkpoint), "shortlist": shortlist,
              "exhaustive_seconds": round(exhaustive_s, 1), "R10_exhaustive": hit(exhaustive_top),
              "R10_meanp_only": hit(meanp[:, :10]), "K": {}}
    def replay(k: int, depth: int) -> np.ndarray:
        depth = max(k, min(n_video, depth))
        return np.stack([_top(exhaustive[q], _top(best_frame[q], meanp[q, :depth], k), 10) for q in range(n_text)])

    def overlap(top: np.ndarray) -> float:
        return 100 * float(np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(top, exhaustive_top)]))

    replayed = {k: replay(k, shortlist) for k in KS}
    for k, top in replayed.items():
        result["K"][k] = {"R10": hit(top), "of_exhaustive": 100 * hit(top) / max(result["R10_exhaustive"], 1e-9),
                          "top10_overlap": overlap(top)}
    result["shortlists_at_K200"] = {d: {"R10": hit(top), "top10_overlap": overlap(top)}
                                    for d in depths for top in [replay(200, d)]}

    # the replay is exact only if the real two-stage search agrees with it: check a sample
    index = SearchIndex({}, arrays.video_ids, first, arrays.frames, arrays.frame_mask, head)
    sample = np.linspace(0, n_text - 1, SAMPLE_CHECK).round().astype(int)
    rankings = index.rank(texts[sample], [text_ids[q] for q in sample], ["" for _ in sample],
                          SearchConfig(top=10, candidates=200, shortlist=shortlist,
                                       scoring=dataclasses.replace(scoring, progress=False)))
    result["sample_check"] = {
        "captions": len(sample),
        "same_top10": all(np.array_equal(r.rows, replayed[200][q]) for q, r in zip(sample, rankings)),
        "max_score_difference": max(float(np.abs(r.scores - exhaustive[q, r.rows]).max()) for q, r in zip(sample, rankings)),
    }
    return result


class TiledFrames:
    """Rows of a frame pool standing in for ``n`` videos: row i is pool row i mod pool size."""

    def __init__(self, pool: np.ndarray):
        self.pool = pool

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return self.pool[np.asarray(rows) % len(self.pool)]


def _text_encoder_ms(repeats: int = 20) -> float:
    from tmass.extract.encoder import load_encoder

    encoder = load_encoder("ViT-B-32", "none", "cpu")
    encoder.encode_texts(["a warm-up query"])
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        encoder.encode_texts([f"a dog catches a frisbee number {i} in the park"])
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def latency(sizes: list[int], n_queries: int, ks: list[int], shortlist: int, work: Path, checkpoints: dict,
            ivf: bool) -> list[dict]:
    from tmass.features.format import load_split
    from tmass.search import IndexConfig, SearchIndex, build_first_stage, first_stage_label, frame_norms
    from tmass.train.trainer import load_checkpoint
    from tmass.evaluate.scores import EvalConfig

    sim = load_split(_simulated("msrvtt", work) / "test")
    vatex = load_split(_simulated("vatex", work) / "test")  # 1,500 videos
    frames_pool = np.concatenate([vatex.frames, sim.frames]).astype(np.float32)  # as an index stores them
    masks_pool = np.concatenate([vatex.frame_mask, sim.frame_mask])
    reps = -(-FRAME_POOL // len(frames_pool))
    frames, masks = TiledFrames(np.tile(frames_pool, (reps, 1, 1))[:FRAME_POOL]), TiledFrames(np.tile(masks_pool, (reps, 1))[:FRAME_POOL])
    norms = TiledFrames(frame_norms(frames.pool))
    queries = sim.text_embeddings[:n_queries]
    query_ids = sim.text_ids[:n_queries]
    heads = {"none": None, **{name: load_checkpoint(path, "cpu")[0] for name, path in checkpoints.items()}}
    rows = []
    for n in sizes:
        rng = np.random.default_rng(n)
        pooled = np.empty((n, sim.meta.embed_dim), np.float32)
        for s in range(0, n, 100_000):
            chunk = rng.standard_normal((min(100_000, n - s), pooled.shape[1]), dtype=np.float32)
            pooled[s:s + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
        for stage in ["flat"] + (["ivf"] if ivf and n == max(sizes) else []):
            start = time.perf_counter()
            first = build_first_stage(pooled, IndexConfig(stage))
            build_s = time.perf_counter() - start
            ids = [f"v{i:07d}" for i in range(n)]
            cases = [("none", None, None)] + [(name, head, k) for name, head in heads.items() if head is not None for k in ks]
            for name, head, k in cases:
                index = SearchIndex({}, ids, first, frames, masks, head, norms=norms)
                config = SearchConfig(10, k or 1, shortlist, EvalConfig(trials=20, progress=False))
                index.rank(queries[:2], query_ids[:2], query_ids[:2], config)  # warm-up (numba, caches)
                timings = [r.seconds for r in index.rank(queries, query_ids, query_ids, config)]
                row = {"n_video": n, "first_stage": first_stage_label(first), "build_s": round(build_s, 1), "head": name,
                       "K": k, "shortlist": shortlist if head is not None else None}
                for part in ("first_stage", "narrow", "head", "total"):
                    values = 1000 * np.array([t[part] for t in timings])
                    row[f"{part}_ms_median"] = round(float(np.median(values)), 2)
                    row[f"{part}_ms_p90"] = round(float(np.percentile(values, 90)), 2)
                rows.append(row)
                click.echo(f"  n={n:>9,} {stage:4} head={name:6} K={k or '-'} total {row['total_ms_median']:7.2f} ms median "
                           f"({row['first_stage_ms_median']:.2f} first stage + {row['narrow_ms_median']:.2f} best frames + "
                           f"{row['head_ms_median']:.2f} head), p90 {row['total_ms_p90']:.2f}", err=True)
            del first
        del pooled
    return rows


@click.command()
@click.option("--presets", default="msrvtt,vatex", show_default=True, help="Recall part: simulated presets ('' skips).")
@click.option("--scaled", default="msrvtt:100000:50", show_default=True,
              help="Recall on a larger simulated gallery, PRESET:N_VIDEOS:N_CAPTIONS ('' skips): the shortlist then "
                   "holds a fraction of it.")
@click.option("--recall-queries", type=click.IntRange(1), default=None,
              help="Captions per preset, spread evenly (VATEX: 1,500 is one per video). [default: all]")
@click.option("--sizes", default="10000,100000,1000000", show_default=True, help="Latency part: gallery sizes ('' skips).")
@click.option("--queries", type=click.IntRange(1), default=50, show_default=True, help="Queries timed per case.")
@click.option("--candidates", "-k", default=f"50,{SearchConfig.candidates}", show_default=True,
              help="K values of the latency part, comma-separated.")
@click.option("--shortlist", type=click.IntRange(1), default=SearchConfig.shortlist, show_default=True)
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A trained T-MASS head (on simulated features, seed 0). [default: the untrained head]")
@click.option("--ivf", is_flag=True, help="Also time an IVF first stage at the largest size.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), help="Keep simulated features here. [default: a temporary dir]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write every number as JSON.")
def main(presets, scaled, recall_queries, sizes, queries, candidates, shortlist, checkpoint, ivf, work, json_path):
    """Two-stage recall against exhaustive scoring, and search latency per query."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = {"torch_threads": torch.get_num_threads(), "recall": [], "latency": []}
        click.echo(f"search benchmark: torch threads {report['torch_threads']}; head "
                   f"{checkpoint or 'untrained T-MASS (tmass train --epochs 0)'}; meanP shortlist {shortlist}")
        cases = [(p, None, recall_queries) for p in presets.split(",") if p]
        if scaled:
            preset, n_videos, n_captions = scaled.split(":")
            cases.append((preset, int(n_videos), int(n_captions)))
        for preset, n_test, n_queries in cases:
            r = recall(preset, checkpoint, work, shortlist, n_test, n_queries)
            report["recall"].append(r)
            check = r["sample_check"]
            click.echo(f"recall, simulated {preset} test ({r['n_text']:,} captions x {r['n_video']:,} videos), T-MASS "
                       f"M = 20, leak-free: exhaustive R@10 {r['R10_exhaustive']:.1f} ({r['exhaustive_seconds']} s), "
                       f"meanP alone {r['R10_meanp_only']:.1f}; {check['captions']} captions through the real search: "
                       f"same top 10 {check['same_top10']}, scores within {check['max_score_difference']:.1e}")
            for k, v in r["K"].items():
                click.echo(f"  K = {k:5d}: R@10 {v['R10']:.1f} = {v['of_exhaustive']:.1f} % of exhaustive; "
                           f"{v['top10_overlap']:.1f} % of the exhaustive top 10 kept")
            click.echo("  K = 200, meanP shortlist " + ", ".join(
                f"{d}: R@10 {v['R10']:.1f}, {v['top10_overlap']:.1f} % of the top 10" for d, v in r["shortlists_at_K200"].items()))
        size_list = [int(s) for s in sizes.split(",") if s]
        if size_list:
            heads = {"xpool": _untrained_head(_simulated("msrvtt", work), "xpool", work),
                     "tmass": checkpoint or _untrained_head(_simulated("msrvtt", work), "tmass", work)}
            report["text_encoder_ms"] = round(_text_encoder_ms(), 1)
            ks = [int(k) for k in candidates.split(",")]
            click.echo(f"latency per query (median of {queries}; first stage, best frames of the shortlist, head on "
                       f"K candidates); CLIP ViT-B-32 text encoder alone: {report['text_encoder_ms']} ms per query")
            load = os.getloadavg()[0]
            report["latency"] = latency(size_list, queries, ks, shortlist, work, heads, ivf)
            report["load_average_1min"] = [round(load, 1), round(os.getloadavg()[0], 1)]  # before, after
            click.echo(f"machine load (1-minute average) {load:.1f} before, {os.getloadavg()[0]:.1f} after "
                       f"the latency part, on {os.cpu_count()} cores")
            click.echo(f"{'n_video':>10} {'first stage':34} {'head':6} {'K':>5} {'median ms':>10} {'p90 ms':>8} "
                       f"{'(first stage':>13} {'best frames':>12} {'head)':>8}")
            for row in report["latency"]:
                click.echo(f"{row['n_video']:>10,} {row['first_stage']:34} {row['head']:6} {row['K'] or '':>5} "
                           f"{row['total_ms_median']:10.2f} "
                           f"{row['total_ms_p90']:8.2f} {row['first_stage_ms_median']:13.2f} {row['narrow_ms_median']:12.2f} "
                           f"{row['head_ms_median']:8.2f}")
        if json_path:
            json_path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
