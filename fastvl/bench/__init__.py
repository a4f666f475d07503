"""Benchmarks: fastvl against PyTorch and installed peers on realistic shapes.

* :mod:`fastvl.bench.timing`: CPU (perf_counter) and CUDA (event) timers, median and IQR.
* :mod:`fastvl.bench.cases`: the case registry; :mod:`fastvl.bench.suites` holds one module
  of cases per op.
* :mod:`fastvl.bench.runner`: ``python -m fastvl bench`` (table, results.json, results.png).

``benches/`` runs the same cases under pytest-benchmark.
"""

from fastvl.bench.cases import Built, Case, Scale, all_cases, register_case
from fastvl.bench.timing import Timing, time_callable, time_cpu, time_cuda

__all__ = [
    "Built",
    "Case",
    "Scale",
    "Timing",
    "all_cases",
    "register_case",
    "time_callable",
    "time_cpu",
    "time_cuda",
]
