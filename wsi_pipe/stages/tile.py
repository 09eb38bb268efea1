"""`wsi-pipe tile`: segment tissue and tile each slide at one or more true mpps.

Per slide:
1. open it (OpenSlide or tiffslide), resolve level-0 mpp (metadata, manifest or override);
2. read a low-resolution level and resample it to exactly `seg_mpp` um/px; segment tissue;
3. for each target mpp (finest first) lay a grid anchored at (0, 0) with stride
   (tile_px - overlap_px) * target_mpp / level0_mpp level-0 px, keep tiles whose tissue fraction
   on the mask reaches `min_tissue_fraction`; a coarser grid also keeps every tile that is the
   parent of a kept finer tile, so each fine tile has a parent (`parent_index`);
4. write one coords store per grid, the tissue GeoJSON and a QC PNG, each atomically.

Tiles start inside the slide; a tile that runs over the right/bottom edge is read padded with
white and its tissue fraction counts the outside as background.

With QuPath annotations (`cfg.annotations_dir`, one GeoJSON per slide in level-0 px; see
`imageops/annotations.py` and docs/tiling.md), after step 1 the slide's file is read and checked
against the slide's size, and:
- mode "tissue": the region polygons replace the computed tissue mask in step 2 (rasterised at
  the segmentation mpp by the segmentation's own rule, so our tissue GeoJSON round-trips);
  a slide without a file is segmented as usual (logged);
- mode "restrict": step 3 also needs the union of the region classes to cover at least
  `annotation_min_fraction` of a tile's box; a slide without a file fails (recorded by the
  runner, the batch goes on);
- every mode: step 3 drops tiles whose box the excluded classes (`annotation_exclude`, e.g.
  QuPath's "Ignore*") cover more than `annotation_max_excluded`, and step 4 stores each tile's
  class (`annotation_class`, -1 = none; names in its `class_names` attribute) and that class's
  share of the box (`annotation_fraction`). Without a file every tile is -1.
Region classes = `annotation_classes` (None: every non-excluded class, unclassified included);
label classes = the same, without unclassified objects. Parents kept for finer tiles (step 3)
are kept whatever their annotation. The GeoJSON's sha256 is stored, so an edited file re-tiles
the slide on the next run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from wsi_pipe.core import geometry
from wsi_pipe.core.config import TileConfig
from wsi_pipe.core.errors import ConfigError
from wsi_pipe.core.fsutil import atomic_write_bytes, atomic_write_json, remove_tmp_siblings
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.core.manifest import SlideEntry
from wsi_pipe.imageops import annotations as A
from wsi_pipe.imageops.contours import to_geojson
from wsi_pipe.imageops.tiles import encode_png
from wsi_pipe.imageops.tissue import TissueMask, box_fractions, segment_tissue
from wsi_pipe.readers import open_slide
from wsi_pipe.store import create_store, open_store, schema

if TYPE_CHECKING:  # the runner imports the stages; the stages call it lazily
    from wsi_pipe.runner.loop import RunSummary

log = logging.getLogger(__name__)

#: Smallest side (px) of the segmentation image; tiny slides are segmented at level 0 instead.
_MIN_SEG_SIDE = 512


def _seg_mpp_for(level0_mpp: float, dims_l0: tuple[int, int], seg_mpp: float) -> float:
    """Effective segmentation mpp: `seg_mpp`, finer for small slides, never finer than level 0."""
    longest_um = max(dims_l0) * level0_mpp
    return max(level0_mpp, min(seg_mpp, longest_um / _MIN_SEG_SIDE))


def _segmentation_image(reader: Any, seg_mpp: float) -> tuple[np.ndarray, tuple[float, float]]:
    """RGB image of the slide at `seg_mpp` and its scale (sx, sy) = image px per level-0 px."""
    w0, h0 = reader.dimensions
    ds = seg_mpp / reader.mpp
    level = reader.best_level_for_downsample(ds)
    out_w = max(1, int(round(w0 / ds)))
    out_h = max(1, int(round(h0 / ds)))
    # read in blocks, resized as they come: a fine level of a big slide never sits in memory whole
    img = reader.read_level_resized(level, (out_w, out_h))
    return img, (out_w / w0, out_h / h0)


def _qc_thumbnail(reader: Any, qc_px: int) -> np.ndarray:
    """The slide for the QC image, longest side <= `qc_px`, from the coarsest pyramid level with
    a longest side of at least 0.75 x `qc_px` (a finer level would cost a large read for a
    picture: 5,000^2 px instead of 1,250^2 on a 20,000-px slide with downsamples 1, 4, 16)."""
    sides = [max(int(w), int(h)) for w, h in reader.level_dimensions]
    level = max(i for i, side in enumerate(sides) if side >= 0.75 * qc_px or i == 0)
    w, h = (int(v) for v in reader.level_dimensions[level])
    f = min(1.0, qc_px / max(w, h))
    return reader.read_level_resized(level, (max(1, round(w * f)), max(1, round(h * f))))


class _Grid:
    """One target-mpp grid of one slide (all sizes in level-0 px unless suffixed)."""

    def __init__(
        self,
        target_mpp: float,
        level0_mpp: float,
        cfg: TileConfig,
        dims_l0: tuple[int, int],
        reader: Any,
    ) -> None:
        self.target_mpp = target_mpp
        self.ds = target_mpp / level0_mpp
        if self.ds < 1 - 1e-3:
            raise ConfigError(
                f"slide {reader.slide_id} is scanned at {level0_mpp:g} um/px, coarser than the target "
                f"{target_mpp:g} um/px: drop that target mpp or give a finer scan"
            )
        self.tile_size_l0_exact = cfg.tile_px * self.ds
        self.tile_size_l0 = max(1, int(round(self.tile_size_l0_exact)))
        self.stride_l0 = (cfg.tile_px - cfg.overlap_px) * self.ds
        self.read_level = reader.best_level_for_downsample(self.ds)
        self.level_ds = float(reader.level_downsamples[self.read_level])
        self.read_size_px = max(1, int(round(self.tile_size_l0_exact / self.level_ds)))
        self.n_cols = len(geometry.grid_starts(dims_l0[0], self.stride_l0))
        self.n_rows = len(geometry.grid_starts(dims_l0[1], self.stride_l0))
        self.coords = np.zeros((0, 2), np.int64)
        self.fractions = np.zeros(0, np.float32)
        self.parents = np.zeros(0, np.int64)


@dataclass
class SlideAnnotations:
    """One slide's annotations as the tile stage uses them (polygons in level-0 px).

    path / sha256: the GeoJSON read (None / "" when the slide has none); regions: polygons of
    the region classes; excluded: polygons of the excluded classes; labelled: {class name:
    polygons}; class_names: label classes in store order (index = `annotation_class`)."""

    path: Path | None
    sha256: str = ""
    regions: list[A.ClassedPolygon] = field(default_factory=list)
    excluded: list[A.ClassedPolygon] = field(default_factory=list)
    labelled: dict[str, list[A.ClassedPolygon]] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)


def annotation_file(cfg: TileConfig, entry: SlideEntry) -> Path | None:
    """The slide's GeoJSON in `cfg.annotations_dir` (None without one; ConfigError when ambiguous)."""
    if cfg.annotations_dir is None:
        return None
    return A.find_annotation_file(cfg.annotations_dir, entry.slide_id, entry.path)


