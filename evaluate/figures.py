"""Every figure the project draws (matplotlib, headless Agg): ablation sweeps, training
curves, the paper's Fig. 5 analysis, and the demo's retrieval gallery. Each figure has
a title, axis labels and units, and is written as PNG. Where a ``*_figure`` function
exists it returns the matplotlib Figure (what the tests read the plotted data from),
and its ``plot_*`` twin writes it."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tmass.train.registry import display_name  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def chance_line(ax, n_video: int, k: int = 1) -> None:
    """The chance level of text-to-video R@k on a gallery of ``n_video`` videos
    (100 k / n_video %), as a labelled dashed line on a recall axis."""
    chance = 100 * min(k, n_video) / n_video
    ax.axhline(chance, color="tab:red", ls="--", lw=1, label=f"chance R@{k} = {chance:.3g} % ({n_video} videos)")
    ax.legend(fontsize=8, loc="best")


def sweep_figure(sweep, rows: list[dict], n_video: int | None = None, provenance: str = ""):
    """R@1 and MnR (text-to-video, mean ± std over seeds) of each variant of a sweep:
    points for categorical sweeps, lines over ``Variant.x`` for numeric ones. Axes 0
    and 1 hold one errorbar line each, in ``rows`` order; with ``n_video`` (the test
    gallery's size) the R@1 axis also holds the chance level. ``provenance``: lines
    for the title saying what made the numbers (encoder, features, split, selection)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6 if provenance else 4))
    seeds = rows[0]["seeds"] if rows else 0
    for ax, metric, label in ((axes[0], "R1", "R@1 (%) ↑"), (axes[1], "MnR", "mean rank ↓")):
        means = [r[metric] for r in rows]
        stds = [r[f"{metric}_std"] for r in rows]
        if sweep.x_label is None:
            # points, not bars: the axis is zoomed to the spread, and truncated bars would exaggerate it
            positions = np.arange(len(rows))
            ax.errorbar(positions, means, yerr=stds, fmt="o", ms=7, capsize=5)
            ax.set_xticks(positions, [r["variant"] for r in rows], rotation=20, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(rows) - 0.5)
            ax.set_xlabel("variant")
        else:
            xs = [r["x"] for r in rows]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=4)
            ax.set_xticks(xs)
            ax.set_xlabel(sweep.x_label)
        ax.set_ylabel(f"text-to-video {label}")
        ax.grid(alpha=0.3)
    if n_video:
        chance_line(axes[0], n_video)
    fig.suptitle(f"{sweep.title}\nleak-free test metrics, mean ± std over {seeds} seeds"
                 + (f"\n{provenance}" if provenance else ""), fontsize=9 if provenance else 10)
    return fig


def plot_sweep(sweep, rows: list[dict], path: Path, n_video: int | None = None, provenance: str = "") -> Path:
    """:func:`sweep_figure`, written to ``path``."""
    return _save(sweep_figure(sweep, rows, n_video, provenance), path)


STEP_FIELDS = ("step", "epoch", "lr", "logit_scale")  # of a log.jsonl step record; the other keys are losses


