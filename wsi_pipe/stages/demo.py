"""`wsi-pipe demo`: the whole pipeline on a synthetic cohort, on the CPU, with no downloads.

1. A cohort of pyramidal TIFF slides (mpp 0.5, 3 levels) in two classes: "normal" slides hold
   tissue with one real histology texture (scikit-image's bundled IHC image); "tumour" slides
   hold the same tissue with one or two regions of another texture (the same image re-stained
   H&E-like, at twice the scale). Shapes and regions are random but seeded.
2. tile (1 um/px, 64 px) -> pretrain (a tiny SSMamba, MAMIM, a few steps) -> extract ->
   train-mil (ABMIL, 2-fold patient-level CV) -> attention heatmaps, via `run_pipeline`.
3. the run report (`wsi-pipe report`): `out/run/report.html`.

A second run resumes: slides that exist are kept, finished stages are skipped.
"""

from __future__ import annotations

import logging
import math
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from wsi_pipe.core.config import ExtractConfig, MilConfig, PretrainConfig, RunConfig, TileConfig
from wsi_pipe.core.fsutil import atomic_write_text
from wsi_pipe.stages.pipeline import PipelineResult, check_run_config, run_pipeline

log = logging.getLogger(__name__)

CLASSES = ("normal", "tumour")
DEMO_MPP = 0.5


def _slide_recipe(index: int, size_px: int, seed: int) -> tuple[str, str, dict]:
    """(slide id, label, shapes) of slide `index`: tissue discs/rects, tumour regions (level-0 px)."""
    rng = random.Random(seed * 1_000_003 + index)
    label = CLASSES[index % 2]
    s = float(size_px)
    cx, cy = rng.uniform(0.4, 0.6) * s, rng.uniform(0.4, 0.6) * s
    r = rng.uniform(0.28, 0.36) * s
    tissue = [("disc", (cx, cy, r))]
    # a second piece: a strip or a smaller disc, somewhere else on the glass
    if rng.random() < 0.5:
        x0 = rng.uniform(0.05, 0.15) * s
        tissue.append(("rect", (x0, 0.1 * s, x0 + rng.uniform(0.12, 0.2) * s, 0.9 * s)))
    else:
        tissue.append(
            (
                "disc",
                (
                    rng.uniform(0.75, 0.85) * s,
                    rng.uniform(0.15, 0.85) * s,
                    rng.uniform(0.08, 0.12) * s,
                ),
            )
        )
    regions = []
    if label == "tumour":
        for _ in range(rng.choice((1, 2))):
            ang, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.45) * r
            regions.append(
                (cx + dist * math.cos(ang), cy + dist * math.sin(ang), rng.uniform(0.3, 0.45) * r)
            )
    sid = f"demo_{index:03d}_{label}"
    return sid, label, {"tissue": tissue, "regions": regions}


def _write_slide(path: str, size_px: int, recipe: dict) -> str:
    from wsi_pipe.synth import Disc, Rect, TexturePainter, write_pyramidal_tiff

    shapes = [Disc(*a) if kind == "disc" else Rect(*a) for kind, a in recipe["tissue"]]
    painter = TexturePainter(shapes, "A", 1.0, regions=[(Disc(*d), "B") for d in recipe["regions"]])
    write_pyramidal_tiff(path, size_px, size_px, DEMO_MPP, levels=3, painter=painter)
    return path


def build_cohort(
    folder: str | Path, n_slides: int = 8, size_px: int = 4096, seed: int = 0, workers: int = 1
) -> Path:
    """Write `n_slides` synthetic slides (`size_px` square, level-0 px) and a labelled manifest
    into `folder`; slides already there are kept. Returns the manifest path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recipes = [_slide_recipe(i, size_px, seed) for i in range(n_slides)]
    todo = [
        (str(folder / f"{sid}.tiff"), size_px, rec)
        for sid, _, rec in recipes
        if not (folder / f"{sid}.tiff").exists()
    ]
    if todo:
        log.info(
            "writing %d synthetic slides of %d x %d px into %s", len(todo), size_px, size_px, folder
        )
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                list(pool.map(_write_slide, *zip(*todo)))
        else:
            for args in todo:
                _write_slide(*args)
    rows = ["slide_id,path,patient_id,label"]
    rows += [f"{sid},{sid}.tiff,patient_{sid[5:8]},{label}" for sid, label, _ in recipes]
    manifest = folder / "manifest.csv"
    atomic_write_text(manifest, "\n".join(rows) + "\n")
    return manifest


def demo_config(
    out: str | Path,
    manifest: Path,
    pretrain_epochs: int = 3,
    workers: int = 2,
    seed: int = 0,
    pretrain_steps: int = 10,
    mil_epochs: int = 40,
    bootstrap: int = 200,
) -> RunConfig:
    """The demo's RunConfig: small enough for a laptop CPU in a few minutes.

    pretrain_steps: optimiser steps per pretraining epoch; mil_epochs: MIL epochs per fold;
    bootstrap: resamples of the MIL metrics' CIs (the test suite lowers all three to run every
    stage in seconds).
    """
    out = Path(out).resolve()
    return RunConfig(
        slides=(str(manifest),),
        manifest=str(manifest),
        out=str(out / "run"),
        workers=workers,
        tile=TileConfig(target_mpps=(1.0,), tile_px=64, min_tissue_fraction=0.5),
        pretrain=PretrainConfig(
            arch="ssmamba_tiny",
            input_px=64,
            epochs=pretrain_epochs,
            steps_per_epoch=pretrain_steps,
            max_tiles=2048,
            batch_size=32,
            lr=1e-3,
            warmup_steps=min(5, pretrain_steps),
            checkpoint_every=10,
            workers=0,
            device="cpu",
            seed=seed,
        ),
        extract=ExtractConfig(encoder="pretrained", device="cpu", batch_size=128, workers=0),
        mil=MilConfig(
            method="abmil",
            n_folds=2,
            epochs=mil_epochs,
            patience=mil_epochs,
            hidden_dim=32,
            dropout=0.1,
            lr=1e-3,
            bootstrap=bootstrap,
            device="cpu",
            seed=seed,
        ),
    )


def run_demo(
    out: str | Path = "runs/demo",
    *,
    n_slides: int = 8,
    size_px: int = 4096,
    pretrain_epochs: int = 3,
    workers: int = 2,
    seed: int = 0,
    progress: bool = True,
    pretrain_steps: int = 10,
    mil_epochs: int = 40,
    bootstrap: int = 200,
    report: bool = True,
) -> PipelineResult:
    """Build the synthetic cohort in `out/slides`, run every stage into `out/run` and write the
    run's report (`result.outputs["report"]`, `RunLayout.report_html`).

    A report that cannot be written is logged and left out of the outputs; the run's results stand.
    """
    if n_slides < 4:
        raise ValueError(f"the demo needs at least 4 slides (2 per class), got {n_slides}")
    out = Path(out).resolve()
    manifest = build_cohort(out / "slides", n_slides, size_px, seed, workers)
    cfg = demo_config(
        out, manifest, pretrain_epochs, workers, seed, pretrain_steps, mil_epochs, bootstrap
    )
    check_run_config(cfg, where="demo")
    result = run_pipeline(cfg, progress=progress)
    result.outputs = {"synthetic slides": out / "slides", "manifest": manifest, **result.outputs}
    if report:
        from wsi_pipe.report import build_report

        try:
            rep = build_report(result.run_dir, n_boot=bootstrap)
            result.outputs["report"] = rep.html
        except Exception as e:  # the report is a by-product: the run's results stand without it
            log.error("the demo report could not be written: %s: %s", type(e).__name__, e)
    return result
