"""`RunLayout`: every artifact path of a run folder. Nothing else builds paths.

RUN_DIR/
  config/<stage>.yaml              resolved config of each stage (hash in the first line)
  slides.json                      the run's slide table (id, path, mpp, backend, patient, label)
  tiles/mpp<M>/<slide>.h5|.zarr    coordinate store of one grid (CLAM/TRIDENT-readable)
  tissue/<slide>.geojson           tissue polygons, level-0 px (QuPath opens them)
  qc/<slide>.png                   thumbnail with tissue, holes and kept tiles drawn
  features/<set>/mpp<M>/<slide>.h5|.zarr   feature stores (same rows as coords)
  features/<set>/clam/mpp<M>/{h5_files,pt_files,patches}/ optional CLAM-layout export
  models/                          encoders (ssmamba.pt) and MIL runs
  mil/<name>/                      splits, fold checkpoints, metrics, predictions
  heatmaps/<name>/                 attention heatmaps and top-k tiles
  anomaly/<name>/                  anomaly model (model.pt + config), per-tile score stores,
                                   heatmaps, top-k tiles, slide_scores.csv, metrics.json
  report.html, report_files/       the run report (`wsi-pipe report`) and its images
  state/<stage>/<slide>.json       per-slide state: status, attempts, error, timings
  locks/<stage>/<slide>.lock       per-slide lock (host, pid, time)
  slurm/                           rendered sbatch scripts and their logs
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STORE_SUFFIX = {"h5": ".h5", "zarr": ".zarr"}
#: file that marks a folder as a wsi-pipe run (written by `wsi-pipe tile`); commands started
#: inside a run find it upwards, the way git finds its repository
RUN_MARKER = ".wsi-pipe-run"
#: file name of the encoder checkpoint `wsi-pipe pretrain` writes under models/
ENCODER_CHECKPOINT = "ssmamba.pt"


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
    @property
    def marker(self) -> Path:
        """`RUN_MARKER`: its presence makes this folder a run that `find_run_dir` finds."""
        return self.root / RUN_MARKER

    @property
    def config_root(self) -> Path:
        """config/: the resolved config of every stage (and of each feature set)."""
        return self.root / "config"

    def config(self, stage: str) -> Path:
        return self.config_root / f"{stage}.yaml"

    def extract_config(self, feature_set: str) -> Path:
        """Resolved extract config of one feature set (each set keeps its own record)."""
        return self.config_root / "extract" / f"{feature_set}.yaml"

    @property
    def slides_table(self) -> Path:
        return self.root / "slides.json"

    # ---- tile stage
    @property
    def tiles_root(self) -> Path:
        return self.root / "tiles"

    def tiles_dir(self, mpp: float) -> Path:
        return self.tiles_root / mpp_tag(mpp)

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
        return sorted(
            parse_mpp_tag(p.name) for p in d.iterdir() if p.is_dir() and p.name.startswith("mpp")
        )

    def tissue_geojson(self, slide_id: str) -> Path:
        return self.root / "tissue" / f"{slide_id}.geojson"

    @property
    def qc_dir(self) -> Path:
        return self.root / "qc"

    def qc_png(self, slide_id: str) -> Path:
        return self.qc_dir / f"{slide_id}.png"

    # ---- features
    def feature_set_dir(self, feature_set: str) -> Path:
        return self.root / "features" / feature_set

    def features_dir(self, feature_set: str, mpp: float) -> Path:
        return self.feature_set_dir(feature_set) / mpp_tag(mpp)

    def feature_store(self, feature_set: str, slide_id: str, mpp: float, backend: str) -> Path:
        return self.features_dir(feature_set, mpp) / f"{slide_id}{STORE_SUFFIX[backend]}"

    def find_feature_store(self, feature_set: str, slide_id: str, mpp: float) -> Path | None:
        for suffix in STORE_SUFFIX.values():
            p = self.features_dir(feature_set, mpp) / f"{slide_id}{suffix}"
            if p.exists():
                return p
        return None

    @property
    def features_root(self) -> Path:
        return self.root / "features"

    def feature_sets(self) -> list[str]:
        d = self.features_root
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.exists() else []

    def clam_export_dir(self, feature_set: str, mpp: float) -> Path:
        return self.root / "features" / feature_set / "clam" / mpp_tag(mpp)

    def clam_export_h5(self, feature_set: str, slide_id: str, mpp: float) -> Path:
        """CLAM's `h5_files/<slide>.h5`: features + coords with CLAM-correct attributes."""
        return self.clam_export_dir(feature_set, mpp) / "h5_files" / f"{slide_id}.h5"

    def clam_export_pt(self, feature_set: str, slide_id: str, mpp: float) -> Path:
        """CLAM's `pt_files/<slide>.pt`: the features tensor alone."""
        return self.clam_export_dir(feature_set, mpp) / "pt_files" / f"{slide_id}.pt"

    def clam_export_patches(self, feature_set: str, slide_id: str, mpp: float) -> Path:
        """CLAM's coords-only `patches/<slide>.h5` (what CLAM's own extractor reads)."""
        return self.clam_export_dir(feature_set, mpp) / "patches" / f"{slide_id}.h5"

    # ---- models, MIL, heatmaps
    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def encoder_checkpoint(self) -> Path:
        """Default output of `wsi-pipe pretrain`: models/ssmamba.pt."""
        return self.models_dir / ENCODER_CHECKPOINT

    @property
    def mil_root(self) -> Path:
        return self.root / "mil"

    def mil_dir(self, name: str) -> Path:
        return self.mil_root / name

    def mil_run(self, name: str) -> MilRunPaths:
        """The files of one train-mil output folder (RUN/mil/<name>)."""
        return MilRunPaths(self.mil_dir(name))

    def mil_runs(self) -> list[MilRunPaths]:
        """Finished train-mil runs of this run folder (those with metrics.json), by name."""
        if not self.mil_root.is_dir():
            return []
        runs = (MilRunPaths(d) for d in sorted(self.mil_root.iterdir()) if d.is_dir())
        return [r for r in runs if r.metrics.is_file()]

    @property
    def heatmaps_root(self) -> Path:
        return self.root / "heatmaps"

    def heatmap_dir(self, name: str) -> Path:
        return self.heatmaps_root / name

    def heatmap_png(self, name: str, slide_id: str) -> Path:
        """Attention colour map over the slide thumbnail, with its legend and colour bar."""
        return self.heatmap_dir(name) / f"{slide_id}.png"

    def heatmap_attention_csv(self, name: str, slide_id: str) -> Path:
        """Per-tile attention: x, y (level-0 px), attention, rank."""
        return self.heatmap_dir(name) / f"{slide_id}_attention.csv"

    def heatmap_top_tiles_dir(self, name: str, slide_id: str) -> Path:
        """The k most attended tiles, `rank<r>_x<x>_y<y>.png`."""
        return self.heatmap_dir(name) / f"{slide_id}_top"

    # ---- anomaly (`wsi-pipe anomaly fit|score`)
    @property
    def anomaly_root(self) -> Path:
        return self.root / "anomaly"

    def anomaly_dir(self, name: str) -> Path:
        return self.anomaly_root / name

    def anomaly_model(self, name: str) -> Path:
        """Checkpoint of one fitted anomaly model (weights + config + provenance)."""
        return self.anomaly_dir(name) / "model.pt"

    def anomaly_fit_resume(self, name: str) -> Path:
        """Training checkpoint of an unfinished `anomaly fit` (removed once model.pt exists)."""
        return self.anomaly_dir(name) / "model.resume.pt"

    def anomaly_config(self, name: str) -> Path:
        return self.anomaly_dir(name) / "config.yaml"

    def anomaly_scores_dir(self, name: str, mpp: float) -> Path:
        return self.anomaly_dir(name) / "scores" / mpp_tag(mpp)

    def anomaly_score_store(self, name: str, slide_id: str, mpp: float, backend: str) -> Path:
        """Per-tile anomaly scores of one slide and grid (same rows as its coords store)."""
        return self.anomaly_scores_dir(name, mpp) / f"{slide_id}{STORE_SUFFIX[backend]}"

    def find_anomaly_score_store(self, name: str, slide_id: str, mpp: float) -> Path | None:
        for suffix in STORE_SUFFIX.values():
            p = self.anomaly_scores_dir(name, mpp) / f"{slide_id}{suffix}"
            if p.exists():
                return p
        return None

    def anomaly_heatmap(self, name: str, slide_id: str) -> Path:
        return self.anomaly_dir(name) / "heatmaps" / f"{slide_id}.png"

    def anomaly_top_tiles_dir(self, name: str, slide_id: str) -> Path:
        return self.anomaly_dir(name) / "top_tiles" / slide_id

    def anomaly_slide_scores(self, name: str) -> Path:
        return self.anomaly_dir(name) / "slide_scores.csv"

    def anomaly_metrics(self, name: str) -> Path:
        return self.anomaly_dir(name) / "metrics.json"

    def anomaly_models(self) -> list[str]:
        """Names of the fitted anomaly models, oldest first (by checkpoint mtime)."""
        if not self.anomaly_root.exists():
            return []
        fitted = [d for d in self.anomaly_root.iterdir() if (d / "model.pt").exists()]
        return [d.name for d in sorted(fitted, key=lambda d: (d / "model.pt").stat().st_mtime)]

    # ---- report (`wsi-pipe report`)
    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_assets_dir(self) -> Path:
        """Images the report links to (beside report.html, so the folder can be zipped)."""
        return self.root / "report_files"

    # ---- runner bookkeeping
    def state_file(self, stage: str, slide_id: str) -> Path:
        return self.state_dir(stage) / f"{slide_id}.json"

    def state_dir(self, stage: str) -> Path:
        return self.state_root / stage

    def lock_file(self, stage: str, slide_id: str) -> Path:
        return self.lock_dir(stage) / f"{slide_id}.lock"

    def lock_dir(self, stage: str) -> Path:
        return self.locks_root / stage

    def has_outputs(self) -> bool:
        """True when any stage has written here (the marker, the slide table or an output root)."""
        roots = (self.marker, self.slides_table, self.state_root, self.tiles_root, self.models_dir,
                 self.mil_root, self.config_root, self.anomaly_root, self.qc_dir)  # fmt: skip
        return any(p.exists() for p in roots)

    @property
    def state_root(self) -> Path:
        return self.root / "state"

    @property
    def locks_root(self) -> Path:
        return self.root / "locks"

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


