"""QuPath GeoJSON annotations -> classed polygons in level-0 px -> tile labels and masks (no torch).

Input. QuPath exports (File > Export objects as GeoJSON) either a FeatureCollection or a plain
JSON list of Features; each Feature has a Polygon, MultiPolygon or GeometryCollection geometry
and, when classified, `properties.classification.name` (older exports: `properties.classification`
as a plain string, or `properties.name`). Unclassified annotations get class "" (empty).
Coordinates are level-0 px of the slide (QuPath's convention, whatever level was on screen);
`check_bounds` rejects a file whose coordinates lie far outside the slide.

Per-slide file: `<slide_id>.geojson`, `<slide_id>.json`, or the slide's file name plus one of
those suffixes (QuPath's default export name), in one folder (`find_annotation_file`).

Algorithm of the tile labels (`AnnotationRaster`):
1. each set of polygons (one class, the union of the region classes, the union of the excluded
   classes) is rasterised on one grid of `px_per_l0` raster px per level-0 px; a raster pixel is
   inside when its centre is inside the polygon (even-odd rule per polygon, so holes are holes;
   the union over polygons), computed exactly by scanlines (`fill_polygons`);
2. a tile's share of a set is the share of its box's raster pixels that are inside
   (`tissue.box_fractions`, a summed-area table), so with box edges on raster pixel edges a
   polygon edge on a tile edge counts on one side only;
3. a tile's class is the class covering the largest share of its box when that share reaches
   `min_fraction` (ties: the first name), else -1.

Tissue masks from polygons (`tissue_mask_from_polygons`) follow the segmentation's own rule
instead (`tissue._polygons_from_binary`: vertices in mask px, filled boundary-inclusive, holes
cleared, hole boundaries kept), so the tissue GeoJSON the tile stage writes turns back into the
very mask it came from.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_pipe.core.errors import ConfigError
from wsi_pipe.imageops.tissue import box_fractions

#: file suffixes looked for in an annotation folder, in this order
ANNOTATION_SUFFIXES = (".geojson", ".json")
#: coordinates may reach this share of the slide's size outside it (QuPath allows a little)
BOUNDS_TOLERANCE = 0.05
#: longest side (px) of an annotation raster; finer rasters are coarsened to this
MAX_RASTER_SIDE = 8192


@dataclass(frozen=True)
class ClassedPolygon:
    """One polygon of one class: exterior (k, 2) float64 level-0 px (x, y) and hole rings."""

    cls: str
    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = ()


def _class_name(props: dict[str, Any] | None) -> str:
    props = props or {}
    c = props.get("classification")
    if isinstance(c, dict):
        return str(c.get("name", "") or "")
    if isinstance(c, str):
        return c
    return str(props.get("name", "") or "")


def _rings(coords: Any, where: str) -> list[np.ndarray]:
    rings = []
    for ring in coords:
        try:
            a = np.asarray(ring, np.float64)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}: a polygon ring is not a list of [x, y] numbers: re-export it from "
                "QuPath (File > Export objects as GeoJSON)"
            ) from None
        if a.ndim != 2 or a.shape[1] < 2:
            raise ConfigError(
                f"{where}: a polygon ring is not a list of [x, y] points: re-export it from QuPath"
            )
        if not np.isfinite(a[:, :2]).all():
            raise ConfigError(f"{where}: a polygon ring holds NaN or infinite coordinates")
        if len(np.unique(a[:, :2], axis=0)) < 3:
            raise ConfigError(
                f"{where}: a polygon ring has fewer than 3 distinct points: delete that object "
                "in QuPath or fix its geometry"
            )
        rings.append(a[:, :2])
    return rings


def _polygons_of(geom: Any, where: str) -> list[Any]:
    """Polygon coordinate lists of one geometry (Polygon, MultiPolygon, GeometryCollection)."""
    if not isinstance(geom, dict):
        return []
    kind = geom.get("type")
    if kind in ("Polygon", "MultiPolygon") and not isinstance(geom.get("coordinates"), list):
        raise ConfigError(f"{where}: {kind} without a coordinates list")
    if kind == "Polygon":
        return [geom["coordinates"]]
    if kind == "MultiPolygon":
        return list(geom["coordinates"])
    if kind == "GeometryCollection":
        out: list[Any] = []
        for g in geom.get("geometries") or []:
            out += _polygons_of(g, where)
        return out
    return []  # points and lines cover no area


def parse_geojson(obj: Any, where: str = "GeoJSON") -> list[ClassedPolygon]:
    """Classed polygons of a QuPath GeoJSON object (FeatureCollection, list of Features, or one
    Feature). Points, lines and other geometries are skipped (they cover no area)."""
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        feats: Iterable[Any] = obj.get("features") or []
    elif isinstance(obj, list):
        feats = obj
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        feats = [obj]
    else:
        raise ConfigError(
            f"{where} is neither a FeatureCollection nor a list of Features: export the "
            "annotations from QuPath with File > Export objects as GeoJSON"
        )
    out: list[ClassedPolygon] = []
    for i, f in enumerate(feats):
        if not isinstance(f, dict):
            raise ConfigError(f"{where}: feature {i} is not an object")
        cls = _class_name(f.get("properties"))
        for p in _polygons_of(f.get("geometry"), f"{where} feature {i}"):
            if not isinstance(p, list):
                raise ConfigError(f"{where} feature {i}: a polygon is not a list of rings")
            rings = _rings(p, f"{where} feature {i}")
            if rings:
                out.append(ClassedPolygon(cls, rings[0], tuple(rings[1:])))
    return out


def read_geojson(path: str | Path) -> list[ClassedPolygon]:
    """Read a QuPath GeoJSON file into classed polygons (level-0 px)."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"annotation file {p} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"annotation file {p} is not valid JSON ({e}): export it from QuPath with "
            "File > Export objects as GeoJSON"
        ) from None
    return parse_geojson(obj, f"annotation file {p}")


