"""Run Python code in a fresh interpreter in which some packages cannot be imported: the proof
that a path (the device runtime, the GGUF chain) needs nothing of the build side or of torch."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def blocker(*roots: str) -> str:
    """Python source that makes importing any module under `roots` raise ModuleNotFoundError."""
    return textwrap.dedent(f"""
        import sys
        BLOCKED = {sorted(roots)!r}

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"blocked in this test: {{name}}", name=name)
                return None

        sys.meta_path.insert(0, Blocker())
    """)


def run_blocked(tmp_path: Path, roots: tuple[str, ...], code: str, *args: str,
                timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -c code args...` with `roots` blocked from the start (a sitecustomize.py in `tmp_path`);
    the child exits with "blocker not active" if that sitecustomize was not loaded."""
    (tmp_path / "sitecustomize.py").write_text(blocker(*roots))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    check = ("import sys\nif not any(type(f).__name__ == 'Blocker' for f in sys.meta_path):\n"
             "    raise SystemExit('blocker not active')\n")
    return subprocess.run([sys.executable, "-c", check + code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
