"""`packager build --ray [ADDRESS]`: the step graph as Ray tasks (Ray is the optional `ray` extra).

The driver computes every step's key, skips the steps whose record matches (the same step
cache as the sequential build), and submits a step as a task once the steps it needs have
finished. A task carries plain strings (packs file, run directory, step id, expected key): the
worker rebuilds the graph from the packs file, checks that it computes the same key (the same
inputs and the same packager code on both machines) and runs the step with the same
`execute_step` as the sequential build. Files go through the run directory, which every node must
see at the same path (a shared or mounted filesystem), like the parent, the data and the packs
file. The report is written by the driver at the end.

Faults: a step's outputs appear by atomic rename and its record last, so a task stopped anywhere
leaves nothing that counts as done. Ray retries a task whose worker died (`max_retries`) and one
that raised TransientStepError (`retry_exceptions`); any other error stops the build after the
running tasks end, and a re-run resumes from the records."""
from __future__ import annotations

import logging
import os
import shlex
import socket
import sys
from pathlib import Path

from packager.build.config import BuildError, load_build_config
from packager.build.driver import LOCAL_RAY
from packager.build.graph import BuildGraph, make_graph
from packager.build.steps import Step, StepStore, TransientStepError, execute_step, step_key
from packager.core.errors import PackagerError
from runtime.errors import EdgeError

MAX_RETRIES = 3          # attempts after the first, for a lost worker or a transient error
HEARTBEAT_SECONDS = 60   # a progress line at least this often while tasks run
RAY_HINT = "install it with pip install 'edge-translation-packager[ray]' (or build without --ray)"
_GRAPHS: dict[tuple, BuildGraph] = {}  # per worker process: one graph per build, not one per task


def run_step_task(packs_file: str, run_dir: str, step_id: str, key: str, command: str | None) -> dict:
    """One step, in a Ray worker (see the module docstring)."""
    config = load_build_config(packs_file)
    cache_key = (packs_file, config.sha256, run_dir, command)
    if cache_key not in _GRAPHS:
        _GRAPHS[cache_key] = make_graph(config, Path(run_dir), command)
    step = _GRAPHS[cache_key].by_id(step_id)
    step.key, step.status, step.seconds = step_key(step), "pending", 0.0
    if step.key != key:
        raise BuildError(f"{step.title}: the worker on {socket.gethostname()} computes step key {step.key[:12]}, the driver "
                         f"{key[:12]}: the packs file, its inputs or the packager code differ between the machines; "
                         "install the same packager everywhere and keep the inputs on the shared directory")
    worker_argv = sys.argv
    if command:  # the stages record sys.argv as provenance: the build's command, not the Ray worker's
        sys.argv = shlex.split(command)
    try:
        ran = execute_step(step, StepStore(Path(run_dir)))
    finally:
        sys.argv = worker_argv
    return {"ran": ran, "seconds": step.seconds, "host": socket.gethostname(), "pid": os.getpid()}


def import_ray():
    try:
        import ray
    except ImportError:
        raise BuildError(f"--ray: Ray is not installed; {RAY_HINT}") from None
    return ray


def run_on_ray(graph: BuildGraph, store: StepStore, console, address: str, packs_file: Path, command: str | None) -> dict:
    """Run `graph` on Ray: a local instance (LOCAL_RAY, or the one this process already started)
    or the cluster at `address`. Returns what the build record keeps about the cluster."""
    ray = import_ray()
    if all(store.up_to_date(step) for step in graph.steps[:-1]):  # nothing for a cluster: no Ray start-up
        for step in graph.steps[:-1]:
            step.status = "skipped"
        console.print("ray: every step is up to date; report ...")
        execute_step(graph.steps[-1], store)
        return {"address": address, "tasks": 0}
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=None if address == LOCAL_RAY else address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise BuildError(f"--ray {address}: cannot connect to a Ray cluster there ({' '.join(str(exc).split())})") from None
    try:
        resources = ray.cluster_resources()
        hosts = _Scheduler(ray, graph, store, console, str(packs_file), command, resources).run()
        return {"address": address, "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0),
                "nodes": len([n for n in ray.nodes() if n.get("Alive")]), "task_hosts": sorted(hosts)}
    finally:
        if started_here:
            ray.shutdown()


