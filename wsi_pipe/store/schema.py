"""THE store schema, shared by the HDF5 and zarr v3 backends.

One store file (``.h5``) or directory (``.zarr``) per slide and grid. Layout:

    coords            int64   (N, 2)  level-0 px, (x, y) top-left of each tile       [always]
    tissue_fraction   float32 (N,)    tissue share of each tile on the mask          [coords stores]
    parent_index      int64   (N,)    row of the enclosing tile in the next coarser
                                      grid of the same run, -1 for the coarsest grid [coords stores]
    annotation_class  int16   (N,)    QuPath annotation class of each tile, -1 = none;
                                      array attr `class_names` (C,) [optional, coords stores]
    annotation_fraction float32 (N,)  share of the tile's box that class covers
                                      [optional, coords stores, with annotation_class]
    features          float32|float16 (N, D), same row order as coords               [feature stores]
    anomaly_score     float32 (N,)    smoothed, calibrated anomaly map value per tile [anomaly stores]
    anomaly_parts     float32 (N, P)  raw per-tile parts of the map; array attr
                                      `part_names` (P,)                              [anomaly stores]

Root attributes: `schema_version`, `kind` ("coords" | "features" | "anomaly_scores"), `slide_id`, `slide_path`,
`backend` (reader), `level0_mpp`, `target_mpp`, `tile_px`, `overlap_px`, `read_level`,
`read_size_px`, `tile_size_level0`, `level0_width`, `level0_height`, `parent_mpp` (or -1),
`config_hash`; coords stores tiled with annotations add `annotation_mode`, `annotation_file`
(name of the GeoJSON, "" when the slide had none), `annotation_sha256` and `tissue_source`
("segmentation" | "annotations"); feature stores add `encoder`, `weights_hash`, `precision`, `embed_dim`; anomaly score
stores add `anomaly_model`, `model_hash`, `method`, `feature_set`, `slide_score` and
`slide_score_parts` (JSON text).

The `coords` array also carries the attributes CLAM and TRIDENT consumers read: `patch_size`,
`patch_level`, `downsample`, `downsampled_level_dim`, `level_dim`, `patch_size_level0`,
`level0_magnification`, `target_magnification`, `overlap`, `level0_width`, `level0_height`, `name`,
plus the exact `level0_mpp` and `target_mpp`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

import numpy as np

from wsi_pipe.core.errors import StoreSchemaError

SCHEMA_VERSION = 1
#: Versions this code can read (a breaking change bumps SCHEMA_VERSION and keeps a reader here).
READABLE_VERSIONS = (1,)

COORDS = "coords"
TISSUE_FRACTION = "tissue_fraction"
PARENT_INDEX = "parent_index"
FEATURES = "features"
ANOMALY_SCORE = "anomaly_score"
ANOMALY_PARTS = "anomaly_parts"
ANNOTATION_CLASS = "annotation_class"
ANNOTATION_FRACTION = "annotation_fraction"
#: array attribute of `annotation_class`: the class names its values index
CLASS_NAMES = "class_names"

KIND_COORDS = "coords"
KIND_FEATURES = "features"
KIND_ANOMALY = "anomaly_scores"

DTYPES: dict[str, tuple[str, ...]] = {
    COORDS: ("int64",),
    TISSUE_FRACTION: ("float32",),
    PARENT_INDEX: ("int64",),
    FEATURES: ("float32", "float16"),
    ANOMALY_SCORE: ("float32",),
    ANOMALY_PARTS: ("float32",),
    ANNOTATION_CLASS: ("int16",),
    ANNOTATION_FRACTION: ("float32",),
}

#: optional per-tile arrays: one value per row of coords, shape (N,)
PER_TILE_1D = (TISSUE_FRACTION, PARENT_INDEX, ANOMALY_SCORE, ANNOTATION_CLASS, ANNOTATION_FRACTION)

REQUIRED: dict[str, tuple[str, ...]] = {
    KIND_COORDS: (COORDS, TISSUE_FRACTION, PARENT_INDEX),
    KIND_FEATURES: (COORDS, FEATURES),
    KIND_ANOMALY: (COORDS, ANOMALY_SCORE),
}

REQUIRED_ATTRS = ("schema_version", "kind", "slide_id", "level0_mpp", "target_mpp", "tile_px")

#: Row chunk of feature arrays: thousands of rows, never (1, D).
FEATURE_CHUNK_ROWS = 4096
#: Row chunk of small per-tile arrays.
ROW_CHUNK = 16384


@dataclass(frozen=True)
class GridAttrs:
    """Root attributes of one slide's grid that every consumer reads: which slide, and how its
    tiles are read (level-0 geometry in px, physical sizes in um/px).

    The tile stage (and a coords import) writes them with `to_attrs`; extract copies them into
    the feature store; pretrain, finetune, extract, MIL and anomaly read them back with
    `from_attrs` rather than by string key. Other root attributes (provenance, QC settings,
    encoder fields) stay plain entries beside these.
    """

    slide_id: str
    slide_path: str
    backend: str
    level0_mpp: float
    target_mpp: float
    tile_px: int
    read_level: int
    read_size_px: int
    tile_size_level0: int
    overlap_px: int = 0
    level0_width: int = 0
    level0_height: int = 0

    def to_attrs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], where: str) -> GridAttrs:
        """Read them back; StoreSchemaError naming the store and the fix when one is missing."""
        missing = [
            f.name for f in fields(cls) if f.default is MISSING and attrs.get(f.name) is None
        ]
        if missing:
            raise StoreSchemaError(
                f"{where} lacks root attributes {missing}: re-tile that slide (--overwrite)"
            )
        kw: dict[str, Any] = {}
        for f in fields(cls):
            v = from_attr(attrs.get(f.name, f.default))
            kw[f.name] = {"str": str, "float": float, "int": int}[str(f.type)](v)
        return cls(**kw)


def chunks_for(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunk shape of array `name` with `shape` (rows chunked, other axes whole)."""
    rows = FEATURE_CHUNK_ROWS if name == FEATURES else ROW_CHUNK
    n = max(1, min(rows, shape[0])) if shape[0] > 0 else rows
    return (n,) + tuple(max(1, s) for s in shape[1:])