def find_annotation_file(
    folder: str | Path, slide_id: str, slide_path: str | Path | None = None
) -> Path | None:
    """The GeoJSON of one slide in `folder`: `<slide_id>.geojson|.json` or `<file name>.geojson|
    .json`; None when there is none. ConfigError when the folder is missing or several match."""
    d = Path(folder)
    if not d.is_dir():
        raise ConfigError(
            f"annotation folder {d} does not exist: give a folder of <slide_id>.geojson files"
        )
    stems = [slide_id] + ([Path(slide_path).name] if slide_path else [])
    found = []
    for stem in dict.fromkeys(stems):
        for suf in ANNOTATION_SUFFIXES:
            p = d / f"{stem}{suf}"
            if p.is_file():
                found.append(p)
    if len(found) > 1:
        raise ConfigError(
            f"slide {slide_id} has several annotation files in {d} "
            f"({', '.join(p.name for p in found)}): keep one"
        )
    return found[0] if found else None


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a (small) file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def matches(cls: str, patterns: Iterable[str]) -> bool:
    """Whether class name `cls` matches any fnmatch pattern, case-insensitively."""
    low = cls.lower()
    return any(fnmatch.fnmatchcase(low, p.lower()) for p in patterns)


def check_bounds(
    polygons: Sequence[ClassedPolygon], dims_l0: tuple[int, int], where: str, slide_id: str
) -> None:
    """ConfigError when coordinates lie more than BOUNDS_TOLERANCE of the slide's size outside
    the slide (`dims_l0` = level-0 width, height): another slide's file, or not level-0 px."""
    if not polygons:
        return
    pts = np.concatenate([p.exterior for p in polygons])
    w, h = float(dims_l0[0]), float(dims_l0[1])
    lo, hi = pts.min(0), pts.max(0)
    tol = BOUNDS_TOLERANCE
    if lo[0] < -tol * w or lo[1] < -tol * h or hi[0] > (1 + tol) * w or hi[1] > (1 + tol) * h:
        factor = max(hi[0] / w, hi[1] / h)
        raise ConfigError(
            f"{where}: coordinates span x {lo[0]:.0f}..{hi[0]:.0f}, y {lo[1]:.0f}..{hi[1]:.0f} "
            f"level-0 px but slide {slide_id} is {w:.0f} x {h:.0f} (up to {factor:.2g}x its "
            "size): the GeoJSON belongs to another slide, or its coordinates are not level-0 "
            "px (another pyramid level or a scaled export); export from QuPath on this slide"
        )


