"""zarr v3 backend of the store schema.

Rows are buffered to whole chunks before they reach zarr: appending small batches would
re-write the last chunk each time (ENVIRONMENT.md measured 4x slower).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_pipe.core.errors import StoreSchemaError
from wsi_pipe.store import schema
from wsi_pipe.store.base import StoreReader, StoreWriter


class _RowBuffer:
    def __init__(self, chunk_rows: int) -> None:
        self.chunk_rows = chunk_rows
        self.start = 0
        self.blocks: list[np.ndarray] = []
        self.n = 0


def _array(group: zarr.Group, name: str) -> zarr.Array:  # type: ignore[type-arg]
    arr = group[name]
    if not isinstance(arr, zarr.Array):
        raise StoreSchemaError(f"{name!r} in {group.store} is a group, not an array")
    return arr


class ZarrWriter(StoreWriter):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._g = zarr.open_group(str(path), mode="w", zarr_format=3)
        self._buf: dict[str, _RowBuffer] = {}

    def create_array(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: str | np.dtype,
        chunks: tuple[int, ...] | None = None,
    ) -> None:
        chunks = chunks or schema.chunks_for(name, tuple(shape))
        self._g.create_array(name, shape=tuple(shape), chunks=chunks, dtype=np.dtype(dtype))
        self._buf[name] = _RowBuffer(chunks[0])

    def _flush(self, name: str, whole_chunks_only: bool) -> None:
        buf = self._buf[name]
        if not buf.blocks:
            return
        data = np.concatenate(buf.blocks) if len(buf.blocks) > 1 else buf.blocks[0]
        n_write = len(data)
        if whole_chunks_only:
            # write up to the last chunk boundary; keep the tail buffered
            end = ((buf.start + n_write) // buf.chunk_rows) * buf.chunk_rows
            n_write = max(0, end - buf.start)
        if n_write:
            _array(self._g, name)[buf.start : buf.start + n_write] = data[:n_write]
        rest = data[n_write:]
        buf.start += n_write
        buf.blocks = [rest] if len(rest) else []
        buf.n = len(rest)

    def write(self, name: str, start: int, block: np.ndarray) -> None:
        buf = self._buf[name]
        if start != buf.start + buf.n:  # not contiguous with the buffer: flush, restart there
            self._flush(name, whole_chunks_only=False)
            buf.start = start
        buf.blocks.append(np.asarray(block))
        buf.n += len(block)
        if buf.n >= buf.chunk_rows:
            self._flush(name, whole_chunks_only=True)

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        self._g.attrs.update({k: schema.as_attr(v) for k, v in attrs.items()})

    def set_array_attrs(self, name: str, attrs: dict[str, Any]) -> None:
        _array(self._g, name).attrs.update({k: schema.as_attr(v) for k, v in attrs.items()})

    def close(self) -> None:
        for name in self._buf:
            self._flush(name, whole_chunks_only=False)


class ZarrReader(StoreReader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._g = zarr.open_group(str(path), mode="r")
        except Exception as e:  # zarr raises several types for a missing/foreign folder
            raise StoreSchemaError(
                f"{path} is not a readable zarr store ({e}): re-run with --overwrite"
            ) from None

    @property
    def names(self) -> list[str]:
        return sorted(k for k, _ in self._g.arrays())

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: schema.from_attr(v) for k, v in self._g.attrs.asdict().items()}

    def array_attrs(self, name: str) -> dict[str, Any]:
        return {k: schema.from_attr(v) for k, v in _array(self._g, name).attrs.asdict().items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(_array(self._g, name).shape)

    def dtype(self, name: str) -> str:
        return str(_array(self._g, name).dtype)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return np.asarray(_array(self._g, name)[start:stop])
