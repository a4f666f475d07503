"""Host overhead of an op's GPU path, measured on any machine (no GPU needed).

At ViT sizes a GPU kernel takes tens of microseconds, so the Python and dispatcher work around
it (validation, dispatch, autograd bookkeeping, launch preparation) decides whether a drop-in
is faster than what it replaces. This module measures that work on CPU tensors:

* :func:`gpu_path` dispatches CPU tensors as a GPU would (``auto`` follows the GPU priority
  table, the ``triton`` backend is available: :func:`fastvl.ops.registry.simulate_gpu_dispatch`)
  and replaces every Triton launch by a counter (:func:`no_launches`), so the host side runs
  in full and no kernel does;
* :func:`host_time` is the median wall time of one call (many calls per sample);
  :func:`host_timings` times several callables interleaved, round by round, so that a busy
  machine slows them alike;
* :func:`count_launches` counts the device launches one call would make: Triton launches plus
  the ATen and C++ extension ops that launch a kernel on a GPU (:func:`launches_kernel`: views,
  ``empty`` and metadata ops do not);
  :func:`count_syncs` the host synchronisations (reads of tensor values, data-dependent shapes).

The plain-PyTorch chain an op replaces is timed the same way on the same tiny CPU tensors, where
its kernels cost next to nothing, so both sides are host time.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from typing import Any, Callable, Iterator, Mapping

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastvl._outputs import zero_integer_outputs
from fastvl.bench.timing import Timing, summarize
from fastvl.ops.registry import simulate_gpu_dispatch

__all__ = [
    "LaunchCount", "count_launches", "count_syncs", "gpu_path", "host_time", "host_timings",
    "launches_kernel", "no_launches", "replaced_triton_runs",
]


class LaunchCount:
    """How many Triton launches were skipped inside :func:`no_launches`."""

    def __init__(self):
        self.triton = 0


def _launcher_classes() -> list:
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # older triton
        pass
    else:
        classes.append(InterpretedFunction)
    return classes


@contextlib.contextmanager
def replaced_triton_runs(make_run: Callable[[Callable], Callable]) -> Iterator[None]:
    """In the block, the ``run`` method of Triton's launchers (``JITFunction`` and the
    interpreter's ``InterpretedFunction``), through which every kernel launch goes, is
    ``make_run(original run)``."""
    classes = _launcher_classes()
    saved = [cls.__dict__["run"] for cls in classes]
    for cls, run in zip(classes, saved):
        cls.run = make_run(run)
    try:
        yield
    finally:
        for cls, run in zip(classes, saved):
            cls.run = run


@contextlib.contextmanager
def no_launches() -> Iterator[LaunchCount]:
    """Every Triton kernel launch in the block is counted and skipped (outputs stay unwritten)."""
    count = LaunchCount()

    def skipped_run(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            count.triton += 1

    with replaced_triton_runs(lambda run: skipped_run):
        yield count


@contextlib.contextmanager
def gpu_path(capability: str = "9.0") -> Iterator[LaunchCount]:
    """CPU tensors take the path they would on a GPU of ``capability``; launches are skipped
    (integer outputs of skipped kernels are zeros, valid indices for what follows). One CPU
    thread meanwhile: tiny tensors need no more, and a thread pool's wake-ups are noise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with simulate_gpu_dispatch(capability), zero_integer_outputs(), no_launches() as count:
            yield count
    finally:
        torch.set_num_threads(threads)


