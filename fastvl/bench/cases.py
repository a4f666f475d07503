"""The benchmark case registry shared by ``python -m fastvl bench`` and ``benches/``.

A *case* is one realistic workload of one op (say, gather_tokens at ViT-B/16 MAE shapes).
Its builder makes the inputs for a device, dtype, :class:`Scale` and mode, and returns a
:class:`Built`: every implementation that can run as a zero-argument callable (fastvl's
backends, PyTorch baselines, third-party peers), the name of the baseline the others are
compared with, and what cannot run with the reason. All callables of a case compute the same
thing on the same inputs (``tests/test_bench_runner.py`` checks this for every case).

To add benchmarks for a new op, write ``fastvl/bench/suites/<op>.py`` with functions
decorated by :func:`register_case`; every module in :mod:`fastvl.bench.suites` is imported
by :func:`all_cases`. Example::

    @register_case(
        op="my_op", name="vit-b16", description="...",
        impls=(*FASTVL_IMPLS, "torch"), baseline="torch",
    )
    def _vit_b16(device, dtype, scale, mode):
        x = torch.randn(scale.batch(64), 197, 768, device=device, dtype=dtype)
        built = Built(shapes={"x": tuple(x.shape)})
        fastvl_impls(built, "my_op", device, (x,), lambda b: lambda: my_op(x, backend=b))
        built.add("torch", lambda: reference_my_op(x))
        return built

Modes are ``"forward"`` and ``"forward+backward"`` unless a case says otherwise; the helper
:func:`with_backward` turns a forward callable into one that also computes the gradients.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from fastvl.ops.registry import BACKENDS

__all__ = [
    "BACKWARD",
    "FORWARD",
    "FASTVL_IMPLS",
    "MODES",
    "SCALES",
    "Built",
    "Case",
    "Scale",
    "all_cases",
    "default_dtypes",
    "fastvl_impl_name",
    "fastvl_impls",
    "register_case",
    "requires_module",
    "with_backward",
]

FORWARD = "forward"
BACKWARD = "forward+backward"
MODES = (FORWARD, BACKWARD)

def fastvl_impl_name(backend: str) -> str:
    return f"fastvl[{backend}]"


FASTVL_IMPLS = tuple(fastvl_impl_name(b) for b in BACKENDS)


@dataclass(frozen=True)
class Scale:
    """How far a case shrinks its shapes: ``full`` on GPUs, ``cpu`` on CPUs, ``quick`` tests.

    Builders pass their batch sizes through :meth:`batch` and, where the case stays meaningful,
    other sizes through :meth:`size` (``quick`` shrinks them to smoke-test sizes).
    """

    name: str
    batch_factor: float = 1.0
    size_factor: float = 1.0

    def batch(self, n: int) -> int:
        return max(1, round(n * self.batch_factor))

    def size(self, n: int, minimum: int = 1) -> int:
        return max(minimum, round(n * self.size_factor))


SCALES = {
    "full": Scale("full"),
    # CPU: the same token and channel counts, batch / 8 (so the run takes seconds, not hours).
    "cpu": Scale("cpu", batch_factor=1 / 8),
    # Smoke tests: a sample or two and a fraction of the sizes (odd sizes stay odd-ish).
    "quick": Scale("quick", batch_factor=1 / 32, size_factor=1 / 8),
}


def default_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """What models run in: half precisions on GPUs, float32 on CPUs."""
    if torch.device(device).type == "cuda":
        return (torch.float16, torch.bfloat16)
    return (torch.float32,)


@dataclass
class Built:
    """What a case builder returns: the callables to time on one set of inputs.

    ``impls``: name -> zero-argument callable returning the result (tensor or tuple of
    tensors); ``skipped``: name -> why that implementation cannot run here;
    ``interpreted``: names that run but under an interpreter (Triton on CPU) -- correct, so
    the case tests use them, but not something to time. ``bytes`` / ``flops`` per call give
    GB/s and TFLOP/s in the report (None where not meaningful); ``items`` per call (images,
    prompts) gives items/s. ``track_memory``: also report each implementation's peak CUDA
    memory during a call (:func:`fastvl.bench.timing.peak_memory`).

    Checks. Each implementation's result must match its reference's: the baseline's, unless
    ``references`` names another implementation (or None: computes something no other
    implementation does, e.g. a model with fewer tokens; then other implementations are
    checked against it instead). ``compare[name](actual, expected)`` returns None if that
    implementation's result matches, else what differs (e.g. an order-independent check);
    for implementations not in ``compare``, :func:`torch.testing.assert_close` elementwise
    with ``rtol``/``atol`` (None: torch.testing defaults for the dtype). See :meth:`mismatch`.
    """

    impls: dict[str, Callable[[], Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    interpreted: set = field(default_factory=set)
    shapes: dict[str, Any] = field(default_factory=dict)
    bytes: Optional[float] = None
    flops: Optional[float] = None
    rtol: Optional[float] = None
    atol: Optional[float] = None
    auto: Optional[str] = None  # the implementation fastvl's backend="auto" uses here
    items: Optional[float] = None
    track_memory: bool = False
    references: dict[str, Optional[str]] = field(default_factory=dict)
    compare: dict[str, Callable[[Any, Any], Optional[str]]] = field(default_factory=dict)
    # implementations whose traffic the counter cannot see (compiled code runs uncompiled under
    # its dispatch mode), with why: their rows get no ``moved/min``
    traffic_unknown: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, fn: Callable[[], Any]) -> None:
        self.impls[name] = fn

    def skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason

    def mismatch(self, impl: str, actual, expected) -> Optional[str]:
        """None if ``impl``'s result ``actual`` matches its reference's result ``expected``,
        else what differs (``compare[impl]``, or elementwise closeness of each tensor)."""
        if impl in self.compare:
            return self.compare[impl](actual, expected)
        if isinstance(expected, torch.Tensor):
            actual, expected = (actual,), (expected,)
        actual, expected = tuple(actual), tuple(expected)
        if len(actual) != len(expected):
            return f"returned {len(actual)} results, the reference {len(expected)}"
        tolerance = {}
        if self.rtol is not None or self.atol is not None:
            tolerance = {"rtol": self.rtol or 0.0, "atol": self.atol or 0.0}
        for position, (a, e) in enumerate(zip(actual, expected)):
            try:
                torch.testing.assert_close(a, e, **tolerance)
            except AssertionError as exc:
                first = str(exc).strip().splitlines()
                return f"result {position} differs from the reference's: " + " ".join(first[:3])
        return None


@dataclass(frozen=True)
class Case:
    """One registered benchmark case (see the module docstring)."""

    op: str
    name: str
    description: str
    build: Callable[[torch.device, torch.dtype, Scale, str], Built]
    impls: tuple[str, ...]
    baseline: str
    modes: tuple[str, ...] = MODES
    dtypes: Optional[Callable[[torch.device], Sequence[torch.dtype]]] = None
    # Host-overhead case: built and timed inside fastvl.bench.host_overhead.gpu_path() (CPU
    # tensors dispatched as on a GPU, Triton launches skipped), so results are not checked.
    host_overhead: bool = False

    @property
    def id(self) -> str:
        return f"{self.op}/{self.name}"

    def dtypes_for(self, device: torch.device) -> tuple[torch.dtype, ...]:
        return tuple((self.dtypes or default_dtypes)(torch.device(device)))

    def make(self, device, dtype: torch.dtype, scale: Scale, mode: str) -> Built:
        """Build the case and check the builder kept its promises (names, baseline)."""
        if mode not in self.modes:
            raise ValueError(f"{self.id}: mode {mode!r} not in {self.modes}")
        built = self.build(torch.device(device), dtype, scale, mode)
        unknown = (set(built.impls) | set(built.skipped)) - set(self.impls)
        missing = set(self.impls) - set(built.impls) - set(built.skipped)
        if unknown or missing:
            raise RuntimeError(
                f"{self.id}: builder returned implementations {sorted(unknown)} it did not "
                f"declare, and not {sorted(missing)} it declared (skip those with a reason)"
            )
        if self.baseline not in built.impls:
            raise RuntimeError(
                f"{self.id}: the baseline {self.baseline!r} must always run "
                f"({built.skipped.get(self.baseline, 'not built')})"
            )
        for impl, reference in built.references.items():
            if impl not in built.impls or (
                reference is not None and (reference == impl or reference not in built.impls)
            ):
                raise RuntimeError(
                    f"{self.id}: references[{impl!r}] = {reference!r}: both must be "
                    "implementations built here, and different"
                )
        return built

    def reference(self, built: Built, impl: str) -> Optional[str]:
        """The implementation whose result ``impl``'s must match (None: not compared)."""
        return built.references.get(impl, self.baseline) if impl != self.baseline else None


