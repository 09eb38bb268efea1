"""`wsi-pipe anomaly fit|score`: unsupervised anomaly maps on slide feature grids.

fit:   the feature grids of the run's normal slides (or all slides, for QC) -> one model under
       `RunLayout.anomaly_dir(name)`: model.pt (weights or memory bank, standardiser,
       calibration, resolved config, provenance) + config.yaml. SP-Mamba training resumes from
       its last checkpoint after a crash; a finished model with the same config is kept.
score: per slide, through the runner (skip-if-done, lock, state, catch-and-record):
       a score store (same rows as coords; `anomaly_score` + `anomaly_parts`), the top-k tiles
       as PNGs, and a heatmap PNG over the thumbnail with a colour bar; then, for the run,
       slide_scores.csv (slide_id, score and its parts) and metrics.json (slide AUROC with a
       bootstrap CI when labels exist; tile AUROC and AUPRO with tile labels).

Tile labels come from a folder of QuPath GeoJSON given to `score` (`--annotations`), or else
from the run's coords stores when they were tiled with annotations (`annotation_class`, the
class each tile got at tiling): a tile is anomalous when its class is one of the anomaly classes
(default: any class). A slide whose GeoJSON is missing (a file in the folder, or the store's
`annotation_file` is "") counts as all-normal tiles when labelled normal and is left out of the
tile metrics otherwise.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import platform
import socket
import subprocess
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from wsi_pipe.anomaly import scorers as S
from wsi_pipe.anomaly.config import AnomalyConfig
from wsi_pipe.anomaly.data import SlideGrid, load_slide_grid, resolve_feature_set
from wsi_pipe.anomaly.metrics import aupro, auroc, auroc_ci, region_labels, top_fraction_precision
from wsi_pipe.core.config import dump_config
from wsi_pipe.core.errors import (
    CheckpointError,
    ConfigError,
    EmptyInputError,
    StoreSchemaError,
    WsiPipeError,
)
from wsi_pipe.core.fsutil import (
    FileLock,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_hash,
    remove_path,
    remove_tmp_siblings,
)
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.core.manifest import SlideEntry, load_slide_table, read_manifest
from wsi_pipe.imageops.tiles import encode_png
from wsi_pipe.store import create_store, open_store, schema
from wsi_pipe.torchutil import resolve_device

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "wsi-pipe-anomaly"
CHECKPOINT_VERSION = 1
SLIDE_SCORE_COLUMNS = ("slide_id", "score", "max", "dog", "concentration", "n_tiles", "label")


# ------------------------------------------------------------------------------- helpers
def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _labels(
    layout: RunLayout, entries: list[SlideEntry], manifest: str | Path | None
) -> dict[str, str | None]:
    """slide id -> label: the manifest's when given, else the run's slide table's."""
    if manifest is not None:
        by_id = {e.slide_id: e.label for e in read_manifest(manifest)}
        return {e.slide_id: by_id.get(e.slide_id) for e in entries}
    return {e.slide_id: e.label for e in entries}


def _select(entries: list[SlideEntry], slides: list[str] | None) -> list[SlideEntry]:
    if not slides:
        return entries
    have = {e.slide_id: e for e in entries}
    missing = [s for s in slides if s not in have]
    if missing:
        raise ConfigError(
            f"slides {missing} are not in the run's slide table: check the ids (`--slides`)"
        )
    return [have[s] for s in slides]


def resume_path(layout: RunLayout, name: str) -> Path:
    """The SP-Mamba training checkpoint of an unfinished fit (removed once model.pt exists)."""
    return layout.anomaly_fit_resume(name)


# ------------------------------------------------------------------------------------ fit
@dataclass
class FitResult:
    name: str
    model_path: Path
    method: str
    n_slides: int
    n_tiles: int
    seconds: float
    skipped: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def _stored_config_hash(path: Path) -> str | None:
    try:
        return str(torch.load(path, map_location="cpu", weights_only=True).get("config_hash"))
    except Exception:
        return None


