"""Quaternion batch norm vs nn.BatchNorm2d, forward+backward (see quatnn.bench.norm)."""

import sys

from quatnn.bench.norm import main

raise SystemExit(main(sys.argv[1:]))
