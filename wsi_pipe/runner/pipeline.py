"""`wsi-pipe run`: every configured stage of one run, locally, from one RunConfig.

    tile -> pretrain (optional) -> extract -> train-mil -> heatmap (top slides of the MIL run)

1. The config is checked by `run_config.load_run_config` before this runs; the resolved config
   is recorded in `RunLayout.config("run")`.
2. Each stage is the same function its own command calls, so a run resumes exactly like the
   stage commands do: finished slides, folds and checkpoints are reused, failed slides are
   retried. Pretraining is skipped when the run's encoder was made with the same config (hash).
3. Slide failures are recorded and the run goes on with the slides that worked; a stage that
   cannot run at all (no slide tiled, no features) blocks the stages after it, which are then
   left out of the report. Heatmaps are a by-product: one that fails is reported, the run's
   results stand.
4. The result is typed: a `StageReport` per stage and `RunOutputs`, where each result lies.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wsi_pipe.core.config import PretrainConfig, RunConfig, dump_config
from wsi_pipe.core.errors import ConfigError
from wsi_pipe.core.fsutil import atomic_write_text
from wsi_pipe.core.layout import MilRunPaths, RunLayout
from wsi_pipe.runner.loop import RunSummary
from wsi_pipe.runner.run_config import STAGES, encoder_source, mil_config

log = logging.getLogger(__name__)

#: done | failed | skipped (not configured, or nothing to draw)
StageOutcome = Literal["done", "failed", "skipped"]


@dataclass
class StageReport:
    """Outcome of one stage of a pipeline run."""

    name: str
    status: StageOutcome
    seconds: float = 0.0
    details: str = ""
    summary: Any = None  # the stage's own result (RunSummary, TrainMilResult, ...)

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def _output(label: str) -> Any:
    """A RunOutputs field: a path (None until its stage ran), shown as `label`."""
    return field(default=None, metadata={"label": label})


@dataclass
class RunOutputs:
    """Where the results of a pipeline run are; None where that stage did not run."""

    run_folder: Path = field(metadata={"label": "run folder"})
    tiles: Path | None = _output("tiles")
    qc_images: Path | None = _output("QC images")
    encoder: Path | None = _output("encoder")
    features: Path | None = _output("features")
    mil_model: Path | None = _output("MIL model")
    mil_metrics: Path | None = _output("MIL metrics")
    mil_predictions: Path | None = _output("MIL predictions")
    heatmaps: Path | None = _output("heatmaps")

    def labelled(self) -> list[tuple[str, Path]]:
        """(label, path) of every output that exists, in pipeline order (for printing)."""
        return [
            (f.metadata["label"], getattr(self, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        ]


@dataclass
class PipelineResult:
    """Every stage's report and where the results are."""

    run_dir: Path
    stages: list[StageReport] = field(default_factory=list)
    outputs: RunOutputs = field(init=False)

    def __post_init__(self) -> None:
        self.outputs = RunOutputs(self.run_dir)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stages)


def _slides_report(name: str, summary: RunSummary, t0: float) -> StageReport:
    n_ok = summary.count("done") + summary.count("skipped")
    details = (
        f"{summary.count('done')} done, {summary.count('skipped')} already done, "
        f"{summary.n_failed} failed, {summary.count('busy')} busy elsewhere"
    )
    if summary.n_failed:
        bad = [f"{r.slide_id}: {r.error}" for r in summary.results if r.status == "failed"]
        details += "; " + "; ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
    status: StageOutcome = (
        "failed" if summary.n_failed or (n_ok == 0 and summary.results) else "done"
    )
    return StageReport(name, status, time.perf_counter() - t0, details, summary)


