"""CLAM / TRIDENT coords folders turned into wsi-pipe coords stores, at the slides' true mpp.

Accepted folders:

    CLAM     <save_dir>/patches/<slide>.h5 (or <save_dir>): `coords` (N, 2) level-0 px with
             `patch_size` (side AT `patch_level`), `patch_level`, `downsample`, `level_dim`, ...
    TRIDENT  <job>/<mag>x_<px>px_<ov>px_overlap[/patches]/<slide>_patches.h5: `coords` with
             `patch_size` (side at the target magnification), `level0_magnification`,
             `target_magnification`, `overlap`, `level0_width`, `level0_height`, ...

Per slide (`plan_slide`, with the slide open in one of our readers):
1. CLAM: read `patch_size` px at `patch_level`, exactly as CLAM does; the level's downsample and
   size must match the slide (else the coords were made on another file). Tile side in level-0
   px = patch_size * level downsample; `target_patch_size` (wsi-pipe's CLAM export writes it) is
   the tile px, else patch_size; true target mpp = level-0 mpp * side_l0 / tile_px.
2. TRIDENT: level-0 side = patch_size * level0_magnification / target_magnification (TRIDENT's
   own arithmetic; its magnifications are nominal labels), read at our best level for that
   ratio; true target mpp = the slide's level-0 mpp (our readers' metadata) * that ratio. When
   it differs from the nominal 10 / target_magnification by more than `MPP_TOLERANCE`, a warning
   names the slide and both values (e.g. 20x of a 0.263 um/px "40x" slide is 0.526 um/px).
3. The grid folder of the import (`choose_grid_mpp`) is one mpp for all slides: the one given,
   else TRIDENT's nominal mpp, else (CLAM) the median true mpp rounded to 2 significant digits.
   Each store keeps its slide's true `target_mpp` (and the folder's as `grid_mpp`).

The store (`imported_store`) follows store/schema.py: `tissue_fraction` is NaN (unknown: the
foreign tool's tissue test is not ours), `parent_index` -1 (no coarser grid), rows in the order
of the source file, so features extracted from it line up with the source's rows.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipe.core.errors import ConfigError, StoreSchemaError
from wsi_pipe.interop import h5io

#: relative difference between a slide's true target mpp and the project's nominal one that is
#: reported (scanners' "40x" spans 0.22-0.27 um/px)
MPP_TOLERANCE = 0.02
#: relative tolerance on a CLAM file's `downsample` against the slide's level downsample
_DOWNSAMPLE_TOLERANCE = 0.01


@dataclass(frozen=True)
class CoordsFolder:
    """A foreign coords folder: format 'clam' | 'trident', files keyed by slide name."""

    path: Path
    fmt: str
    files: dict[str, Path]
    trident_grid: h5io.TridentGrid | None = None


def _h5_files(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if f.is_file() and f.suffix == ".h5")


def open_coords_folder(path: str | Path) -> CoordsFolder:
    """The coords folder at `path` (see module doc); ConfigError naming it and the fix."""
    p = Path(path).resolve()
    if not p.is_dir():
        raise ConfigError(f"coords folder {p} does not exist")
    grid = h5io.parse_trident_grid_dir(p.name)
    patches = p / h5io.CLAM_PATCHES_DIR
    if patches.is_dir():
        d = patches
    else:
        d = p
        if p.name == h5io.TRIDENT_PATCHES_DIR:
            grid = h5io.parse_trident_grid_dir(p.parent.name)
    files = _h5_files(d)
    if not files:
        raise ConfigError(
            f"{p} holds no coords .h5 files: give CLAM's SAVE_DIR/patches folder or TRIDENT's "
            "JOB/<mag>x_<px>px_<overlap>px_overlap folder"
        )
    shapes, attrs = h5io.read_h5_header(files[0])
    if h5io.COORDS not in shapes or len(shapes[h5io.COORDS]) != 2 or shapes[h5io.COORDS][1] != 2:
        raise ConfigError(
            f"{files[0]} has no (N, 2) `coords` dataset (found {sorted(shapes)}): give a CLAM "
            "patches/ or TRIDENT .../patches/ folder of coords files"
        )
    if "schema_version" in h5io.read_h5(files[0], ()).root_attrs:
        raise ConfigError(
            f"{files[0]} is a wsi-pipe store: run `wsi-pipe extract` in the run that holds it "
            "instead of importing it"
        )
    if h5io.is_trident_attrs(attrs):
        names = {h5io.trident_slide_name(f): f for f in files}
        return CoordsFolder(d, "trident", names, grid)
    if h5io.is_clam_attrs(attrs):
        return CoordsFolder(d, "clam", {f.stem: f for f in files}, None)
    raise ConfigError(
        f"{files[0]}: `coords` has attributes {sorted(attrs)}, neither CLAM's "
        f"({', '.join(h5io.CLAM_KEYS)}) nor TRIDENT's ({', '.join(h5io.TRIDENT_KEYS)}): "
        "re-run the patching step of that tool, or give its patches/ folder"
    )


@dataclass(frozen=True)
class GridPlan:
    """How one imported slide is read (sizes in level-0 px unless suffixed)."""

    read_level: int
    read_size_px: int
    level_downsample: float
    level_dim: tuple[int, int]
    tile_px: int
    overlap_px: int
    tile_size_l0_exact: float
    tile_size_l0: int
    level0_mpp: float
    target_mpp: float
    nominal_mpp: float | None
    warning: str | None = None


def _check_dims(slide_id: str, src: Path, attrs: dict[str, Any], reader: Any) -> None:
    want_w, want_h = attrs.get("level0_width"), attrs.get("level0_height")
    dims = tuple(int(v) for v in reader.dimensions)
    if want_w is not None and want_h is not None and dims != (int(want_w), int(want_h)):
        raise StoreSchemaError(
            f"slide {slide_id}: {src} was made on a {want_w}x{want_h} slide but "
            f"{reader.path} is {dims[0]}x{dims[1]} px: give the slide the coords were made on"
        )


def plan_slide(fmt: str, slide_id: str, src: Path, attrs: dict[str, Any], reader: Any) -> GridPlan:
    """Read plan of one slide's foreign coords (steps 1-2 of the module doc)."""
    mpp0 = float(reader.mpp)
    _check_dims(slide_id, src, attrs, reader)
    dss = [float(v) for v in reader.level_downsamples]
    dims = [(int(w), int(h)) for w, h in reader.level_dimensions]  # (w, h) px per level
    if fmt == "clam":
        level = int(attrs["patch_level"])
        if not 0 <= level < len(dss):
            raise StoreSchemaError(
                f"slide {slide_id}: {src} reads level {level} but {reader.path} has {len(dss)} "
                "level(s): the coords were made on another file; give that slide"
            )
        ds = dss[level]
        if "downsample" in attrs:
            theirs = h5io.first(attrs["downsample"])
            if abs(theirs - ds) > _DOWNSAMPLE_TOLERANCE * ds:
                raise StoreSchemaError(
                    f"slide {slide_id}: {src} says level {level} is downsampled {theirs:g}x, "
                    f"{reader.path} has {ds:g}x there: the coords were made on another file"
                )
        size = int(attrs["patch_size"])
        side = h5io.clam_box_side_l0(size, ds)
        tile_px = int(attrs.get("target_patch_size") or size)
        if tile_px <= 0:
            tile_px = size
        return GridPlan(
            level,
            size,
            ds,
            dims[level],
            tile_px,
            0,
            side,
            max(1, int(round(side))),
            mpp0,
            mpp0 * side / tile_px,
            None,
        )
    size = int(attrs["patch_size"])
    mag0, mag = float(attrs["level0_magnification"]), float(attrs["target_magnification"])
    if not (mag0 > 0 and mag > 0):
        raise StoreSchemaError(f"slide {slide_id}: {src} has magnifications {mag0}, {mag}")
    ratio = mag0 / mag
    side = size * ratio
    level = int(reader.best_level_for_downsample(ratio))
    ds = dss[level]
    true_mpp = mpp0 * ratio
    nominal = h5io.nominal_mpp(mag)
    warning = None
    if abs(true_mpp - nominal) > MPP_TOLERANCE * nominal:
        warning = (
            f"slide {slide_id}: TRIDENT's {mag:g}x of a {mag0:g}x slide is nominally "
            f"{nominal:g} um/px, but {reader.path.name} is {mpp0:.4g} um/px at level 0 "
            f"({reader.mpp_source}), so its tiles are {true_mpp:.4g} um/px; the true value is used"
        )
    return GridPlan(
        level,
        max(1, int(round(side / ds))),
        ds,
        dims[level],
        size,
        int(attrs.get("overlap", 0) or 0),
        side,
        h5io.trident_box_side_l0(size, mag0, mag),
        mpp0,
        true_mpp,
        nominal,
        warning,
    )


