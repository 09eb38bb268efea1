"""Patient-level stratified k-fold splits, persisted as JSON.

Slides are grouped by patient: every slide of a patient lands in the same fold (train, val or
test of that fold), so no patient's tissue is seen in training and testing of one fold.
Stratification uses one label per patient (the most common label of its slides).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipe.core.errors import ConfigError
from wsi_pipe.core.fsutil import atomic_write_json

SPLITS_VERSION = 1
SPLIT_VALUES = ("train", "val", "test")


@dataclass(frozen=True)
class Fold:
    """Slide ids of one fold's train, validation and test sets."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def to_json(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}


def patient_labels(patients: Sequence[str], labels: Sequence[int]) -> dict[str, int]:
    """One label per patient: the most common among its slides (smallest label on a tie)."""
    by_patient: dict[str, Counter[int]] = defaultdict(Counter)
    for p, y in zip(patients, labels, strict=True):
        by_patient[p][int(y)] += 1
    return {p: min(c, key=lambda y: (-c[y], y)) for p, c in by_patient.items()}


def _split_val(
    patients: list[str], plabel: dict[str, int], val_fraction: float, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """Stratified split of patients into (train, val); each class with >= 2 patients gives >= 1."""
    if val_fraction <= 0:
        return patients, []
    by_class: dict[int, list[str]] = defaultdict(list)
    for p in patients:
        by_class[plabel[p]].append(p)
    val: list[str] = []
    for c in sorted(by_class):
        ps = sorted(by_class[c])
        rng.shuffle(ps)
        k = int(round(val_fraction * len(ps)))
        if len(ps) >= 2:
            k = min(max(k, 1), len(ps) - 1)
        else:
            k = 0
        val.extend(ps[:k])
    vs = set(val)
    return [p for p in patients if p not in vs], sorted(vs)


def make_splits(
    slide_ids: Sequence[str],
    patient_ids: Sequence[str],
    labels: Sequence[int],
    n_folds: int,
    val_fraction: float = 0.15,
    seed: int = 0,
) -> list[Fold]:
    """Patient-level stratified k-fold: each patient is in the test set of exactly one fold.

    slide_ids, patient_ids, labels: (n_slides,) aligned; labels are int class indices.
    Raises ConfigError when a class has fewer patients than folds.
    """
    from sklearn.model_selection import StratifiedKFold

    if not len(slide_ids) == len(patient_ids) == len(labels):
        raise ValueError("slide_ids, patient_ids and labels must have the same length")
    plabel = patient_labels(patient_ids, labels)
    counts = Counter(plabel.values())
    if len(counts) < 2:
        raise ConfigError(f"cross-validation needs >= 2 classes among patients, got {dict(counts)}")
    too_few = {c: n for c, n in counts.items() if n < n_folds}
    if too_few:
        raise ConfigError(
            f"{n_folds}-fold patient-level CV needs >= {n_folds} patients per class; "
            f"patients per class index: {dict(sorted(counts.items()))}: lower --folds"
        )
    patients = sorted(plabel)
    y = np.array([plabel[p] for p in patients])
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    slides_of: dict[str, list[str]] = defaultdict(list)
    for s, p in zip(slide_ids, patient_ids, strict=True):
        slides_of[p].append(s)
    rng = np.random.default_rng(seed)
    folds = []
    # folds are made over patients (one row each), then expanded to their slides
    for train_idx, test_idx in skf.split(np.zeros(len(patients)), y):
        train_p, val_p = _split_val([patients[i] for i in train_idx], plabel, val_fraction, rng)
        test_p = [patients[i] for i in test_idx]
        folds.append(
            Fold(
                tuple(sorted(s for p in train_p for s in slides_of[p])),
                tuple(sorted(s for p in val_p for s in slides_of[p])),
                tuple(sorted(s for p in test_p for s in slides_of[p])),
            )
        )
    check_no_leakage(folds, dict(zip(slide_ids, patient_ids, strict=True)))
    return folds


def fixed_split(slide_ids: Sequence[str], split_values: Sequence[str]) -> list[Fold]:
    """One fold from a manifest column of train / val / test values (case-insensitive)."""
    parts: dict[str, list[str]] = {k: [] for k in SPLIT_VALUES}
    for s, v in zip(slide_ids, split_values, strict=True):
        key = v.strip().lower()
        if key not in parts:
            raise ConfigError(
                f"slide {s}: split value {v!r} is not one of {', '.join(SPLIT_VALUES)}"
            )
        parts[key].append(s)
    if not parts["train"] or not parts["test"]:
        raise ConfigError("a fixed split needs at least one 'train' and one 'test' slide")
    return [
        Fold(
            tuple(sorted(parts["train"])), tuple(sorted(parts["val"])), tuple(sorted(parts["test"]))
        )
    ]


def check_no_leakage(folds: Sequence[Fold], patient_of: dict[str, str]) -> None:
    """Raise ConfigError if a patient appears in two of train/val/test of one fold, or (for k-fold
    splits with more than one fold) in the test sets of two folds."""
    for i, f in enumerate(folds):
        sets = {k: {patient_of[s] for s in getattr(f, k)} for k in SPLIT_VALUES}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            both = sets[a] & sets[b]
            if both:
                raise ConfigError(
                    f"fold {i}: patient(s) {sorted(both)[:5]} are in both {a} and {b}"
                )
    if len(folds) > 1:
        seen: dict[str, int] = {}
        for i, f in enumerate(folds):
            for p in {patient_of[s] for s in f.test}:
                if p in seen:
                    raise ConfigError(f"patient {p} is in the test sets of folds {seen[p]} and {i}")
                seen[p] = i


def save_splits(path: str | Path, folds: Sequence[Fold], meta: dict[str, Any]) -> None:
    """Write folds and how they were made (seed, n_folds, ...) to JSON, atomically."""
    atomic_write_json(
        path, {"version": SPLITS_VERSION, **meta, "folds": [f.to_json() for f in folds]}
    )


def load_splits(path: str | Path) -> tuple[list[Fold], dict[str, Any]]:
    """Inverse of `save_splits`: (folds, meta)."""
    try:
        d = json.loads(Path(path).read_text())
        folds = [Fold(tuple(f["train"]), tuple(f["val"]), tuple(f["test"])) for f in d.pop("folds")]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"splits file {path} is unreadable ({e}): delete it to make new splits"
        ) from None
    return folds, d


