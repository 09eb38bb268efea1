"""The h5 layout of CLAM and TRIDENT files, and the level-0 box each loader reads per tile.

Both projects write every dataset the same way (CLAM `save_hdf5`, TRIDENT `save_h5`): dataset
chunks of one row, `(1,) + shape[1:]`, resizable rows, `maxshape = (None,) + shape[1:]`, and the
metadata as attributes of the dataset (mostly on `coords`), not of the file.

What a loader reads for a tile whose top-left is `coord` (level-0 px):

1. CLAM (`Whole_Slide_Bag_FP`): `read_region(coord, patch_level, (patch_size, patch_size))`, so
   `patch_size` is the side AT `patch_level`; the level-0 box side is
   `patch_size * level_downsample[patch_level]` (`clam_box_side_l0`);
2. TRIDENT (`WSIPatcher`): `patch_size` is the side at the target magnification; the level-0
   side is `round(patch_size * level0_magnification / target_magnification)`
   (`trident_box_side_l0`); it then reads the best level and resizes to `patch_size`.

Units: every `_l0` value is level-0 px; `_lvl` values are px at the read level.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipe.core.errors import StoreSchemaError

COORDS = "coords"
FEATURES = "features"
#: CLAM's feature folders (`extract_features_fp.py --feat_dir DIR`) and coords folder
#: (`create_patches_fp.py --save_dir DIR`)
CLAM_H5_DIR = "h5_files"
CLAM_PT_DIR = "pt_files"
CLAM_PATCHES_DIR = "patches"
#: TRIDENT: JOB/<mag>x_<px>px_<overlap>px_overlap/patches/<slide>_patches.h5 and
#: JOB/<mag>x_<px>px_<overlap>px_overlap/features_<encoder>/<slide>.h5
TRIDENT_PATCHES_DIR = "patches"
TRIDENT_PATCHES_SUFFIX = "_patches"
TRIDENT_FEATURES_PREFIX = "features_"
_TRIDENT_GRID_RE = re.compile(
    r"^(?P<mag>[0-9]+(?:\.[0-9]+)?)x_(?P<px>[0-9]+)px_(?P<ov>[0-9]+)px_overlap$"
)
#: TRIDENT's convention: 10x <-> 1.0 um/px (its `src_pixel_size = 10 / src_mag`)
UM_PER_PX_AT_1X = 10.0

#: attributes on `coords` that make a file CLAM-shaped / TRIDENT-shaped
CLAM_KEYS = ("patch_size", "patch_level")
TRIDENT_KEYS = ("patch_size", "level0_magnification", "target_magnification")


def write_h5(
    path: Path,
    arrays: Mapping[str, np.ndarray],
    array_attrs: Mapping[str, Mapping[str, Any]] | None = None,
    root_attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write `arrays` to a new h5 file at `path` in the CLAM/TRIDENT layout (one-row chunks,
    resizable rows, attributes on the datasets); atomic: `path` appears only when complete."""
    import h5py

    from wsi_pipe.core.fsutil import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, data in arrays.items():
            a = np.asarray(data)
            d = f.create_dataset(
                name,
                shape=a.shape,
                dtype=a.dtype,
                chunks=(1,) + tuple(max(1, s) for s in a.shape[1:]),
                maxshape=(None,) + a.shape[1:],
            )
            if len(a):
                d[:] = a
            for k, v in ((array_attrs or {}).get(name) or {}).items():
                d.attrs[k] = v
        for k, v in (root_attrs or {}).items():
            f.attrs[k] = v


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


@dataclass(frozen=True)
class H5Content:
    """A CLAM/TRIDENT h5 file read whole: arrays, their attributes and the file's attributes."""

    path: Path
    arrays: dict[str, np.ndarray]
    array_attrs: dict[str, dict[str, Any]]
    root_attrs: dict[str, Any]


