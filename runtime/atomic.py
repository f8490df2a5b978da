"""Atomic file writes: a temporary sibling, fsync, rename, so readers never see half a file.

The one implementation for both sides (the runtime's outputs and every build stage):
`atomic_output` for a file or a directory written in pieces, `atomic_write_bytes/text/json`
for small files. A write that fails for a reason the user can fix (a full disk, a read-only or
missing folder, no permission) becomes one `OutputError` line naming the output path, and the
temporary sibling is removed whatever stops the write (an error, Ctrl-C, SIGTERM through
`interrupt_on_sigterm`)."""
from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from runtime.errors import EdgeError

# fsync on a directory is not supported everywhere (some network and FUSE filesystems): these
# errors mean "cannot persist the entry this way", not that the data is lost
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EISDIR, errno.EACCES, errno.EPERM}
# errors of the place written to, which the user can fix: reported in one line
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                 errno.ENOTDIR}


class OutputError(EdgeError, OSError):
    """An output that cannot be written (full disk, read-only or missing folder, permission)."""

    def __init__(self, code: int | None, message: str, path: Path | None = None) -> None:
        super().__init__(code, message)
        self.message = message
        self.path = path  # the output it names

    def __str__(self) -> str:
        return self.message


def output_error(path: str | os.PathLike, exc: OSError, needed_bytes: int | None = None) -> OutputError:
    """One line for a failed write of `path`: what the system said, and what to do."""
    path = Path(path)
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        try:
            free = shutil.disk_usage(_existing_parent(path)).free
        except OSError:
            free = None
        need = f"needs {needed_bytes:,} bytes" if needed_bytes else "needs more space"
        have = f", {free:,} free" if free is not None else ""
        reason = "file size limit reached" if code == errno.EFBIG else "no space left on device"
        message = f"{path}: {reason} ({need}{have}); free space or write elsewhere; nothing was written"
    elif code == errno.EROFS:
        message = f"{path}: read-only file system; write elsewhere; nothing was written"
    elif code in (errno.EACCES, errno.EPERM):
        message = f"{path}: permission denied ({exc.filename or path.parent}); write to a folder you can write to"
    elif code in (errno.ENOENT, errno.ENOTDIR):
        message = f"{path}: the output folder {path.parent} does not exist; create it or choose another path"
    else:
        message = f"{path}: cannot write ({exc.strerror or exc})"
    return OutputError(code, message, path)


def _existing_parent(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Persist a rename: the directory entry must reach the disk too. Filesystems that cannot
    fsync a directory are tolerated; a real failure (EIO) is raised."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        if exc.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_public(path: str | os.PathLike) -> None:
    """Give a temporary file or directory the mode a plain open()/mkdir() would have: mkstemp
    and mkdtemp create them private (0600/0700), and a renamed bundle must be readable by the
    users it is shipped to."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def temp_sibling(path: str | os.PathLike, directory: bool = False) -> Path:
    """A new, empty temporary file (or directory) beside `path`, named `.NAME.PID.XXXX.tmp`."""
    path = Path(path)
    prefix = f".{path.name}.{os.getpid()}."
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Remove the temporary siblings of `path` left by processes that no longer run (killed
    with SIGKILL mid-write, or a power cut). Only where /proc tells which processes run."""
    path = Path(path)
    if not os.path.isdir("/proc") or not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            _remove(stale)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def fsync_tree(root: Path) -> None:
    """fsync every file below `root` (and `root` itself when it is a file)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    for directory in ([] if root.is_file() else [root, *sorted(p for p in root.rglob("*") if p.is_dir())]):
        fsync_dir(directory)


@contextmanager
def atomic_output(path: str | os.PathLike, *, directory: bool = False, needed_bytes: int | None = None,
                  replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (a file, or with `directory` a folder) to write into.

    When the block ends normally the temporary is fsynced, given the usual permissions and
    renamed to `path` (an existing directory at `path` is replaced only after the rename of the
    new one is ready; with `replace=False` an existing `path` is an error). Whatever stops the
    block (an error, KeyboardInterrupt) removes the temporary. OSErrors of the place written to
    become one `OutputError` line naming `path` (and `needed_bytes` when known)."""
    path = Path(path)
    tmp: Path | None = None
    try:
        remove_stale_temps(path)
        tmp = temp_sibling(path, directory)
        yield tmp
        make_public(tmp)
        fsync_tree(tmp)
        if directory and path.exists():
            if not replace:
                raise FileExistsError(errno.EEXIST, f"{path}: exists", str(path))
            old = temp_sibling(path, directory=True)
            os.rename(path, old / path.name)
            os.rename(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as exc:
        if isinstance(exc, OutputError) or exc.errno not in OUTPUT_ERRNOS:
            raise
        raise output_error(path, exc, needed_bytes) from None
    finally:
        if tmp is not None:
            _remove(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    with atomic_output(path, needed_bytes=len(data)) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` removes its temporary files."""


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """Make SIGTERM unwind the stack like SIGINT (the default kills without cleanup). For CLIs."""
    try:
        signal.signal(signal.SIGTERM, _raise_interrupted)
    except ValueError:  # not the main thread
        pass
