"""The layering (README, Architecture): `runtime` <- the build core <- the stages <- `packager.build`,
experiments and the CLIs; nothing points up. The device runtime stands alone: `runtime/` imports
nothing of the build side, and the base install (pyproject `dependencies`) is exactly what
`runtime/` imports. Imports inside functions count too."""
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


# the build side's core is the package `packager.core` (arch facts, checkpoint I/O and its formats,
# plan/stats files, fingerprint, provenance, streamed execution) plus `packager/__init__`; it imports
# only itself and runtime. The layout shows the layer, so no list of core modules is kept here.
CORE_PACKAGE = "packager.core"
# what drives the stages; nothing below imports it
TOP = {"packager.build", "packager.experiments", "packager.experiment_cells", "packager.cli", "packager.commands",
       "converters.gguf.cli", "converters.onnx.cli"}
LAYERS = ("runtime", "core", "stage", "top")  # every other module of packager/ and converters/ is a stage


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    if module.split(".")[0] == "runtime":
        return "runtime"
    if module == "packager" or module == CORE_PACKAGE or module.startswith(CORE_PACKAGE + "."):
        return "core"
    if any(module == top or module.startswith(top + ".") for top in TOP):
        return "top"
    return "stage"


def _project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports (the longest known prefix of each imported name)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def test_nothing_points_up():
    files = {_module_name(path): path for package in ("runtime", "packager", "converters")
             for path in (REPO / package).rglob("*.py")}
    modules = set(files)
    assert {"packager.core.arch.spec", "packager.core.checkpoint"} <= modules and all(top in modules for top in TOP)
    upward = sorted(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
                    for module, path in files.items() for target in _project_imports(path, modules) - {module}
                    if LAYERS.index(_layer(target)) > LAYERS.index(_layer(module)))
    assert upward == []
    for package in ("runtime", "packager", "converters"):
        assert not _imported_roots(REPO / package) & {"models", "bench", "tests"}


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
