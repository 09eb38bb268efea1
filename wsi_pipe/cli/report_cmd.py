"""`wsi-pipe report`: one HTML page of whatever a run folder holds."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_pipe.cli.common import console, err_console, resolve_run_dir, run_guarded


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        run_dir: Path | None = typer.Argument(
            None, help="run folder (default: the run holding the current folder)"
        ),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="HTML file to write (default: RUN_DIR/report.html)"
        ),
        assets: bool = typer.Option(
            False,
            "--assets",
            help="write the images into a folder beside the page (report_files/) instead of "
            "embedding them (smaller HTML for big cohorts)",
        ),
        slides: list[str] | None = typer.Option(
            None,
            "--slide",
            "-s",
            help="show the attention heatmap of this slide (repeat); drawn now if missing. Default: "
            "the most and least confident predictions",
        ),
        n_heatmaps: int = typer.Option(
            4, "--heatmaps", min=0, help="heatmaps shown without --slide"
        ),
        max_thumbnails: int = typer.Option(
            60, "--max-thumbnails", min=0, help="QC thumbnails shown at most"
        ),
        bootstrap: int = typer.Option(
            200, "--bootstrap", min=0, help="resamples of the ROC / PR bands"
        ),
        title: str | None = typer.Option(None, "--title", help="page title"),
        screenshot: Path | None = typer.Option(
            None,
            "--screenshot",
            help="also save a full-page PNG of the report rendered by headless Chromium",
        ),
        screenshot_height: int = typer.Option(
            16000,
            "--screenshot-height",
            min=200,
            help="screenshot at most this tall (px, from the top)",
        ),
    ) -> None:
        """Write an HTML report of a run: cohort and QC, encoder, MIL, heatmaps, anomaly, run facts.

        \b
          wsi-pipe report runs/demo/run
          wsi-pipe report run --out /tmp/run.html --slide S1 --slide S2
        Plain HTML + CSS: open it in any browser, no server, nothing loaded from the network.
        """
        from wsi_pipe.report import build_report

        res = run_guarded(
            build_report,
            resolve_run_dir(run_dir),
            out,
            embed=not assets,
            heatmap_slides=tuple(slides or ()),
            n_heatmaps=n_heatmaps,
            max_thumbnails=max_thumbnails,
            n_boot=bootstrap,
            title=title,
        )
        console.print(
            f"sections: {', '.join(res.sections)}; {res.n_images} images, "
            f"{res.n_bytes / 1e6:.1f} MB, {res.seconds:.1f} s",
            highlight=False,
        )
        if screenshot is not None:
            from wsi_pipe.report.browser import BrowserError, inspect_page

            try:
                page = inspect_page(res.html, screenshot, max_height=screenshot_height)
                console.print(
                    f"screenshot: {screenshot} ({page.height} px tall, "
                    f"{len(page.broken_images)} broken images)",
                    highlight=False,
                )
            except BrowserError as e:
                err_console.print(f"[yellow]no screenshot:[/] {e}")
        print(res.html)  # last line: the report path, for scripts
