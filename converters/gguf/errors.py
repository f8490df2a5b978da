"""Errors of the GGUF converter (all PackagerError: the CLI prints one line)."""
from __future__ import annotations

from packager.core.errors import PackagerError


class GGUFExportError(PackagerError):
    """A checkpoint that stock llama.cpp could not run as exported, or a bad export request."""


class GGUFFileError(PackagerError):
    """A GGUF file that is missing, truncated, corrupt or not one of ours where that matters."""


class QuantizeError(PackagerError):
    """llama.cpp's quantizer refused or failed."""
