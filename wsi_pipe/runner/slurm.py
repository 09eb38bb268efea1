"""Slurm job arrays: render a readable sbatch script, submit it, chain jobs, poll them.

A stage runs on Slurm as one job array: task i of N runs the stage's ordinary command
(`python -m wsi_pipe.cli.app <stage> ...`), which derives its shard from SLURM_ARRAY_TASK_ID /
SLURM_ARRAY_TASK_COUNT (`runner.shard_from_env`) and processes shard i of the sorted slide list.
The per-slide runner makes this safe to overlap and resubmit: done slides are skipped, locks stop
two tasks from working on one slide, and every outcome lands in the run's state JSON.

The script is saved in the run folder (`RunLayout.slurm_script`) with the task logs beside it
(`RunLayout.slurm_log_pattern`), so a human can read it, edit it and `sbatch` it again.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wsi_pipe.core.errors import WsiPipeError
from wsi_pipe.core.fsutil import atomic_write_json, atomic_write_text, read_json
from wsi_pipe.core.layout import RunLayout

log = logging.getLogger(__name__)

#: exit code of a stage command when some slides failed (recorded in state/), the batch went on
EXIT_SLIDES_FAILED = 1

#: Slurm job states after which a job (or array task) will not run again
FINISHED_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
    }
)


#: the line of every rendered script that sets the task's OpenMP threads from its Slurm CPUs
OMP_THREADS_LINE = "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"


class SlurmError(WsiPipeError, RuntimeError):
    """A Slurm command failed or is not available."""


@dataclass(frozen=True)
class SlurmResources:
    """What each array task asks Slurm for. None leaves the cluster's default."""

    partition: str | None = None
    gres: str | None = None  # e.g. "gpu:1"
    cpus: int | None = None  # --cpus-per-task
    mem: str | None = None  # e.g. "16G" (per node, i.e. per task)
    time: str | None = None  # e.g. "04:00:00" or "90" (minutes)
    account: str | None = None
    qos: str | None = None
    extra: tuple[str, ...] = ()  # further sbatch options, verbatim, e.g. ("--exclusive",)


@dataclass(frozen=True)
class JobSpec:
    """One stage as a Slurm job: the wsi-pipe command line and how to spread it.

    `argv` is what follows `wsi-pipe`, e.g. ("tile", "slides/", "--out", "run"). `array_size`
    None submits a single job (e.g. MIL training), otherwise an array of that many tasks.
    """

    stage: str
    argv: tuple[str, ...]
    array_size: int | None = None
    max_parallel: int | None = None  # array throttle: at most this many tasks at once (%K)
    resources: SlurmResources = SlurmResources()
    job_name: str | None = None
    tolerate_slide_failures: bool = False  # exit 0 when only some slides failed (exit code 1)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array_size is not None and self.array_size < 1:
            raise ValueError(f"array size must be >= 1, got {self.array_size}")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise ValueError(f"max parallel tasks must be >= 1, got {self.max_parallel}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.stage):
            raise ValueError(f"stage name {self.stage!r} may hold only letters, digits, _ . -")


def python_command(argv: Sequence[str], python: str | None = None) -> list[str]:
    """The command that runs `wsi-pipe ARGV` with this interpreter (works without PATH)."""
    return [python or sys.executable, "-m", "wsi_pipe.cli.app", *argv]


def render_script(
    spec: JobSpec,
    layout: RunLayout,
    *,
    python: str | None = None,
    workdir: str | Path | None = None,
    stamp: str | None = None,
) -> str:
    """The sbatch script (bash) of `spec`: header comments, #SBATCH lines, the command.

    Log files go to `layout.slurm_dir`. `workdir` (default: the current directory) is where the
    tasks start, so relative paths in `argv` resolve as they do on the submitting shell.
    """
    res = spec.resources
    is_array = spec.array_size is not None
    workdir = Path(workdir or os.getcwd()).resolve()
    name = spec.job_name or f"wsi-{spec.stage}"
    cmd = " ".join(shlex.quote(a) for a in python_command(spec.argv, python))
    lines = ["#!/bin/bash"]
    if is_array:
        n = int(spec.array_size or 1)
        lines += [
            f"# wsi-pipe {spec.stage}: a job array of {n} task(s); task i processes shard i of {n}",
            "# of the run's slides sorted by slide id (the stage reads SLURM_ARRAY_TASK_ID/_COUNT).",
        ]
    else:
        lines.append(f"# wsi-pipe {spec.stage}: a single job.")
    lines += [
        f"# Run folder: {layout.root.resolve()}",
        f"# Written by wsi-pipe on {stamp or _now_stamp()}. Resubmitting it is safe: slides already",
        "# done are skipped, per-slide locks stop two tasks from working on one slide, and each",
        f"# slide's status, attempts, error and timings are in {layout.root.resolve() / 'state'}/.",
        "# `wsi-pipe status RUN_DIR` summarises them.",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --output={layout.slurm_log_pattern(spec.stage, is_array).resolve()}",
        f"#SBATCH --chdir={workdir}",
    ]
    if is_array:
        throttle = f"%{spec.max_parallel}" if spec.max_parallel else ""
        lines.append(f"#SBATCH --array=0-{int(spec.array_size or 1) - 1}{throttle}")
    for flag, value in (
        ("partition", res.partition),
        ("gres", res.gres),
        ("cpus-per-task", res.cpus),
        ("mem", res.mem),
        ("time", res.time),
        ("account", res.account),
        ("qos", res.qos),
    ):
        if value is not None and value != "":
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {opt}" for opt in res.extra]
    lines += [
        "",
        "set -u",
        "export PYTHONUNBUFFERED=1",
    ]
    # a task's torch / BLAS threads match the CPUs Slurm gave it (oversubscribed OpenMP threads
    # of tasks sharing a node slow each other down many times over). Set, never inherited: sbatch
    # exports the submitter's environment, whose OMP_NUM_THREADS describes the login node. A
    # value wanted on purpose goes in `JobSpec.env`, exported below (after this line).
    lines.append(OMP_THREADS_LINE)
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(spec.env.items())]
    lines += [
        'echo "[wsi-pipe] job ${SLURM_JOB_ID:-?} task ${SLURM_ARRAY_TASK_ID:-none}'
        ' on $(hostname) started $(date -Is)"',
        cmd,
        "rc=$?",
        'echo "[wsi-pipe] exit ${rc} at $(date -Is)"',
    ]
    if spec.tolerate_slide_failures:
        lines += [
            f"# exit code {EXIT_SLIDES_FAILED}: some slides failed and are recorded in state/; let "
            "dependent jobs run on the rest",
            f'if [ "$rc" -eq {EXIT_SLIDES_FAILED} ]; then exit 0; fi',
        ]
    lines.append('exit "$rc"')
    return "\n".join(lines) + "\n"


