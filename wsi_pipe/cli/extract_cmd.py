"""`wsi-pipe extract`."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_pipe.cli.common import (
    console,
    fail,
    parse_shard,
    print_summary,
    resolve_run_dir,
    run_guarded,
)


def resolve_encoder_arg(encoder: str, run_dir: Path) -> str:
    """`--encoder` as typed: a file that exists as given, else the run's models/<file> when that
    exists (so `wsi-pipe extract --encoder ssmamba.pt` inside a run finds models/ssmamba.pt),
    else unchanged (an architecture name, or a missing file the stage reports)."""
    from wsi_pipe.core.layout import RunLayout

    if Path(encoder).exists():
        return encoder
    in_models = RunLayout(run_dir).models_dir / encoder
    return str(in_models) if in_models.is_file() else encoder


def run_dir_or_here(run_dir: Path | None) -> Path:
    """RUN_DIR as given; else the run holding the current folder; else the current folder itself
    (a CLAM/TRIDENT user has no wsi-pipe run: the folder the command is started in becomes one)."""
    from wsi_pipe.core.errors import ConfigError
    from wsi_pipe.core.layout import find_run_dir

    if run_dir is not None:
        return run_dir
    try:
        return find_run_dir()
    except ConfigError:
        return Path.cwd()


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract(
        run_dir: Path | None = typer.Argument(
            None,
            help="run folder written by `wsi-pipe tile` (default: the run holding the current folder)",
        ),
        encoder: str | None = typer.Option(
            None,
            "--encoder",
            "-e",
            help="ssmamba.pt / medmamba checkpoint, or a registered architecture (with --weights)",
        ),
        weights: Path | None = typer.Option(
            None, "--weights", help="local weights file of an architecture"
        ),
        name: str | None = typer.Option(
            None, "--name", help="feature set name (default: checkpoint stem / arch)"
        ),
        config: Path | None = typer.Option(None, "--config", "-c", help="ExtractConfig YAML"),
        mpp: list[float] | None = typer.Option(
            None, "--mpp", help="grid(s) of the run; repeat; default all"
        ),
        device: str | None = typer.Option(None, "--device", help="cuda | cpu | auto"),
        batch_size: int | None = typer.Option(None, "--batch-size", "-b"),
        workers: int | None = typer.Option(
            None, "--workers", "-w", help="DataLoader workers reading tiles"
        ),
        threads: int | None = typer.Option(
            None, "--threads", help="torch threads of the main process"
        ),
        precision: str | None = typer.Option(None, "--precision", help="bf16 | fp16 | fp32"),
        feature_dtype: str | None = typer.Option(
            None, "--feature-dtype", help="float32 | float16 on disk"
        ),
        store: str | None = typer.Option(None, "--store", help="h5 | zarr"),
        clam_export: bool | None = typer.Option(
            None, "--clam-export/--no-clam-export", help="also write CLAM's h5_files/ and pt_files/"
        ),
        coords: Path | None = typer.Option(
            None,
            "--coords",
            help="import a CLAM patches/ or TRIDENT <mag>x_<px>px_<ov>px_overlap/ coords folder "
            "(with --slides) instead of tiling; see docs/interop.md",
        ),
        slides: list[str] | None = typer.Option(
            None, "--slides", help="with --coords: the slides folder(s), files or manifest CSV"
        ),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="redo slides that are already done"
        ),
        shard: str | None = typer.Option(
            None, "--shard", help="I/N: process shard I of N (Slurm sets it)"
        ),
    ) -> None:
        """Encode the tiles of every slide of a run into feature stores (same rows as coords)."""
        from wsi_pipe.core.config import ExtractConfig, load_config
        from wsi_pipe.stages.extract import run_extract

        if encoder is None and config is None:
            fail("give --encoder (a checkpoint such as models/ssmamba.pt, or an architecture name)")
        coords_import = None
        if coords is not None or slides:
            from wsi_pipe.stages.extract import CoordsImport

            if coords is None or not slides:
                fail("--coords FOLDER and --slides SLIDES go together (see docs/interop.md)")
            if mpp and len(mpp) > 1:
                fail("with --coords, --mpp names the one imported grid: give it once")
            coords_import = CoordsImport(
                str(coords), tuple(slides), grid_mpp=mpp[0] if mpp else None
            )
            mpp = None
            run_dir = run_dir_or_here(run_dir)
        else:
            run_dir = resolve_run_dir(run_dir)
        if encoder is not None:
            encoder = resolve_encoder_arg(encoder, run_dir)
        cfg = run_guarded(
            load_config,
            ExtractConfig,
            config,
            encoder=encoder,
            weights=str(weights) if weights is not None else None,
            name=name,
            mpps=tuple(mpp) if mpp else None,
            device=device,
            batch_size=batch_size,
            workers=workers,
            threads=threads,
            precision=precision,
            feature_dtype=feature_dtype,
            store=store,
            clam_export=clam_export,
        )
        summary = run_guarded(
            run_extract,
            run_dir,
            cfg,
            overwrite=overwrite,
            shard=parse_shard(shard),
            coords_import=coords_import,
        )
        print_summary(
            summary, {"tiles": "tiles", "tiles/s": "tiles_per_s", "data wait": "data_wait"}
        )
        console.print(f"features: {run_dir / 'features'}")
        if not summary.ok:
            raise typer.Exit(1)
