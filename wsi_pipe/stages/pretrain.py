"""`wsi-pipe pretrain`: MAMIM self-supervised pretraining of a tile encoder on a run's tiles,
or on a folder of ROI images (`pretrain_images`, `wsi-pipe pretrain --images DIR`: SSMamba is an
ROI-level model, pretrained on the target ROI data itself).

1. Tiles are sampled (up to `max_tiles`, seeded) from the coordinate stores of every grid of the
   run (`RunLayout.tile_mpps()`, or `cfg.mpps`), i.e. across magnifications.
2. DataLoader workers read them from the slides (each worker opens its own handles, lazily):
   the region `read_size_px` at `read_level` under each stored level-0 (x, y), resized to the
   encoder input px; uint8 batches go to the device. ROI images are read the same way, each
   resized once to the input px with the same `resize_tile`.
3. On the device: dihedral flips/rotations, HED stain and brightness/contrast jitter,
   normalisation with the encoder's mean/std, a random mask of `mask_ratio` of the mask units.
4. MAMIM (`wsi_pipe.encoders.mamim`): masked tokens become a learned mask token and stay in the
   sequence; a light decoder predicts the normalised pixels; MSE on masked pixels only.
5. AdamW (no decay on norms, biases, A_log, D, mask token), linear warmup + cosine decay, AMP
   (bf16, or fp16 with loss scaling) on CUDA only, gradient clipping.
6. Every `checkpoint_every` steps the full training state is written atomically to
   `<out>.state.pt`; `resume=True` continues from it (a state of another arch/config is
   ignored with a warning). The loss curve goes to `<out stem>.loss.csv`
   and a summary with the config to `<out stem>.pretrain.json`; the encoder to `out_path`
   (`ssmamba.pt` format, see `wsi_pipe.encoders.checkpoint`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset, Sampler

from wsi_pipe.core.config import PretrainConfig
from wsi_pipe.core.errors import CheckpointError, ConfigError, EmptyInputError
from wsi_pipe.core.fsutil import atomic_path, atomic_write_json, atomic_write_text, remove_path
from wsi_pipe.core.layout import EncoderSideFiles, RunLayout
from wsi_pipe.data.tile_dataset import (
    TileDataset,
    TileSource,
    collate_tiles,
    worker_init,
)
from wsi_pipe.encoders import MAMIM, create_encoder, get_encoder_spec, save_encoder
from wsi_pipe.encoders.augment import augment_batch
from wsi_pipe.imageops.tiles import resize_tile
from wsi_pipe.store import open_store, schema
from wsi_pipe.torchutil import make_loader, preprocess, resolve_device

log = logging.getLogger(__name__)

STATE_VERSION = 2


# -------------------------------------------------------------------------------- helpers
def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on 1-D parameters (norms, biases, D), A_log and the mask token."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or getattr(p, "_no_weight_decay", False) or "A_log" in name
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup over `warmup` steps, then cosine from 1 to `min_ratio`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def amp_settings(device: torch.device) -> tuple[bool, torch.dtype | None]:
    """(use autocast, dtype): bf16 where the GPU supports it, else fp16; never on CPU."""
    if device.type != "cuda":
        return False, None
    return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------------------- tile sampling
@dataclass(frozen=True)
class SampledTiles:
    """Tiles drawn for pretraining: `sources[k]` describes one (slide, grid); `index` rows are
    (k, row in that coords store)."""

    sources: list[TileSource]
    index: np.ndarray  # (n, 2) int64
    mpps: list[float]
    n_available: int


def sample_tiles(run_dir: str | Path, cfg: PretrainConfig, out_px: int) -> SampledTiles:
    """Collect every coords store of the run's grids and draw up to `cfg.max_tiles` tiles."""
    from wsi_pipe.core.manifest import load_slide_table, resolve_slide_path

    layout = RunLayout(run_dir)
    mpps = list(cfg.mpps) if cfg.mpps else layout.tile_mpps()
    if not mpps:
        raise EmptyInputError(
            f"{layout.root} has no tile grids (tiles/mpp*/): run `wsi-pipe tile SLIDES --out {layout.root}` first"
        )
    entries = load_slide_table(layout.slides_table)
    sources: list[TileSource] = []
    counts: list[int] = []
    for mpp in mpps:
        for e in entries:
            store = layout.find_coords_store(e.slide_id, mpp)
            if store is None:
                log.warning("slide %s has no coords store at mpp %g; skipped", e.slide_id, mpp)
                continue
            with open_store(store) as s:
                coords = s.read(schema.COORDS).astype(np.int64)
                attrs = s.attrs
            if len(coords) == 0:
                continue
            path = resolve_slide_path(
                e.slide_id,
                e.path,
                attrs.get("slide_path"),
                fix=f"put it back, or fix its path in {layout.slides_table}",
                must_exist=False,  # the workers' read error names the slide and the file
            )
            grid = schema.GridAttrs.from_attrs(attrs, str(store))
            sources.append(
                TileSource.from_coords_store(grid, coords, out_px=out_px, slide_path=path)
            )
            counts.append(len(coords))
    total = int(sum(counts))
    if total == 0:
        raise EmptyInputError(
            f"{layout.root}: no tiles in the coords stores of grids {mpps}; check the tissue "
            "segmentation (QC images under qc/) or lower min_tissue_fraction, then re-tile"
        )
    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.choice(total, size=min(cfg.max_tiles, total), replace=False))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    k = np.searchsorted(offsets, pick, side="right") - 1
    index = np.stack([k, pick - offsets[k]], axis=1).astype(np.int64)
    return SampledTiles(sources, index, mpps, total)


