"""Typed errors. Each subclasses `WsiPipeError` and the matching builtin, so callers may catch either.

Messages name the slide (or file) and the fix.
"""

from __future__ import annotations


class WsiPipeError(Exception):
    """Base class of every error wsi-pipe raises on purpose."""


class SlideReadError(WsiPipeError, OSError):
    """A slide could not be opened or read (corrupt, truncated, not a slide, vanished)."""


class MissingMppError(WsiPipeError, ValueError):
    """A slide has no usable microns-per-pixel metadata and no override was given."""


class StoreSchemaError(WsiPipeError, ValueError):
    """A store is missing, incomplete, or written by an incompatible schema version."""


class ConfigError(WsiPipeError, ValueError):
    """A config, manifest or command-line value is invalid."""


class KernelUnavailableError(WsiPipeError, RuntimeError):
    """An optional compiled kernel (mamba-ssm, causal-conv1d) was requested but cannot be used."""


class CheckpointError(WsiPipeError, ValueError):
    """A model checkpoint is missing, truncated, foreign or inconsistent."""


class EmptyInputError(WsiPipeError, ValueError):
    """There is nothing to process (no slides found, no tiles, no features)."""


class WsiPipeWarning(UserWarning):
    """Warnings wsi-pipe emits on purpose (turned into errors in the test suite)."""
