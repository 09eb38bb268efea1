"""The `wsi-pipe` command. Each stage module registers its own commands (imports stay lazy)."""

from __future__ import annotations

import importlib
import logging

import typer

app = typer.Typer(
    name="wsi-pipe",
    help="Whole-slide image pipeline: tile -> pretrain/finetune -> extract -> train-mil, locally or on Slurm.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: modules under wsi_pipe.cli that define `register(app)`; a missing one is skipped
_COMMAND_MODULES = (
    "tile_cmd",
    "pretrain_cmd",
    "extract_cmd",
    "mil_cmd",
    "cluster_cmd",
    "run_cmd",
    "demo_cmd",
    "anomaly_cmd",
    "report_cmd",
    "list_cmd",
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="warnings and errors only"),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    from rich.logging import RichHandler

    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("PIL", "tifffile", "numcodecs", "zarr", "asyncio", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


for _name in _COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"wsi_pipe.cli.{_name}")
    except ModuleNotFoundError as _e:  # a stage not built into this install
        if _e.name != f"wsi_pipe.cli.{_name}":
            raise
        continue
    _mod.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
