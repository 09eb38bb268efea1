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
        annotations: Path | None = typer.Option(
            None,
            "--annotations",
            help="folder of QuPath GeoJSON per slide (<slide_id>.geojson or .json, level-0 px)",
        ),
        annotation_mode: str | None = typer.Option(
            None,
            "--annotation-mode",
            help="label (store each tile's class) | restrict (also keep only annotated tiles) "
            "| tissue (the polygons replace the tissue mask)",
        ),
        annotation_classes: str | None = typer.Option(
            None,
            "--annotation-classes",
            help="comma list of the region/label classes (case-insensitive; default all)",
        ),
        exclude_classes: str | None = typer.Option(
            None,
            "--exclude-classes",
            help="comma list of classes whose regions are dropped (fnmatch, case-insensitive; "
            "default 'ignore*,artefact,artifact'; '' = none)",
        ),
        min_annotation: float | None = typer.Option(
            None, "--min-annotation", help="box share a class/region must cover (0.5)"
        ),
        max_excluded: float | None = typer.Option(
            None, "--max-excluded", help="drop tiles the excluded classes cover more (0)"
        ),
    ) -> None:
        """Segment tissue and tile slides at one or more true mpps into coordinate stores."""
        from wsi_pipe.core.config import TileConfig, load_config
        from wsi_pipe.stages.tile import run_tile

        if config is not None and preset is not None:
            fail("give --config or --preset, not both")
        if preset is not None:
            config = preset_path(preset)

        def classes(text: str | None) -> tuple[str, ...] | None:
            if text is None:
                return None
            return tuple(c.strip() for c in text.split(",") if c.strip())

        if annotations is None and any(
            v is not None
            for v in (annotation_mode, annotation_classes, exclude_classes, min_annotation)
        ):
            fail("--annotation-mode, --annotation-classes, --exclude-classes and "
                 "--min-annotation need --annotations DIR")  # fmt: skip
        if annotations is not None and not annotations.is_dir():
            fail(f"--annotations {annotations} is not a folder of <slide_id>.geojson files")
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
            annotations_dir=str(annotations.resolve()) if annotations is not None else None,
            annotation_mode=annotation_mode,
            annotation_classes=classes(annotation_classes),
            annotation_exclude=classes(exclude_classes),
            annotation_min_fraction=min_annotation,
            annotation_max_excluded=max_excluded,
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
        cols = {"tiles": "tiles", "mpp": "level0_mpp", "reader": "backend"}
        if cfg.annotations_dir is not None:
            cols["annotations"] = "annotation_summary"
        print_summary(summary, cols)
        console.print(f"run folder: {out}")
        if not summary.ok:
            raise typer.Exit(1)
