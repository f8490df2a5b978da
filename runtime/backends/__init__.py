"""Runtime backends behind one interface (`runtime.backends.base.Backend`).

`open_backend(path)` accepts:
- a bundle directory (`manifest.json`) or an export directory with exactly one `*.export.json`;
- an export config / bundle manifest JSON file;
- a model file (`FILE.gguf`, `FILE.onnx`) with its export config `FILE.export.json` beside it
  (a bare .gguf without one still opens: its config comes from the GGUF metadata).
The backend module is imported only when its format is used.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

from runtime.backends.base import GREEDY, Backend, Sampling, Timings
from runtime.errors import BackendError
from runtime.schema import ExportConfig, load_model_config

logger = logging.getLogger(__name__)

BACKENDS = {
    "gguf": "runtime.backends.llama_cpp_backend:LlamaCppBackend",
    "onnx": "runtime.backends.onnx_backend:OnnxBackend",
}
MANIFEST_NAME = "manifest.json"
EXPORT_SUFFIX = ".export.json"

__all__ = ["BACKENDS", "Backend", "GREEDY", "Sampling", "Timings", "backend_class", "export_config_path",
           "open_backend", "resolve_model"]


def export_config_path(model_file: str | Path) -> Path:
    """Where `packager export` writes the config of `model_file`: FILE.gguf -> FILE.export.json."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.stem + EXPORT_SUFFIX)


def backend_class(fmt: str) -> type[Backend]:
    spec = BACKENDS.get(fmt)
    if spec is None:
        raise BackendError(f"no runtime backend for format {fmt!r}; known: {', '.join(BACKENDS)}")
    module_name, attribute = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise BackendError(f"the {fmt} backend is unavailable ({exc})") from None
    return getattr(module, attribute)


def resolve_model(path: str | Path) -> tuple[Path, ExportConfig]:
    """(model file, its config) for any accepted path; raises BackendError / SchemaError."""
    path = Path(path)
    if not path.exists():
        raise BackendError(f"{path}: not found; give a bundle directory, an export config or a model file")
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            config_file = path / MANIFEST_NAME
        else:
            candidates = sorted(path.glob("*" + EXPORT_SUFFIX))
            if len(candidates) != 1:
                found = ", ".join(c.name for c in candidates) or "none"
                raise BackendError(
                    f"{path}: expected {MANIFEST_NAME} or exactly one *{EXPORT_SUFFIX} (found {found}); "
                    f"name the model file or config instead"
                )
            config_file = candidates[0]
        config = load_model_config(config_file)
    elif path.suffix == ".json":
        config_file, config = path, load_model_config(path)
    else:
        config_file = export_config_path(path)
        if config_file.is_file():
            config = load_model_config(config_file)
        elif path.suffix == ".gguf":
            from runtime.backends.llama_cpp_backend import config_from_gguf

            return path, config_from_gguf(path)
        else:
            raise BackendError(f"{path}: no export config {config_file.name} beside it; re-run `packager export`")
        if path.name not in config.model_files:
            raise BackendError(f"{config_file}: describes {config.model_files}, not {path.name}")
        return path, config
    model_file = config.model_paths(config_file.parent)[0]
    if not model_file.is_file():
        raise BackendError(f"{config_file}: model file {config.model_files[0]!r} is missing beside it")
    return model_file, config


def open_backend(path: str | Path, n_threads: int | None = None, **options) -> Backend:
    """Load the model at `path` with the backend its format needs."""
    model_file, config = resolve_model(path)
    return backend_class(config.format).load(model_file, config, n_threads=n_threads, **options)
