"""Tiles of one slide at stored coordinates, as a torch Dataset for a multi-worker DataLoader.

Each DataLoader worker opens its own slide handle lazily (OpenSlide and tiffslide handles must
not cross a fork), reads the region at the stored read level, and resizes it once, straight from
the read size to the encoder's input size. Items are uint8 so that workers ship 1 byte per
channel to the main process (and over PCIe); normalisation runs on the device, batched.

A tile is the region `read_size_px` x `read_size_px` at `read_level` whose top-left corner is the
stored level-0 `(x, y)`, resized to `out_px` x `out_px` (`INTER_AREA` when shrinking, `INTER_LINEAR`
when enlarging; no resize when the sizes match).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from wsi_pipe.core.errors import SlideReadError
from wsi_pipe.imageops.tiles import resize_tile
from wsi_pipe.store.schema import GridAttrs
from wsi_pipe.torchutil import make_loader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileSource:
    """Where and how to read the tiles of one slide at one grid.

    coords: (n_tiles, 2) int64, level-0 px, (x, y) top-left. read_size_px: side at read_level.
    out_px: side of the returned tiles. mpp_override: level-0 um/px the coords were made with.
    """

    slide_id: str
    slide_path: str
    backend: str
    read_level: int
    read_size_px: int
    out_px: int
    coords: np.ndarray
    mpp_override: float | None = None

    @classmethod
    def from_coords_store(
        cls, grid: GridAttrs, coords: np.ndarray, *, out_px: int, slide_path: str | None = None
    ) -> TileSource:
        """The tiles of a coords (or feature) store: its `GridAttrs` say how they are read (at
        the level-0 mpp the coords were made with); `slide_path` overrides the stored path
        (`core.manifest.resolve_slide_path` picks it)."""
        return cls(
            slide_id=grid.slide_id,
            slide_path=slide_path or grid.slide_path,
            backend=grid.backend,
            read_level=grid.read_level,
            read_size_px=grid.read_size_px,
            out_px=int(out_px),
            coords=np.asarray(coords, dtype=np.int64),
            mpp_override=grid.level0_mpp,
        )


class TileDataset(Dataset):
    """`ds[i] -> (tile (3, out_px, out_px) uint8, i)`: the tile at row i of the coords store.

    The returned CHW tensor is a view of a contiguous HWC array; `collate_tiles` stacks a batch
    into a (B, 3, H, W) tensor in channels-last memory without another copy.
    """

    def __init__(self, source: TileSource) -> None:
        self.source = source
        self._reader: Any = None
        self._reader_pid: int | None = None

    def __len__(self) -> int:
        return int(len(self.source.coords))

    def _slide(self) -> Any:
        # reopen after a fork: a handle inherited from another process shares file offsets
        if self._reader is None or self._reader_pid != os.getpid():
            from wsi_pipe.readers import open_slide

            s = self.source
            try:
                self._reader = open_slide(
                    s.slide_path,
                    backend=s.backend,
                    mpp_override=s.mpp_override,
                    slide_id=s.slide_id,
                )
            except SlideReadError:
                raise
            except Exception as e:
                raise SlideReadError(
                    f"slide {s.slide_id}: cannot open {s.slide_path} ({type(e).__name__}: {e}); "
                    "check the file is intact and readable, or re-run `wsi-pipe tile` on it"
                ) from None
            self._reader_pid = os.getpid()
        return self._reader

    def read_tile(self, i: int) -> np.ndarray:
        """Tile at row `i`: (out_px, out_px, 3) uint8 RGB."""
        s = self.source
        x, y = (int(v) for v in s.coords[i])
        try:
            region = self._slide().read_region(
                (x, y), s.read_level, (s.read_size_px, s.read_size_px)
            )
        except SlideReadError:
            raise
        except Exception as e:
            raise SlideReadError(
                f"slide {s.slide_id}: reading tile {i} at level-0 ({x}, {y}), level {s.read_level} "
                f"of {s.slide_path} failed ({type(e).__name__}: {e}); the file may be truncated or "
                "corrupt: restore it and re-run"
            ) from None
        return np.ascontiguousarray(resize_tile(np.asarray(region)[..., :3], s.out_px))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.read_tile(i)).permute(2, 0, 1), int(i)

    def close(self) -> None:
        if self._reader is not None and self._reader_pid == os.getpid():
            self._reader.close()
        self._reader = None
        self._reader_pid = None

    def __getstate__(self) -> dict[str, Any]:
        # never pickle a handle (spawned workers open their own)
        return {"source": self.source, "_reader": None, "_reader_pid": None}


def collate_tiles(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack items into (tiles (B, 3, H, W) uint8 channels-last, rows (B,) int64).

    Uses `default_collate` on the HWC arrays, so inside a worker the batch is written once,
    straight into shared memory.
    """
    tiles = default_collate([t.permute(1, 2, 0) for t, _ in batch])  # (B, H, W, 3) contiguous
    rows = torch.as_tensor([r for _, r in batch], dtype=torch.int64)
    return tiles.permute(0, 3, 1, 2), rows


