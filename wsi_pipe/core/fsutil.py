"""The only writer of final files: atomic writes and per-item lock files.

A final path either does not exist or holds a complete artifact: everything is written to a
temporary sibling (same directory, so `os.replace` is a rename on one file system), flushed,
fsynced, and then renamed over the final name. Lock files make many processes, on one host or
on many Slurm nodes sharing a file system, safe on one output folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"


def tmp_sibling(final: Path) -> Path:
    """A unique temporary path beside `final` (hidden, marked, never a final name)."""
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_path(path: Path) -> None:
    if path.is_dir():
        for sub in sorted(path.rglob("*")):
            if sub.is_file():
                with open(sub, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(path)
    else:
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree; missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def commit(tmp: Path, final: Path) -> None:
    """fsync `tmp` (file or directory) and rename it to `final`, replacing what was there."""
    _fsync_path(tmp)
    if tmp.is_dir() and final.exists():
        # os.replace cannot replace a non-empty directory: move the old one aside first
        trash = tmp_sibling(final)
        os.replace(final, trash)
        os.replace(tmp, final)
        remove_path(trash)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes `final`, on error it is removed.

    Works for files and directories (e.g. a zarr store): the caller creates whatever it wants
    at the yielded path.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {final}")
        commit(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise


def atomic_write_bytes(final: str | Path, data: bytes) -> None:
    """Write `data` to `final` atomically."""
    with atomic_path(final) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()


def atomic_write_text(final: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `final` atomically."""
    atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_json(final: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `final` atomically."""
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """Read JSON written by `atomic_write_json`."""
    return json.loads(Path(path).read_text())


def remove_tmp_siblings(final: str | Path) -> int:
    """Remove temp siblings of `final` left by a killed writer. Call only while holding the
    lock of the item that owns `final` (then no live writer can be using them). Returns count."""
    final = Path(final)
    if not final.parent.exists():
        return 0
    n = 0
    for p in final.parent.glob(f".{final.name}{TMP_MARK}*"):
        remove_path(p)
        n += 1
    return n


def clean_stale_tmp(folder: Path, older_than_s: float = 3600.0) -> int:
    """Remove temp siblings left by killed writers (older than `older_than_s`). Returns count."""
    n = 0
    if not folder.exists():
        return 0
    now = time.time()
    for p in folder.iterdir():
        if p.name.startswith(".") and TMP_MARK in p.name:
            with contextlib.suppress(FileNotFoundError):
                if now - p.stat().st_mtime > older_than_s:
                    remove_path(p)
                    n += 1
    return n


# --------------------------------------------------------------------------------- locking
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock: host, pid, start time (unix s) and optional Slurm job id."""

    host: str
    pid: int
    time: float
    job: str | None = None

    @classmethod
    def mine(cls) -> LockInfo:
        job = os.environ.get("SLURM_JOB_ID")
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        if job and task:
            job = f"{job}_{task}"
        return cls(socket.gethostname(), os.getpid(), time.time(), job)


class FileLock:
    """An exclusive lock file created with O_EXCL (works across hosts on a shared file system).

    A lock is stale when its holder is a dead process on this host, or when it is older than
    `stale_after_s` (a holder on another node that died; `refresh()` keeps a long job's lock
    young). A stale lock is broken by renaming it away, which only one contender can win.
    """

    def __init__(self, path: str | Path, stale_after_s: float = 6 * 3600.0) -> None:
        self.path = Path(path)
        self.stale_after_s = stale_after_s
        self.held = False

    def read(self) -> LockInfo | None:
        """The current holder, or None if unlocked (or the lock file is unreadable/partial)."""
        try:
            d = json.loads(self.path.read_text())
            return LockInfo(d["host"], int(d["pid"]), float(d["time"]), d.get("job"))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def is_stale(self, info: LockInfo | None) -> bool:
        if info is None:
            # unreadable: a writer died between create and write, or it is being written now
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return False
            return age > 60.0
        if info.host == socket.gethostname() and not _pid_alive(info.pid):
            return True
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        return age > self.stale_after_s

    def acquire(self) -> bool:
        """Try once to take the lock (breaking a stale one). True if now held by us."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.read()
                if not self.is_stale(info):
                    return False
                tomb = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
                try:
                    os.rename(self.path, tomb)
                except FileNotFoundError:
                    continue  # someone else broke it first; race for the fresh lock
                log.warning("broke stale lock %s held by %s", self.path, info)
                remove_path(tomb)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(LockInfo.mine().__dict__, fh)
                fh.flush()
                os.fsync(fh.fileno())
            self.held = True
            return True
        return False

    def refresh(self) -> None:
        """Touch the lock so other nodes do not judge a long-running holder stale."""
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def release(self) -> None:
        if self.held:
            info = self.read()
            if info is None or (info.pid == os.getpid() and info.host == socket.gethostname()):
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self.held = False

    def __enter__(self) -> FileLock:
        if not self.acquire():
            raise BlockingIOError(errno.EWOULDBLOCK, f"lock {self.path} is held by {self.read()}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def file_hash(path: str | Path, n_hex: int = 16) -> str:
    """sha256 (first `n_hex` hex digits) of a file's bytes, read in 4 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:n_hex]
