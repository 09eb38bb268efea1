"""Slide-level classification metrics with bootstrap 95% confidence intervals.

AUROC (binary, or macro one-vs-rest for more classes), AUPRC (average precision of the positive
class, or macro one-vs-rest), balanced accuracy, F1 (positive class, or macro) and accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

METRICS = ("auroc", "auprc", "balanced_accuracy", "f1", "accuracy")


def _check(y: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.int64).ravel()
    prob = np.asarray(prob, dtype=np.float64)
    if prob.ndim != 2 or prob.shape[0] != len(y) or prob.shape[1] < 2:
        raise ValueError(f"prob must be (n, n_classes >= 2) for {len(y)} labels, got {prob.shape}")
    return y, prob


def _binary_auroc(pos: np.ndarray, score: np.ndarray) -> float:
    """AUROC of `score` for the boolean labels `pos` (both classes present): the Mann-Whitney
    statistic with tied scores counted half, equal to sklearn's trapezoidal ROC area."""
    from scipy.stats import rankdata

    ranks = rankdata(score)  # average ranks for ties
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_precision(pos: np.ndarray, score: np.ndarray) -> float:
    """Average precision (sklearn's definition: sum over distinct thresholds of the recall step
    times the precision there) of `score` for the boolean labels `pos` (some positive)."""
    order = np.argsort(-score, kind="mergesort")
    score, pos = score[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # last row of each threshold
    tps = np.cumsum(pos)[last]
    precision = tps / (last + 1)
    recall_step = np.diff(np.r_[0, tps]) / tps[-1]
    return float(np.sum(recall_step * precision))


def auroc(y: np.ndarray, prob: np.ndarray) -> float:
    """AUROC; macro one-vs-rest over the classes present when n_classes > 2. NaN if one class."""
    y, prob = _check(y, prob)
    present = np.unique(y)
    if len(present) < 2:
        return math.nan
    if prob.shape[1] == 2:
        return _binary_auroc(y == 1, prob[:, 1])
    return float(np.mean([_binary_auroc(y == c, prob[:, c]) for c in present]))


def auprc(y: np.ndarray, prob: np.ndarray) -> float:
    """Average precision of class 1 (binary) or macro one-vs-rest. NaN if one class."""
    y, prob = _check(y, prob)
    present = np.unique(y)
    if len(present) < 2:
        return math.nan
    if prob.shape[1] == 2:
        return _average_precision(y == 1, prob[:, 1])
    return float(np.mean([_average_precision(y == c, prob[:, c]) for c in present]))


def _confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = true class, columns = predicted class."""
    return np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def balanced_accuracy(y: np.ndarray, prob: np.ndarray) -> float:
    """Mean recall of the arg-max prediction over the classes present in `y`."""
    y, prob = _check(y, prob)
    cm = _confusion(y, prob.argmax(1), prob.shape[1])
    support = cm.sum(1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def f1(y: np.ndarray, prob: np.ndarray) -> float:
    """F1 of class 1 (binary) or macro F1 over all classes, of the arg-max prediction; a class
    never true nor predicted scores 0 (sklearn's zero_division=0)."""
    y, prob = _check(y, prob)
    cm = _confusion(y, prob.argmax(1), prob.shape[1])
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)  # 2 tp + fp + fn
    per_class = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(per_class[1]) if prob.shape[1] == 2 else float(per_class.mean())


def accuracy(y: np.ndarray, prob: np.ndarray) -> float:
    """Share of arg-max predictions equal to the label."""
    y, prob = _check(y, prob)
    return float(np.mean(prob.argmax(1) == y))


METRIC_FNS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": auroc,
    "auprc": auprc,
    "balanced_accuracy": balanced_accuracy,
    "f1": f1,
    "accuracy": accuracy,
}


def bootstrap_ci(
    y: np.ndarray,
    prob: np.ndarray,
    fn: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) CI of `fn` over slides; resamples where `fn` is NaN (one
    class only) are dropped. (NaN, NaN) when n_boot == 0 or nothing valid remains."""
    y, prob = _check(y, prob)
    if n_boot <= 0 or len(y) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        v = fn(y[idx], prob[idx])
        if not math.isnan(v):
            vals.append(v)
    if not vals:
        return (math.nan, math.nan)
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def compute_metrics(
    y: np.ndarray, prob: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Every metric in METRICS with its bootstrap 95% CI.

    y: (n,) int class indices; prob: (n, n_classes) class probabilities.
    Returns {name: {"value", "ci_low", "ci_high"}} (NaN where undefined).
    """
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(METRICS):
        fn = METRIC_FNS[name]
        lo, hi = bootstrap_ci(y, prob, fn, n_boot, seed + i)
        value = fn(y, prob)
        out[name] = {"value": value, "ci_low": lo, "ci_high": hi}
    return out


def summarise_folds(per_fold: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean and sample std across folds of each metric's value (NaN folds ignored)."""
    out: dict[str, dict[str, float]] = {}
    for name in METRICS:
        vals = np.array([f[name]["value"] for f in per_fold if name in f], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        out[name] = {
            "mean": float(vals.mean()) if len(vals) else math.nan,
            "std": float(vals.std(ddof=1)) if len(vals) > 1 else math.nan,
            "n_folds": int(len(vals)),
        }
    return out
