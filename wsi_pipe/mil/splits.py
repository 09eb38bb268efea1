"""Patient-level stratified k-fold splits, persisted as JSON.

Slides are grouped by patient: every slide of a patient lands in the same fold (train, val or
test of that fold), so no patient's tissue is seen in training and testing of one fold.
Stratification uses one label per patient (the most common label of its slides).
"""

from __future__ import annotations

import json
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
    return [Fold(tuple(sorted(parts["train"])), tuple(sorted(parts["val"])), tuple(sorted(parts["test"])))]


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
        raise ConfigError(f"splits file {path} is unreadable ({e}): delete it to make new splits") from None
    return folds, d