def host_time(fn: Callable[[], Any], *, calls: int = 200, rounds: int = 7,
              warmup: int = 20) -> float:
    """Median seconds per call of ``fn()`` over ``rounds`` samples of ``calls`` calls each."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def host_timings(fns: Mapping[str, Callable[[], Any]], *, rounds: int = 9, warmup: int = 20,
                 round_seconds: float = 0.02) -> dict[str, Timing]:
    """Per-call :class:`Timing` of each ``fns[name]()``, timed interleaved: every round runs
    each callable in turn, as many calls as fill about ``round_seconds`` (from the warm-up)."""
    calls = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        per_call = (time.perf_counter() - start) / max(1, warmup)
        calls[name] = max(1, min(1000, round(round_seconds / max(per_call, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    collecting = gc.isenabled()
    gc.disable()  # a collection lands in one implementation's round: noise, not its cost
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(calls[name]):
                    fn()
                samples[name].append((time.perf_counter() - start) / calls[name])
    finally:
        if collecting:
            gc.enable()
    return {name: summarize(samples[name], inner=calls[name]) for name in fns}


# ATen ops that never launch a kernel on a GPU: views, allocation without fill, metadata.
_NO_LAUNCH_PREFIXES = (
    "view", "_unsafe_view", "alias", "as_strided", "t.", "transpose", "permute", "expand",
    "unsqueeze", "squeeze", "select.", "slice", "detach", "empty", "reshape", "unflatten",
    "flatten", "split", "chunk", "unbind", "narrow", "diagonal", "_reshape_alias", "lift_fresh",
    "new_empty",
    "sym_", "is_", "size", "stride", "numel", "dim",
)


def launches_kernel(op: torch._ops.OpOverload) -> bool:
    """Whether dispatching ``op`` launches a device kernel of its own: ATen ops other than
    views, allocations and metadata ops do; fastvl's C++ extension ops (``fastvl::*_cuda``)
    are kernels; fastvl's Python-registered ops (``fastvl::*_triton``) are not counted
    themselves but by what they run (Triton launches, ATen ops)."""
    if op.namespace == "fastvl":
        return op._schema.name.endswith("_cuda")
    return not op.__name__.startswith(_NO_LAUNCH_PREFIXES)  # e.g. "mm.default"


class _LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_kernel(func):
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


class _SyncCounter(TorchDispatchMode):
    """Records what :func:`fastvl.testing.no_host_sync` would reject, at the ATen level
    (once per Python-level read: ``.item()`` is not counted again as its ATen op)."""

    def __init__(self, ops: list, reading: list):
        super().__init__()
        self.ops, self.reading = ops, reading

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from fastvl.testing import _DATA_DEPENDENT, _has_bool_index

        name = func.__name__
        if not self.reading and (
            name.startswith(_DATA_DEPENDENT) or (name.startswith("index") and _has_bool_index(args))
        ):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class _PythonSyncCounter(TorchFunctionMode):
    """... and at the Python level (``.tolist()``, ``bool(t)``, ...)."""

    def __init__(self, ops: list, reading: list):
        super().__init__()
        self.ops, self.reading = ops, reading

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from fastvl.testing import _HOST_READS

        if func not in _HOST_READS or self.reading:
            return func(*args, **(kwargs or {}))
        self.ops.append(func.__name__)
        self.reading.append(func)
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.reading.pop()


def count_syncs(fn: Callable[[], Any]) -> tuple[int, list[str]]:
    """(host synchronisations of one ``fn()`` call on a GPU, what caused them): what
    :func:`fastvl.testing.no_host_sync` rejects (``.item()``, ``.tolist()``, ``bool(t)``,
    ops with value-dependent output shapes). Triton launches are skipped as in
    :func:`no_launches`."""
    ops: list[str] = []
    reading: list = []
    with no_launches(), _PythonSyncCounter(ops, reading), _SyncCounter(ops, reading):
        fn()
    return len(ops), ops


def count_launches(fn: Callable[[], Any]) -> tuple[int, list[str]]:
    """(device launches of one ``fn()`` call, the names of the launching ops): Triton launches
    (skipped, as in :func:`no_launches`) plus the ops that :func:`launches_kernel`."""
    with no_launches() as count, _LaunchCounter() as counter:
        fn()
    return count.triton + len(counter.ops), counter.ops + ["triton"] * count.triton
