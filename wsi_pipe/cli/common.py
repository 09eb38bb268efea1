"""Helpers shared by CLI commands: error reporting, summary tables, shard parsing."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from wsi_pipe.core.errors import WsiPipeError
from wsi_pipe.runner import RunSummary

console = Console(stderr=False)
err_console = Console(stderr=True)


def fail(msg: str, code: int = 2) -> NoReturn:
    """Print an error (no traceback) and exit with `code`."""
    err_console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/n' -> (i, n); None -> Slurm array env or None."""
    from wsi_pipe.runner import shard_from_env

    if text is None:
        return shard_from_env()
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        fail(f"--shard takes I/N (e.g. 0/4), got {text!r}")
    if not (n >= 1 and 0 <= i < n):
        fail(f"--shard {text}: need 0 <= I < N")
    return i, n


def print_summary(summary: RunSummary, extra_cols: dict[str, str] | None = None) -> None:
    """Table of per-slide outcomes plus totals. `extra_cols` maps column title -> info key."""
    extra_cols = extra_cols or {}
    t = Table(title=f"wsi-pipe {summary.stage}", show_lines=False)
    t.add_column("slide")
    t.add_column("status")
    for title in extra_cols:
        t.add_column(title, justify="right")
    t.add_column("seconds", justify="right")
    colour = {"done": "green", "skipped": "cyan", "failed": "red", "busy": "yellow"}
    for r in summary.results:
        vals = []
        for key in extra_cols.values():
            v = r.info.get(key, "")
            if isinstance(v, dict):
                vals.append(", ".join(f"{k}:{x}" for k, x in v.items()))
            else:
                vals.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        t.add_row(
            r.slide_id,
            f"[{colour.get(r.status, 'white')}]{r.status}[/]",
            *vals,
            f"{r.seconds:.2f}" if r.seconds else "",
        )
    console.print(t)
    for r in summary.results:
        if r.status == "failed":
            console.print(f"[red]{r.slide_id}[/]: {r.error}", soft_wrap=True)
    console.print(
        f"{summary.count('done')} done, {summary.count('skipped')} skipped (already done), "
        f"{summary.count('failed')} failed, {summary.count('busy')} busy elsewhere "
        f"in {summary.seconds:.1f} s"
    )


def run_guarded(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Call `fn`; turn a WsiPipeError into a clean one-line error and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except WsiPipeError as e:
        fail(str(e))


def resolve_run_dir(run_dir: Path | None) -> Path:
    """RUN_DIR as given, or the run folder holding the current directory (found upwards)."""
    from wsi_pipe.core.layout import find_run_dir

    if run_dir is not None:
        return run_dir
    found: Path = run_guarded(find_run_dir)
    return found
