"""`packager ARGS...` run in the test's own process through the real entry point (packager.cli.main),
so that monkeypatches (a full disk, a failing library call) reach the command."""
from __future__ import annotations

import sys

from packager import cli


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `packager ARGS...`."""
    capsys.readouterr()  # drop output of earlier steps (model building)
    monkeypatch.setattr(sys, "argv", ["packager", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