def run_pipeline(
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    only: Sequence[str] | None = None,
    progress: bool = True,
    heatmap_slides: int = 4,
) -> PipelineResult:
    """Run every configured stage of `cfg` in order (see module doc). Slide failures are
    recorded and the run goes on with the slides that worked; a stage that cannot run at all
    (no features, no labels) is reported failed and the later stages are skipped."""
    if only is not None:
        unknown = set(only) - set(STAGES)
        if unknown:
            raise ConfigError(
                f"unknown stage(s) {', '.join(sorted(unknown))}; known: {', '.join(STAGES)}"
            )
    want = set(only or STAGES)
    layout = RunLayout(cfg.out)
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.config("run"), dump_config(cfg))
    result = PipelineResult(layout.root)
    out = result.outputs
    blocked = False

    def skip(name: str, why: str) -> None:
        result.stages.append(StageReport(name, "skipped", details=why))

    # ---- tile
    if "tile" in want:
        from wsi_pipe.stages.tile import run_tile

        t0 = time.perf_counter()
        summary = run_tile(
            list(cfg.slides),
            layout.root,
            cfg.tile,
            workers=cfg.workers,
            overwrite=overwrite,
            progress=progress,
        )
        rep = _slides_report("tile", summary, t0)
        result.stages.append(rep)
        out.tiles, out.qc_images = layout.tiles_root, layout.qc_dir
        blocked = rep.status == "failed" and summary.count("done") + summary.count("skipped") == 0

    # ---- pretrain
    if cfg.pretrain is None:
        skip("pretrain", "not configured")
    elif "pretrain" in want and not blocked:
        t0 = time.perf_counter()
        ckpt, details = _run_pretrain(layout, cfg.pretrain, overwrite, progress)
        result.stages.append(StageReport("pretrain", "done", time.perf_counter() - t0, details))
        out.encoder = ckpt

    # ---- extract
    if cfg.extract is None:
        skip("extract", "not configured")
    elif "extract" in want and not blocked:
        from wsi_pipe.stages.extract import feature_set_name, run_extract

        t0 = time.perf_counter()
        ecfg = cfg.extract.model_copy(update={"encoder": encoder_source(cfg)})
        summary = run_extract(layout.root, ecfg, overwrite=overwrite, progress=progress)
        result.stages.append(_slides_report("extract", summary, t0))
        out.features = layout.feature_set_dir(feature_set_name(ecfg))
        blocked = summary.count("done") + summary.count("skipped") == 0

    # ---- train-mil and heatmaps
    if cfg.mil is None:
        skip("train-mil", "not configured")
    elif "train-mil" in want and not blocked:
        from wsi_pipe.stages.train_mil import train_mil

        t0 = time.perf_counter()
        assert cfg.manifest is not None  # checked by check_run_config
        res = train_mil(layout.root, cfg.manifest, mil_config(cfg), overwrite=overwrite)
        auroc = res.pooled.get("auroc", {}).get("value")
        bacc = res.pooled.get("balanced_accuracy", {}).get("value")
        result.stages.append(
            StageReport(
                "train-mil",
                "done",
                time.perf_counter() - t0,
                f"{res.n_slides} slides, {res.n_folds} folds, pooled AUROC {auroc:.3f}, "
                f"balanced accuracy {bacc:.3f}"
                if auroc is not None and bacc is not None
                else "",
                res,
            )
        )
        mil_run = MilRunPaths(res.out_dir)
        out.mil_model, out.mil_metrics, out.mil_predictions = (
            mil_run.root,
            mil_run.metrics,
            mil_run.predictions,
        )
        if "heatmap" in want and heatmap_slides > 0:
            t0 = time.perf_counter()
            rep, hdir = _run_heatmaps(layout, mil_run, heatmap_slides)
            rep.seconds = time.perf_counter() - t0
            result.stages.append(rep)
            if hdir is not None:
                out.heatmaps = hdir
    return result


def pretrained_is_current(path: Path, cfg: PretrainConfig) -> bool:
    """True when `path` is an encoder pretrained with this PretrainConfig (same hash)."""
    if not path.exists():
        return False
    try:
        from wsi_pipe.encoders import read_provenance

        return bool(read_provenance(path).get("config_hash") == cfg.config_hash())
    except Exception:  # unreadable: pretrain again
        return False


def _run_pretrain(
    layout: RunLayout, cfg: PretrainConfig, overwrite: bool, progress: bool
) -> tuple[Path, str]:
    """Pretrain unless the run already holds an encoder made with this config; resumes from
    the training state a killed run left behind."""
    from wsi_pipe.stages.pretrain import pretrain

    ckpt = layout.encoder_checkpoint
    if not overwrite and pretrained_is_current(ckpt, cfg):
        return ckpt, "already done"
    res = pretrain(layout.root, cfg, ckpt, resume=not overwrite, progress=progress)
    return ckpt, (
        f"{res.steps} steps on {res.n_tiles} tiles, loss {res.first_loss:.3f} "
        f"-> {res.last_loss:.3f}"
    )


def _run_heatmaps(
    layout: RunLayout, mil_run: MilRunPaths, n: int
) -> tuple[StageReport, Path | None]:
    """Heatmaps of the `n` test-set slides with the highest predicted probability of the last
    class and the lowest (so both classes are shown)."""
    from wsi_pipe.stages.heatmap import heatmap

    pred_csv = mil_run.predictions
    rows = list(csv.DictReader(pred_csv.read_text().splitlines())) if pred_csv.exists() else []
    prob_cols = [c for c in (rows[0].keys() if rows else []) if c.startswith("prob_")]
    if not rows or not prob_cols:
        return StageReport("heatmap", "skipped", details="no predictions to draw"), None
    key = prob_cols[-1]
    rows.sort(key=lambda r: (float(r[key]), r["slide_id"]))
    chosen: list[str] = []
    for r in [*rows[::-1][: (n + 1) // 2], *rows[: n // 2]]:
        if r["slide_id"] not in chosen:
            chosen.append(r["slide_id"])
    done, errors = [], []
    out_dir = None
    for sid in chosen:
        try:
            res = heatmap(layout.root, mil_run.root, sid)
            done.append(sid)
            out_dir = res.png.parent
        except Exception as e:  # a heatmap is a by-product: report it, keep the run's results
            log.error("heatmap of %s failed: %s: %s", sid, type(e).__name__, e)
            errors.append(f"{sid}: {type(e).__name__}: {e}")
    status: StageOutcome = "failed" if errors else "done"
    details = f"{len(done)} slides ({', '.join(done)})" + (
        f"; failed {'; '.join(errors)}" if errors else ""
    )
    return StageReport("heatmap", status, 0.0, details), out_dir
