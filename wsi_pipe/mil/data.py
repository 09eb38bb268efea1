"""Bags for MIL: from feature stores + a manifest, or from classic MIL benchmark CSVs.

A bag is one slide (or one benchmark bag): features (n_tiles, dim) float32 and, for slides, the
level-0 coords (n_tiles, 2) int64 of the same rows. Store-backed bags load lazily, so a cohort
larger than memory trains bag by bag; `materialize` keeps them in memory when they fit.

A feature set is a name under RUN_DIR/features, or the path of a CLAM `h5_files/` / `pt_files/`
or TRIDENT `features_<enc>/` folder (`wsi_pipe.interop.features`): its files are matched to the
manifest's slide_id by file stem, and their bags load through the same `Bag.load`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipe.core.errors import ConfigError, EmptyInputError, StoreSchemaError
from wsi_pipe.core.layout import RunLayout, parse_mpp_tag
from wsi_pipe.core.manifest import SlideEntry, resolve_slide_path
from wsi_pipe.mil.ordering import stride_from_attrs

log = logging.getLogger(__name__)


@dataclass
class Bag:
    """One bag. label: int class index (-1 = unknown); n_tiles rows of `dim` features."""

    bag_id: str
    label: int
    patient_id: str
    n_tiles: int
    dim: int
    features: np.ndarray | None = field(default=None, repr=False)
    coords: np.ndarray | None = field(default=None, repr=False)
    store_path: Path | None = None
    tile_size_l0: float | None = None
    slide_path: str | None = None
    #: "store" (a wsi-pipe feature store) or "foreign" (a CLAM/TRIDENT .h5 / .pt file)
    source: str = "store"
    #: grid stride in level-0 px as the store recorded it (`stride_level0`); None = infer
    stride_l0: float | None = None

    def load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(features (n, dim) float32, coords (n, 2) int64 level-0 px or None)."""
        if self.features is not None:
            return self.features, self.coords
        if self.store_path is None:
            raise ValueError(f"bag {self.bag_id} has neither features nor a store")
        if self.source == "foreign":
            from wsi_pipe.interop.features import load_features

            return load_features(self.store_path)
        from wsi_pipe.store import open_store, schema

        with open_store(self.store_path) as r:
            feats = np.asarray(r.read(schema.FEATURES), dtype=np.float32)
            coords = np.asarray(r.read(schema.COORDS), dtype=np.int64)
        return feats, coords

    def materialize(self) -> None:
        """Keep features and coords in memory from now on."""
        self.features, self.coords = self.load()

    @property
    def nbytes(self) -> int:
        return self.n_tiles * self.dim * 4


def encode_labels(labels: Sequence[str]) -> list[str]:
    """Sorted class names (numerically when every label is an integer)."""
    uniq = set(labels)
    try:
        return sorted(uniq, key=lambda s: (int(s), s))
    except ValueError:
        return sorted(uniq)


def resolve_feature_source(
    layout: RunLayout, features: str | None, mpp: float | None
) -> tuple[str, float]:
    """The feature set and grid mpp to train on: the given ones, or the only ones in the run.

    `features` naming a folder that is not a feature set of the run is a CLAM/TRIDENT feature
    folder: returned as its absolute path, with the grid's nominal mpp when its files say it
    (TRIDENT) and -1.0 (unknown) otherwise; `mpp` is then a label only.
    """
    sets = layout.feature_sets()
    if (
        features is not None
        and features not in sets
        and (is_foreign_set(features) or Path(features).is_dir())
    ):
        from wsi_pipe.interop.features import open_feature_folder

        folder = open_feature_folder(features)
        return str(folder.path), float(mpp) if mpp is not None else _foreign_mpp(folder.path)
    if features is None:
        if len(sets) != 1:
            raise ConfigError(
                f"{layout.root}: found feature sets {sets or 'none'}; "
                + ("run `wsi-pipe extract` first" if not sets else "choose one with --features")
            )
        features = sets[0]
    elif features not in sets:
        raise ConfigError(
            f"{layout.root}: no feature set {features!r} (found {sets or 'none'}): run "
            "`wsi-pipe extract` or fix --features"
        )
    fdir = layout.feature_set_dir(features)
    mpps = sorted(
        parse_mpp_tag(p.name) for p in fdir.iterdir() if p.is_dir() and p.name.startswith("mpp")
    )
    if mpp is None:
        if len(mpps) != 1:
            raise ConfigError(
                f"feature set {features!r} has grids {mpps or 'none'} (um/px): choose one with --mpp"
            )
        mpp = mpps[0]
    elif not any(abs(m - mpp) < 1e-9 for m in mpps):
        raise ConfigError(f"feature set {features!r} has no grid at {mpp} um/px (found {mpps})")
    return features, float(mpp)


