"""A simulated full disk for the tests of writing stages: a write wrapper that raises ENOSPC after N bytes."""
from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path


class FullDisk:
    """Every write below `root` (Python file objects, also through pathlib, os.write, copy_file_range) raises ENOSPC
    once `limit` bytes have been written there."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root, self.limit, self.written = str(root), limit, 0

    def charge(self, n: int) -> None:
        if self.written + n > self.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += n

    def below(self, fd_or_path) -> bool:
        try:
            path = os.readlink(f"/proc/self/fd/{fd_or_path}") if isinstance(fd_or_path, int) else os.fspath(fd_or_path)
        except OSError:
            return False
        return os.path.abspath(path).startswith(self.root)

    def install(self, monkeypatch) -> None:
        disk, real_open, real_write = self, builtins.open, os.write

        class Limited:
            def __init__(self, handle):
                self._handle = handle

            def write(self, data):
                disk.charge(len(data.encode()) if isinstance(data, str) else len(memoryview(data).cast("B")))
                return self._handle.write(data)

            def fileno(self):  # numpy's tofile writes through the descriptor: a full device
                disk.charge(1)
                return self._handle.fileno()

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._handle.close()

            def __getattr__(self, name):
                return getattr(self._handle, name)

        def open_(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            writing = any(flag in mode for flag in "wax+")
            return Limited(handle) if writing and not isinstance(file, int) and disk.below(file) else handle

        def write_(fd, data):
            if disk.below(fd):
                disk.charge(len(data))
            return real_write(fd, data)

        def no_kernel_copy(*args, **kwargs):
            raise OSError(errno.EXDEV, "simulated: no kernel copy")

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)  # what Path.open/write_bytes call
        monkeypatch.setattr(os, "write", write_)
        if hasattr(os, "copy_file_range"):
            monkeypatch.setattr(os, "copy_file_range", no_kernel_copy)