def _now_stamp() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def _file_stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def write_script(spec: JobSpec, layout: RunLayout, **render_kw: Any) -> Path:
    """Render `spec` and save it as a new script in the run's slurm folder. Returns its path."""
    layout.slurm_dir.mkdir(parents=True, exist_ok=True)
    path = layout.slurm_script(spec.stage, _file_stamp())
    atomic_write_text(path, render_script(spec, layout, **render_kw))
    path.chmod(0o755)
    return path


def _require(tool: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        raise SlurmError(
            f"`{tool}` not found: run on a Slurm login node, or start a local single-node cluster "
            "with scripts/slurm_local.sh"
        )
    return exe


def _run(cmd: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(cmd)}` did not answer in {timeout_s:.0f} s") from None


def dependency_option(after_ok: Iterable[str]) -> str | None:
    """'--dependency=afterok:1:2' for job ids, or None for none."""
    ids = [str(j) for j in after_ok if str(j)]
    return f"--dependency=afterok:{':'.join(ids)}" if ids else None


def submit_script(script: Path, after_ok: Iterable[str] = ()) -> str:
    """`sbatch --parsable [--dependency=afterok:...] SCRIPT`; returns the job id."""
    cmd = [_require("sbatch"), "--parsable"]
    dep = dependency_option(after_ok)
    if dep:
        # a job whose upstream failed is cancelled instead of pending forever
        cmd += [dep, "--kill-on-invalid-dep=yes"]
    cmd.append(str(script))
    out = _run(cmd)
    if out.returncode != 0:
        raise SlurmError(f"sbatch {script} failed (exit {out.returncode}): {out.stderr.strip()}")
    text = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    job_id = text.split(";")[0].strip()  # "123" or "123;cluster"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch {script} printed no job id: {out.stdout!r} {out.stderr!r}")
    return job_id


@dataclass(frozen=True)
class SubmittedJob:
    """A job wsi-pipe submitted (also saved as JSON at `RunLayout.slurm_job_record`)."""

    job_id: str
    stage: str
    script: str
    array_size: int | None
    after_ok: tuple[str, ...]
    argv: tuple[str, ...]
    submitted: float


def submit(
    spec: JobSpec, layout: RunLayout, after_ok: Iterable[str] = (), **render_kw: Any
) -> SubmittedJob:
    """Render, save and submit one stage; record the job in the run folder."""
    script = write_script(spec, layout, **render_kw)
    deps = tuple(str(j) for j in after_ok)
    job_id = submit_script(script, deps)
    job = SubmittedJob(
        job_id, spec.stage, str(script), spec.array_size, deps, tuple(spec.argv), time.time()
    )
    atomic_write_json(layout.slurm_job_record(job_id), asdict(job))
    log.debug(
        "submitted %s as job %s (%s)",
        spec.stage,
        job_id,
        f"array of {spec.array_size}" if spec.array_size else "single job",
    )
    return job


def submit_chain(
    specs: Sequence[JobSpec], layout: RunLayout, after_ok: Iterable[str] = (), **render_kw: Any
) -> list[SubmittedJob]:
    """Submit stages in order, each waiting (afterok) for the whole previous job or array."""
    jobs: list[SubmittedJob] = []
    prev = tuple(str(j) for j in after_ok)
    for spec in specs:
        job = submit(spec, layout, prev, **render_kw)
        jobs.append(job)
        prev = (job.job_id,)
    return jobs


def submitted_jobs(layout: RunLayout) -> list[SubmittedJob]:
    """Jobs recorded in the run folder, oldest first."""
    d = layout.slurm_job_record("0").parent
    out: list[SubmittedJob] = []
    if not d.is_dir():
        return out
    for p in d.glob("*.json"):
        try:
            rec = read_json(p)
            rec["after_ok"] = tuple(rec.get("after_ok", ()))
            rec["argv"] = tuple(rec.get("argv", ()))
            out.append(SubmittedJob(**rec))
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring unreadable job record %s", p)
    return sorted(out, key=lambda j: (j.submitted, int(j.job_id) if j.job_id.isdigit() else 0))


# ---------------------------------------------------------------------------------- polling
@dataclass(frozen=True)
class TaskState:
    """State of one job or array task as Slurm reports it."""

    job_id: str  # the array's job id (or the job's own id)
    task: int | None  # array task id; None for a single job
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, ...
    exit_code: int | None  # the task's exit status (None until it finished)
    signal: int | None = None
    reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == 0


_KV = re.compile(r"(?:^|\s)(JobId|ArrayJobId|ArrayTaskId|JobState|ExitCode|Reason)=(\S*)")


def _expand_tasks(text: str) -> list[int | None]:
    """'3' -> [3]; '0-3%2' -> [0, 1, 2, 3]; '1,4-5' -> [1, 4, 5]; '' -> [None]."""
    if not text:
        return [None]
    body = text.split("%")[0]
    out: list[int | None] = []
    for part in body.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        elif part.isdigit():
            out.append(int(part))
    return out or [None]


def parse_scontrol(text: str) -> list[TaskState]:
    """Parse `scontrol show job -o` output (one record per line) into task states."""
    states: list[TaskState] = []
    for line in text.splitlines():
        kv = {m.group(1): m.group(2) for m in _KV.finditer(line)}
        if "JobId" not in kv or "JobState" not in kv:
            continue
        job = kv.get("ArrayJobId") or kv["JobId"]
        code = sig = None
        if kv.get("ExitCode") and kv["JobState"] in FINISHED_STATES:
            c, _, s = kv["ExitCode"].partition(":")
            code, sig = int(c), int(s or 0)
        reason = kv.get("Reason") if kv.get("Reason") not in (None, "None", "(null)") else None
        for task in _expand_tasks(kv.get("ArrayTaskId", "")):
            states.append(TaskState(job, task, kv["JobState"], code, sig, reason))
    return sorted(states, key=lambda s: (s.job_id, -1 if s.task is None else s.task))


def job_states(job_id: str) -> list[TaskState]:
    """Every task of a job (or the job itself) from `scontrol show job -o` ([] once forgotten)."""
    out = _run([_require("scontrol"), "show", "job", "-o", str(job_id)])
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:
            return []
        raise SlurmError(f"scontrol show job {job_id} failed: {out.stderr.strip()}")
    return parse_scontrol(out.stdout)


def active_jobs(job_ids: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """Jobs still queued or running, by `squeue`: {job id: [(state, reason), ...]}."""
    ids = [str(j) for j in job_ids]
    if not ids:
        return {}
    out = _run([_require("squeue"), "-h", "-j", ",".join(ids), "-o", "%F|%T|%r"])
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:  # every id already forgotten by slurmctld
            return {}
        raise SlurmError(f"squeue failed: {out.stderr.strip()}")
    active: dict[str, list[tuple[str, str]]] = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            active.setdefault(parts[0], []).append((parts[1], parts[2]))
    return active


def wait_for(
    job_ids: Iterable[str], timeout_s: float = 3600.0, poll_s: float = 0.5
) -> dict[str, list[TaskState]]:
    """Poll `squeue` until every job has left the queue; return each job's task states.

    A job pending on a dependency that can never be satisfied (an upstream task failed) counts
    as finished. Raises SlurmError on timeout.
    """
    ids = [str(j) for j in job_ids]
    deadline = time.monotonic() + timeout_s
    while True:
        active = active_jobs(ids)
        waiting = {
            j: v
            for j, v in active.items()
            if not all(reason == "DependencyNeverSatisfied" for _, reason in v)
        }
        if not waiting:
            break
        if time.monotonic() > deadline:
            raise SlurmError(
                f"jobs {', '.join(sorted(waiting))} still queued after {timeout_s:.0f} s"
            )
        time.sleep(poll_s)
    return {j: job_states(j) for j in ids}