# ------------------------------------------------------------------------------- rasters
def fill_polygons(
    polygons: Sequence[ClassedPolygon], shape_hw: tuple[int, int], px_per_l0: float
) -> np.ndarray:
    """bool (h, w): raster pixels whose centre lies inside any polygon (exterior minus holes).

    Raster pixel (i, j) covers level-0 [j, j + 1) x [i, i + 1) / px_per_l0. Scanlines at the
    pixel-centre rows: each ring edge crosses the rows whose centre y lies in [y_min, y_max)
    (half-open, so a vertex is counted once), crossings of one polygon are paired left to right
    (even-odd), and the span [x_a, x_b) fills the pixels whose centre lies in it.
    """
    h, w = int(shape_hw[0]), int(shape_hw[1])
    cover = np.zeros((h, w + 1), np.int32)
    for p in polygons:
        rows_all, xs_all = [], []
        for ring in (p.exterior, *p.holes):
            a = np.asarray(ring, np.float64) * px_per_l0
            b = np.roll(a, -1, axis=0)
            x0, y0, x1, y1 = a[:, 0], a[:, 1], b[:, 0], b[:, 1]
            ok = y0 != y1
            x0, y0, x1, y1 = x0[ok], y0[ok], x1[ok], y1[ok]
            r0 = np.clip(np.ceil(np.minimum(y0, y1) - 0.5), 0, h).astype(np.int64)
            r1 = np.clip(np.ceil(np.maximum(y0, y1) - 0.5), 0, h).astype(np.int64)
            n = np.maximum(r1 - r0, 0)
            if not n.sum():
                continue
            edge = np.repeat(np.arange(len(n)), n)
            first = np.repeat(np.cumsum(n) - n, n)
            rows = r0[edge] + (np.arange(int(n.sum())) - first)
            t = (rows + 0.5 - y0[edge]) / (y1[edge] - y0[edge])
            rows_all.append(rows)
            xs_all.append(x0[edge] + t * (x1[edge] - x0[edge]))
        if not rows_all:
            continue
        rows, xs = np.concatenate(rows_all), np.concatenate(xs_all)
        order = np.lexsort((xs, rows))
        rows, xs = rows[order], xs[order]
        c0 = np.clip(np.ceil(xs[0::2] - 0.5), 0, w).astype(np.int64)
        c1 = np.clip(np.ceil(xs[1::2] - 0.5), 0, w).astype(np.int64)
        np.add.at(cover, (rows[0::2], c0), 1)
        np.add.at(cover, (rows[0::2], c1), -1)
    out: np.ndarray = np.cumsum(cover, axis=1)[:, :w] > 0
    return out


def tissue_mask_from_polygons(
    polygons: Sequence[ClassedPolygon], shape_hw: tuple[int, int], px_per_l0: float
) -> tuple[np.ndarray, list[tuple[np.ndarray, list[np.ndarray]]]]:
    """A tissue mask bool (h, w) at `px_per_l0` mask px per level-0 px, and its polygons in
    mask px ((outer, [holes]), as `TissueMask.polygons`), by the segmentation's rule: a vertex
    falls in the pixel holding it, outer rings are filled boundary-inclusive, holes cleared and
    their boundary pixels kept (`tissue._polygons_from_binary`)."""
    h, w = int(shape_hw[0]), int(shape_hw[1])
    mask = np.zeros((h, w), np.uint8)
    outers, holes, polys = [], [], []
    for p in polygons:
        ext = np.asarray(p.exterior, np.float64) * px_per_l0
        hs = [np.asarray(r, np.float64) * px_per_l0 for r in p.holes]
        outers.append(np.floor(ext).astype(np.int32).reshape(-1, 1, 2))
        holes += [np.floor(r).astype(np.int32).reshape(-1, 1, 2) for r in hs]
        polys.append((ext, hs))
    if outers:
        cv2.drawContours(mask, outers, -1, 1, thickness=cv2.FILLED)
    if holes:
        cv2.drawContours(mask, holes, -1, 0, thickness=cv2.FILLED)
        cv2.drawContours(mask, holes, -1, 1, thickness=1)
    return mask.astype(bool), polys


def raster_scale(tile_size_l0: float, dims_l0: tuple[int, int], px_per_tile: int = 16) -> float:
    """Raster px per level-0 px: `px_per_tile` px per side of the smallest tile, coarsened so
    the raster's longest side stays <= MAX_RASTER_SIDE."""
    return min(px_per_tile / float(tile_size_l0), MAX_RASTER_SIDE / float(max(dims_l0)))