def choose_grid_mpp(folder: CoordsFolder, plans: Sequence[GridPlan], given: float | None) -> float:
    """The one grid mpp (run folder tiles/mpp<M>/) of an import: step 3 of the module doc."""
    if given is not None:
        return float(given)
    nominal = [p.nominal_mpp for p in plans if p.nominal_mpp is not None]
    if folder.trident_grid is not None:
        return h5io.nominal_mpp(folder.trident_grid.magnification)
    if nominal:
        return float(np.median(nominal))
    true = float(np.median([p.target_mpp for p in plans]))
    digits = 1 - int(math.floor(math.log10(true)))
    return round(true, digits)


def mismatch_warning(slide_id: str, plan: GridPlan, grid_mpp: float) -> str | None:
    """A warning when a slide's true target mpp is off the import's grid mpp."""
    if plan.warning is not None:
        return plan.warning
    if abs(plan.target_mpp - grid_mpp) > MPP_TOLERANCE * grid_mpp:
        return (
            f"slide {slide_id}: its imported tiles are {plan.target_mpp:.4g} um/px, "
            f"{100 * abs(plan.target_mpp / grid_mpp - 1):.0f}% off the grid's {grid_mpp:g} um/px; "
            "it is kept in that grid with its true mpp recorded (target_mpp)"
        )
    return None