def load_slide_annotations(
    cfg: TileConfig, entry: SlideEntry, dims_l0: tuple[int, int]
) -> SlideAnnotations:
    """Read, check (level-0 px inside the slide) and split one slide's annotations by class."""
    path = annotation_file(cfg, entry)
    chosen = list(cfg.annotation_classes) if cfg.annotation_classes is not None else None
    if path is None:
        if cfg.annotation_mode == "restrict":
            raise ConfigError(
                f"slide {entry.slide_id} has no annotation file ({entry.slide_id}.geojson or "
                f".json) in {cfg.annotations_dir}: add one, or tile it without "
                "--annotation-mode restrict"
            )
        names = [c for c in chosen if not A.matches(c, cfg.annotation_exclude)] if chosen else []
        return SlideAnnotations(None, class_names=names)
    polys = A.read_geojson(path)
    A.check_bounds(polys, dims_l0, f"annotation file {path}", entry.slide_id)
    excluded = [p for p in polys if A.matches(p.cls, cfg.annotation_exclude)]
    kept = [p for p in polys if not A.matches(p.cls, cfg.annotation_exclude)]
    if chosen is not None:
        low = {c.lower(): c for c in chosen}
        regions = [p for p in kept if p.cls.lower() in low]
        names = [c for c in chosen if not A.matches(c, cfg.annotation_exclude)]
        labelled: dict[str, list[A.ClassedPolygon]] = {low[p.cls.lower()]: [] for p in regions}
        for p in regions:
            labelled[low[p.cls.lower()]].append(p)
    else:
        regions = kept
        names = sorted({p.cls for p in kept if p.cls})
        labelled = {k: [p for p in kept if p.cls == k] for k in names}
    if cfg.annotation_mode in ("restrict", "tissue") and not regions:
        found = sorted({p.cls or "(unclassified)" for p in polys})
        raise ConfigError(
            f"annotation file {path} has no region polygons for slide {entry.slide_id} "
            f"(classes found: {', '.join(found) or 'none'}; excluded: "
            f"{', '.join(cfg.annotation_exclude) or 'none'}): draw the regions in QuPath, or "
            "pick classes with --annotation-classes"
        )
    return SlideAnnotations(path, A.file_sha256(path), regions, excluded, labelled, names)


