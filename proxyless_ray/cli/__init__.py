"""The ``proxyless-ray`` command line.

Each feature module owns its subcommand through ``add_cli(subparsers)``, which registers a parser whose
``func(args) -> int`` runs it. Errors a user can fix (bad config, missing data, bad values) print one clear line
and exit with status 2; nothing is half-written because every writer goes through a temp file and a rename.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

from proxyless_ray.distributed.cluster import ClusterLostError  # standard library only: no Ray or torch at start-up

# Modules that contribute subcommands, in help order. Each imports the library inside its command function, on
# purpose: `proxyless-ray --help` and a bad argument answer without loading Ray or MLflow.
COMMAND_MODULES = (
    "proxyless_ray.cli.search",
    "proxyless_ray.cli.sweep",
    "proxyless_ray.cli.train",
    "proxyless_ray.cli.demo",
    "proxyless_ray.cli.prepare_data",
    "proxyless_ray.cli.profile",
    "proxyless_ray.cli.tracking",
)


RESUMABLE = ("search", "sweep")  # commands whose interrupt message ends with the --resume command


class UserError(Exception):
    """An error caused by the user's input: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxyless-ray",
        description="ProxylessNAS hardware-aware architecture search on Ray Train / Ray Tune with MLflow tracking.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from proxyless_ray.runtime import apply_process_defaults

    apply_process_defaults()  # before torch loads OpenMP: allocator, and the wait policy of a process owning its cores
    parser = build_parser()
    args = parser.parse_args(argv)
    args.own_process = argv is None  # the command line's own process, not a caller's: it may re-execute itself
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, PermissionError, NotADirectoryError) as err:
        if os.environ.get("PROXYLESS_RAY_DEBUG"):
            raise
        print(f"proxyless-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        detail = f": {err}" if str(err) else ""
        if detail and args.command in RESUMABLE:
            words = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
            detail += f"; resume with: proxyless-ray {shlex.join(words)} --resume"
        print(f"proxyless-ray {args.command}: interrupted{detail}", file=sys.stderr)
        return 130
    except ClusterLostError as err:  # not the user's input (status 1), but one line says it all
        if os.environ.get("PROXYLESS_RAY_DEBUG"):
            raise
        print(f"proxyless-ray {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