class _Scheduler:
    """Submits each step when the steps it needs are done; prints tasks done and running."""

    def __init__(self, ray, graph: BuildGraph, store: StepStore, console, packs_file: str, command, resources) -> None:
        self.ray, self.graph, self.store, self.console = ray, graph, store, console
        self.args = (packs_file, str(store.run_dir))
        self.command = command
        self.remote = ray.remote(run_step_task)
        self.has_gpu = resources.get("GPU", 0) > 0
        # no task may ask for more CPUs than the largest node has, or it would wait forever
        self.max_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1) or 1
        self.hosts: set[str] = set()

    def options(self, step: Step) -> dict:
        opts = {"num_cpus": min(step.resources.get("num_cpus", 1), self.max_cpus), "max_retries": MAX_RETRIES,
                "retry_exceptions": [TransientStepError]}
        if self.has_gpu and step.resources.get("num_gpus"):
            opts["num_gpus"] = step.resources["num_gpus"]
        return opts

    def run(self) -> set[str]:
        *tasks, report = self.graph.steps  # the report reads every metrics file: the driver writes it
        todo = {}
        finished = set()
        for step in tasks:
            if self.store.up_to_date(step):
                step.status = "skipped"
                finished.add(step.id)
            else:
                todo[step.id] = step
        self.console.print(f"ray: {len(todo)} task(s) to run, {len(finished)} step(s) up to date")
        self._loop(todo, finished, len(todo))
        self.console.print("report ...")
        execute_step(report, self.store)
        return self.hosts

    def _loop(self, todo: dict[str, Step], finished: set[str], total: int) -> None:
        pending: dict = {}
        failure: tuple[Step, BaseException] | None = None
        done = 0
        while todo or pending:
            if failure is None:
                for step in [s for s in todo.values() if all(n in finished for n in s.needs)]:
                    ref = self.remote.options(**self.options(step)).remote(*self.args, step.id, step.key, self.command)
                    pending[ref] = todo.pop(step.id)
            if not pending:
                break
            ready, _ = self.ray.wait(list(pending), num_returns=1, timeout=HEARTBEAT_SECONDS)
            if not ready:
                self.console.print(f"  {len(pending)} running or queued: {', '.join(s.title for s in pending.values())}")
                continue
            step = pending.pop(ready[0])
            try:
                result = self.ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - reported below, after the running tasks end
                step.status = "failed"
                failure = failure or (step, exc)
                self.console.print(f"{step.title} [red]failed[/red]; waiting for {len(pending)} running task(s)")
                continue
            done += 1
            step.seconds, step.status = result["seconds"], "done" if result["ran"] else "skipped"
            finished.add(step.id)
            self.hosts.add(result["host"])
            self.console.print(f"[{done}/{total}] {step.title} [green]done[/green] in {step.seconds:.1f} s on "
                               f"{result['host']} ({len(pending)} running or queued, {len(todo)} waiting)")
        if failure is not None:
            raise _as_build_error(self.ray, *failure)
        if todo:
            raise BuildError(f"steps whose inputs never appeared: {', '.join(sorted(todo))}")


def _as_build_error(ray, step: Step, exc: BaseException) -> BaseException:
    """One line for what the user can act on; anything else keeps its traceback."""
    cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
    if isinstance(cause, BuildError):
        return BuildError(f"{cause} (finished steps are kept; run again to resume)")
    if isinstance(cause, (PackagerError, EdgeError)):
        return BuildError(f"{step.title}: {cause} (finished steps are kept; run again to resume)")
    if isinstance(exc, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        return BuildError(f"{step.title}: its worker was lost {MAX_RETRIES + 1} times ({type(exc).__name__}); "
                          "finished steps are kept; run again to resume")
    return exc
