"""Per-slide runner (skip-if-done, locks, state JSON, catch-and-record, progress) and Slurm."""

from wsi_pipe.runner.loop import (
    BUSY,
    DONE,
    FAILED,
    PENDING,
    RUNNING,
    SKIPPED,
    RunSummary,
    SlideResult,
    read_state,
    run_slides,
    shard_from_env,
    shard_items,
    stage_status,
)

__all__ = [
    "BUSY",
    "DONE",
    "FAILED",
    "PENDING",
    "RUNNING",
    "SKIPPED",
    "RunSummary",
    "SlideResult",
    "read_state",
    "run_slides",
    "shard_from_env",
    "shard_items",
    "stage_status",
]