_CASES: dict[str, Case] = {}
_LOADED = False


def register_case(
    *,
    op: str,
    name: str,
    description: str,
    impls: Sequence[str],
    baseline: str,
    modes: Sequence[str] = MODES,
    dtypes: Optional[Callable[[torch.device], Sequence[torch.dtype]]] = None,
    host_overhead: bool = False,
):
    """Decorator registering ``build(device, dtype, scale, mode) -> Built`` as a case
    (``host_overhead``: see :class:`Case`)."""
    if baseline not in impls:
        raise ValueError(f"{op}/{name}: baseline {baseline!r} is not one of impls {impls}")

    def decorate(build):
        case = Case(op, name, description, build, tuple(impls), baseline, tuple(modes), dtypes,
                    host_overhead)
        if case.id in _CASES:
            raise ValueError(f"benchmark case {case.id} is registered twice")
        _CASES[case.id] = case
        return build

    return decorate


def all_cases(ops: Optional[Sequence[str]] = None) -> list[Case]:
    """Every registered case (importing :mod:`fastvl.bench.suites`), optionally by op."""
    global _LOADED
    if not _LOADED:
        from fastvl.bench import suites

        for module in sorted(pkgutil.iter_modules(suites.__path__), key=lambda m: m.name):
            importlib.import_module(f"{suites.__name__}.{module.name}")
        _LOADED = True
    cases = list(_CASES.values())
    if ops is not None:
        cases = [case for case in cases if case.op in set(ops)]
    return cases


