"""Paper-scale benchmark: the mann-edge bundle runtime against onnxruntime and LiteRT (dense and our exports).

    python benchmarks/paper_scale.py                  # report, one thread and all cores
    python benchmarks/paper_scale.py --json --repeats 500 --out /tmp/paper
    python benchmarks/paper_scale.py my_mann.keras --task-names a,b --threads 1   # your own model

The work is in `mann_edge.benchmark` (also `mann-edge bench`); this script only calls it.
"""

import sys

from mann_edge.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
