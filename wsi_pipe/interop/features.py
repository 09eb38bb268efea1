"""A CLAM or TRIDENT feature folder used as a wsi-pipe feature set.

Accepted folders (the kind is told by the folder's name and checked on its first file):

    CLAM     <feat_dir>/h5_files/<slide>.h5   `features` (N, D) + `coords` (N, 2) level-0 px
             <feat_dir>/pt_files/<slide>.pt   the features tensor (N, D) alone: no coords
    TRIDENT  <job>/<mag>x_<px>px_<ov>px_overlap/features_<enc>/<slide>.h5
             `features` (N, D) + `coords` (N, 2) with TRIDENT's coords attributes
             (a `.pt` there holds the features array alone, like CLAM's pt_files)

1. `open_feature_folder(path)` lists the files, keyed by file stem (= the manifest's slide_id);
   a folder of another shape raises ConfigError naming it and what to point at instead;
2. `FeatureFolder.header(slide_id)` gives (n_tiles, dim, tile side in level-0 px or None)
   without reading the features; `load_features(path)` reads (features float32, coords or None).

The tile side comes from the `coords` attributes: TRIDENT's `patch_size * level0_magnification
/ target_magnification`, CLAM's `patch_size * downsample` (both as docs/interop.md states);
None when absent (CLAM's own h5_files carry no attributes: heatmaps then use the grid stride).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipe.core.errors import ConfigError, StoreSchemaError
from wsi_pipe.interop import h5io

FEATURE_SUFFIXES = (".h5", ".pt")


@dataclass(frozen=True)
class FeatureFolder:
    """A foreign feature folder. kind: 'clam_h5' | 'clam_pt' | 'trident'."""

    path: Path
    kind: str
    files: dict[str, Path] = field(repr=False)

    @property
    def label(self) -> str:
        """Short name for output folders: TRIDENT's encoder name, else the CLAM feat_dir name."""
        name = self.path.name
        if name.startswith(h5io.TRIDENT_FEATURES_PREFIX):
            return name[len(h5io.TRIDENT_FEATURES_PREFIX) :] or "trident"
        return self.path.parent.name or "clam"

    @property
    def has_coords(self) -> bool:
        return self.kind != "clam_pt" and all(p.suffix == ".h5" for p in self.files.values())

    def find(self, slide_id: str) -> Path | None:
        """The file of `slide_id` (by stem; a slide_id with a slide extension is stripped)."""
        from wsi_pipe.core.manifest import slide_stem

        return self.files.get(slide_id) or self.files.get(slide_stem(Path(slide_id)))

    def header(self, path: Path) -> tuple[int, int, float | None]:
        """(n_tiles, dim, tile side in level-0 px or None) of one of this folder's files."""
        if path.suffix == ".pt":
            feats = load_pt(path)
            return int(feats.shape[0]), int(feats.shape[1]), None
        shapes, attrs = h5io.read_h5_header(path)
        if h5io.FEATURES not in shapes or len(shapes[h5io.FEATURES]) != 2:
            raise StoreSchemaError(
                f"{path} has no (N, D) `features` dataset (found {sorted(shapes)}): a CLAM "
                "h5_files/ or TRIDENT features_<enc>/ file holds `features` and `coords`"
            )
        n, d = shapes[h5io.FEATURES]
        if h5io.COORDS in shapes and shapes[h5io.COORDS] != (n, 2):
            raise StoreSchemaError(
                f"{path}: `coords` is {shapes[h5io.COORDS]}, `features` has {n} rows: the file is "
                "damaged; re-extract that slide"
            )
        return int(n), int(d), tile_side_l0(attrs)


def tile_side_l0(coords_attrs: dict[str, Any]) -> float | None:
    """Tile side in level-0 px told by a CLAM/TRIDENT `coords` attribute set, else None."""
    if h5io.is_trident_attrs(coords_attrs):
        return float(
            h5io.trident_box_side_l0(
                int(coords_attrs["patch_size"]),
                float(coords_attrs["level0_magnification"]),
                float(coords_attrs["target_magnification"]),
            )
        )
    if h5io.is_clam_attrs(coords_attrs) and "downsample" in coords_attrs:
        return h5io.clam_box_side_l0(
            int(coords_attrs["patch_size"]), h5io.first(coords_attrs["downsample"])
        )
    return None


