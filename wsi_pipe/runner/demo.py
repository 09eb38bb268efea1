"""`wsi-pipe demo`: the whole pipeline on a synthetic cohort, on the CPU, with no downloads.

1. A seeded two-class cohort of pyramidal TIFF slides (`synth.build_cohort`: mpp 0.5, 3 levels,
   "normal" tissue with one real histology texture, "tumour" slides with one or two regions of
   another) in `OUT/slides`, with its labelled manifest.
2. tile (1 um/px, 64 px) -> pretrain (a tiny SSMamba, MAMIM, a few steps) -> extract ->
   train-mil (ABMIL, 2-fold patient-level CV) -> attention heatmaps, via `run_pipeline` into
   `OUT/run` (`demo_config` is the RunConfig, small enough for a laptop CPU in minutes).
3. The run report (`wsi-pipe report`): `RunLayout.report_html` of `OUT/run`. A report that cannot
   be written is logged and left out of the result; the run's results stand.

A second run resumes: slides that exist are kept, finished stages are skipped.

The demo is not a stage (no per-slide function, nothing of its own on disk): it is a whole run
on a cohort it builds first, so it lives next to `run_pipeline`, not in stages/.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from wsi_pipe.core.config import ExtractConfig, MilConfig, PretrainConfig, RunConfig, TileConfig
from wsi_pipe.core.errors import ConfigError
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.runner.pipeline import PipelineResult, StageReport, run_pipeline
from wsi_pipe.runner.run_config import check_run_config

log = logging.getLogger(__name__)

#: fewest slides the demo takes: two per class, so each of the 2 folds tests both classes
MIN_SLIDES = 4


@dataclass(frozen=True)
class DemoLayout:
    """The demo folder: the synthetic cohort beside the run made from it."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root).resolve())

    @property
    def slides_dir(self) -> Path:
        """The synthetic slides and their manifest (`synth.build_cohort`)."""
        return self.root / "slides"

    @property
    def run(self) -> RunLayout:
        """The run folder every stage writes into."""
        return RunLayout(self.root / "run")


@dataclass
class DemoResult:
    """The demo's pipeline run, its cohort, and its report (None when it was not written)."""

    pipeline: PipelineResult
    slides_dir: Path
    manifest: Path
    report_html: Path | None

    @property
    def ok(self) -> bool:
        return self.pipeline.ok

    @property
    def stages(self) -> list[StageReport]:
        return self.pipeline.stages

    def labelled_outputs(self) -> list[tuple[str, Path]]:
        """(label, path) of every result, cohort first and report last (for printing)."""
        report = [("report", self.report_html)] if self.report_html is not None else []
        return [
            ("synthetic slides", self.slides_dir),
            ("manifest", self.manifest),
            *self.pipeline.outputs.labelled(),
            *report,
        ]


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
    return RunConfig(
        slides=(str(manifest),),
        manifest=str(manifest),
        out=str(DemoLayout(out).run.root),
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
) -> DemoResult:
    """Build the synthetic cohort in `out/slides`, run every stage into `out/run` and write the
    run's report (`DemoResult.report_html`, `RunLayout.report_html`). See the module doc."""
    from wsi_pipe.synth import build_cohort

    if n_slides < MIN_SLIDES:
        raise ConfigError(
            f"the demo needs at least {MIN_SLIDES} slides (2 per class), got {n_slides}"
        )
    folder = DemoLayout(out)
    manifest = build_cohort(folder.slides_dir, n_slides, size_px, seed, workers)
    cfg = demo_config(
        folder.root, manifest, pretrain_epochs, workers, seed, pretrain_steps, mil_epochs, bootstrap
    )
    check_run_config(cfg, where="demo")
    result = run_pipeline(cfg, progress=progress)
    report_html = None
    if report:
        from wsi_pipe.report import build_report

        try:
            report_html = build_report(result.run_dir, n_boot=bootstrap).html
        except Exception as e:  # the report is a by-product: the run's results stand without it
            log.error("the demo report could not be written: %s: %s", type(e).__name__, e)
    return DemoResult(result, folder.slides_dir, manifest, report_html)
