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
from typing import Any

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
from wsi_pipe.core.manifest import SlideEntry
from wsi_pipe.stages.tile_dataset import TilePool, TileSource, worker_context
from wsi_pipe.store import create_store, open_store, schema, write_store
from wsi_pipe.torchutil import resolve_device

log = logging.getLogger(__name__)

#: Suffixes that mark `--encoder` as a checkpoint file rather than a registered architecture.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
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


def _is_checkpoint_path(text: str) -> bool:
    p = Path(text)
    return p.suffix.lower() in CHECKPOINT_SUFFIXES or p.exists() or os.sep in text


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
        mean=tuple(float(v) for v in spec.mean),
        std=tuple(float(v) for v in spec.std),  # type: ignore[arg-type]
        embed_dim=int(spec.embed_dim),
        weights_hash=weights_hash,
        source=source,
        channels_last=cl,
    )


def load_extract_encoder(cfg: ExtractConfig, device: torch.device) -> EncoderBundle:
    """The encoder of `cfg`: a checkpoint file (ssmamba.pt / medmamba) or a registered
    architecture with a local weights file. Never downloads. Raises CheckpointError / ConfigError
    naming the file and the fix."""
    from wsi_pipe.encoders import load_encoder

    src = cfg.encoder
    if _is_checkpoint_path(src):
        path = Path(src)
        if not path.is_file():
            raise CheckpointError(
                f"encoder checkpoint {path} does not exist: give the ssmamba.pt written by "
                "`wsi-pipe pretrain`/`finetune`, or a registered architecture with --weights FILE"
            )
        if cfg.weights is not None:
            raise ConfigError(
                f"--weights is for a registered architecture; {path} is already a checkpoint"
            )
        try:
            model, spec = load_encoder(str(path), device=str(device), scan_backend=cfg.scan_backend)
        except WsiPipeError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"encoder checkpoint {path} could not be loaded ({type(e).__name__}: {e}): it is not "
                "a wsi-pipe encoder checkpoint; give one written by `wsi-pipe pretrain`/`finetune`"
            ) from None
        whash = getattr(spec, "weights_hash", None) or file_hash(path)
        return encoder_bundle(model, spec, str(whash), str(path.resolve()), device)
    from wsi_pipe.encoders import list_encoders

    if src not in list_encoders():
        raise ConfigError(
            f"encoder {src!r} is neither a checkpoint file nor a registered architecture "
            f"({', '.join(list_encoders())}): give e.g. models/ssmamba.pt, or NAME --weights FILE"
        )
    if cfg.weights is None:
        raise ConfigError(
            f"encoder {src!r} is an architecture name: give its local weights file with --weights "
            "FILE (wsi-pipe never downloads weights), or a checkpoint path such as models/ssmamba.pt"
        )
    wpath = Path(cfg.weights)
    if not wpath.is_file():
        raise CheckpointError(
            f"weights file {wpath} for encoder {src!r} does not exist: give a local file"
        )
    try:
        model, spec = load_encoder(
            src, weights=str(wpath), device=str(device), scan_backend=cfg.scan_backend
        )
    except WsiPipeError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"weights {wpath} do not fit encoder {src!r} ({type(e).__name__}: {e}): give the "
            "state dict of that architecture"
        ) from None
    # the encoder package hashes the loaded tensors (independent of the file's container format)
    whash = getattr(spec, "weights_hash", None) or file_hash(wpath)
    return encoder_bundle(model, spec, str(whash), f"{src}:{wpath.resolve()}", device)


def feature_set_name(cfg: ExtractConfig) -> str:
    """Feature set name: `cfg.name`, else the checkpoint stem, else the architecture name."""
    if cfg.name:
        return cfg.name
    return Path(cfg.encoder).stem if _is_checkpoint_path(cfg.encoder) else cfg.encoder


