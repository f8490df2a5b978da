"""Build side of the edge translation packager (needs the `build` extra: torch, transformers...)."""
__version__ = "0.1.0"
