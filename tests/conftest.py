"""Shared fixtures. Tests that need ../shared/data skip with a clear reason when it is absent."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the shared real test data (../shared/data beside the repo)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared test data not found at {SHARED_DATA} (clone the repo beside ../shared)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def wsi_dir(shared_data: Path) -> Path:
    return shared_data / "wsi"


@pytest.fixture(autouse=True)
def _quiet_third_party_logs() -> None:
    for name in ("PIL", "tifffile", "numcodecs", "zarr", "asyncio"):
        logging.getLogger(name).setLevel(logging.WARNING)


def in_ci() -> bool:
    """True under a CI runner (`CI=true`, set by GitHub Actions, GitLab CI and `.ci/run` users)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail_in_ci(reason: str) -> None:
    """Skip the test locally; under CI fail it, so a broken prerequisite cannot pass as a skip.

    Use it only where CI provides the prerequisite (e.g. Slurm, which `.ci/run` installs).
    """
    if in_ci():
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)
