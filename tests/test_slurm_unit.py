"""Unit tests of `wsi_pipe.runner.slurm` and `wsi_pipe.runner.plan` that need no cluster: script
rendering (and running the rendered script under bash with a stand-in interpreter),
`OMP_NUM_THREADS`, `parse_scontrol`, dependency options, `sbatch` calls through a fake `sbatch` on
PATH, array sizing, and `wsi-pipe submit` without `--slurm` (the stage command line parsed by the
stage itself, its run folder, extract's torch threads).

The integration tests on a real single-node cluster are in test_slurm.py.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import in_ci, skip_or_fail_in_ci

from wsi_pipe.core.layout import RunLayout
from wsi_pipe.runner import slurm as sl
from wsi_pipe.runner.loop import shard_from_env, shard_items

STAMP = "2026-01-01 00:00:00"


def _spec(**kw) -> sl.JobSpec:  # type: ignore[no-untyped-def]
    base = dict(stage="tile", argv=("tile", "slides dir/", "--out", "run"), array_size=5)
    return sl.JobSpec(**{**base, **kw})


def _sbatch_lines(script: str) -> list[str]:
    return [ln.removeprefix("#SBATCH ") for ln in script.splitlines() if ln.startswith("#SBATCH ")]


# --------------------------------------------------------------------------------- rendering
def test_render_array_script(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "run")
    res = sl.SlurmResources(
        partition="gpu",
        gres="gpu:1",
        cpus=4,
        mem="16G",
        time="04:00:00",
        account="lab",
        qos="normal",
        extra=("--exclusive",),
    )
    spec = _spec(max_parallel=2, resources=res, env={"FOO": "a b"})
    text = sl.render_script(
        spec, layout, python="/opt/py/bin/python", workdir=tmp_path, stamp=STAMP
    )
    assert text.startswith("#!/bin/bash\n") and text.endswith('exit "$rc"\n')
    assert "a job array of 5 task(s); task i processes shard i of 5" in text
    assert f"Written by wsi-pipe on {STAMP}" in text
    opts = _sbatch_lines(text)
    assert opts == [
        "--job-name=wsi-tile",
        f"--output={(layout.slurm_dir / 'tile-%A_%a.out').resolve()}",
        f"--chdir={tmp_path.resolve()}",
        "--array=0-4%2",
        "--partition=gpu",
        "--gres=gpu:1",
        "--cpus-per-task=4",
        "--mem=16G",
        "--time=04:00:00",
        "--account=lab",
        "--qos=normal",
        "--exclusive",
    ]
    # every #SBATCH line comes before the first command (sbatch stops reading at one)
    body = text.splitlines()
    first_cmd = next(i for i, ln in enumerate(body) if ln and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(body) if ln.startswith("#SBATCH"))
    # the command is quoted for the shell: the argument with a space stays one argument
    cmd_line = next(ln for ln in body if ln.startswith("/opt/py/bin/python"))
    assert shlex.split(cmd_line) == [
        "/opt/py/bin/python",
        "-m",
        "wsi_pipe.cli.app",
        "tile",
        "slides dir/",
        "--out",
        "run",
    ]
    assert "export FOO='a b'" in body
    assert sl.OMP_THREADS_LINE in body
    assert "if [" not in text  # no failure tolerance asked for


def test_render_single_job_and_defaults(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "run")
    spec = sl.JobSpec(
        "train-mil",
        ("train-mil", "run"),
        job_name="mine",
        resources=sl.SlurmResources(mem="", time=None),
    )
    text = sl.render_script(spec, layout, workdir=tmp_path, stamp=STAMP)
    opts = _sbatch_lines(text)
    assert "a single job." in text
    assert opts == [
        "--job-name=mine",
        f"--output={(layout.slurm_dir / 'train-mil-%j.out').resolve()}",
        f"--chdir={tmp_path.resolve()}",
    ]  # no --array, no empty --mem
    assert not any(o.startswith("--array") for o in opts)


def test_render_array_without_throttle(tmp_path: Path) -> None:
    text = sl.render_script(_spec(array_size=1), RunLayout(tmp_path), stamp=STAMP)
    assert "--array=0-0" in _sbatch_lines(text)


@pytest.mark.parametrize(
    "kw",
    [dict(array_size=0), dict(max_parallel=0), dict(stage="tile; rm -rf /"), dict(stage="a b")],
)
def test_jobspec_rejects_bad_values(kw: dict) -> None:
    with pytest.raises(ValueError):
        _spec(**kw)


def test_write_script_is_saved_executable(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "run")
    path = sl.write_script(_spec(), layout, stamp=STAMP)
    assert path.parent == layout.slurm_dir and path.suffix == ".sbatch"
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


# ------------------------------------------------------------- running the rendered script
def _fake_python(tmp_path: Path, exit_code: int = 0) -> Path:
    """A stand-in interpreter: prints OMP_NUM_THREADS and its arguments, exits `exit_code`."""
    exe = tmp_path / f"fake-python-{exit_code}"
    exe.write_text(
        f'#!/bin/bash\necho "OMP=${{OMP_NUM_THREADS:-unset}}"\necho "ARGS=$*"\nexit {exit_code}\n'
    )
    exe.chmod(0o755)
    return exe


def _run_rendered(
    tmp_path: Path, spec: sl.JobSpec, env: dict[str, str], exit_code: int = 0
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "job.sh"
    script.write_text(
        sl.render_script(
            spec,
            RunLayout(tmp_path / "run"),
            python=str(_fake_python(tmp_path, exit_code)),
            workdir=tmp_path,
            stamp=STAMP,
        )
    )
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "OMP_NUM_THREADS"
    }
    return subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=30, env={**clean, **env}
    )


@pytest.mark.parametrize(
    ("env", "expect"),
    [
        # sbatch exports the submitter's OMP_NUM_THREADS=16: the task's own CPUs win
        ({"OMP_NUM_THREADS": "16", "SLURM_CPUS_PER_TASK": "3", "SLURM_CPUS_ON_NODE": "8"}, "3"),
        ({"OMP_NUM_THREADS": "16", "SLURM_CPUS_ON_NODE": "2"}, "2"),  # no --cpus-per-task
        ({"OMP_NUM_THREADS": "16"}, "1"),  # outside any allocation: one thread, not 16
    ],
)
def test_rendered_script_sets_omp_threads_from_slurm(
    tmp_path: Path, env: dict[str, str], expect: str
) -> None:
    r = _run_rendered(tmp_path, _spec(), env)
    assert r.returncode == 0, r.stderr
    assert f"OMP={expect}" in r.stdout.splitlines()
    assert "ARGS=-m wsi_pipe.cli.app tile slides dir/ --out run" in r.stdout
    assert "[wsi-pipe] exit 0" in r.stdout


def test_rendered_script_explicit_env_overrides_omp(tmp_path: Path) -> None:
    spec = _spec(env={"OMP_NUM_THREADS": "7"})
    r = _run_rendered(tmp_path, spec, {"SLURM_CPUS_PER_TASK": "3"})
    assert "OMP=7" in r.stdout.splitlines()


@pytest.mark.parametrize(
    ("tolerate", "code", "expect"),
    [
        (False, 0, 0),
        (False, 1, 1),
        (False, 2, 2),
        (True, 1, 0),
        (True, 2, 2),
    ],
)
def test_rendered_script_exit_codes(tmp_path: Path, tolerate: bool, code: int, expect: int) -> None:
    r = _run_rendered(tmp_path, _spec(tolerate_slide_failures=tolerate), {}, exit_code=code)
    assert r.returncode == expect, (r.stdout, r.stderr)
    assert f"[wsi-pipe] exit {code}" in r.stdout


# ----------------------------------------------------------------------------- scontrol
SCONTROL = "\n".join(
    [
        # a finished single job
        "JobId=10 JobName=wsi-train-mil UserId=root(0) JobState=COMPLETED Reason=None "
        "Dependency=(null) ExitCode=0:0 RunTime=00:00:05",
        # an array: two finished tasks (one failed with exit 1, one killed by signal 9) ...
        "JobId=12 ArrayJobId=11 ArrayTaskId=0 JobName=wsi-tile JobState=FAILED Reason=NonZeroExitCode "
        "ExitCode=1:0",
        "JobId=13 ArrayJobId=11 ArrayTaskId=1 JobName=wsi-tile JobState=CANCELLED Reason=None "
        "ExitCode=0:9",
        # ... and the pending rest, one record for tasks 2, 3 and 5 (throttled to 2 at once)
        "JobId=11 ArrayJobId=11 ArrayTaskId=2-3,5%2 JobName=wsi-tile JobState=PENDING "
        "Reason=JobArrayTaskLimit ExitCode=0:0",
        # a job waiting on a failed upstream; then a line that is not a job record
        "JobId=20 JobName=wsi-extract JobState=PENDING Reason=DependencyNeverSatisfied ExitCode=0:0",
        "No jobs in the system",
        "",
    ]
)


def test_parse_scontrol() -> None:
    states = sl.parse_scontrol(SCONTROL)
    got = [(s.job_id, s.task, s.state, s.exit_code, s.signal, s.reason) for s in states]
    assert got == [
        ("10", None, "COMPLETED", 0, 0, None),
        ("11", 0, "FAILED", 1, 0, "NonZeroExitCode"),
        ("11", 1, "CANCELLED", 0, 9, None),
        ("11", 2, "PENDING", None, None, "JobArrayTaskLimit"),
        ("11", 3, "PENDING", None, None, "JobArrayTaskLimit"),
        ("11", 5, "PENDING", None, None, "JobArrayTaskLimit"),
        ("20", None, "PENDING", None, None, "DependencyNeverSatisfied"),
    ]
    ok = {(s.job_id, s.task): (s.finished, s.ok) for s in states}
    assert ok[("10", None)] == (True, True)
    assert ok[("11", 0)] == (True, False) and ok[("11", 1)] == (True, False)
    assert ok[("11", 2)] == (False, False)
    assert sl.parse_scontrol("") == [] and sl.parse_scontrol("garbage JobId=") == []


# ---------------------------------------------------------------- dependencies, via sbatch
def test_dependency_option() -> None:
    assert sl.dependency_option([]) is None
    assert sl.dependency_option(["", ""]) is None
    assert sl.dependency_option(["12"]) == "--dependency=afterok:12"
    assert sl.dependency_option([12, "13", ""]) == "--dependency=afterok:12:13"


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`sbatch` on PATH that logs its arguments and prints a new job id ("<id>;cluster")."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "sbatch.calls"
    counter = tmp_path / "next_id"
    counter.write_text("100")
    (bindir / "sbatch").write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> {shlex.quote(str(calls))}\n'
        f"id=$(cat {shlex.quote(str(counter))}); echo $((id + 1)) > {shlex.quote(str(counter))}\n"
        'if [[ "${FAKE_SBATCH_MODE:-ok}" == fail ]]; then echo "sbatch: error: no partition" >&2;'
        " exit 1; fi\n"
        'if [[ "${FAKE_SBATCH_MODE:-ok}" == junk ]]; then echo "Submitted nothing"; exit 0; fi\n'
        'echo "${id};wsipipe"\n'
    )
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_submit_chain_passes_afterok_dependencies(tmp_path: Path, fake_slurm: Path) -> None:
    layout = RunLayout(tmp_path / "run")
    specs = [
        _spec(),
        _spec(stage="extract", argv=("extract", "run")),
        sl.JobSpec("train-mil", ("train-mil", "run")),
    ]
    jobs = sl.submit_chain(specs, layout, after_ok=["42"], stamp=STAMP)
    assert [j.job_id for j in jobs] == ["100", "101", "102"]
    assert [j.after_ok for j in jobs] == [("42",), ("100",), ("101",)]
    calls = fake_slurm.read_text().splitlines()
    for call, job, dep in zip(calls, jobs, ("42", "100", "101"), strict=True):
        args = call.split()
        assert args[0] == "--parsable"
        # a job whose upstream failed is cancelled instead of pending forever
        assert args[1:3] == [f"--dependency=afterok:{dep}", "--kill-on-invalid-dep=yes"]
        assert args[-1] == job.script and Path(job.script).is_file()
    # the records in the run folder give the chain back, oldest first
    back = sl.submitted_jobs(layout)
    assert [(j.job_id, j.stage, j.array_size) for j in back] == [
        ("100", "tile", 5),
        ("101", "extract", 5),
        ("102", "train-mil", None),
    ]


def test_submit_without_dependency_and_errors(
    tmp_path: Path, fake_slurm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = sl.write_script(_spec(), RunLayout(tmp_path / "run"), stamp=STAMP)
    assert sl.submit_script(script) == "100"
    assert fake_slurm.read_text().split() == ["--parsable", str(script)]  # no dependency option
    monkeypatch.setenv("FAKE_SBATCH_MODE", "fail")
    with pytest.raises(sl.SlurmError, match="no partition"):
        sl.submit_script(script)
    monkeypatch.setenv("FAKE_SBATCH_MODE", "junk")
    with pytest.raises(sl.SlurmError, match="printed no job id"):
        sl.submit_script(script)


def test_missing_sbatch_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(sl.SlurmError, match="slurm_local.sh"):
        sl.submit_script(tmp_path / "x.sbatch")


# ----------------------------------------------------------------------------- array sizing
@pytest.mark.parametrize(
    ("n_slides", "array_size", "expect"),
    [
        (4, None, 4),  # one task per slide
        (4, 2, 2),  # as asked
        (4, 10, 4),  # never more tasks than slides (the extra tasks would have nothing to do)
        (250, None, 100),  # capped at max_array by default
        (250, 300, 250),
    ],
)
def test_slurm_plan_array_size(
    tmp_path: Path, n_slides: int, array_size: int | None, expect: int
) -> None:
    from wsi_pipe.core.config import RunConfig
    from wsi_pipe.runner.plan import slurm_plan

    man = tmp_path / "slides.csv"
    man.write_text(
        "slide_id,path\n" + "".join(f"s{i:03d},{tmp_path}/s{i:03d}.svs\n" for i in range(n_slides))
    )
    cfg = RunConfig(slides=(str(man),), out=str(tmp_path / "run"))
    plan = slurm_plan(cfg, array_size=array_size).stages
    assert [(p.stage, p.array, p.array_size) for p in plan] == [("tile", True, expect)]
    text = sl.render_script(
        sl.JobSpec(plan[0].stage, plan[0].argv, plan[0].array_size), RunLayout(cfg.out), stamp=STAMP
    )
    assert f"--array=0-{expect - 1}" in _sbatch_lines(text)


@pytest.mark.parametrize("n_tasks", [1, 3, 4, 7])
def test_array_tasks_cover_every_slide_once(monkeypatch: pytest.MonkeyPatch, n_tasks: int) -> None:
    """What task i of `--array=0-(n-1)` runs: shard i of n; together, every slide once."""

    class Item:
        def __init__(self, sid: str) -> None:
            self.slide_id = sid

    items = [Item(f"s{i}") for i in (5, 1, 4, 0, 3, 2)]
    seen: list[str] = []
    for task in range(n_tasks):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", str(n_tasks))
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
        seen += [it.slide_id for it in shard_items(items, shard_from_env())]
    assert sorted(seen) == sorted(it.slide_id for it in items) and len(seen) == len(items)


# ------------------------------------------------------------- `wsi-pipe submit` (no --slurm)
def _submit(*args: str) -> tuple[int, str]:
    """`wsi-pipe -q submit ARGS` in this process; scripts are written, nothing is queued."""
    from typer.testing import CliRunner

    from wsi_pipe.cli.app import app

    res = CliRunner().invoke(app, ["-q", "submit", *args])
    return res.exit_code, res.output


def _job_argv(layout: RunLayout, stage: str) -> list[str]:
    """The wsi-pipe arguments of the one script `submit` wrote for `stage` into the run."""
    scripts = sorted(layout.slurm_dir.glob(f"{stage}-*.sbatch"))
    assert len(scripts) == 1, scripts
    line = next(ln for ln in scripts[0].read_text().splitlines() if "wsi_pipe.cli.app" in ln)
    argv = shlex.split(line)
    return argv[argv.index("wsi_pipe.cli.app") + 1 :]


def test_task_threads_one_rule() -> None:
    from wsi_pipe.runner.plan import task_threads

    assert task_threads(6, 3) == 6  # configured wins
    assert task_threads(None, 3) == 3  # else the task's CPUs
    assert task_threads(None, None) == 1  # never the node's cores


@pytest.mark.parametrize(
    ("stage_args", "config_threads", "expect_added"),
    [
        ((), None, "3"),  # nothing set: the task's CPUs (--cpus 3)
        (("--threads", "2"), None, None),  # set on the command line: kept as given
        ((), 5, None),  # set in the config file: the stage reads it
    ],
)
def test_submit_extract_threads(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stage_args: tuple[str, ...],
    config_threads: int | None,
    expect_added: str | None,
) -> None:
    monkeypatch.chdir(tmp_path)
    extra: tuple[str, ...] = ()
    if config_threads is not None:
        (tmp_path / "e.yaml").write_text(f"encoder: ssmamba_tiny\nthreads: {config_threads}\n")
        extra = ("--config", "e.yaml")
    code, out = _submit("extract", "run", "--encoder", "enc.pt", *stage_args, *extra, "--cpus", "3")
    assert code == 0, out
    argv = _job_argv(RunLayout(tmp_path / "run"), "extract")
    assert argv[:4] == ["extract", "run", "--encoder", "enc.pt"]  # the stage's arguments, as given
    if expect_added is None:
        assert argv.count("--threads") == len(stage_args) // 2
    else:
        assert argv[-2:] == ["--threads", expect_added]


def test_submit_finds_the_run_folder_like_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tile: its --out, by default the current folder (not the first slide argument)
    monkeypatch.chdir(tmp_path)
    code, out = _submit("tile", "slides/", "--mpp", "0.5", "--array-size", "3")
    assert code == 0, out
    assert _job_argv(RunLayout(tmp_path), "tile") == ["tile", "slides/", "--mpp", "0.5"]
    assert not (tmp_path / "slides").exists()
    # train-mil without RUN_DIR inside a run's subfolder: the run found upwards, as the stage does
    run = tmp_path / "proj"
    RunLayout(run).marker.parent.mkdir(parents=True)
    RunLayout(run).marker.touch()
    (run / "sub").mkdir()
    monkeypatch.chdir(run / "sub")
    code, out = _submit("train-mil", "--method", "abmil")
    assert code == 0, out
    assert _job_argv(RunLayout(run), "train-mil") == ["train-mil", "--method", "abmil"]
    assert "slide count unknown" not in out  # a single job has no array to size


def test_submit_checks_the_stage_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = _submit("extract", "run", "--encoder", "enc.pt", "--no-such-option", "1")
    assert code == 2 and "--no-such-option" in out, out
    code, out = _submit("status", "run")
    assert code == 2 and "unknown stage" in out, out
    code, out = _submit("all")
    assert code == 2 and "--config" in out, out
    (tmp_path / "bad.yaml").write_text("encoder: x\nno_such_key: 1\n")
    code, out = _submit("extract", "run", "--config", "bad.yaml")
    assert code == 2 and "no_such_key" in out, out
    assert not (tmp_path / "run").exists()  # nothing written for a command line that would fail


# ------------------------------------------------------------------ CI must not skip Slurm
def test_cluster_failure_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match="CI=true: cluster down"):
        skip_or_fail_in_ci("cluster down")
    monkeypatch.delenv("CI")
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="cluster down"):
        skip_or_fail_in_ci("cluster down")
