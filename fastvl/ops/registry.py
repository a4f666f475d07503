"""The op registry: the one place that knows which implementations exist and what each serves.

Every public op registers here with the optional *features* a call may use (a per-key bias, a
causal mask, lse output, ...) and a ``describe(*args) -> Call`` that reads them off a call's
arguments (shapes, dtypes, devices and flags only: never tensor values, so a compiled graph
stays whole). Every implementation declares what it :class:`Supports`; the "why not" reasons
are generated from those declarations, not written per op.

Implementations (backends):

* fastvl's own: ``cuda`` (compiled extension ``fastvl._C``), ``triton`` (:mod:`fastvl.kernels`),
  ``torch`` (pure PyTorch, always available, float64 capable);
* library kernels registered beside them where they compute the same thing: ``flash_attn`` and
  ``xformers`` (when importable) and ``sdpa`` (:func:`torch.nn.functional.scaled_dot_product_attention`,
  which picks among its own flash / memory-efficient / math kernels).

``backend="auto"`` takes the first implementation in the priority table for the device
(:data:`DISPATCH_TABLE`, shipped as ``dispatch_table.json``, replaceable with
:func:`load_dispatch_table` or ``FASTVL_DISPATCH_TABLE=file``; ``python -m fastvl bench
--write-dispatch FILE`` builds one from measurements) that can serve the call, silently; when
none can, the error lists every implementation's reasons. An implementation named explicitly
that cannot serve raises :class:`BackendNotSupportedError` with its reasons. Kernels in the
Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) run only when asked for by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Optional

import torch

from fastvl import _extension

OWN_BACKENDS = ("cuda", "triton", "torch")
LIBRARY_BACKENDS = ("flash_attn", "xformers", "sdpa")
BACKENDS = OWN_BACKENDS + LIBRARY_BACKENDS
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DISPATCH_TABLE_FILE = os.path.join(os.path.dirname(__file__), "dispatch_table.json")


class BackendNotSupportedError(ValueError):
    """A requested backend (or, for ``"auto"``, every backend) cannot serve the call;
    ``reasons`` says why (for ``"auto"``: ``"<backend>: <reason>"`` lines)."""

    def __init__(self, op: str, backend: str, reasons: list[str]):
        self.op, self.backend, self.reasons = op, backend, list(reasons)
        listed = "\n".join(f"  - {r}" for r in self.reasons)
        what = "no backend can serve this call" if backend == "auto" else (
            f"backend {backend!r} cannot serve this call"
        )
        super().__init__(f"{op}: {what}:\n{listed}")


def _import_error(module: str) -> Optional[str]:
    try:
        __import__(module)
    except Exception as exc:  # ImportError, or a broken install
        return f"{module} is not installed or failed to import ({type(exc).__name__}: {exc})"
    return None


# Fixed at import (triton reads TRITON_INTERPRET when it is imported, too), so dispatch is
# plain attribute reads that torch.compile folds into guard-free constants.
TRITON_IMPORT_ERROR: Optional[str] = _import_error("triton")
TRITON_INTERPRETER: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LIBRARY_IMPORT_ERRORS: dict[str, Optional[str]] = {}


def library_import_error(backend: str) -> Optional[str]:
    """Why the library behind ``flash_attn`` / ``xformers`` cannot be imported (cached)."""
    if backend not in _LIBRARY_IMPORT_ERRORS:
        module = {"flash_attn": "flash_attn", "xformers": "xformers.ops"}[backend]
        _LIBRARY_IMPORT_ERRORS[backend] = _import_error(module)
    return _LIBRARY_IMPORT_ERRORS[backend]


# ---- simulated GPU dispatch (host-overhead measurement) -------------------------------------

_SIMULATED_CAPABILITY: Optional[str] = None
_GENERATION = [0]  # bumped whenever what dispatch depends on changes; keys the call caches


@contextlib.contextmanager
def simulate_gpu_dispatch(capability: str = "9.0"):
    """Dispatch CPU tensors as a GPU of ``capability`` would: ``auto`` follows that GPU's
    priority table and the ``triton`` backend counts as available on CPU tensors.

    For measuring host overhead (validation, dispatch, autograd, launch preparation) on a
    machine without a GPU; the Triton launches must be replaced by no-ops meanwhile
    (:func:`fastvl.bench.host_overhead.no_launches`), they cannot run on CPU tensors.
    """
    global _SIMULATED_CAPABILITY
    previous, _SIMULATED_CAPABILITY = _SIMULATED_CAPABILITY, capability
    _GENERATION[0] += 1
    try:
        yield
    finally:
        _SIMULATED_CAPABILITY = previous
        _GENERATION[0] += 1


def simulating_gpu() -> bool:
    """Whether :func:`simulate_gpu_dispatch` is active."""
    return _SIMULATED_CAPABILITY is not None


_CAPABILITIES: dict[int, str] = {}


def device_kind(device: torch.device) -> str:
    """``"cpu"`` or ``"cuda:<major>.<minor>"`` (the keys of the dispatch table)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _CAPABILITIES:
            major, minor = torch.cuda.get_device_capability(index)
            _CAPABILITIES[index] = f"cuda:{major}.{minor}"
        return _CAPABILITIES[index]
    if device.type == "cpu" and _SIMULATED_CAPABILITY is not None:
        return f"cuda:{_SIMULATED_CAPABILITY}"
    return device.type


