"""Host overhead per call (the GPU path on tiny CPU tensors, Triton launches skipped) of every
op vs the plain-PyTorch chain it replaces, under pytest-benchmark.

The cases come from fastvl/bench/suites/host_overhead.py; each benchmark group is one case and
mode (plain, fastvl[auto], fastvl[triton]). Each is built and timed inside
:func:`fastvl.bench.host_overhead.gpu_path`; launches and host syncs per call go to
``extra_info``. ``python -m fastvl bench --ops host_overhead`` reports the same with ratios.

    pytest benches/test_host_overhead.py --benchmark-only
"""

import pytest
import torch

from fastvl.bench.cases import SCALES, all_cases
from fastvl.bench.host_overhead import count_launches, count_syncs, gpu_path

QUICK_ROUNDS = 3  # --fastvl-quick, as benches/conftest.py

PARAMS = [
    pytest.param(case, mode, impl, id=f"{case.name}-{mode}-{impl}")
    for case in all_cases(["host_overhead"])
    for mode in case.modes
    for impl in case.impls
]


@pytest.mark.parametrize("case, mode, impl", PARAMS)
def test_host_overhead(benchmark, request, case, mode, impl):
    quick = request.config.getoption("--fastvl-quick")
    with gpu_path():
        built = case.make("cpu", torch.float32, SCALES["quick"], mode)
        if impl in built.skipped:
            pytest.skip(f"{impl}: {built.skipped[impl]}")
        fn = built.impls[impl]
        benchmark.group = f"{case.id} {mode}"
        benchmark.extra_info.update(
            op=case.op, case=case.name, mode=mode, impl=impl, baseline=impl == case.baseline,
            shapes=built.shapes, launches=count_launches(fn)[0], syncs=count_syncs(fn)[0],
        )
        if quick:
            benchmark.pedantic(fn, rounds=QUICK_ROUNDS, warmup_rounds=1)
        else:
            benchmark(fn)
