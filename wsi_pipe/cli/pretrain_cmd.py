"""`wsi-pipe pretrain` (MAMIM self-supervised) and `wsi-pipe finetune` (supervised)."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_pipe.cli.common import console, run_guarded


def register(app: typer.Typer) -> None:
    @app.command("pretrain")
    def pretrain_cmd(
        run_dir: Path = typer.Argument(..., help="run folder written by `wsi-pipe tile`"),
        arch: str | None = typer.Option(None, "--arch", help="encoder, e.g. ssmamba_s (default)"),
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
        scan_backend: str | None = typer.Option(None, "--scan-backend", help="auto | torch | cuda"),
        checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="steps"),
        seed: int | None = typer.Option(None, "--seed"),
        resume: bool = typer.Option(False, "--resume", help="continue from OUT.state.pt"),
    ) -> None:
        """MAMIM-pretrain an SSMamba (or MedMamba / ViT) encoder on the run's tiles -> ssmamba.pt."""
        from wsi_pipe.core.config import PretrainConfig, load_config
        from wsi_pipe.core.layout import RunLayout
        from wsi_pipe.stages.pretrain import pretrain

        cfg = run_guarded(
            load_config, PretrainConfig, config, arch=arch, epochs=epochs,
            steps_per_epoch=steps_per_epoch, batch_size=batch_size, mask_ratio=mask_ratio,
            input_px=input_px, lr=lr, max_tiles=max_tiles, mpps=tuple(mpp) if mpp else None,
            workers=workers, device=device, scan_backend=scan_backend,
            checkpoint_every=checkpoint_every, seed=seed,
        )  # fmt: skip
        target = out or RunLayout(run_dir).models_dir / "ssmamba.pt"
        r = run_guarded(pretrain, run_dir, cfg, target, resume=resume)
        console.print(
            f"[green]pretrained[/] {cfg.arch}: {r['steps']} steps on {r['n_tiles']} tiles, "
            f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f} in {r['seconds']:.0f} s\n"
            f"encoder: {r['out_path']} (hash {r['content_hash'][:16]})\nloss curve: {r['loss_csv']}"
        )

    @app.command("finetune")
    def finetune_cmd(
        encoder: str = typer.Option(
            ..., "--encoder", "-e", help="ssmamba.pt or an architecture name"
        ),
        labels: Path = typer.Option(
            ..., "--labels", "-l", help="CSV: image,label or slide,x,y,level,size_px,label"
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
        input_px: int | None = typer.Option(None, "--input-px"),
        workers: int | None = typer.Option(None, "--workers", "-w"),
        device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
        scan_backend: str | None = typer.Option(None, "--scan-backend"),
        seed: int | None = typer.Option(None, "--seed"),
    ) -> None:
        """Fine-tune an encoder on labelled ROIs; report held-out accuracy, balanced accuracy, F1."""
        from wsi_pipe.core.config import FinetuneConfig, load_config
        from wsi_pipe.stages.finetune import finetune

        cfg = run_guarded(
            load_config, FinetuneConfig, config, epochs=epochs, batch_size=batch_size, lr=lr,
            train_backbone=train_backbone, backbone_lr=backbone_lr, val_fraction=val_fraction,
            input_px=input_px, workers=workers, device=device, scan_backend=scan_backend, seed=seed,
        )  # fmt: skip
        r = run_guarded(finetune, encoder, labels, out, cfg)
        v = r["val"]
        console.print(
            f"[green]fine-tuned[/] on {r['train']['n']} train / {v['n']} held-out regions, "
            f"classes {', '.join(r['classes'])} (best epoch {r['best_epoch']})\n"
            f"held-out accuracy {v['accuracy']:.3f}, balanced accuracy {v['balanced_accuracy']:.3f}, "
            f"macro-F1 {v['macro_f1']:.3f}\ncheckpoint: {r['out_path']}\nmetrics: {r['metrics_path']}"
        )