def _annotation_tissue(
    ann: SlideAnnotations, shape_hw: tuple[int, int], inv: float, seg_mpp: float
) -> TissueMask:
    """A TissueMask whose mask is the region polygons (mask px = level-0 px / `inv`)."""
    mask, polys = A.tissue_mask_from_polygons(ann.regions, shape_hw, 1.0 / inv)
    note = f"tissue from annotations {ann.path.name if ann.path else ''}"
    return TissueMask(
        mask, polys, np.zeros(shape_hw, bool), 0.0, seg_mpp, notes=[note], method="annotations"
    )


def tile_outputs(layout: RunLayout, slide_id: str, cfg: TileConfig) -> list[Path]:
    """Final artifacts of one slide (all exist <=> the slide is done)."""
    return [layout.coords_store(slide_id, m, cfg.store) for m in cfg.target_mpps] + [
        layout.tissue_geojson(slide_id),
        layout.qc_png(slide_id),
    ]


def is_tiled(entry: SlideEntry, cfg: TileConfig, layout: RunLayout) -> bool:
    """True when every output exists and the stores were written with this config."""
    outs = tile_outputs(layout, entry.slide_id, cfg)
    if not all(p.exists() for p in outs):
        return False
    try:
        with open_store(outs[0], validate=False) as r:
            attrs = r.attrs
    except Exception:  # unreadable store: redo the slide
        return False
    if attrs.get("config_hash") != cfg.config_hash():
        return False
    if cfg.annotations_dir is None:
        return True
    try:  # an edited (or new, or removed) GeoJSON re-tiles the slide
        path = annotation_file(cfg, entry)
    except ConfigError:
        return False  # tile_slide reports it
    return bool(attrs.get("annotation_sha256", "") == (A.file_sha256(path) if path else ""))


