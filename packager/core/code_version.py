"""Which code computed a cached result.

A cached result (a `packager build` step, an experiment cell) is only valid for the code that
computed it. `code_digest("packager.verify")` is the sha256 of the project's source files that the
named modules can run: the modules themselves plus every project module they import, at module
level or inside a function, followed transitively (read with `ast`, nothing is imported). Any edit
to one of those files changes the digest, so the cache entry no longer matches and the result is
computed again; an edit elsewhere (the report page, a benchmark) leaves it valid.

Only imports of the project's own packages count: a new version of torch or llama.cpp is recorded
in provenance, not here.
"""
from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PROJECT_PACKAGES = ("packager", "converters", "runtime")
SOURCE_ROOT = Path(__file__).resolve().parents[2]
DIGEST_PREFIX = b"edge-packager-code-v1\n"


def _module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, name: str) -> set[str]:
    """Dotted names a module imports (`from a import b` gives `a` and `a.b`: b may be a module)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def source_files(modules: tuple[str, ...], root: Path = SOURCE_ROOT) -> list[Path]:
    """The project's source files that `modules` can run (see the module docstring)."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in PROJECT_PACKAGES:
            continue
        path = _module_file(name, root)
        if path is None:  # `from packager import __version__`: a name, not a module
            continue
        seen[name] = path
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # importing a.b runs a/__init__.py
        todo.extend(_imported_names(path, name))
    return sorted(set(seen.values()))


@functools.lru_cache(maxsize=None)
def code_digest(*modules: str, root: Path = SOURCE_ROOT) -> str:
    """sha256 over the relative path and bytes of every file in `source_files(modules)`."""
    missing = [m for m in modules if _module_file(m, root) is None]
    if missing:
        raise ValueError(f"no source file for module(s) {', '.join(map(repr, missing))} under {root}")
    digest = hashlib.sha256(DIGEST_PREFIX)
    for path in source_files(tuple(modules), root):
        data = path.read_bytes()
        digest.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode("utf-8"))
        digest.update(data)
    return digest.hexdigest()
