"""`wsi-pipe submit` (Slurm job arrays and chains) and `wsi-pipe status` (where a run stands).

`submit STAGE ARGS...` hands ARGS to the stage command unchanged, but first parses them with that
command's own typed parameters (so a mistyped option fails here, not on the cluster) to learn
the stage's run folder and config; the plan (array size, `--threads`) is `runner.plan`'s.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from wsi_pipe.cli.common import console, err_console, fail, resolve_run_dir, run_guarded

#: commands that are not stages and cannot be submitted
_NOT_STAGES = {"submit", "status", "run", "demo"}
#: the parameter of a stage command that names its run folder, where it is not `run_dir`
_RUN_DIR_PARAM = {"tile": "out"}


def _stage_commands(ctx: typer.Context) -> dict[str, Any]:
    """The registered wsi-pipe commands that `submit` can queue (not groups, not _NOT_STAGES)."""
    root = ctx.find_root()
    group = root.command
    assert isinstance(group, TyperGroup)
    found = {}
    for name in group.list_commands(root):
        cmd = group.get_command(root, name)
        if cmd is not None and name not in _NOT_STAGES and not isinstance(cmd, TyperGroup):
            found[name] = cmd
    return found


@dataclass(frozen=True)
class StageCommandLine:
    """A stage command line as the stage itself parses it: what `submit` needs to plan its job."""

    stage: str
    args: tuple[str, ...]  # handed to the job unchanged
    run_dir: Path | None  # the stage's RUN_DIR (tile: --out, default "."); None: not given
    config: Path | None  # its --config file
    threads: int | None  # its --threads (extract), None: not given


def parse_stage_args(ctx: typer.Context, stage: str, args: tuple[str, ...]) -> StageCommandLine:
    """`wsi-pipe STAGE ARGS...` parsed by that command's own typed parameters (defaults filled
    in), without running it. Exits with the stage's own usage error."""
    commands = _stage_commands(ctx)
    if stage not in commands:
        fail(f"unknown stage {stage!r}; submit one of: {', '.join(sorted(commands))}, all")
    line = shlex.join((stage, *args))
    try:
        params = commands[stage].make_context(stage, list(args), parent=ctx.find_root()).params
    except typer.TyperException as e:  # the stage's usage error (no such option, bad value)
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        fail(f"`{line}`: {msg} (see `wsi-pipe {stage} --help`)")
    except typer.Exit:  # a command that shows its help when given no arguments
        fail(f"`{line}`: the stage needs its arguments (see `wsi-pipe {stage} --help`)")
    run_dir = params.get(_RUN_DIR_PARAM.get(stage, "run_dir"))
    config = params.get("config")
    return StageCommandLine(
        stage,
        args,
        Path(run_dir) if run_dir is not None else None,
        Path(config) if config is not None else None,
        params.get("threads"),
    )


def _print_wait(jobs: list, timeout_s: float) -> bool:  # type: ignore[type-arg]
    from wsi_pipe.runner.slurm import wait_for

    states = run_guarded(wait_for, [j.job_id for j in jobs], timeout_s=timeout_s)
    ok = True
    for j in jobs:
        tasks = states.get(j.job_id, [])
        bad = [t for t in tasks if not t.ok]
        ok &= bool(tasks) and not bad
        summary = (
            ", ".join(
                f"{'task ' + str(t.task) if t.task is not None else 'job'}: {t.state} "
                f"(exit {t.exit_code}{', ' + t.reason if t.reason else ''})"
                for t in bad
            )
            or f"{len(tasks)} task(s) COMPLETED"
        )
        colour = "green" if tasks and not bad else "red"
        console.print(f"[{colour}]{j.stage}[/] job {j.job_id}: {summary}")
    return ok


