"""`wsi-pipe tile`."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_pipe.cli.common import console, fail, parse_shard, print_summary, run_guarded

PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "presets"


def register(app: typer.Typer) -> None:
    @app.command("tile")
    def tile(
        slides: list[str] = typer.Argument(..., help="slide files, folders (recursive) or a manifest CSV"),
        out: Path = typer.Option(..., "--out", "-o", help="run folder"),
        config: Path | None = typer.Option(None, "--config", "-c", help="TileConfig YAML"),
        preset: str | None = typer.Option(None, help="named preset from configs/presets (resection, biopsy)"),
        mpp: list[float] | None = typer.Option(None, "--mpp", help="target um/px; repeat for several grids"),
        tile_px: int | None = typer.Option(None, "--tile-px", help="tile side in px at the target mpp"),
        overlap_px: int | None = typer.Option(None, "--overlap-px"),
        min_tissue: float | None = typer.Option(None, "--min-tissue", help="tissue fraction a tile needs"),
        store: str | None = typer.Option(None, "--store", help="h5 | zarr"),
        backend: str | None = typer.Option(None, "--backend", help="auto | openslide | tiffslide"),
        mpp_override: float | None = typer.Option(None, "--mpp-override", help="level-0 um/px for every slide"),
        workers: int = typer.Option(1, "--workers", "-w", help="slides processed in parallel processes"),
        overwrite: bool = typer.Option(False, "--overwrite", help="redo slides that are already done"),
        shard: str | None = typer.Option(None, "--shard", help="I/N: process shard I of N (Slurm sets it)"),
    ) -> None:
        """Segment tissue and tile slides at one or more true mpps into coordinate stores."""
        from wsi_pipe.core.config import TileConfig, load_config
        from wsi_pipe.stages.tile import run_tile

        if config is not None and preset is not None:
            fail("give --config or --preset, not both")
        if preset is not None:
            config = PRESETS_DIR / f"{preset}.yaml"
            if not config.exists():
                known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
                fail(f"unknown preset {preset!r}; known: {', '.join(known)}")
        cfg = run_guarded(
            load_config, TileConfig, config, target_mpps=tuple(mpp) if mpp else None, tile_px=tile_px,
            overlap_px=overlap_px, min_tissue_fraction=min_tissue, store=store, backend=backend,
            mpp_override=mpp_override,
        )
        summary = run_guarded(run_tile, slides, out, cfg, workers=workers, overwrite=overwrite,
                              shard=parse_shard(shard))
        print_summary(summary, {"tiles": "tiles", "mpp": "level0_mpp", "reader": "backend"})
        console.print(f"run folder: {out}")
        if not summary.ok:
            raise typer.Exit(1)
