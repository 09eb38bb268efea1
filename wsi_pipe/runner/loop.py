"""The generic per-slide loop every stage runs through, locally or inside a Slurm array task.

For each slide: skip if its outputs exist (resume by default), take the slide's lock (another job
may hold it), re-check, record `running` in its state JSON, run the stage, record `done` with
timings or `failed` with the error, release the lock. One bad slide never stops the batch.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

from wsi_pipe.core.fsutil import FileLock, atomic_write_json, read_json
from wsi_pipe.core.layout import RunLayout

log = logging.getLogger(__name__)

DONE, FAILED, SKIPPED, BUSY, RUNNING, PENDING = (
    "done",
    "failed",
    "skipped",
    "busy",
    "running",
    "pending",
)


class HasSlideId(Protocol):
    @property
    def slide_id(self) -> str: ...


@dataclass
class SlideResult:
    """Outcome of one slide in one stage."""

    slide_id: str
    status: str
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class RunSummary:
    """Outcomes of one `run_slides` call."""

    stage: str
    results: list[SlideResult]
    seconds: float

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def n_failed(self) -> int:
        return self.count(FAILED)

    @property
    def ok(self) -> bool:
        return self.n_failed == 0


def shard_items(items: Sequence[HasSlideId], shard: tuple[int, int] | None) -> list[HasSlideId]:
    """Items of shard i of n (sorted by slide id, round robin): every item in exactly one shard."""
    ordered = sorted(items, key=lambda it: it.slide_id)
    if shard is None:
        return ordered
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard {i} of {n} is out of range")
    return ordered[i::n]


def shard_from_env() -> tuple[int, int] | None:
    """(task id, task count) of a Slurm array task, or None outside one."""
    tid, cnt = os.environ.get("SLURM_ARRAY_TASK_ID"), os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if tid is None or cnt is None:
        return None
    lo = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    return int(tid) - lo, int(cnt)


def read_state(layout: RunLayout, stage: str, slide_id: str) -> dict[str, Any]:
    """The slide's state JSON for `stage`, or {} when there is none (or it is unreadable)."""
    try:
        return dict(read_json(layout.state_file(stage, slide_id)))
    except (FileNotFoundError, ValueError):
        return {}


def _record(layout: RunLayout, stage: str, sid: str, state: dict[str, Any]) -> None:
    """Write the slide's state JSON; a full disk or write error is logged, never fatal, so one
    slide's bookkeeping cannot stop the batch (the summary still carries the outcome)."""
    try:
        atomic_write_json(layout.state_file(stage, sid), state)
    except OSError as e:
        log.error("[%s] %s: could not record state %r: %s", stage, sid, state.get("status"), e)


def _process_one(
    stage: str,
    item: HasSlideId,
    process: Callable[[Any], dict[str, Any]],
    is_done: Callable[[Any], bool],
    layout: RunLayout,
    overwrite: bool,
    stale_lock_s: float,
) -> SlideResult:
    sid = item.slide_id
    if not overwrite and is_done(item):
        return SlideResult(sid, SKIPPED)
    lock = FileLock(layout.lock_file(stage, sid), stale_after_s=stale_lock_s)
    if not lock.acquire():
        holder = lock.read()
        return SlideResult(sid, BUSY, error=f"locked by {holder}")
    try:
        if not overwrite and is_done(item):  # finished by another job while we waited
            return SlideResult(sid, SKIPPED)
        prev = read_state(layout, stage, sid)
        state: dict[str, Any] = {
            "slide_id": sid,
            "stage": stage,
            "status": RUNNING,
            "attempts": int(prev.get("attempts", 0)) + 1,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job": os.environ.get("SLURM_JOB_ID"),
            "started": time.time(),
        }
        _record(layout, stage, sid, state)
        t0 = time.perf_counter()
        try:
            info = process(item) or {}
        except Exception as e:  # one bad slide never stops the batch
            secs = time.perf_counter() - t0
            msg = f"{type(e).__name__}: {e}"
            log.error("[%s] %s failed: %s", stage, sid, msg)
            state.update(
                status=FAILED,
                error=msg,
                seconds=secs,
                finished=time.time(),
                traceback=traceback.format_exc(limit=8),
            )
            _record(layout, stage, sid, state)
            return SlideResult(sid, FAILED, secs, error=msg)
        secs = time.perf_counter() - t0
        state.update(status=DONE, error=None, seconds=secs, finished=time.time(), info=info)
        _record(layout, stage, sid, state)
        return SlideResult(sid, DONE, secs, info)
    finally:
        lock.release()