def read_h5(path: Path, names: tuple[str, ...] | None = None) -> H5Content:
    """Datasets `names` (default all) of an h5 file with every attribute as plain Python values.
    Raises StoreSchemaError naming the file when it is not a readable h5 file."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            keep = [
                n for n in f if isinstance(f[n], h5py.Dataset) and (names is None or n in names)
            ]
            arrays = {n: np.asarray(f[n][()]) for n in keep}
            attrs = {n: {k: _plain(v) for k, v in f[n].attrs.items()} for n in keep}
            root = {k: _plain(v) for k, v in f.attrs.items()}
    except OSError as e:
        raise StoreSchemaError(
            f"{path} is not a readable h5 file ({e}): replace it with the file CLAM/TRIDENT wrote"
        ) from None
    return H5Content(path, arrays, attrs, root)


def read_h5_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """(shape of every dataset, attributes of `coords` or {}) without reading the data."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            shapes = {n: tuple(f[n].shape) for n in f if isinstance(f[n], h5py.Dataset)}
            attrs = {k: _plain(v) for k, v in f[COORDS].attrs.items()} if COORDS in shapes else {}
    except OSError as e:
        raise StoreSchemaError(
            f"{path} is not a readable h5 file ({e}): replace it with the file CLAM/TRIDENT wrote"
        ) from None
    return shapes, attrs


# ------------------------------------------------------------------- what each loader reads
def first(value: Any) -> float:
    """A scalar attribute, or the first of a per-axis pair (CLAM's `downsample` is (x, y))."""
    if isinstance(value, list | tuple | np.ndarray):
        return float(np.asarray(value, dtype=np.float64).ravel()[0])
    return float(value)


def clam_box_side_l0(patch_size_lvl: int, level_downsample: float) -> float:
    """Level-0 side of the box CLAM reads: `patch_size` px at a level of that downsample."""
    return float(patch_size_lvl) * float(level_downsample)


def trident_box_side_l0(
    patch_size: int, level0_magnification: float, target_magnification: float
) -> int:
    """Level-0 side of the box TRIDENT reads (`round(patch_size * src_mag / dst_mag)`)."""
    return int(round(float(patch_size) * float(level0_magnification) / float(target_magnification)))


def is_trident_attrs(attrs: Mapping[str, Any]) -> bool:
    return all(k in attrs for k in TRIDENT_KEYS)


def is_clam_attrs(attrs: Mapping[str, Any]) -> bool:
    return all(k in attrs for k in CLAM_KEYS)


def clam_coords_attrs(
    *,
    slide_id: str,
    read_level: int,
    read_size_px: int,
    level_downsample: float,
    level_dim: tuple[int, int],
    tile_px: int,
    tile_size_level0: int,
    save_path: str,
) -> dict[str, Any]:
    """`coords` attributes that CLAM reads correctly: `patch_size` = the read size AT
    `patch_level` (what `Whole_Slide_Bag_FP` reads), `target_patch_size` = the side CLAM's
    extractor should resize to (`extract_features_fp.py --target_patch_size`),
    `patch_size_level0` = the tile side in level-0 px (the same in either reading).

    No TRIDENT magnification keys: TRIDENT then falls back to its CLAM reader (patch_size at patch_level)
    instead of misreading `patch_size` as a side at the target magnification.
    """
    return {
        "patch_size": int(read_size_px),
        "patch_level": int(read_level),
        "downsample": np.array([level_downsample, level_downsample], dtype=np.float64),
        "downsampled_level_dim": np.array(level_dim, dtype=np.int64),
        "level_dim": np.array(level_dim, dtype=np.int64),
        "name": slide_id,
        "save_path": save_path,
        "target_patch_size": int(tile_px),
        "patch_size_level0": int(tile_size_level0),
    }


# ------------------------------------------------------------------------- TRIDENT folders
@dataclass(frozen=True)
class TridentGrid:
    """What a TRIDENT grid folder's name says: `<mag>x_<px>px_<overlap>px_overlap`."""

    magnification: float
    patch_size: int
    overlap: int


def parse_trident_grid_dir(name: str) -> TridentGrid | None:
    """`20x_256px_0px_overlap` -> TridentGrid(20.0, 256, 0); None for any other name."""
    m = _TRIDENT_GRID_RE.match(name)
    if m is None:
        return None
    return TridentGrid(float(m["mag"]), int(m["px"]), int(m["ov"]))


def trident_slide_name(path: Path) -> str:
    """Slide name of a TRIDENT coords file: `<name>_patches.h5` -> `<name>`."""
    stem = path.stem
    return stem[: -len(TRIDENT_PATCHES_SUFFIX)] if stem.endswith(TRIDENT_PATCHES_SUFFIX) else stem


def nominal_mpp(magnification: float) -> float:
    """um/px of a nominal magnification in TRIDENT's convention (20x -> 0.5)."""
    return UM_PER_PX_AT_1X / float(magnification)
