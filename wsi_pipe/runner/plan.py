"""Slurm plans: which jobs `wsi-pipe submit` queues, with which command lines and array sizes.

A plan is a list of `PlannedStage`s (a stage's `wsi-pipe` command line and how it runs: a job
array over slides or a single job, with or without the GPU resources) in a `SlurmPlan` that also
names the run folder (where scripts, logs and job records go). The CLI turns a plan into
`slurm.JobSpec`s and renders or submits them (runner/slurm.py).

1. `slurm_plan(cfg)` (`submit all`): the stages of one RunConfig, each `afterok` the one before:
   tile and extract as arrays of one task per slide (at most `max_array`, never more tasks than
   slides), pretrain and train-mil as single jobs. Each stage's config is written to
   `RunLayout.slurm_stage_config(stage)`, which its job reads. Heatmaps are not part of the chain.
2. `stage_plan(stage, args, run_dir)` (`submit STAGE ...`): one stage command line, unchanged,
   as an array (tile, extract) or a single job (the rest); without `--array-size` one task per
   slide of the run's slide table (at most 100), or 10 when the run has no slide table yet.
3. `task_threads`: the one place that decides the torch threads of an extract task: the
   configured count, else the CPUs the task gets (`--cpus`), else 1; never the node's cores,
   which the tasks sharing a node would oversubscribe many times over.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_pipe.core.config import RunConfig, dump_config
from wsi_pipe.core.fsutil import atomic_write_text
from wsi_pipe.core.layout import RunLayout

#: stages that run as job arrays over the run's slides (the others are single jobs)
ARRAY_STAGES = frozenset({"tile", "extract"})
#: at most this many array tasks unless --array-size says otherwise
MAX_ARRAY_TASKS = 100
#: array tasks of a stage submitted before its run has a slide table (no slide count yet)
UNKNOWN_SLIDES_ARRAY_TASKS = 10
#: stage commands whose `--config` is checked when the job is planned, and the model it holds
STAGE_CONFIG_MODELS = {
    "tile": "TileConfig",
    "extract": "ExtractConfig",
    "pretrain": "PretrainConfig",
    "train-mil": "MilConfig",
    "finetune": "FinetuneConfig",
}


@dataclass(frozen=True)
class PlannedStage:
    """One Slurm job of a plan: the wsi-pipe command line and how it runs on Slurm."""

    stage: str
    argv: tuple[str, ...]
    array: bool  # a job array over slides, or a single job
    gpu: bool  # gets --gres (tile of `submit all` does not)
    array_size: int | None = None


@dataclass(frozen=True)
class SlurmPlan:
    """The jobs to queue, in dependency order, and the run folder they belong to."""

    run: RunLayout
    stages: tuple[PlannedStage, ...]
    #: slides in the run's table when the plan was made; None when unknown (no table yet)
    n_slides: int | None

    @property
    def array_size_guessed(self) -> bool:
        """True when an array's default size is not a slide count (no slide table, or an empty
        one): tell the user to set --array-size."""
        return not self.n_slides and any(p.array for p in self.stages)


def task_threads(configured: int | None, cpus_per_task: int | None) -> int:
    """Torch threads of one Slurm task: `configured` when set, else the CPUs the task gets
    (`--cpus`), else 1 (see module doc, step 3)."""
    return configured or cpus_per_task or 1


def run_slide_count(layout: RunLayout) -> int | None:
    """Slides in the run's slide table; None when it does not exist or cannot be read."""
    from wsi_pipe.core.manifest import load_slide_table

    if not layout.slides_table.exists():
        return None
    try:
        return len(load_slide_table(layout.slides_table))
    except Exception:  # an unreadable table: the stage itself reports it
        return None


def load_stage_config(stage: str, path: str | Path) -> Any:
    """The config file of a stage command (`--config`), validated now rather than on the
    cluster; None for a stage without a config model. Raises ConfigError naming the file."""
    from wsi_pipe.core import config as cfgmod

    model = STAGE_CONFIG_MODELS.get(stage)
    if model is None:
        return None
    return cfgmod.load_config(getattr(cfgmod, model), path)


def stage_plan(
    stage: str,
    args: tuple[str, ...],
    run_dir: str | Path,
    *,
    configured_threads: int | None = None,
    cpus_per_task: int | None = None,
    array_size: int | None = None,
) -> SlurmPlan:
    """One stage command line `stage *args` as a Slurm job (module doc, step 2).

    `configured_threads`: the extract threads the command line or its config file sets (None:
    not set, so `--threads task_threads(None, cpus_per_task)` is added to the command line).
    """
    layout = RunLayout(run_dir)
    n_slides = run_slide_count(layout)
    argv = (stage, *args)
    if stage == "extract" and configured_threads is None:
        # torch threads = the CPUs of one task, not the node's cores (tasks share a node)
        argv += ("--threads", str(task_threads(None, cpus_per_task)))
    array = stage in ARRAY_STAGES
    n = array_size
    if n is None:
        n = min(n_slides, MAX_ARRAY_TASKS) if n_slides else UNKNOWN_SLIDES_ARRAY_TASKS
    job = PlannedStage(stage, argv, array, True, max(1, n) if array else None)
    return SlurmPlan(layout, (job,), n_slides)


def slurm_plan(
    cfg: RunConfig,
    array_size: int | None = None,
    cpus_per_task: int | None = None,
    max_array: int = MAX_ARRAY_TASKS,
    run_dir: str | Path | None = None,
) -> SlurmPlan:
    """The stages of a RunConfig as a chain of Slurm jobs (module doc, step 1).

    `run_dir`: where the scripts and logs go (default: the config's `out`, the run itself).
    Writes each stage's config to `RunLayout.slurm_stage_config(stage)` of the run.
    """
    from wsi_pipe.core.manifest import discover
    from wsi_pipe.runner.run_config import encoder_source, mil_config

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
                "encoder": encoder_source(cfg),
                "threads": task_threads(cfg.extract.threads, cpus_per_task),
            }
        )
        plan.append(
            PlannedStage(
                "extract", ("extract", root, "--config", save("extract", ecfg)), True, True, n
            )
        )
    if cfg.mil is not None:
        assert cfg.manifest is not None  # checked by check_run_config
        plan.append(
            PlannedStage(
                "train-mil",
                (
                    "train-mil",
                    root,
                    "--manifest",
                    cfg.manifest,
                    "--config",
                    save("train-mil", mil_config(cfg)),
                ),
                False,
                True,
            )
        )
    return SlurmPlan(RunLayout(run_dir or layout.root), tuple(plan), n_slides)
