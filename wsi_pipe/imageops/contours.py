"""Tissue polygons -> GeoJSON that QuPath opens (File > Import objects), in level-0 px."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: QuPath shows the class colour; packed RGB like QuPath writes it is not needed, a list works
TISSUE_COLOUR = [80, 180, 80]


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _ring(points: np.ndarray, scale: float, ccw: bool, decimals: int) -> list[list[float]] | None:
    """(k, 2) -> closed GeoJSON ring in scaled coordinates, oriented; None if degenerate."""
    pts = np.asarray(points, np.float64).reshape(-1, 2) * scale
    if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
        pts = pts[:-1]
    if len(np.unique(pts, axis=0)) < 3 or _signed_area(pts) == 0:
        return None
    if (_signed_area(pts) > 0) != ccw:
        pts = pts[::-1]
    pts = np.round(pts, decimals)
    ring: list[list[float]] = pts.tolist()
    ring.append(ring[0])
    return ring


def to_geojson(
    polygons: Sequence[tuple[np.ndarray, Sequence[np.ndarray]]],
    scale_to_l0: float,
    slide_id: str,
    decimals: int = 2,
) -> dict[str, Any]:
    """GeoJSON FeatureCollection of tissue pieces in level-0 px.

    polygons: (outer (k, 2), [hole (k, 2), ...]) in segmentation-image px (as `TissueMask`
    gives them); every coordinate is multiplied by `scale_to_l0` (level-0 px per image px, i.e.
    seg_mpp / level0_mpp). Each piece becomes one Polygon feature with the outer ring first and
    its holes after; rings are closed, the outer counter-clockwise and holes clockwise in the
    coordinate numbers (RFC 7946). Properties follow QuPath: objectType "annotation",
    classification {"name": "Tissue"}. Degenerate rings (< 3 distinct points) are skipped.
    """
    if not scale_to_l0 > 0:
        raise ValueError(f"scale_to_l0 must be > 0, got {scale_to_l0}")
    features: list[dict[str, Any]] = []
    for outer, holes in polygons:
        ring = _ring(outer, scale_to_l0, ccw=True, decimals=decimals)
        if ring is None:
            continue
        rings = [ring]
        for hole in holes:
            hr = _ring(hole, scale_to_l0, ccw=False, decimals=decimals)
            if hr is not None:
                rings.append(hr)
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": "annotation",
                    "name": f"{slide_id} tissue {len(features) + 1}",
                    "classification": {"name": "Tissue", "color": TISSUE_COLOUR},
                    "isLocked": False,
                },
            }
        )
    return {
        "type": "FeatureCollection",
        "features": features,
        "properties": {"slide_id": slide_id, "units": "level-0 px", "scale_to_l0": scale_to_l0},
    }
