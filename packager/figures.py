"""Matplotlib figures saved as PNG files atomically (runtime.atomic): a reader never sees half a
plot, and an interrupted run leaves no temporary behind."""
from __future__ import annotations

import io
from pathlib import Path


def save_png(fig, path: Path, dpi: int = 90) -> Path:
    """Render `fig` to `path` (temp + rename) and close it."""
    import matplotlib.pyplot as plt

    from runtime.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, buffer.getvalue())
