"""`wsi-pipe submit` (Slurm job arrays), `wsi-pipe status`, `wsi-pipe run` and `wsi-pipe demo`."""

from __future__ import annotations

from pathlib import Path

import typer

from wsi_pipe.cli.common import console, err_console, fail, run_guarded

#: commands that are not stages and cannot be submitted
_NOT_STAGES = {"submit", "status", "run", "demo"}
#: stage commands whose `--config` is validated at submit time (before anything is queued)
_STAGE_CONFIG = {
    "tile": "TileConfig",
    "extract": "ExtractConfig",
    "pretrain": "PretrainConfig",
    "train-mil": "MilConfig",
    "finetune": "FinetuneConfig",
}


def _option_value(args: list[str], *names: str) -> str | None:
    """Value of `--name VALUE` or `--name=VALUE` in a raw argument list (last one wins)."""
    value = None
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                value = args[i + 1]
            elif n.startswith("--") and a.startswith(n + "="):
                value = a.split("=", 1)[1]
    return value


def _guess_run_dir(args: list[str]) -> Path | None:
    """The run folder of a stage command line: `--out`/`-o`, else its first positional."""
    out = _option_value(args, "--out", "-o")
    if out:
        return Path(out)
    for a in args:
        if not a.startswith("-"):
            return Path(a)
    return None


