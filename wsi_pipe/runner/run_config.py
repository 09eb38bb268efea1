"""One RunConfig YAML for every stage of a run: load it, check it, derive each stage's config.

`wsi-pipe run` (runner/pipeline.py), `wsi-pipe submit all` (runner/plan.py) and `wsi-pipe demo`
(runner/demo.py) share these steps, so a run behaves the same locally and on Slurm:

1. `load_run_config`: read the YAML (command-line overrides win), make every path absolute from
   the current directory (Slurm tasks and later stages see the same files), then
2. `check_run_config`: inputs exist, slide ids are unique, the manifest reads (with labels when
   MIL is on), `mil` has an `extract` section, a configured encoder file exists, all before any
   work starts. Errors are `ConfigError` / `EmptyInputError` naming the file and the key.
3. `encoder_source` / `mil_config`: the stage configs that depend on an earlier stage (extract
   uses the pretrained checkpoint when pretraining is on; train-mil reads the feature set that
   the run's extract makes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsi_pipe.core.config import MilConfig, RunConfig, load_config
from wsi_pipe.core.errors import CheckpointError, ConfigError
from wsi_pipe.core.layout import RunLayout

#: the stages of a run, in order (`wsi-pipe run --only` takes these names)
STAGES = ("tile", "pretrain", "extract", "train-mil", "heatmap")


def _abs(p: str) -> str:
    return str(Path(p).expanduser().resolve())


def load_run_config(path: str | Path | None, **overrides: Any) -> RunConfig:
    """Load a RunConfig and check everything that can be checked before work starts.

    Relative paths in the file are taken from the current directory (as on the command line) and
    made absolute, so Slurm tasks and later stages see the same files. Raises ConfigError /
    EmptyInputError naming the file and the key.
    """
    cfg = load_config(RunConfig, path, **overrides)
    cfg = cfg.model_copy(
        update={
            "slides": tuple(_abs(s) for s in cfg.slides),
            "out": _abs(cfg.out),
            "manifest": _abs(cfg.manifest) if cfg.manifest else None,
        }
    )
    check_run_config(cfg, where=str(path) if path else "command line")
    return cfg


def check_run_config(cfg: RunConfig, where: str = "config") -> None:
    """Inputs exist, the manifest is valid (with labels when MIL is on), stages are consistent."""
    from wsi_pipe.core.manifest import discover, read_manifest

    discover(list(cfg.slides))  # missing inputs, no slides, duplicate ids
    if cfg.mil is not None and cfg.extract is None:
        raise ConfigError(f"{where}: `mil` needs an `extract` section (MIL trains on features)")
    if cfg.mil is not None:
        if cfg.manifest is None:
            raise ConfigError(
                f"{where}: `mil` needs `manifest:` a CSV with slide_id, patient_id, label"
            )
        read_manifest(cfg.manifest, require_labels=True)
    elif cfg.manifest is not None:
        read_manifest(cfg.manifest)
    if cfg.extract is not None and cfg.pretrain is None:
        from wsi_pipe.encoders import resolve_encoder_source

        try:  # the rule extract follows (a checkpoint, or a name with local weights)
            resolve_encoder_source(cfg.extract.encoder, cfg.extract.weights, need_weights=True)
        except (ConfigError, CheckpointError) as e:
            raise ConfigError(f"{where}: extract.encoder: {e} (and no `pretrain`)") from None


def encoder_source(cfg: RunConfig) -> str | None:
    """The encoder extract uses: the pretrained checkpoint (`RunLayout.encoder_checkpoint`) when
    pretraining is on, else the configured one; None without an `extract` section."""
    if cfg.extract is None:
        return None
    if cfg.pretrain is not None:
        return str(RunLayout(cfg.out).encoder_checkpoint)
    return cfg.extract.encoder


def mil_config(cfg: RunConfig) -> MilConfig:
    """The MilConfig of the run, reading the feature set that the run's extract stage makes
    (unless `mil.features` names one). Needs a `mil` section."""
    from wsi_pipe.stages.extract import feature_set_name

    if cfg.mil is None:
        raise ConfigError("the run config has no `mil` section")
    if cfg.mil.features is not None or cfg.extract is None:
        return cfg.mil
    ecfg = cfg.extract.model_copy(update={"encoder": encoder_source(cfg)})
    return cfg.mil.model_copy(update={"features": feature_set_name(ecfg)})
