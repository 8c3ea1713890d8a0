"""Benchmark harness: a versioned suite of brain pairs, every registry method with shipped weights, identity,
ANTs SyN and Elastix, scored with the engine's metrics; and a 1 mm speed script. See docs/BENCHMARK.md.

This module imports only the standard library, so a spawned worker can limit threads before numpy, torch, ANTs
or ITK load.
"""

from __future__ import annotations

import os

THREAD_VARIABLES = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "OPENBLAS_NUM_THREADS")


def set_threads(threads: int) -> None:
    """Limit ITK (ANTs, Elastix), OpenMP and BLAS threads; effective for libraries not yet loaded."""
    for var in THREAD_VARIABLES:
        os.environ[var] = str(int(threads))
