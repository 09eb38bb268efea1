"""`wsi-pipe run`: every configured stage of one run, locally, from one RunConfig YAML.

    tile -> pretrain (optional) -> extract -> train-mil -> heatmap (top slides of the MIL run)

Each stage is the same function its own command calls, so a run resumes exactly like the stage
commands do: finished slides, folds and checkpoints are reused, failed slides are retried. The
whole config is validated (and the slide list and manifest read) before any work starts.

Also here: the Slurm plan of `wsi-pipe submit all` (the same stages as command lines) and the
run summary of `wsi-pipe status`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipe.core.config import RunConfig, dump_config, load_config
from wsi_pipe.core.errors import ConfigError
from wsi_pipe.core.fsutil import atomic_write_text
from wsi_pipe.core.layout import MilRunPaths, RunLayout

log = logging.getLogger(__name__)

STAGES = ("tile", "pretrain", "extract", "train-mil", "heatmap")
#: the checkpoint `wsi-pipe pretrain` writes under RunLayout.models_dir


# ----------------------------------------------------------------------------------- config
def _abs(p: str) -> str:
    return str(Path(p).expanduser().resolve())


def load_run_config(path: str | Path | None, **overrides: Any) -> RunConfig:
    """Load a RunConfig and check everything that can be checked before work starts.

    Relative paths in the file are taken from the current directory (as on the command line) and
    made absolute, so Slurm tasks and later stages see the same files. Raises ConfigError /
    EmptyInputError naming the file and the key.
    """
    cfg = load_config(RunConfig, path, **overrides)
    cfg = cfg.model_copy(
        update={
            "slides": tuple(_abs(s) for s in cfg.slides),
            "out": _abs(cfg.out),
            "manifest": _abs(cfg.manifest) if cfg.manifest else None,
        }
    )
    check_run_config(cfg, where=str(path) if path else "command line")
    return cfg


def _encoder_source(cfg: RunConfig) -> str | None:
    """The encoder extract uses: the pretrained checkpoint when pretraining is on, else the
    configured one."""
    if cfg.extract is None:
        return None
    if cfg.pretrain is not None:
        return str(RunLayout(cfg.out).encoder_checkpoint)
    return cfg.extract.encoder


def _mil_config(cfg: RunConfig) -> Any:
    """The MilConfig of the run, reading the feature set that the run's extract stage makes."""
    from wsi_pipe.stages.extract import feature_set_name

    assert cfg.mil is not None
    if cfg.mil.features is not None or cfg.extract is None:
        return cfg.mil
    ecfg = cfg.extract.model_copy(update={"encoder": _encoder_source(cfg)})
    return cfg.mil.model_copy(update={"features": feature_set_name(ecfg)})


def check_run_config(cfg: RunConfig, where: str = "config") -> None:
    """Inputs exist, the manifest is valid (with labels when MIL is on), stages are consistent."""
    from wsi_pipe.core.manifest import discover, read_manifest

    discover(list(cfg.slides))  # missing inputs, no slides, duplicate ids
    if cfg.mil is not None and cfg.extract is None:
        raise ConfigError(f"{where}: `mil` needs an `extract` section (MIL trains on features)")
    if cfg.mil is not None:
        if cfg.manifest is None:
            raise ConfigError(
                f"{where}: `mil` needs `manifest:` a CSV with slide_id, patient_id, label"
            )
        read_manifest(cfg.manifest, require_labels=True)
    elif cfg.manifest is not None:
        read_manifest(cfg.manifest)
    if cfg.extract is not None and cfg.pretrain is None:
        enc = Path(cfg.extract.encoder)
        if (enc.suffix or "/" in cfg.extract.encoder) and not enc.exists():
            raise ConfigError(f"{where}: extract.encoder {enc} does not exist (and no `pretrain`)")


