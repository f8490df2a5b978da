"""Memory of a process as Linux reports it in /proc/PID/status, in bytes.

VmRSS (resident now), VmHWM (peak resident since start or the last reset; memory-mapped model
pages included), RssAnon (anonymous: the memory that cannot be reclaimed), RssFile (file-backed
pages). Where there is no /proc (macOS, Windows) VmRSS and VmHWM fall back to psutil's rss when
psutil is installed; otherwise the result is empty."""
from __future__ import annotations

import os


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """Every `kB` line of /proc/PID/status, in bytes; {} when the process is gone."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if len(fields) == 2 and fields[1] == "kB":
                    values[key] = int(fields[0]) * 1024
    except OSError:  # the process is gone, or there is no /proc
        return {} if os.path.isdir("/proc") else _psutil_status(pid)
    return values


def _psutil_status(pid: int | str) -> dict[str, int]:
    try:
        import psutil
    except ImportError:
        return {}
    try:
        rss = (psutil.Process() if pid == "self" else psutil.Process(int(pid))).memory_info().rss
    except (psutil.Error, ValueError):
        return {}
    return {"VmRSS": rss, "VmHWM": rss}
