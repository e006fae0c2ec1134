"""The `mann-edge` command.

Every subcommand exits 0 on success, 1 with a one-line ``mann-edge: error: ...``
on bad input (the traceback only with ``--debug``), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import threading
import warnings
from typing import Callable, Sequence

from mann_edge._version import __version__
from mann_edge.formats import EXPORT_FORMATS, FORMATS

__all__ = ["main"]

COMMANDS: dict[str, Callable] = {}


def command(function: Callable) -> Callable:
    COMMANDS[function.__name__.removeprefix("cmd_").replace("_", "-")] = function
    return function


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [item.strip() for item in value.split(",") if item.strip()]


# Argument types: an empty value is refused as bad usage (exit 2), never read as "the current directory"
# (Path("") is ".") or "nothing" (an empty --to would write the bundle alone).


def nonempty(value: str) -> str:
    """A path argument: refused when empty or blank."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"must not be empty. Received: {value!r}")
    return value


def names(value: str) -> list[str]:
    """A comma-separated list of names: refused unless it holds at least one."""
    items = _csv(value)
    if not items:
        raise argparse.ArgumentTypeError(f"must name at least one, comma-separated. Received: {value!r}")
    return items


@command
def cmd_inspect(args) -> int:
    from mann_edge.inspection import format_keras_report, format_report, inspect_source

    model, report = inspect_source(args.path, args.task_names)
    print(json.dumps(report, indent=1) if args.json else (format_report if model else format_keras_report)(report))
    if args.plot:
        from mann_edge.api import exported_sizes
        from mann_edge.errors import CompactionError
        from mann_edge.plotting import plot_masks

        if model is None:
            raise CompactionError(f"{args.path}: no mask plot for a model that cannot be compacted; change the "
                                  f"{len(report['problems'])} layer(s) listed above first")
        sizes = {"dense float32 weights": report["total"]["dense_bytes"], "CSR weights": report["total"]["bytes"],
                 **exported_sizes(os.path.dirname(os.path.abspath(args.path)))}
        print(f"wrote {plot_masks(model, args.plot, formats_bytes=sizes, force=args.force)}", file=sys.stderr)
    return 0


@command
def cmd_convert(args) -> int:
    from mann_edge.api import convert, print_progress
    from mann_edge.errors import MannEdgeError

    options = {}
    if args.coreml_target:
        options["coreml"] = {"target": args.coreml_target}
    if args.int8_io:
        options["tflite"] = {"int8_io": True}
    if args.batch is not None:  # the formats with fixed input shapes among those asked for
        fixed = [name for name in args.to if FORMATS[name].fixed_batch]
        if not fixed:
            takes = [name for name, fmt in FORMATS.items() if fmt.fixed_batch]
            raise MannEdgeError(f"--batch fixes the input shapes of the {', '.join(takes)} exports; --to asks for {args.to}")
        for name in fixed:
            options.setdefault(name, {})["batch"] = args.batch
    result = convert(
        args.source, args.out, formats=args.to, tasks=args.tasks, task_names=args.task_names,
        dtype=args.dtype, force=args.force, verify=not args.no_verify, strict=args.strict, options=options,
        calibration=args.calibration, evaluation=args.eval, metric=args.metric, storage=args.storage,
        progress=print_progress,
    )
    if args.json:
        print(json.dumps({"artifacts": {k: str(v) for k, v in result.artifacts.items()}, "table": result.table,
                          "files": result.files, "seconds": result.seconds, "metric": result.metric,
                          "scores": result.scores, "storage": result.storage, "skipped": result.skipped}, indent=1))
    else:
        print(result.format_table())
    return 0


@command
def cmd_verify(args) -> int:
    from mann_edge.api import verify

    report = verify(args.artifact, args.against, tasks=args.tasks, task_names=args.task_names,
                    calibration=args.calibration)
    for check in report.checks:
        status = "ok" if check.ok else f"MISMATCH {check.problem}".strip()
        print(f"{check.task:<16} {check.output:<20} batch {check.batch:<3} max abs error {check.max_abs_error:.2e}  {status}")
    report.raise_for_errors()
    print(f"{args.artifact}: every task matches {args.against} (max abs error {report.max_abs_error:.2e})")
    return 0


@command
def cmd_bench(args) -> int:
    from mann_edge.benchmark import run

    return run(args)


