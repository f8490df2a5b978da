"""The device runtime stands alone: `runtime/` imports nothing of the build side, and the base
install (pyproject `dependencies`) is exactly what `runtime/` imports."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# distribution name -> the module it installs, for the base dependencies
MODULE_OF = {"llama-cpp-python": "llama_cpp", "jinja2": "jinja2"}
OPTIONAL = {"psutil"}  # imported only inside `try: ... except ImportError` (runtime/memory.py off Linux)


def _imported_roots(package: Path) -> set[str]:
    roots = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                roots.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                roots.add(node.args[0].value.split(".")[0])  # importlib.import_module("llama_cpp.llama_cpp")
    return roots


def test_runtime_imports_nothing_of_the_build_side():
    assert not _imported_roots(REPO / "runtime") & {"packager", "converters", "models", "bench", "tests"}


def test_base_dependencies_are_what_runtime_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = [re.split(r"[=<>;\[ ]", dep, maxsplit=1)[0] for dep in project["dependencies"]]
    modules = {MODULE_OF.get(name, name.replace("-", "_")) for name in names}
    third_party = _imported_roots(REPO / "runtime") - set(sys.stdlib_module_names) - {"runtime", "__future__"}
    assert third_party - OPTIONAL == modules