def training_curves_figure(run_dir: Path):
    """Loss terms, validation R@1 (where the run validated; with the validation split's
    chance level where the log records its size), logit scale and learning rate against
    the optimisation step of one run, from its ``log.jsonl``: axes 0 to 3."""
    run_dir = Path(run_dir)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "lr" in r and "total" in r]
    vals = [r for r in records if r.get("event") == "val"]
    # loss terms are whatever the run logged besides the step's schedule fields: the
    # loss's terms per text variant, their parts, and the weighted total
    terms = list(dict.fromkeys(k for r in steps for k in r if k not in STEP_FIELDS and k != "total"))
    terms += ["total"] if len(terms) > 1 else []  # one term is its own total: draw it once
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    x = np.array([r["step"] for r in steps])
    # per-step losses of a long run are a solid band: draw them faint under a running mean
    window = max(1, len(x) // 200)
    for term in terms:
        values = np.array([r.get(term, np.nan) for r in steps], dtype=float)
        line, = axes[0].plot(x, values, lw=0.5, alpha=0.25 if window > 1 else 1.0)
        if window > 1:
            mean = np.convolve(values, np.ones(window) / window, mode="valid")
            axes[0].plot(x[window - 1:], mean, color=line.get_color(), lw=1.5, label=term)
        else:
            line.set_label(term)
    axes[0].set(xlabel="optimiser step", ylabel="loss (nats)",
                title="loss terms" + (f" (faint: per step; line: mean of {window})" if window > 1 else ""))
    if len(x):  # a run of 0 epochs logged no step
        axes[0].legend(fontsize=8, loc="best")
    if vals:
        axes[1].plot([v["step"] for v in vals], [v["t2v"]["R1"] for v in vals], "k-o", ms=3)
        axes[1].set_title(f"validation t2v R@1 ({vals[-1].get('split', 'val')} split, {vals[-1].get('protocol', 'leak-free')})")
        if vals[-1].get("videos"):
            chance_line(axes[1], vals[-1]["videos"])
    else:
        axes[1].text(0.5, 0.5, "no validation in this run", ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set_title("validation t2v R@1")
    axes[1].set(xlabel="optimiser step", ylabel="R@1 (%)")
    axes[2].plot(x, [r["logit_scale"] for r in steps], color="tab:purple")
    axes[2].set(xlabel="optimiser step", ylabel="exp(logit scale)", title="logit scale (temperature⁻¹)")
    axes[3].plot(x, [r["lr"] for r in steps], color="tab:green")
    axes[3].set(xlabel="optimiser step", ylabel="learning rate", title="learning rate")
    for ax in axes:
        ax.grid(alpha=0.3)
    config = json.loads((run_dir / "config.json").read_text())
    encoder = f"\nencoder: {config['encoder']}" if config.get("encoder") else ""
    metrics = run_dir / "metrics.json"  # a finished run says how long it trained (a --max-steps run: part of an epoch)
    trained = json.loads(metrics.read_text()).get("trained") if metrics.is_file() else None
    fig.suptitle(f"{run_dir}: {display_name(config['head']['head'])} head" + (f", {trained}" if trained else "") + encoder,
                 fontsize=10)
    return fig


def plot_training_curves(run_dir: Path, path: Path | None = None) -> Path:
    """:func:`training_curves_figure`, written to ``path`` (default: the run's training-curves.png)."""
    return _save(training_curves_figure(run_dir), path or Path(run_dir) / "training-curves.png")


def _irrelevant_max(scores: np.ndarray, text_to_video: np.ndarray) -> np.ndarray:
    """Per query, its highest score with a video it does not describe ``[n_text]``
    (undefined audit scores, NaN, left out)."""
    masked = np.where(np.isnan(scores), -np.inf, scores)
    masked[np.arange(len(scores)), text_to_video] = -np.inf
    return masked.max(axis=1)


def similarity_figure(point: np.ndarray, mass: np.ndarray, text_to_video: np.ndarray, title: str = ""):
    """The paper's Fig. 5 on any run: how the text mass moves similarities.

    ``point`` ``[n_text, n_video]``: cos(t, p(v|t)) with the text embedding t itself;
    ``mass``: the T-MASS score with the selected stochastic text t_s. Left: per query,
    the highest similarity to an irrelevant video; middle: the relevant pairs'
    similarities; right: the margin (relevant minus highest irrelevant), whose sign
    decides R@1."""
    rows = np.arange(len(point))
    series = {
        "highest similarity to an irrelevant video": (_irrelevant_max(point, text_to_video), _irrelevant_max(mass, text_to_video)),
        "similarity of the relevant pair": (point[rows, text_to_video], mass[rows, text_to_video]),
    }
    series["margin: relevant - highest irrelevant"] = tuple(
        rel - irr for rel, irr in zip(series["similarity of the relevant pair"], series["highest similarity to an irrelevant video"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (name, (with_t, with_ts)) in zip(axes, series.items()):
        # audit scores may be undefined: a query with no defined irrelevant score has no margin
        with_t, with_ts = with_t[np.isfinite(with_t)], with_ts[np.isfinite(with_ts)]
        bins = np.linspace(min(with_t.min(), with_ts.min()), max(with_t.max(), with_ts.max()), 50)
        ax.hist(with_t, bins=bins, alpha=0.55, label=f"text t (mean {with_t.mean():.3f})")
        ax.hist(with_ts, bins=bins, alpha=0.55, label=f"selected t_s (mean {with_ts.mean():.3f})")
        ax.set(xlabel="cosine similarity", ylabel="queries", title=name)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[2].axvline(0.0, color="k", lw=0.8)
    fig.suptitle(title or "Fig. 5 analysis: text t against the selected stochastic text t_s", fontsize=10)
    return fig


def plot_similarity_analysis(point: np.ndarray, mass: np.ndarray, text_to_video: np.ndarray, path: Path,
                             title: str = "") -> Path:
    """:func:`similarity_figure`, written to ``path``."""
    return _save(similarity_figure(point, mass, text_to_video, title), path)


def gallery_queries(text_to_video: np.ndarray, queries: int) -> np.ndarray:
    """Caption rows for a gallery: the first caption of each of ``queries`` videos spread
    evenly over the split (at most one per video, so no row repeats another's answer).

    text_to_video ``[n_text]`` -> ``[min(queries, n_captioned_video)]`` caption indices."""
    first_caption = np.unique(text_to_video, return_index=True)[1]  # [n_captioned_video]
    picks = np.unique(np.linspace(0, len(first_caption) - 1, min(queries, len(first_caption))).round().astype(int))
    return first_caption[picks]


CORRECT_COLOUR = "tab:green"  # the gallery's frame around the captioned video


def gallery_figure(scores: np.ndarray, captions: list[str], text_to_video: np.ndarray, video_frames,
                   queries: int = 5, top: int = 5, frames_per_video: int = 4, title: str = ""):
    """Retrieval gallery: ``queries`` captions, each the first caption of a different
    video (spread over the split), with the ``top`` best-scoring videos as strips of
    ``frames_per_video`` frames; the captioned video (a correct hit) is framed in
    :data:`CORRECT_COLOUR` and its title ends in a tick. Axes ``[row, k]``: query row's
    k-th ranked video.

    scores ``[n_text, n_video]``, captions ``[n_text]``, text_to_video ``[n_text]``,
    ``video_frames(v, n)``: n frames of video v, ``[n, height, width, 3]`` uint8 (the
    caller decodes them; this layer does not read videos)."""
    chosen = gallery_queries(text_to_video, queries)
    fig, axes = plt.subplots(len(chosen), top, figsize=(3.2 * top, 1.25 * len(chosen) + 0.6), squeeze=False)
    for row, q in enumerate(chosen):
        ranked = np.argsort(-scores[q], kind="stable")[:top]
        for k, v in enumerate(ranked):
            frames = video_frames(v, frames_per_video)
            ax = axes[row, k]
            ax.imshow(np.concatenate(list(frames), axis=1))
            ax.set_xticks([])
            ax.set_yticks([])
            correct = v == text_to_video[q]
            for spine in ax.spines.values():
                spine.set_edgecolor(CORRECT_COLOUR if correct else "0.7")
                spine.set_linewidth(4 if correct else 1)
            ax.set_title(f"#{k + 1}  score {scores[q, v]:.3f}" + ("  ✓" if correct else ""), fontsize=8)
        axes[row, 0].set_ylabel("\n".join(_wrap(captions[q], 28)), fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title or f"Retrieval gallery: top {top} videos per query ({frames_per_video} frames each, time left to right)",
                 fontsize=10)
    return fig


def plot_gallery(scores: np.ndarray, captions: list[str], text_to_video: np.ndarray, video_frames, path: Path,
                 **options) -> Path:
    """:func:`gallery_figure` (``options``: its keywords), written to ``path``."""
    return _save(gallery_figure(scores, captions, text_to_video, video_frames, **options), path)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines
