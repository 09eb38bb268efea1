"""Integration test on a real single-node Slurm (scripts/slurm_local.sh starts and stops it).

`wsi-pipe submit all` runs tile -> extract (job arrays) -> train-mil (afterok chain) on real
slides; every task must be COMPLETED with exit 0 (scontrol + the per-task logs + state JSON) and
the outputs must equal a local run's. Resubmitting reruns only what is not done, and two arrays
of the same stage at once never process a slide twice.

Without Slurm installed these tests skip. With Slurm installed, a local cluster that does not
start skips them on a workstation but FAILS them under `CI=true` (`.ci/run` installs Slurm, so
there a skip would hide a broken cluster). Unit tests that need no cluster: test_slurm_unit.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import skip_or_fail_in_ci
from run_compare import assert_same_outputs

from wsi_pipe.core.layout import RunLayout
from wsi_pipe.runner import read_state
from wsi_pipe.runner import slurm as sl

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
SLIDES = ("bracs", "cmu", "os1", "os2")


def _cluster_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    return r.returncode == 0 and "UP" in r.stdout


@pytest.fixture(scope="module")
def cluster() -> None:
    """A running single-node Slurm; started here (and stopped after) unless it already ran."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.skip(
            "Slurm is not installed (apt-get install slurmctld slurmd slurm-client munge; "
            ".ci/run does)"
        )
    was_up = _cluster_up()
    if not was_up:
        env = {**os.environ, "SLURM_LOCAL_NO_INSTALL": "1"}
        r = subprocess.run(
            ["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=120, env=env
        )
        if r.returncode != 0:
            # under CI (.ci/run installed Slurm) a cluster that does not start fails the run
            skip_or_fail_in_ci(
                f"Slurm is installed but the local cluster did not start (exit "
                f"{r.returncode}): {r.stderr.strip()[-500:]}"
            )
    try:
        yield
    finally:
        if not was_up:
            subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, wsi_dir: Path) -> dict[str, Path]:
    """A labelled manifest of four real slides, a tiny encoder checkpoint and two run configs."""
    import torch

    from wsi_pipe.encoders import create_encoder, save_encoder

    d = tmp_path_factory.mktemp("slurm")
    rows = [
        ("bracs", wsi_dir / "BRACS_1640_N_3_cropped.tiff", "a", "0.25"),
        ("cmu", wsi_dir / "CMU-1-Small-Region.svs", "b", ""),
        ("os1", wsi_dir / "OS-1-detail_HE.ome.tif", "a", ""),
        ("os2", wsi_dir / "OS-2-ndpi-crop_Ki67.ome.tif", "b", ""),
    ]
    for _, p, _, _ in rows:
        if not p.exists():
            pytest.skip(f"test slide {p} is missing")
    man = d / "slides.csv"
    man.write_text(
        "slide_id,path,patient_id,label,mpp\n"
        + "".join(f"{s},{p},{s},{lab},{m}\n" for s, p, lab, m in rows)
    )
    torch.manual_seed(0)
    enc = d / "enc.pt"
    save_encoder(create_encoder("ssmamba_tiny"), enc, {"note": "random init, test encoder"})
    out = {"manifest": man, "encoder": enc}
    for name in ("local", "slurm"):
        cfg = {
            "slides": [str(man)],
            "manifest": str(man),
            "out": str(d / name),
            "tile": {"target_mpps": [1.0], "tile_px": 64},
            "extract": {
                "encoder": str(enc),
                "device": "cpu",
                "batch_size": 32,
                "workers": 0,
                "threads": 1,
            },
            "mil": {
                "method": "abmil",
                "n_folds": 2,
                "epochs": 2,
                "hidden_dim": 16,
                "bootstrap": 0,
                "device": "cpu",
            },
        }
        (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        out[name] = d / f"{name}.yaml"
        out[f"{name}_run"] = d / name
    return out


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsi_pipe.cli.app", "-q", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check_all_completed(layout: RunLayout, jobs: list[sl.SubmittedJob]) -> None:
    """Every task COMPLETED with exit 0 per `scontrol show job`, and its log says exit 0."""
    for j in jobs:
        states = sl.job_states(j.job_id)
        n = j.array_size or 1
        assert len(states) == n, (j, states)
        for t in states:
            assert t.state == "COMPLETED" and t.exit_code == 0, (j.stage, t)
            log = layout.slurm_dir / (
                f"{j.stage}-{j.job_id}_{t.task}.out"
                if j.array_size
                else f"{j.stage}-{j.job_id}.out"
            )
            assert "[wsi-pipe] exit 0" in log.read_text(), log


def test_submit_all_chain_equals_local_run(cluster: None, setup: dict[str, Path]) -> None:
    # the local reference run: `wsi-pipe run`, one thread per process like each Slurm task
    # (training results depend on the order of float reductions, i.e. on the thread count)
    ref = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsi_pipe.cli.app",
            "-q",
            "run",
            "--config",
            str(setup["local"]),
            "--only",
            "tile",
            "--only",
            "extract",
            "--only",
            "train-mil",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert ref.returncode == 0, (ref.stdout[-3000:], ref.stderr[-3000:])

    r = cli(
        "submit",
        "all",
        "--config",
        str(setup["slurm"]),
        "--slurm",
        "--array-size",
        "2",
        "--wait",
        "--wait-timeout",
        "240",
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    run = setup["slurm_run"]
    layout = RunLayout(run)
    jobs = sl.submitted_jobs(layout)
    assert [j.stage for j in jobs] == ["tile", "extract", "train-mil"]
    assert jobs[1].after_ok == (jobs[0].job_id,) and jobs[2].after_ok == (jobs[1].job_id,)
    assert f"train-mil: job {jobs[-1].job_id}" in " ".join(r.stdout.split())  # ids are printed
    _check_all_completed(layout, jobs)
    # the scripts are kept for humans: an array over the sorted slides, logs in the run folder
    tile_script = Path(jobs[0].script).read_text()
    assert "#SBATCH --array=0-1" in tile_script and str(layout.slurm_dir) in tile_script

    # each slide was processed once, by one of the two array tasks, and is recorded done
    task_jobs = set()
    for sid in SLIDES:
        for stage in ("tile", "extract/enc"):
            st = read_state(layout, stage, sid)
            assert st["status"] == "done" and st["attempts"] == 1, (stage, st)
            task_jobs.add((stage, st["job"]))
    assert len({j for s, j in task_jobs if s == "tile"}) == 2  # both tasks had work

    n = assert_same_outputs(setup["local_run"], run, ["tiles", "tissue", "qc", "features", "mil"])
    assert n >= 4 * 4 + 3  # stores, geojson, png per slide; features; MIL files

    s = cli("status", str(run))
    assert s.returncode == 0, s.stdout
    assert "extract/enc" in s.stdout and f"slurm job {jobs[0].job_id} tile" in s.stdout


def test_resubmit_reruns_only_missing_and_overlap_is_safe(
    cluster: None, setup: dict[str, Path]
) -> None:
    run = setup["slurm_run"]
    layout = RunLayout(run)
    if not layout.slides_table.exists():
        pytest.skip("needs the run of test_submit_all_chain_equals_local_run")
    before = {sid: read_state(layout, "tile", sid)["attempts"] for sid in SLIDES}
    for sid in ("cmu", "os2"):  # lose two slides' outputs
        layout.coords_store(sid, 1.0, "h5").unlink()
    args = (
        "submit",
        "tile",
        str(setup["manifest"]),
        "--out",
        str(run),
        "--mpp",
        "1.0",
        "--tile-px",
        "64",
        "--slurm",
        "--array-size",
        "2",
    )
    ids = []
    for _ in range(2):  # the same array submitted twice: the two overlap on the node
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        ids.append(r.stdout.strip().splitlines()[-1])
    states = sl.wait_for(ids, timeout_s=120)
    for tasks in states.values():
        assert tasks and all(t.ok for t in tasks), tasks
    for sid in SLIDES:
        st = read_state(layout, "tile", sid)
        expect = before[sid] + (1 if sid in ("cmu", "os2") else 0)
        assert st["status"] == "done" and st["attempts"] == expect, (sid, st)  # never twice
    assert_same_outputs(setup["local_run"], run, ["tiles"])
