"""Backend-neutral store reader/writer interfaces."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipe.store import schema


class StoreWriter(abc.ABC):
    """Writes arrays and attributes into a store at a (temporary) path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @abc.abstractmethod
    def create_array(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: str | np.dtype,
        chunks: tuple[int, ...] | None = None,
    ) -> None:
        """Create array `name` (chunks default to the schema's)."""

    @abc.abstractmethod
    def write(self, name: str, start: int, block: np.ndarray) -> None:
        """Write rows `start : start + len(block)` of array `name`."""

    @abc.abstractmethod
    def set_attrs(self, attrs: dict[str, Any]) -> None:
        """Set root attributes (merged with existing)."""

    @abc.abstractmethod
    def set_array_attrs(self, name: str, attrs: dict[str, Any]) -> None:
        """Set attributes on array `name`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush everything to disk."""

    def put(self, name: str, data: np.ndarray, attrs: dict[str, Any] | None = None) -> None:
        """Create array `name` from `data` in one go."""
        self.create_array(name, data.shape, data.dtype)
        if len(data):
            self.write(name, 0, data)
        if attrs:
            self.set_array_attrs(name, attrs)


class StoreReader(abc.ABC):
    """Reads a store written by either backend. Use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    @abc.abstractmethod
    def names(self) -> list[str]: ...

    @property
    @abc.abstractmethod
    def attrs(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def array_attrs(self, name: str) -> dict[str, Any]: ...

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abc.abstractmethod
    def dtype(self, name: str) -> str: ...

    @abc.abstractmethod
    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray: ...

    def read(self, name: str) -> np.ndarray:
        """The whole array `name`."""
        return self.read_rows(name, 0, self.shape(name)[0])

    def __len__(self) -> int:
        return self.shape(schema.COORDS)[0]

    def validate(self) -> None:
        """Raise StoreSchemaError unless the content follows the schema."""
        names = self.names
        schema.validate(
            names,
            self.attrs,
            {n: self.shape(n) for n in names},
            {n: self.dtype(n) for n in names},
            str(self.path),
            {n: self.array_attrs(n) for n in names if n == schema.ANNOTATION_CLASS},
        )

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