def tile_slide(entry: SlideEntry, cfg: TileConfig, layout: RunLayout) -> dict[str, Any]:
    """Tile one slide; write its stores, GeoJSON and QC PNG. Returns counts and timings."""
    for out in tile_outputs(
        layout, entry.slide_id, cfg
    ):  # leftovers of a killed run (we hold the lock)
        remove_tmp_siblings(out)
    t_io = 0.0
    t0 = time.perf_counter()
    override = entry.mpp if entry.mpp is not None else cfg.mpp_override
    with open_slide(
        entry.path, backend=cfg.backend, mpp_override=override, slide_id=entry.slide_id
    ) as reader:
        mpp = float(reader.mpp)
        dims = (int(reader.dimensions[0]), int(reader.dimensions[1]))
        seg_mpp = _seg_mpp_for(mpp, dims, cfg.segment.seg_mpp)
        seg_img, scale = _segmentation_image(reader, seg_mpp)
        t_io += time.perf_counter() - t0
        # level-0 px per segmentation px, the one factor of the tissue GeoJSON (both ways)
        inv = (1.0 / scale[0] + 1.0 / scale[1]) / 2.0
        ann = None
        if cfg.annotations_dir is not None:
            ann = load_slide_annotations(cfg, entry, (dims[0], dims[1]))
        if ann is not None and cfg.annotation_mode == "tissue" and ann.path is not None:
            tissue = _annotation_tissue(ann, seg_img.shape[:2], inv, seg_mpp)
        else:
            if ann is not None and cfg.annotation_mode == "tissue":
                log.warning(
                    "%s: no annotation file in %s: tissue segmented as usual",
                    entry.slide_id,
                    cfg.annotations_dir,
                )
            tissue = segment_tissue(seg_img, seg_mpp, cfg.segment)
        grids = [_Grid(m, mpp, cfg, dims, reader) for m in cfg.target_mpps]  # finest first
        qc_px = min(cfg.qc_max_px, max(dims))
        if max(seg_img.shape[:2]) >= 0.75 * qc_px:  # big enough: no second read for the QC image
            f = min(1.0, qc_px / max(seg_img.shape[:2]))
            qc_img = (
                seg_img
                if f == 1.0
                else cv2.resize(seg_img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
            )
        else:
            t1 = time.perf_counter()
            qc_img = _qc_thumbnail(reader, qc_px)
            t_io += time.perf_counter() - t1
        meta = {
            "backend": reader.backend,
            "vendor": reader.vendor,
            "mpp_source": reader.mpp_source,
            "level_dimensions": [tuple(map(int, d)) for d in reader.level_dimensions],
            "objective_power": reader.objective_power,
        }

    raster = None
    if ann is not None and ann.path is not None:
        sets = {"_region": ann.regions, "_excluded": ann.excluded, **ann.labelled}
        px_per_l0 = A.raster_scale(grids[0].tile_size_l0_exact, (dims[0], dims[1]))
        raster = A.AnnotationRaster(sets, (float(dims[0]), float(dims[1])), px_per_l0)
    n_dropped = {"outside_regions": 0, "excluded": 0}
    # keep tiles by tissue fraction (and annotations), finest grid first
    for g in grids:
        cand = geometry.grid_coords(dims[0], dims[1], g.stride_l0)
        frac = box_fractions(tissue.mask, geometry.tile_boxes(cand, g.tile_size_l0_exact, scale))
        keep = frac >= max(cfg.min_tissue_fraction, 1e-6)
        if raster is not None:
            size = g.tile_size_l0_exact
            if cfg.annotation_mode == "restrict":
                inside = raster.fractions("_region", cand, size) >= cfg.annotation_min_fraction
                n_dropped["outside_regions"] += int((keep & ~inside).sum())
                keep &= inside
            clean = raster.fractions("_excluded", cand, size) <= cfg.annotation_max_excluded
            n_dropped["excluded"] += int((keep & ~clean).sum())
            keep &= clean
        g.coords, g.fractions = cand[keep], frac[keep].astype(np.float32)
    # a coarse grid also keeps the parents of kept finer tiles
    for fine, coarse in zip(grids[:-1], grids[1:]):
        need = geometry.parent_keys_needed(
            fine.coords, fine.tile_size_l0_exact, coarse.stride_l0, (coarse.n_cols, coarse.n_rows)
        )
        if len(need):
            merged = np.unique(np.concatenate([coarse.coords, need]), axis=0)
            frac = box_fractions(
                tissue.mask, geometry.tile_boxes(merged, coarse.tile_size_l0_exact, scale)
            )
            coarse.coords, coarse.fractions = merged, frac.astype(np.float32)
    for g in grids:
        order = geometry.sort_row_major(g.coords)
        g.coords, g.fractions = g.coords[order], g.fractions[order]
    for fine, coarse in zip(grids[:-1], grids[1:]):
        fine.parents = geometry.parent_rows(
            fine.coords,
            fine.tile_size_l0_exact,
            coarse.coords,
            coarse.stride_l0,
            (coarse.n_cols, coarse.n_rows),
        )
    grids[-1].parents = np.full(len(grids[-1].coords), -1, np.int64)
    labels = {}
    if ann is not None:
        for g in grids:
            n = len(g.coords)
            fr = {
                k: raster.fractions(k, g.coords, g.tile_size_l0_exact) if raster else np.zeros(n)
                for k in ann.class_names
            }
            labels[g.target_mpp] = A.assign_classes(
                fr, ann.class_names, cfg.annotation_min_fraction, n
            )

    # write: stores, then GeoJSON, then the QC image (is_tiled needs all of them)
    for i, g in enumerate(grids):
        parent_mpp = grids[i + 1].target_mpp if i + 1 < len(grids) else -1.0
        _write_coords_store(
            layout, entry, cfg, g, mpp, dims, meta, parent_mpp, ann, labels.get(g.target_mpp)
        )
    geo = to_geojson(tissue.polygons, inv, entry.slide_id)
    atomic_write_json(layout.tissue_geojson(entry.slide_id), geo)
    qc = draw_qc(qc_img, tissue, scale, grids[0].coords, grids[0].tile_size_l0_exact, dims)
    atomic_write_bytes(layout.qc_png(entry.slide_id), encode_png(qc))

    total = time.perf_counter() - t0
    n_tiles = {f"{g.target_mpp:g}": int(len(g.coords)) for g in grids}
    log.info(
        "%s: %s tiles at mpp %s (%s, %.2f s)", entry.slide_id, n_tiles, mpp, meta["backend"], total
    )
    extra: dict[str, Any] = {}
    if ann is not None:
        extra["annotations"] = {
            "file": ann.path.name if ann.path else None,
            "mode": cfg.annotation_mode,
            "classes": ann.class_names,
            "tiles_dropped": n_dropped,
            "tiles_labelled": {f"{m:g}": int((cls >= 0).sum()) for m, (cls, _) in labels.items()},
        }
        n_fine = int((labels[grids[0].target_mpp][0] >= 0).sum())
        extra["annotation_summary"] = (
            f"{ann.path.name if ann.path else 'no file'}: {n_fine} labelled, "
            f"{sum(n_dropped.values())} dropped"
        )
    return {
        **extra,
        "tiles": n_tiles,
        "level0_mpp": mpp,
        "backend": meta["backend"],
        "seg_mpp": seg_mpp,
        "tissue_px": int(tissue.mask.sum()),
        "segmentation": qc_caption(tissue),
        "seconds_io": round(t_io, 4),
        "seconds_total": round(total, 4),
    }


def _write_coords_store(
    layout: RunLayout,
    entry: SlideEntry,
    cfg: TileConfig,
    g: _Grid,
    mpp: float,
    dims: tuple[int, ...],
    meta: dict[str, Any],
    parent_mpp: float,
    ann: SlideAnnotations | None = None,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    level_dim = meta["level_dimensions"][g.read_level]
    coords_attrs = schema.clam_coords_attrs(
        slide_id=entry.slide_id,
        tile_px=cfg.tile_px,
        read_level=g.read_level,
        level_downsample=g.level_ds,
        level_dim=level_dim,
        tile_size_level0=g.tile_size_l0,
        level0_mpp=mpp,
        target_mpp=g.target_mpp,
        overlap_px=cfg.overlap_px,
        level0_width=dims[0],
        level0_height=dims[1],
        objective_power=meta["objective_power"],
    )
    grid = schema.GridAttrs(
        slide_id=entry.slide_id,
        slide_path=str(entry.path),
        backend=meta["backend"],
        level0_mpp=mpp,
        target_mpp=g.target_mpp,
        tile_px=cfg.tile_px,
        read_level=g.read_level,
        read_size_px=g.read_size_px,
        tile_size_level0=g.tile_size_l0,
        overlap_px=cfg.overlap_px,
        level0_width=dims[0],
        level0_height=dims[1],
    )
    root = {
        "kind": schema.KIND_COORDS,
        **grid.to_attrs(),
        "vendor": meta["vendor"] or "",
        "mpp_source": meta["mpp_source"],
        "read_downsample": g.level_ds,
        "tile_size_level0_exact": g.tile_size_l0_exact,
        "stride_level0": g.stride_l0,
        "parent_mpp": parent_mpp,
        "min_tissue_fraction": cfg.min_tissue_fraction,
        "config_hash": cfg.config_hash(),
        "patient_id": entry.patient_id,
        "label": entry.label or "",
    }
    if ann is not None:
        root.update(
            annotation_mode=cfg.annotation_mode,
            annotation_file=ann.path.name if ann.path else "",
            annotation_sha256=ann.sha256,
            tissue_source=(
                "annotations"
                if cfg.annotation_mode == "tissue" and ann.path is not None
                else "segmentation"
            ),
        )
    with create_store(layout.coords_store(entry.slide_id, g.target_mpp, cfg.store)) as w:
        w.put(schema.COORDS, g.coords, coords_attrs)
        w.put(schema.TISSUE_FRACTION, g.fractions)
        w.put(schema.PARENT_INDEX, g.parents)
        if ann is not None and labels is not None:
            w.put(schema.ANNOTATION_CLASS, labels[0], {schema.CLASS_NAMES: ann.class_names})
            w.put(schema.ANNOTATION_FRACTION, labels[1])
        w.set_attrs(root)


def draw_qc(
    thumb: np.ndarray,
    tissue: Any,
    seg_scale: tuple[float, float],
    coords: np.ndarray,
    tile_size_l0: float,
    dims_l0: tuple[int, ...],
) -> np.ndarray:
    """QC image: thumbnail (RGB uint8) with tissue contours (green), holes (blue), pen (magenta)
    and kept tiles (red), and below it a caption with the segmentation's glass reference and
    threshold (`qc_caption`). Polygons are in segmentation px (`seg_scale` = seg px per level-0
    px)."""
    img = np.ascontiguousarray(thumb[..., :3].copy())
    tx, ty = img.shape[1] / dims_l0[0], img.shape[0] / dims_l0[1]  # thumb px per level-0 px
    if tissue.pen_mask is not None and tissue.pen_mask.any():
        pen = cv2.resize(
            tissue.pen_mask.astype(np.uint8),
            (img.shape[1], img.shape[0]),
            interpolation=cv2.INTER_NEAREST,
        ).astype(bool)
        img[pen] = (0.5 * img[pen] + 0.5 * np.array([255, 0, 255])).astype(np.uint8)
    thick = max(1, int(round(max(img.shape[:2]) / 600)))
    f = np.array([tx / seg_scale[0], ty / seg_scale[1]])
    for outer, holes in tissue.polygons:
        cv2.polylines(img, [np.round(outer * f).astype(np.int32)], True, (0, 200, 0), thick)
        for h in holes:
            cv2.polylines(img, [np.round(h * f).astype(np.int32)], True, (0, 0, 255), thick)
    for x, y in coords:
        p0 = (int(math.floor(x * tx)), int(math.floor(y * ty)))
        p1 = (int(math.floor((x + tile_size_l0) * tx)), int(math.floor((y + tile_size_l0) * ty)))
        cv2.rectangle(img, p0, p1, (220, 0, 0), 1)
    return _caption(img, qc_caption(tissue))


def qc_caption(tissue: Any) -> str:
    """One line saying how the mask was made: the glass reference and the threshold."""
    method = getattr(tissue, "method", "saturation")
    frac = f"tissue {tissue.tissue_fraction:.0%}"
    if method == "annotations":
        return f"{frac} | {'; '.join(tissue.notes)}"
    if method == "optical_density":
        r, g, b = (int(round(v)) for v in tissue.background_rgb)
        ref = f"glass RGB {r},{g},{b}" if tissue.glass_found else "no glass in view (vs white)"
        return f"{frac} | OD > {tissue.threshold:.3f} vs {ref}"
    return f"{frac} | saturation > {tissue.threshold:.0f}"


def _caption(img: np.ndarray, text: str) -> np.ndarray:
    """`img` with a white strip below it holding `text` (the image itself is not covered)."""
    scale = max(0.35, min(1.0, img.shape[1] / 1200))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    f = min(1.0, (img.shape[1] - 8) / max(1, tw))  # narrow images: shrink the text to fit
    strip = np.full((int((th + base) * f) + 8, img.shape[1], 3), 255, np.uint8)
    cv2.putText(
        strip,
        text,
        (4, int(th * f) + 4),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale * f,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    return np.concatenate([img, strip], axis=0)


def run_tile(
    inputs: list[str],
    out: str | Path,
    cfg: TileConfig,
    *,
    workers: int = 1,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> RunSummary:
    """Tile every slide of `inputs` (folders, files or a manifest) into run folder `out`.

    Saves the resolved config and the slide table, then runs `tile_slide` per slide through the
    runner (resume, locks, state, failures recorded). Returns the runner's RunSummary.
    """
    from functools import partial

    from wsi_pipe import __version__
    from wsi_pipe.core.config import dump_config
    from wsi_pipe.core.fsutil import atomic_write_text
    from wsi_pipe.core.manifest import discover, save_slide_table
    from wsi_pipe.runner import run_slides

    layout = RunLayout(out)
    entries = discover(list(inputs))
    layout.root.mkdir(parents=True, exist_ok=True)
    if not layout.marker.exists():  # makes the folder a run that later commands find upwards
        atomic_write_text(layout.marker, f"wsi-pipe {__version__} run folder\n")
    atomic_write_text(layout.config("tile"), dump_config(cfg))
    save_slide_table(layout.slides_table, entries)
    return run_slides(
        "tile",
        entries,
        partial(tile_slide, cfg=cfg, layout=layout),
        layout,
        is_done=partial(is_tiled, cfg=cfg, layout=layout),
        workers=workers,
        shard=shard,
        overwrite=overwrite,
        progress=progress,
    )
