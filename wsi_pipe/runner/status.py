"""`wsi-pipe status`: where a run stands, read from its folder alone (no server, no database).

1. The per-slide stages of the run are the folders that hold state or lock files
   (`RunLayout.state_root` / `locks_root`, e.g. `tile`, `extract/<feature set>`), in pipeline
   order.
2. Per stage, the slides are the run's slide table plus any slide with a state or lock file;
   `runner.stage_status` sorts them into done / failed / running / pending (a lock whose holder
   died does not count as running), and each failure keeps the error its state file records.
3. Artefacts that are not per slide are listed when they exist: the pretrained encoder, the
   finished MIL runs (their metrics.json), the heatmap folders.
4. `slurm_jobs` lists the Slurm jobs submitted for the run (`RunLayout.slurm_job_record`) with
   the live state counts of their tasks, or `None` when Slurm does not answer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from wsi_pipe.core.layout import RunLayout
from wsi_pipe.runner.loop import DONE, FAILED, PENDING, RUNNING, read_state, stage_status
from wsi_pipe.runner.run_config import STAGES


@dataclass(frozen=True)
class SlideFailure:
    """A slide that failed in a stage, with the error its state file records."""

    slide_id: str
    error: str


@dataclass(frozen=True)
class StageProgress:
    """One per-slide stage of a run: slide ids grouped by status, and the failures' reasons."""

    stage: str  # e.g. "tile", "extract/ssmamba"
    done: tuple[str, ...]
    failed: tuple[str, ...]
    running: tuple[str, ...]
    pending: tuple[str, ...]
    failures: tuple[SlideFailure, ...]

    @property
    def n_slides(self) -> int:
        return len(self.done) + len(self.failed) + len(self.running) + len(self.pending)


@dataclass(frozen=True)
class RunStatus:
    """Every per-slide stage of a run, and its other artefacts (label, path) that exist."""

    run_dir: Path
    stages: tuple[StageProgress, ...]
    artifacts: tuple[tuple[str, Path], ...]

    @property
    def n_failed(self) -> int:
        return sum(len(s.failed) for s in self.stages)


@dataclass(frozen=True)
class SlurmJobProgress:
    """One Slurm job submitted for the run and the states of its tasks right now."""

    job_id: str
    stage: str
    array_size: int | None  # None: a single job
    #: Slurm state -> number of tasks in it ({} once Slurm forgot the job); None: Slurm unreachable
    task_states: dict[str, int] | None


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

    layout = RunLayout(run_dir)
    all_ids: list[str] = []
    if layout.slides_table.exists():
        all_ids = [e.slide_id for e in load_slide_table(layout.slides_table)]
    stages = []
    for stage in _stage_names(layout):
        ids = set(all_ids)
        for d, suffix in ((layout.state_dir(stage), ".json"), (layout.lock_dir(stage), ".lock")):
            if d.is_dir():
                ids |= {
                    p.name[: -len(suffix)]
                    for p in d.glob(f"*{suffix}")
                    if not p.name.startswith(".")
                }
        groups = stage_status(layout, stage, sorted(ids))
        failures = tuple(
            SlideFailure(sid, str(read_state(layout, stage, sid).get("error")))
            for sid in groups[FAILED]
        )
        stages.append(
            StageProgress(
                stage,
                tuple(groups[DONE]),
                tuple(groups[FAILED]),
                tuple(groups[RUNNING]),
                tuple(groups[PENDING]),
                failures,
            )
        )
    artifacts: list[tuple[str, Path]] = []
    if layout.encoder_checkpoint.exists():
        artifacts.append(("encoder", layout.encoder_checkpoint))
    for mil_run in layout.mil_runs():
        artifacts.append((f"MIL {mil_run.name}", mil_run.metrics))
    if layout.heatmaps_root.is_dir():
        for d in sorted(layout.heatmaps_root.iterdir()):
            artifacts.append((f"heatmaps {d.name}", d))
    return RunStatus(layout.root, tuple(stages), tuple(artifacts))


def slurm_jobs(run_dir: str | Path) -> list[SlurmJobProgress]:
    """The Slurm jobs submitted for this run, oldest first, with live task states (step 4)."""
    from wsi_pipe.runner import slurm as sl

    out = []
    for j in sl.submitted_jobs(RunLayout(run_dir)):
        try:
            counts: dict[str, int] | None = dict(Counter(t.state for t in sl.job_states(j.job_id)))
        except sl.SlurmError:
            counts = None
        out.append(SlurmJobProgress(j.job_id, j.stage, j.array_size, counts))
    return out