# --------------------------------------------------------------------------------- local run
@dataclass
class StageReport:
    """Outcome of one stage of a pipeline run."""

    name: str
    status: str  # done | failed | skipped (not configured)
    seconds: float = 0.0
    details: str = ""
    summary: Any = None  # the stage's own result (RunSummary, TrainMilResult, ...)

    @property
    def ok(self) -> bool:
        return self.status != "failed"


@dataclass
class PipelineResult:
    """Every stage's report and where the results are."""

    run_dir: Path
    stages: list[StageReport] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stages)


def _slides_report(name: str, summary: Any, t0: float) -> StageReport:
    n_ok = summary.count("done") + summary.count("skipped")
    details = (
        f"{summary.count('done')} done, {summary.count('skipped')} already done, "
        f"{summary.n_failed} failed, {summary.count('busy')} busy elsewhere"
    )
    if summary.n_failed:
        bad = [f"{r.slide_id}: {r.error}" for r in summary.results if r.status == "failed"]
        details += "; " + "; ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
    status = "failed" if summary.n_failed or (n_ok == 0 and summary.results) else "done"
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
    result.outputs["run folder"] = layout.root
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
        result.outputs["tiles"] = layout.tiles_root
        result.outputs["QC images"] = layout.qc_dir
        blocked = rep.status == "failed" and summary.count("done") + summary.count("skipped") == 0

    # ---- pretrain
    if cfg.pretrain is None:
        skip("pretrain", "not configured")
    elif "pretrain" in want and not blocked:
        t0 = time.perf_counter()
        ckpt, details = _run_pretrain(layout, cfg, overwrite, progress)
        result.stages.append(StageReport("pretrain", "done", time.perf_counter() - t0, details))
        result.outputs["encoder"] = ckpt

    # ---- extract
    feature_set = None
    if cfg.extract is None:
        skip("extract", "not configured")
    elif "extract" in want and not blocked:
        from wsi_pipe.stages.extract import feature_set_name, run_extract

        t0 = time.perf_counter()
        ecfg = cfg.extract.model_copy(update={"encoder": _encoder_source(cfg)})
        summary = run_extract(layout.root, ecfg, overwrite=overwrite, progress=progress)
        feature_set = feature_set_name(ecfg)
        rep = _slides_report("extract", summary, t0)
        result.stages.append(rep)
        result.outputs["features"] = layout.feature_set_dir(feature_set)
        blocked = summary.count("done") + summary.count("skipped") == 0

    # ---- train-mil and heatmaps
    if cfg.mil is None:
        skip("train-mil", "not configured")
    elif "train-mil" in want and not blocked:
        from wsi_pipe.stages.train_mil import train_mil

        t0 = time.perf_counter()
        mcfg = _mil_config(cfg)
        assert cfg.manifest is not None  # checked by check_run_config
        res = train_mil(layout.root, cfg.manifest, mcfg, overwrite=overwrite)
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
        result.outputs["MIL model"] = res.out_dir
        result.outputs["MIL metrics"] = MilRunPaths(res.out_dir).metrics
        result.outputs["MIL predictions"] = MilRunPaths(res.out_dir).predictions
        if "heatmap" in want and heatmap_slides > 0:
            t0 = time.perf_counter()
            rep, hdir = _run_heatmaps(layout, res.out_dir, heatmap_slides)
            rep.seconds = time.perf_counter() - t0
            result.stages.append(rep)
            if hdir is not None:
                result.outputs["heatmaps"] = hdir
    return result


def pretrained_is_current(path: Path, cfg: Any) -> bool:
    """True when `path` is an encoder pretrained with this PretrainConfig (same hash)."""
    if not path.exists():
        return False
    try:
        from wsi_pipe.encoders import read_provenance

        return read_provenance(path).get("config_hash") == cfg.config_hash()
    except Exception:  # unreadable: pretrain again
        return False


