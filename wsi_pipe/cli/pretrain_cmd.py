"""`wsi-pipe pretrain` (MAMIM self-supervised) and `wsi-pipe finetune` (supervised)."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_pipe.cli.common import console, fail, resolve_run_dir, run_guarded


def register(app: typer.Typer) -> None:
    @app.command("pretrain")
    def pretrain_cmd(
        run_dir: Path | None = typer.Argument(
            None,
            help="run folder written by `wsi-pipe tile` (default: the run holding the current "
            "folder), or use --images",
        ),
        images: Path | None = typer.Option(
            None, "--images", help="folder of ROI images (recursive; class sub-folders are fine)"
        ),
        arch: str | None = typer.Option(
            None,
            "--arch",
            help="encoder architecture (`wsi-pipe list encoders`; default ssmamba_s)",
        ),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="output checkpoint (default RUN_DIR/models/ssmamba.pt)"
        ),
        config: Path | None = typer.Option(None, "--config", "-c", help="PretrainConfig YAML"),
        epochs: int | None = typer.Option(None, "--epochs"),
        steps_per_epoch: int | None = typer.Option(None, "--steps-per-epoch"),
        batch_size: int | None = typer.Option(None, "--batch-size", "-b"),
        mask_ratio: float | None = typer.Option(
            None, "--mask-ratio", help="share of masked units (0.75)"
        ),
        input_px: int | None = typer.Option(None, "--input-px", help="encoder input side in px"),
        lr: float | None = typer.Option(None, "--lr"),
        max_tiles: int | None = typer.Option(
            None, "--max-tiles", help="tiles sampled over all grids"
        ),
        mpp: list[float] | None = typer.Option(
            None, "--mpp", help="grid(s) to sample; repeat; default all"
        ),
        workers: int | None = typer.Option(None, "--workers", "-w", help="DataLoader workers"),
        device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
        scan_backend: str | None = typer.Option(
            None, "--scan-backend", help="auto | torch | numba | triton | cuda | sequential"
        ),
        checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="steps"),
        seed: int | None = typer.Option(None, "--seed"),
        resume: bool = typer.Option(False, "--resume", help="continue from OUT.state.pt"),
    ) -> None:
        """MAMIM-pretrain an SSMamba (or MedMamba / ViT) encoder on a run's tiles or on a folder
        of ROI images (--images) -> ssmamba.pt."""
        from wsi_pipe.core.config import PretrainConfig, load_config
        from wsi_pipe.core.layout import RunLayout
        from wsi_pipe.stages.pretrain import pretrain, pretrain_images

        if run_dir is not None and images is not None:
            fail("give either RUN_DIR (tiles of `wsi-pipe tile`) or --images DIR, not both")
        if images is None:
            run_dir = resolve_run_dir(run_dir)  # the run holding the current folder
        if images is not None and out is None:
            fail("--images needs --out FILE.pt (there is no run folder to put it in)")

        cfg = run_guarded(
            load_config, PretrainConfig, config, arch=arch, epochs=epochs,
            steps_per_epoch=steps_per_epoch, batch_size=batch_size, mask_ratio=mask_ratio,
            input_px=input_px, lr=lr, max_tiles=max_tiles, mpps=tuple(mpp) if mpp else None,
            workers=workers, device=device, scan_backend=scan_backend,
            checkpoint_every=checkpoint_every, seed=seed,
        )  # fmt: skip
        if images is not None:
            r = run_guarded(pretrain_images, images, cfg, out, resume=resume)
        else:
            assert run_dir is not None  # resolved above when --images is not given
            target = out or RunLayout(run_dir).encoder_checkpoint
            r = run_guarded(pretrain, run_dir, cfg, target, resume=resume)
        console.print(
            f"[green]pretrained[/] {cfg.arch}: {r.steps} steps on {r.n_tiles} tiles, "
            f"loss {r.first_loss:.4f} -> {r.last_loss:.4f} in {r.seconds:.0f} s\n"
            f"encoder: {r.out_path} (hash {r.content_hash[:16]})\nloss curve: {r.loss_csv}"
        )

    @app.command("finetune")
    def finetune_cmd(
        encoder: str = typer.Option(
            ..., "--encoder", "-e", help="ssmamba.pt or an architecture name"
        ),
        labels: Path | None = typer.Option(
            None,
            "--labels",
            "-l",
            help="ImageFolder DIR (DIR/<class>/<image>) or CSV: image,label[,group] or "
            "slide,x,y,level,size_px,label[,group]",
        ),
        from_annotations: Path | None = typer.Option(
            None,
            "--from-annotations",
            help="instead of --labels: a run folder tiled with --annotations; its tiles, "
            "labelled by their annotation class, grouped by slide",
        ),
        mpp: float | None = typer.Option(
            None, "--mpp", help="--from-annotations: which grid (default the finest)"
        ),
        classes: str | None = typer.Option(
            None, "--classes", help="--from-annotations: comma list of classes (default all)"
        ),
        max_tiles_per_class: int | None = typer.Option(
            None, "--max-tiles-per-class", help="--from-annotations: tiles sampled per class"
        ),
        out: Path = typer.Option(..., "--out", "-o", help="output checkpoint, e.g. ssmamba_ft.pt"),
        config: Path | None = typer.Option(None, "--config", "-c", help="FinetuneConfig YAML"),
        epochs: int | None = typer.Option(None, "--epochs"),
        batch_size: int | None = typer.Option(None, "--batch-size", "-b"),
        lr: float | None = typer.Option(None, "--lr", help="head learning rate"),
        train_backbone: bool | None = typer.Option(
            None, "--train-backbone/--frozen-backbone", help="fine-tune the whole network"
        ),
        backbone_lr: float | None = typer.Option(None, "--backbone-lr"),
        val_fraction: float | None = typer.Option(
            None, "--val-fraction", help="held out per class"
        ),
        test_fraction: float | None = typer.Option(
            None, "--test-fraction", help="test share, never used for model selection (0.2)"
        ),
        group_regex: str | None = typer.Option(
            None,
            "--group-regex",
            help="group (e.g. source slide) from file names: splits keep it whole",
        ),
        input_px: int | None = typer.Option(None, "--input-px"),
        workers: int | None = typer.Option(None, "--workers", "-w"),
        device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
        scan_backend: str | None = typer.Option(None, "--scan-backend"),
        seed: int | None = typer.Option(None, "--seed"),
    ) -> None:
        """Fine-tune an encoder on labelled ROIs (or a run's annotated tiles); report held-out
        accuracy, balanced accuracy, F1."""
        from wsi_pipe.core.config import FinetuneConfig, load_config
        from wsi_pipe.stages.finetune import finetune, finetune_from_annotations

        if (labels is None) == (from_annotations is None):
            fail("give --labels FILE|DIR or --from-annotations RUN_DIR (one of them)")
        if from_annotations is None and (mpp, classes, max_tiles_per_class) != (None,) * 3:
            fail("--mpp, --classes and --max-tiles-per-class go with --from-annotations")

        cfg = run_guarded(
            load_config, FinetuneConfig, config, epochs=epochs, batch_size=batch_size, lr=lr,
            train_backbone=train_backbone, backbone_lr=backbone_lr, val_fraction=val_fraction,
            test_fraction=test_fraction, group_regex=group_regex, input_px=input_px,
            workers=workers, device=device, scan_backend=scan_backend, seed=seed,
            max_tiles_per_class=max_tiles_per_class,
        )  # fmt: skip
        if from_annotations is not None:
            keep = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
            run = resolve_run_dir(from_annotations)
            r = run_guarded(finetune_from_annotations, encoder, run, out, cfg, mpp, keep)
        else:
            r = run_guarded(finetune, encoder, labels, out, cfg)
        v, t, sp = r["val"], r["test"], r["split"]
        test_line = (
            f"test accuracy {t['accuracy']:.3f}, balanced accuracy {t['balanced_accuracy']:.3f}, "
            f"macro-F1 {t['macro_f1']:.3f} (n={t['n']}, never used for selection)"
            if t["n"]
            else "no test split (--test-fraction 0): the validation figures are optimistic"
        )
        console.print(
            f"[green]fine-tuned[/] on {sp['n_train']} train / {sp['n_val']} validation / "
            f"{sp['n_test']} test regions{' (grouped)' if sp['grouped'] else ''}, classes "
            f"{', '.join(r['classes'])} (best epoch {r['best_epoch']} by validation balanced "
            f"accuracy {v['balanced_accuracy']:.3f})\n{test_line}\n"
            f"checkpoint: {r['out_path']}\nmetrics: {r['metrics_path']}"
        )
