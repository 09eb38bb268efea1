"""Anomaly metrics: tile AUROC, AUPRO (per-region overlap vs false-positive rate), slide AUROC
with a bootstrap CI, and top-fraction precision (QC: share of artefact tiles in the top 5 %).

AUPRO follows MVTec AD (Bergmann et al.): regions are the connected components (8-connected
grid cells) of anomalous tiles of each slide; for a threshold t, PRO(t) = mean over regions of
the share of the region's tiles scoring >= t, FPR(t) = share of normal tiles scoring >= t;
AUPRO = area under PRO(FPR) for FPR in [0, max_fpr], divided by max_fpr (1 = perfect).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn import metrics as skm


def auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """Binary AUROC of `scores` for labels y (1 = anomalous); NaN when one class is missing."""
    y = np.asarray(y).astype(bool).ravel()
    if y.all() or not y.any():
        return math.nan
    return float(skm.roc_auc_score(y, np.asarray(scores, np.float64).ravel()))


def auroc_ci(
    y: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, float]:
    """AUROC with a percentile bootstrap (1 - alpha) CI over items (slides)."""
    y = np.asarray(y).astype(bool).ravel()
    s = np.asarray(scores, np.float64).ravel()
    value = auroc(y, s)
    lo = hi = math.nan
    if n_boot > 0 and not math.isnan(value):
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(y), (n_boot, len(y)))
        vals = [auroc(y[i], s[i]) for i in idx]
        vals = [v for v in vals if not math.isnan(v)]
        if vals:
            lo, hi = (float(q) for q in np.quantile(vals, [alpha / 2, 1 - alpha / 2]))
    return {"value": value, "ci_low": lo, "ci_high": hi, "n": int(len(y)), "n_pos": int(y.sum())}


def region_labels(cells: np.ndarray, shape: tuple[int, int], positive: np.ndarray) -> np.ndarray:
    """Connected component id (1..R, 8-connectivity on the grid) of each positive tile, 0 else.
    cells: (n, 2) (col, row); positive: (n,) bool."""
    grid = np.zeros(shape, bool)
    pos = np.asarray(positive, bool)
    grid[cells[pos, 1], cells[pos, 0]] = True
    lab, _ = ndimage.label(grid, structure=np.ones((3, 3), int))
    out = lab[cells[:, 1], cells[:, 0]]
    return np.where(pos, out, 0).astype(np.int64)


def aupro(
    scores: Sequence[np.ndarray], regions: Sequence[np.ndarray], max_fpr: float = 0.3
) -> float:
    """AUPRO pooled over slides. scores[i]: (n_i,) tile scores; regions[i]: (n_i,) region ids
    (0 = normal tile, >0 = anomalous region, ids local to the slide). NaN without regions or
    without normal tiles. Exact: every distinct score is a threshold (one sort, cumulative sums)."""
    s_all, w_all, neg_all = [], [], []
    n_regions = 0
    for s, r in zip(scores, regions):
        r = np.asarray(r, np.int64)
        ids, inv, counts = np.unique(r, return_inverse=True, return_counts=True)
        size = counts[inv].astype(np.float64)
        pos = r > 0
        w = np.zeros(len(r))
        w[pos] = 1.0 / size[pos]  # each region contributes 1 when fully above threshold
        n_regions += int((ids > 0).sum())
        s_all.append(np.asarray(s, np.float64))
        w_all.append(w)
        neg_all.append(~pos)
    if n_regions == 0:
        return math.nan
    s = np.concatenate(s_all)
    w = np.concatenate(w_all)
    neg = np.concatenate(neg_all)
    if not neg.any():
        return math.nan
    order = np.argsort(-s, kind="stable")
    s, w, neg = s[order], w[order], neg[order]
    last = np.r_[s[1:] != s[:-1], True]  # end of each group of equal scores
    pro = np.cumsum(w)[last] / n_regions
    fpr = np.cumsum(neg)[last] / neg.sum()
    fpr = np.r_[0.0, fpr]
    pro = np.r_[0.0, pro]
    if fpr[-1] < max_fpr:
        fpr, pro = np.r_[fpr, max_fpr], np.r_[pro, pro[-1]]
    cut = np.searchsorted(fpr, max_fpr, side="right")
    f = np.r_[fpr[:cut], max_fpr]
    p_end = np.interp(max_fpr, fpr, pro)
    p = np.r_[pro[:cut], p_end]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        area = float(np.sum((f[1:] - f[:-1]) * (p[1:] + p[:-1]) / 2.0))
    return area / max_fpr


def top_fraction_precision(
    scores: np.ndarray, positive: np.ndarray, fraction: float = 0.05
) -> float:
    """Share of positive (e.g. artefact) tiles among the top `fraction` of tiles by score."""
    s = np.asarray(scores, np.float64)
    k = max(1, int(math.ceil(fraction * len(s))))
    top = np.argsort(-s, kind="stable")[:k]
    return float(np.asarray(positive, bool)[top].mean())
