"""Coordinate and feature stores: one schema (`schema.py`), two backends (HDF5, zarr v3).

with create_store(final_path) as w:      # written to a temp sibling ...
    w.put("coords", coords, attrs)
    w.set_attrs({...})
# ... and renamed to final_path only here, after a clean exit

with open_store(path) as r:
    coords = r.read("coords")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipe.core.errors import StoreSchemaError
from wsi_pipe.core.fsutil import atomic_path
from wsi_pipe.store import schema
from wsi_pipe.store.base import StoreReader, StoreWriter

__all__ = [
    "StoreReader",
    "StoreWriter",
    "backend_of",
    "create_store",
    "open_store",
    "schema",
    "write_store",
]


def backend_of(path: str | Path) -> str:
    """'h5' or 'zarr' from a store path's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return "h5"
    if suffix == ".zarr":
        return "zarr"
    raise StoreSchemaError(f"{path}: unknown store type (expected a .h5 file or a .zarr folder)")


def _writer(path: Path, backend: str) -> StoreWriter:
    if backend == "h5":
        from wsi_pipe.store.h5 import H5Writer

        return H5Writer(path)
    from wsi_pipe.store.zarr_store import ZarrWriter

    return ZarrWriter(path)


@contextlib.contextmanager
def create_store(final_path: str | Path) -> Iterator[StoreWriter]:
    """Write a store atomically: visible under `final_path` only after the block exits cleanly.

    `schema_version` is set automatically; the caller sets `kind` and the other attributes.
    """
    final = Path(final_path)
    backend = backend_of(final)
    with atomic_path(final) as tmp:
        w = _writer(tmp, backend)
        try:
            w.set_attrs({"schema_version": schema.SCHEMA_VERSION})
            yield w
        finally:
            w.close()


def write_store(
    final_path: str | Path,
    arrays: dict[str, np.ndarray],
    attrs: dict[str, Any],
    array_attrs: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Write `arrays` and root `attrs` to a new store at `final_path`, atomically."""
    with create_store(final_path) as w:
        for name, data in arrays.items():
            w.put(name, np.asarray(data), (array_attrs or {}).get(name))
        w.set_attrs(attrs)


def open_store(path: str | Path, validate: bool = True) -> StoreReader:
    """Open a store of either backend for reading; by default check it follows the schema."""
    p = Path(path)
    if not p.exists():
        raise StoreSchemaError(f"store {p} does not exist: run the stage that writes it first")
    backend = backend_of(p)
    reader: StoreReader
    if backend == "h5":
        from wsi_pipe.store.h5 import H5Reader

        reader = H5Reader(p)
    else:
        from wsi_pipe.store.zarr_store import ZarrReader

        reader = ZarrReader(p)
    if validate:
        try:
            reader.validate()
        except BaseException:
            reader.close()
            raise
    return reader