# ------------------------------------------------------------------ grouped tile-level splits
# Tiles (or ROIs) carry a class label and a group (source slide / patient). Every split below
# keeps each group on one side. With few groups and classes spread unevenly over them, exact
# stratification is impossible; the assignment is searched (seeded) to be as stratified as the
# groups allow.


def _group_table(labels: Sequence[int], groups: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(sorted group ids, counts (n_groups, n_classes)) of tiles per group and class."""
    if len(labels) != len(groups):
        raise ValueError("labels and groups must have the same length")
    gids = sorted(set(groups))
    y = np.asarray(labels, dtype=np.int64)
    n_classes = int(y.max()) + 1 if len(y) else 0
    table = np.zeros((len(gids), n_classes), dtype=np.int64)
    index = {g: i for i, g in enumerate(gids)}
    for g, c in zip(groups, y, strict=True):
        table[index[g], c] += 1
    return gids, table


def _assignment_cost(
    assign: np.ndarray, table: np.ndarray, n_parts: int, target: np.ndarray
) -> float:
    """Lower is better: tiles whose class is absent from the other parts (a test tile that no
    training side can learn), then squared deviation of each part's class mix from `target`."""
    total = table.sum(0)
    cost = 0.0
    for k in range(n_parts):
        part = table[assign == k].sum(0)
        rest = total - part
        cost += 1000.0 * float(part[(rest == 0) & (part > 0)].sum())
        n = part.sum()
        if n == 0:
            cost += 1e6
            continue
        cost += 100.0 * float(np.square(part / n - total / total.sum()).sum())
        cost += 100.0 * float(np.square(n / total.sum() - target[k]))
    return cost


def grouped_stratified_folds(
    labels: Sequence[int], groups: Sequence[str], n_folds: int, seed: int = 0, n_trials: int = 2000
) -> list[np.ndarray]:
    """Assign whole groups to `n_folds` test folds, stratified as far as the groups allow.

    labels: (n,) int class of each tile; groups: (n,) group id of each tile.
    Returns `n_folds` arrays of tile indices (each fold's test side); every tile is in exactly one,
    and a group never spans two folds. Raises ConfigError when there are fewer groups than folds.
    """
    gids, table = _group_table(labels, groups)
    if len(gids) < n_folds:
        raise ConfigError(
            f"{n_folds} grouped folds need at least {n_folds} groups, found {len(gids)} "
            f"({', '.join(gids[:10])}): lower the number of folds or check --group-regex"
        )
    rng = np.random.default_rng(seed)
    target = np.full(n_folds, 1.0 / n_folds)
    best, best_cost = None, math.inf
    base = np.arange(len(gids)) % n_folds
    for _ in range(n_trials):
        assign = rng.permutation(base)  # balanced group counts per fold
        c = _assignment_cost(assign, table, n_folds, target)
        if c < best_cost:
            best, best_cost = assign, c
    assert best is not None
    fold_of_group = dict(zip(gids, best.tolist(), strict=True))
    tile_fold = np.array([fold_of_group[g] for g in groups])
    return [np.flatnonzero(tile_fold == k) for k in range(n_folds)]


def grouped_holdout(
    labels: Sequence[int],
    groups: Sequence[str],
    fraction: float,
    seed: int = 0,
    n_trials: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
    """Split tile indices into (rest, held-out) with whole groups held out: about `fraction` of the
    tiles, class mix as close to the whole as the groups allow, preferring held-out classes that
    the rest also holds. Needs at least 2 groups."""
    gids, table = _group_table(labels, groups)
    if len(gids) < 2:
        raise ConfigError(
            f"a grouped held-out split needs at least 2 groups, found {len(gids)}: add groups, or "
            "split without grouping"
        )
    rng = np.random.default_rng(seed)
    total = table.sum(0)
    n_all = total.sum()
    best, best_cost = None, math.inf
    for _ in range(n_trials):
        k = int(rng.integers(1, len(gids)))  # 1 .. n_groups-1 held-out groups
        pick = np.zeros(len(gids), dtype=bool)
        pick[rng.choice(len(gids), size=k, replace=False)] = True
        held, rest = table[pick].sum(0), table[~pick].sum(0)
        cost = 1000.0 * float(held[(rest == 0) & (held > 0)].sum())
        cost += 100.0 * (held.sum() / n_all - fraction) ** 2 * 10
        cost += 100.0 * float(np.square(held / max(held.sum(), 1) - total / n_all).sum())
        if cost < best_cost:
            best, best_cost = pick, cost
    assert best is not None
    held_groups = {g for g, p in zip(gids, best.tolist(), strict=True) if p}
    is_held = np.array([g in held_groups for g in groups])
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def check_groups_disjoint(groups: Sequence[str], *parts: Sequence[int]) -> None:
    """Raise ConfigError if one group has tiles in two of `parts` (index arrays into groups)."""
    seen: dict[str, int] = {}
    for k, part in enumerate(parts):
        for g in {groups[int(i)] for i in part}:
            if g in seen and seen[g] != k:
                raise ConfigError(f"group {g} is on two sides of a split (parts {seen[g]} and {k})")
            seen[g] = k
