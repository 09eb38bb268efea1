"""`wsi-pipe train-mil`, `wsi-pipe predict`, `wsi-pipe heatmap`."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_pipe.cli.common import console, resolve_run_dir, run_guarded

FEATURES_HELP = (
    "feature set of the run, or a CLAM h5_files/ | pt_files/ or TRIDENT features_<enc>/ folder "
    "(slides matched by file stem; without a run, the current folder takes the outputs)"
)


def _foreign_model(model: Path | None) -> bool:
    """True when `model` (a train-mil folder) was trained on a CLAM/TRIDENT feature folder."""
    from wsi_pipe.core.layout import MilRunPaths
    from wsi_pipe.mil.data import is_foreign_set

    info = MilRunPaths(model).model_json if model is not None else None
    if info is None or not info.is_file():
        return False
    from wsi_pipe.core.fsutil import read_json

    return is_foreign_set(str(read_json(info).get("feature_set", "")))


def _run_dir(run_dir: Path | None, features: str | None, model: Path | None = None) -> Path:
    """RUN_DIR; with a CLAM/TRIDENT feature folder (given, or the model's) and no run around,
    the current folder."""
    if (features is not None and Path(features).is_dir()) or (
        features is None and _foreign_model(model)
    ):
        from wsi_pipe.cli.extract_cmd import run_dir_or_here

        return run_dir_or_here(run_dir)
    return resolve_run_dir(run_dir)


def register(app: typer.Typer) -> None:
    @app.command("train-mil")
    def train_mil_cmd(
        run_dir: Path | None = typer.Argument(
            None,
            help="run folder with feature stores (default: the run holding the current folder)",
        ),
        manifest: Path | None = typer.Option(
            None,
            "--manifest",
            "-m",
            help="CSV with slide_id, patient_id, label (optional split); default: the labels of the "
            "manifest the run was tiled from",
        ),
        method: str | None = typer.Option(
            None, "--method", help="a MIL method (`wsi-pipe list methods`; default abmil)"
        ),
        features: str | None = typer.Option(
            None, "--features", help=FEATURES_HELP + "; default: the run's only feature set"
        ),
        mpp: float | None = typer.Option(
            None, "--mpp", help="grid in um/px (default: the only one)"
        ),
        folds: int | None = typer.Option(None, "--folds", help="patient-level CV folds"),
        epochs: int | None = typer.Option(None, "--epochs"),
        device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
        seed: int | None = typer.Option(None, "--seed"),
        config: Path | None = typer.Option(None, "--config", "-c", help="MilConfig YAML"),
        name: str | None = typer.Option(None, "--name", help="output folder under RUN_DIR/mil/"),
        overwrite: bool = typer.Option(False, "--overwrite", help="new splits, retrain every fold"),
    ) -> None:
        """Train a slide-level MIL classifier with patient-level cross-validation."""
        from rich.table import Table

        from wsi_pipe.core.config import MilConfig, load_config
        from wsi_pipe.stages.train_mil import train_mil

        cfg = run_guarded(
            load_config,
            MilConfig,
            config,
            method=method,
            features=features,
            mpp=mpp,
            n_folds=folds,
            epochs=epochs,
            device=device,
            seed=seed,
        )
        run_dir = _run_dir(run_dir, features)
        res = run_guarded(train_mil, run_dir, manifest, cfg, name=name, overwrite=overwrite)
        t = Table(
            title=f"{cfg.method}: {res.n_slides} slides, {res.n_folds} fold(s), classes {res.classes}"
        )
        for col in ("metric", "fold mean ± sd", "pooled", "95% CI"):
            t.add_column(col, justify="right" if col != "metric" else "left")
        for k, s in res.summary.items():
            p = res.pooled[k]
            t.add_row(
                k,
                f"{s['mean']:.3f} ± {s['std']:.3f}",
                f"{p['value']:.3f}",
                f"{p['ci_low']:.3f}-{p['ci_high']:.3f}",
            )
        console.print(t)
        console.print(f"outputs: {res.out_dir} ({res.seconds:.0f} s)")

    @app.command("predict")
    def predict_cmd(
        run_dir: Path | None = typer.Argument(
            None, help="run folder with the new slides' feature stores (default: the current run)"
        ),
        model: Path = typer.Option(..., "--model", help="a train-mil output folder (RUN/mil/NAME)"),
        slides: list[str] = typer.Option(
            ..., "--slides", help="slide ids (repeat) or one manifest CSV"
        ),
        out: Path | None = typer.Option(None, "--out", help="predictions CSV path"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
        features: str | None = typer.Option(
            None, "--features", help=FEATURES_HELP + "; default: the model's"
        ),
    ) -> None:
        """Apply a trained MIL model (the mean of its fold models) to slides."""
        from wsi_pipe.stages.train_mil import predict

        path = run_guarded(
            predict, _run_dir(run_dir, features, model), model, slides, out, device, features
        )
        console.print(f"predictions: {path}")

    @app.command("heatmap")
    def heatmap_cmd(
        run_dir: Path | None = typer.Argument(
            None, help="run folder holding the slide's feature store (default: the current run)"
        ),
        model: Path = typer.Option(..., "--model", help="a train-mil output folder (RUN/mil/NAME)"),
        slide: list[str] = typer.Option(..., "--slide", help="slide id (repeat for several)"),
        top_k: int = typer.Option(8, "--top-k", min=0, help="most attended tiles saved as images"),
        max_px: int = typer.Option(2048, "--max-px", min=64, help="longest side of the heatmap"),
        alpha: float = typer.Option(0.5, "--alpha", min=0.0, max=1.0, help="colour map opacity"),
        slide_path: str | None = typer.Option(
            None, "--slide-path", help="slide file (one --slide only)"
        ),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
        features: str | None = typer.Option(
            None,
            "--features",
            help=FEATURES_HELP + " with coords (not pt_files); default: the model's",
        ),
    ) -> None:
        """Draw a model's attention over slide thumbnails and export the top-k tiles."""
        from wsi_pipe.cli.common import fail
        from wsi_pipe.stages.heatmap import heatmap

        if slide_path and len(slide) > 1:
            fail("--slide-path works with a single --slide")
        run_dir = _run_dir(run_dir, features, model)
        for sid in slide:
            res = run_guarded(
                heatmap,
                run_dir,
                model,
                sid,
                top_k=top_k,
                max_px=max_px,
                alpha=alpha,
                slide_path=slide_path,
                device=device,
                features=features,
            )
            pred = max(res.probabilities, key=res.probabilities.__getitem__)
            console.print(
                f"{sid}: predicted {pred} ({res.probabilities[pred]:.3f}); heatmap {res.png}; "
                f"{len(res.top_tiles)} top tiles in {res.png.parent / (sid + '_top')}"
            )
