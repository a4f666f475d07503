"""``lora_linear`` and ``routed_lora_linear``: a linear layer plus its LoRA branch in one op.

``out = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` (peft's layout and semantics); the routed
variant gives each token its own adapter (or none) from a per-token index, without host
synchronisation (CUDA-graph safe). Layouts in :mod:`fastvl.reference.lora`.

Gradients follow ``requires_grad``: the base ``weight`` and ``bias`` are frozen by default in
LoRA training (``requires_grad=False``) and then get none; set it to train them too. lora_a and
lora_b always get tensors, zeros for adapters no token was routed to (DDP needs no
``find_unused_parameters``). A tensor ``scaling`` is a constant (no gradient).

Dropout (``dropout_p > 0``) applies to the LoRA branch's input only; pass ``dropout_p=0`` in
eval mode. With ``seed`` the mask is reproducible; without one it is drawn from torch's
default generator. The two backends draw different masks for the same seed. Under
``torch.compile(fullgraph=True)`` or CUDA-graph capture, dropout on the triton backend needs
an explicit ``seed`` (else one is drawn on the host: a graph break, and one fixed mask per
captured graph); on the torch backend a seed builds a ``torch.Generator``, which does not
trace, so compiled code there uses ``seed=None``.

Backends:

* ``torch`` (:mod:`fastvl.reference.lora`): ``F.linear`` for the base, the r-column shrink
  and an in-place ``addmm_`` expand into the base output; routed: shrink against all E
  adapters at once and a one-hot gate (E·r columns per row, for few adapters). Autograd by
  PyTorch; stores the dropout mask. Float64 capable.
* ``triton`` (``fastvl::lora_linear_fwd_triton`` / ``..._bwd_triton``,
  :mod:`fastvl.kernels.lora`): torch's GEMM for the base (cuBLAS on GPU), then one kernel
  that computes the rank-r shrink of a row block and adds its expand into the base output
  (x read once from DRAM, the output read and written once; over column chunks × row
  blocks, the tiny shrink recomputed per chunk so that the grid fills the GPU), r <= 64; for
  a decode batch (few rows, up to ``kernels.lora.row_path_max_rows``, any number of
  adapters) one GEMV-style launch per (column block, row) instead, so a step over tens of
  adapters runs in parallel over rows and output columns; backward: ``dY W`` (and
  ``dYᵀ x`` for a trainable base) by torch, then one pass over dY that computes
  ``ds = dY B`` and adds the LoRA part of dX, and one over x and dY by column tiles that
  sums dA and dB in row order, written in the adapters' dtype (no zero-fill, no cast, no
  atomics: bit-reproducible, with or without ``torch.use_deterministic_algorithms``), the
  dropout mask regenerated from the seed (Philox). A float scaling is a kernel argument
  (no tensor per call). float16 / bfloat16 / float32. No double backward. In eager mode the
  kernels are launched directly and the gradient comes from a ``torch.autograd.Function``
  (:class:`fastvl.ops._eager.EagerOp`); torch.compile sees the registered ops.
  The checks of a call are memoized by shapes, dtypes, devices and flags.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from fastvl.ops._checks import check_tensor, check_value_range, is_int
from fastvl.ops._eager import EagerOp, call_key, memoized
from fastvl.ops.registry import KERNEL_DTYPES, TRITON_IMPORT_ERROR, Call, Supports, register_op
from fastvl.reference import lora as reference

__all__ = ["lora_linear", "routed_lora_linear", "LORA_LINEAR", "ROUTED_LORA_LINEAR"]



def _describe(x, weight, bias, lora_a, *other_args) -> Call:
    return Call(x.device, x.dtype, sizes=(("rank", int(lora_a.shape[-2])),))


LORA_LINEAR = register_op("lora_linear", sizes={"rank": "LoRA rank r"}, describe=_describe)
ROUTED_LORA_LINEAR = register_op(
    "routed_lora_linear", sizes={"rank": "LoRA rank r"}, describe=_describe
)

# Implementations are called as
#   plain:  fn(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
#   routed: fn(x, weight, bias, lora_a, lora_b, scaling, route, dropout_p, seed)
# with validated arguments, x (N, in), route (N,), a tensor scaling detached.
LORA_LINEAR.implement("torch", reference.lora_linear, Supports(dtype_of="x"))
ROUTED_LORA_LINEAR.implement("torch", reference.routed_lora_linear, Supports(dtype_of="x"))


def _fwd_fake(x, weight, bias, lora_a, lora_b, scale, scaling, route, dropout_p, seed):
    from fastvl.kernels.lora import shrink_columns

    return (x.new_empty(x.shape[0], weight.shape[0]),
            x.new_empty(x.shape[0], shrink_columns(lora_a.shape[1]),
                        dtype=torch.float32))


def _bwd_fake(grad_out, x, weight, lora_a, lora_b, scale, scaling, route, s, dropout_p, seed,
              compute_dx, compute_dweight):
    return (x.new_empty(x.shape) if compute_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if compute_dweight else x.new_empty(0),
            lora_a.new_empty(lora_a.numel() + lora_b.numel()))


if TRITON_IMPORT_ERROR is None:
    from fastvl.kernels import lora as _kernels

    def _forward_kernels(x, weight, bias, lora_a, lora_b, scale, scaling, route, dropout_p,
                         seed):
        out = F.linear(x, weight, bias)
        s = _kernels.lora_forward(x, lora_a, lora_b, scaling if scale is None else scale,
                                  route, dropout_p, seed, out)
        return out, s

    def _backward_kernels(grad_out, x, weight, lora_a, lora_b, scale, scaling, route, s,
                          dropout_p, seed, compute_dx, compute_dweight):
        dx = grad_out @ weight if compute_dx else None
        grads = _kernels.lora_backward(grad_out, x, lora_a, lora_b,
                                       scaling if scale is None else scale, route, s,
                                       dropout_p, seed, dx)
        dweight = grad_out.t() @ x if compute_dweight else x.new_empty(0)
        return x.new_empty(0) if dx is None else dx, dweight, grads

    @torch.library.triton_op("fastvl::lora_linear_fwd_triton", mutates_args=())
    def lora_linear_fwd_triton(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: Optional[torch.Tensor],
        scaling: float,
        route: Optional[torch.Tensor],
        dropout_p: float,
        seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, in), weight (out, in), lora_a (E, r, in), lora_b (E, out, r), scale (E,)
        float32 or None (then every adapter's scale is ``scaling``), route (N,) or None (all
        rows adapter 0) -> (out (N, out), the float32 shrink s (N, BLOCK_R) kept for the
        backward)."""
        return _forward_kernels(x, weight, bias, lora_a, lora_b, scale, scaling, route,
                                dropout_p, seed)

    @torch.library.triton_op("fastvl::lora_linear_bwd_triton", mutates_args=())
    def lora_linear_bwd_triton(
        grad_out: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: Optional[torch.Tensor],
        scaling: float,
        route: Optional[torch.Tensor],
        s: torch.Tensor,
        dropout_p: float,
        seed: int,
        compute_dx: bool,
        compute_dweight: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (dx (N, in), dweight (out, in), dA (E, r, in) and dB (E, out, r) flattened into
        one (E·r·in + E·out·r,) tensor); dx and dweight empty (shape (0,)) when not asked
        for; dA / dB are always summed in a fixed order (no atomics)."""
        return _backward_kernels(grad_out, x, weight, lora_a, lora_b, scale, scaling, route, s,
                                 dropout_p, seed, compute_dx, compute_dweight)

    def _setup_context(ctx, inputs, output):
        x, weight, bias, lora_a, lora_b, scale, scaling, route, dropout_p, seed = inputs
        ctx.save_for_backward(x, weight, lora_a, lora_b, scale, route, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed

    def _backward(ctx, grad_out, grad_s):
        x, weight, lora_a, lora_b, scale, route, s = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        dx, dweight, grads = _backward_op(
            grad_out, x, weight, lora_a, lora_b, scale, ctx.scaling, route, s, ctx.dropout_p,
            ctx.seed, needs_x, needs_weight,
        )
        da, db = _kernels.split_adapter_grads(grads, lora_a, lora_b)
        dbias = grad_out.sum(0, dtype=torch.float32).to(grad_out.dtype) if needs_bias else None
        return (dx if needs_x else None, dweight if needs_weight else None, dbias, da, db,
                None, None, None, None, None)

    torch.library.register_fake(lora_linear_fwd_triton, _fwd_fake)
    torch.library.register_fake(lora_linear_bwd_triton, _bwd_fake)
    _forward_op = EagerOp(lora_linear_fwd_triton, _forward_kernels, _setup_context, _backward,
                          grad_inputs=(0, 1, 2, 3, 4))
    _backward_op = EagerOp(lora_linear_bwd_triton, _backward_kernels)

    def _triton_seed(dropout_p: float, seed: Optional[int]) -> int:
        """The Philox seed: the caller's, or one drawn from torch's default generator."""
        if dropout_p == 0.0:
            return 0
        return int(torch.randint(2**31 - 1, ())) if seed is None else seed

    def _plain_triton(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
        return _forward_op(x, weight, bias, lora_a[None], lora_b[None], None, scaling, None,
                           dropout_p, _triton_seed(dropout_p, seed))[0]

    def _routed_triton(x, weight, bias, lora_a, lora_b, scaling, route, dropout_p, seed):
        scale = None
        if isinstance(scaling, torch.Tensor):
            scale, scaling = scaling.to(torch.float32), 0.0
        return _forward_op(x, weight, bias, lora_a, lora_b, scale, scaling, route, dropout_p,
                           _triton_seed(dropout_p, seed))[0]

    _TRITON_SUPPORTS = Supports(
        dtypes=KERNEL_DTYPES, dtype_of="x", max_sizes={"rank": _kernels.MAX_RANK}
    )
    LORA_LINEAR.implement("triton", _plain_triton, _TRITON_SUPPORTS)
    ROUTED_LORA_LINEAR.implement("triton", _routed_triton, _TRITON_SUPPORTS)


# ---- validation --------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _validate_common(op, x, weight, bias, lora_a, lora_b, dropout_p, seed,
                     adapter_dims: int) -> None:
    """Checks shared by both ops."""
    check_tensor(op, "x", x)
    check_tensor(op, "weight", weight)
    check_tensor(op, "lora_a", lora_a)
    check_tensor(op, "lora_b", lora_b)
    if bias is not None:
        check_tensor(op, "bias", bias)
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be (..., in), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be (out, in), got shape {_shape(weight)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"{op}: x's last dim {x.shape[-1]} does not match weight's in = {in_features} "
            f"(weight shape {_shape(weight)})"
        )
    if bias is not None and _shape(bias) != (out_features,):
        raise ValueError(f"{op}: bias must be (out,) = ({out_features},), got {_shape(bias)}")
    lead = "(E, " if adapter_dims == 3 else "("
    if lora_a.dim() != adapter_dims:
        raise ValueError(f"{op}: lora_a must be {lead}r, in), got shape {_shape(lora_a)}")
    if lora_b.dim() != adapter_dims:
        raise ValueError(f"{op}: lora_b must be {lead}out, r), got shape {_shape(lora_b)}")
    rank = lora_a.shape[-2]
    if lora_b.shape[-1] != rank:
        raise ValueError(
            f"{op}: rank mismatch: lora_a {_shape(lora_a)} has r = {rank} but lora_b "
            f"{_shape(lora_b)} has r = {lora_b.shape[-1]}"
        )
    if lora_a.shape[-1] != in_features:
        raise ValueError(
            f"{op}: lora_a {_shape(lora_a)} must have in = {in_features} columns (weight's)"
        )
    if lora_b.shape[-2] != out_features:
        raise ValueError(
            f"{op}: lora_b {_shape(lora_b)} must have out = {out_features} rows (weight's)"
        )
    if adapter_dims == 3 and lora_a.shape[0] != lora_b.shape[0]:
        raise ValueError(
            f"{op}: lora_a has {lora_a.shape[0]} adapters but lora_b {lora_b.shape[0]}"
        )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{op}: dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if seed is not None and not is_int(seed):
        raise TypeError(f"{op}: seed must be an int or None, got {type(seed).__name__}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(
                f"{op}: x and {name} must share one dtype, got x {x.dtype} and {name} {t.dtype}"
            )
        if t.device != x.device:
            raise ValueError(
                f"{op}: x is on {x.device} but {name} is on {t.device}; put every tensor on "
                "the same device"
            )


def _check_scalar_scaling(op: str, scaling) -> None:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"{op}: scaling must be a float, got {type(scaling).__name__}")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """A linear layer with a LoRA adapter: ``x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``.

    Args:
        x: (..., in). weight: (out, in). bias: (out,) or None.
        lora_a: (r, in). lora_b: (out, r) (peft's ``lora_A.weight`` / ``lora_B.weight``).
        scaling: float (peft's ``lora_alpha / r``).
        dropout_p: dropout on the LoRA branch's input, in [0, 1); 0 in eval mode.
        seed: makes the dropout mask reproducible; None draws from torch's generator.
        backend: "auto", "triton" or "torch" (see ``python -m fastvl info``).

    Returns:
        (..., out) in x's dtype (every tensor argument must share it). Differentiable in x,
        lora_a, lora_b, and in weight / bias where they require grad.
    """
    key = call_key((x, weight, bias, lora_a, lora_b), type(scaling), dropout_p, type(seed),
                   backend)
    fn = memoized(LORA_LINEAR, key, lambda: _resolve_plain(
        x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, backend))
    if x.dim() == 2:  # (views cost microseconds too)
        return fn(x, weight, bias, lora_a, lora_b, float(scaling), float(dropout_p), seed)
    out = fn(_rows(x), weight, bias, lora_a, lora_b, float(scaling), float(dropout_p), seed)
    return out.view(*x.shape[:-1], out.shape[-1])


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., in) as (N, in), N the product of the leading dims (a -1 is ambiguous when x
    holds no element)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _resolve_plain(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, backend):
    """The implementation for a :func:`lora_linear` call, whose arguments are checked."""
    op = "lora_linear"
    _validate_common(op, x, weight, bias, lora_a, lora_b, dropout_p, seed, adapter_dims=2)
    _check_scalar_scaling(op, scaling)
    return LORA_LINEAR.select(backend, x.device, x, weight, bias, lora_a, lora_b,
                              float(scaling), float(dropout_p), seed)


def _check_route_range(route: torch.Tensor, num_adapters: int, op: str) -> None:
    """ValueError unless every route value lies in [-1, E) (one host sync; skipped while
    torch.compile traces or a CUDA graph is captured)."""
    check_value_range(
        op, "route", route, -1, num_adapters,
        f"-1: no adapter, else an adapter of lora_a's E = {num_adapters}",
    )


def routed_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Union[float, torch.Tensor],
    route: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    backend: str = "auto",
    check_route: bool = True,
) -> torch.Tensor:
    """A linear layer whose tokens each use one of E LoRA adapters, or none (PLoRA-style).

    ``out[t] = x[t] Wᵀ + b + scaling[e] · (dropout(x[t]) Aₑᵀ) Bₑᵀ`` with e = route[t]; a
    token with route -1 gets the base layer only. No host sync, no row copies.

    Args:
        x: (..., in). weight: (out, in). bias: (out,) or None.
        lora_a: (E, r, in). lora_b: (E, out, r).
        scaling: float, or (E,) floating tensor (one per adapter; a constant, no gradient).
        route: int64, x's shape without the last dim, values in [-1, E); size-1 dims
            broadcast, so (B, 1) for x (B, N, in) gives each sequence one adapter (serving
            batches of many adapters: the same route for prefill and every decode step).
        dropout_p, seed, backend: as :func:`lora_linear`.
        check_route: verify the route range first (one host sync; skipped under
            torch.compile and CUDA-graph capture). Unchecked values outside [0, E) get no
            adapter, like -1 (every backend).

    Returns:
        (..., out) in x's dtype. lora_a / lora_b gradients are zeros for adapters with no
        routed tokens.
    """
    scale = scaling if isinstance(scaling, torch.Tensor) else None
    key = call_key((x, weight, bias, lora_a, lora_b, scale, route), type(scaling), dropout_p,
                   type(seed), backend)
    fn = memoized(ROUTED_LORA_LINEAR, key, lambda: _resolve_routed(
        x, weight, bias, lora_a, lora_b, scaling, route, dropout_p, seed, backend))
    if check_route:
        _check_route_range(route, lora_a.shape[0], "routed_lora_linear")
    scaling = float(scaling) if scale is None else scale.detach()
    tokens = x.shape[:-1]
    if x.dim() == 2 and route.shape == tokens:  # (views cost microseconds too)
        return fn(x, weight, bias, lora_a, lora_b, scaling, route, float(dropout_p), seed)
    out = fn(_rows(x), weight, bias, lora_a, lora_b, scaling, route.expand(tokens).reshape(-1),
             float(dropout_p), seed)
    return out.view(*tokens, out.shape[-1])


def _resolve_routed(x, weight, bias, lora_a, lora_b, scaling, route, dropout_p, seed, backend):
    """The implementation for a :func:`routed_lora_linear` call, whose arguments (but not
    the route's values) are checked."""
    op = "routed_lora_linear"
    _validate_common(op, x, weight, bias, lora_a, lora_b, dropout_p, seed, adapter_dims=3)
    num_adapters = lora_a.shape[0]
    if isinstance(scaling, torch.Tensor):
        if _shape(scaling) != (num_adapters,) or not scaling.is_floating_point():
            raise ValueError(
                f"{op}: a tensor scaling must be floating (E,) = ({num_adapters},), got "
                f"{scaling.dtype} of shape {_shape(scaling)}"
            )
        if scaling.device != x.device:
            raise ValueError(f"{op}: x is on {x.device} but scaling is on {scaling.device}")
    else:
        _check_scalar_scaling(op, scaling)
        scaling = float(scaling)
    check_tensor(op, "route", route)
    if route.dtype != torch.int64:
        raise TypeError(f"{op}: route must be torch.int64, got {route.dtype}")
    tokens = _shape(x)[:-1]
    if route.dim() != len(tokens) or any(
        size not in (1, want) for size, want in zip(route.shape, tokens)
    ):
        raise ValueError(
            f"{op}: route must have x's shape without the last dim, {tokens}, or that shape "
            f"with size-1 dims to broadcast (e.g. (B, 1): one adapter per sequence), got "
            f"{_shape(route)}"
        )
    if route.device != x.device:
        raise ValueError(f"{op}: x is on {x.device} but route is on {route.device}")
    return ROUTED_LORA_LINEAR.select(backend, x.device, x, weight, bias, lora_a, lora_b,
                                     scaling, route, float(dropout_p), seed)