def worker_init(worker_id: int) -> None:
    """DataLoader worker setup: one compute thread per worker (decoding is the parallelism).

    Workers come from `torchutil.worker_context()`, a clean forkserver, so OpenCV's thread pool was never
    started in their parent and can be reconfigured safely.
    """
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


# ------------------------------------------------------------------ workers kept across slides
@dataclass(frozen=True)
class BatchRequest:
    """One batch to read: `source` with only this batch's coords, and their rows in the store."""

    source: TileSource
    rows: np.ndarray  # (B,) int64


def batch_requests(source: TileSource, batch_size: int) -> list[BatchRequest]:
    """Split a slide's coords into consecutive batches of at most `batch_size` rows."""
    n = len(source.coords)
    return [
        BatchRequest(
            replace(source, coords=source.coords[s : s + batch_size]),
            np.arange(s, min(s + batch_size, n), dtype=np.int64),
        )
        for s in range(0, n, batch_size)
    ]


class BatchReader(Dataset):
    """`reader[request] -> (tiles (B, 3, H, W) uint8 channels-last, rows (B,) int64)`.

    The "index" is a whole `BatchRequest`, so one DataLoader (and its workers) serves any slide:
    each worker keeps the handle of the slide it read last and opens another only when a request
    names a different file.
    """

    def __init__(self) -> None:
        self._ds: TileDataset | None = None
        self._key: tuple[Any, ...] | None = None

    def __len__(self) -> int:  # the sampler decides what is read; no fixed length
        return 0

    def __getitem__(self, req: BatchRequest) -> tuple[torch.Tensor, torch.Tensor]:
        s = req.source
        key = (
            s.slide_id,
            s.slide_path,
            s.backend,
            s.mpp_override,
        )  # TileDataset reopens after a fork
        if self._ds is None or key != self._key:
            self.close()
            self._ds = TileDataset(s)
            self._key = key
        else:
            self._ds.source = s  # same file: keep the handle, take this batch's coords/level/size
        ds = self._ds
        tiles, _ = collate_tiles(
            [(torch.from_numpy(ds.read_tile(i)).permute(2, 0, 1), 0) for i in range(len(s.coords))]
        )
        return tiles, torch.from_numpy(np.asarray(req.rows, dtype=np.int64))

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
        self._ds = None
        self._key = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_ds": None, "_key": None}


class _RequestSampler(torch.utils.data.Sampler):
    """Yields the current slide's batch requests; `TilePool` swaps them between slides (the
    DataLoader iterates its sampler in this process, anew for every `iter(loader)`)."""

    def __init__(self) -> None:
        self.requests: list[BatchRequest] = []

    def __iter__(self) -> Iterator[BatchRequest]:
        return iter(list(self.requests))

    def __len__(self) -> int:
        return len(self.requests)


def _as_is(item: Any) -> Any:
    return item


def _plain_errors(it: Iterator[Any]) -> Iterator[Any]:
    """Re-raise a wsi-pipe error from a worker with its own message (the DataLoader prefixes the
    worker's traceback), so a slide's recorded error reads the same with or without workers."""
    from wsi_pipe.core.errors import WsiPipeError

    try:
        yield from it
    except WsiPipeError as e:
        text = str(e)
        tag = f"{type(e).__module__}.{type(e).__qualname__}: "
        if text.startswith("Caught ") and tag in text:
            raise type(e)(text.rsplit(tag, 1)[1].rstrip("\n")) from None
        raise


class TilePool:
    """DataLoader workers that outlive a slide: started once per run, then fed slide by slide.

    Starting workers (fork from the forkserver, opening the slide, filling the prefetch queue)
    costs ~0.1 s per slide, a third of the time of a 200-tile biopsy on a small machine; a pool
    pays it once. `batches(source, batch_size)` returns the slide's batches in row order. After a
    failure inside a slide call `discard()`: the next slide gets fresh workers. `close()` ends it.
    """

    def __init__(
        self,
        workers: int,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
        persistent: bool = True,
    ) -> None:
        self.workers = max(0, int(workers))
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.persistent = persistent
        self._sampler = _RequestSampler()
        self._reader = BatchReader()
        self._loader: torch.utils.data.DataLoader | None = None
        self._it: Any = None  # the loader's current iterator (it owns the worker processes)

    def _make_loader(self) -> torch.utils.data.DataLoader:
        return make_loader(
            self._reader,
            batch_size=None,
            workers=self.workers,
            seed=0,  # requests come in order; nothing is drawn at random
            sampler=self._sampler,
            collate_fn=_as_is,
            worker_init_fn=worker_init,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            persistent=self.persistent,
        )

    def batches(
        self, source: TileSource, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Start reading `source` (workers begin at once) and return an iterator over its
        (tiles, rows) batches. Consume it fully, or call `discard()`, before the next slide."""
        if self._loader is None or not self.persistent:
            self.discard()
            self._loader = self._make_loader()
        self._sampler.requests = batch_requests(source, batch_size)
        self._it = iter(self._loader)
        return _plain_errors(self._it)

    def discard(self) -> None:
        """Stop the workers (if any) and forget the loader; the next `batches` starts anew."""
        loader, self._loader = self._loader, None
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        if loader is not None:
            loader._iterator = None
        self._reader.close()

    def close(self) -> None:
        self.discard()

    def __enter__(self) -> TilePool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
