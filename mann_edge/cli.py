"""The `mann-edge` command.

Every subcommand exits 0 on success, 1 with a one-line ``mann-edge: error: ...``
on bad input (the traceback only with ``--debug``), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

from mann_edge._version import __version__

__all__ = ["main"]

COMMANDS: dict[str, Callable] = {}


def command(function: Callable) -> Callable:
    COMMANDS[function.__name__.removeprefix("cmd_").replace("_", "-")] = function
    return function


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [item.strip() for item in value.split(",") if item.strip()]


@command
def cmd_inspect(args) -> int:
    from mann_edge.inspection import format_report, inspect

    report = inspect(args.path, _csv(args.task_names))
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


@command
def cmd_demo(args) -> int:
    from mann_edge.demo import run_demo

    run_demo(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mann-edge",
        description="Compact, export and run sparse multitask neural networks (MANN, RSN2).",
    )
    parser.add_argument("--version", action="version", version=f"mann-edge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="tasks, per-layer and per-task density and bytes of a model")
    p.add_argument("path", help="a .keras, legacy .h5 or .mann file")
    p.add_argument("--task-names", help="comma-separated names for the tasks (in output order)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = sub.add_parser("demo", help="train a small sample MANN with RSN2 and show what mann-edge does with it")
    p.add_argument("--out", default="mann-edge-demo", help="directory for the demo's files (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("mann-edge: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure becomes one line; --debug shows where
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"mann-edge: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