def backend_device_reasons(backend: str, device: torch.device) -> list[str]:
    """Why ``backend`` cannot run anything on ``device`` (empty if it can)."""
    simulated = device.type == "cpu" and _SIMULATED_CAPABILITY is not None
    if backend in ("torch", "sdpa"):
        return []
    if backend == "triton":
        if TRITON_IMPORT_ERROR:
            return [TRITON_IMPORT_ERROR]
        if device.type == "cuda" or (device.type == "cpu" and (TRITON_INTERPRETER or simulated)):
            return []
        return [
            f"triton kernels need a CUDA device, got a {device.type} tensor "
            "(on CPU, set TRITON_INTERPRET=1 before importing triton to run them interpreted)"
        ]
    if backend == "cuda":
        if not _extension.is_built():
            return [f"fastvl._C is not available: {_extension.LOAD_ERROR}"]
        if device.type != "cuda":
            return [f"the cuda backend needs a CUDA device, got a {device.type} tensor"]
        arch_reason = _extension.arch_unsupported_reason(device)
        return [arch_reason] if arch_reason else []
    if backend in LIBRARY_BACKENDS:
        error = library_import_error(backend)
        if error:
            return [error]
        if device.type != "cuda" and not simulated:
            return [f"{backend} needs a CUDA device, got a {device.type} tensor"]
        return []
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


# ---- calls and capabilities ----------------------------------------------------------------


class Call(NamedTuple):
    """What the registry needs to know of one call: its device, its dtype, the optional
    features it uses (names declared by the op) and sizes implementations may bound."""

    device: torch.device
    dtype: torch.dtype
    features: tuple = ()
    sizes: tuple = ()  # ((name, int), ...), e.g. (("head_dim", 80),)
    more_dtypes: tuple = ()  # ((name, dtype), ...): other tensors whose dtype may differ


@dataclass(frozen=True)
class Supports:
    """What one implementation serves. Anything not declared here is not supported.

    devices: device types it runs on (``None``: wherever its backend is available);
    dtypes: the call's dtype; features: optional features of the op it serves everywhere,
    ``features_on``: more it serves on one device type only; ``max_sizes``: upper bounds on
    the call's sizes (``{"head_dim": 256}``); ``dtype_of``: how messages name the tensor
    whose dtype is checked.
    """

    dtypes: tuple = FLOAT_DTYPES
    features: frozenset = frozenset()
    features_on: Mapping[str, frozenset] = field(default_factory=dict)
    max_sizes: Mapping[str, int] = field(default_factory=dict)
    devices: Optional[tuple] = None
    dtype_of: str = "the input"

    def reasons(self, op: "Op", backend: str, call: Call) -> list[str]:
        kind = call.device.type
        if kind == "cpu" and _SIMULATED_CAPABILITY is not None:
            kind = "cuda"
        reasons = []
        if self.devices is not None and kind not in self.devices:
            reasons.append(
                f"{backend} runs on {' / '.join(self.devices)} tensors, got {kind}"
            )
        interpreted = (backend == "triton" and TRITON_INTERPRETER and call.device.type == "cpu"
                       and _SIMULATED_CAPABILITY is None)
        for name, dtype in ((self.dtype_of, call.dtype),) + call.more_dtypes:
            if dtype not in self.dtypes:
                names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
                reasons.append(f"{name} has dtype {dtype}; {backend} supports {names}")
            elif interpreted and dtype == torch.bfloat16:
                reasons.append(
                    f"{name} is bfloat16: the Triton interpreter (TRITON_INTERPRET=1) computes "
                    "bfloat16 dot products wrongly; use float16 or float32 there, or a GPU"
                )
        for name, value in call.sizes:
            limit = self.max_sizes.get(name)
            if limit is not None and value > limit:
                reasons.append(f"{op.sizes.get(name, name)} {value} is above {backend}'s maximum {limit}")
        extra = self.features_on.get(kind, frozenset())
        for feature in call.features:
            if feature not in self.features and feature not in extra:
                where = [k for k, served in self.features_on.items() if feature in served]
                note = f" (only on {' / '.join(where)})" if where else ""
                reasons.append(f"{op.features[feature]}: not supported by {backend}{note}")
        return reasons


