"""Timers for benchmarks: wall clock on CPU, CUDA events on GPU; median and IQR of repeats.

Both timers warm the callable up first (first calls compile Triton kernels, fill allocator
caches, page in memory), estimate its cost, then pick the number of repeats that fills a
time budget (or use the number given). Each repeat is timed on its own so the spread (IQR)
is real, not an average.

* :func:`time_cpu` uses :func:`time.perf_counter`. Callables far shorter than the timer's
  resolution are run several times per sample (``inner``) and the sample divided.
* :func:`time_cuda` brackets each call with ``torch.cuda.Event`` pairs on the current stream
  and synchronises once at the end. By default it overwrites a buffer twice the size of the
  L2 cache before every call (outside the timed region), so each repeat starts with a cold
  cache, as it would in a model where other layers ran in between.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch

__all__ = [
    "Timing",
    "peak_memory",
    "summarize",
    "time_cpu",
    "time_cuda",
    "time_callable",
    "warm_up_device",
]


@dataclass(frozen=True)
class Timing:
    """Per-call times in seconds, summarised over ``repeats`` samples."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    repeats: int
    inner: int = 1  # calls per sample (CPU timer, for very short callables)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["iqr"] = self.iqr
        return data


def summarize(samples: list[float], inner: int = 1) -> Timing:
    """Median, quartiles and extremes of per-call times ``samples`` (seconds)."""
    if not samples:
        raise ValueError("summarize: no samples")
    ordered = sorted(samples)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return Timing(
        median=statistics.median(ordered),
        q1=q1,
        q3=q3,
        min=ordered[0],
        max=ordered[-1],
        repeats=len(ordered),
        inner=inner,
    )


def _choose_repeats(
    estimate: float, budget: float, min_repeats: int, max_repeats: int
) -> int:
    if estimate <= 0:
        return max_repeats
    return int(min(max_repeats, max(min_repeats, budget / estimate)))


def time_cpu(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: Optional[int] = None,
    budget: float = 0.5,
    min_repeats: int = 10,
    max_repeats: int = 1000,
    min_sample: float = 50e-6,
) -> Timing:
    """Time ``fn()`` with ``time.perf_counter``; returns per-call seconds.

    ``warmup`` calls run untimed first. Unless ``repeats`` is given, the number of samples
    fills about ``budget`` seconds, clamped to [``min_repeats``, ``max_repeats``]. A sample
    is ``inner`` back-to-back calls, with ``inner`` chosen so a sample lasts at least
    ``min_sample`` seconds (1 for anything slower than that).
    """
    for _ in range(max(1, warmup)):
        fn()
    start = time.perf_counter()
    fn()
    estimate = time.perf_counter() - start
    inner = 1
    if 0 < estimate < min_sample:
        inner = min(1000, max(1, int(min_sample / max(estimate, 1e-9))))
    if repeats is None:
        repeats = _choose_repeats(estimate * inner, budget, min_repeats, max_repeats)
    repeats = max(1, int(repeats))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return summarize(samples, inner)


_L2_FLUSH_BUFFERS: dict[int, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    index = device.index if device.index is not None else torch.cuda.current_device()
    buffer = _L2_FLUSH_BUFFERS.get(index)
    if buffer is None:
        props = torch.cuda.get_device_properties(index)
        l2_bytes = int(getattr(props, "L2_cache_size", 0) or 0) or 64 * 2**20
        buffer = torch.empty(2 * l2_bytes // 4, dtype=torch.int32, device=index)
        _L2_FLUSH_BUFFERS[index] = buffer
    return buffer


def time_cuda(
    fn: Callable[[], Any],
    *,
    device: Optional[torch.device] = None,
    warmup: int = 5,
    repeats: Optional[int] = None,
    budget: float = 0.25,
    min_repeats: int = 20,
    max_repeats: int = 1000,
    flush_l2: bool = True,
) -> Timing:
    """Time ``fn()`` on the current CUDA stream with events; returns per-call seconds.

    Warm-up calls run first, then the device is synchronised; the cost of one call is
    estimated from a few timed calls, and ``repeats`` (unless given) is chosen to fill
    ``budget`` seconds of device time. With ``flush_l2`` a buffer of twice the L2 size is
    zeroed before each call, outside the events. The median of the per-call event times is
    reported (the events measure device time between the two points on the stream, so a
    callable whose host-side launch cost exceeds its device time shows that cost too).
    """
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    flush = _l2_flush_buffer(device) if flush_l2 else None
    for _ in range(max(1, warmup)):
        fn()
    torch.cuda.synchronize(device)

    def run(count: int) -> list[float]:
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(count)
        ]
        for start, end in events:
            if flush is not None:
                flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) * 1e-3 for start, end in events]

    if repeats is None:
        estimate = statistics.median(run(3))
        repeats = _choose_repeats(estimate, budget, min_repeats, max_repeats)
    return summarize(run(max(1, int(repeats))))


def time_callable(fn: Callable[[], Any], device: torch.device, **kwargs) -> Timing:
    """:func:`time_cuda` for CUDA devices, :func:`time_cpu` otherwise.

    Keyword arguments the chosen timer does not take (``flush_l2`` on CPU, ``min_sample`` on
    CUDA) are ignored.
    """
    device = torch.device(device)
    if device.type == "cuda":
        kwargs.pop("min_sample", None)
        return time_cuda(fn, device=device, **kwargs)
    kwargs.pop("flush_l2", None)
    kwargs.pop("device", None)
    return time_cpu(fn, **kwargs)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Bytes of CUDA memory one call of ``fn()`` allocates at its peak on top of what was
    allocated before it (activations, caches, outputs; not weights or inputs that already
    exist): ``torch.cuda.max_memory_allocated`` after a reset, minus the memory allocated
    before the call. None on other devices (no comparable allocator statistics)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def warm_up_device(device: torch.device, seconds: float = 0.3) -> None:
    """Keep a CUDA device busy for about ``seconds`` (matrix products) so its clocks are up.

    An idle GPU runs at low clocks and takes a moment to ramp up; without this, the first
    implementation timed in a process looks slower than it is. No-op on other devices.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return
    a = torch.randn(4096, 4096, device=device, dtype=torch.float16)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(10):
            a = a @ a
            a = a / a.abs().amax().clamp_min(1e-3)
        torch.cuda.synchronize(device)
