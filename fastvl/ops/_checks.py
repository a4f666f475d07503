"""Argument checks shared by the ops; every message starts with the op's name."""

from __future__ import annotations

import torch

INT_TYPES = (int, torch.SymInt)


def check_tensor(op: str, name: str, value) -> None:
    """TypeError unless ``value`` is a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def is_int(value) -> bool:
    """A Python (or symbolic) int, not a bool."""
    return isinstance(value, INT_TYPES) and not isinstance(value, bool)


def check_int(op: str, name: str, value, what: str = "an int") -> None:
    """TypeError unless ``value`` is an int (bools rejected)."""
    if not is_int(value):
        raise TypeError(f"{op}: {name} must be {what}, got {type(value).__name__}")
