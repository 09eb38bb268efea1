"""`wsi-pipe anomaly fit` and `wsi-pipe anomaly score`."""

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


def register(app: typer.Typer) -> None:
    sub = typer.Typer(
        help="Unsupervised anomaly maps on slide feature grids (SP-Mamba, kNN, Mahalanobis).",
        no_args_is_help=True,
    )
    app.add_typer(sub, name="anomaly")

    @sub.command("fit")
    def fit_cmd(
        run_dir: Path | None = typer.Argument(
            None,
            help="run folder with feature stores (default: the run holding the current folder)",
        ),
        features: str | None = typer.Option(
            None, "--features", help="feature set (default: the only one)"
        ),
        normal_label: str | None = typer.Option(
            None, "--normal-label", help="label of the normal slides (default: normal)"
        ),
        all_slides: bool = typer.Option(
            False, "--all-slides", help="fit on every slide (QC, no labels)"
        ),
        manifest: Path | None = typer.Option(
            None, "--manifest", "-m", help="CSV with slide_id,label (default: the run's labels)"
        ),
        method: str | None = typer.Option(None, "--method", help="spmamba | knn | mahalanobis"),
        mpp: list[float] | None = typer.Option(
            None, "--mpp", help="grid(s) used as scales; repeat; default all"
        ),
        scan_order: str | None = typer.Option(
            None, "--scan-order", help="circular_hilbert | hilbert | row_major"
        ),
        steps: int | None = typer.Option(None, "--steps", help="SP-Mamba training steps"),
        device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
        seed: int | None = typer.Option(None, "--seed"),
        config: Path | None = typer.Option(None, "--config", "-c", help="AnomalyConfig YAML"),
        name: str | None = typer.Option(
            None, "--name", help="model folder under RUN_DIR/anomaly/ (default: method)"
        ),
        slides: list[str] | None = typer.Option(
            None, "--slides", help="only these slide ids (repeat)"
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="refit an existing model"),
    ) -> None:
        """Fit an anomaly model on the feature grids of normal slides (resumes after a crash)."""
        from wsi_pipe.anomaly.config import AnomalyConfig
        from wsi_pipe.core.config import load_config
        from wsi_pipe.stages.anomaly import fit_anomaly

        over = dict(
            features=features,
            method=method,
            mpps=tuple(mpp) if mpp else None,
            scan_order=scan_order,
            steps=steps,
            device=device,
            seed=seed,
        )
        if normal_label is not None and all_slides:
            fail("--normal-label and --all-slides exclude each other")
        if normal_label is not None:
            over["normal_label"] = normal_label
        cfg = run_guarded(load_config, AnomalyConfig, config, **over)
        if all_slides:
            cfg = cfg.model_copy(update={"normal_label": None})
        res = run_guarded(
            fit_anomaly,
            resolve_run_dir(run_dir),
            cfg,
            manifest=manifest,
            name=name,
            slides=slides or None,
            overwrite=overwrite,
            progress=True,
        )
        if res.skipped:
            console.print(f"model {res.name} is already fitted with this config: {res.model_path}")
        else:
            console.print(
                f"{res.method} model {res.name}: {res.n_slides} slides, {res.n_tiles} tiles, "
                f"{res.seconds:.1f} s -> {res.model_path}"
            )

    @sub.command("score")
    def score_cmd(
        run_dir: Path | None = typer.Argument(
            None,
            help="run folder with feature stores and a fitted model (default: the current run)",
        ),
        model: str | None = typer.Option(
            None, "--model", help="model name under RUN_DIR/anomaly/ (default: latest)"
        ),
        manifest: Path | None = typer.Option(
            None, "--manifest", "-m", help="CSV with labels for slide AUROC"
        ),
        annotations: Path | None = typer.Option(
            None, "--annotations", help="folder of QuPath <slide_id>.geojson tile labels"
        ),
        anomaly_class: list[str] | None = typer.Option(
            None,
            "--anomaly-class",
            help="annotation classes that are anomalous (repeat; default all)",
        ),
        min_overlap: float = typer.Option(
            0.5, "--min-overlap", min=0.0, max=1.0, help="tile share an annotation must cover"
        ),
        top_k: int | None = typer.Option(
            None, "--top-k", min=0, help="most anomalous tiles saved per slide"
        ),
        slides: list[str] | None = typer.Option(
            None, "--slides", help="only these slide ids (repeat)"
        ),
        device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
        overwrite: bool = typer.Option(False, "--overwrite", help="rescore slides that are done"),
        shard: str | None = typer.Option(
            None, "--shard", help="I/N: process shard I of N (Slurm sets it)"
        ),
    ) -> None:
        """Score slides: per-tile score stores, heatmaps, top-k tiles, slide_scores.csv, metrics."""
        from wsi_pipe.stages.anomaly import score_anomaly

        res = run_guarded(
            score_anomaly,
            resolve_run_dir(run_dir),
            model=model,
            slides=slides or None,
            manifest=manifest,
            annotations=annotations,
            anomaly_classes=anomaly_class or None,
            min_overlap=min_overlap,
            overwrite=overwrite,
            shard=parse_shard(shard),
            device=device,
            top_k=top_k,
        )
        print_summary(res.summary, {"tiles": "tiles", "score": "score"})
        console.print(f"slide scores: {res.slide_scores}")
        for k in ("slide_auroc", "tile_auroc", "aupro", "top5_precision"):
            v = res.metrics.get(k)
            if isinstance(v, dict) and v.get("value") is not None:
                console.print(
                    f"{k}: {v['value']:.3f} (95% CI {v['ci_low']:.3f}-{v['ci_high']:.3f}, n={v['n']})"
                )
            elif v is not None:
                console.print(f"{k}: {v:.3f}")
        if not res.summary.ok:
            raise typer.Exit(1)
