"""``gather_tokens``: pick K tokens per sample, out[b, k] = x[b, index[b, k]], with backward.

The primitive that token pruning and MAE masking build on. Three backends:
``torch`` (``torch.gather``), ``triton`` (``fastvl::gather_tokens_triton``, a
``torch.library.triton_op``) and ``cuda`` (``fastvl::gather_tokens_cuda`` from ``fastvl._C``).
The backward of a gather is a scatter-add into zeros, and the backward of that is a gather
again, so both directions are registered ops with gradients (double backward works).

Eager mode skips the custom-op dispatch, whose Python autograd and dispatch cost several
times a gather's whole host time: an :class:`EagerOp` launches the kernels itself and takes
its gradient from a ``torch.autograd.Function`` built on the op's registered backward;
torch.compile and dispatch modes get the registered op. Every kernel op of fastvl's token,
ToMe, MAE and LoRA families is called through one.
"""

from __future__ import annotations

import torch
from torch._library import triton as _torch_triton
from torch.autograd.function import once_differentiable

from fastvl import _extension, reference
from fastvl.ops._checks import check_tensor, check_token_index, check_value_range
from fastvl.ops.registry import TRITON_IMPORT_ERROR, Call, Supports, register_op

GATHER_TOKENS = register_op("gather_tokens", describe=lambda x, index: Call(x.device, x.dtype))


# ---- the eager path of registered kernel ops (shared by fastvl's ops) --------------------


_TRACING_MODES = tuple(torch._C._TorchDispatchModeKey.__members__.values())  # fake, proxy, ...


def can_launch_directly() -> bool:
    """Whether an op may run its kernels itself: in eager mode on real tensors. Not while
    torch.compile traces nor under a tracing dispatch mode (FakeTensorMode, make_fx's proxy
    mode, functionalization), where its registered op must be called; other dispatch modes
    (op counters, loggers) see the eager path's ATen ops."""
    if torch.compiler.is_compiling():
        return False
    if not torch._C._len_torch_dispatch_stack():
        return True
    return all(torch._C._get_dispatch_mode(key) is None for key in _TRACING_MODES)


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


def call_key(tensors, *flags):
    """The memo key of a call (:func:`memoized`): each of ``flags`` (hashable non-tensor
    arguments) with its type, and its entries' types for a tuple (``True`` is not ``1``), and
    the shape, dtype and device of each of ``tensors`` (None stays None); None when one of
    ``tensors`` is anything else (a call the checks will reject)."""
    key = [(type(flag), flag, tuple(map(type, flag))) if type(flag) is tuple
           else (type(flag), flag) for flag in flags]
    for t in tensors:
        if t is None:
            key.append(None)
        elif isinstance(t, torch.Tensor):
            key += (t.shape, t.dtype, t.device)
        else:
            return None
    return tuple(key)


def memoized(op, key, resolve):
    """``resolve()``, a call's argument checks and implementation choice, memoized in
    ``op.memo()`` under ``key``, which must determine everything ``resolve`` reads (see
    :func:`call_key`; None: not memoized). The checks of a call whose key was seen passed
    then; value checks (index ranges, ...) stay the caller's. Not under torch.compile,
    where checks cost nothing at run time."""
    if key is None or torch.compiler.is_compiling():
        return resolve()
    try:
        hit = op.memo().get(key)
    except TypeError:  # an unhashable flag: the checks say what is wrong with it
        return resolve()
    if hit is None:
        hit = resolve()
        op.remember(key, hit)
    return hit


class EagerOp:
    """A registered kernel op with a lean eager path.

    ``op``: the ``torch.library`` op (``triton_op`` or a compiled extension's), called where
    not :func:`can_launch_directly` (torch.compile, FakeTensorMode, make_fx);
    ``kernels(*args)``: what it computes, run by :func:`launch_directly` in eager mode.
    ``setup_context`` / ``backward``: the op's gradient, registered with
    ``torch.library.register_autograd`` and used in eager mode by a
    ``torch.autograd.Function`` when an argument at a position of ``grad_inputs`` requires
    grad. ``double_backward``: the backward is differentiable (it calls differentiable ops,
    e.g. EagerOps with gradients); else differentiating it raises, as for the registered op.
    Called like the op.
    """

    def __init__(self, op, kernels, setup_context=None, backward=None, grad_inputs=(),
                 double_backward=False):
        self.op, self.kernels, self.grad_inputs = op, kernels, grad_inputs
        self.function = None
        if backward is None:
            return
        torch.library.register_autograd(op, backward, setup_context=setup_context)

        def forward(ctx, *inputs):
            output = launch_directly(kernels, *inputs)
            if isinstance(output, tuple):  # no zero-filled gradients for unused outputs
                ctx.set_materialize_grads(False)
            setup_context(ctx, inputs, output)
            return output

        if double_backward:
            eager_backward = backward
        else:
            once = once_differentiable(backward)

            def eager_backward(ctx, *grads):
                # once_differentiable's bookkeeping only matters when a graph is recorded
                return once(ctx, *grads) if torch.is_grad_enabled() else backward(ctx, *grads)

        self.function = type("EagerFunction", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(eager_backward),
        })

    def __call__(self, *args):
        if not can_launch_directly():
            return self.op(*args)
        if self.function is not None and torch.is_grad_enabled():
            for i in self.grad_inputs:
                if args[i] is not None and args[i].requires_grad:
                    return self.function.apply(*args)
        return launch_directly(self.kernels, *args)


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
    _validate(x, index)
    if check_bounds:
        check_index_range(index, x.shape[1], "gather_tokens")
    return GATHER_TOKENS.select(backend, x.device, x, index)(x, index)
