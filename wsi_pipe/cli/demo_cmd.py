"""`wsi-pipe demo`: a synthetic cohort through every stage (wsi_pipe/runner/demo.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_pipe.cli.common import console, err_console, run_guarded
from wsi_pipe.cli.run_cmd import print_pipeline


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="demo folder"),
        slides: int = typer.Option(
            8, "--slides", "-n", min=4, help="synthetic slides (two classes)"
        ),
        size_px: int = typer.Option(4096, "--size-px", min=1024, help="level-0 side of each slide"),
        epochs: int = typer.Option(3, "--pretrain-epochs", min=1, help="pretraining epochs"),
        workers: int = typer.Option(2, "--workers", "-w", help="slides tiled in parallel"),
        seed: int = typer.Option(0, "--seed"),
        pretrain_steps: int = typer.Option(
            10, "--pretrain-steps", min=1, help="steps per pretraining epoch"
        ),
        mil_epochs: int = typer.Option(
            40, "--mil-epochs", min=1, help="MIL training epochs per fold"
        ),
        bootstrap: int = typer.Option(
            200, "--bootstrap", min=0, help="bootstrap resamples of the CIs"
        ),
        report: bool = typer.Option(
            True, "--report/--no-report", help="write RUN/report.html at the end"
        ),
    ) -> None:
        """No downloads: a synthetic two-class cohort through every stage on the CPU in minutes.

        Ends by writing the run's HTML report and printing its path (the last line).
        """
        from wsi_pipe.runner.demo import run_demo

        result = run_guarded(
            run_demo,
            out,
            n_slides=slides,
            size_px=size_px,
            pretrain_epochs=epochs,
            workers=workers,
            seed=seed,
            pretrain_steps=pretrain_steps,
            mil_epochs=mil_epochs,
            bootstrap=bootstrap,
            report=report,
        )
        print_pipeline(result.stages, result.labelled_outputs())
        if result.report_html is not None:
            console.print(f"open the report: {result.report_html}", highlight=False)
            print(result.report_html)  # last line: the report path, for scripts
        elif report:
            err_console.print("[red]the report could not be written[/] (see the log above)")
        if not result.ok:
            raise typer.Exit(1)
