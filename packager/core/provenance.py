"""What every output records about the software that produced it."""
from __future__ import annotations

import os
import platform
import time
from importlib import metadata

from packager import __version__


def versions(*distributions: str) -> dict[str, str | None]:
    """The packager's and Python's versions and those of the named installed distributions
    (None for one that is not installed). Read from the installed metadata: nothing is imported."""
    found: dict[str, str | None] = {"packager": __version__, "python": platform.python_version()}
    for name in distributions:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def source_date_epoch() -> int | None:
    """The build time a reproducible build asks for (SOURCE_DATE_EPOCH, reproducible-builds.org), or None."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    return int(value) if value.isdigit() else None


def created_unix() -> dict[str, int]:
    """`{"created_unix": T}` with T from SOURCE_DATE_EPOCH when it is set, else `{}`: outputs carry
    no wall-clock time of their own, so the same inputs give byte-identical files."""
    epoch = source_date_epoch()
    return {"created_unix": epoch} if epoch is not None else {}


def created_utc(key: str = "created", fmt: str = "%Y-%m-%dT%H:%M:%SZ") -> dict[str, str]:
    """`{key: SOURCE_DATE_EPOCH as UTC text}` when it is set, else `{}` (see `created_unix`)."""
    epoch = source_date_epoch()
    return {key: time.strftime(fmt, time.gmtime(epoch))} if epoch is not None else {}
