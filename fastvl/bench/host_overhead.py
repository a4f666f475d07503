"""Host overhead of an op's GPU path, measured on any machine (no GPU needed).

At ViT sizes a GPU kernel takes tens of microseconds, so the Python and dispatcher work around
it (validation, dispatch, autograd bookkeeping, launch preparation) decides whether a drop-in
is faster than what it replaces. This module measures that work on CPU tensors:

* :func:`gpu_path` dispatches CPU tensors as a GPU would (``auto`` follows the GPU priority
  table, the ``triton`` backend is available: :func:`fastvl.ops.registry.simulate_gpu_dispatch`)
  and replaces every Triton launch by a counter (:func:`no_launches`), so the host side runs
  in full and no kernel does;
* :func:`host_time` is the median wall time of one call (many calls per sample);
* :func:`count_launches` counts the device launches one call would make: Triton launches plus
  the ATen ops that launch a kernel on a GPU (views, ``empty`` and metadata ops do not).

The plain-PyTorch chain an op replaces is timed the same way on the same tiny CPU tensors, where
its kernels cost next to nothing, so both sides are host time.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastvl.ops.registry import simulate_gpu_dispatch

__all__ = ["LaunchCount", "count_launches", "gpu_path", "host_time", "no_launches"]


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
def no_launches() -> Iterator[LaunchCount]:
    """Every Triton kernel launch in the block is counted and skipped (outputs stay unwritten)."""
    count = LaunchCount()

    def skipped_run(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            count.triton += 1

    classes = _launcher_classes()
    saved = [cls.__dict__["run"] for cls in classes]
    for cls in classes:
        cls.run = skipped_run
    try:
        yield count
    finally:
        for cls, run in zip(classes, saved):
            cls.run = run


@contextlib.contextmanager
def gpu_path(capability: str = "9.0") -> Iterator[LaunchCount]:
    """CPU tensors take the path they would on a GPU of ``capability``; launches are skipped."""
    with simulate_gpu_dispatch(capability), no_launches() as count:
        yield count


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


# ATen ops that never launch a kernel on a GPU: views, allocation without fill, metadata.
_NO_LAUNCH_PREFIXES = (
    "view", "_unsafe_view", "alias", "as_strided", "t.", "transpose", "permute", "expand",
    "unsqueeze", "squeeze", "select.", "slice", "detach", "empty", "reshape", "unflatten",
    "flatten", "split", "chunk", "unbind", "narrow", "diagonal", "_reshape_alias", "lift_fresh",
    "sym_", "is_", "size", "stride", "numel", "dim",
)


class _LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.aten = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__  # e.g. "mm.default"
        # fastvl's own custom ops are counted by what they run (Triton launches, ATen ops).
        if func.namespace != "fastvl" and not name.startswith(_NO_LAUNCH_PREFIXES):
            self.aten += 1
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def count_launches(fn: Callable[[], Any]) -> tuple[int, list[str]]:
    """(device launches of one ``fn()`` call, the names of the launching ops): Triton launches
    (skipped, as in :func:`no_launches`) plus ATen ops other than views and allocations."""
    with no_launches() as count, _LaunchCounter() as counter:
        fn()
    return count.triton + counter.aten, counter.ops + ["triton"] * count.triton
