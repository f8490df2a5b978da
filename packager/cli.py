"""The `packager` command. Subcommands are imported lazily so `--help` is fast and a
missing build extra is reported in one line instead of a traceback."""
from __future__ import annotations

import importlib
import sys

import click

from packager import __version__

# name -> "module:attribute" of a click command or group. Each stage owns its module.
COMMANDS = {
    "inspect": "packager.commands.inspect_cmd:inspect_command",
    "prune": "packager.commands.prune_cmd:prune_command",
    "calibrate": "packager.commands.calibrate_cmd:calibrate_command",
    "stats": "packager.commands.stats_cmd:stats_group",
    "plan": "packager.commands.plan_cmd:plan_group",
    "export": "packager.commands.export_cmd:export_group",
    "prune-gguf": "converters.gguf.cli:prune_gguf_command",
    "distill": "packager.commands.distill_cmd:distill_command",
    "verify": "packager.commands.verify_cmd:verify_command",
    "bundle": "packager.commands.bundle_cmd:bundle_command",
    "fit": "packager.commands.fit_cmd:fit_command",
    "report": "packager.commands.report_cmd:report_command",
    "build": "packager.commands.build_cmd:build_command",
}

BUILD_EXTRA_HINT = "install the build side first: pip install 'edge-translation-packager[build]' (torch, transformers, ...)"
GGUF_EXTRA_HINT = ("install the GGUF build side first: pip install 'edge-translation-packager[gguf]' (no torch; or '[build]' "
                   "for everything)")
# top-level modules of the extras -> the hint that names what to install
TORCH_MODULES = {"torch", "transformers", "onnx", "onnxscript", "polib", "scipy"}
GGUF_MODULES = {"rich", "safetensors", "gguf", "sacrebleu", "matplotlib", "lingua"}  # rich: in both extras


def missing_module_hint(name: str | None) -> str | None:
    """One line for a build-side module that is not installed, or None for anything else."""
    root = (name or "").split(".")[0]
    if root in TORCH_MODULES:
        return (f"{root} is missing: {BUILD_EXTRA_HINT}; only a GGUF parent (calibrate/build on a .gguf, prune-gguf) "
                f"works without it")
    if root in GGUF_MODULES:
        return f"{root} is missing: {GGUF_EXTRA_HINT}"
    return None


def load_command(spec: str) -> click.Command:
    module_name, attribute = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        hint = missing_module_hint(exc.name)
        if hint:
            raise click.ClickException(hint) from None
        raise
    return getattr(module, attribute)


class LazyGroup(click.Group):
    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands or {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx, name):
        if name in self.lazy_commands:
            try:
                return load_command(self.lazy_commands[name])
            except (ModuleNotFoundError, AttributeError):
                if ctx.resilient_parsing or "--help" in sys.argv:
                    return None  # not built yet: hide it from --help
                raise
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="packager")
@click.option("-v", "--verbose", count=True, help="more log output (repeat for debug)")
def cli(verbose: int) -> None:
    """Prune a mixture-of-experts LLM into small offline translators."""
    import logging

    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    from packager.core.errors import PackagerError
    from runtime.atomic import OUTPUT_ERRNOS, interrupt_on_sigterm, output_error
    from runtime.errors import EdgeError

    interrupt_on_sigterm()  # SIGTERM unwinds like Ctrl-C: every stage removes its temporary files
    try:
        # not standalone: click would turn Ctrl-C into "Aborted!"; its exit codes are returned instead
        code = cli(prog_name="packager", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort:  # Ctrl-C inside a click prompt
        _interrupted()
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except (PackagerError, EdgeError) as exc:
        click.echo("error: " + " ".join(str(exc).split()), err=True)
        sys.exit(1)
    except OSError as exc:  # a write outside runtime.atomic.atomic_output: still one line naming the path
        if exc.errno not in OUTPUT_ERRNOS or not exc.filename:
            raise
        click.echo("error: " + str(output_error(exc.filename, exc)), err=True)
        sys.exit(1)
    except ModuleNotFoundError as exc:  # a stage that needs an extra this install lacks (e.g. torch)
        hint = missing_module_hint(exc.name)
        if hint is None:
            raise
        click.echo("error: " + hint, err=True)
        sys.exit(1)


def _interrupted() -> None:
    click.echo("interrupted; nothing half-written was left behind", err=True)
    sys.exit(130)


if __name__ == "__main__":
    main()