class PretrainTiles(Dataset):
    """`ds[i] -> (tile (3, px, px) uint8, i)` over sampled (slide, grid, row) triples.

    Each worker keeps at most `max_open` slide handles (least recently used closed first).
    """

    def __init__(self, tiles: SampledTiles, max_open: int = 16) -> None:
        self.tiles = tiles
        self.max_open = max_open
        self._open: OrderedDict[int, TileDataset] = OrderedDict()

    def __len__(self) -> int:
        return len(self.tiles.index)

    def _dataset(self, k: int) -> TileDataset:
        ds = self._open.pop(k, None)
        if ds is None:
            ds = TileDataset(self.tiles.sources[k])
            while len(self._open) >= self.max_open:
                _, old = self._open.popitem(last=False)
                old.close()
        self._open[k] = ds
        return ds

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        k, row = (int(v) for v in self.tiles.index[i])
        tile = self._dataset(k).read_tile(row)
        return torch.from_numpy(tile).permute(2, 0, 1), int(i)

    def __getstate__(self) -> dict[str, Any]:
        return {"tiles": self.tiles, "max_open": self.max_open, "_open": OrderedDict()}


# ------------------------------------------------------------------------------- training
def default_mask_px(input_px: int, patch: int) -> int:
    """input_px / 8 capped at 32, rounded down to a multiple of the patch px (at least one patch)."""
    m = min(32, max(patch, input_px // 8))
    return max(patch, m - m % patch)


class PassSampler(Sampler[int]):
    """Sample order as an endless stream of seeded permutations ("passes") of the dataset.

    Pass p is `randperm(n)` from a generator seeded with (seed, p), so the order of every step
    is a pure function of the step number: a run resumed at step s reads exactly the tiles an
    uninterrupted run reads from step s on (`start_pass(p, offset)` skips what was consumed).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.pass_index, self.offset = 0, 0

    def start_pass(self, pass_index: int, offset: int) -> None:
        self.pass_index, self.offset = pass_index, offset

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.pass_index)
        return iter(torch.randperm(self.n, generator=g)[self.offset :].tolist())

    def __len__(self) -> int:
        return self.n - self.offset


def _save_state(path: Path, obj: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _write_loss_csv(path: Path, history: list[tuple[int, float, float]]) -> None:
    lines = ["step,loss,lr"] + [f"{s},{loss:.6f},{lr:.6g}" for s, loss, lr in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


@dataclass(frozen=True)
class PretrainResult:
    """What a MAMIM run wrote and measured; `<out stem>.pretrain.json` holds the same (`to_dict`)
    plus the loss curve. first_loss / last_loss: mean of up to 20 steps at each end."""

    out_path: Path
    content_hash: str
    steps: int
    epochs: int
    first_loss: float
    last_loss: float
    n_tiles: int
    seconds: float
    device: str
    loss_csv: Path
    provenance: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_path"], d["loss_csv"] = str(self.out_path), str(self.loss_csv)
        return d


def pretrain(
    run_dir: str | Path,
    cfg: PretrainConfig,
    out_path: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> PretrainResult:
    """MAMIM-pretrain `cfg.arch` on the tiles of `run_dir`; write the encoder to `out_path`.

    Returns a `PretrainResult`. Raises EmptyInputError (no tiles), ConfigError (bad arch / device),
    CheckpointError (unreadable resume state).
    """
    tiles = sample_tiles(run_dir, cfg, cfg.input_px)
    data_info = {
        "run_dir": str(Path(run_dir).resolve()),
        "mpps": tiles.mpps,
        "slides": sorted({s.slide_id for s in tiles.sources}),
        "tiles_sampled": len(tiles.index),
        "tiles_available": tiles.n_available,
    }
    return pretrain_dataset(PretrainTiles(tiles), data_info, cfg, out_path, resume, progress)


class ImageTiles(Dataset):
    """`ds[i] -> (tile (3, px, px) uint8, i)` from image files (read and resized on access) or
    from an in-memory (n, px, px, 3) uint8 array."""

    def __init__(self, images: Sequence[str] | np.ndarray, px: int) -> None:
        self.images, self.px = images, px

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if isinstance(self.images, np.ndarray):
            tile = self.images[i]
        else:
            from wsi_pipe.data.images import read_rgb

            tile = resize_tile(np.ascontiguousarray(read_rgb(self.images[i])), self.px)
        return torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1), int(i)


def pretrain_images(
    images: str | Path | Sequence[str] | np.ndarray,
    cfg: PretrainConfig,
    out_path: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> PretrainResult:
    """MAMIM-pretrain on ROI images instead of a run's tiles (`wsi-pipe pretrain --images DIR`).

    images: a folder (every image under it, recursively; class sub-folders are fine, labels are
    not used), a list of image files, or tiles already loaded as (n, px, px, 3) uint8 with
    px = cfg.input_px. Each image is resized once to `cfg.input_px` (`resize_tile`). Up to
    `cfg.max_tiles` images are drawn (seeded). Same outputs as `pretrain`.
    """
    from wsi_pipe.data.images import list_images

    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[1:] != (cfg.input_px, cfg.input_px, 3):
            raise ConfigError(
                f"in-memory tiles must be (n, {cfg.input_px}, {cfg.input_px}, 3) uint8, got "
                f"{images.shape}"
            )
        source, pool = "array", images
    else:
        if isinstance(images, (str, Path)):
            source, files = str(Path(images).resolve()), list_images(images)
        else:
            source, files = "file list", [str(f) for f in images]
        if not files:
            raise EmptyInputError("no images to pretrain on: give a folder or files of ROI images")
        pool = files  # type: ignore[assignment]
    n_available = len(pool)
    if n_available > cfg.max_tiles:
        pick = np.sort(
            np.random.default_rng(cfg.seed).choice(n_available, cfg.max_tiles, replace=False)
        )
        pool = pool[pick] if isinstance(pool, np.ndarray) else [pool[i] for i in pick]
    data_info = {"images": source, "tiles_sampled": len(pool), "tiles_available": n_available}
    return pretrain_dataset(
        ImageTiles(pool, cfg.input_px), data_info, cfg, out_path, resume, progress
    )


def pretrain_dataset(
    dataset: Dataset,
    data_info: dict[str, Any],
    cfg: PretrainConfig,
    out_path: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> PretrainResult:
    """MAMIM training loop over `dataset` (items `(tile (3, px, px) uint8, i)`, px =
    `cfg.input_px`); `data_info` goes into the checkpoint's provenance. See `pretrain`."""
    t_start = time.time()
    out_path = Path(out_path)
    paths = EncoderSideFiles.of(out_path)
    device = resolve_device(cfg.device)
    from wsi_pipe.encoders import resolve_encoder_source

    if resolve_encoder_source(cfg.arch).is_checkpoint:
        raise ConfigError(
            f"--arch {cfg.arch} is a checkpoint file: pretraining starts from an architecture "
            "name (e.g. ssmamba_s); to continue an interrupted run use --resume"
        )
    spec = get_encoder_spec(cfg.arch)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    encoder = create_encoder(cfg.arch, scan_backend=cfg.scan_backend)
    if not hasattr(encoder, "embed"):
        raise ConfigError(
            f"encoder {cfg.arch!r} has no token grid; MAMIM needs ssmamba/medmamba/vit"
        )
    patch = int(getattr(encoder, "patch", 1))
    stride = int(cast(Any, encoder).total_stride)
    if cfg.input_px % stride:
        raise ConfigError(
            f"input_px {cfg.input_px} must be a multiple of {cfg.arch}'s total stride {stride}"
        )
    mask_px = cfg.mask_px or default_mask_px(cfg.input_px, patch)
    if cfg.input_px % mask_px or mask_px % patch:
        raise ConfigError(
            f"mask_px {mask_px} must divide input_px {cfg.input_px} and be a multiple of patch {patch}"
        )
    model = MAMIM(encoder, mask_px=mask_px, norm_pix_loss=cfg.norm_pix_loss).to(device)

    n_items = len(cast(Sized, dataset))  # map-style datasets here all have a length
    if n_items == 0:
        raise EmptyInputError("nothing to pretrain on: the tile / image set is empty")
    batch_size = min(cfg.batch_size, n_items)
    sampler = PassSampler(n_items, cfg.seed)
    batches_per_pass = n_items // batch_size
    loader = make_loader(
        dataset,
        batch_size=batch_size,
        workers=cfg.workers,
        # its own generator: each new loader iterator draws a worker base seed, which must not
        # come from the global RNG that DropPath uses (a resumed run would drift from the original)
        seed=cfg.seed + 3,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_tiles,
        worker_init_fn=worker_init,
        pin_memory=device.type == "cuda",
    )

    steps_per_epoch = cfg.steps_per_epoch or batches_per_pass
    total_steps = cfg.epochs * steps_per_epoch

    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
    )
    use_amp, amp_dtype = amp_settings(device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    mask_gen = torch.Generator().manual_seed(cfg.seed + 2)

    step = 0
    history: list[tuple[int, float, float]] = []
    st: dict[str, Any] | None = None
    if resume and paths.state.exists():
        try:
            st = torch.load(paths.state, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"training state {paths.state} is unreadable ({type(e).__name__}); delete it and "
                "re-run without --resume"
            ) from None
        if st.get("arch") != cfg.arch or st.get("config_hash") != cfg.config_hash():
            log.warning(
                "training state %s was written with another arch/config (%s, %s): it does not "
                "fit this run, starting from step 0 (it will be overwritten)",
                paths.state, st.get("arch"), st.get("config_hash"),
            )  # fmt: skip
            st = None
    if resume and st is not None:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"])
        aug_gen.set_state(st["aug_rng"])
        mask_gen.set_state(st["mask_rng"])
        torch.set_rng_state(st["torch_rng"])
        step = int(st["step"])
        history = [(int(s), float(v), float(lr)) for s, v, lr in st["history"]]
        log.info("resuming pretraining from step %d of %d (%s)", step, total_steps, paths.state)
    elif resume and not paths.state.exists():
        log.info("no training state at %s; starting from step 0", paths.state)

    def save_state() -> None:
        _save_state(
            paths.state,
            {
                "version": STATE_VERSION,
                "arch": cfg.arch,
                "config_hash": cfg.config_hash(),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "aug_rng": aug_gen.get_state(),
                "mask_rng": mask_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "history": [list(h) for h in history],
            },
        )
        _write_loss_csv(paths.loss_csv, history)

    log.info(
        "MAMIM pretraining %s: %d tiles sampled of %d (%s), %d steps, batch %d, "
        "input %d px, mask %d px x %.2f, device %s%s",
        cfg.arch, n_items, data_info.get("tiles_available", n_items),
        data_info.get("mpps") or data_info.get("images"), total_steps, batch_size,
        cfg.input_px, mask_px, cfg.mask_ratio, device, f", AMP {amp_dtype}" if use_amp else "",
    )  # fmt: skip
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not progress, desc="pretrain", unit="step")
    model.train()
    try:
        while step < total_steps:
            pass_index, in_pass = divmod(step, batches_per_pass)
            sampler.start_pass(pass_index, in_pass * batch_size)
            for tiles_u8, _ in loader:
                if step >= total_steps:
                    break
                x = augment_batch(tiles_u8, cfg.stain_jitter, generator=aug_gen)
                x = preprocess(x, spec.mean, spec.std, device)
                mask = model.random_mask(
                    x.shape[0], x.shape[2], x.shape[3], cfg.mask_ratio, mask_gen, device
                )
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    loss, _ = model(x, mask)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"pretraining loss became {loss.item()} at step {step}: lower --lr or "
                        "check the tiles (blank / corrupt reads)"
                    )
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                lr = opt.param_groups[0]["lr"]
                sched.step()
                step += 1
                history.append((step, float(loss.item()), float(lr)))
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1][1]:.4f}")
                if step % 20 == 0:
                    log.debug("step %d loss %.4f lr %.3g", step, history[-1][1], lr)
                if step % cfg.checkpoint_every == 0 and step < total_steps:
                    save_state()
    finally:
        bar.close()

    losses = [h[1] for h in history]
    k = min(20, max(1, len(losses) // 2))
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    provenance = {
        "stage": "pretrain",
        "method": "MAMIM",
        "data": data_info,
        "steps": step,
        "epochs": cfg.epochs,
        "loss": {"first": first, "last": last, "window": k},
        "mask_px": mask_px,
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.config_hash(),
        "device": str(device),
        "amp": str(amp_dtype) if use_amp else None,
    }
    digest = save_encoder(model.encoder, out_path, provenance)
    _write_loss_csv(paths.loss_csv, history)
    result = PretrainResult(
        out_path=out_path,
        content_hash=digest,
        steps=step,
        epochs=cfg.epochs,
        first_loss=first,
        last_loss=last,
        n_tiles=n_items,
        seconds=round(time.time() - t_start, 2),
        device=str(device),
        loss_csv=paths.loss_csv,
        provenance=provenance,
    )
    summary = {**result.to_dict(), "loss_curve": [list(h) for h in history]}
    atomic_write_json(paths.summary, summary)
    remove_path(paths.state)  # the encoder is complete; the resume state is no longer needed
    log.info("pretraining done: %d steps, loss %.4f -> %.4f, wrote %s", step, first, last, out_path)
    return result