def _mp_context() -> mp.context.BaseContext:
    # fork is fast and fine for the torch-free tile stage; torch + fork can deadlock
    return mp.get_context("spawn" if "torch" in sys.modules else "fork")


def run_slides(
    stage: str,
    items: Sequence[HasSlideId],
    process: Callable[[Any], dict[str, Any]],
    layout: RunLayout,
    *,
    is_done: Callable[[Any], bool],
    workers: int = 1,
    shard: tuple[int, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    stale_lock_s: float = 6 * 3600.0,
) -> RunSummary:
    """Run `process(item) -> info dict` over the items of this shard and record every outcome.

    `is_done(item)` says whether the item's final outputs exist (they are written atomically, so
    existence means complete). With `workers > 1` slides run in separate processes; `process` and
    `is_done` must then be picklable (module-level functions or functools.partial of them).
    """
    from tqdm.auto import tqdm

    todo = shard_items(items, shard)
    t0 = time.perf_counter()
    results: list[SlideResult] = []
    bar = tqdm(
        total=len(todo), desc=f"{stage}", unit="slide", disable=not progress, dynamic_ncols=True
    )
    args = (process, is_done, layout, overwrite, stale_lock_s)
    try:
        if workers <= 1 or len(todo) <= 1:
            for item in todo:
                bar.set_postfix_str(item.slide_id, refresh=False)
                results.append(_process_one(stage, item, *args))
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context()) as pool:
                pending: set[Future[SlideResult]] = set()
                it = iter(todo)
                for item in it:
                    pending.add(pool.submit(_process_one, stage, item, *args))
                    if len(pending) >= 2 * workers:
                        break
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        results.append(fut.result())
                        bar.update(1)
                    for item in it:
                        pending.add(pool.submit(_process_one, stage, item, *args))
                        if len(pending) >= 2 * workers:
                            break
    finally:
        bar.close()
    results.sort(key=lambda r: r.slide_id)
    summary = RunSummary(stage, results, time.perf_counter() - t0)
    log.info(
        "[%s] %d done, %d skipped, %d failed, %d busy in %.1f s",
        stage,
        summary.count(DONE),
        summary.count(SKIPPED),
        summary.count(FAILED),
        summary.count(BUSY),
        summary.seconds,
    )
    return summary


def stage_status(
    layout: RunLayout,
    stage: str,
    slide_ids: Sequence[str],
    is_done: Callable[[str], bool] | None = None,
) -> dict[str, list[str]]:
    """Slides of a stage grouped as done / failed / running / pending (from state files and locks)."""
    groups: dict[str, list[str]] = {DONE: [], FAILED: [], RUNNING: [], PENDING: []}
    for sid in sorted(slide_ids):
        st = read_state(layout, stage, sid)
        status = st.get("status")
        lock = FileLock(layout.lock_file(stage, sid))
        if is_done is not None and is_done(sid):
            groups[DONE].append(sid)
        elif lock.path.exists() and not lock.is_stale(lock.read()):
            groups[RUNNING].append(sid)
        elif status == FAILED:
            groups[FAILED].append(sid)
        elif status == DONE and is_done is None:
            groups[DONE].append(sid)
        else:
            groups[PENDING].append(sid)
    return groups
