"""`RunLayout`: every artifact path of a run folder. Nothing else builds paths.

    RUN_DIR/
      config/<stage>.yaml              resolved config of each stage (hash in the first line)
      slides.json                      the run's slide table (id, path, mpp, backend, patient, label)
      tiles/mpp<M>/<slide>.h5|.zarr    coordinate store of one grid (CLAM/TRIDENT-readable)
      tissue/<slide>.geojson           tissue polygons, level-0 px (QuPath opens them)
      qc/<slide>.png                   thumbnail with tissue, holes and kept tiles drawn
      features/<set>/mpp<M>/<slide>.h5|.zarr   feature stores (same rows as coords)
      features/<set>/clam/{h5_files,pt_files}/ optional CLAM-layout export
      models/                          encoders (ssmamba.pt) and MIL runs
      mil/<name>/                      splits, fold checkpoints, metrics, predictions
      heatmaps/<name>/                 attention heatmaps and top-k tiles
      state/<stage>/<slide>.json       per-slide state: status, attempts, error, timings
      locks/<stage>/<slide>.lock       per-slide lock (host, pid, time)
      slurm/                           rendered sbatch scripts and their logs
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STORE_SUFFIX = {"h5": ".h5", "zarr": ".zarr"}


def mpp_tag(mpp: float) -> str:
    """Folder tag of a grid: 0.5 -> 'mpp0.5', 0.263 -> 'mpp0.263' (exact, no rounding to 2)."""
    return f"mpp{float(mpp):g}"


def parse_mpp_tag(tag: str) -> float:
    """Inverse of `mpp_tag`."""
    if not tag.startswith("mpp"):
        raise ValueError(f"not an mpp tag: {tag!r}")
    return float(tag[3:])


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # ---- run-level files
    def config(self, stage: str) -> Path:
        return self.root / "config" / f"{stage}.yaml"

    @property
    def slides_table(self) -> Path:
        return self.root / "slides.json"

    # ---- tile stage
    def tiles_dir(self, mpp: float) -> Path:
        return self.root / "tiles" / mpp_tag(mpp)

    def coords_store(self, slide_id: str, mpp: float, backend: str) -> Path:
        return self.tiles_dir(mpp) / f"{slide_id}{STORE_SUFFIX[backend]}"

    def find_coords_store(self, slide_id: str, mpp: float) -> Path | None:
        """The existing coords store of a slide at one grid, whichever backend wrote it."""
        for suffix in STORE_SUFFIX.values():
            p = self.tiles_dir(mpp) / f"{slide_id}{suffix}"
            if p.exists():
                return p
        return None

    def tile_mpps(self) -> list[float]:
        """Grids present in this run (from the folder names under tiles/)."""
        d = self.root / "tiles"
        if not d.exists():
            return []
        return sorted(parse_mpp_tag(p.name) for p in d.iterdir() if p.is_dir() and p.name.startswith("mpp"))

    def tissue_geojson(self, slide_id: str) -> Path:
        return self.root / "tissue" / f"{slide_id}.geojson"

    def qc_png(self, slide_id: str) -> Path:
        return self.root / "qc" / f"{slide_id}.png"

    # ---- features
    def features_dir(self, feature_set: str, mpp: float) -> Path:
        return self.root / "features" / feature_set / mpp_tag(mpp)

    def feature_store(self, feature_set: str, slide_id: str, mpp: float, backend: str) -> Path:
        return self.features_dir(feature_set, mpp) / f"{slide_id}{STORE_SUFFIX[backend]}"

    def find_feature_store(self, feature_set: str, slide_id: str, mpp: float) -> Path | None:
        for suffix in STORE_SUFFIX.values():
            p = self.features_dir(feature_set, mpp) / f"{slide_id}{suffix}"
            if p.exists():
                return p
        return None

    def feature_sets(self) -> list[str]:
        d = self.root / "features"
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.exists() else []

    def clam_export_dir(self, feature_set: str, mpp: float) -> Path:
        return self.root / "features" / feature_set / "clam" / mpp_tag(mpp)

    # ---- models, MIL, heatmaps
    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def mil_dir(self, name: str) -> Path:
        return self.root / "mil" / name

    def heatmap_dir(self, name: str) -> Path:
        return self.root / "heatmaps" / name

    # ---- runner bookkeeping
    def state_file(self, stage: str, slide_id: str) -> Path:
        return self.root / "state" / stage / f"{slide_id}.json"

    def state_dir(self, stage: str) -> Path:
        return self.root / "state" / stage

    def lock_file(self, stage: str, slide_id: str) -> Path:
        return self.root / "locks" / stage / f"{slide_id}.lock"

    @property
    def slurm_dir(self) -> Path:
        return self.root / "slurm"

    def slurm_script(self, stage: str, stamp: str) -> Path:
        """A rendered sbatch script (kept, so a human can read and resubmit it)."""
        return self.slurm_dir / f"{stage}-{stamp}.sbatch"

    def slurm_log_pattern(self, stage: str, array: bool = True) -> Path:
        """sbatch --output pattern: one log per array task (%A job, %a task) or per job (%j)."""
        return self.slurm_dir / (f"{stage}-%A_%a.out" if array else f"{stage}-%j.out")

    def slurm_job_record(self, job_id: str) -> Path:
        """JSON record of one submitted job: stage, script, array size, dependency, time."""
        return self.slurm_dir / "jobs" / f"{job_id}.json"

    def slurm_stage_config(self, stage: str) -> Path:
        """The stage config a Slurm job of `submit all` reads (its own resolved copy is config/)."""
        return self.slurm_dir / f"{stage}.yaml"
