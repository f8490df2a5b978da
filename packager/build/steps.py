"""Steps and the step cache: what a step is, its key, its record in RUN_DIR/.steps/, and running
one step so that it either finishes with a record or leaves nothing that looks finished.

The same `execute_step` runs a step in the sequential build and inside a Ray task, so the two
cannot differ in what counts as done."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from packager.build.config import BuildError
from runtime.errors import EdgeError

STEPS_DIR = ".steps"
FAULTS_DIR = ".faults"
LOCK_NAME = ".build.lock"
HASH_LIMIT_BYTES = 1 << 30
# fault injection for the fault tests: "STEP_ID:ACTION" (comma-separated), each firing once per run
# directory, after the step wrote its outputs and before its record; ACTION is raise (a transient
# error, retried on Ray), fail (an error that is not retried) or kill (SIGKILL of the process)
FAULT_ENV = "PACKAGER_BUILD_FAULT"
# errors of a shared filesystem or a network that a second attempt may not meet
TRANSIENT_ERRNOS = {errno.ESTALE, errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EAGAIN}


class TransientStepError(BuildError):
    """A step failed for a reason a retry may not meet (a stale NFS handle, an I/O error, an
    injected fault); the Ray build retries it, the sequential build stops (a re-run resumes)."""


@dataclass
class Step:
    id: str
    title: str
    inputs: dict[str, Any]
    outputs: list[Path]
    run: Callable[[], Any]
    needs: list[str] = field(default_factory=list)       # ids of the steps whose outputs it reads
    resources: dict[str, float] = field(default_factory=dict)  # Ray resources of its task (num_cpus, num_gpus)
    key: str = ""
    status: str = "pending"
    seconds: float = 0.0


def key_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def step_key(step: Step) -> str:
    return key_of({"step": step.id, "inputs": step.inputs})


def file_key(path: Path) -> str:
    """Content hash; for files above HASH_LIMIT_BYTES (a huge parent) size and mtime instead,
    so that checking whether a step is up to date does not read tens of gigabytes."""
    from packager.core.fingerprint import file_sha256

    stat = path.stat()
    if stat.st_size > HASH_LIMIT_BYTES:
        return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    return file_sha256(path)


def dir_key(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): file_key(p) for p in sorted(path.rglob("*")) if p.is_file()}


class StepStore:
    """The records of finished steps in RUN_DIR/.steps/ (one JSON file per step)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.records = run_dir / STEPS_DIR

    def record_path(self, step: Step) -> Path:
        return self.records / f"{step.id.replace('/', '__')}.json"

    def up_to_date(self, step: Step) -> bool:
        path = self.record_path(step)
        if not path.is_file():
            return False
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        return record.get("key") == step.key and all(p.exists() for p in step.outputs)

    def write(self, step: Step) -> None:
        from runtime.atomic import atomic_write_json

        self.records.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.record_path(step), {"key": step.key, "inputs": step.inputs,
                                                   "outputs": [str(p) for p in step.outputs], "seconds": step.seconds,
                                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def execute_step(step: Step, store: StepStore) -> bool:
    """Run `step` unless its record matches; False when it was up to date. Outputs of an older,
    different result are removed first; the record is written last, so a step stopped anywhere
    before it (an error, a kill, a lost machine) is done again by the next attempt or run."""
    step.key = step.key or step_key(step)
    if store.up_to_date(step):
        step.status = "skipped"
        return False
    for output in step.outputs:
        if output.is_dir():
            shutil.rmtree(output)
        elif output.exists():
            output.unlink()
    started = time.monotonic()
    try:
        step.run()
    except EdgeError as exc:  # runtime errors are not PackagerErrors: one line all the same
        raise BuildError(f"{step.title}: {exc}") from None
    except OSError as exc:
        if exc.errno in TRANSIENT_ERRNOS:
            raise TransientStepError(f"{step.title}: {exc}") from exc
        raise
    step.seconds = round(time.monotonic() - started, 2)
    missing = [str(p) for p in step.outputs if not p.exists()]
    if missing:
        raise BuildError(f"step {step.id}: finished without writing {', '.join(missing)}")
    _injected_fault(step, store.run_dir)
    store.write(step)
    step.status = "done"
    return True


def _injected_fault(step: Step, run_dir: Path) -> None:
    """The fault named for this step in $PACKAGER_BUILD_FAULT, once per run directory (a marker
    file created exclusively records that it fired, so the retry or re-run passes)."""
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        step_id, _, action = item.rpartition(":")
        if step_id != step.id or action not in ("raise", "fail", "kill"):
            continue
        marker = run_dir / FAULTS_DIR / f"{step.id.replace('/', '__')}.{action}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            marker.open("x").close()
        except FileExistsError:
            return
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise (BuildError if action == "fail" else TransientStepError)(f"{step.title}: injected fault ({FAULT_ENV})")


@contextmanager
def run_dir_lock(run_dir: Path):
    """One build per run directory: two builds writing the same steps would corrupt each other.
    An flock dies with its process, so a killed build never leaves a stale lock behind."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / LOCK_NAME).open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise BuildError(f"{run_dir}: another `packager build` (pid {holder}) is writing this run directory; "
                             "wait for it to finish or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()