# ----------------------------------------------------------------------------- inference
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


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _cudnn_benchmark(on: bool) -> Iterator[None]:
    # every batch but the last has one shape: let cuDNN pick its fastest kernels, then restore
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def norm_params(enc: EncoderBundle, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale), each (1, 3, 1, 1) float32 on `device`, for `normalise`."""
    mean = torch.tensor(enc.mean, dtype=torch.float32)
    std = torch.tensor(enc.std, dtype=torch.float32)
    return (mean / std).view(1, 3, 1, 1).to(device), (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(
        device
    )


def normalise(tiles: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 tiles (B, 3, H, W) -> float32 (x / 255 - mean) / std, in one pass that keeps the
    batch's (channels-last) strides."""
    return torch.addcmul(-shift, tiles.float(), scale)


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
    shift, scale = norm_params(enc, device)
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
    with torch.inference_mode(), _autocast(device, precision), _cudnn_benchmark(cuda):
        while True:
            tw = time.perf_counter()
            try:
                tiles, rows = next(it)
            except StopIteration:
                t.data_wait_s += time.perf_counter() - tw
                break
            t.data_wait_s += time.perf_counter() - tw
            x = normalise(tiles.to(device, non_blocking=True), shift, scale)
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


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op threads in this process (None = leave as is)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    out = [job.layout.feature_store(job.set_name, slide_id, mpp, job.cfg.store)]
    if job.cfg.clam_export:
        d = job.layout.clam_export_dir(job.set_name, mpp)
        out += [d / "h5_files" / f"{slide_id}.h5", d / "pt_files" / f"{slide_id}.pt"]
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
    for cand in (entry.path, attrs.get("slide_path")):
        if cand and Path(cand).exists():
            return str(cand)
    raise SlideReadError(
        f"slide {entry.slide_id}: file {entry.path or attrs.get('slide_path')} does not exist (moved "
        f"or deleted?): put it back, or fix its path in {layout.slides_table}, then re-run extract"
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
            _export_clam(outs[0], outs[1], outs[2])
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
            source = TileSource(
                slide_id=entry.slide_id,
                slide_path=path,
                backend=str(attrs.get("backend", "auto")),
                read_level=int(attrs["read_level"]),
                read_size_px=int(attrs["read_size_px"]),
                out_px=enc.input_px,
                coords=coords,
                mpp_override=float(attrs["level0_mpp"]),
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


def _export_clam(store_path: Path, h5_path: Path, pt_path: Path) -> None:
    """CLAM layout: h5_files/<slide>.h5 (features, coords) and pt_files/<slide>.pt (tensor)."""
    from wsi_pipe.core.fsutil import atomic_path

    with open_store(store_path) as r:
        feats = r.read(schema.FEATURES)
        coords = r.read(schema.COORDS)
        attrs = r.attrs
        coords_attrs = r.array_attrs(schema.COORDS)
    write_store(
        h5_path,
        {schema.FEATURES: feats, schema.COORDS: coords},
        {k: v for k, v in attrs.items() if k != "schema_version"},
        {schema.COORDS: coords_attrs},
    )
    with atomic_path(pt_path) as tmp:
        torch.save(torch.from_numpy(np.ascontiguousarray(feats)), tmp)


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
) -> Any:
    """Extract features for every slide of the run (its slide table) at the chosen grids.

    `encoder` (optional) replaces the one named by `cfg` (benchmarks, tests of the loop).
    `persistent_workers`: one set of DataLoader workers serves every slide (False: each grid
    starts its own, the baseline of `scripts/bench_extract.py --slides`).
    Returns the runner's RunSummary; the stage name is `extract/<feature set>`, so different
    feature sets of one run have their own locks and state.
    """
    from dataclasses import replace

    from wsi_pipe.core.manifest import load_slide_table
    from wsi_pipe.runner import run_slides

    job = prepare_job(run_dir, cfg, overwrite=overwrite, encoder=encoder)
    entries = load_slide_table(job.layout.slides_table)
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
