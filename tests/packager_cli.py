"""`packager ARGS...` run in the test's own process through the real entry point (packager.cli.main),
so that monkeypatches (a full disk, a failing library call) reach the command."""
from __future__ import annotations

import sys
import textwrap

from packager import cli

# the top of a script for a fresh interpreter: run("calibrate", ...) runs a packager command and fails
# the script unless it exits 0 (the script then proves something of that process, e.g. no torch)
RUNNER_SCRIPT = textwrap.dedent("""
    import sys
    from click.testing import CliRunner
    from packager.cli import cli
    runner = CliRunner()
    def run(*args):
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        print(result.output)
""")


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