def import_hash(fmt: str, coords: np.ndarray, attrs: dict[str, Any], plan: GridPlan) -> str:
    """`config_hash` of an imported store: changes when the source or the slide changes."""
    h = hashlib.sha256()
    h.update(json.dumps([fmt, sorted((k, str(v)) for k, v in attrs.items())]).encode())
    h.update(np.ascontiguousarray(coords, dtype=np.int64).tobytes())
    h.update(repr(plan).encode())
    return "import-" + h.hexdigest()[:16]


def imported_store(
    *,
    fmt: str,
    src: Path,
    slide_id: str,
    slide_path: str,
    patient_id: str,
    label: str | None,
    coords: np.ndarray,
    src_attrs: dict[str, Any],
    plan: GridPlan,
    grid_mpp: float,
    reader: Any,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]], dict[str, Any]]:
    """(arrays, array attrs, root attrs) of the wsi-pipe coords store of one imported slide."""
    from wsi_pipe.store import schema

    c = np.ascontiguousarray(np.asarray(coords).reshape(-1, 2), dtype=np.int64)
    dims = tuple(int(v) for v in reader.dimensions)
    coords_attrs = schema.clam_coords_attrs(
        slide_id=slide_id,
        tile_px=plan.tile_px,
        read_level=plan.read_level,
        level_downsample=plan.level_downsample,
        level_dim=plan.level_dim,
        tile_size_level0=plan.tile_size_l0,
        level0_mpp=plan.level0_mpp,
        target_mpp=plan.target_mpp,
        overlap_px=plan.overlap_px,
        level0_width=dims[0],
        level0_height=dims[1],
        objective_power=reader.objective_power,
    )
    grid = schema.GridAttrs(
        slide_id=slide_id,
        slide_path=slide_path,
        backend=reader.backend,
        level0_mpp=plan.level0_mpp,
        target_mpp=plan.target_mpp,
        tile_px=plan.tile_px,
        read_level=plan.read_level,
        read_size_px=plan.read_size_px,
        tile_size_level0=plan.tile_size_l0,
        overlap_px=plan.overlap_px,
        level0_width=dims[0],
        level0_height=dims[1],
    )
    root = {
        "kind": schema.KIND_COORDS,
        **grid.to_attrs(),
        "vendor": reader.vendor or "",
        "mpp_source": reader.mpp_source,
        "grid_mpp": float(grid_mpp),
        "nominal_target_mpp": -1.0 if plan.nominal_mpp is None else plan.nominal_mpp,
        "read_downsample": plan.level_downsample,
        "tile_size_level0_exact": plan.tile_size_l0_exact,
        "stride_level0": plan.tile_size_l0_exact * (1 - plan.overlap_px / max(1, plan.tile_px)),
        "parent_mpp": -1.0,
        "min_tissue_fraction": -1.0,
        "config_hash": import_hash(fmt, c, src_attrs, plan),
        "patient_id": patient_id,
        "label": label or "",
        "imported_from": fmt,
        "imported_file": str(src),
    }
    arrays: dict[str, np.ndarray] = {
        schema.COORDS: c,
        schema.TISSUE_FRACTION: np.full(len(c), np.nan, np.float32),
        schema.PARENT_INDEX: np.full(len(c), -1, np.int64),
    }
    return arrays, {schema.COORDS: coords_attrs}, root
