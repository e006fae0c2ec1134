"""`mann-edge demo`: a shipped sample MANN through compaction, every export, verification and a prediction per task.

Example:
    $ mann-edge demo                       # writes ./mann-edge-demo
    $ mann-edge demo --sample vision_text --out /tmp/demo --force
    $ mann-edge demo --train               # train the sample with RSN2 first (about a minute)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mann_edge import samples
from mann_edge.api import DEFAULT_FORMATS, ConvertResult, convert, output_paths, print_progress
from mann_edge.formats import FORMATS

__all__ = ["run_demo", "add_arguments"]

LATENCY_RUNS = 200
# processes per backend, measured in turns: a small model's runs take microseconds, and on shared cores one
# process can run a quarter slower than the next (`mann_edge.benchmark.run_benchmark`'s ``rounds``)
LATENCY_ROUNDS = 3


def _nonempty(value: str) -> str:
    from mann_edge.cli import nonempty  # the command's one rule for path arguments

    return nonempty(value)


def add_arguments(parser) -> None:
    parser.add_argument("--sample", default="vision_tabular", choices=sorted(samples.SAMPLES),
                        help="which shipped sample MANN (default: %(default)s)")
    parser.add_argument("--out", type=_nonempty, default="mann-edge-demo", help="directory for the demo's files (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite the files of an earlier demo run")
    parser.add_argument("--train", action="store_true",
                        help="train the sample with RSN2 (a dense twin, then prune each task towards 90%% of its own "
                             "weights, each step recovered before it is judged; about a minute on 2 cores) instead "
                             "of using the shipped one; the summary says per task the sparsity reached, why pruning "
                             "stopped and the test accuracy dense vs pruned")


def run_demo(args) -> int:
    """Runs the demo for the sample and output directory in ``args``; prints what it does and the figures."""
    name, out = args.sample, Path(args.out)
    if args.train:
        from mann_edge import determinism

        # Before anything loads TensorFlow: oneDNN would pick kernels (and so the weights) by the CPU it runs on.
        determinism.prepare_environment()
        output_paths(out, DEFAULT_FORMATS, force=args.force)  # refuse before a minute of training, not after
        from mann_edge.sample_training import train_sample

        print(f"Training sample MANN '{name}' with RSN2 (progress below; about a minute on 2 cores)", flush=True)
        record = train_sample(name, out, force=args.force)
        source = out / record["model"]
        print(f"\nSample MANN '{name}' ({source}), just trained in {record['train_seconds']:.0f} s:")
    else:
        record, source = samples.sample_record(name), samples.sample_path(name)
        print(f"Sample MANN '{name}' ({source.name}), trained with RSN2 by sample_models/train.py:")
    print("\n".join(samples.summary_lines(record)))
    print()
    result = convert(source, out, formats=DEFAULT_FORMATS, task_names=samples.sample_tasks(name),
                     force=args.force, progress=print_progress)
    print("\nExports (every task verified against the compact model):")
    print(result.format_table())
    print("\nOne prediction per task on a held-out example, on every backend this machine runs:")
    print(_predictions_table(name, result))
    for name in result.artifacts:
        if not FORMATS[name].runs_here():
            where = ", ".join({"Darwin": "macOS"}.get(system, system) for system in FORMATS[name].runs_on)
            print(f"\n{FORMATS[name].title} predicts on {where} only; here its export was verified without that "
                  "runtime (Core ML: by evaluating the saved ML programs in numpy; see `mann-edge verify`).")
    print(f"\nFiles in {out}/. Next: `mann-edge inspect {out}/model.mann --plot masks.png`")
    return 0


def _backends(result: ConvertResult) -> dict[str, Path]:
    """The artifacts whose runtime predicts on this machine, by format."""
    return {name: path for name, path in result.artifacts.items() if FORMATS[name].runs_here()}


def _predictions_table(name: str, result: ConvertResult) -> str:
    """Per task and backend: the prediction on a held-out example, and the batch-1 latency as `mann-edge bench`
    measures it (`mann_edge.benchmark.measure_exports`: each backend in a fresh process, one thread)."""
    from mann_edge import benchmark, runtime
    from mann_edge.bundle import load_compact

    data = samples.sample_data(name)
    paths = _backends(result)
    measured = benchmark.measure_exports(load_compact(paths["mann"]), paths, repeats=LATENCY_RUNS,
                                         rounds=LATENCY_ROUNDS)
    latency = benchmark.latencies(measured)
    header = f"{'task':<10} {'backend':<12} {'predicted':>9} {'label':>6} {'batch-1 median':>15} {'vs fastest other':>17}"
    lines = [header, "-" * len(header)]
    for format, path in paths.items():
        session = runtime.load(path)
        for task in session.tasks:
            x, label = data[task.name].x_test[:1], int(data[task.name].y_test[0])
            (probabilities,) = session.run(task.name, x)
            seconds = latency[format][task.name]
            others = [by_task[task.name] for other, by_task in latency.items() if other != format]
            ratio = f"x{min(others) / seconds:.2f}" if others else "-"
            lines.append(f"{task.name:<10} {session.backend:<12} {int(np.argmax(probabilities)):>9} {label:>6} "
                         f"{seconds * 1e3:>12.3f} ms {ratio:>17}")
    lines.append(f"(median of {LATENCY_RUNS} runs in each of {LATENCY_ROUNDS} processes per backend, one thread; "
                 "'vs fastest other' > 1: faster than every other backend. "
                 f"The same measurement with batch 32, all threads and dense peers: `mann-edge bench {paths['mann']}`)")
    return "\n".join(lines)
