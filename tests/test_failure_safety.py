"""Failure safety across the pipeline, with real processes, real slides and real kernel errors.

- kill -9 at a random (seeded) moment in each stage, rerun -> outputs identical to an
  uninterrupted run, and never a partial file under a final name;
- corrupt, truncated, unreadable and vanished slides -> recorded failed with the reason, the
  batch goes on, the exit code and `wsi-pipe status` say so;
- a full disk (a tiny tmpfs; RLIMIT_FSIZE where mounting is not allowed) -> same;
- a malformed config or manifest -> a clear error before any work starts;
- two runs on one run folder at once -> no double work, no corruption.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from run_compare import (
    assert_final_files_complete,
    assert_same_outputs,
    final_files,
    leftover_temps,
)

from wsi_pipe.core.config import (
    ExtractConfig,
    MilConfig,
    PretrainConfig,
    RunConfig,
    TileConfig,
)
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.runner import read_state

REPO = Path(__file__).resolve().parents[1]
TILE_ARGS = ("--mpp", "1.0", "--tile-px", "64")
TILE_OUT = ("tiles", "tissue", "qc")


#: one torch thread everywhere: training results depend on the order of float reductions (so on
#: the thread count), and oversubscribed OpenMP threads crawl on a busy 2-core machine
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """Run `wsi-pipe ARGS` in a fresh interpreter (as a user or a Slurm task would)."""
    return subprocess.run(
        [sys.executable, "-m", "wsi_pipe.cli.app", "-q", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env=ENV,
        **kw,
    )


def start_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "wsi_pipe.cli.app", "-q", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory, wsi_dir: Path) -> Path:
    """Four real slides of three formats (Aperio SVS, generic TIFF with an mpp override, OME)."""
    d = tmp_path_factory.mktemp("manifest")
    rows = [
        ("bracs", wsi_dir / "BRACS_1640_N_3_cropped.tiff", "0.25"),
        ("cmu", wsi_dir / "CMU-1-Small-Region.svs", ""),
        ("os1", wsi_dir / "OS-1-detail_HE.ome.tif", ""),
        ("os2", wsi_dir / "OS-2-ndpi-crop_Ki67.ome.tif", ""),
    ]
    for _, p, _ in rows:
        if not p.exists():
            pytest.skip(f"test slide {p} is missing")
    text = "slide_id,path,patient_id,label,mpp\n" + "".join(
        f"{sid},{p},{sid},{'a' if i % 2 else 'b'},{mpp}\n" for i, (sid, p, mpp) in enumerate(rows)
    )
    (d / "slides.csv").write_text(text)
    return d / "slides.csv"


def kill_at_random_moment(
    args: tuple[str, ...], started: Path, rng: random.Random, max_delay_s: float
) -> int:
    """Start `wsi-pipe ARGS`, wait until `started` exists (the stage is working), then SIGKILL
    it after a random delay. Returns the exit status (-9 if it was killed in time)."""
    p = start_cli(*args)
    deadline = time.monotonic() + 60
    while not started.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, max_delay_s))
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    return p.returncode


# ---------------------------------------------------------------------------------- kill -9
STAGE_OUT = {
    "tile": list(TILE_OUT),
    "pretrain": ["models"],
    "extract": ["features"],
    "train-mil": ["mil"],
}
#: what to delete from a copy of the reference run so that one stage has to run again
STAGE_REMOVE = {
    "pretrain": ["models"],
    "extract": ["features", "state/extract", "locks/extract"],
    "train-mil": ["mil"],
}


def _pipeline_config(manifest: Path, out: Path) -> RunConfig:
    return RunConfig(
        slides=(str(manifest),),
        manifest=str(manifest),
        out=str(out),
        tile=TileConfig(target_mpps=(1.0,), tile_px=64),
        pretrain=PretrainConfig(
            arch="ssmamba_tiny",
            input_px=64,
            epochs=2,
            steps_per_epoch=10,
            max_tiles=256,
            batch_size=16,
            lr=1e-3,
            warmup_steps=2,
            checkpoint_every=3,
            workers=0,
            device="cpu",
            seed=0,
        ),
        extract=ExtractConfig(
            encoder="pretrained", device="cpu", batch_size=16, workers=0, threads=1
        ),
        mil=MilConfig(
            method="abmil",
            n_folds=2,
            epochs=6,
            patience=6,
            hidden_dim=16,
            bootstrap=0,
            device="cpu",
        ),
    )


@pytest.fixture(scope="module")
def pipeline_reference(tmp_path_factory: pytest.TempPathFactory, manifest: Path) -> Path:
    """An uninterrupted run of every stage (in this process)."""
    import torch

    from wsi_pipe.runner.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("pipe_ref") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the OMP_NUM_THREADS=1 subprocesses it is compared with
    try:
        res = run_pipeline(_pipeline_config(manifest, out), progress=False, heatmap_slides=0)
    finally:
        torch.set_num_threads(threads)
    assert res.ok, [(s.name, s.details) for s in res.stages]
    return out


def _started_marker(stage: str, run: Path) -> Path:
    """A path that appears once `stage` is busy (then the kill lands mid-work)."""
    return {
        "tile": run / "state" / "tile",
        "pretrain": run / "models" / "ssmamba.pt.state.pt",  # first checkpoint written
        "extract": run / "state" / "extract" / "ssmamba",
        "train-mil": run / "mil" / "abmil_ssmamba" / "splits.json",
    }[stage]


@pytest.mark.parametrize(
    "stage",
    [
        "tile",
        "pretrain",
        "extract",
        "train-mil",
    ],
)
def test_kill9_stage_then_rerun_identical(
    tmp_path: Path, manifest: Path, pipeline_reference: Path, stage: str
) -> None:
    """A stage killed (SIGKILL) at a random moment, then resumed -> the uninterrupted outputs."""
    from wsi_pipe.core.config import dump_config

    rng = random.Random(f"kill-{stage}")
    run = tmp_path / "run"
    if stage != "tile":  # the earlier stages' outputs, exactly as the reference made them
        shutil.copytree(pipeline_reference, run)
        for rel in STAGE_REMOVE[stage]:
            shutil.rmtree(run / rel, ignore_errors=True)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(dump_config(_pipeline_config(manifest, run)))
    args = ("run", "--config", str(cfg_path), "--only", stage)
    rc = kill_at_random_moment(args, _started_marker(stage, run), rng, max_delay_s=0.6)
    assert rc == -signal.SIGKILL, f"{stage} finished before the kill: the test did not test"
    assert_final_files_complete(run, STAGE_OUT[stage])  # nothing partial under a final name
    r = cli(*args)
    assert r.returncode == 0, (stage, r.stdout[-3000:], r.stderr[-3000:])
    # a feature store's config_hash covers the encoder's path, which lies in each run folder;
    # its features_key (encoder weights, precision, coords) must match
    ignore = ("config_hash",) if stage == "extract" else ()
    assert assert_same_outputs(pipeline_reference, run, STAGE_OUT[stage], ignore) >= 1
    assert not list((run / "locks").rglob("*.lock"))  # the killed holder's locks were taken over


# -------------------------------------------------------------------------- broken slides
def test_corrupt_truncated_unreadable_vanished_slides(tmp_path: Path, wsi_dir: Path) -> None:
    good = wsi_dir / "OS-1-detail_HE.ome.tif"
    svs = (wsi_dir / "CMU-1-Small-Region.svs").read_bytes()
    ome = (wsi_dir / "OS-2-ndpi-crop_Ki67.ome.tif").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "truncated.svs").write_bytes(svs[: len(svs) // 3])
    (bad / "truncated.ome.tif").write_bytes(ome[: len(ome) // 4])
    (bad / "garbage.svs").write_bytes(random.Random(0).randbytes(40_000))
    (bad / "empty.svs").write_bytes(b"")
    (bad / "folder.svs").mkdir()  # not a file at all: cannot be read as a slide
    rows = [
        ("good", good),
        ("trunc_svs", bad / "truncated.svs"),
        ("trunc_ome", bad / "truncated.ome.tif"),
        ("garbage", bad / "garbage.svs"),
        ("empty", bad / "empty.svs"),
        ("folder", bad / "folder.svs"),
        ("vanished", bad / "was-here.svs"),
    ]
    man = tmp_path / "m.csv"
    man.write_text("slide_id,path\n" + "".join(f"{s},{p}\n" for s, p in rows))
    run = tmp_path / "run"
    r = cli("tile", str(man), "--out", str(run), *TILE_ARGS)
    assert r.returncode == 1, (r.stdout, r.stderr)  # some slides failed, the batch finished
    layout = RunLayout(run)
    assert read_state(layout, "tile", "good")["status"] == "done"
    assert layout.coords_store("good", 1.0, "h5").exists()
    for sid, _ in rows[1:]:
        st = read_state(layout, "tile", sid)
        assert st["status"] == "failed", sid
        assert sid in st["error"] and "SlideReadError" in st["error"], st["error"]
        assert not layout.coords_store(sid, 1.0, "h5").exists()
    assert "does not exist" in read_state(layout, "tile", "vanished")["error"]
    assert "truncated" in read_state(layout, "tile", "trunc_svs")["error"]
    s = cli("status", str(run))
    assert s.returncode == 1
    assert "tile" in s.stdout and "trunc_svs" in s.stdout and "vanished" in s.stdout
    # the rerun retries only the failed ones (attempts 2) and skips the good slide
    r2 = cli("tile", str(man), "--out", str(run), *TILE_ARGS)
    assert r2.returncode == 1
    assert read_state(layout, "tile", "good")["attempts"] == 1
    assert read_state(layout, "tile", "garbage")["attempts"] == 2


# ------------------------------------------------------------------------------ full disk
@contextlib.contextmanager
def full_disk(path: Path, free_bytes: int) -> Iterator[str]:
    """Make writes under `path` fail: a 64 KiB tmpfs mounted there, filled up to `free_bytes`
    (ENOSPC). Yields "tmpfs"; yields "rlimit" when mounting is not allowed (then the caller caps
    the child's file size instead, EFBIG)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        yield "rlimit"
        return
    try:
        ballast = path / "ballast"
        with contextlib.suppress(OSError), open(ballast, "wb", buffering=0) as fh:
            while True:
                fh.write(b"\0" * 4096)
        if free_bytes:
            os.truncate(ballast, max(0, ballast.stat().st_size - free_bytes))
        yield "tmpfs"
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _limit_file_size() -> None:
    # files above 4 KiB cannot be written (EFBIG instead of a SIGXFSZ kill): stores, PNGs fail,
    # the small state JSON files still fit
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@pytest.mark.parametrize(
    "store, free_bytes",
    [
        ("h5", 0),  # completely full: even creating the store fails
        ("h5", 8192),
        ("zarr", 8192),  # a few KiB left: the store is created, a later write fails
    ],
)
def test_full_disk_recorded_and_batch_goes_on(
    tmp_path: Path, manifest: Path, pipeline_reference: Path, store: str, free_bytes: int
) -> None:
    run = tmp_path / "run"
    layout = RunLayout(run)
    args = ("tile", str(manifest), "--out", str(run), *TILE_ARGS, "--store", store)
    with full_disk(layout.tiles_dir(1.0), free_bytes) as how:
        if how == "tmpfs":
            r = cli(*args)
            reason = "No space left on device"
        else:
            r = subprocess.run(
                [sys.executable, "-m", "wsi_pipe.cli.app", "-q", *args],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
                env=ENV,
                preexec_fn=_limit_file_size,
            )
            reason = "File too large"
        assert r.returncode == 1, (how, r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        for sid in ("bracs", "cmu", "os1", "os2"):  # every slide was tried and recorded
            st = read_state(layout, "tile", sid)
            assert st["status"] == "failed" and reason in st["error"], (how, st)
        assert not leftover_temps(layout.tiles_dir(1.0))  # the failed writes cleaned up
        assert not [p for p in final_files(run, ["tiles"]).values() if p.name != "ballast"]
        s = cli("status", str(run))
        assert s.returncode == 1 and reason in " ".join(s.stdout.split()), s.stdout
    # space again: the rerun finishes every slide (identical to a run that never failed)
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert read_state(layout, "tile", "cmu")["attempts"] == 2
    if store == "h5":
        assert assert_same_outputs(pipeline_reference, run, TILE_OUT) == 4 * 3
    else:
        assert assert_final_files_complete(run, TILE_OUT) == 4 * 3


# ------------------------------------------------------------------ malformed config/manifest
@pytest.mark.parametrize(
    "body, expect",
    [
        ("slides: [SLIDES]\nout: OUT\ntiles: {tile_px: 64}\n", "tiles"),  # unknown key (typo)
        ("slides: [SLIDES]\nout: OUT\ntile: {tile_px: -3}\n", "tile.tile_px"),  # out of range
        ("slides: [SLIDES]\nout: OUT\ntile: {target_mpps: [0.5\n", "not valid YAML"),
        ("out: OUT\n", "slides"),  # required key missing
        ("slides: [NOWHERE]\nout: OUT\n", "does not exist"),
        ("slides: [SLIDES]\nout: OUT\nextract: {encoder: tiny}\nmil: {epochs: 1}\n", "manifest"),
    ],
)
def test_malformed_run_config_fails_before_work(
    tmp_path: Path, wsi_dir: Path, body: str, expect: str
) -> None:
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        body.replace("SLIDES", str(wsi_dir / "OS-1-detail_HE.ome.tif"))
        .replace("NOWHERE", str(tmp_path / "nowhere"))
        .replace("OUT", str(out))
    )
    r = cli("run", "--config", str(cfg))
    assert r.returncode == 2, (r.stdout, r.stderr)
    msg = " ".join(r.stderr.split())
    assert "error:" in msg and expect in msg and "Traceback" not in r.stderr, msg
    assert not out.exists()  # nothing started


@pytest.mark.parametrize(
    "text, expect, where",
    [
        # what is wrong, and where: the manifest file (and row), or the two files sharing an id
        ("name,file\na,b.svs\n", "needs a header", ("{man}",)),
        (
            "slide_id,path,mpp\na,{slide},fast\n",
            "mpp 'fast' is not a number",
            ("{man}", "row 2 (a)"),
        ),
        ("slide_id,path,mpp\na,{slide},-1\n", "mpp must be > 0, got -1", ("{man}", "row 2 (a)")),
        (
            "slide_id,path\na,{slide}\na,{other}\n",
            "slide id 'a' is used by both",
            ("{slide}", "{other}"),
        ),
    ],
)
def test_malformed_manifest_fails_before_work(
    tmp_path: Path, wsi_dir: Path, text: str, expect: str, where: tuple[str, ...]
) -> None:
    man = tmp_path / "m.csv"
    names = {
        "man": man,
        "slide": wsi_dir / "OS-1-detail_HE.ome.tif",
        "other": wsi_dir / "OS-2-ndpi-crop_Ki67.ome.tif",
    }
    man.write_text(text.format(**names))
    out = tmp_path / "run"
    r = cli("tile", str(man), "--out", str(out), *TILE_ARGS)
    assert r.returncode == 2, (r.stdout, r.stderr)
    msg = " ".join(r.stderr.split())  # the console wraps long lines
    assert msg.startswith("error:") and "Traceback" not in r.stderr, msg
    assert expect in msg, msg
    # paths may be broken across wrapped lines: compare with all whitespace removed
    flat = "".join(r.stderr.split())
    for w in where:
        assert "".join(w.format(**names).split()) in flat, (w, msg)
    assert not out.exists()


# ------------------------------------------------------------------ two runs at once
def test_two_runs_same_folder_no_double_work(
    tmp_path: Path, manifest: Path, pipeline_reference: Path
) -> None:
    run = tmp_path / "run"
    args = ("tile", str(manifest), "--out", str(run), *TILE_ARGS)
    procs = [start_cli(*args) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    layout = RunLayout(run)
    for sid in ("bracs", "cmu", "os1", "os2"):
        st = read_state(layout, "tile", sid)
        assert st["status"] == "done" and st["attempts"] == 1, st  # processed exactly once
    assert assert_same_outputs(pipeline_reference, run, TILE_OUT) == 4 * 3
    assert not leftover_temps(run)
    json.loads(layout.slides_table.read_text())  # written by both, complete
