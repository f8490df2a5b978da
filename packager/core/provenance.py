"""What every output records about the software that produced it."""
from __future__ import annotations

import os
import platform
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


def created_unix() -> dict[str, int]:
    """`{"created_unix": T}` with T from SOURCE_DATE_EPOCH when it is set, else `{}`: model files
    carry no wall-clock time of their own, so the same inputs give byte-identical files."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    return {"created_unix": int(value)} if value.isdigit() else {}