def _count_slides(run_dir: Path) -> int | None:
    from wsi_pipe.core.layout import RunLayout
    from wsi_pipe.core.manifest import load_slide_table

    layout = RunLayout(run_dir)
    if not layout.slides_table.exists():
        return None
    try:
        return len(load_slide_table(layout.slides_table))
    except Exception:
        return None


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
            help="run folder for the script and logs (default: the stage's --out or RUN_DIR)",
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
        from wsi_pipe.core.layout import RunLayout
        from wsi_pipe.runner import slurm as sl

        args = list(ctx.args)
        res = sl.SlurmResources(
            partition=partition, gres=gres, cpus=cpus, mem=mem, time=time_limit, account=account
        )
        deps = tuple(after or ())
        if stage == "all":
            from wsi_pipe.stages.pipeline import load_run_config, slurm_plan

            cfg_path = _option_value(args, "--config", "-c")
            if cfg_path is None:
                fail(
                    "`submit all` needs --config RUN.yaml (a RunConfig, like configs/example.yaml)"
                )
            cfg = run_guarded(load_run_config, cfg_path)
            plan = run_guarded(slurm_plan, cfg, array_size=array_size, cpus_per_task=cpus)
            layout = RunLayout(run_dir or cfg.out)
            specs = [
                sl.JobSpec(
                    p.stage,
                    p.argv,
                    p.array_size if p.array else None,
                    max_parallel,
                    res if p.gpu else sl.SlurmResources(**{**res.__dict__, "gres": None}),
                    tolerate_slide_failures=tolerate_failures,
                )
                for p in plan
            ]
        else:
            known = {c.name for c in app.registered_commands if c.name} - _NOT_STAGES
            if stage not in known:
                fail(f"unknown stage {stage!r}; submit one of: {', '.join(sorted(known))}, all")
            cfg_path = _option_value(args, "--config", "-c")
            stage_cfg = None
            if cfg_path is not None and stage in _STAGE_CONFIG:
                from wsi_pipe.core import config as cfgmod

                stage_cfg = run_guarded(
                    cfgmod.load_config, getattr(cfgmod, _STAGE_CONFIG[stage]), cfg_path
                )
            rd = run_dir or _guess_run_dir(args)
            if rd is None:
                fail(f"cannot tell the run folder from `{stage} {' '.join(args)}`: give --run-dir")
            layout = RunLayout(rd)
            n = array_size
            if n is None:
                n_slides = _count_slides(rd)
                n = min(n_slides, 100) if n_slides else 10
                if not n_slides:
                    err_console.print(
                        f"[yellow]note:[/] slide count unknown: {n} array tasks (set --array-size)"
                    )
            per_slide = stage in ("tile", "extract")
            if (
                stage == "extract"
                and _option_value(args, "--threads") is None
                and getattr(stage_cfg, "threads", None) is None
            ):
                # torch threads = the CPUs of one task, not the node's cores (tasks share a node)
                args += ["--threads", str(cpus or 1)]
            specs = [
                sl.JobSpec(
                    stage,
                    (stage, *args),
                    max(1, n) if per_slide else None,
                    max_parallel,
                    res,
                    tolerate_slide_failures=tolerate_failures,
                )
            ]
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
        jobs = run_guarded(sl.submit_chain, specs, layout, deps)
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
        run_dir: Path = typer.Argument(..., help="run folder"),
        show_failed: int = typer.Option(
            20, "--show-failed", help="list up to this many failed slides"
        ),
    ) -> None:
        """Done / failed / running / pending slides per stage, and the run's Slurm jobs.

        Exit code 1 when a slide failed in some stage, 0 otherwise.
        """
        from rich.table import Table

        from wsi_pipe.stages.pipeline import collect_status, slurm_job_summary

        if not run_dir.is_dir():
            fail(f"{run_dir} is not a run folder")
        st = run_guarded(collect_status, run_dir)
        t = Table(title=f"wsi-pipe status {run_dir}")
        for col in ("stage", "done", "failed", "running", "pending", "slides"):
            t.add_column(col, justify="left" if col == "stage" else "right")
        for stage, g in st.stages.items():
            t.add_row(
                stage,
                f"[green]{len(g['done'])}[/]",
                f"[red]{len(g['failed'])}[/]",
                f"[yellow]{len(g['running'])}[/]",
                str(len(g["pending"])),
                str(sum(len(v) for v in g.values())),
            )
        console.print(t if st.stages else "no per-slide stage has run in this folder yet")
        for name, path in st.artifacts.items():
            console.print(f"{name}: {path}")
        shown = 0
        for stage, rows in st.failures.items():
            for sid, err in rows:
                if shown < show_failed:
                    console.print(f"[red]failed[/] {stage} {sid}: {err}", highlight=False)
                shown += 1
        if shown > show_failed:
            console.print(f"... and {shown - show_failed} more failed (see {run_dir / 'state'})")
        for line in slurm_job_summary(run_dir):
            console.print(line, highlight=False)
        if st.n_failed:
            raise typer.Exit(1)

    @app.command("run")
    def run(
        config: Path = typer.Option(
            ..., "--config", "-c", help="RunConfig YAML (see configs/example.yaml)"
        ),
        out: Path | None = typer.Option(None, "--out", "-o", help="override the run folder"),
        workers: int | None = typer.Option(
            None, "--workers", "-w", help="slides tiled in parallel"
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="redo what is already done"),
        only: list[str] | None = typer.Option(
            None,
            "--only",
            help="run only these stages (tile, pretrain, extract, train-mil, heatmap)",
        ),
    ) -> None:
        """Run every configured stage locally: tile -> pretrain -> extract -> train-mil -> heatmap."""
        from wsi_pipe.stages.pipeline import load_run_config, run_pipeline

        cfg = run_guarded(load_run_config, config, out=str(out) if out else None, workers=workers)
        result = run_guarded(
            run_pipeline, cfg, overwrite=overwrite, only=tuple(only) if only else None
        )
        _print_pipeline(result)
        if not result.ok:
            raise typer.Exit(1)

    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="demo folder"),
        slides: int = typer.Option(
            8, "--slides", "-n", min=4, help="synthetic slides (two classes)"
        ),
        size_px: int = typer.Option(4096, "--size-px", min=1024, help="level-0 side of each slide"),
        epochs: int = typer.Option(3, "--pretrain-epochs", min=1, help="pretraining epochs"),
        workers: int = typer.Option(2, "--workers", "-w", help="slides tiled in parallel"),
        seed: int = typer.Option(0, "--seed"),
        pretrain_steps: int = typer.Option(
            10, "--pretrain-steps", min=1, help="steps per pretraining epoch"
        ),
        mil_epochs: int = typer.Option(
            40, "--mil-epochs", min=1, help="MIL training epochs per fold"
        ),
        bootstrap: int = typer.Option(
            200, "--bootstrap", min=0, help="bootstrap resamples of the CIs"
        ),
        report: bool = typer.Option(
            True, "--report/--no-report", help="write RUN/report.html at the end"
        ),
    ) -> None:
        """No downloads: a synthetic two-class cohort through every stage on the CPU in minutes.

        Ends by writing the run's HTML report and printing its path (the last line).
        """
        from wsi_pipe.stages.demo import run_demo

        result = run_guarded(
            run_demo,
            out,
            n_slides=slides,
            size_px=size_px,
            pretrain_epochs=epochs,
            workers=workers,
            seed=seed,
            pretrain_steps=pretrain_steps,
            mil_epochs=mil_epochs,
            bootstrap=bootstrap,
            report=report,
        )
        _print_pipeline(result)
        if "report" in result.outputs:
            console.print(f"open the report: {result.outputs['report']}", highlight=False)
            print(result.outputs["report"])  # last line: the report path, for scripts
        elif report:
            err_console.print("[red]the report could not be written[/] (see the log above)")
        if not result.ok:
            raise typer.Exit(1)


def _print_pipeline(result) -> None:  # type: ignore[no-untyped-def]
    from rich.table import Table

    t = Table(title="wsi-pipe run")
    for col in ("stage", "status", "seconds", "details"):
        t.add_column(col, overflow="fold")
    for s in result.stages:
        colour = "green" if s.ok else "red"
        t.add_row(s.name, f"[{colour}]{s.status}[/]", f"{s.seconds:.1f}", s.details)
    console.print(t)
    console.print("results:")
    for name, path in result.outputs.items():
        console.print(f"  {name:<18} {path}", highlight=False)