class AnnotationRaster:
    """Masks of named polygon sets on one level-0-aligned raster (see the module doc).

    sets: {name: polygons}; the raster covers [0, extent_l0) in level-0 px at `px_per_l0`.
    """

    def __init__(
        self,
        sets: Mapping[str, Sequence[ClassedPolygon]],
        extent_l0: tuple[float, float],
        px_per_l0: float,
    ) -> None:
        self.px_per_l0 = float(px_per_l0)
        w = max(1, int(math.ceil(extent_l0[0] * px_per_l0)) + 1)
        h = max(1, int(math.ceil(extent_l0[1] * px_per_l0)) + 1)
        self.shape = (h, w)
        self.masks = {k: fill_polygons(v, self.shape, px_per_l0) for k, v in sets.items() if v}

    def fractions(self, name: str, coords_l0: np.ndarray, tile_size_l0: float) -> np.ndarray:
        """(n,) float32: share of each tile's box inside set `name` (0 for an empty set)."""
        c = np.asarray(coords_l0, np.float64).reshape(-1, 2)
        mask = self.masks.get(name)
        if mask is None or len(c) == 0:
            return np.zeros(len(c), np.float32)
        s = self.px_per_l0
        boxes = np.stack([c[:, 0], c[:, 1], c[:, 0] + tile_size_l0, c[:, 1] + tile_size_l0], 1)
        return box_fractions(mask, boxes * s)


def _extent(
    coords_l0: np.ndarray, tile_size_l0: float, polygons: Sequence[ClassedPolygon]
) -> tuple[float, float]:
    c = np.asarray(coords_l0, np.float64).reshape(-1, 2)
    pts = np.concatenate([p.exterior for p in polygons])
    return (
        max(float(c[:, 0].max()) + tile_size_l0, float(pts[:, 0].max())),
        max(float(c[:, 1].max()) + tile_size_l0, float(pts[:, 1].max())),
    )


def class_fractions(
    coords_l0: np.ndarray,
    tile_size_l0: float,
    polygons: Sequence[ClassedPolygon],
    px_per_tile: int = 16,
) -> dict[str, np.ndarray]:
    """Share of each tile's box covered by each class: {class: (n,) float32 in [0, 1]}.
    coords_l0: (n, 2) level-0 px top-left; tile_size_l0: tile side in level-0 px."""
    c = np.asarray(coords_l0, np.float64).reshape(-1, 2)
    if not polygons or len(c) == 0:
        return {}
    ext = _extent(c, tile_size_l0, polygons)
    scale = min(float(px_per_tile) / float(tile_size_l0), MAX_RASTER_SIDE / max(ext))
    by_cls: dict[str, list[ClassedPolygon]] = {}
    for p in polygons:
        by_cls.setdefault(p.cls, []).append(p)
    raster = AnnotationRaster(by_cls, ext, scale)
    return {k: raster.fractions(k, c, tile_size_l0) for k in sorted(by_cls)}


def label_tiles(
    coords_l0: np.ndarray,
    tile_size_l0: float,
    polygons: Sequence[ClassedPolygon],
    classes: Sequence[str] | None = None,
    min_overlap: float = 0.5,
    px_per_tile: int = 16,
) -> np.ndarray:
    """(n,) bool: tiles whose box is covered >= `min_overlap` by annotations of `classes`
    (None = every class). The union of the classes counts, not each class alone."""
    c = np.asarray(coords_l0).reshape(-1, 2)
    chosen = [p for p in polygons if classes is None or p.cls in set(classes)]
    if not chosen:
        return np.zeros(len(c), bool)
    merged = [ClassedPolygon("_", p.exterior, p.holes) for p in chosen]
    frac = class_fractions(c, tile_size_l0, merged, px_per_tile)["_"]
    return frac >= min_overlap


def assign_classes(
    fractions: dict[str, np.ndarray], class_names: Sequence[str], min_fraction: float, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """(class index (n,) int16, its share (n,) float32): the class of `class_names` covering
    the largest share of each tile (ties: the first), -1 where that share is below
    `min_fraction` or zero; the share is kept either way."""
    if not class_names or n == 0:
        return np.full(n, -1, np.int16), np.zeros(n, np.float32)
    f = np.stack([fractions.get(k, np.zeros(n, np.float32)) for k in class_names], 1)
    best = np.argmax(f, axis=1)
    share = f[np.arange(n), best].astype(np.float32)
    cls = np.where((share >= min_fraction) & (share > 0), best, -1).astype(np.int16)
    return cls, share
