"""The commands as users type them, in a fresh folder: `wsi-pipe tile slides/`,
`wsi-pipe extract --encoder ssmamba.pt`, `wsi-pipe train-mil --method msm`.

The run folder defaults to the current folder for `tile` and is found upwards (like git finds
its repository) by the other commands; `train-mil` takes its labels from the manifest the run
was tiled from, or says to pass `--manifest` when that had none. Presets ship inside the package
and every YAML in configs/ loads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from wsi_pipe.cli.app import app
from wsi_pipe.cli.tile_cmd import preset_names, preset_path
from wsi_pipe.core.config import RunConfig, TileConfig, load_config
from wsi_pipe.core.errors import ConfigError
from wsi_pipe.core.layout import RunLayout, find_run_dir
from wsi_pipe.encoders import create_encoder, save_encoder
from wsi_pipe.synth import build_cohort

REPO = Path(__file__).resolve().parents[1]
N_SLIDES = 10  # 5 per class: the default 5 patient-level folds each hold both classes


def _cli(*args: str):
    res = CliRunner().invoke(app, ["-q", *args])
    return res.exit_code, res.output + (
        str(res.exception) if res.exception and res.exit_code not in (0, 1, 2) else ""
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A folder with slides/ (10 small synthetic slides + labelled manifest) and ssmamba.pt."""
    root = tmp_path_factory.mktemp("cohort")
    build_cohort(root / "slides", n_slides=N_SLIDES, size_px=2048, seed=3)
    save_encoder(create_encoder("ssmamba_tiny"), root / "ssmamba.pt")
    return root


def _fresh(tmp_path: Path, cohort: Path) -> Path:
    proj = tmp_path / "project"
    (proj / "slides").mkdir(parents=True)
    for f in (cohort / "slides").iterdir():
        (proj / "slides" / f.name).symlink_to(f)
    (proj / "ssmamba.pt").symlink_to(cohort / "ssmamba.pt")
    return proj


def test_three_commands_verbatim_from_a_slides_folder(tmp_path, cohort, monkeypatch):
    proj = _fresh(tmp_path, cohort)
    monkeypatch.chdir(proj)
    code, out = _cli("tile", "slides/")
    assert code == 0, out
    lay = RunLayout(proj)
    assert lay.marker.is_file() and lay.slides_table.is_file() and lay.tile_mpps() == [0.5]
    assert len(list(lay.tiles_dir(0.5).glob("*.h5"))) == N_SLIDES

    code, out = _cli("extract", "--encoder", "ssmamba.pt")
    assert code == 0, out
    assert len(list(lay.features_dir("ssmamba", 0.5).glob("*.h5"))) == N_SLIDES
    assert lay.extract_config("ssmamba").is_file()

    # tiled from a folder: no labels anywhere, so train-mil says what to pass
    code, out = _cli("train-mil", "--method", "msm")
    assert code == 2
    assert "--manifest" in out and "label" in out, out

    # from a subfolder of the run, with the labelled manifest given explicitly
    monkeypatch.chdir(proj / "slides")
    code, out = _cli("train-mil", "--method", "msm", "--manifest", "manifest.csv", "--epochs", "3")
    assert code == 0, out
    assert (lay.mil_dir("msm_ssmamba") / "metrics.json").is_file()


def test_three_commands_verbatim_with_a_labelled_manifest(tmp_path, cohort, monkeypatch):
    proj = _fresh(tmp_path, cohort)
    monkeypatch.chdir(proj)
    assert _cli("tile", "slides/manifest.csv")[0] == 0
    assert _cli("extract", "--encoder", "ssmamba.pt")[0] == 0
    code, out = _cli("train-mil", "--method", "msm")
    assert code == 0, out
    lay = RunLayout(proj)
    assert lay.mil_run("msm_ssmamba").metrics.is_file()
    preds = lay.mil_run("msm_ssmamba").predictions.read_text().splitlines()
    assert len(preds) == N_SLIDES + 1  # every labelled slide predicted out of fold once

    # the checkpoint where `wsi-pipe pretrain` puts it is found by its bare name too, and a
    # second feature set keeps its own config record beside the first's
    lay.models_dir.mkdir()
    (proj / "ssmamba.pt").rename(lay.encoder_checkpoint)
    assert _cli("extract", "--encoder", "ssmamba.pt", "--name", "second")[0] == 0
    first = yaml.safe_load(lay.extract_config("ssmamba").read_text())
    second = yaml.safe_load(lay.extract_config("second").read_text())
    assert first["name"] is None and second["name"] == "second"
    assert len(list(lay.features_dir("second", 0.5).glob("*.h5"))) == N_SLIDES


def test_find_run_dir_walks_up_and_says_what_to_do(tmp_path):
    run = tmp_path / "run"
    deep = run / "features" / "x"
    deep.mkdir(parents=True)
    with pytest.raises(ConfigError, match="wsi-pipe tile"):
        find_run_dir(deep)
    RunLayout(run).slides_table.write_text("[]")
    assert find_run_dir(deep) == run.resolve()
    other = tmp_path / "marked"
    other.mkdir()
    RunLayout(other).marker.write_text("")
    assert find_run_dir(other) == other.resolve()


def test_every_shipped_preset_and_every_config_file_loads():
    names = preset_names()
    assert {"biopsy", "resection"} <= set(names)
    for name in names:
        cfg = load_config(TileConfig, preset_path(name))
        assert isinstance(cfg, TileConfig)
    configs = sorted((REPO / "configs").glob("**/*.yaml"))
    assert configs, "configs/ holds no YAML"
    for path in configs:
        doc = yaml.safe_load(path.read_text())
        model = RunConfig if "slides" in doc else TileConfig
        load_config(model, path)


def test_unknown_preset_lists_the_known_ones(tmp_path):
    code, out = _cli("tile", str(tmp_path), "--out", str(tmp_path / "run"), "--preset", "nope")
    assert code == 2 and "biopsy" in out and "resection" in out
