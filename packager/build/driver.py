"""The build driver: load the packs file, lock the run directory, make the step graph, run it
(in order in this process, or as Ray tasks) and write RUN_DIR/build.json."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Sequence

from packager import __version__
from packager.build.config import BuildConfig, load_build_config
from packager.build.graph import BuildGraph, make_graph
from packager.build.steps import Step, StepStore, execute_step, run_dir_lock, step_key

LOCAL_RAY = "local"   # --ray with no address: start a Ray instance on this machine


def build(packs_file: str | os.PathLike, run_dir: str | os.PathLike, *, dry_run: bool = False, console=None,
          command: str | None = None, ray: str | None = None) -> dict:
    """Run (or with `dry_run` list) every step; returns the build record (also RUN_DIR/build.json).
    `ray`: None runs the steps here, one after another; LOCAL_RAY starts a Ray instance on this
    machine; any other value is the address of a Ray cluster to connect to."""
    from rich.console import Console

    config = load_build_config(packs_file)
    if ray is not None and not dry_run:  # before anything is written
        from packager.build.ray_tasks import import_ray

        import_ray()
    run_dir = Path(run_dir).resolve()
    console = console or Console(stderr=True)
    with run_dir_lock(run_dir):
        graph = make_graph(config, run_dir, command)
        store = StepStore(run_dir)
        for step in graph.steps:
            step.key = step_key(step)
        record = _record(config, run_dir, command, graph)
        if dry_run:
            for step in graph.steps:
                step.status = "up to date" if store.up_to_date(step) else "to do"
                console.print(f"{step.status:>10}  {step.title}")
        else:
            started = time.monotonic()
            if ray is None:
                run_in_order(graph.steps, store, console)
            else:
                from packager.build.ray_tasks import run_on_ray

                record["ray"] = run_on_ray(graph, store, console, ray, config.source, command)
            record["seconds"] = round(time.monotonic() - started, 1)
            record["timing"] = task_timing(graph.steps)
            console.print(f"built {len(graph.bundles)} bundle(s) in {record['seconds']:.0f} s; "
                          f"report: {graph.report_dir / 'index.html'}")
        _finish_record(record, config, graph, run_dir, console, dry_run)
    return record


def run_in_order(steps: Sequence[Step], store: StepStore, console) -> None:
    """The sequential build: each step in graph order, in this process."""
    for index, step in enumerate(steps, 1):
        prefix = f"[{index}/{len(steps)}] {step.title}"
        if store.up_to_date(step):
            step.status = "skipped"
            console.print(f"{prefix} [dim]up to date[/dim]")
            continue
        console.print(f"{prefix} ...")
        try:
            execute_step(step, store)
        except BaseException:
            console.print(f"{prefix} [red]failed[/red] (finished steps are kept; run again to resume)")
            raise
        console.print(f"{prefix} [green]done[/green] in {step.seconds:.1f} s")


def task_timing(steps: Sequence[Step]) -> dict:
    """Total work and the critical path (the longest chain of `needs`) of the steps run now, in
    seconds: what the graph allows on many machines is about max(work / N, critical path)."""
    finish: dict[str, float] = {}
    for step in steps:  # graph order: every step after the steps it needs
        finish[step.id] = step.seconds + max((finish.get(n, 0.0) for n in step.needs), default=0.0)
    return {"tasks_run": sum(s.status == "done" for s in steps), "work_seconds": round(sum(s.seconds for s in steps), 1),
            "critical_path_seconds": round(max(finish.values(), default=0.0), 1)}


def _record(config: BuildConfig, run_dir: Path, command: str | None, graph: BuildGraph) -> dict:
    return {"schema": "packager.build/1", "packs_file": str(config.source), "packs_sha256": config.sha256,
            "run_dir": str(run_dir), "command": command, "packager_version": __version__,
            "python": sys.version.split()[0], "steps": []}


def _finish_record(record: dict, config: BuildConfig, graph: BuildGraph, run_dir: Path, console, dry_run: bool) -> None:
    from runtime.atomic import atomic_write_json

    record["steps"] = [{"id": s.id, "status": s.status, "seconds": s.seconds, "key": s.key, "needs": s.needs,
                        "outputs": [str(p) for p in s.outputs]} for s in graph.steps]
    record["bundles"] = [str(p) for p in graph.bundles]
    record["report"] = str(graph.report_dir / "index.html")
    if config.profiles and not dry_run:
        record["fit"] = _fit_profiles(config.profiles, graph.bundles, run_dir, console)
    if not dry_run:
        atomic_write_json(run_dir / "build.json", record)


def _fit_profiles(profiles: Sequence[str], bundles: Sequence[Path], run_dir: Path, console) -> str:
    """`packager fit` of the built bundles for each profile of the packs file -> RUN/fit.json."""
    from packager.fit import PROFILES, describe, fit, load_bundle_dirs
    from runtime.atomic import atomic_write_json

    candidates = load_bundle_dirs(bundles)
    out = {}
    for name in profiles:
        budget = PROFILES[name]
        results = fit(candidates, None, budget["ram_bytes"], budget["storage_bytes"])
        lines, ok = describe(results, budget["ram_bytes"], budget["storage_bytes"])
        console.print(f"profile {name}:" + "".join(f"\n  {line}" for line in lines))
        out[name] = {"budget": budget, "all_directions_fit": ok,
                     "best": {d: next((v.candidate.path for v in verdicts if v.fits), None) for d, verdicts in results.items()}}
    atomic_write_json(run_dir / "fit.json", out)
    return str(run_dir / "fit.json")
