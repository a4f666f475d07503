"""pytest-benchmark suites over the cases of :mod:`fastvl.bench.suites`.

A bench module names its op (``OP = "gather_tokens"``, or a tuple of ops benchmarked
together) and has one test taking the ``bench_impl`` fixture; this file parametrises it
over case x dtype x mode x implementation (the same registry ``python -m fastvl bench``
uses, so shapes live in one place) and sets ``benchmark.group`` to case + dtype + mode, so
pytest-benchmark's report compares the implementations of one workload with each other.

Run (pyproject's addopts contain --benchmark-disable; --benchmark-only here turns timing
back on, and ``--benchmark-enable --benchmark-only`` works too):

    pytest benches/ --benchmark-only
    pytest benches/ --benchmark-only --fastvl-quick      # tiny shapes, 3 rounds: a smoke test

On CPU only PyTorch code is timed: Triton would run in its interpreter and the cuda backend
needs a GPU, so those implementations are skipped with the reason.
"""

from __future__ import annotations

import re

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK_ROUNDS = 3  # --fastvl-quick: fixed rounds, like `python -m fastvl bench --quick`


def pytest_addoption(parser):
    parser.addoption(
        "--fastvl-quick", action="store_true", default=False,
        help="fastvl benches: tiny shapes and 3 rounds (smoke test, not a measurement)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # pyproject.toml's addopts has --benchmark-disable (so the unit tests do not time the
    # benchmark fixture), and pytest-benchmark refuses --benchmark-only together with it.
    # Asking for --benchmark-only on the benches means "time them": re-enable timing.
    if getattr(config.option, "benchmark_only", False):
        config.option.benchmark_enable = True


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def pytest_generate_tests(metafunc):
    if "bench_impl" not in metafunc.fixturenames:
        return
    from fastvl.bench.cases import all_cases

    op = getattr(metafunc.module, "OP", None)
    if op is None:
        raise pytest.UsageError(f"{metafunc.module.__name__}: set OP = '<op name>'")
    ops = [op] if isinstance(op, str) else list(op)
    params = []
    for case in all_cases(ops):
        for dtype in case.dtypes_for(DEVICE):
            for mode in case.modes:
                for impl in case.impls:
                    name = str(dtype).removeprefix("torch.")
                    prefix = "" if len(ops) == 1 else f"{case.op}-"
                    params.append(pytest.param(
                        (case, dtype, mode, impl),
                        id=_slug(f"{prefix}{case.name}-{name}-{mode}-{impl}"),
                    ))
    if not params:
        raise pytest.UsageError(f"no benchmark cases registered for op(s) {ops}")
    metafunc.parametrize("bench_impl", params, indirect=True)


_BUILT: dict = {}  # the last built workload: impls of one case run back to back


def _built(case, dtype, mode, scale):
    key = (case.id, dtype, mode, scale.name)
    if key not in _BUILT:
        _BUILT.clear()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        _BUILT[key] = case.make(DEVICE, dtype, scale, mode)
    return _BUILT[key]


@pytest.fixture
def bench_impl(request):
    """A function ``run(benchmark)`` timing one implementation of one case."""
    from fastvl.bench.cases import SCALES
    from fastvl.bench.timing import peak_memory

    case, dtype, mode, impl = request.param
    quick = request.config.getoption("--fastvl-quick")
    scale = SCALES["quick" if quick else ("full" if DEVICE.type == "cuda" else "cpu")]
    built = _built(case, dtype, mode, scale)
    if impl in built.skipped:
        pytest.skip(f"{impl}: {built.skipped[impl]}")
    if impl in built.interpreted:
        pytest.skip(f"{impl}: runs in the Triton interpreter on CPU (not a benchmark)")
    fn = built.impls[impl]

    if DEVICE.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn

    def run(benchmark):
        dtype_name = str(dtype).removeprefix("torch.")
        benchmark.group = f"{case.id} {dtype_name} {mode}"
        benchmark.extra_info.update(
            op=case.op, case=case.name, dtype=dtype_name, mode=mode, impl=impl,
            baseline=impl == case.baseline, shapes=built.shapes, bytes=built.bytes,
            flops=built.flops, items=built.items, device=str(DEVICE),
            device_name=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        )
        timed()  # warm-up (Triton compiles on first call)
        if built.track_memory:  # None off CUDA
            benchmark.extra_info["peak_mem_bytes"] = peak_memory(fn, DEVICE)
        if quick:  # calibrated rounds would fill 1 s per benchmark: too long for a smoke test
            benchmark.pedantic(timed, rounds=QUICK_ROUNDS)
        else:
            benchmark(timed)

    return run
