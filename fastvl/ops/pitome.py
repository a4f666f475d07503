"""PiToMe (spectrum-preserving token merging): ``pitome_energy`` scores the tokens,
``pitome_match`` plans a merge step that :func:`fastvl.ops.tome_merge` applies.

A PiToMe step inside a ViT block (after attention, keys averaged over heads as the metric)::

    plan = pitome_match(k.mean(1), r, margin=m, num_prefix_tokens=1)   # k: (B, H, N, D)
    x, size = tome_merge(plan, x, size, check_plan=False)              # (B, N - r, C)
    # next block's proportional attention: attention(..., key_bias=size.log())

Definitions (energy, margin function, which tokens merge into which, the token order):
:mod:`fastvl.reference.pitome`. The energy is the costly part (all T^2 similarities):

* ``torch`` (:func:`fastvl.reference.pitome.pitome_energy`): the similarity matrix,
  float64 capable;
* ``triton`` (``fastvl::pitome_energy_triton``, :mod:`fastvl.kernels.pitome`): tiled, the
  T x T matrix never stored; float16 / bfloat16 / float32; eager calls launch the kernel
  directly, torch.compile sees the registered op.

The plan (sort by energy, r x r similarities of the mergeable tokens, destinations, CSR
offsets) is built from PyTorch ops on either backend, without a host synchronisation. Nothing
here is differentiable (PiToMe's choices are constants, as ToMe's).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastvl.ops._checks import check_float_tensor, check_int, is_finite_number
from fastvl.ops._eager import can_launch_directly, launch_directly
from fastvl.ops.registry import KERNEL_DTYPES, TRITON_IMPORT_ERROR, Call, Supports, register_op
from fastvl.reference import pitome as _reference
from fastvl.reference.tome import TomePlan

__all__ = ["check_pitome_options", "pitome_energy", "pitome_match", "pitome_margins",
           "PITOME_ENERGY"]

PITOME_ENERGY = register_op("pitome_energy",
                            describe=lambda metric, *args: Call(metric.device, metric.dtype))


def _energy_torch(metric, margin, alpha):
    return _reference.pitome_energy(metric, margin, alpha).float()


PITOME_ENERGY.implement("torch", _energy_torch, Supports(dtype_of="metric"))

if TRITON_IMPORT_ERROR is None:
    from fastvl.kernels import pitome as _kernels

    @torch.library.triton_op("fastvl::pitome_energy_triton", mutates_args=())
    def pitome_energy_triton(metric: torch.Tensor, margin: float, alpha: float) -> torch.Tensor:
        """metric (B, T, C) -> float32 (B, T) energy; no autograd."""
        return _kernels.pitome_energy(metric, margin, alpha)

    @torch.library.register_fake("fastvl::pitome_energy_triton")
    def _energy_fake(metric, margin, alpha):
        return metric.new_empty(metric.shape[:2], dtype=torch.float32)

    def _energy_triton(metric, margin, alpha):
        metric = metric.detach()
        if can_launch_directly():
            return launch_directly(_kernels.pitome_energy, metric, margin, alpha)
        return pitome_energy_triton(metric, margin, alpha)

    PITOME_ENERGY.implement("triton", _energy_triton,
                            Supports(dtypes=KERNEL_DTYPES, dtype_of="metric"))


def _check_number(op: str, name: str, value) -> float:
    if not is_finite_number(value):
        raise TypeError(f"{op}: {name} must be a finite number, got {value!r}")
    return float(value)


def check_pitome_options(op: str, margins, alpha, depth: int) -> tuple[tuple[float, ...], float]:
    """A PiToMe patch's (margins, alpha), checked: ``margins`` None (PiToMe's defaults,
    :func:`pitome_margins`) or ``depth`` finite numbers, ``alpha`` a finite number."""
    if margins is None:
        margins = pitome_margins(depth)
    if (isinstance(margins, (str, bytes)) or not isinstance(margins, Sequence)
            or len(margins) != depth or not all(map(is_finite_number, margins))):
        raise ValueError(f"{op}: margins must be {depth} finite numbers (one per block), got "
                         f"{margins!r}")
    return tuple(float(m) for m in margins), _check_number(op, "alpha", alpha)


def _check_metric(op: str, metric) -> None:
    check_float_tensor(op, "metric", metric)
    if metric.dim() != 3:
        raise ValueError(f"{op}: metric must be (B, N, C), got shape {tuple(metric.shape)}")


def pitome_energy(metric: torch.Tensor, *, margin: float, alpha: float = 1.0,
                  backend: str = "auto") -> torch.Tensor:
    """PiToMe's energy of each token: the mean over all tokens j of ``f(cos(x_i, x_j) -
    margin)``, f the ELU with ``alpha`` (see :mod:`fastvl.reference.pitome`).

    Args:
        metric: (B, T, C) float, the tokens compared (PiToMe: the keys averaged over heads,
            prefix tokens left out).
        margin, alpha: the margin function's shift and negative scale (PiToMe: margin
            ``0.9 - 0.8 * layer / depth``, alpha 1).
        backend: "auto", "triton" or "torch".

    Returns:
        float32 (B, T); no gradient.
    """
    op = "pitome_energy"
    _check_metric(op, metric)
    margin, alpha = _check_number(op, "margin", margin), _check_number(op, "alpha", alpha)
    fn = PITOME_ENERGY.select(backend, metric.device, metric, margin, alpha)
    return fn(metric, margin, alpha)


def pitome_match(metric: torch.Tensor, r: int, *, margin: float, alpha: float = 1.0,
                 num_prefix_tokens: int = 1, backend: str = "auto") -> TomePlan:
    """Plan a PiToMe merge step of N tokens: r of the 2r highest-energy non-prefix tokens
    merge into the other r (each into its most similar one); the others and the P prefix
    tokens are kept. Apply it with ``tome_merge(plan, x, size, check_plan=False)``.

    Args:
        metric: (B, N, C) float, all N tokens (the prefix ones are left out of the energy).
        r: int in [0, (N - P) // 2], tokens merged away.
        margin, alpha: see :func:`pitome_energy`.
        num_prefix_tokens: P leading tokens never merged (class token, registers).
        backend: the :func:`pitome_energy` backend.

    Returns:
        a :class:`fastvl.ops.TomePlan` (N -> N - r tokens, PiToMe's order ``[prefix,
        protected by energy, merge destinations]``).
    """
    op = "pitome_match"
    _check_metric(op, metric)
    check_int(op, "num_prefix_tokens", num_prefix_tokens)
    check_int(op, "r", r)
    prefix = num_prefix_tokens
    if not 0 <= prefix <= metric.shape[1]:
        raise ValueError(f"{op}: num_prefix_tokens must lie in [0, N] = [0, {metric.shape[1]}], "
                         f"got {prefix}")
    count = metric.shape[1] - prefix
    if not 0 <= r <= count // 2:
        raise ValueError(f"{op}: r must lie in [0, (N - P) // 2] = [0, {count // 2}], got {r}")
    tokens = metric[:, prefix:]
    energy = pitome_energy(tokens, margin=margin, alpha=alpha, backend=backend)
    return _reference.pitome_plan(energy, tokens, r, prefix)


def pitome_margins(depth: int) -> list[float]:
    """PiToMe's margin of each of ``depth`` blocks: ``0.9 - 0.8 * i / depth`` (its timm
    patch), high (only near-duplicates count as similar) early, lower later."""
    return [0.9 - 0.8 * i / depth for i in range(depth)]