def is_foreign_set(feature_set: str) -> bool:
    """True when `feature_set` is a path (CLAM/TRIDENT feature folder), not a set name: set
    names never hold a path separator, and `resolve_feature_source` makes such paths absolute."""
    return Path(feature_set).is_absolute() or "/" in feature_set or "\\" in feature_set


def _foreign_mpp(path: Path) -> float:
    from wsi_pipe.interop.h5io import nominal_mpp, parse_trident_grid_dir

    grid = parse_trident_grid_dir(path.parent.name)
    return nominal_mpp(grid.magnification) if grid is not None else -1.0


def feature_set_label(feature_set: str) -> str:
    """Short name of a feature set for output folders (a foreign folder's encoder / dir name)."""
    if not is_foreign_set(feature_set):
        return feature_set
    from wsi_pipe.interop.features import open_feature_folder

    return open_feature_folder(feature_set).label


#: What a bag source says of one slide's file: None (no file), else (path, n_tiles, dim, the
#: remaining Bag fields).
_Header = tuple[Path, int, int, dict[str, Any]] | None


def _gather_bags(
    entries: Sequence[SlideEntry],
    classes: Sequence[str],
    header: Callable[[SlideEntry], _Header],
) -> tuple[list[Bag], list[str], list[str], dict[int, list[str]]]:
    """(bags, missing ids, empty ids, ids by feature width) of `entries`, whatever the source."""
    missing, empty, bags = [], [], []
    dims: dict[int, list[str]] = {}
    for e in entries:
        h = header(e)
        if h is None:
            missing.append(e.slide_id)
            continue
        p, n, d, extra = h
        if n == 0:
            empty.append(e.slide_id)
            continue
        dims.setdefault(int(d), []).append(e.slide_id)
        label = classes.index(str(e.label)) if (e.label and str(e.label) in classes) else -1
        bags.append(Bag(e.slide_id, label, e.patient_id, int(n), int(d), store_path=p, **extra))
    return bags, missing, empty, dims


def _foreign_header(folder: Any, e: SlideEntry) -> _Header:
    """A CLAM/TRIDENT feature file, matched by file stem (no slide path or stride recorded)."""
    p = folder.find(e.slide_id)
    if p is None:
        return None
    n, d, tile_l0 = folder.header(p)
    return p, int(n), int(d), {"tile_size_l0": tile_l0, "slide_path": e.path or None,
                               "source": "foreign"}  # fmt: skip


def _store_header(layout: RunLayout, feature_set: str, mpp: float, e: SlideEntry) -> _Header:
    """A wsi-pipe feature store: its tile size, slide path and grid stride as recorded."""
    from wsi_pipe.store import open_store, schema

    p = layout.find_feature_store(feature_set, e.slide_id, mpp)
    if p is None:
        return None
    with open_store(p) as r:
        if r.attrs.get("kind") != schema.KIND_FEATURES or schema.FEATURES not in r.names:
            raise StoreSchemaError(f"{p} is not a feature store: re-run `wsi-pipe extract`")
        n, d = r.shape(schema.FEATURES)
        tile_l0 = r.attrs.get("tile_size_level0") or r.attrs.get("patch_size_level0")
        stored_path = r.attrs.get("slide_path")
        stride_l0 = stride_from_attrs(r.attrs)
    path = resolve_slide_path(e.slide_id, e.path, stored_path, fix="", must_exist=False)
    return p, int(n), int(d), {"tile_size_l0": int(tile_l0) if tile_l0 else None,
                               "slide_path": path or None, "stride_l0": stride_l0}  # fmt: skip


def bags_from_entries(
    layout: RunLayout,
    entries: Sequence[SlideEntry],
    feature_set: str,
    mpp: float,
    classes: Sequence[str] | None = None,
    require_labels: bool = True,
) -> tuple[list[Bag], list[str]]:
    """Store-backed bags of manifest entries; checks everything before any training starts.

    classes: fixed class names (prediction with a trained model); None = derive from the labels.
    Raises ConfigError for missing labels, a single class, unknown labels, slides without
    feature stores or with empty ones, and mixed feature widths (each message names the slides).
    """
    if not entries:
        raise EmptyInputError("no slides given")
    if require_labels:
        unlabeled = [e.slide_id for e in entries if not e.label]
        if unlabeled:
            raise ConfigError(
                f"slides without a label: {_few(unlabeled)}: fill the manifest's label column"
            )
        labels = [str(e.label) for e in entries]
        if classes is None:
            classes = encode_labels(labels)
            if len(classes) < 2:
                raise ConfigError(
                    f"every slide has label {classes[0]!r}: training needs at least two classes"
                )
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise ConfigError(f"labels {unknown} are not among the model's classes {list(classes)}")
    classes = list(classes or [])
    if is_foreign_set(feature_set):
        from wsi_pipe.interop.features import open_feature_folder

        folder = open_feature_folder(feature_set)
        bags, missing, empty, dims = _gather_bags(
            entries, classes, partial(_foreign_header, folder)
        )
        _check_bags(missing, empty, dims, feature_set, f"{feature_set} (matched by file stem)")
        return bags, classes
    bags, missing, empty, dims = _gather_bags(
        entries, classes, partial(_store_header, layout, feature_set, mpp)
    )
    _check_bags(missing, empty, dims, feature_set, str(layout.features_dir(feature_set, mpp)))
    return bags, classes


