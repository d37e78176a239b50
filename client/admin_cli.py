"""``histohelper admin``: load, unload, set the default of, and rescan a server's model
repository (``histohelper.v1.ModelAdminService``; the caller needs the ``admin`` role:
a token with it in ``$HISTOHELPER_TOKEN``, or a mutual-TLS client certificate).

Each command prints the repository after the change (model, version, state, defaults).
Exit codes: 0 done, 1 refused by the server (the reason is printed), 2 bad usage.
"""

from __future__ import annotations

import argparse
from typing import Any

from histohelper.client.cli import _add_connection_arguments, _guarded, _make_client
from histohelper.client.models import format_listing, parse_model_arg


def add_subcommands(subparsers: Any) -> None:
    """Register ``admin`` with its actions."""
    p = subparsers.add_parser(
        "admin",
        help="load, unload, set the default of, or rescan a server's model repository",
        description="Administer the model repository of a server started with "
        "--model-repository (ModelAdminService; needs the 'admin' role). Prints the "
        "repository after the change.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("load", "load and warm NAME[:VERSION] so it serves without a first-use load"),
        ("unload", "unload NAME:VERSION (refused while calls use it, or for a default version)"),
        ("set-default", "make NAME:VERSION its model's default"),
        ("rescan", "rescan the repository now (as the server's poll or SIGHUP does)"),
    ):
        a = actions.add_parser(name, help=text, description=text)
        if name != "rescan":
            a.add_argument("model", metavar="NAME[:VERSION]", type=parse_model_arg)
        if name == "set-default":
            a.add_argument(
                "--server-default",
                action="store_true",
                help="also make NAME the server's default model",
            )
        _add_connection_arguments(a)
        a.set_defaults(func=_guarded("admin", _admin))


def _admin(args: argparse.Namespace) -> int:
    with _make_client(args) as client:
        admin = client.admin(timeout=args.timeout)
        if args.action == "load":
            models = admin.load(args.model)
        elif args.action == "unload":
            models = admin.unload(args.model)
        elif args.action == "set-default":
            models = admin.set_default(args.model, server_default=args.server_default)
        else:
            models = admin.rescan()
    print(format_listing(models))
    return 0
