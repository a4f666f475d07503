"""Backend registry: every op x backend says whether it can serve a call, and why not.

Backends, fastest first: ``cuda`` (compiled extension ``fastvl._C``), ``triton``
(:mod:`fastvl.kernels`), ``torch`` (pure PyTorch, always available). ``backend="auto"`` takes
the first that supports the call; an explicit backend that cannot serve it raises
:class:`BackendNotSupportedError` with the reasons. Kernels running in the Triton interpreter
(``TRITON_INTERPRET=1``, CPU tensors) are used only when asked for by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fastvl import _extension

BACKENDS = ("cuda", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendNotSupportedError(ValueError):
    """An explicitly requested backend cannot serve the call; ``reasons`` says why."""

    def __init__(self, op: str, backend: str, reasons: list[str]):
        self.op, self.backend, self.reasons = op, backend, list(reasons)
        listed = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"{op}: backend {backend!r} cannot serve this call:\n{listed}")


def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not installed or failed to import ({type(exc).__name__}: {exc})"
    return None


# Fixed at import (triton reads TRITON_INTERPRET when it is imported, too), so dispatch is
# plain attribute reads that torch.compile folds into guards-free constants.
TRITON_IMPORT_ERROR: Optional[str] = _triton_import_error()
TRITON_INTERPRETER: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_device_reasons(backend: str, device: torch.device) -> list[str]:
    """Why ``backend`` cannot run anything on ``device`` (empty if it can)."""
    if backend == "torch":
        return []
    if backend == "triton":
        if TRITON_IMPORT_ERROR:
            return [TRITON_IMPORT_ERROR]
        if device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRETER):
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
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def dtype_reasons(name: str, tensor: torch.Tensor, allowed=FLOAT_DTYPES) -> list[str]:
    if tensor.dtype in allowed:
        return []
    names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
    return [f"{name} has dtype {tensor.dtype}; this backend supports {names}"]


@dataclass
class Implementation:
    fn: Callable
    call_reasons: Optional[Callable[..., list[str]]] = None


@dataclass
class Op:
    """One public op and its implementations, tried in ``order`` by ``backend="auto"``."""

    name: str
    order: tuple = BACKENDS
    impls: dict = field(default_factory=dict)

    def implement(self, backend: str, fn: Callable, call_reasons: Optional[Callable] = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        self.impls[backend] = Implementation(fn, call_reasons)

    def device_reasons(self, backend: str, device: torch.device) -> list[str]:
        if backend not in self.impls:
            return [f"{self.name} has no {backend} implementation"]
        return backend_device_reasons(backend, device)

    def not_supported_reasons(self, backend: str, device: torch.device, *args) -> list[str]:
        """Why ``backend`` cannot serve ``self.name(*args)`` on ``device`` (empty if it can)."""
        reasons = self.device_reasons(backend, device)
        call_reasons = self.impls[backend].call_reasons if backend in self.impls else None
        if not reasons and call_reasons is not None:
            reasons = call_reasons(*args)
        return reasons

    def select(self, backend: str, device: torch.device, *args) -> Callable:
        """The implementation that serves this call; raises if an explicit backend cannot."""
        if backend == "auto":
            for candidate in self.order:
                if candidate == "triton" and device.type != "cuda":
                    continue  # interpreted kernels are for tests, never picked automatically
                if not self.not_supported_reasons(candidate, device, *args):
                    return self.impls[candidate].fn
            raise RuntimeError(f"{self.name}: no backend can serve this call")  # torch always can
        if backend not in BACKENDS:
            raise ValueError(
                f"{self.name}: backend must be 'auto' or one of {BACKENDS}, got {backend!r}"
            )
        reasons = self.not_supported_reasons(backend, device, *args)
        if reasons:
            raise BackendNotSupportedError(self.name, backend, reasons)
        return self.impls[backend].fn


OPS: dict[str, Op] = {}


def register_op(name: str, order: tuple = BACKENDS) -> Op:
    """Create and record the registry entry for a public op (listed by ``fastvl info``)."""
    if name in OPS:
        raise ValueError(f"op {name!r} is already registered")
    OPS[name] = op = Op(name, order)
    return op


def availability(device: torch.device) -> dict[str, dict[str, list[str]]]:
    """``{op: {backend: reasons}}`` for every registered op on ``device``; [] = available."""
    return {
        name: {backend: op.device_reasons(backend, device) for backend in BACKENDS}
        for name, op in OPS.items()
    }