@dataclass(frozen=True)
class MilRunPaths:
    """Files of one train-mil output folder (RUN/mil/<name>, or any folder `--model` names)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def model_json(self) -> Path:
        """method, feature set, mpp, classes, input dim, fold count, config hash."""
        return self.root / "model.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def predictions(self) -> Path:
        """Out-of-fold predictions, one row per slide."""
        return self.root / "predictions.csv"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    def fold_dir(self, k: int) -> Path:
        return self.root / f"fold_{k}"

    def fold_model(self, k: int) -> Path:
        return self.fold_dir(k) / "model.pt"

    def fold_record(self, k: int) -> Path:
        """Fold k's test predictions, metrics and history (its resume marker)."""
        return self.fold_dir(k) / "fold.json"

    def fold_models(self) -> list[Path]:
        """Existing fold checkpoints in fold order."""
        found = self.root.glob("fold_*/model.pt")
        return sorted(found, key=lambda p: int(p.parent.name.split("_")[1]))

    @property
    def inference_predictions(self) -> Path:
        """Default output of `wsi-pipe predict` with this model."""
        return self.root / "inference" / "predictions.csv"


@dataclass(frozen=True)
class EncoderSideFiles:
    """Files `wsi-pipe pretrain` writes beside an encoder checkpoint `<stem>.pt` (which may live
    outside a run, `--out`): the resume state `<name>.state.pt` (removed when training ends), the
    loss curve `<stem>.loss.csv` and the summary `<stem>.pretrain.json`."""

    state: Path
    loss_csv: Path
    summary: Path

    #: suffix of the summary file, for finding the summaries in a folder
    SUMMARY_SUFFIX = ".pretrain.json"

    @classmethod
    def of(cls, checkpoint: str | Path) -> EncoderSideFiles:
        out = Path(checkpoint)
        return cls(
            state=out.with_name(out.name + ".state.pt"),
            loss_csv=out.with_name(out.stem + ".loss.csv"),
            summary=out.with_name(out.stem + cls.SUMMARY_SUFFIX),
        )

    @classmethod
    def from_summary(cls, summary: str | Path) -> EncoderSideFiles:
        """The side files of the checkpoint whose summary is `summary`."""
        s = Path(summary)
        return cls.of(s.with_name(s.name[: -len(cls.SUMMARY_SUFFIX)] + ".pt"))


def find_run_dir(start: str | Path | None = None) -> Path:
    """The run folder holding `start` (default: the current directory), searched upwards.

    A folder is a run when it holds `RUN_MARKER` or the slide table `slides.json` (runs tiled
    before the marker existed). Raises `ConfigError` naming the fix when none is found.
    """
    from wsi_pipe.core.errors import ConfigError

    here = Path.cwd() if start is None else Path(start)
    here = here.resolve()
    for d in (here, *here.parents):
        lay = RunLayout(d)
        if lay.marker.is_file() or lay.slides_table.is_file():
            return d
    raise ConfigError(
        f"no wsi-pipe run folder in {here} or above it: give RUN_DIR, or run `wsi-pipe tile SLIDES` "
        "in this folder first (it makes the folder a run)"
    )
