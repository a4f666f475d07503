"""``gather_tokens``: pick K tokens per sample, out[b, k] = x[b, index[b, k]], with backward.

The primitive that token pruning and MAE masking build on. Three backends:
``torch`` (``torch.gather``), ``triton`` (``fastvl::gather_tokens_triton``, a
``torch.library.triton_op``) and ``cuda`` (``fastvl::gather_tokens_cuda`` from ``fastvl._C``).
The backward of a gather is a scatter-add into zeros, and the backward of that is a gather
again, so both directions are registered ops with gradients (double backward works).

Eager mode launches the kernels directly (:class:`fastvl.ops._eager.EagerOp`); torch.compile
and dispatch modes get the registered ops.
"""

from __future__ import annotations

import torch

from fastvl import _extension, reference
from fastvl.ops._checks import check_tensor, check_token_index, check_value_range
from fastvl.ops._eager import EagerOp, call_key, memoized
from fastvl.ops.registry import TRITON_IMPORT_ERROR, Call, Supports, register_op

GATHER_TOKENS = register_op("gather_tokens", describe=lambda x, index: Call(x.device, x.dtype))


# ---- gather / scatter-add ----------------------------------------------------------------


def _gather_tokens_fake(x, index):
    return x.new_empty(x.shape[0], index.shape[1], x.shape[2])


def _scatter_add_tokens_fake(src, index, num_tokens):
    return src.new_empty(src.shape[0], num_tokens, src.shape[2])


def _kernel_pair(gather_op, scatter_add_op, gather, scatter_add) -> EagerOp:
    """A backend's gather / scatter-add ops (and ``gather(x, index)``, ``scatter_add(src,
    index, num_tokens)``, what they compute) with fake impls and gradients attached; returns
    the gather :class:`EagerOp`.

    Each op is the other's adjoint, so double backward works. The explicit fake impls
    (rather than tracing a triton_op's body) also serve the Triton interpreter, where
    ``wrap_triton`` cannot capture kernels.
    """

    def gather_setup(ctx, inputs, output):
        x, index = inputs
        ctx.save_for_backward(index)
        ctx.num_tokens = x.shape[1]

    def gather_backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        return eager_scatter_add(grad_out, index, ctx.num_tokens), None

    def scatter_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def scatter_backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        return eager_gather(grad_out, index), None, None

    torch.library.register_fake(gather_op, _gather_tokens_fake)
    torch.library.register_fake(scatter_add_op, _scatter_add_tokens_fake)
    eager_gather = EagerOp(gather_op, gather, gather_setup, gather_backward, (0,),
                           double_backward=True)
    eager_scatter_add = EagerOp(scatter_add_op, scatter_add, scatter_setup, scatter_backward,
                                (0,), double_backward=True)
    return eager_gather


KERNEL_SUPPORTS = Supports(dtype_of="x")  # every float dtype, float64 included

GATHER_TOKENS.implement("torch", reference.gather_tokens, KERNEL_SUPPORTS)

if TRITON_IMPORT_ERROR is None:
    from fastvl.kernels import gather as _triton_gather

    @torch.library.triton_op("fastvl::gather_tokens_triton", mutates_args=())
    def gather_tokens_triton(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return _triton_gather.gather_tokens(x, index)

    @torch.library.triton_op("fastvl::scatter_add_tokens_triton", mutates_args=())
    def scatter_add_tokens_triton(
        src: torch.Tensor, index: torch.Tensor, num_tokens: int
    ) -> torch.Tensor:
        return _triton_gather.scatter_add_tokens(src, index, num_tokens)

    GATHER_TOKENS.implement(
        "triton",
        _kernel_pair(gather_tokens_triton, scatter_add_tokens_triton,
                     _triton_gather.gather_tokens, _triton_gather.scatter_add_tokens),
        KERNEL_SUPPORTS,
    )

if _extension.is_built():
    _cuda_gather = torch.ops.fastvl.gather_tokens_cuda.default
    _cuda_scatter_add = torch.ops.fastvl.scatter_add_tokens_cuda.default
    GATHER_TOKENS.implement(
        "cuda", _kernel_pair(_cuda_gather, _cuda_scatter_add, _cuda_gather, _cuda_scatter_add),
        KERNEL_SUPPORTS,
    )


def _validate(x, index) -> None:
    check_tensor("gather_tokens", "x", x)
    if x.dim() != 3:
        raise ValueError(f"gather_tokens: x must be (B, N, C), got shape {tuple(x.shape)}")
    check_token_index("gather_tokens", "index", index, x.shape[0], "x")
    if index.device != x.device:
        raise ValueError(
            f"gather_tokens: x is on {x.device} but index is on {index.device}; "
            "put both on the same device"
        )


def check_index_range(index: torch.Tensor, num_tokens: int, op: str) -> None:
    """Raise ValueError unless every index is in [0, num_tokens).

    Costs one reduction and one host sync, so it is skipped while torch.compile traces and
    while a CUDA graph is being captured.
    """
    check_value_range(op, "index", index, 0, num_tokens, "the token axis of x")


def gather_tokens(
    x: torch.Tensor,
    index: torch.Tensor,
    *,
    backend: str = "auto",
    check_bounds: bool = True,
) -> torch.Tensor:
    """Gather tokens: x (B, N, C), index (B, K) int64 -> (B, K, C), out[b, k] = x[b, index[b, k]].

    Differentiable in x (the gradient is a scatter-add, so repeated indices accumulate).
    ``backend``: "auto", "cuda", "triton" or "torch" (see ``python -m fastvl info``).
    ``check_bounds``: verify 0 <= index < N first (one host sync); pass False in hot loops
    or CUDA graphs. The kernels never read out of bounds, but an unchecked bad index gives a
    zero row (triton/cuda) or an error from index_select (torch).
    """
    fn = memoized(GATHER_TOKENS, call_key((x, index), backend),
                  lambda: _resolve(x, index, backend))
    if check_bounds:
        check_index_range(index, x.shape[1], "gather_tokens")
    return fn(x, index)


def _resolve(x, index, backend):
    """The implementation for a :func:`gather_tokens` call, whose arguments are checked."""
    _validate(x, index)
    return GATHER_TOKENS.select(backend, x.device, x, index)