ALL = frozenset({"*"})  # Supports(features=ALL): every feature the op declares


@dataclass
class Implementation:
    fn: Callable
    supports: Supports


def _default_describe(*args) -> Call:
    tensor = next(a for a in args if isinstance(a, torch.Tensor))
    return Call(tensor.device, tensor.dtype)


@dataclass
class Op:
    """One public op: its optional features, how to describe a call, its implementations."""

    name: str
    features: Mapping[str, str] = field(default_factory=dict)  # name -> what it is, for reasons
    sizes: Mapping[str, str] = field(default_factory=dict)  # size name -> what it is
    describe: Callable[..., Call] = _default_describe
    impls: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)
    _memo_generation: int = field(default=-1, repr=False)

    def implement(self, backend: str, fn: Callable, supports: Optional[Supports] = None):
        """Register ``fn`` as the ``backend`` implementation; ``supports`` defaults to every
        dtype and no optional feature (``Supports(features=ALL)`` is rewritten to all of them)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        supports = supports or Supports()
        if supports.features is ALL:
            supports = dataclasses.replace(supports, features=frozenset(self.features))
        unknown = (set(supports.features) | set().union(*supports.features_on.values())) - set(
            self.features
        )
        if unknown:
            raise ValueError(f"{self.name}: {backend} declares unknown features {sorted(unknown)}")
        self.impls[backend] = Implementation(fn, supports)
        self._cache.clear()
        self._memo.clear()

    def memo(self) -> dict:
        """A dict the op may keep per-call work in (validation, the selected implementation,
        defaults) under a key it computes cheaply from what that work depends on; emptied
        whenever dispatch may change (implementations, table, simulated GPU). The op bounds
        its size (:meth:`remember`)."""
        if self._memo_generation != _GENERATION[0]:
            self._memo.clear()
            self._memo_generation = _GENERATION[0]
        return self._memo

    def remember(self, key, value) -> None:
        """``memo()[key] = value``, emptying the memo first when it holds 4096 entries."""
        memo = self.memo()
        if len(memo) >= 4096:
            memo.clear()
        memo[key] = value

    @property
    def backends(self) -> tuple:
        """The registered implementations, in :data:`BACKENDS` order."""
        return tuple(b for b in BACKENDS if b in self.impls)

    def device_reasons(self, backend: str, device: torch.device) -> list[str]:
        if backend not in self.impls:
            return [f"{self.name} has no {backend} implementation"]
        return backend_device_reasons(backend, device)

    def call_reasons(self, backend: str, call: Call) -> list[str]:
        """Why ``backend`` cannot serve the described call (empty if it can)."""
        reasons = self.device_reasons(backend, call.device)
        if not reasons:
            reasons = self.impls[backend].supports.reasons(self, backend, call)
        return reasons

    def not_supported_reasons(self, backend: str, device: torch.device, *args) -> list[str]:
        """Why ``backend`` cannot serve ``self.name(*args)`` (empty if it can); ``device`` is
        the call's device (kept for callers; the call's own device is what counts)."""
        return self.call_reasons(backend, self.describe(*args))

    def order(self, device: torch.device) -> tuple:
        """The implementations ``auto`` tries on ``device``, first choice first."""
        return dispatch_order(self, device_kind(device))

    def _auto(self, call: Call):
        """(fn, None) for the first implementation that serves ``call``, else (None, reasons)."""
        interpreted = call.device.type == "cpu" and _SIMULATED_CAPABILITY is None
        every = []
        for backend in self.order(call.device):
            if backend == "triton" and interpreted:
                every.append("triton: interpreted kernels run only when asked for by name")
                continue
            reasons = self.call_reasons(backend, call)
            if not reasons:
                return self.impls[backend].fn, None
            every.extend(f"{backend}: {r}" for r in reasons)
        return None, every

    def select(self, backend: str, device: torch.device, *args) -> Callable:
        """The implementation that serves ``self.name(*args)``; raises if none can (auto) or
        the one named cannot. Cached per (backend, call description)."""
        call = self.describe(*args)
        key = (backend, call, _GENERATION[0])
        hit = self._cache.get(key)
        if hit is None:
            hit = self._resolve(backend, call)
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = hit
        fn, error = hit
        if error is not None:
            raise error
        return fn

    def _resolve(self, backend: str, call: Call):
        if backend == "auto":
            fn, reasons = self._auto(call)
            if fn is None:
                return None, BackendNotSupportedError(self.name, "auto", reasons)
            return fn, None
        check_backend_name(self.name, backend, self.backends)
        reasons = self.call_reasons(backend, call)
        if reasons:
            return None, BackendNotSupportedError(self.name, backend, reasons)
        return self.impls[backend].fn, None


def check_backend_name(what: str, backend, backends=None) -> str:
    """``backend`` if it is ``"auto"`` or one of ``backends`` (default: every known backend),
    else ValueError naming ``what``; for modules and patches that take a ``backend``."""
    allowed = BACKENDS if backends is None else tuple(backends)
    if backend != "auto" and backend not in allowed:
        raise ValueError(f"{what}: backend must be 'auto' or one of {allowed}, got {backend!r}")
    return backend


OPS: dict[str, Op] = {}


def register_op(name: str, *, features: Optional[Mapping[str, str]] = None,
                sizes: Optional[Mapping[str, str]] = None,
                describe: Optional[Callable[..., Call]] = None) -> Op:
    """Create and record the registry entry for a public op (listed by ``fastvl info``)."""
    if name in OPS:
        raise ValueError(f"op {name!r} is already registered")
    OPS[name] = op = Op(name, dict(features or {}), dict(sizes or {}),
                        describe or _default_describe)
    return op


def backends_of(*op_names: str) -> tuple:
    """The backends registered for any of ``op_names`` (what a module's ``backend`` may be)."""
    return tuple(b for b in BACKENDS if any(b in OPS[name].impls for name in op_names))


def check_op_backend(what: str, backend, *op_names: str) -> str:
    """:func:`check_backend_name` against the backends of ``op_names``."""
    return check_backend_name(what, backend, backends_of(*op_names))


def kernel_backends(op_name: str) -> tuple:
    """fastvl's own kernel backends of an op (``cuda``, ``triton``): what tests sweep."""
    return tuple(b for b in ("cuda", "triton") if b in OPS[op_name].impls)


# ---- the dispatch table --------------------------------------------------------------------


def _read_table(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        table = json.load(handle)
    kinds = table.get("devices")
    if not isinstance(kinds, dict):
        raise ValueError(f"{path}: a dispatch table needs a 'devices' object")
    for kind, ops in kinds.items():
        for op, order in ops.items():
            bad = [b for b in order if b not in BACKENDS]
            if bad or not isinstance(order, list):
                raise ValueError(f"{path}: devices.{kind}.{op}: unknown backends {bad}")
    return table


DISPATCH_TABLE: dict = _read_table(DISPATCH_TABLE_FILE)


def load_dispatch_table(path: Optional[str] = None) -> dict:
    """Use the priority table at ``path`` over the shipped one (None: the shipped one alone)
    and return the result; entries of ``path`` replace the shipped ones per device kind and op.

    Format: ``{"devices": {"<kind>": {"<op>" | "*": [backend, ...]}}, ...}`` with kinds
    ``"cpu"``, ``"cuda"`` (any GPU) and ``"cuda:<major>.<minor>"`` (one compute capability,
    looked up first). Backends a list leaves out are tried after it, in the default order.
    """
    global DISPATCH_TABLE
    table = _read_table(DISPATCH_TABLE_FILE)
    if path is not None:
        for kind, ops in _read_table(path)["devices"].items():
            table["devices"].setdefault(kind, {}).update(ops)
    DISPATCH_TABLE = table
    _GENERATION[0] += 1
    return DISPATCH_TABLE


if os.environ.get("FASTVL_DISPATCH_TABLE"):
    load_dispatch_table(os.environ["FASTVL_DISPATCH_TABLE"])


def dispatch_order(op: Op, kind: str) -> tuple:
    """``op``'s implementations in the order ``auto`` tries them on a device ``kind``."""
    devices = DISPATCH_TABLE["devices"]
    listed = None
    for key in (kind, kind.split(":")[0]):
        entry = devices.get(key, {})
        listed = entry.get(op.name, entry.get("*"))
        if listed is not None:
            break
    listed = [b for b in (listed or ()) if b in op.impls]
    return tuple(listed) + tuple(b for b in BACKENDS if b in op.impls and b not in listed)


def availability(device: torch.device) -> dict[str, dict[str, list[str]]]:
    """``{op: {backend: reasons}}`` for every registered op on ``device``: its implementations
    in ``auto``'s order, then fastvl's own backends it lacks; [] = available."""
    return {
        name: {
            backend: op.device_reasons(backend, device)
            for backend in op.order(device) + tuple(b for b in OWN_BACKENDS if b not in op.impls)
        }
        for name, op in OPS.items()
    }
