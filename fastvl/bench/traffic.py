"""Bytes one call moves between kernels: a model, measured by recording what the call launches.

:func:`count_traffic` runs ``fn()`` once, for real, and records every device-kernel launch with
the tensors it touches:

* ATen ops and C++ extension ops, seen by a ``TorchDispatchMode``, under the launch rule of
  :func:`fastvl.bench.host_overhead.count_launches`
  (:func:`~fastvl.bench.host_overhead.launches_kernel`): views, allocations and metadata ops
  launch nothing; fastvl's Python-registered ops (``fastvl::*_triton``) count by what they run;
  its C++ ops (``fastvl::*_cuda``) are one launch each, with their inputs and outputs;
* Triton launches (the ``run`` of ``JITFunction`` and of the interpreter's
  ``InterpretedFunction``): their tensor arguments. Warm-up (compile-only) calls are ignored;
  an autotuner's trial launches are not, so count a call whose kernels are already tuned.

A launch moves each distinct tensor it touches (same storage, offset, shape and strides) once,
at the bytes its view spans: numel x element size, broadcast (stride-0) dimensions not
multiplied in; factories like ``new_zeros`` or ``zeros_like`` do not read their template
tensor. An indexed read (:data:`INDEXED_READS`) counts its source at the size of its
output (never more than the whole source). :attr:`Traffic.bytes` sums over launches, so an
intermediate that one kernel writes and the next reads back counts twice: an unfused chain
moves more than the minimum a case states (``Built.bytes``).

What the model does not see: re-reads inside one kernel (attention re-reading K/V for every
query block counts K/V once); launches a C++ op makes internally (the sort inside
``fastvl::scatter_add_tokens_cuda``); that an in-place tensor is both read and written (counted
once); that a kernel reads only part of a tensor argument (counted whole, indexed reads
aside); ATen ops inside a fastvl Python op that reaches the dispatch mode as the registered op
(fastvl's eager path runs their bodies directly, so they are seen); code compiled by
torch.compile: while a dispatch mode is active Dynamo runs it uncompiled, so it counts as its
eager ops (too much for a fused compiled kernel such as FlexAttention's; cases name such
implementations in ``Built.traffic_unknown``, and the benchmark leaves them out). Tensors on any
device, meta included, count the same way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastvl.bench.host_overhead import launches_kernel, replaced_triton_runs

__all__ = ["INDEXED_READS", "Traffic", "count_traffic", "launch_bytes", "tensor_bytes"]

RESULT = "return"  # the argument name an ATen or C++ op's result is recorded under

# Ops and Triton kernels that read only the rows an index selects: name -> (the source
# argument, the output argument whose size the source is counted at).
INDEXED_READS: dict[str, tuple[str, str]] = {
    "aten::gather": ("self", RESULT),
    "aten::index_select": ("self", RESULT),
    "aten::index": ("self", RESULT),
    "aten::embedding": ("weight", RESULT),
    "aten::take_along_dim": ("self", RESULT),
    "fastvl::gather_tokens_cuda": ("x", RESULT),
    "fastvl.kernels.gather._gather_tokens_kernel": ("x_ptr", "out_ptr"),
}


@dataclass
class Traffic:
    """What one call launched: ``kernels``, (name, bytes moved) per launch in launch order
    (an ATen / C++ op's schema name such as ``aten::add``, or a Triton kernel's module-qualified
    name); ``bytes``, their total; ``launches``, their count."""

    kernels: list[tuple[str, int]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(moved for _, moved in self.kernels)

    @property
    def launches(self) -> int:
        return len(self.kernels)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes the view spans: numel x element size, broadcast (stride-0) dimensions left out."""
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        elements *= size if stride != 0 or size == 0 else 1
    return elements * tensor.element_size()


def _identity(tensor: torch.Tensor) -> tuple:
    # The storage rather than data_ptr(): meta tensors all have data pointer 0.
    return (tensor.untyped_storage()._cdata, tensor.storage_offset() * tensor.element_size(),
            tuple(tensor.shape), tensor.stride())


def _tensors(value: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def _reads_shape_only(name: str, argument: str) -> bool:
    """Whether ``argument`` of op ``name`` is read for its shape, dtype and device only: the
    ``self`` of factories such as ``aten::new_zeros`` and ``aten::zeros_like``."""
    op = name.removeprefix("aten::")
    return argument == "self" and name != op and (op.startswith("new_") or op.endswith("_like"))


def launch_bytes(name: str, arguments: Mapping[str, Any]) -> int:
    """Bytes one launch of ``name`` moves, ``arguments`` being its arguments (and result) by
    name: each distinct tensor once, the source of an indexed read at its output's size."""
    moved: dict[tuple, int] = {}
    for argument, value in arguments.items():
        if _reads_shape_only(name, argument):
            continue
        for tensor in _tensors(value):
            moved[_identity(tensor)] = tensor_bytes(tensor)
    if name in INDEXED_READS:
        source_name, output_name = INDEXED_READS[name]
        output = sum(map(tensor_bytes, _tensors(arguments.get(output_name))))
        for source in _tensors(arguments.get(source_name)):
            moved[_identity(source)] = min(tensor_bytes(source), output)
    return sum(moved.values())


class _Recorder(TorchDispatchMode):
    """Records into ``traffic`` each dispatched op that :func:`launches_kernel` and, in
    :meth:`triton_launches`, each Triton launch (which runs; the ATen ops the Triton
    interpreter runs to emulate it on a CPU are not launches)."""

    def __init__(self, traffic: Traffic):
        super().__init__()
        self.traffic = traffic
        self.in_triton_launch = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if launches_kernel(func) and not self.in_triton_launch:
            schema = func._schema
            arguments = {arg.name: value for arg, value in zip(schema.arguments, args)}
            arguments.update(kwargs)
            arguments[RESULT] = result
            self.traffic.kernels.append((schema.name, launch_bytes(schema.name, arguments)))
        return result

    @contextlib.contextmanager
    def triton_launches(self) -> Iterator[None]:
        def make_run(run):
            def recorded_run(launcher, *args, **kwargs):
                if kwargs.get("warmup", False):
                    return run(launcher, *args, **kwargs)
                outer, self.in_triton_launch = self.in_triton_launch, True
                try:
                    result = run(launcher, *args, **kwargs)
                finally:
                    self.in_triton_launch = outer
                name = f"{launcher.fn.__module__}.{launcher.fn.__qualname__}"
                arguments = dict(zip(launcher.arg_names, args))
                arguments.update(kwargs)
                self.traffic.kernels.append((name, launch_bytes(name, arguments)))
                return result

            return recorded_run

        with replaced_triton_runs(make_run):
            yield


def count_traffic(fn: Callable[[], Any]) -> Traffic:
    """Runs ``fn()`` once and returns the :class:`Traffic` of the kernels it launched."""
    traffic = Traffic()
    recorder = _Recorder(traffic)
    with recorder.triton_launches(), recorder:
        fn()
    return traffic
