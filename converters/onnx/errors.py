"""Typed errors of the ONNX exporter (build side: they are PackagerErrors, so the `packager`
CLI prints them as one `error: ...` line)."""
from __future__ import annotations

from packager.core.errors import PackagerError


class OnnxExportError(PackagerError):
    """A checkpoint that cannot be exported to ONNX, or an export that failed a check."""
