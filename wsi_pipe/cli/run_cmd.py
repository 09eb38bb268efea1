"""`wsi-pipe run`: every configured stage of a RunConfig, locally (wsi_pipe/runner/pipeline.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from wsi_pipe.cli.common import console, run_guarded

if TYPE_CHECKING:
    from wsi_pipe.runner.pipeline import StageReport


def print_pipeline(stages: Sequence[StageReport], outputs: Sequence[tuple[str, Path]]) -> None:
    """The stage table (status, seconds, details) and where the results are."""
    from rich.table import Table

    t = Table(title="wsi-pipe run")
    for col in ("stage", "status", "seconds", "details"):
        t.add_column(col, overflow="fold")
    for s in stages:
        colour = "green" if s.ok else "red"
        t.add_row(s.name, f"[{colour}]{s.status}[/]", f"{s.seconds:.1f}", s.details)
    console.print(t)
    console.print("results:")
    for name, path in outputs:
        console.print(f"  {name:<18} {path}", highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        config: Path = typer.Option(
            ..., "--config", "-c", help="RunConfig YAML (see configs/example.yaml)"
        ),
        out: Path | None = typer.Option(None, "--out", "-o", help="override the run folder"),
        workers: int | None = typer.Option(
            None, "--workers", "-w", help="slides tiled in parallel"
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="redo what is already done"),
        only: list[str] | None = typer.Option(
            None,
            "--only",
            help="run only these stages (tile, pretrain, extract, train-mil, heatmap)",
        ),
    ) -> None:
        """Run every configured stage locally: tile -> pretrain -> extract -> train-mil -> heatmap."""
        from wsi_pipe.runner.pipeline import run_pipeline
        from wsi_pipe.runner.run_config import load_run_config

        cfg = run_guarded(load_run_config, config, out=str(out) if out else None, workers=workers)
        result = run_guarded(
            run_pipeline, cfg, overwrite=overwrite, only=tuple(only) if only else None
        )
        print_pipeline(result.stages, result.outputs.labelled())
        if not result.ok:
            raise typer.Exit(1)