# --------------------------------------------------------------------------- builder helpers


def fastvl_impls(
    built: Built,
    op_name: str,
    device: torch.device,
    args: tuple,
    make: Callable[[str], Callable[[], Any]],
) -> None:
    """Add one ``fastvl[<backend>]`` callable per backend that can serve ``op(*args)``.

    ``make(backend)`` returns the zero-argument callable for that backend: every registered
    implementation, library kernels (``sdpa``, ``flash_attn``, ...) included, so a run ranks
    them all (``python -m fastvl bench --write-dispatch``). Backends that cannot serve the
    call are recorded in ``built.skipped`` with the registry's reasons; Triton on a CPU
    tensor (the interpreter) is added but marked ``interpreted``. Also records which backend
    ``backend="auto"`` picks in ``built.auto``.
    """
    from fastvl.ops.registry import OPS

    op = OPS.get(op_name)
    chosen = op.select("auto", device, *args) if op is not None else None
    for backend in BACKENDS:
        name = fastvl_impl_name(backend)
        if op is None:
            built.skip(name, f"fastvl has no op named {op_name!r}")
            continue
        reasons = op.not_supported_reasons(backend, device, *args)
        if reasons and backend == "triton" and device.type != "cuda":
            reasons = ["Triton kernels need a CUDA device (interpreted Triton is not a benchmark)"]
        if reasons:
            built.skip(name, "; ".join(reasons))
            continue
        built.add(name, make(backend))
        if backend == "triton" and device.type != "cuda":
            built.interpreted.add(name)
    if op is not None:
        for backend, implementation in op.impls.items():
            if implementation.fn is chosen:
                built.auto = fastvl_impl_name(backend)


def requires_module(module: str) -> Optional[str]:
    """None if ``module`` imports, else the reason to skip a peer that needs it."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install
        return f"{module} is not installed ({type(exc).__name__}: {exc})"
    return None


def with_backward(
    forward: Callable[[], Any],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Any,
) -> Callable[[], tuple]:
    """A callable running ``forward()`` and returning d(sum(out * grad_outputs))/d(inputs).

    Uses :func:`torch.autograd.grad`, so nothing accumulates into ``.grad`` between calls.
    """
    inputs = tuple(inputs)

    def run():
        outputs = forward()
        return torch.autograd.grad(outputs, inputs, grad_outputs)

    return run