def fit_anomaly(
    run_dir: str | Path,
    cfg: AnomalyConfig,
    *,
    manifest: str | Path | None = None,
    name: str | None = None,
    slides: list[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> FitResult:
    """Fit an anomaly model (cfg.method) on the normal slides of a run. See the module doc."""
    t0 = time.perf_counter()
    layout = RunLayout(run_dir)
    name = name or cfg.method
    set_name, mpps = resolve_feature_set(layout, cfg.features, cfg.mpps)
    cfg = cfg.model_copy(update={"features": set_name, "mpps": mpps})
    out = layout.anomaly_model(name)
    if out.exists() and not overwrite:
        if _stored_config_hash(out) == cfg.config_hash():
            log.info("anomaly model %s is already fitted with this config: kept (%s)", name, out)
            return FitResult(name, out, cfg.method, 0, 0, 0.0, skipped=True)
        raise ConfigError(
            f"anomaly model {name!r} exists at {out} with another config: pass --overwrite "
            "to refit it, or --name to fit a new one"
        )
    entries = _select(load_slide_table(layout.slides_table), slides)
    labels = _labels(layout, entries, manifest)
    if cfg.normal_label is None:
        train = entries
    else:
        train = [e for e in entries if labels.get(e.slide_id) == cfg.normal_label]
    if not train:
        found = sorted({str(v) for v in labels.values()})
        raise EmptyInputError(
            f"no normal slides: none of the {len(entries)} slides of {layout.root} is labelled "
            f"{cfg.normal_label!r} (labels found: {', '.join(found)}); pass --normal-label with one of "
            "those, a --manifest with labels, or --all-slides to fit on every slide (QC)"
        )
    lock = FileLock(layout.lock_file("anomaly-fit", name))
    if not lock.acquire():
        raise ConfigError(
            f"anomaly model {name!r} is being fitted by {lock.read()}: wait for it, or use --name"
        )
    try:
        return _fit_locked(layout, cfg, name, train, labels, t0, progress)
    finally:
        lock.release()


def _fit_locked(
    layout: RunLayout,
    cfg: AnomalyConfig,
    name: str,
    train: list[SlideEntry],
    labels: dict[str, str | None],
    t0: float,
    progress: bool,
) -> FitResult:
    assert cfg.features is not None and cfg.mpps is not None
    device = resolve_device(cfg.device)
    grids = [
        load_slide_grid(layout, cfg.features, e, cfg.mpps, labels.get(e.slide_id)) for e in train
    ]
    dims = {tuple(g.scale_dims) for g in grids}
    if len(dims) > 1:
        raise ConfigError(
            f"slides of feature set {cfg.features!r} have different feature widths {dims}: re-run extract"
        )
    x_all = np.concatenate([g.feats for g in grids])
    std = S.Standardizer.fit(x_all)
    log.info(
        "anomaly fit %s (%s): %d slides, %d tiles, %d-dim features at mpp %s",
        name,
        cfg.method,
        len(grids),
        len(x_all),
        x_all.shape[1],
        ", ".join(f"{m:g}" for m in cfg.mpps),
    )
    info: dict[str, Any] = {}
    before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        scorer: S.Scorer
        if cfg.method == "spmamba":
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=cfg.steps, desc=f"anomaly fit {name}", unit="step")

            def tick(step: int, loss: float) -> None:
                if bar is not None:
                    bar.n = step
                    bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
                    bar.refresh()

            rpath = resume_path(layout, name)
            remove_tmp_siblings(rpath)
            try:
                scorer, info = S.fit_spmamba(grids, std, cfg, rpath, device, tick)
            finally:
                if bar is not None:
                    bar.close()
            parts = np.concatenate([scorer.tile_parts(g) for g in grids])
            weights = [1.0] * len(grids[0].scale_dims) + [cfg.proto_weight]
        elif cfg.method == "knn":
            scorer, cal = S.fit_knn(x_all, std, cfg)
            parts = scorer.tile_parts(_rows_grid(grids[0], x_all[cal]))
            weights = [1.0]
            info = {"bank_size": int(len(scorer.bank)), "n_calibration": int(len(cal))}  # type: ignore[attr-defined]
        else:
            scorer, cal = S.fit_mahalanobis(x_all, std, cfg)
            parts = scorer.tile_parts(_rows_grid(grids[0], x_all[cal]))
            weights = [1.0]
            info = {"n_calibration": int(len(cal))}
    finally:
        torch.set_num_threads(before)
    calib = S.Calibration.fit(scorer.part_names, parts, weights)
    ck = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "method": cfg.method,
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.config_hash(),
        "feature_set": cfg.features,
        "mpps": list(cfg.mpps),
        "scale_dims": grids[0].scale_dims,
        "standardizer": {"mean": torch.from_numpy(std.mean), "std": torch.from_numpy(std.std)},
        "calibration": calib.to_dict(),
        "state": scorer.state(),
        "train": info,
        "provenance": {
            "slides": [g.slide_id for g in grids],
            "n_tiles": int(len(x_all)),
            "encoder": grids[0].attrs.get("encoder"),
            "weights_hash": grids[0].attrs.get("weights_hash"),
            "features_config_hash": grids[0].attrs.get("config_hash"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": socket.gethostname(),
            "torch": str(torch.__version__),
            "python": platform.python_version(),
            "git_commit": _git_commit(),
        },
    }
    out = layout.anomaly_model(name)
    atomic_write_text(layout.anomaly_config(name), dump_config(cfg))
    with atomic_path(out) as tmp:
        torch.save(ck, tmp)
    remove_path(resume_path(layout, name))
    secs = time.perf_counter() - t0
    log.info("anomaly model %s written to %s (%.1f s)", name, out, secs)
    return FitResult(name, out, cfg.method, len(grids), int(len(x_all)), secs, info=info)


def _rows_grid(like: SlideGrid, feats: np.ndarray) -> SlideGrid:
    """A stand-in grid holding `feats` rows (pointwise scorers only read features)."""
    n = len(feats)
    return SlideGrid(
        "calibration",
        np.zeros((n, 2), np.int64),
        feats,
        np.zeros((n, 2), np.int64),
        (1, 1),
        like.mpp,
        like.stride_l0,
        like.tile_size_l0,
        like.scale_dims,
    )


# ---------------------------------------------------------------------------------- model
@dataclass
class LoadedModel:
    name: str
    path: Path
    model_hash: str
    cfg: AnomalyConfig
    scorer: S.Scorer
    calib: S.Calibration
    info: dict[str, Any]


def load_anomaly_model(
    layout: RunLayout, name: str | None = None, device: str | None = None
) -> LoadedModel:
    """A fitted model of the run (default: the latest). Errors name the file and the fix."""
    if name is None:
        names = layout.anomaly_models()
        if not names:
            raise EmptyInputError(
                f"{layout.root} has no fitted anomaly model: run `wsi-pipe anomaly fit {layout.root}` first"
            )
        name = names[-1]
    path = layout.anomaly_model(name)
    if not path.exists():
        have = ", ".join(layout.anomaly_models()) or "none"
        raise CheckpointError(
            f"anomaly model {name!r} does not exist at {path} (fitted: {have}): "
            "run `wsi-pipe anomaly fit` or pick another --model"
        )
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable anomaly checkpoint ({e}): refit with --overwrite"
        ) from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a wsi-pipe anomaly checkpoint: refit with `wsi-pipe anomaly fit --overwrite`"
        )
    cfg = AnomalyConfig.model_validate(ck["config"])
    if device is not None:
        cfg = cfg.model_copy(update={"device": device})
    dev = resolve_device(cfg.device)
    std = S.Standardizer(ck["standardizer"]["mean"].numpy(), ck["standardizer"]["std"].numpy())
    scorer = S.scorer_from_state(ck["method"], ck["state"], std, cfg, list(ck["scale_dims"]), dev)
    return LoadedModel(
        name,
        path,
        file_hash(path),
        cfg,
        scorer,
        S.Calibration.from_dict(ck["calibration"]),
        {"provenance": ck.get("provenance", {}), "train": ck.get("train", {})},
    )


