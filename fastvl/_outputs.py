"""Output allocation shared by every kernel launcher, with optional poisoning for tests.

Kernels allocate their outputs through :func:`empty_output`. Inside
:func:`fastvl.testing.poison_outputs` the buffers are pre-filled with NaN (floating) or a
sentinel (integer), so any element a kernel fails to write shows up in the comparison. Inside
:func:`zero_integer_outputs` (host-overhead measurement, where launches are skipped) integer
outputs are zeros, so index arithmetic downstream of a skipped kernel stays in bounds.
"""

import contextlib

import torch
from torch.utils._python_dispatch import _disable_current_modes

_poison_depth = 0
_zero_integer_depth = 0


@contextlib.contextmanager
def poison_outputs():
    """Pre-fill every output fastvl allocates with NaN / -1 while the context is active."""
    global _poison_depth
    _poison_depth += 1
    try:
        yield
    finally:
        _poison_depth -= 1


@contextlib.contextmanager
def zero_integer_outputs():
    """Integer outputs are zeros while the context is active (the fill is invisible to
    dispatch modes, so launch counters do not see it)."""
    global _zero_integer_depth
    _zero_integer_depth += 1
    try:
        yield
    finally:
        _zero_integer_depth -= 1


_TEMPLATES: dict = {}  # (dtype, device) -> an empty tensor whose new_empty allocates like it


def empty_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` unless poisoning is on, then filled with NaN (floats) or -1 (ints)."""
    template = _TEMPLATES.get((dtype, device))
    if template is None:
        template = _TEMPLATES[(dtype, device)] = torch.empty(0, dtype=dtype, device=device)
    # (Tensor.new_empty of a tuple: torch.empty's keyword parsing costs µs more per call)
    out = template.new_empty(tuple(shape))
    if _poison_depth:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    elif _zero_integer_depth and not out.is_floating_point():
        with _disable_current_modes():
            out.zero_()
    return out