def _run_pretrain(
    layout: RunLayout, cfg: RunConfig, overwrite: bool, progress: bool
) -> tuple[Path, str]:
    """Pretrain unless the run already holds an encoder made with this config; resumes from
    the training state a killed run left behind."""
    from wsi_pipe.stages.pretrain import pretrain

    assert cfg.pretrain is not None
    out = layout.encoder_checkpoint
    if not overwrite and pretrained_is_current(out, cfg.pretrain):
        return out, "already done"
    res = pretrain(layout.root, cfg.pretrain, out, resume=not overwrite, progress=progress)
    return out, (
        f"{res['steps']} steps on {res['n_tiles']} tiles, loss {res['first_loss']:.3f} "
        f"-> {res['last_loss']:.3f}"
    )


def _run_heatmaps(layout: RunLayout, model_dir: Path, n: int) -> tuple[StageReport, Path | None]:
    """Heatmaps of the `n` test-set slides with the highest predicted probability of the last
    class and the lowest (so both classes are shown)."""
    import csv

    from wsi_pipe.stages.heatmap import heatmap

    pred_csv = MilRunPaths(model_dir).predictions
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
            res = heatmap(layout.root, model_dir, sid)
            done.append(sid)
            out_dir = res.png.parent
        except Exception as e:  # a heatmap is a by-product: report it, keep the run's results
            log.error("heatmap of %s failed: %s: %s", sid, type(e).__name__, e)
            errors.append(f"{sid}: {type(e).__name__}: {e}")
    status = "failed" if errors else "done"
    details = f"{len(done)} slides ({', '.join(done)})" + (
        f"; failed {'; '.join(errors)}" if errors else ""
    )
    return StageReport("heatmap", status, 0.0, details), out_dir


# ------------------------------------------------------------------------------- Slurm plan
@dataclass(frozen=True)
class PlannedStage:
    """One stage of `submit all`: the wsi-pipe command line and how it runs on Slurm."""

    stage: str
    argv: tuple[str, ...]
    array: bool  # a job array over slides, or a single job
    gpu: bool  # gets --gres (tile does not)
    array_size: int | None = None


def slurm_plan(
    cfg: RunConfig,
    array_size: int | None = None,
    cpus_per_task: int | None = None,
    max_array: int = 100,
) -> list[PlannedStage]:
    """The stages of `cfg` as Slurm jobs: tile and extract as arrays, the rest single jobs.

    Writes each stage's config to `RunLayout.slurm_stage_config(stage)` (the jobs read it).
    Extract's torch threads default to the CPUs each task gets (`cpus_per_task`, else 1), not to
    the node's cores, which several tasks share. Heatmaps are not part of the chain (run
    `wsi-pipe heatmap` for chosen slides).
    """
    from wsi_pipe.core.manifest import discover

    layout = RunLayout(cfg.out)
    layout.slurm_dir.mkdir(parents=True, exist_ok=True)
    n_slides = len(discover(list(cfg.slides)))
    n = max(1, min(array_size or min(n_slides, max_array), n_slides))

    def save(stage: str, model: Any) -> str:
        p = layout.slurm_stage_config(stage)
        atomic_write_text(p, dump_config(model))
        return str(p)

    root = str(layout.root)
    plan = [
        PlannedStage(
            "tile",
            ("tile", *cfg.slides, "--out", root, "--config", save("tile", cfg.tile)),
            True,
            False,
            n,
        )
    ]
    if cfg.pretrain is not None:
        # --resume: a requeued or resubmitted job continues from the last training state
        plan.append(
            PlannedStage(
                "pretrain",
                ("pretrain", root, "--config", save("pretrain", cfg.pretrain), "--resume"),
                False,
                True,
            )
        )
    if cfg.extract is not None:
        ecfg = cfg.extract.model_copy(
            update={
                "encoder": _encoder_source(cfg),
                "threads": cfg.extract.threads or cpus_per_task or 1,
            }
        )
        plan.append(
            PlannedStage(
                "extract", ("extract", root, "--config", save("extract", ecfg)), True, True, n
            )
        )
    if cfg.mil is not None:
        mcfg = _mil_config(cfg)
        assert cfg.manifest is not None
        plan.append(
            PlannedStage(
                "train-mil",
                (
                    "train-mil",
                    root,
                    "--manifest",
                    cfg.manifest,
                    "--config",
                    save("train-mil", mcfg),
                ),
                False,
                True,
            )
        )
    return plan


