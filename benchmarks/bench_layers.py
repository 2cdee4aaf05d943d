"""Quaternion layers (block, rank8, auto) vs the real layers (see quatnn.bench.layers).

python benchmarks/bench_layers.py --out bench-layers.csv
"""

import sys

from quatnn.bench.layers import main

raise SystemExit(main(sys.argv[1:]))
