"""The eager path of fastvl's registered kernel ops.

Eager mode skips the custom-op dispatch, whose Python autograd and dispatch cost several
times a small op's whole host time: an :class:`EagerOp` launches the kernels itself and takes
its gradient from a ``torch.autograd.Function`` built on the op's registered backward;
torch.compile and tracing dispatch modes get the registered op. :func:`memoized` keeps each
public op's argument checks and implementation choice per call key (:func:`call_key`). Every
kernel op of fastvl's token, ToMe, MAE and LoRA families is called through these.
"""

from __future__ import annotations

import torch
from torch._library import triton as _torch_triton
from torch.autograd.function import once_differentiable


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
    key = [flags, *map(type, flags)]
    for flag in flags:
        if type(flag) is tuple:
            key.append(tuple(map(type, flag)))
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