# ----------------------------------------------------------------------------------- status
@dataclass
class RunStatus:
    """Per stage: slide ids grouped done / failed / running / pending; failures with reasons."""

    stages: dict[str, dict[str, list[str]]]
    failures: dict[str, list[tuple[str, str]]]
    artifacts: dict[str, Path]

    @property
    def n_failed(self) -> int:
        return sum(len(g["failed"]) for g in self.stages.values())


def _stage_names(layout: RunLayout) -> list[str]:
    """Per-slide stages of the run: folders holding state or lock files (e.g. extract/<set>)."""
    names: set[str] = set()
    for top in (layout.state_root, layout.locks_root):
        if top.is_dir():
            for f in top.rglob("*"):
                if f.is_file() and (f.suffix in (".json", ".lock")) and not f.name.startswith("."):
                    names.add(f.parent.relative_to(top).as_posix())
    order = {s: i for i, s in enumerate(STAGES)}
    return sorted(names, key=lambda s: (order.get(s.split("/")[0], 99), s))


def collect_status(run_dir: str | Path) -> RunStatus:
    """Summarise a run folder from its slide table, state JSON files and lock files."""
    from wsi_pipe.core.manifest import load_slide_table
    from wsi_pipe.runner import read_state, stage_status

    layout = RunLayout(run_dir)
    all_ids: list[str] | None = None
    if layout.slides_table.exists():
        all_ids = [e.slide_id for e in load_slide_table(layout.slides_table)]
    stages: dict[str, dict[str, list[str]]] = {}
    failures: dict[str, list[tuple[str, str]]] = {}
    for stage in _stage_names(layout):
        ids = set(all_ids or [])
        for d, suffix in ((layout.state_dir(stage), ".json"), (layout.lock_dir(stage), ".lock")):
            if d.is_dir():
                ids |= {
                    p.name[: -len(suffix)]
                    for p in d.glob(f"*{suffix}")
                    if not p.name.startswith(".")
                }
        groups = stage_status(layout, stage, sorted(ids))
        stages[stage] = groups
        failures[stage] = [
            (sid, str(read_state(layout, stage, sid).get("error"))) for sid in groups["failed"]
        ]
    artifacts: dict[str, Path] = {}
    ckpt = layout.encoder_checkpoint
    if ckpt.exists():
        artifacts["encoder"] = ckpt
    for mil_run in layout.mil_runs():
        artifacts[f"MIL {mil_run.name}"] = mil_run.metrics
    hm_root = layout.heatmaps_root
    if hm_root.is_dir():
        for d in sorted(hm_root.iterdir()):
            artifacts[f"heatmaps {d.name}"] = d
    return RunStatus(stages, failures, artifacts)


def slurm_job_summary(run_dir: str | Path) -> list[str]:
    """One line per Slurm job submitted for this run, with live task states when Slurm answers."""
    from collections import Counter

    from wsi_pipe.runner import slurm as sl

    layout = RunLayout(run_dir)
    jobs = sl.submitted_jobs(layout)
    lines = []
    for j in jobs:
        size = f"array of {j.array_size}" if j.array_size else "single job"
        try:
            states = sl.job_states(j.job_id)
            counts = Counter(t.state for t in states)
            live = (
                ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()))
                or "no longer known to Slurm"
            )
        except sl.SlurmError:
            live = "Slurm not reachable"
        lines.append(f"slurm job {j.job_id} {j.stage} ({size}): {live}")
    return lines
