"""Argument checks shared by the ops; every message starts with the op's name."""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake

from fastvl.ops import registry

INT_TYPES = (int, torch.SymInt)


def check_tensor(op: str, name: str, value) -> None:
    """TypeError unless ``value`` is a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def is_int(value) -> bool:
    """A Python (or symbolic) int, not a bool."""
    return isinstance(value, INT_TYPES) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """Whether value is a finite int or float (bools rejected)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_int(op: str, name: str, value, what: str = "an int") -> None:
    """TypeError unless ``value`` is an int (bools rejected)."""
    if not is_int(value):
        raise TypeError(f"{op}: {name} must be {what}, got {type(value).__name__}")


def host_readable(t: torch.Tensor) -> bool:
    """Whether t's values can be read now at no cost: a real CPU tensor in eager mode (not
    while torch.compile traces, nor under a dispatch mode such as fake tensors or the host-sync
    detector, nor under a simulated GPU dispatch, where CPU tensors stand for GPU ones)."""
    return (not registry.simulating_gpu() and t.device.type == "cpu"
            and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()
            and not is_fake(t))


def value_check_allowed(t: torch.Tensor) -> bool:
    """Whether a check that reads t's values (one host sync) may run now: not while
    torch.compile traces, nor while a CUDA graph is being captured, nor on an empty t."""
    if t.numel() == 0 or torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_token_index(op: str, name: str, index, batch: int, other: str) -> None:
    """index must be a (B, K) int64 tensor whose B matches ``batch`` (the batch of ``other``)."""
    check_tensor(op, name, index)
    if index.dim() != 2:
        raise ValueError(f"{op}: {name} must be (B, K), got shape {tuple(index.shape)}")
    if index.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be torch.int64, got {index.dtype}")
    if index.shape[0] != batch:
        raise ValueError(
            f"{op}: {name} batch size {index.shape[0]} does not match {other} (batch {batch})"
        )


def check_float_tensor(op: str, name: str, value) -> None:
    """TypeError unless ``value`` is a floating-point tensor."""
    check_tensor(op, name, value)
    if not value.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {value.dtype}")


def check_value_range(op: str, name: str, t: torch.Tensor, low: int, high: int,
                      meaning: str) -> None:
    """ValueError unless every value of t lies in [low, high); ``meaning`` explains the range.

    One reduction and one host sync, so skipped where :func:`value_check_allowed` says no.
    """
    if not value_check_allowed(t):
        return
    found_low, found_high = torch.stack(torch.aminmax(t)).tolist()
    if found_low < low or found_high >= high:
        raise ValueError(
            f"{op}: {name} values must lie in [{low}, {high}) ({meaning}), "
            f"found values from {found_low} to {found_high}"
        )