# ---------------------------------------------------------------------------------- score
@dataclass(frozen=True)
class ScoreJob:
    layout: RunLayout
    model: LoadedModel
    labels: dict[str, str | None]


def _outputs(job: ScoreJob, sid: str) -> tuple[Path, Path, Path]:
    cfg, name = job.model.cfg, job.model.name
    assert cfg.mpps is not None
    return (
        job.layout.anomaly_score_store(name, sid, cfg.mpps[0], cfg.store),
        job.layout.anomaly_heatmap(name, sid),
        job.layout.anomaly_top_tiles_dir(name, sid),
    )


def is_scored(entry: SlideEntry, job: ScoreJob) -> bool:
    """The slide's score store exists (written last) and was made by this model file."""
    store, heat, _ = _outputs(job, entry.slide_id)
    if not (store.exists() and heat.exists()):
        return False
    try:
        with open_store(store, validate=False) as r:
            return r.attrs.get("model_hash") == job.model.model_hash
    except Exception:
        return False


def colour_bar(
    height: int, vmax: float, width: int = 22, label_px: int = 64, colormap: int = cv2.COLORMAP_JET
) -> np.ndarray:
    """RGB (height, width + label_px) uint8: a vertical colour bar from 0 (bottom) to vmax (top)."""
    h = max(32, int(height))
    ramp = np.linspace(255, 0, h).astype(np.uint8)[:, None].repeat(width, 1)
    bar = cv2.cvtColor(cv2.applyColorMap(ramp, colormap), cv2.COLOR_BGR2RGB)
    out = np.full((h, width + label_px, 3), 255, np.uint8)
    out[:, :width] = bar
    for frac in (0.0, 0.5, 1.0):
        y = int(round((1 - frac) * (h - 1)))
        y_text = min(max(y + 4, 10), h - 3)
        cv2.putText(
            out,
            f"{frac * vmax:.3g}",
            (width + 4, y_text),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.35,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    return out


def render_anomaly_heatmap(
    thumb: np.ndarray,
    grid: SlideGrid,
    values: np.ndarray,
    dims_l0: tuple[int, int],
    vmax: float,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend the tile map over a thumbnail (h, w, 3) RGB of a slide of level-0 size `dims_l0`,
    on a fixed scale [0, vmax] (so slides compare), and append a colour bar. Vectorised: the grid
    map is resized onto the thumbnail's pixels (nearest), no loop over tiles."""
    h, w = thumb.shape[:2]
    sx, sy = w / float(dims_l0[0]), h / float(dims_l0[1])
    rows, cols = grid.shape
    v = np.clip(values / vmax, 0, 1)
    level = np.zeros((rows, cols), np.uint8)
    cover = np.zeros((rows, cols), np.uint8)
    level[grid.cells[:, 1], grid.cells[:, 0]] = np.round(255 * v).astype(np.uint8)
    cover[grid.cells[:, 1], grid.cells[:, 0]] = 1
    x0_l0 = float(grid.coords[:, 0].min())
    y0_l0 = float(grid.coords[:, 1].min())
    # the grid's cells in thumbnail px: cell (c, r) covers [x0 + c * stride, + stride)
    xs = ((np.arange(w) + 0.5) / sx - x0_l0) / grid.stride_l0
    ys = ((np.arange(h) + 0.5) / sy - y0_l0) / grid.stride_l0
    ci, ri = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    okx, oky = (ci >= 0) & (ci < cols), (ri >= 0) & (ri < rows)
    lv = np.zeros((h, w), np.uint8)
    cv_ = np.zeros((h, w), bool)
    sub = np.ix_(np.nonzero(oky)[0], np.nonzero(okx)[0])
    lv[sub] = level[np.ix_(ri[oky], ci[okx])]
    cv_[sub] = cover[np.ix_(ri[oky], ci[okx])].astype(bool)
    colour = cv2.cvtColor(cv2.applyColorMap(lv, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    out = thumb.copy()
    blend = (1 - alpha) * thumb[cv_].astype(np.float64) + alpha * colour[cv_].astype(np.float64)
    out[cv_] = np.clip(np.round(blend), 0, 255).astype(np.uint8)
    bar = colour_bar(h, vmax)
    if bar.shape[0] != h:
        pad = np.full((bar.shape[0], w, 3), 255, np.uint8)
        pad[:h] = out
        out = pad
    return np.concatenate([out, np.full((out.shape[0], 8, 3), 255, np.uint8), bar], axis=1)


def _draw_outputs(job: ScoreJob, grid: SlideGrid, values: np.ndarray) -> dict[str, Any]:
    """Top-k tile PNGs and the heatmap PNG. Without a readable slide file the heatmap is drawn on
    a white canvas and no tiles are saved (recorded in the returned info)."""
    from wsi_pipe.core.errors import SlideReadError
    from wsi_pipe.readers import open_slide
    from wsi_pipe.readers.top_tiles import write_top_tiles

    cfg = job.model.cfg
    _, heat, top_dir = _outputs(job, grid.slide_id)
    remove_path(top_dir)
    order = np.lexsort((np.arange(len(values)), -values))  # stable: ties by row
    info: dict[str, Any] = {"thumbnail": "slide"}
    reader = None
    if grid.slide_path:
        try:
            reader = open_slide(
                grid.slide_path,
                slide_id=grid.slide_id,
                mpp_override=float(grid.attrs.get("level0_mpp") or 0) or None,
            )
        except (SlideReadError, WsiPipeError, OSError) as e:
            log.warning(
                "%s: slide file unreadable (%s): heatmap on a blank canvas, no top tiles",
                grid.slide_id,
                e,
            )
    try:
        if reader is not None:
            thumb = reader.get_thumbnail(cfg.heatmap_max_px)
            dims = tuple(int(v) for v in reader.dimensions)
            write_top_tiles(reader, grid.coords, order, grid.tile_size_l0, top_dir, cfg.top_k)
        else:
            info["thumbnail"] = "blank"
            w0 = int(grid.attrs.get("level0_width") or grid.coords[:, 0].max() + grid.tile_size_l0)
            h0 = int(grid.attrs.get("level0_height") or grid.coords[:, 1].max() + grid.tile_size_l0)
            f = min(1.0, cfg.heatmap_max_px / max(w0, h0))
            thumb = np.full((max(1, round(h0 * f)), max(1, round(w0 * f)), 3), 255, np.uint8)
            dims = (w0, h0)
        img = render_anomaly_heatmap(
            thumb, grid, values, (int(dims[0]), int(dims[1])), cfg.heatmap_vmax
        )
        atomic_write_bytes(heat, encode_png(img))
    finally:
        if reader is not None:
            reader.close()
    return info


def score_slide(entry: SlideEntry, job: ScoreJob) -> dict[str, Any]:
    """Score one slide: score store, top-k tiles, heatmap. Returns info for the state file."""
    m = job.model
    cfg = m.cfg
    assert cfg.features is not None and cfg.mpps is not None
    store, heat, _ = _outputs(job, entry.slide_id)
    for p in (store, heat):
        remove_tmp_siblings(p)
    grid = load_slide_grid(
        job.layout, cfg.features, entry, cfg.mpps, job.labels.get(entry.slide_id)
    )
    if grid.feats.shape[1] != sum(m.scorer.standardizer.mean.shape):
        raise ConfigError(
            f"slide {entry.slide_id}: features are {grid.feats.shape[1]}-dim, model {m.name} "
            f"expects {m.scorer.standardizer.mean.shape[0]}: score with a model fitted on this feature set"
        )
    gs = S.score_grid(m.scorer, m.calib, grid, cfg)
    info = _draw_outputs(job, grid, gs.tile_map)
    root = {
        "kind": schema.KIND_ANOMALY,
        "slide_id": entry.slide_id,
        "level0_mpp": grid.attrs.get("level0_mpp"),
        "target_mpp": grid.mpp,
        "tile_px": grid.attrs.get("tile_px"),
        "tile_size_level0": grid.tile_size_l0,
        "stride_level0": grid.stride_l0,
        "anomaly_model": m.name,
        "model_hash": m.model_hash,
        "method": cfg.method,
        "feature_set": cfg.features,
        "slide_score": gs.score,
        "slide_score_parts": json.dumps(gs.score_parts),
        "label": grid.label or "",
        "level0_width": grid.attrs.get("level0_width"),
        "level0_height": grid.attrs.get("level0_height"),
    }
    with create_store(store) as w:
        w.put(schema.COORDS, grid.coords, grid.coords_attrs)
        w.put(schema.ANOMALY_SCORE, gs.tile_map.astype(np.float32))
        w.put(
            schema.ANOMALY_PARTS,
            gs.parts.astype(np.float32),
            {"part_names": list(m.scorer.part_names)},
        )
        w.set_attrs({k: v for k, v in root.items() if v is not None})
    return {"tiles": len(grid), "score": round(gs.score, 6), **info}


@dataclass
class ScoreResult:
    name: str
    summary: Any
    slide_scores: Path
    metrics: dict[str, Any]
    metrics_path: Path | None


def read_score_store(path: Path) -> dict[str, Any]:
    """coords, anomaly_score, anomaly_parts, part_names and root attrs of a score store."""
    with open_store(path) as r:
        out = {
            "coords": r.read(schema.COORDS),
            "score": r.read(schema.ANOMALY_SCORE),
            "attrs": r.attrs,
        }
        if schema.ANOMALY_PARTS in r.names:
            out["parts"] = r.read(schema.ANOMALY_PARTS)
            out["part_names"] = r.array_attrs(schema.ANOMALY_PARTS).get("part_names")
    return out


def score_anomaly(
    run_dir: str | Path,
    *,
    model: str | None = None,
    slides: list[str] | None = None,
    manifest: str | Path | None = None,
    annotations: str | Path | None = None,
    anomaly_classes: list[str] | None = None,
    min_overlap: float = 0.5,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    device: str | None = None,
    top_k: int | None = None,
) -> ScoreResult:
    """Score the run's slides with a fitted model (default: the latest); see the module doc.

    annotations: a folder of QuPath GeoJSON files `<slide_id>.geojson` (tile labels: tiles covered
    >= `min_overlap` by annotations of `anomaly_classes`, None = any class). Without it, the
    `annotation_class` stored by `wsi-pipe tile --annotations` labels the tiles (anomalous:
    a class in `anomaly_classes`, case-insensitive, None = any). Slides without a GeoJSON count
    as all-normal tiles when labelled normal, and are left out of tile metrics else.
    """
    from wsi_pipe.runner import run_slides

    layout = RunLayout(run_dir)
    m = load_anomaly_model(layout, model, device)
    if top_k is not None:  # an output setting: the model (and its hash) stay as fitted
        m.cfg = m.cfg.model_copy(update={"top_k": int(top_k)})
    entries = _select(load_slide_table(layout.slides_table), slides)
    labels = _labels(layout, entries, manifest)
    job = ScoreJob(layout, m, labels)
    before = torch.get_num_threads()
    if m.cfg.threads is not None:
        torch.set_num_threads(m.cfg.threads)
    try:
        summary = run_slides(
            f"anomaly/{m.name}",
            entries,
            partial(score_slide, job=job),
            layout,
            is_done=partial(is_scored, job=job),
            workers=1,
            shard=shard,
            overwrite=overwrite,
            progress=progress,
        )
    finally:
        torch.set_num_threads(before)
    csv_path, rows = write_slide_scores(
        job, [e.slide_id for e in load_slide_table(layout.slides_table)]
    )
    metrics = compute_run_metrics(job, rows, annotations, anomaly_classes, min_overlap)
    mpath = None
    if metrics:
        mpath = layout.anomaly_metrics(m.name)
        atomic_write_json(mpath, metrics)
    return ScoreResult(m.name, summary, csv_path, metrics, mpath)


def write_slide_scores(job: ScoreJob, slide_ids: list[str]) -> tuple[Path, list[dict[str, Any]]]:
    """slide_scores.csv of every slide scored by this model (atomic), sorted by slide id."""
    rows = []
    for sid in sorted(slide_ids):
        store = _outputs(job, sid)[0]
        if not store.exists():
            continue
        with open_store(store) as r:
            a = r.attrs
            n = r.shape(schema.COORDS)[0]
        if a.get("model_hash") != job.model.model_hash:
            continue
        parts = json.loads(a.get("slide_score_parts") or "{}")
        rows.append(
            {
                "slide_id": sid,
                "score": float(a["slide_score"]),
                **parts,
                "n_tiles": int(n),
                "label": job.labels.get(sid) or "",
            }
        )
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(SLIDE_SCORE_COLUMNS), lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
    path = job.layout.anomaly_slide_scores(job.model.name)
    atomic_write_text(path, buf.getvalue())
    return path, rows


def compute_run_metrics(
    job: ScoreJob,
    rows: list[dict[str, Any]],
    annotations: str | Path | None,
    anomaly_classes: list[str] | None,
    min_overlap: float,
) -> dict[str, Any]:
    """Slide AUROC (+ CI) from labels; tile AUROC, AUPRO, top-5 % precision from annotations."""
    cfg = job.model.cfg
    out: dict[str, Any] = {}
    normal = cfg.normal_label
    labelled = [r for r in rows if r["label"]]
    if normal is not None and labelled:
        y = np.array([r["label"] != normal for r in labelled])
        if y.any() and not y.all():
            s = np.array([r["score"] for r in labelled])
            out["slide_auroc"] = auroc_ci(y, s, cfg.bootstrap, cfg.seed)
            for part in ("max", "dog", "concentration"):
                out[f"slide_auroc_{part}"] = auroc(y, np.array([r[part] for r in labelled]))
    folder = Path(annotations) if annotations is not None else None
    if folder is not None and not folder.is_dir():
        raise ConfigError(f"--annotations {folder} is not a folder of <slide_id>.geojson files")
    if folder is not None or _run_has_stored_labels(job, rows):
        from wsi_pipe.anomaly.grid import grid_cells
        from wsi_pipe.imageops.annotations import find_annotation_file, label_tiles, read_geojson

        scores, regions, ys = [], [], []
        for r in rows:
            sid = r["slide_id"]
            st = read_score_store(_outputs(job, sid)[0])
            a = st["attrs"]
            pos: np.ndarray | None = None
            if folder is not None:
                gj = find_annotation_file(folder, sid)
                if gj is not None:
                    pos = label_tiles(
                        st["coords"],
                        float(a["tile_size_level0"]),
                        read_geojson(gj),
                        anomaly_classes,
                        min_overlap,
                    )
            else:
                pos = stored_tile_labels(job.layout, sid, st["coords"], a, anomaly_classes)
            if pos is None:
                if normal is None or r["label"] != normal:
                    continue  # no tile labels for a slide that is not known to be normal
                pos = np.zeros(len(st["coords"]), bool)
            cells, shape = grid_cells(st["coords"], float(a["stride_level0"]))
            scores.append(st["score"].astype(np.float64))
            regions.append(region_labels(cells, shape, pos))
            ys.append(pos)
        if ys:
            y_all, s_all = np.concatenate(ys), np.concatenate(scores)
            out["tile_auroc"] = auroc(y_all, s_all)
            out["aupro"] = aupro(scores, regions)
            out["top5_precision"] = top_fraction_precision(s_all, y_all, 0.05)
            out["n_tiles"] = int(len(y_all))
            out["n_anomalous_tiles"] = int(y_all.sum())
            out["tile_labels"] = "geojson" if folder is not None else "stored annotation_class"
    if out:
        out = {"model": job.model.name, "method": cfg.method, **out}
    return _finite(out)


def _coords_store_of(layout: RunLayout, slide_id: str, attrs: dict[str, Any]) -> Path | None:
    mpp = attrs.get("target_mpp")
    return layout.find_coords_store(slide_id, float(mpp)) if mpp is not None else None


def _run_has_stored_labels(job: ScoreJob, rows: list[dict[str, Any]]) -> bool:
    """Whether any scored slide's coords store carries `annotation_class`."""
    for r in rows:
        with open_store(_outputs(job, r["slide_id"])[0]) as st:
            attrs = st.attrs
        store = _coords_store_of(job.layout, r["slide_id"], attrs)
        if store is not None:
            with open_store(store, validate=False) as c:
                if schema.ANNOTATION_CLASS in c.names:
                    return True
    return False


def stored_tile_labels(
    layout: RunLayout,
    slide_id: str,
    coords: np.ndarray,
    score_attrs: dict[str, Any],
    anomaly_classes: list[str] | None,
) -> np.ndarray | None:
    """(n,) bool: tiles at `coords` whose stored annotation class is an anomaly class (None =
    any class), from the slide's coords store at the score grid; None when the store has no
    `annotation_class` or the slide had no GeoJSON at tiling. StoreSchemaError when a scored
    tile is missing from the coords store (the run was re-tiled after extract)."""
    store = _coords_store_of(layout, slide_id, score_attrs)
    if store is None:
        return None
    with open_store(store) as r:
        if schema.ANNOTATION_CLASS not in r.names or not r.attrs.get("annotation_file"):
            return None
        names = list(r.array_attrs(schema.ANNOTATION_CLASS)[schema.CLASS_NAMES])
        cls = r.read(schema.ANNOTATION_CLASS)
        tile_coords = r.read(schema.COORDS)
    want = {c.lower() for c in anomaly_classes} if anomaly_classes else None
    anomalous = np.array(
        [want is None or n.lower() in want for n in names] + [False], bool
    )  # index -1 -> the appended False
    row = {(int(x), int(y)): i for i, (x, y) in enumerate(tile_coords)}
    idx = np.array([row.get((int(x), int(y)), -2) for x, y in coords], np.int64)
    if np.any(idx == -2):
        raise StoreSchemaError(
            f"slide {slide_id}: {int((idx == -2).sum())} scored tiles are not in {store}: the "
            "slide was re-tiled after extract; re-run extract and anomaly score (--overwrite)"
        )
    out: np.ndarray = anomalous[cls[idx]]
    return out


def _finite(obj: Any) -> Any:
    """JSON-safe copy: NaN -> None."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


__all__ = [
    "FitResult",
    "LoadedModel",
    "ScoreResult",
    "fit_anomaly",
    "is_scored",
    "load_anomaly_model",
    "read_score_store",
    "render_anomaly_heatmap",
    "score_anomaly",
    "score_slide",
]