def is_feature_folder(path: str | Path) -> bool:
    """True when `path` names an existing folder (not a wsi-pipe feature set name)."""
    return Path(path).is_dir()


def open_feature_folder(path: str | Path) -> FeatureFolder:
    """The feature folder at `path`; raises ConfigError naming the folder and the fix."""
    p = Path(path).resolve()
    if not p.is_dir():
        raise ConfigError(f"feature folder {p} does not exist")
    files = {f.stem: f for f in sorted(p.iterdir()) if f.is_file() and f.suffix in FEATURE_SUFFIXES}
    if p.name == h5io.CLAM_PT_DIR:
        kind = "clam_pt"
    elif p.name == h5io.CLAM_H5_DIR:
        kind = "clam_h5"
    elif p.name.startswith(h5io.TRIDENT_FEATURES_PREFIX):
        kind = "trident"
    else:
        kind = ""
    if not kind or not files:
        sub = [d.name for d in sorted(p.iterdir()) if d.is_dir()] if p.is_dir() else []
        hint = ""
        for want in (h5io.CLAM_H5_DIR, h5io.CLAM_PT_DIR):
            if want in sub:
                hint = f"; it holds {want}/: give {p / want}"
        trident = [s for s in sub if s.startswith(h5io.TRIDENT_FEATURES_PREFIX)]
        if trident:
            hint = f"; it holds {trident[0]}/: give {p / trident[0]}"
        what = "no .h5/.pt feature files" if kind else "not a CLAM or TRIDENT feature folder"
        raise ConfigError(
            f"{p}: {what}. Give CLAM's FEAT_DIR/h5_files (or pt_files) or TRIDENT's "
            f"JOB/<mag>x_<px>px_<ov>px_overlap/features_<encoder> folder{hint}"
        )
    if kind in ("clam_h5", "trident"):
        stray = [f.name for f in files.values() if f.suffix != ".h5"]
        if kind == "clam_h5" and stray:
            raise ConfigError(f"{p}: CLAM's h5_files/ holds .h5 files only, found {stray[:3]}")
        first_h5 = next((f for f in files.values() if f.suffix == ".h5"), None)
        if first_h5 is not None:
            shapes, _ = h5io.read_h5_header(first_h5)
            if h5io.FEATURES not in shapes:
                raise ConfigError(
                    f"{first_h5} has no `features` dataset (found {sorted(shapes)}): {p} looks like "
                    "a coords folder; give it to `wsi-pipe extract --coords` and extract features"
                )
    return FeatureFolder(p, kind, files)


def _numpy_safe_globals() -> list[Any]:
    """What torch's weights-only loader needs to rebuild a plain numpy array (TRIDENT's .pt)."""
    import importlib

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
    _reconstruct = multiarray._reconstruct
    dtype_classes = [type(np.dtype(t)) for t in ("float32", "float16", "float64")]
    return [_reconstruct, np.ndarray, np.dtype, *dtype_classes]


def load_pt(path: Path) -> np.ndarray:
    """The (N, D) features of a CLAM `pt_files/` tensor or a TRIDENT `.pt` numpy array, loaded
    with `weights_only=True` (no code from the file runs)."""
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StoreSchemaError(
            f"{path} could not be loaded as a features tensor ({type(e).__name__}): CLAM's "
            "pt_files/ hold one (N, D) tensor; re-extract that slide"
        ) from None
    if isinstance(obj, dict) and "features" in obj:
        obj = obj["features"]
    arr = obj.numpy() if isinstance(obj, torch.Tensor) else np.asarray(obj)
    if arr.ndim != 2:
        raise StoreSchemaError(f"{path} holds an array of shape {arr.shape}, not (N, D) features")
    return np.asarray(arr, dtype=np.float32)


def load_features(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(features (N, D) float32, coords (N, 2) int64 level-0 px or None) of one file."""
    if path.suffix == ".pt":
        return load_pt(path), None
    c = h5io.read_h5(path, (h5io.FEATURES, h5io.COORDS))
    feats = np.asarray(c.arrays[h5io.FEATURES], dtype=np.float32)
    coords = c.arrays.get(h5io.COORDS)
    return feats, (None if coords is None else np.asarray(coords, dtype=np.int64).reshape(-1, 2))
