"""The per-slide runner (runner/loop.py) and FileLock (core/fsutil.py), with real processes.

Covers: skip-if-done, lock contention between two processes, stale-lock recovery, the state JSON,
a failing slide recorded while the batch goes on, sharding (also from the Slurm array env).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from wsi_pipe.core.fsutil import FileLock, LockInfo, atomic_write_text
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.runner import (
    BUSY,
    DONE,
    FAILED,
    PENDING,
    RUNNING,
    SKIPPED,
    read_state,
    run_slides,
    shard_from_env,
    shard_items,
    stage_status,
)

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Item:
    slide_id: str


def _out(layout: RunLayout, sid: str) -> Path:
    return layout.root / "out" / f"{sid}.txt"


def _is_done(item: Item, layout: RunLayout) -> bool:
    return _out(layout, item.slide_id).exists()


def _process(
    item: Item, layout: RunLayout, fail: frozenset[str] = frozenset(), sleep_s: float = 0.0
) -> dict:
    # one line per call in an O_APPEND log: counts how often each slide really ran
    with open(layout.root / "calls.log", "a") as fh:
        fh.write(f"{item.slide_id} {os.getpid()}\n")
    if sleep_s:
        time.sleep(sleep_s)
    if item.slide_id in fail:
        raise OSError(f"cannot read slide {item.slide_id}: truncated file")
    atomic_write_text(_out(layout, item.slide_id), f"result of {item.slide_id}\n")
    return {"n": len(item.slide_id)}


def _calls(layout: RunLayout) -> list[str]:
    p = layout.root / "calls.log"
    return [ln.split()[0] for ln in p.read_text().splitlines()] if p.exists() else []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


ITEMS = [Item(f"s{i:02d}") for i in (3, 0, 5, 1, 4, 2)]


def test_shard_items_partition_sorted() -> None:
    shards = [shard_items(ITEMS, (i, 4)) for i in range(4)]
    flat = [it.slide_id for s in shards for it in s]
    assert sorted(flat) == sorted(it.slide_id for it in ITEMS)
    assert len(flat) == len(set(flat))
    assert [it.slide_id for it in shards[0]] == ["s00", "s04"]  # sorted, round robin
    assert [it.slide_id for it in shard_items(ITEMS, None)] == sorted(it.slide_id for it in ITEMS)
    assert shard_items(ITEMS[:2], (3, 4)) == []  # more tasks than slides: an empty shard
    with pytest.raises(ValueError):
        shard_items(ITEMS, (4, 4))


def test_shard_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(k, raising=False)
    assert shard_from_env() is None
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert shard_from_env() == (2, 3)
    # an array submitted as --array=5-7 numbers its tasks 5, 6, 7
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    assert shard_from_env() == (1, 3)


def test_skip_if_done_and_state_json(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    proc = partial(_process, layout=layout)
    done = partial(_is_done, layout=layout)
    s1 = run_slides("toy", ITEMS, proc, layout, is_done=done, progress=False)
    assert s1.ok and s1.count(DONE) == len(ITEMS)
    assert sorted(_calls(layout)) == sorted(it.slide_id for it in ITEMS)

    st = read_state(layout, "toy", "s03")
    assert st["status"] == DONE and st["attempts"] == 1 and st["error"] is None
    assert st["host"] == socket.gethostname() and st["pid"] == os.getpid()
    assert st["seconds"] >= 0 and st["finished"] >= st["started"] and st["info"] == {"n": 3}
    # the state file is complete JSON under its final name, and no lock is left behind
    json.loads(layout.state_file("toy", "s03").read_text())
    assert not any(layout.lock_file("toy", it.slide_id).exists() for it in ITEMS)

    # resume: nothing reruns
    s2 = run_slides("toy", ITEMS, proc, layout, is_done=done, progress=False)
    assert s2.count(SKIPPED) == len(ITEMS) and len(_calls(layout)) == len(ITEMS)
    # only a vanished output is redone, and its attempt count grows
    _out(layout, "s01").unlink()
    s3 = run_slides("toy", ITEMS, proc, layout, is_done=done, progress=False)
    assert [r.slide_id for r in s3.results if r.status == DONE] == ["s01"]
    assert read_state(layout, "toy", "s01")["attempts"] == 2
    # --overwrite redoes everything
    s4 = run_slides("toy", ITEMS, proc, layout, is_done=done, overwrite=True, progress=False)
    assert s4.count(DONE) == len(ITEMS)


def test_failing_slide_recorded_batch_continues(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    proc = partial(_process, layout=layout, fail=frozenset({"s02"}))
    done = partial(_is_done, layout=layout)
    summary = run_slides("toy", ITEMS, proc, layout, is_done=done, progress=False)
    assert not summary.ok and summary.n_failed == 1 and summary.count(DONE) == len(ITEMS) - 1
    bad = next(r for r in summary.results if r.slide_id == "s02")
    assert bad.status == FAILED and "truncated file" in (bad.error or "")
    st = read_state(layout, "toy", "s02")
    assert st["status"] == FAILED and st["attempts"] == 1
    assert st["error"].startswith("OSError: cannot read slide s02")
    assert "Traceback" in st["traceback"]
    assert not _out(layout, "s02").exists()

    groups = stage_status(
        layout, "toy", [it.slide_id for it in ITEMS], is_done=lambda sid: _out(layout, sid).exists()
    )
    assert groups[FAILED] == ["s02"] and len(groups[DONE]) == len(ITEMS) - 1
    assert groups[RUNNING] == [] and groups[PENDING] == []

    # the rerun retries only the failed slide; once fixed it is done with attempts == 2
    fixed = partial(_process, layout=layout)
    again = run_slides("toy", ITEMS, fixed, layout, is_done=done, progress=False)
    assert [r.slide_id for r in again.results if r.status == DONE] == ["s02"]
    assert read_state(layout, "toy", "s02")["attempts"] == 2
    assert read_state(layout, "toy", "s02")["status"] == DONE


def test_status_of_a_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`collect_status` and `wsi-pipe status` read the state files the runner wrote."""
    from typer.testing import CliRunner

    from wsi_pipe.cli.app import app
    from wsi_pipe.runner.status import collect_status

    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    proc = partial(_process, layout=layout, fail=frozenset({"s02"}))
    run_slides("toy", ITEMS, proc, layout, is_done=partial(_is_done, layout=layout), progress=False)

    st = collect_status(layout.root)
    assert [g.stage for g in st.stages] == ["toy"] and st.n_failed == 1
    toy = st.stages[0]
    assert toy.failed == ("s02",) and len(toy.done) == len(ITEMS) - 1 and toy.n_slides == len(ITEMS)
    assert toy.failures[0].slide_id == "s02"
    assert toy.failures[0].error.startswith("OSError: cannot read slide s02")

    # the command: exit 1 while a slide is failed; RUN_DIR found upwards like other commands
    layout.marker.touch()
    monkeypatch.chdir(layout.root)
    res = CliRunner().invoke(app, ["-q", "status"])
    assert res.exit_code == 1, res.output
    assert "failed toy s02: OSError: cannot read slide s02" in " ".join(res.output.split())