@command
def cmd_demo(args) -> int:
    from mann_edge.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mann-edge",
        description="Compact, export and run sparse multitask neural networks (MANN, RSN2).",
    )
    parser.add_argument("--version", action="version", version=f"mann-edge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="tasks, per-layer and per-task density and bytes of a model")
    p.add_argument("path", type=nonempty, help="a .keras, legacy .h5 or .mann file")
    p.add_argument("--task-names", type=names, help="comma-separated names for the tasks (in output order)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p.add_argument("--plot", type=nonempty, metavar="OUT.png", help="also draw the masks by task and the bytes into a PNG")
    p.add_argument("--force", action="store_true", help="overwrite an existing plot")

    exports = ", ".join(FORMATS[name].title for name in EXPORT_FORMATS)
    p = sub.add_parser("convert", help=f"compact a model and export it to {exports}, verified")
    p.add_argument("source", type=nonempty, help="a .keras, legacy .h5 or .mann file")
    p.add_argument("-o", "--out", type=nonempty, required=True, help="output directory (made if missing)")
    p.add_argument("--to", type=names, default=",".join(EXPORT_FORMATS),
                   help=f"formats, comma-separated, of {list(EXPORT_FORMATS)} (default: %(default)s)")
    p.add_argument("--tasks", type=names, help="export only these tasks, comma-separated")
    p.add_argument("--task-names", type=names, help="comma-separated names for the source's tasks (in output order)")
    dtypes = list(dict.fromkeys(d for name in EXPORT_FORMATS for d in FORMATS[name].dtypes))
    takes = "; ".join(f"{d}: {', '.join(n for n in EXPORT_FORMATS if d in FORMATS[n].dtypes)}" for d in dtypes)
    p.add_argument("--dtype", default="float32", choices=dtypes,
                   help=f"stored weight values ({takes}; default: %(default)s)")
    p.add_argument("--calibration", type=nonempty, metavar="DATA.npz",
                   help="representative inputs, one array per model input name: int8 calibrates on them, and "
                        "every quantized export (int8, palettized) is verified on them")
    p.add_argument("--int8-io", action="store_true", help="with --dtype int8: int8 input and output tensors (default: float)")
    p.add_argument("--eval", type=nonempty, metavar="DATA.npz",
                   help="labelled data (inputs by name, labels under each task's first output name): "
                        "accuracy (or --metric) per task and export next to float32")
    from mann_edge.converters.validation import METRICS

    p.add_argument("--metric", choices=sorted(METRICS), default="accuracy",
                   help="what --eval measures: accuracy (labels: class ids or one-hot) or mae (targets of the "
                        "output's shape; default: %(default)s)")
    p.add_argument("--storage", choices=("sparse", "dense", "auto"),
                   help="sparse weights in each format's sparse encoding (default), dense, or auto: both measured "
                        "(batch 1, one thread, latency and peak memory), the sparse one kept when smaller and as fast")
    p.add_argument("--batch", type=int, metavar="N",
                   help="fix the batch dimension of the tflite, onnx and ort exports to N (accelerator delegates "
                        "and mobile execution providers, NNAPI and Core ML, plan static shapes; default: free)")
    p.add_argument("--coreml-target", type=nonempty, help="Core ML deployment target, e.g. macOS13 (default), iOS16, macOS15 (multifunction)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--no-verify", action="store_true", help="skip running each export against the compact model")
    p.add_argument("--strict", action="store_true", help="refuse a model whose tasks' masks overlap (default: warn)")
    p.add_argument("--json", action="store_true", help="print the artifacts and table as JSON")

    p = sub.add_parser("verify", help="run an export against the model it came from, every task")
    p.add_argument("artifact", type=nonempty, help="an export: " + ", ".join(f"{f.title} ({f.suffix})" for f in FORMATS.values()))
    p.add_argument("--against", type=nonempty, required=True, help="the source: a .keras, legacy .h5 or .mann file")
    p.add_argument("--tasks", type=names, help="check only these tasks, comma-separated")
    p.add_argument("--task-names", type=names, help="comma-separated names for the source's tasks (in output order)")
    p.add_argument("--calibration", type=nonempty, metavar="DATA.npz",
                   help="check on these representative inputs (one array per input name) instead of random ones: "
                        "a quantized export matches only in the range it was quantized for")

    p = sub.add_parser("bench", help="benchmark the runtime against ONNX Runtime and LiteRT, dense and on our exports "
                                     "(the paper-scale model, or MODEL: a .keras, .h5 or .mann)")
    from mann_edge.benchmark import add_arguments as add_bench_arguments

    add_bench_arguments(p)

    p = sub.add_parser("demo", help="take a shipped sample MANN through compaction, every export and a prediction per task")
    from mann_edge.demo import add_arguments as add_demo_arguments

    add_demo_arguments(p)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"mann-edge: warning: {message}", file=sys.stderr)


# TensorFlow's C++ start-up notices (absl, oneDNN, CPU features) ignore TF_CPP_MIN_LOG_LEVEL.
_NATIVE_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\)|[IW]\d{4} [\d:.]+\s+\d+ \S+:\d+\] "
    rb"|To enable the following instructions:)"
)


@contextlib.contextmanager
def _without_native_log_noise():
    """Passes what is written to file descriptor 2 through, minus TensorFlow's native info and warning lines."""
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not _NATIVE_NOISE.match(line):
                    os.write(terminal, line)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # closes the pipe's write end: the thread reads to the end and stops
        thread.join(timeout=10)
        os.close(terminal)


def _one_line(error: Exception, args) -> str:
    """The error as one line. mann-edge's own errors name their file; anything else (a bug, or a library's
    error that got through) is named with its type and the command's files, so the line still says where."""
    from mann_edge.errors import MannEdgeError

    text = str(error).strip()
    message = text.splitlines()[0] if text else ""
    if isinstance(error, (MannEdgeError, OSError)) and message:
        return message
    files = [str(getattr(args, name)) for name in ("path", "source", "artifact", "against") if getattr(args, name, None)]
    where = f" (while reading {', '.join(files)})" if files else ""
    return f"{type(error).__name__}: {message or 'no message'}{where}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    shown = warnings.showwarning
    if not args.debug:
        warnings.showwarning = _one_line_warning
    try:
        with contextlib.nullcontext() if args.debug else _without_native_log_noise():
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("mann-edge: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure becomes one line; --debug shows where
        if args.debug:
            raise
        print(f"mann-edge: error: {_one_line(error, args)}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