def _check_bags(
    missing: list[str],
    empty: list[str],
    dims: dict[int, list[str]],
    feature_set: str,
    where: str,
) -> None:
    if missing:
        raise ConfigError(
            f"{len(missing)} slide(s) have no feature store in {where}: "
            f"{_few(missing)}; run `wsi-pipe extract` on them or remove them from the manifest"
        )
    if empty:
        raise ConfigError(
            f"{len(empty)} slide(s) have no tiles (empty feature store): {_few(empty)}; "
            "remove them from the manifest"
        )
    if len(dims) > 1:
        detail = "; ".join(f"dim {d}: {_few(s)}" for d, s in dims.items())
        raise StoreSchemaError(
            f"feature stores of {feature_set!r} have different widths ({detail})"
        )


def _few(items: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(items[:k])
    return shown + (f" and {len(items) - k} more" if len(items) > k else "")


def load_benchmark_csv(path: str | Path) -> list[Bag]:
    """Classic MIL benchmark CSV (MUSK1/2, UCSB breast cancer; `.csv` or `.csv.gz`): no header,
    column 0 the bag label (0/1), column 1 the bag id, the rest instance features.

    Returns one in-memory Bag per bag id (sorted by id; patient = bag). Raises ConfigError when a
    bag's rows disagree on the label.
    """
    import pandas as pd

    df = pd.read_csv(path, header=None)
    if df.shape[1] < 3:
        raise ConfigError(
            f"{path}: expected label, bag id and >= 1 feature column, got {df.shape[1]}"
        )
    labels = df.iloc[:, 0].to_numpy()
    ids = df.iloc[:, 1].to_numpy()
    feats = df.iloc[:, 2:].to_numpy(dtype=np.float32)
    bags = []
    order = np.argsort(ids, kind="stable")
    ids, labels, feats = ids[order], labels[order], feats[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    classes = encode_labels([str(v) for v in np.unique(labels)])
    for s, e in zip(starts, ends, strict=True):
        lab = np.unique(labels[s:e])
        if len(lab) != 1:
            raise ConfigError(f"{path}: bag {ids[s]} has mixed labels {lab.tolist()}")
        bid = str(ids[s])
        bags.append(
            Bag(
                bid,
                classes.index(str(lab[0])),
                bid,
                int(e - s),
                feats.shape[1],
                features=feats[s:e],
            )
        )
    return bags


def synthetic_bags(
    n_bags: int,
    dim: int = 16,
    n_classes: int = 2,
    bag_size: tuple[int, int] = (20, 40),
    n_key: tuple[int, int] = (1, 3),
    shift: float = 2.5,
    seed: int = 0,
    grid_px: int = 256,
) -> tuple[list[Bag], list[np.ndarray]]:
    """A MIL task whose label depends on a few key instances (for tests and demos).

    Background instances are N(0, I). A bag of class c > 0 holds `n_key` key instances shifted by
    `shift` along class c's own block of dimensions; class-0 bags hold none. Tiles sit on a
    random square grid of `grid_px` level-0 px. Returns (bags, key_masks (n_tiles,) bool per bag).
    """
    rng = np.random.default_rng(seed)
    block = max(1, dim // max(1, n_classes - 1))
    bags, keys = [], []
    for i in range(n_bags):
        label = i % n_classes
        n = int(rng.integers(bag_size[0], bag_size[1] + 1))
        x = rng.standard_normal((n, dim)).astype(np.float32)
        key = np.zeros(n, dtype=bool)
        if label > 0:
            k = int(rng.integers(n_key[0], n_key[1] + 1))
            idx = rng.choice(n, k, replace=False)
            lo = ((label - 1) * block) % dim
            x[np.ix_(idx, np.arange(lo, min(dim, lo + block)))] += shift
            key[idx] = True
        side = int(np.ceil(np.sqrt(n))) + 2
        cells = rng.choice(side * side, n, replace=False)
        coords = np.stack([cells % side, cells // side], 1).astype(np.int64) * grid_px
        bags.append(
            Bag(
                f"bag{i:04d}",
                label,
                f"p{i:04d}",
                n,
                dim,
                features=x,
                coords=coords,
                tile_size_l0=grid_px,
            )
        )
        keys.append(key)
    return bags, keys
