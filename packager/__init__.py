"""Build side of the edge translation packager (needs the `build` extra: torch, transformers...)."""
__version__ = "0.1.0"

__all__ = ["__version__", "load_pruned"]


def __getattr__(name):
    # lazy: `import packager` (the CLI, --version) must not import torch/transformers
    if name == "load_pruned":
        from packager.core.pruned_model import load_pruned

        return load_pruned
    raise AttributeError(f"module 'packager' has no attribute {name!r}")
