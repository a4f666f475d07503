"""``gather_tokens``: pick K tokens per sample, out[b, k] = x[b, index[b, k]], with backward.

The primitive that token pruning and MAE masking build on. Three backends:
``torch`` (``torch.gather``), ``triton`` (``fastvl::gather_tokens_triton``, a
``torch.library.triton_op``) and ``cuda`` (``fastvl::gather_tokens_cuda`` from ``fastvl._C``).
The backward of a gather is a scatter-add into zeros, and the backward of that is a gather
again, so both directions are registered ops with gradients (double backward works).

In eager mode the kernel backends skip the custom-op dispatch (whose Python autograd and
dispatch cost ten times a gather's host time): :func:`can_launch_directly` says when an op may
launch its kernels itself, :func:`launch_directly` runs a launcher so, and the gradients come
from ``torch.autograd.Function`` s; torch.compile and dispatch modes get the registered ops.
The other ops of the package share these two helpers.
"""

from __future__ import annotations

import torch
from torch._library import triton as _torch_triton

from fastvl import _extension, reference
from fastvl.ops._checks import check_tensor, check_token_index, check_value_range
from fastvl.ops.registry import TRITON_IMPORT_ERROR, Call, Supports, register_op

GATHER_TOKENS = register_op("gather_tokens", describe=lambda x, index: Call(x.device, x.dtype))


# ---- the eager path of the kernel backends (shared by fastvl's ops) ----------------------


def can_launch_directly() -> bool:
    """Whether an op may run its kernels itself, with autograd by a ``torch.autograd.Function``
    (no custom-op dispatch): in eager mode on real tensors. Not while torch.compile traces nor
    under a dispatch mode (FakeTensorMode, make_fx, ...): there it calls its registered op."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack())


def launch_directly(launcher, *args):
    """``launcher(*args)`` with :func:`torch.library.wrap_triton` returning the kernels
    themselves: plain launches, as ``torch.library.triton_op`` runs an op's body in eager
    mode (wrap_triton's higher-order-op dispatch costs about a millisecond), without a
    context manager's cost. Only where :func:`can_launch_directly`."""
    state = _torch_triton.wrap_triton_enabled
    previous = getattr(state, "value", _torch_triton.wrap_triton_enabled_default)
    state.value = False
    try:
        return launcher(*args)
    finally:
        state.value = previous


def _call(fn, *args):
    return fn(*args)


def _gather_tokens_fake(x, index):
    return x.new_empty(x.shape[0], index.shape[1], x.shape[2])


def _scatter_add_tokens_fake(src, index, num_tokens):
    return src.new_empty(src.shape[0], num_tokens, src.shape[2])


def _register_kernel_pair(gather, scatter_add) -> None:
    """Attach fake impls and gradients to a backend's gather / scatter-add op pair.

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
        return scatter_add(grad_out, index, ctx.num_tokens), None

    def scatter_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def scatter_backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        return gather(grad_out, index), None, None

    torch.library.register_fake(gather, _gather_tokens_fake)
    torch.library.register_fake(scatter_add, _scatter_add_tokens_fake)
    torch.library.register_autograd(gather, gather_backward, setup_context=gather_setup)
    torch.library.register_autograd(scatter_add, scatter_backward, setup_context=scatter_setup)


def _eager_gather(gather_op, gather, scatter_add, run):
    """The gather implementation of one backend: in eager mode ``run(gather, x, index)``
    (``gather`` / ``scatter_add`` (src, index, num_tokens) being the backend's kernels) with
    autograd by two ``torch.autograd.Function`` s, each the other's gradient (double backward
    works), no custom-op dispatch; under torch.compile or a dispatch mode the registered
    ``gather_op``."""

    class Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, index):
            ctx.save_for_backward(index)
            ctx.num_tokens = x.shape[1]
            return run(gather, x, index)

        @staticmethod
        def backward(ctx, grad_out):
            (index,) = ctx.saved_tensors
            return eager_scatter_add(grad_out, index, ctx.num_tokens), None

    class ScatterAdd(torch.autograd.Function):
        @staticmethod
        def forward(ctx, src, index, num_tokens):
            ctx.save_for_backward(index)
            return run(scatter_add, src, index, num_tokens)

        @staticmethod
        def backward(ctx, grad_out):
            (index,) = ctx.saved_tensors
            return eager_gather(grad_out, index), None, None

    def eager_gather(x, index):
        if torch.is_grad_enabled() and x.requires_grad:
            return Gather.apply(x, index)
        return run(gather, x, index)

    def eager_scatter_add(src, index, num_tokens):
        if torch.is_grad_enabled() and src.requires_grad:
            return ScatterAdd.apply(src, index, num_tokens)
        return run(scatter_add, src, index, num_tokens)

    def gather_impl(x, index):
        if can_launch_directly():
            return eager_gather(x, index)
        return gather_op(x, index)

    return gather_impl


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

    _register_kernel_pair(gather_tokens_triton, scatter_add_tokens_triton)
    GATHER_TOKENS.implement(
        "triton",
        _eager_gather(gather_tokens_triton, _triton_gather.gather_tokens,
                      _triton_gather.scatter_add_tokens, launch_directly),
        KERNEL_SUPPORTS,
    )

if _extension.is_built():
    _cuda_gather = torch.ops.fastvl.gather_tokens_cuda.default
    _cuda_scatter_add = torch.ops.fastvl.scatter_add_tokens_cuda.default
    _register_kernel_pair(_cuda_gather, _cuda_scatter_add)
    GATHER_TOKENS.implement(
        "cuda", _eager_gather(_cuda_gather, _cuda_gather, _cuda_scatter_add, _call),
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
    zero row (triton/cuda) or a device-side error (torch), not an exception.
    """
    _validate(x, index)
    if check_bounds:
        check_index_range(index, x.shape[1], "gather_tokens")
    return GATHER_TOKENS.select(backend, x.device, x, index)(x, index)
