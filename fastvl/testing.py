"""Helpers for testing kernels: random inputs, odd sizes, output poisoning, error rules.

The error rule follows flash-attn's: a kernel's error against a float64 reference must be at
most ``factor`` times the error of the same math done by PyTorch in the low-precision dtype
(2 for forward, 3 for gradients), plus a small absolute floor for exact-in-both cases.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastvl._outputs import poison_outputs

__all__ = [
    "ODD_TOKEN_COUNTS",
    "HEAD_DIMS",
    "ERROR_FLOOR",
    "OPCHECK_INTERPRETER_UTILS",
    "poison_outputs",
    "random_tensor",
    "random_index",
    "max_error",
    "assert_within_reference_error",
    "assert_grads_within_reference_error",
    "assert_lse_within_reference_error",
    "assert_opcheck",
    "HostSyncError",
    "no_host_sync",
]

# Token counts of real ViTs that are never multiples of a block size, plus the edge cases.
ODD_TOKEN_COUNTS = (1, 7, 197, 577)
HEAD_DIMS = (32, 64, 80, 128)
# Absolute floors of the error rule: where the kernel and PyTorch are both accurate to
# roundoff, the ratio of two tiny errors means little.
ERROR_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-4,
    torch.bfloat16: 1e-3,
}
# torch.library.opcheck's checks that work on interpreted Triton (wrap_triton cannot capture
# interpreted kernels, so the AOT-dispatch checks run on a GPU only).
OPCHECK_INTERPRETER_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def random_tensor(*shape, dtype=torch.float32, device="cpu", generator=None, requires_grad=False):
    """Standard-normal values (never zeros) in ``dtype``."""
    values = torch.randn(*shape, generator=generator, dtype=torch.float64, device=device)
    return values.to(dtype).requires_grad_(requires_grad)


def random_index(batch, num_kept, num_tokens, *, unique=True, device="cpu", generator=None):
    """(batch, num_kept) int64 token indices in [0, num_tokens), each row shuffled.

    ``unique=True`` draws without replacement (masking, pruning); else with repeats.
    """
    if unique:
        if num_kept > num_tokens:
            raise ValueError(f"num_kept={num_kept} > num_tokens={num_tokens} with unique=True")
        noise = torch.rand(batch, num_tokens, generator=generator, device=device)
        return noise.argsort(dim=1)[:, :num_kept].contiguous()
    return torch.randint(
        0, num_tokens, (batch, num_kept), generator=generator, device=device, dtype=torch.int64
    )


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| in float64; NaN anywhere (e.g. an unwritten poisoned element) -> inf."""
    diff = (actual.double() - reference.double()).abs()
    if diff.isnan().any():
        return float("inf")
    return diff.max().item() if diff.numel() else 0.0


def assert_within_reference_error(
    actual: torch.Tensor,
    reference64: torch.Tensor,
    low_precision: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float = 1e-6,
    name: str = "output",
) -> None:
    """Assert err(actual) <= factor * err(low_precision) + atol, errors taken against reference64.

    ``low_precision``: the same computation done by plain PyTorch in the kernel's dtype.
    """
    if actual.shape != reference64.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference64.shape)}")
    kernel_error = max_error(actual, reference64)
    torch_error = max_error(low_precision, reference64)
    bound = factor * torch_error + atol
    if not kernel_error <= bound:
        raise AssertionError(
            f"{name}: max error {kernel_error:.3g} exceeds {factor} x PyTorch's {torch_error:.3g} "
            f"+ {atol:.1g} = {bound:.3g}"
        )


def assert_grads_within_reference_error(names, actual, reference64, low_precision, *,
                                        factor: float = 3.0, atol: float = 1e-6) -> None:
    """The error rule for several gradients: dtype, shape, finiteness, then the bound each."""
    for name, got, ref, low in zip(names, actual, reference64, low_precision):
        assert got.dtype == low.dtype and got.shape == low.shape, name
        assert torch.isfinite(got).all(), f"{name} is not finite"
        assert_within_reference_error(got, ref, low, factor=factor, atol=atol, name=name)


def assert_opcheck(op, args) -> None:
    """torch.library.opcheck passes for ``op(*args)`` (CPU tensors: the interpreter's checks)."""
    on_cpu = all(a.device.type == "cpu" for a in args if isinstance(a, torch.Tensor))
    kwargs = {"test_utils": OPCHECK_INTERPRETER_UTILS} if on_cpu else {}
    result = torch.library.opcheck(op, args, **kwargs)
    assert all(v == "SUCCESS" for v in result.values()), (op, result)


def assert_lse_within_reference_error(lse, reference64, low_precision, dtype, name="lse"):
    """lse (float32): the -inf rows (no visible key) must match exactly, the rest follow the
    error rule with the floor of the inputs' ``dtype``."""
    assert lse.dtype == torch.float32
    empty = torch.isneginf(reference64)
    assert torch.equal(torch.isneginf(lse), empty), f"{name}: -inf rows differ from the reference"
    keep = ~empty
    assert_within_reference_error(
        lse[keep], reference64[keep], low_precision[keep], factor=2, atol=ERROR_FLOOR[dtype],
        name=name,
    )


class HostSyncError(AssertionError):
    """A tensor's values were read on the host, or a shape depended on them."""


# Reading values on the host (a device sync on a GPU), in Python and at the ATen level, and
# ops whose output shape depends on values (a sync, and not capturable in a CUDA graph).
_HOST_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
    torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu,
}
_DATA_DEPENDENT = ("_local_scalar_dense", "nonzero", "_unique", "unique_", "masked_select",
                   "is_nonzero", "equal", "repeat_interleave.Tensor", "bincount")


class _PythonReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            raise HostSyncError(f"host read of tensor values: {func.__name__}")
        return func(*args, **(kwargs or {}))


def _has_bool_index(args) -> bool:
    """Whether an index op got a boolean mask (its output size depends on the values)."""
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class _DispatchReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if name.startswith(_DATA_DEPENDENT) or (
            name.startswith("index") and _has_bool_index(args)
        ):
            raise HostSyncError(f"value-dependent op {func}: a host sync on a GPU")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    """Raise :class:`HostSyncError` on anything in the block that would synchronise a GPU with
    the host (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``, ...); works on CPU tensors,
    so a CPU run (with :func:`fastvl.bench.host_overhead.gpu_path`) checks the GPU path."""
    with _PythonReads(), _DispatchReads():
        yield