def register(app: typer.Typer) -> None:
    @app.command(
        "submit",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def submit(
        ctx: typer.Context,
        stage: str = typer.Argument(
            ...,
            help="a stage command (tile, extract, pretrain, train-mil, heatmap, ...) or `all`; "
            "everything after it that submit does not know goes to that command",
        ),
        config: Path | None = typer.Option(
            None,
            "--config",
            "-c",
            help="with `all`: the RunConfig YAML (required); with a stage: that stage's config "
            "file, checked now and passed on to it",
        ),
        slurm: bool = typer.Option(
            False,
            "--slurm",
            help="submit to Slurm; without it the script(s) are written and shown only",
        ),
        array_size: int | None = typer.Option(
            None,
            "--array-size",
            min=1,
            help="array tasks (shards); default: one per slide up to 100",
        ),
        max_parallel: int | None = typer.Option(
            None, "--max-parallel", min=1, help="tasks at once (%K)"
        ),
        partition: str | None = typer.Option(None, "--partition"),
        gres: str | None = typer.Option(
            None, "--gres", help="e.g. gpu:1 (with `all`: not for tile)"
        ),
        cpus: int | None = typer.Option(None, "--cpus", min=1, help="CPUs per task"),
        mem: str | None = typer.Option(None, "--mem", help="memory per task, e.g. 16G"),
        time_limit: str | None = typer.Option(
            None, "--time", help="time limit per task, e.g. 04:00:00"
        ),
        account: str | None = typer.Option(None, "--account"),
        after: list[str] | None = typer.Option(
            None, "--after", help="job id to wait for (afterok); repeat"
        ),
        tolerate_failures: bool = typer.Option(
            False,
            "--tolerate-failures",
            help="a task whose slides partly failed (recorded in state/) exits 0, so later stages run",
        ),
        run_dir: Path | None = typer.Option(
            None,
            "--run-dir",
            help="run folder for the script and logs (default: the stage's run folder, found "
            "like the stage finds it: tile's --out, else its RUN_DIR or the run holding the "
            "current folder; with `all`: the config's `out`)",
        ),
        wait: bool = typer.Option(
            False, "--wait", help="poll until the jobs finish; exit 1 if a task failed"
        ),
        wait_timeout: float = typer.Option(
            24 * 3600.0, "--wait-timeout", help="seconds --wait polls"
        ),
    ) -> None:
        """Run a stage as a Slurm job array (task i does shard i of N); `all` chains the stages.

        \b
          wsi-pipe submit tile slides/ --out run --mpp 0.5 --slurm --array-size 20 --cpus 4
          wsi-pipe submit extract run --encoder run/models/ssmamba.pt --slurm --gres gpu:1
          wsi-pipe submit all --config configs/example.yaml --slurm --gres gpu:1
        """
        from wsi_pipe.runner import plan as pl
        from wsi_pipe.runner import slurm as sl

        args = tuple(ctx.args)
        if stage == "all":
            from wsi_pipe.runner.run_config import load_run_config

            if config is None:
                fail(
                    "`submit all` needs --config RUN.yaml (a RunConfig, like configs/example.yaml)"
                )
            if args:
                fail(
                    f"`submit all` takes no stage arguments (they come from {config}): "
                    f"{shlex.join(args)}"
                )
            cfg = run_guarded(load_run_config, config)
            plan = run_guarded(
                pl.slurm_plan, cfg, array_size=array_size, cpus_per_task=cpus, run_dir=run_dir
            )
        else:
            if config is not None:
                args = (*args, "--config", str(config))
            line = parse_stage_args(ctx, stage, args)
            stage_cfg = (
                run_guarded(pl.load_stage_config, stage, line.config)
                if line.config is not None
                else None
            )
            threads = line.threads
            if threads is None:
                threads = getattr(stage_cfg, "threads", None)
            plan = run_guarded(
                pl.stage_plan,
                stage,
                args,
                # the run folder as the stage finds it: its RUN_DIR, else the run holding "."
                run_dir or resolve_run_dir(line.run_dir),
                configured_threads=threads,
                cpus_per_task=cpus,
                array_size=array_size,
            )
            if array_size is None and plan.array_size_guessed:
                err_console.print(
                    f"[yellow]note:[/] slide count unknown: {plan.stages[0].array_size} array "
                    "tasks (set --array-size)"
                )
        res = sl.SlurmResources(
            partition=partition, gres=gres, cpus=cpus, mem=mem, time=time_limit, account=account
        )
        no_gpu = sl.SlurmResources(**{**res.__dict__, "gres": None})
        specs = [
            sl.JobSpec(
                p.stage,
                p.argv,
                p.array_size if p.array else None,
                max_parallel,
                res if p.gpu else no_gpu,
                tolerate_slide_failures=tolerate_failures,
            )
            for p in plan.stages
        ]
        layout = plan.run
        if not slurm:
            for spec in specs:
                path = sl.write_script(spec, layout)
                console.rule(str(path))
                typer.echo(path.read_text())
            console.print(
                "not submitted: add --slurm to submit"
                + (" (each stage waits for the one before, afterok)" if len(specs) > 1 else "")
            )
            return
        jobs = run_guarded(sl.submit_chain, specs, layout, tuple(after or ()))
        for j in jobs:
            size = f"array of {j.array_size}" if j.array_size else "single job"
            dep = f", after {':'.join(j.after_ok)}" if j.after_ok else ""
            console.print(f"{j.stage}: job [bold]{j.job_id}[/] ({size}{dep}) script {j.script}")
        console.print(f"logs: {layout.slurm_dir}   progress: wsi-pipe status {layout.root}")
        print(jobs[-1].job_id)  # last line: the job id, for scripts
        if wait and not _print_wait(jobs, wait_timeout):
            raise typer.Exit(1)

    @app.command("status")
    def status(
        run_dir: Path | None = typer.Argument(
            None, help="run folder (default: the run holding the current folder)"
        ),
        show_failed: int = typer.Option(
            20, "--show-failed", help="list up to this many failed slides"
        ),
    ) -> None:
        """Done / failed / running / pending slides per stage, and the run's Slurm jobs.

        Exit code 1 when a slide failed in some stage, 0 otherwise.
        """
        from rich.table import Table

        from wsi_pipe.core.layout import RunLayout
        from wsi_pipe.runner.status import collect_status, slurm_jobs

        run_dir = resolve_run_dir(run_dir)
        if not run_dir.is_dir():
            fail(f"{run_dir} is not a run folder")
        st = run_guarded(collect_status, run_dir)
        t = Table(title=f"wsi-pipe status {run_dir}")
        for col in ("stage", "done", "failed", "running", "pending", "slides"):
            t.add_column(col, justify="left" if col == "stage" else "right")
        for g in st.stages:
            t.add_row(
                g.stage,
                f"[green]{len(g.done)}[/]",
                f"[red]{len(g.failed)}[/]",
                f"[yellow]{len(g.running)}[/]",
                str(len(g.pending)),
                str(g.n_slides),
            )
        console.print(t if st.stages else "no per-slide stage has run in this folder yet")
        for name, path in st.artifacts:
            console.print(f"{name}: {path}")
        shown = 0
        for g in st.stages:
            for f in g.failures:
                if shown < show_failed:
                    console.print(
                        f"[red]failed[/] {g.stage} {f.slide_id}: {f.error}", highlight=False
                    )
                shown += 1
        if shown > show_failed:
            console.print(
                f"... and {shown - show_failed} more failed (see {RunLayout(run_dir).state_root})"
            )
        for j in slurm_jobs(run_dir):
            size = f"array of {j.array_size}" if j.array_size else "single job"
            if j.task_states is None:
                live = "Slurm not reachable"
            else:
                live = (
                    ", ".join(f"{k.lower()} {v}" for k, v in sorted(j.task_states.items()))
                    or "no longer known to Slurm"
                )
            console.print(f"slurm job {j.job_id} {j.stage} ({size}): {live}", highlight=False)
        if st.n_failed:
            raise typer.Exit(1)
