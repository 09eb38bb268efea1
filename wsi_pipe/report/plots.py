"""matplotlib figures of the report (Agg backend, PNG bytes out). Pure: arrays in, bytes out.

Bootstrap bands resample slides with replacement (`n_boot` times, seeded); a resample holding
one class only is dropped. Bands are the 2.5-97.5 percentiles of the resampled curves on a fixed
grid (false-positive rate for ROC, recall for precision-recall, interpolated precision).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_GRID = np.linspace(0.0, 1.0, 101)
FOLD_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
POOLED_COLOUR = "#24162b"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def fig_png(fig, dpi: int = 110) -> bytes:
    """PNG bytes of `fig` (closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    _plt().close(fig)
    return buf.getvalue()


@dataclass(frozen=True)
class Scored:
    """Binary labels and scores of one group of slides (a fold, or all pooled).

    y: (n,) bool, True = positive class; score: (n,) predicted probability of the positive class.
    """

    name: str
    y: np.ndarray
    score: np.ndarray


def _cumulative_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives when thresholding at each distinct score, highest first."""
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last].astype(np.float64)
    return tps, (last + 1) - tps


def roc_on_grid(y: np.ndarray, s: np.ndarray) -> np.ndarray | None:
    """True-positive rate at the false-positive rates of `_GRID` (None with one class).

    y: (n,) bool; s: (n,) scores. The ROC steps are linearly interpolated (ties as a diagonal).
    """
    if y.all() or not y.any():
        return None
    tps, fps = _cumulative_counts(y, s)
    tpr, fpr = np.r_[0.0, tps / tps[-1]], np.r_[0.0, fps / fps[-1]]
    out = np.interp(_GRID, fpr, tpr)
    out[0] = 0.0
    return out


def pr_on_grid(y: np.ndarray, s: np.ndarray) -> np.ndarray | None:
    """Interpolated precision (the best precision at recall >= r) at the recalls of `_GRID`."""
    if not y.any():
        return None
    tps, fps = _cumulative_counts(y, s)
    rec = np.r_[0.0, tps / tps[-1]]
    prec = np.r_[1.0, tps / (tps + fps)]
    best = np.maximum.accumulate(prec[::-1])[::-1]  # best precision at this recall or more
    idx = np.clip(np.searchsorted(rec, _GRID, side="left"), 0, len(rec) - 1)
    return best[idx]


def bootstrap_band(
    y: np.ndarray,
    s: np.ndarray,
    curve,
    n_boot: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray] | None:
    """2.5 / 97.5 percentile band of `curve(y, s)` over slide resamples (None if < 10 valid)."""
    if n_boot <= 0 or len(y) < 2:
        return None
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        c = curve(y[idx], s[idx])
        if c is not None:
            curves.append(c)
    if len(curves) < 10:
        return None
    arr = np.stack(curves)
    return np.percentile(arr, 2.5, axis=0), np.percentile(arr, 97.5, axis=0)


def calibration_bins(
    y: np.ndarray, s: np.ndarray, n_bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted, observed positive rate, count) of equal-width probability bins that hold
    slides."""
    edges = np.linspace(0, 1, n_bins + 1)
    b = np.clip(np.digitize(s, edges[1:-1]), 0, n_bins - 1)
    mp, fr, n = [], [], []
    for k in range(n_bins):
        m = b == k
        if m.any():
            mp.append(float(s[m].mean()))
            fr.append(float(y[m].mean()))
            n.append(int(m.sum()))
    return np.array(mp), np.array(fr), np.array(n)


def mil_curves(
    folds: Sequence[Scored],
    pooled: Scored,
    pos_name: str,
    n_boot: int = 200,
    seed: int = 0,
    micro: bool = False,
) -> bytes:
    """ROC, precision-recall (each with bootstrap bands, per fold and pooled) and a calibration
    plot of the pooled out-of-fold predictions, side by side. `micro`: the scores are every
    (slide, class) pair of a multi-class problem, one-vs-rest (a micro-average)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.2))
    ax_roc, ax_pr, ax_cal = axes
    groups = [(f, FOLD_COLOURS[i % len(FOLD_COLOURS)], 1.1, 0.10) for i, f in enumerate(folds)]
    groups.append((pooled, POOLED_COLOUR, 2.4, 0.18))
    for g, colour, lw, band_alpha in groups:
        y, s = g.y.astype(bool), g.score.astype(float)
        for ax, curve in ((ax_roc, roc_on_grid), (ax_pr, pr_on_grid)):
            c = curve(y, s)
            if c is None:
                continue
            band = bootstrap_band(y, s, curve, n_boot, seed)
            if band is not None:
                ax.fill_between(_GRID, band[0], band[1], color=colour, alpha=band_alpha, lw=0)
            ax.plot(_GRID, c, color=colour, lw=lw, label=g.name, drawstyle="default")
    ax_roc.plot([0, 1], [0, 1], ls=":", color="#888", lw=1)
    ax_roc.set(
        xlabel="false-positive rate",
        ylabel="true-positive rate",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title="ROC (one-vs-rest, micro-average)" if micro else f"ROC ({pos_name} vs rest)",
    )
    prev = float(pooled.y.mean()) if len(pooled.y) else 0.0
    ax_pr.axhline(prev, ls=":", color="#888", lw=1)
    ax_pr.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title="precision-recall (micro-average)" if micro else f"precision-recall ({pos_name})",
    )
    mp, fr, n = calibration_bins(pooled.y.astype(float), pooled.score.astype(float))
    ax_cal.plot([0, 1], [0, 1], ls=":", color="#888", lw=1, label="perfect")
    if len(mp):
        ax_cal.plot(mp, fr, color=POOLED_COLOUR, lw=1.2, marker=None)
        sc = ax_cal.scatter(
            mp,
            fr,
            s=30 + 170 * n / max(1, n.max()),
            color=POOLED_COLOUR,
            zorder=3,
            label="pooled (dot size = " + ("slide-class pairs)" if micro else "slides)"),
        )
        sc.set_alpha(0.85)
        for x, yv, k in zip(mp, fr, n):
            ax_cal.annotate(
                str(k),
                (x, yv),
                textcoords="offset points",
                xytext=(6, -10),
                fontsize=7,
                color="#555",
            )
    brier = float(np.mean((pooled.score - pooled.y) ** 2)) if len(pooled.y) else float("nan")
    ax_cal.set(
        xlabel="predicted probability of each class"
        if micro
        else f"predicted probability of {pos_name}",
        ylabel="observed fraction",
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
        title=f"calibration (Brier {brier:.3f})",
    )
    for ax in axes:
        ax.grid(alpha=0.25)
        ax.set_aspect("equal", adjustable="box")
    ax_roc.legend(loc="lower right", fontsize=7.5, frameon=False)
    ax_cal.legend(loc="upper left", fontsize=7.5, frameon=False)
    fig.tight_layout()
    return fig_png(fig)


def loss_curve(step: np.ndarray, loss: np.ndarray, lr: np.ndarray | None, title: str) -> bytes:
    """Training loss per step (raw and a moving average) with the learning rate on a second axis."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    ax.plot(step, loss, color="#b9a3c6", lw=0.9, label="loss per step")
    k = max(1, min(25, len(loss) // 10))
    if k > 1:
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(step[k - 1 :], smooth, color="#7a1f5c", lw=2, label=f"moving average ({k} steps)")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.25)
    if lr is not None and len(lr):
        ax2 = ax.twinx()
        ax2.plot(step, lr, color="#1f77b4", lw=1, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate", color="#1f77b4")
        ax2.tick_params(axis="y", colors="#1f77b4")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig_png(fig)


def score_histogram(scores: np.ndarray, groups: Sequence[str], title: str, xlabel: str) -> bytes:
    """Histogram of slide scores, one colour per group (e.g. the slide label)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    s = np.asarray(scores, dtype=float)
    finite = np.isfinite(s)
    bins = (
        np.histogram_bin_edges(s[finite], bins=min(20, max(5, int(finite.sum()) // 2)))
        if finite.any()
        else 10
    )
    names = sorted(set(groups))
    for i, g in enumerate(names):
        m = np.array([x == g for x in groups]) & finite
        ax.hist(
            s[m],
            bins=bins,
            alpha=0.6,
            color=FOLD_COLOURS[i % len(FOLD_COLOURS)],
            label=g or "no label",
            edgecolor="white",
        )
    ax.set(xlabel=xlabel, ylabel="slides", title=title)
    ax.grid(alpha=0.25)
    if len(names) > 1 or (names and names[0]):
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig_png(fig)


def tiles_per_slide(slide_ids: Sequence[str], counts: Sequence[int], grid: str) -> bytes:
    """Horizontal bars: tiles kept per slide on one grid."""
    plt = _plt()
    n = len(slide_ids)
    fig, ax = plt.subplots(figsize=(5.2, 0.9 + 0.2 * n))
    ax.barh(np.arange(n), counts, color="#7a1f5c", alpha=0.8)
    ax.set_yticks(np.arange(n), labels=list(slide_ids), fontsize=7.5)
    ax.invert_yaxis()
    ax.set(xlabel=f"tiles kept at {grid}", title="tiles per slide")
    ax.grid(alpha=0.25, axis="x")
    fig.tight_layout()
    return fig_png(fig)
