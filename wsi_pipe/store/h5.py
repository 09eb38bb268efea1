"""HDF5 backend of the store schema (h5py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsi_pipe.core.errors import StoreSchemaError
from wsi_pipe.store import schema
from wsi_pipe.store.base import StoreReader, StoreWriter


class H5Writer(StoreWriter):
    """Builds the HDF5 file in memory (h5py's core driver) and writes its image with plain
    Python I/O on close.

    Why: when the disk fills up mid-write, libhdf5 cannot flush an on-disk file, cannot close it
    either, and the process crashes at exit -- or a write error is swallowed and a damaged file
    reaches its final name. Written this way, a full disk is an ordinary OSError from `write`,
    and the caller's atomic rename never happens. The cost is holding one store in memory
    (a 100,000 x 768 float32 feature store: 300 MB).
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._f = h5py.File(
            f"wsi-pipe-{id(self)}-{path.name}", "w", driver="core", backing_store=False
        )
        # the temp path exists from the start (so a crash leaves a visible, cleanable temp file)
        path.touch()

    def create_array(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: str | np.dtype,
        chunks: tuple[int, ...] | None = None,
    ) -> None:
        chunks = chunks or schema.chunks_for(name, tuple(shape))
        self._f.create_dataset(
            name,
            shape=tuple(shape),
            dtype=np.dtype(dtype),
            chunks=chunks,
            maxshape=(None,) + tuple(shape[1:]),
        )

    def write(self, name: str, start: int, block: np.ndarray) -> None:
        self._f[name][start : start + len(block)] = block

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        for k, v in attrs.items():
            self._f.attrs[k] = schema.as_attr(v)

    def set_array_attrs(self, name: str, attrs: dict[str, Any]) -> None:
        for k, v in attrs.items():
            self._f[name].attrs[k] = schema.as_attr(v)

    def close(self) -> None:
        if not self._f.id.valid:
            return
        try:
            self._f.flush()
            image = self._f.id.get_file_image()
        finally:
            self._f.close()
        with open(self.path, "wb") as fh:
            fh.write(image)
            fh.flush()


class H5Reader(StoreReader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._f = h5py.File(path, "r")
        except OSError as e:
            raise StoreSchemaError(
                f"{path} is not a readable HDF5 store ({e}): re-run with --overwrite"
            ) from None

    @property
    def names(self) -> list[str]:
        return [k for k in self._f.keys() if isinstance(self._f[k], h5py.Dataset)]

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: schema.from_attr(v) for k, v in self._f.attrs.items()}

    def array_attrs(self, name: str) -> dict[str, Any]:
        return {k: schema.from_attr(v) for k, v in self._f[name].attrs.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._f[name].shape)

    def dtype(self, name: str) -> str:
        return str(self._f[name].dtype)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._f[name][start:stop])

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()