def test_workers_processes_share_lock_code(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    proc = partial(_process, layout=layout, fail=frozenset({"s04"}))
    summary = run_slides(
        "toy",
        ITEMS,
        proc,
        layout,
        is_done=partial(_is_done, layout=layout),
        workers=2,
        progress=False,
    )
    assert summary.count(DONE) == 5 and summary.n_failed == 1
    pids = {read_state(layout, "toy", it.slide_id)["pid"] for it in ITEMS}
    assert os.getpid() not in pids  # really ran in worker processes
    assert sorted(_calls(layout)) == sorted(it.slide_id for it in ITEMS)


# ------------------------------------------------------------------------------------ locks
def test_lock_exclusive_and_released(tmp_path: Path) -> None:
    a, b = FileLock(tmp_path / "x.lock"), FileLock(tmp_path / "x.lock")
    assert a.acquire()
    info = a.read()
    assert info is not None and info.pid == os.getpid() and info.host == socket.gethostname()
    assert not b.acquire()  # same host, live pid: not stale
    with pytest.raises(BlockingIOError):
        with b:
            pass
    a.release()
    assert not (tmp_path / "x.lock").exists()
    with b:
        assert (tmp_path / "x.lock").exists()
    assert not (tmp_path / "x.lock").exists()


def test_stale_lock_dead_pid_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "s.lock"
    path.write_text(json.dumps(LockInfo(socket.gethostname(), _dead_pid(), time.time()).__dict__))
    lock = FileLock(path)
    assert lock.is_stale(lock.read())
    assert lock.acquire()
    assert lock.read() is not None and lock.read().pid == os.getpid()  # type: ignore[union-attr]
    assert not list(tmp_path.glob("*.stale-*"))  # the broken lock's tombstone is removed
    lock.release()


def test_stale_lock_other_host_by_age(tmp_path: Path) -> None:
    path = tmp_path / "s.lock"
    # a live-looking holder on another node: only its age can tell it is dead
    path.write_text(json.dumps(LockInfo("node-elsewhere", 1, time.time()).__dict__))
    assert not FileLock(path, stale_after_s=3600).acquire()
    old = time.time() - 7200
    os.utime(path, (old, old))
    lock = FileLock(path, stale_after_s=3600)
    assert lock.acquire()
    lock.release()
    # refresh() keeps a long-running holder young
    holder = FileLock(path, stale_after_s=3600)
    assert holder.acquire()
    os.utime(path, (old, old))
    holder.refresh()
    assert not FileLock(path, stale_after_s=3600).acquire()
    holder.release()


def test_unreadable_lock_young_kept_old_broken(tmp_path: Path) -> None:
    path = tmp_path / "u.lock"
    path.write_text("")  # a writer died between O_EXCL create and writing its info
    assert not FileLock(path).acquire()  # might be mid-write: wait
    old = time.time() - 120
    os.utime(path, (old, old))
    lock = FileLock(path)
    assert lock.acquire()
    lock.release()


def test_runner_breaks_stale_slide_lock(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    lf = layout.lock_file("toy", "s00")
    lf.parent.mkdir(parents=True)
    lf.write_text(json.dumps(LockInfo(socket.gethostname(), _dead_pid(), time.time()).__dict__))
    # a dead local holder: status does not call the slide running
    assert stage_status(layout, "toy", ["s00"])[PENDING] == ["s00"]
    summary = run_slides(
        "toy",
        [Item("s00")],
        partial(_process, layout=layout),
        layout,
        is_done=partial(_is_done, layout=layout),
        progress=False,
    )
    assert summary.count(DONE) == 1 and not lf.exists()


_HOLDER = textwrap.dedent("""
    import sys, time
    from wsi_pipe.core.fsutil import FileLock
    lock = FileLock(sys.argv[1])
    assert lock.acquire()
    print("held", flush=True)
    time.sleep(60)
""")


def test_lock_held_by_other_process(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    lf = layout.lock_file("toy", "s00")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lf)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        summary = run_slides(
            "toy",
            [Item("s00"), Item("s01")],
            partial(_process, layout=layout),
            layout,
            is_done=partial(_is_done, layout=layout),
            progress=False,
        )
        busy = next(r for r in summary.results if r.slide_id == "s00")
        assert busy.status == BUSY and str(holder.pid) in (busy.error or "")
        assert _calls(layout) == ["s01"]
        assert stage_status(layout, "toy", ["s00", "s01"])[RUNNING] == ["s00"]
    finally:
        holder.kill()
        holder.wait()
    # the holder died (SIGKILL, lock left behind): the next run takes over
    assert lf.exists()
    summary = run_slides(
        "toy",
        [Item("s00")],
        partial(_process, layout=layout),
        layout,
        is_done=partial(_is_done, layout=layout),
        progress=False,
    )
    assert summary.count(DONE) == 1


_CONTENDER = textwrap.dedent("""
    import json, sys
    from dataclasses import dataclass
    from functools import partial
    sys.path.insert(0, sys.argv[2])
    import test_runner as t
    from wsi_pipe.core.layout import RunLayout
    from wsi_pipe.runner import run_slides
    layout = RunLayout(sys.argv[1])
    items = [t.Item(f"s{i:02d}") for i in range(8)]
    s = run_slides("toy", items, partial(t._process, layout=layout, sleep_s=0.15), layout,
                   is_done=partial(t._is_done, layout=layout), progress=False)
    print(json.dumps({r.slide_id: r.status for r in s.results}))
""")


def test_two_processes_same_run_no_double_work(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, str(tmp_path), str(Path(__file__).parent)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    outs = []
    for p in procs:
        stdout, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    calls = _calls(layout)
    assert sorted(calls) == [f"s{i:02d}" for i in range(8)]  # every slide ran exactly once
    for i in range(8):
        sid = f"s{i:02d}"
        statuses = sorted(o[sid] for o in outs)
        assert statuses in ([BUSY, DONE], [DONE, SKIPPED]), (sid, statuses)
        assert read_state(layout, "toy", sid)["attempts"] == 1
        assert _out(layout, sid).read_text() == f"result of {sid}\n"
    assert not list((tmp_path / "out").glob(".*"))  # no temp file left


def test_state_write_error_does_not_stop_the_batch(tmp_path: Path) -> None:
    """A full disk under state/ (a filled tmpfs): the bookkeeping fails, the slides still run."""
    layout = RunLayout(tmp_path)
    sdir = layout.state_dir("toy")
    sdir.mkdir(parents=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(sdir)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): needs root")
    try:
        try:
            with open(sdir / "ballast", "wb", buffering=0) as fh:
                while True:
                    fh.write(b"\0" * 4096)
        except OSError:
            pass
        proc = partial(_process, layout=layout, fail=frozenset({"s01"}))
        summary = run_slides(
            "toy", ITEMS, proc, layout, is_done=partial(_is_done, layout=layout), progress=False
        )
        assert summary.count(DONE) == len(ITEMS) - 1 and summary.n_failed == 1
        assert "truncated file" in (
            next(r for r in summary.results if r.slide_id == "s01").error or ""
        )
        assert read_state(layout, "toy", "s00") == {}  # nothing could be recorded
        assert not list(sdir.glob(".*"))  # no temp state file left behind
    finally:
        subprocess.run(["umount", "-l", str(sdir)], check=False)
