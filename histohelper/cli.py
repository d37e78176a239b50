"""The ``histohelper`` console script: one entry point, subcommands from each part.

Subcommand modules are imported lazily and keep heavy imports (torch, OpenSlide)
inside their run functions, so ``histohelper analyze`` works where only the thin
client is installed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from histohelper import __version__

# module -> it defines add_subcommands(subparsers) registering one or more commands.
_COMMAND_MODULES = (
    "histohelper.model_export.cli",  # export
    "histohelper.server.serve_cli",  # serve
    "histohelper.server.cli",  # tile
    "histohelper.client.cli",  # analyze, info, evaluate
    "histohelper.client.explain_cli",  # explain
    "histohelper.client.admin_cli",  # admin (model repository)
    "histohelper.server.certs",  # certs (cryptography: the certs extra, imported when run)
    "histohelper.server.auth",  # token
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand whose module imports."""
    parser = argparse.ArgumentParser(
        prog="histohelper",
        description="Whole-slide-image deep learning served over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"histohelper {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(name).add_subcommands(sub)
        except ModuleNotFoundError as exc:  # a part whose extra is not installed
            if exc.name and exc.name.startswith("histohelper"):
                raise
            for command in _MODULE_COMMANDS.get(name, ()):
                _add_missing_extra_command(sub, command, exc.name or "?")
    return parser


# Commands of the modules that need an extra at import (their parsers cannot be built
# without it): the thin install still lists them and names the extra when they are run.
_MODULE_COMMANDS = {
    "histohelper.model_export.cli": ("export", "train-mil"),
    "histohelper.server.serve_cli": ("serve",),
    "histohelper.server.cli": ("tile",),
}


def missing_extra_message(command: str, package: str) -> str:
    """What to install for ``command`` when its Python ``package`` is missing."""
    extra = _EXTRAS.get(command, "server")
    return (
        f"histohelper {command}: needs the Python package {package!r}, which the "
        f"plain install leaves out: install the {extra!r} extra, e.g. "
        f"pip install 'histohelper[{extra}] @ git+<repository URL>' (not on PyPI; "
        "README: Install)"
    )


def _add_missing_extra_command(sub: argparse._SubParsersAction, command: str, package: str) -> None:
    p = sub.add_parser(
        command,
        help=f"(needs the {_EXTRAS.get(command, 'server')!r} extra)",
        add_help=False,
        prefix_chars="\0",  # every argument, flags too, goes to "rest": the run refuses
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def run(args: argparse.Namespace) -> int:
        print(missing_extra_message(command, package), file=sys.stderr)
        return 2

    p.set_defaults(func=run)


# Which extra brings the heavy dependencies of each command.
_EXTRAS = {
    "export": "export",
    "train-mil": "export",
    "features": "features",
    "serve": "server",
    "tile": "server",
    "evaluate": "evaluate",
    "certs": "certs",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script. Returns the process exit status (2 for a missing extra;
    1, quietly, when stdout's reader went away, as in ``histohelper evaluate ... | head``)."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # a broken pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The Python documentation's recipe (signal module, "Note on SIGPIPE"): point
        # stdout at devnull so the interpreter's final flush cannot fail again, and exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's error ("histohelper explain: error: ..."), usage and 2
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:  # the thin install lacks this command's extra
        if not exc.name or exc.name.split(".")[0] == "histohelper":
            raise
        print(missing_extra_message(args.command, exc.name), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