def clam_coords_attrs(
    *,
    slide_id: str,
    tile_px: int,
    read_level: int,
    level_downsample: float,
    level_dim: tuple[int, int],
    tile_size_level0: int,
    level0_mpp: float,
    target_mpp: float,
    overlap_px: int,
    level0_width: int,
    level0_height: int,
    objective_power: float | None,
) -> dict[str, Any]:
    """Attributes of the `coords` array in the shape CLAM and TRIDENT readers expect."""
    from wsi_pipe.core.units import magnification_label

    level0_mag = objective_power if objective_power else magnification_label(level0_mpp)
    return {
        "patch_size": int(tile_px),
        "patch_level": int(read_level),
        "downsample": [float(level_downsample), float(level_downsample)],
        "downsampled_level_dim": [int(level_dim[0]), int(level_dim[1])],
        "level_dim": [int(level_dim[0]), int(level_dim[1])],
        "patch_size_level0": int(tile_size_level0),
        "level0_magnification": float(level0_mag),
        "target_magnification": float(level0_mag * level0_mpp / target_mpp),
        "overlap": int(overlap_px),
        "level0_width": int(level0_width),
        "level0_height": int(level0_height),
        "name": slide_id,
        "level0_mpp": float(level0_mpp),
        "target_mpp": float(target_mpp),
    }


def validate(
    names: list[str],
    attrs: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, str],
    where: str,
    array_attrs: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Raise StoreSchemaError if a store's content does not follow this schema.
    `array_attrs`: {array: its attributes} for the arrays that need some (annotation_class)."""
    version = attrs.get("schema_version")
    if version is None:
        raise StoreSchemaError(
            f"{where} has no schema_version: not a wsi-pipe store (re-run the stage that writes it)"
        )
    if int(version) not in READABLE_VERSIONS:
        raise StoreSchemaError(
            f"{where} has schema version {version}, this wsi-pipe reads {READABLE_VERSIONS}: "
            "re-run the stage that wrote it with this version (--overwrite)"
        )
    missing_attrs = [a for a in REQUIRED_ATTRS if a not in attrs]
    if missing_attrs:
        raise StoreSchemaError(f"{where} lacks attributes {missing_attrs}: re-run with --overwrite")
    kind = attrs["kind"]
    if kind not in REQUIRED:
        raise StoreSchemaError(f"{where} has unknown kind {kind!r}")
    for name in REQUIRED[kind]:
        if name not in names:
            raise StoreSchemaError(f"{where} lacks array {name!r}: re-run with --overwrite")
    n = shapes[COORDS][0]
    if len(shapes[COORDS]) != 2 or shapes[COORDS][1] != 2:
        raise StoreSchemaError(f"{where}: coords must be (N, 2), got {shapes[COORDS]}")
    for name in names:
        if name in DTYPES and dtypes[name] not in DTYPES[name]:
            raise StoreSchemaError(
                f"{where}: {name} has dtype {dtypes[name]}, expected {DTYPES[name]}"
            )
        if shapes[name][0] != n:
            raise StoreSchemaError(f"{where}: {name} has {shapes[name][0]} rows, coords has {n}")
        if name in PER_TILE_1D and len(shapes[name]) != 1:
            raise StoreSchemaError(f"{where}: {name} must be (N,), got {shapes[name]}")
    if ANNOTATION_FRACTION in names and ANNOTATION_CLASS not in names:
        raise StoreSchemaError(
            f"{where}: {ANNOTATION_FRACTION} without {ANNOTATION_CLASS}: re-run with --overwrite"
        )
    if ANNOTATION_CLASS in names and array_attrs is not None:
        cls_names = array_attrs.get(ANNOTATION_CLASS, {}).get(CLASS_NAMES)
        if not isinstance(cls_names, list) or not all(isinstance(c, str) for c in cls_names):
            raise StoreSchemaError(
                f"{where}: {ANNOTATION_CLASS} lacks its {CLASS_NAMES} attribute (a list of "
                "names): re-run `wsi-pipe tile --annotations` with --overwrite"
            )


def as_attr(value: Any) -> Any:
    """Convert a value to something both h5py and zarr store as an attribute."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return [as_attr(v) for v in value]
    if isinstance(value, list):
        return [as_attr(v) for v in value]
    if value is None:
        return "None"
    return value


def from_attr(value: Any) -> Any:
    """Inverse of `as_attr` for values read back from either backend."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        value = value.decode()
    if value == "None":
        return None
    return value
