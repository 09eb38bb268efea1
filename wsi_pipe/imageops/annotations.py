"""QuPath GeoJSON annotations -> classed polygons in level-0 px -> tile labels (no torch).

QuPath exports (File > Export objects as GeoJSON) either a FeatureCollection or a plain JSON list
of Features; each Feature has a Polygon or MultiPolygon geometry in level-0 px and, when
classified, `properties.classification.name` (older exports: `properties.classification` as a
plain string, or `properties.name`). Unclassified annotations get class "" (empty).

Tiles are labelled by box overlap: the share of each tile's box covered by the union of a class's
polygons (exterior minus holes), computed on a raster of `px_per_tile` px per tile side.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_pipe.core.errors import ConfigError
from wsi_pipe.imageops.tissue import box_fractions


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
        return str(c.get("name", ""))
    if isinstance(c, str):
        return c
    return str(props.get("name", "") or "")


def _rings(coords: Any, where: str) -> list[np.ndarray]:
    rings = []
    for ring in coords:
        a = np.asarray(ring, np.float64)
        if a.ndim != 2 or a.shape[1] < 2:
            raise ConfigError(f"{where}: a polygon ring is not a list of [x, y] points")
        rings.append(a[:, :2])
    return rings


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
            f"{where} is neither a FeatureCollection nor a list of Features (QuPath export)"
        )
    out: list[ClassedPolygon] = []
    for i, f in enumerate(feats):
        if not isinstance(f, dict):
            raise ConfigError(f"{where}: feature {i} is not an object")
        geom = f.get("geometry") or {}
        cls = _class_name(f.get("properties"))
        kind = geom.get("type")
        if kind == "Polygon":
            polys = [geom.get("coordinates") or []]
        elif kind == "MultiPolygon":
            polys = geom.get("coordinates") or []
        else:
            continue
        for p in polys:
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
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"annotation file {p} is not valid JSON ({e}): export it from QuPath as GeoJSON"
        ) from None
    return parse_geojson(obj, str(p))


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
    scale = float(px_per_tile) / float(tile_size_l0)  # raster px per level-0 px
    pts = np.concatenate([p.exterior for p in polygons])
    x_max = max(float(c[:, 0].max()) + tile_size_l0, float(pts[:, 0].max()))
    y_max = max(float(c[:, 1].max()) + tile_size_l0, float(pts[:, 1].max()))
    w, h = int(np.ceil(x_max * scale)) + 1, int(np.ceil(y_max * scale)) + 1
    boxes = np.stack([c[:, 0], c[:, 1], c[:, 0] + tile_size_l0, c[:, 1] + tile_size_l0], 1) * scale
    out: dict[str, np.ndarray] = {}
    for cls in sorted({p.cls for p in polygons}):
        mask = np.zeros((h, w), np.uint8)
        for p in polygons:
            if p.cls != cls:
                continue
            poly = np.zeros((h, w), np.uint8)
            cv2.fillPoly(poly, [np.round(p.exterior * scale).astype(np.int32)], 1)
            for hole in p.holes:
                cv2.fillPoly(poly, [np.round(hole * scale).astype(np.int32)], 0)
            mask |= poly
        out[cls] = box_fractions(mask.astype(bool), boxes)
    return out


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
