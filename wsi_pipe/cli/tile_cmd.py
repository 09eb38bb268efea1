"""`wsi-pipe tile`."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_pipe.cli.common import console, fail, parse_shard, print_summary, run_guarded


def preset_names() -> list[str]:
    """Names of the tile presets shipped inside the package (wsi_pipe/presets/*.yaml)."""
    from importlib.resources import files

    return sorted(
        p.name[: -len(".yaml")]
        for p in files("wsi_pipe.presets").iterdir()
        if p.name.endswith(".yaml")
    )


def preset_path(name: str) -> Path:
    """Path of a shipped preset; exits with the known names when `name` is not one."""
    from importlib.resources import as_file, files

    if name not in preset_names():
        fail(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    # presets ship as plain files in the package (wheel or editable), so as_file yields the real path
    with as_file(files("wsi_pipe.presets") / f"{name}.yaml") as p:
        return Path(p)


def register(app: typer.Typer) -> None:
    @app.command("tile")
    def tile(
        slides: list[str] = typer.Argument(
            ..., help="slide files, folders (recursive) or a manifest CSV"
        ),
        out: Path = typer.Option(
            Path("."), "--out", "-o", help="run folder (default: the current folder)"
        ),
        config: Path | None = typer.Option(None, "--config", "-c", help="TileConfig YAML"),
        preset: str | None = typer.Option(
            None, help="named tile preset shipped with wsi-pipe (biopsy, resection)"
        ),
        mpp: list[float] | None = typer.Option(
            None, "--mpp", help="target um/px; repeat for several grids"
        ),
        tile_px: int | None = typer.Option(
            None, "--tile-px", help="tile side in px at the target mpp"
        ),
        overlap_px: int | None = typer.Option(None, "--overlap-px"),
        min_tissue: float | None = typer.Option(
            None, "--min-tissue", help="tissue fraction a tile needs"
        ),
        store: str | None = typer.Option(None, "--store", help="h5 | zarr"),
        backend: str | None = typer.Option(None, "--backend", help="auto | openslide | tiffslide"),
        mpp_override: float | None = typer.Option(
            None, "--mpp-override", help="level-0 um/px for every slide"
        ),
        workers: int = typer.Option(
            1, "--workers", "-w", help="slides processed in parallel processes"
        ),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="redo slides that are already done"
        ),
        shard: str | None = typer.Option(
            None, "--shard", help="I/N: process shard I of N (Slurm sets it)"
        ),
    ) -> None:
        """Segment tissue and tile slides at one or more true mpps into coordinate stores."""
        from wsi_pipe.core.config import TileConfig, load_config
        from wsi_pipe.stages.tile import run_tile

        if config is not None and preset is not None:
            fail("give --config or --preset, not both")
        if preset is not None:
            config = preset_path(preset)
        cfg = run_guarded(
            load_config,
            TileConfig,
            config,
            target_mpps=tuple(mpp) if mpp else None,
            tile_px=tile_px,
            overlap_px=overlap_px,
            min_tissue_fraction=min_tissue,
            store=store,
            backend=backend,
            mpp_override=mpp_override,
        )
        summary = run_guarded(
            run_tile,
            slides,
            out,
            cfg,
            workers=workers,
            overwrite=overwrite,
            shard=parse_shard(shard),
        )
        print_summary(summary, {"tiles": "tiles", "mpp": "level0_mpp", "reader": "backend"})
        console.print(f"run folder: {out}")
        if not summary.ok:
            raise typer.Exit(1)
