"""CPU benchmark of nllloss against torch (and jax, plain NumPy, a memory floor).

Usage: ``python benchmarks/cpu.py [--quick] [--shapes 4096x1000 ...] [--dtype float32 ...]``;
``--help`` lists the options, ``benchmarks/README.md`` explains the output. The harness itself
is ``benchmarks/harness.py``.
"""

from __future__ import annotations

import sys

from harness import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
