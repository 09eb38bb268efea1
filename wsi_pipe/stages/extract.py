"""`wsi-pipe extract`: encoder features at the coordinates written by `wsi-pipe tile`.

Per slide and grid (target mpp), one pass:
1. open the coords store (schema checked) and the slide (the path in the run's slide table, else
   the one recorded in the store; its size must match the one the coords were made on);
2. DataLoader workers (a `TilePool`, started once per run and kept across slides), each with its
   own slide handle, read whole batches of uint8 tiles already resized to the encoder's input px;
   batches are pinned and prefetched;
3. on the device: uint8 -> float, normalise with the encoder's mean/std, forward under
   `inference_mode` and autocast (bf16/fp16), channels-last for CNNs; the device-to-host copy of
   batch k overlaps the forward of batch k+1;
4. features stream into a store written to a temp sibling, renamed to its final name only when
   complete (a killed job leaves no partial store under a final name); coords, tissue_fraction and
   parent_index are copied from the coords store, so every feature set keeps the parent links.

With `--clam-export`, each grid is also written in CLAM's layout with CLAM-correct coords
attributes (`_export_clam`); `--coords FOLDER --slides SLIDES` first imports a CLAM/TRIDENT coords
folder as this run's coords stores (`import_coords`). Both conventions: docs/interop.md.

The model's wait for data (time blocked on the DataLoader) is logged per slide and returned.
Slides run one at a time through the runner (skip-if-done, lock, state, catch-and-record);
the parallelism is inside a slide: DataLoader workers decode while the device computes. A slide
that fails gets its workers discarded; the next slide starts fresh ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from wsi_pipe.core.config import ExtractConfig
from wsi_pipe.core.errors import (
    CheckpointError,
    ConfigError,
    EmptyInputError,
    SlideReadError,
    StoreSchemaError,
    WsiPipeError,
)
from wsi_pipe.core.fsutil import file_hash
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.core.manifest import SlideEntry, resolve_slide_path
from wsi_pipe.data.tile_dataset import TilePool, TileSource
from wsi_pipe.store import create_store, open_store, schema, write_store
from wsi_pipe.torchutil import (
    autocast,
    preprocess,
    resolve_device,
    torch_threads,
    worker_context,
)

if TYPE_CHECKING:  # the runner imports the stages; the stages call it lazily
    from wsi_pipe.runner.loop import RunSummary

log = logging.getLogger(__name__)

#: Root attributes of a coords store that describe the coords, not the tile run itself.
_NOT_COPIED = ("schema_version", "kind", "config_hash")
#: Batches each DataLoader worker keeps ready.
PREFETCH_FACTOR = 4


# ------------------------------------------------------------------------------- encoder
@dataclass(frozen=True)
class EncoderBundle:
    """A loaded encoder in eval mode on its device, with what the feature store records.

    mean, std: per-channel normalisation on the [0, 1] scale. input_px: side of the model input.
    """

    model: nn.Module
    name: str
    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    weights_hash: str
    source: str
    channels_last: bool = False


def _uses_cnn(model: nn.Module) -> bool:
    # channels-last pays off for stacks of convolutions; a ViT/Mamba patch embed is one conv
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 2


def encoder_bundle(
    model: nn.Module, spec: Any, weights_hash: str, source: str, device: torch.device
) -> EncoderBundle:
    """Wrap a model and its spec (`name, input_px, mean, std, embed_dim`) for extraction."""
    model = model.eval().requires_grad_(False).to(device)
    cl = _uses_cnn(model)
    if cl:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return EncoderBundle(
        model=model,
        name=str(spec.name),
        input_px=int(spec.input_px),
        mean=(float(spec.mean[0]), float(spec.mean[1]), float(spec.mean[2])),
        std=(float(spec.std[0]), float(spec.std[1]), float(spec.std[2])),
        embed_dim=int(spec.embed_dim),
        weights_hash=weights_hash,
        source=source,
        channels_last=cl,
    )


def load_extract_encoder(cfg: ExtractConfig, device: torch.device) -> EncoderBundle:
    """The encoder of `cfg`: a checkpoint file (ssmamba.pt / medmamba) or a registered
    architecture with a local weights file, as `resolve_encoder_source` decides (the one rule of
    every stage). Never downloads. Raises CheckpointError / ConfigError naming the file and the
    fix."""
    from wsi_pipe.encoders import load_encoder, resolve_encoder_source

    src = resolve_encoder_source(cfg.encoder, cfg.weights, need_weights=True)
    try:
        model, spec = load_encoder(src, device=str(device), scan_backend=cfg.scan_backend)
    except WsiPipeError:
        raise
    except Exception as e:
        if src.is_checkpoint:
            raise CheckpointError(
                f"encoder checkpoint {src.path} could not be loaded ({type(e).__name__}: {e}): "
                "it is not a wsi-pipe encoder checkpoint; give one written by `wsi-pipe "
                "pretrain`/`finetune`"
            ) from None
        raise CheckpointError(
            f"weights {src.weights} do not fit encoder {src.name!r} ({type(e).__name__}: {e}): "
            "give the state dict of that architecture"
        ) from None
    # the encoder package hashes the loaded tensors (independent of the file's container format)
    whash = spec.weights_hash
    if whash is None and src.file is not None:
        whash = file_hash(src.file)
    return encoder_bundle(model, spec, str(whash), src.source, device)


def feature_set_name(cfg: ExtractConfig) -> str:
    """Feature set name: `cfg.name`, else the checkpoint stem, else the architecture name (with
    `timm:<arch>`'s colon as `_`, a folder name that every file system and Slurm path takes)."""
    from wsi_pipe.encoders import encoder_label

    return cfg.name or encoder_label(cfg.encoder).replace(":", "_")


@dataclass
class EmbedTimings:
    """Seconds spent in one `embed_batches` call; `data_wait_s` is time blocked on the input."""

    n_tiles: int = 0
    n_batches: int = 0
    data_wait_s: float = 0.0
    total_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def tiles_per_s(self) -> float:
        return self.n_tiles / self.total_s if self.total_s > 0 else 0.0

    @property
    def wait_fraction(self) -> float:
        return self.data_wait_s / self.total_s if self.total_s > 0 else 0.0


@contextlib.contextmanager
def _cudnn_benchmark(on: bool) -> Iterator[None]:
    # every batch but the last has one shape: let cuDNN pick its fastest kernels, then restore
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def embed_batches(
    enc: EncoderBundle,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    sink: Callable[[np.ndarray, np.ndarray], None],
    *,
    device: torch.device,
    precision: str = "fp32",
) -> EmbedTimings:
    """Run the encoder over `batches` of (tiles (B, 3, H, W) uint8, rows (B,) int64) and call
    `sink(rows, features (B, D) float32)` for each, in order.

    The host copy of batch k's features is started before batch k+1 runs and awaited after
    batch k+1 has been queued, so a GPU never idles on the copy or on the store write.
    """
    cuda = device.type == "cuda"
    t = EmbedTimings()
    pending: tuple[np.ndarray, torch.Tensor, Any] | None = None

    def drain() -> None:
        nonlocal pending
        if pending is not None:
            rows, host, event = pending
            if event is not None:
                event.synchronize()
            sink(rows, host.numpy())
            pending = None

    t0 = time.perf_counter()
    it = iter(batches)
    with torch.inference_mode(), autocast(device, precision), _cudnn_benchmark(cuda):
        while True:
            tw = time.perf_counter()
            try:
                tiles, rows = next(it)
            except StopIteration:
                t.data_wait_s += time.perf_counter() - tw
                break
            t.data_wait_s += time.perf_counter() - tw
            x = preprocess(tiles, enc.mean, enc.std, device)
            if enc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = enc.model(x)
            if out.ndim != 2 or out.shape[0] != len(rows):
                raise CheckpointError(
                    f"encoder {enc.name} returned shape {tuple(out.shape)} for a batch of {len(rows)}: "
                    "an extract encoder must return (batch, embed_dim)"
                )
            out = out.float()
            if cuda:
                host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(out, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host, event = out, None
            drain()
            pending = (rows.numpy(), host, event)
            t.n_tiles += len(rows)
            t.n_batches += 1
        drain()
    t.total_s = time.perf_counter() - t0
    return t


def make_pool(cfg: ExtractConfig, device: torch.device, persistent: bool = True) -> TilePool:
    """The DataLoader workers of a run (`cfg.workers`, pinned batches on CUDA), kept across
    slides unless `persistent` is False."""
    return TilePool(
        cfg.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=PREFETCH_FACTOR,
        persistent=persistent,
    )


def cpu_threads_for(cfg: ExtractConfig, device: torch.device) -> int | None:
    """Torch threads of the main process: `cfg.threads`, else on CPU the cores the DataLoader
    workers leave free (at least 1); None (unchanged) on CUDA."""
    if cfg.threads is not None:
        return cfg.threads
    if device.type != "cpu":
        return None
    n_cpu = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return max(1, n_cpu - cfg.workers)


# ----------------------------------------------------------------------------- per slide
@dataclass(frozen=True)
class ExtractJob:
    """Everything `extract_slide` needs besides the slide (kept picklable but for the model)."""

    layout: RunLayout
    cfg: ExtractConfig
    set_name: str
    mpps: tuple[float, ...]
    enc: EncoderBundle
    device: torch.device
    overwrite: bool = False
    #: the run's DataLoader workers (None: each grid starts and stops its own)
    pool: TilePool | None = None


def features_key(enc: EncoderBundle, cfg: ExtractConfig, coords_config_hash: str) -> str:
    """Hash of everything that changes the features of one store (not batch size or workers)."""
    blob = json.dumps(
        [
            enc.name,
            enc.weights_hash,
            enc.input_px,
            cfg.precision,
            cfg.feature_dtype,
            coords_config_hash,
            schema.SCHEMA_VERSION,
        ]
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _coords_path(job: ExtractJob, slide_id: str, mpp: float) -> Path:
    p = job.layout.find_coords_store(slide_id, mpp)
    if p is None:
        raise StoreSchemaError(
            f"slide {slide_id} has no coords store at mpp {mpp:g} under {job.layout.tiles_dir(mpp)}: "
            f"run `wsi-pipe tile` for it first"
        )
    return p


def _outputs(job: ExtractJob, slide_id: str, mpp: float) -> list[Path]:
    lay = job.layout
    out = [lay.feature_store(job.set_name, slide_id, mpp, job.cfg.store)]
    if job.cfg.clam_export:
        out += [
            lay.clam_export_h5(job.set_name, slide_id, mpp),
            lay.clam_export_pt(job.set_name, slide_id, mpp),
            lay.clam_export_patches(job.set_name, slide_id, mpp),
        ]
    return out


def _store_is_current(path: Path, key: str) -> bool:
    if not path.exists():
        return False
    try:
        with open_store(path) as r:
            return r.attrs.get("features_key") == key
    except Exception:  # unreadable: redo
        return False


def _coords_key(job: ExtractJob, slide_id: str, mpp: float) -> str | None:
    p = job.layout.find_coords_store(slide_id, mpp)
    if p is None:
        return None
    try:
        with open_store(p, validate=False) as r:
            return features_key(job.enc, job.cfg, str(r.attrs.get("config_hash", "")))
    except Exception:
        return None


def is_extracted(entry: SlideEntry, job: ExtractJob) -> bool:
    """True when every output of the slide exists and was made with this encoder, precision and
    these coords (a re-tiled slide or new weights make it stale)."""
    for mpp in job.mpps:
        key = _coords_key(job, entry.slide_id, mpp)
        outs = _outputs(job, entry.slide_id, mpp)
        if (
            key is None
            or not _store_is_current(outs[0], key)
            or not all(p.exists() for p in outs[1:])
        ):
            return False
    return True


def _slide_path(entry: SlideEntry, attrs: dict[str, Any], layout: RunLayout) -> str:
    return resolve_slide_path(
        entry.slide_id,
        entry.path,
        attrs.get("slide_path"),
        fix=f"put it back, or fix its path in {layout.slides_table}, then re-run extract",
    )


def _check_slide(entry: SlideEntry, path: str, attrs: dict[str, Any]) -> None:
    """Open the slide once in this process (then close it) and check it is the one tiled."""
    from wsi_pipe.readers import open_slide

    try:
        with open_slide(
            path,
            backend=attrs.get("backend", "auto"),
            mpp_override=float(attrs["level0_mpp"]),
            slide_id=entry.slide_id,
        ) as reader:
            dims = tuple(int(v) for v in reader.dimensions)
    except WsiPipeError:
        raise
    except Exception as e:
        raise SlideReadError(
            f"slide {entry.slide_id}: {path} cannot be opened ({type(e).__name__}: {e}): it may be "
            "truncated or corrupt; restore the file and re-run extract"
        ) from None
    want = (attrs.get("level0_width"), attrs.get("level0_height"))
    if None not in want and dims != tuple(int(v) for v in want):  # type: ignore[arg-type]
        raise SlideReadError(
            f"slide {entry.slide_id}: {path} is {dims[0]}x{dims[1]} px at level 0 but its coords were "
            f"made on a {want[0]}x{want[1]} slide: the file changed; re-run `wsi-pipe tile --overwrite`"
        )


def _remove_dead_tmp(final: Path) -> None:
    # under the slide's lock nobody else writes this store: earlier temp siblings are from killed jobs
    from wsi_pipe.core.fsutil import TMP_MARK, remove_path

    if final.parent.exists():
        for p in final.parent.glob(f".{final.name}{TMP_MARK}*"):
            remove_path(p)


def extract_slide(entry: SlideEntry, job: ExtractJob) -> dict[str, Any]:
    """Extract the features of one slide at every grid of `job`; returns counts and timings."""
    info: dict[str, Any] = {"tiles": {}, "tiles_per_s": {}, "data_wait": {}}
    for mpp in job.mpps:
        cpath = _coords_path(job, entry.slide_id, mpp)
        try:
            coords_r = open_store(cpath)
        except StoreSchemaError as e:
            raise StoreSchemaError(f"slide {entry.slide_id}: {e}") from None
        with coords_r:
            attrs = coords_r.attrs
            if attrs.get("kind") != schema.KIND_COORDS:
                raise StoreSchemaError(
                    f"slide {entry.slide_id}: {cpath} is a {attrs.get('kind')!r} store, not coords: "
                    "re-run `wsi-pipe tile`"
                )
            arrays = {n: coords_r.read(n) for n in coords_r.names}
            arr_attrs = {n: coords_r.array_attrs(n) for n in coords_r.names}
        key = features_key(job.enc, job.cfg, str(attrs.get("config_hash", "")))
        outs = _outputs(job, entry.slide_id, mpp)
        if not job.overwrite and _store_is_current(outs[0], key):
            timings = None
        else:
            timings = _extract_grid(entry, job, mpp, attrs, arrays, arr_attrs, key, outs[0])
        if job.cfg.clam_export and (
            job.overwrite or timings is not None or not all(p.exists() for p in outs[1:])
        ):
            _export_clam(outs[0], outs[1], outs[2], outs[3])
        tag = f"{mpp:g}"
        info["tiles"][tag] = int(len(arrays[schema.COORDS]))
        if timings is not None:
            info["tiles_per_s"][tag] = round(timings.tiles_per_s, 1)
            info["data_wait"][tag] = f"{100 * timings.wait_fraction:.0f}%"
    return info


def _extract_grid(
    entry: SlideEntry,
    job: ExtractJob,
    mpp: float,
    attrs: dict[str, Any],
    arrays: dict[str, np.ndarray],
    arr_attrs: dict[str, dict[str, Any]],
    key: str,
    out: Path,
) -> EmbedTimings:
    cfg, enc = job.cfg, job.enc
    coords = arrays[schema.COORDS]
    n = int(len(coords))
    root = {k: v for k, v in attrs.items() if k not in _NOT_COPIED}
    root.update(
        {
            "kind": schema.KIND_FEATURES,
            "encoder": enc.name,
            "encoder_source": enc.source,
            "weights_hash": enc.weights_hash,
            "precision": cfg.precision,
            "feature_dtype": cfg.feature_dtype,
            "embed_dim": enc.embed_dim,
            "input_px": enc.input_px,
            "feature_set": job.set_name,
            "config_hash": cfg.config_hash(),
            "coords_config_hash": str(attrs.get("config_hash", "")),
            "features_key": key,
            "extract_config": json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
        }
    )
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
    own_pool = job.pool is None
    pool = make_pool(cfg, job.device) if own_pool else job.pool
    assert pool is not None
    try:
        if n:
            path = _slide_path(entry, attrs, job.layout)
            root["slide_path"] = path
            grid = schema.GridAttrs.from_attrs(attrs, f"coords store of {entry.slide_id}")
            source = TileSource.from_coords_store(
                grid, coords, out_px=enc.input_px, slide_path=path
            )
            # the workers open the slide and prefetch while this process checks it
            batches = pool.batches(source, cfg.batch_size)
            _check_slide(entry, path, attrs)
        _remove_dead_tmp(out)
        timings = _write_features(entry, job, out, arrays, arr_attrs, root, n, batches)
    except BaseException:
        pool.discard()  # a failed slide may leave workers mid-batch: the next slide gets new ones
        raise
    finally:
        if own_pool:
            pool.close()
    log.info(
        "%s mpp %g: %d tiles in %.2f s (%.0f tiles/s); the model waited %.2f s (%.0f%%) for data",
        entry.slide_id,
        mpp,
        n,
        timings.total_s,
        timings.tiles_per_s,
        timings.data_wait_s,
        100 * timings.wait_fraction,
    )
    return timings


def _write_features(
    entry: SlideEntry,
    job: ExtractJob,
    out: Path,
    arrays: dict[str, np.ndarray],
    arr_attrs: dict[str, dict[str, Any]],
    root: dict[str, Any],
    n: int,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None,
) -> EmbedTimings:
    """Stream the features of `batches` into a new store at `out` (atomic); returns the timings
    (empty when there are no batches: a slide without tiles)."""
    cfg, enc = job.cfg, job.enc
    timings = EmbedTimings()
    dtype = np.dtype(cfg.feature_dtype)
    with create_store(out) as w:
        for name in (schema.COORDS, schema.TISSUE_FRACTION, schema.PARENT_INDEX):
            if name in arrays:
                w.put(name, arrays[name], arr_attrs.get(name))
        w.create_array(schema.FEATURES, (n, enc.embed_dim), dtype)
        if batches is not None:

            def sink(rows: np.ndarray, feats: np.ndarray) -> None:
                start = int(rows[0])
                if not np.array_equal(rows, np.arange(start, start + len(rows))):
                    raise RuntimeError(f"slide {entry.slide_id}: batch rows out of order")
                w.write(schema.FEATURES, start, feats.astype(dtype, copy=False))

            with torch_threads(cpu_threads_for(cfg, job.device)):
                timings = embed_batches(
                    enc, batches, sink, device=job.device, precision=cfg.precision
                )
            if timings.n_tiles != n:
                raise RuntimeError(
                    f"slide {entry.slide_id}: {timings.n_tiles} of {n} tiles embedded"
                )
        w.set_array_attrs(schema.FEATURES, {"encoder": enc.name, "embed_dim": enc.embed_dim})
        w.set_attrs(root)
    return timings


def _export_clam(store_path: Path, h5_path: Path, pt_path: Path, patches_path: Path) -> None:
    """CLAM layout (docs/interop.md), with coords attributes CLAM reads correctly:

    h5_files/<slide>.h5   `features` (N, D) + `coords` (N, 2), CLAM's chunking (one row) and
                          resizable rows; `coords` attrs: `patch_size` = the read size AT
                          `patch_level` (our `read_size_px` at `read_level`, exactly what our
                          reader reads), `patch_level`, `downsample`, `downsampled_level_dim`,
                          `level_dim`, `name`, `save_path`, `target_patch_size` = tile_px,
                          `patch_size_level0` = tile_size_level0
    pt_files/<slide>.pt   the features tensor (N, D) alone
    patches/<slide>.h5    `coords` alone with the same attrs (CLAM's create_patches_fp output),
                          so CLAM's own extract_features_fp.py runs on our grid

    The native store keeps TRIDENT's meaning of `patch_size` (side at the target mpp); these
    files carry no TRIDENT magnification keys, so TRIDENT reads them through its CLAM fallback correctly.
    """
    from wsi_pipe.core.fsutil import atomic_path
    from wsi_pipe.interop import h5io

    with open_store(store_path) as r:
        feats = r.read(schema.FEATURES)
        coords = r.read(schema.COORDS)
        attrs = r.attrs
        native = r.array_attrs(schema.COORDS)
    level_dim = native.get("level_dim") or native.get("downsampled_level_dim") or [0, 0]
    clam_attrs = h5io.clam_coords_attrs(
        slide_id=str(attrs["slide_id"]),
        read_level=int(attrs["read_level"]),
        read_size_px=int(attrs["read_size_px"]),
        level_downsample=float(attrs.get("read_downsample") or h5io.first(native["downsample"])),
        level_dim=(int(level_dim[0]), int(level_dim[1])),
        tile_px=int(attrs["tile_px"]),
        tile_size_level0=int(attrs["tile_size_level0"]),
        save_path=str(patches_path.parent),
    )
    provenance: dict[str, Any] = {
        k: attrs[k]
        for k in ("slide_id", "slide_path", "level0_mpp", "target_mpp", "tile_px", "encoder")
        if k in attrs and attrs[k] is not None
    }
    feats32 = np.ascontiguousarray(feats, dtype=np.float32)
    coords64 = np.ascontiguousarray(coords, dtype=np.int64)
    h5io.write_h5(
        h5_path,
        {h5io.FEATURES: feats32, h5io.COORDS: coords64},
        {h5io.COORDS: clam_attrs},
        provenance,
    )
    h5io.write_h5(patches_path, {h5io.COORDS: coords64}, {h5io.COORDS: clam_attrs}, provenance)
    with atomic_path(pt_path) as tmp:
        torch.save(torch.from_numpy(feats32), tmp)


# ------------------------------------------------------------------------ coords import
@dataclass(frozen=True)
class CoordsImport:
    """`wsi-pipe extract --coords FOLDER --slides SLIDES`: a CLAM/TRIDENT coords folder and the
    slides (folder, files or manifest) it was made on; `grid_mpp` names the grid (None: chosen
    as `interop.coords.choose_grid_mpp` says)."""

    coords_dir: str
    slides: tuple[str, ...]
    grid_mpp: float | None = None
    backend: str = "auto"


@dataclass(frozen=True)
class ImportSummary:
    grid_mpp: float
    fmt: str
    slide_ids: list[str]
    warnings: list[str]


def import_coords(run_dir: str | Path, imp: CoordsImport) -> ImportSummary:
    """Write the coords stores of a CLAM/TRIDENT coords folder into run `run_dir`:

    1. list the coords files (slide name = file stem; TRIDENT's `_patches` suffix dropped) and
       the slides; every coords file needs its slide (else ConfigError naming both and the fix);
       slides without coords are left out with a warning (CLAM skips slides without tissue);
    2. open each slide in our readers and plan its reads (`interop.coords.plan_slide`: CLAM's
       exact read, TRIDENT's level-0 side, the true mpp from the slide's own metadata);
    3. choose the grid mpp, warn for every slide whose true mpp is off it or off the project's
       nominal magnification (naming the slide), and write one store per slide to
       `RunLayout.coords_store` (tissue_fraction NaN, parent_index -1);
    4. merge the slides into the run's slide table and mark the folder as a run.
    """
    from wsi_pipe import __version__
    from wsi_pipe.core.fsutil import atomic_write_text
    from wsi_pipe.core.manifest import discover, load_slide_table, save_slide_table
    from wsi_pipe.interop import coords as ic
    from wsi_pipe.interop import h5io
    from wsi_pipe.readers import open_slide

    layout = RunLayout(run_dir)
    folder = ic.open_coords_folder(imp.coords_dir)
    entries = {e.slide_id: e for e in discover(list(imp.slides))}
    no_slide = sorted(set(folder.files) - set(entries))
    if no_slide:
        raise ConfigError(
            f"{len(no_slide)} coords file(s) in {folder.path} have no slide among "
            f"{', '.join(imp.slides)}: {', '.join(no_slide[:5])} (e.g. {folder.files[no_slide[0]]}); "
            "give the folder holding those slides, or a manifest whose slide_id matches the file names"
        )
    warnings = [
        f"slide {sid} ({entries[sid].path}) has no coords file in {folder.path}: left out"
        for sid in sorted(set(entries) - set(folder.files))
    ]
    planned = []
    for sid, src in sorted(folder.files.items()):
        e = entries[sid]
        content = h5io.read_h5(src, (h5io.COORDS,))
        if h5io.COORDS not in content.arrays:
            raise StoreSchemaError(f"slide {sid}: {src} has no `coords` dataset")
        attrs = content.array_attrs[h5io.COORDS]
        with open_slide(e.path, backend=imp.backend, mpp_override=e.mpp, slide_id=sid) as reader:
            plan = ic.plan_slide(folder.fmt, sid, src, attrs, reader)
            planned.append((e, src, content.arrays[h5io.COORDS], attrs, plan))
    grid_mpp = ic.choose_grid_mpp(folder, [p[-1] for p in planned], imp.grid_mpp)
    for e, *_ in planned:  # never overwrite a grid that `wsi-pipe tile` made
        have = layout.find_coords_store(e.slide_id, grid_mpp)
        if have is not None:
            with open_store(have, validate=False) as r:
                tiled_here = "imported_from" not in r.attrs
            if tiled_here:
                raise ConfigError(
                    f"slide {e.slide_id}: {have} was made by `wsi-pipe tile`; importing "
                    f"{folder.path} would replace it: import into another run folder, or name "
                    f"another grid with --mpp"
                )
    for e, src, coords, attrs, plan in planned:
        w = ic.mismatch_warning(e.slide_id, plan, grid_mpp)
        if w:
            warnings.append(w)
        with open_slide(e.path, backend=imp.backend, mpp_override=e.mpp, slide_id=e.slide_id) as r:
            arrays, arr_attrs, root = ic.imported_store(
                fmt=folder.fmt,
                src=src,
                slide_id=e.slide_id,
                slide_path=e.path,
                patient_id=e.patient_id,
                label=e.label,
                coords=coords,
                src_attrs=attrs,
                plan=plan,
                grid_mpp=grid_mpp,
                reader=r,
            )
        out = layout.coords_store(e.slide_id, grid_mpp, "h5")
        _remove_dead_tmp(out)
        write_store(out, arrays, root, arr_attrs)
    for w in warnings:
        log.warning("%s", w)
    layout.root.mkdir(parents=True, exist_ok=True)
    if not layout.marker.exists():
        atomic_write_text(layout.marker, f"wsi-pipe {__version__} run folder\n")
    table = (
        {e.slide_id: e for e in load_slide_table(layout.slides_table)}
        if (layout.slides_table.exists())
        else {}
    )
    table.update({e.slide_id: e for e, *_ in planned})
    save_slide_table(layout.slides_table, list(table.values()))
    log.info(
        "imported %s coords of %d slides from %s into grid %s",
        folder.fmt,
        len(planned),
        folder.path,
        layout.tiles_dir(grid_mpp),
    )
    return ImportSummary(grid_mpp, folder.fmt, [e.slide_id for e, *_ in planned], warnings)


# ------------------------------------------------------------------------------- the run
def _select_mpps(layout: RunLayout, wanted: tuple[float, ...] | None) -> tuple[float, ...]:
    have = layout.tile_mpps()
    if not have:
        raise EmptyInputError(
            f"{layout.root} has no tiles/ grids: run `wsi-pipe tile ... --out {layout.root}` first"
        )
    if wanted is None:
        return tuple(have)
    out = []
    for m in wanted:
        match = [h for h in have if math.isclose(h, m, rel_tol=1e-6, abs_tol=1e-9)]
        if not match:
            raise ConfigError(
                f"--mpp {m:g} is not a grid of {layout.root} (it has {', '.join(f'{h:g}' for h in have)})"
            )
        out.append(match[0])
    return tuple(sorted(set(out)))


def prepare_job(
    run_dir: str | Path,
    cfg: ExtractConfig,
    *,
    overwrite: bool = False,
    encoder: EncoderBundle | None = None,
) -> ExtractJob:
    """Resolve grids, device and encoder; save the resolved config of this feature set
    (`RunLayout.extract_config`, one file per set, so extracting a second set keeps the first's)."""
    from wsi_pipe.core.config import dump_config
    from wsi_pipe.core.fsutil import atomic_write_text

    layout = RunLayout(run_dir)
    mpps = _select_mpps(layout, cfg.mpps)
    device = resolve_device(cfg.device)
    if cfg.workers > 0:  # start the workers' forkserver now: its imports overlap encoder loading
        from multiprocessing import forkserver

        worker_context()
        forkserver.ensure_running()
    if encoder is None:
        encoder = load_extract_encoder(cfg, device)
    resolved = cfg.model_copy(update={"mpps": mpps, "device": device.type})
    set_name = feature_set_name(cfg)
    atomic_write_text(layout.extract_config(set_name), dump_config(resolved))
    return ExtractJob(layout, cfg, set_name, mpps, encoder, device, overwrite)


def run_extract(
    run_dir: str | Path,
    cfg: ExtractConfig,
    *,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    encoder: EncoderBundle | None = None,
    persistent_workers: bool = True,
    coords_import: CoordsImport | None = None,
) -> RunSummary:
    """Extract features for every slide of the run (its slide table) at the chosen grids.

    `encoder` (optional) replaces the one named by `cfg` (benchmarks, tests of the loop).
    `persistent_workers`: one set of DataLoader workers serves every slide (False: each grid
    starts its own, the baseline of `scripts/bench_extract.py --slides`).
    `coords_import`: first write the coords stores of a CLAM/TRIDENT coords folder
    (`import_coords`), then extract that grid only, for the imported slides only.
    Returns the runner's RunSummary; the stage name is `extract/<feature set>`, so different
    feature sets of one run have their own locks and state.
    """
    from dataclasses import replace

    from wsi_pipe.core.manifest import load_slide_table
    from wsi_pipe.runner import run_slides

    only: set[str] | None = None
    if coords_import is not None:
        imported = import_coords(run_dir, coords_import)
        cfg = cfg.model_copy(update={"mpps": (imported.grid_mpp,)})
        only = set(imported.slide_ids)
    job = prepare_job(run_dir, cfg, overwrite=overwrite, encoder=encoder)
    entries = load_slide_table(job.layout.slides_table)
    if only is not None:
        entries = [e for e in entries if e.slide_id in only]
    log.info(
        "extract %s: %d slides, grids %s, %s on %s, %s",
        job.set_name,
        len(entries),
        ", ".join(f"{m:g}" for m in job.mpps),
        job.enc.name,
        job.device,
        cfg.precision,
    )
    with make_pool(cfg, job.device, persistent=persistent_workers) as pool:
        job = replace(job, pool=pool)
        return run_slides(
            f"extract/{job.set_name}",
            entries,
            partial(extract_slide, job=job),
            job.layout,
            is_done=partial(is_extracted, job=job),
            workers=1,
            shard=shard,
            overwrite=overwrite,
            progress=progress,
        )
