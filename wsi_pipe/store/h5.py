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
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._f = h5py.File(path, "w")

    def create_array(self, name: str, shape: tuple[int, ...], dtype: str | np.dtype,
                     chunks: tuple[int, ...] | None = None) -> None:
        chunks = chunks or schema.chunks_for(name, tuple(shape))
        self._f.create_dataset(
            name, shape=tuple(shape), dtype=np.dtype(dtype), chunks=chunks,
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
        if self._f.id.valid:
            self._f.flush()
            self._f.close()


class H5Reader(StoreReader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._f = h5py.File(path, "r")
        except OSError as e:
            raise StoreSchemaError(f"{path} is not a readable HDF5 store ({e}): re-run with --overwrite") from None

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
