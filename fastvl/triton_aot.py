"""Compile Triton kernels for a GPU architecture on a machine without a GPU.

The CPU interpreter (``TRITON_INTERPRET=1``) checks what kernels compute, not whether Triton's
real compiler accepts them for a GPU: dtype mismatches in loops, ``tl.dot`` shapes, bf16
paths, register and shared-memory limits only show up there. Inside
:func:`gpu_launch_sizes` the launch wrappers pick their GPU block sizes on any device;
:func:`recorded_launches` records every launch the given kernels modules make through
``wrap_triton`` in a block with the specialisation a real launch computes from the argument
values (see :func:`_specialisation`; the launches still run, or are skipped inside
:func:`fastvl.bench.host_overhead.no_launches`), and :func:`compile_errors` compiles each
distinct one for ``sm_<arch>`` with Triton's compiler and ptxas, in subprocesses (the
interpreter replaces ``triton.jit`` in the recording process). Nothing runs on a GPU.

:func:`resource_usage` also reports ptxas's registers, spills and shared memory per launch,
and which tensor-core / TMA instructions its PTX uses.
``python -m fastvl.triton_aot ARCH compile|usage`` reads recorded launches (JSON) on stdin
and prints one row per launch (JSON).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib
import inspect
import json
import os
import subprocess
import sys
from typing import Iterator

import torch

__all__ = [
    "gpu_launch_sizes", "recorded_launches", "with_pointer_type", "distinct", "variant_key",
    "compile_errors", "resource_usage",
]

_OPTIONS = ("num_warps", "num_stages")
_VARIANT = ("module", "kernel", "signature", "constants", "attrs", "options")


class _Pointer:
    """What Triton's specialisation reads of a tensor argument: its dtype and whether its
    address is 16-byte aligned. PyTorch allocates storage 16-byte aligned or better (CUDA's
    caching allocator: 512 bytes), so on a GPU a tensor is aligned unless its storage offset
    breaks it; that rule is used on every device (CPU addresses are not the GPU's)."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self.aligned = tensor.storage_offset() * tensor.element_size() % 16 == 0

    def data_ptr(self) -> int:
        return 0 if self.aligned else 8


@functools.lru_cache(maxsize=None)
def _binder(kernel):
    """Triton's own argument binder for ``kernel`` (as ``JITFunction.create_binder`` makes
    it): returns ``(bound arguments, [(type, specialisation) per parameter], options)``."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import KernelParam, create_function_from_signature

    signature = inspect.signature(kernel.fn)
    params = getattr(kernel, "params", None)  # a JITFunction's; the interpreter's has none
    if params is None:
        flags = getattr(kernel, "kwargs", {})
        params = [
            KernelParam(i, p, any(x in (flags.get("do_not_specialize") or ()) for x in (i, name)),
                        any(x in (flags.get("do_not_specialize_on_alignment") or ())
                            for x in (i, name)))
            for i, (name, p) in enumerate(signature.parameters.items())
        ]
    return create_function_from_signature(signature, params, BaseBackend)


def _specialisation(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constants, attrs) by parameter name, as ``JITFunction.run`` computes them
    for a launch: pointer and int types, constexprs (and ints equal to 1, and None, become
    constants), ``"D"`` (16-divisible / 16-byte aligned) where the argument allows it."""
    standin = lambda value: _Pointer(value) if isinstance(value, torch.Tensor) else value
    _, specialization, _ = _binder(kernel)(*map(standin, args),
                                          **{k: standin(v) for k, v in kwargs.items()})
    signature, constants, attrs = {}, {}, {}
    for name, (kind, spec) in zip(kernel.arg_names, specialization):
        signature[name] = kind
        if kind == "constexpr":
            constants[name] = spec
        elif isinstance(spec, str) and spec:
            attrs[name] = spec
    return signature, constants, attrs


def _describe(kernel, args: tuple, kwargs: dict) -> dict:
    """One launch as JSON-able data: module, kernel name, its specialisation (signature,
    constants, attrs), options, and the values of its other integer arguments (sizes)."""
    fn = kernel.fn
    signature, constants, attrs = _specialisation(kernel, args, kwargs)
    values = dict(zip(kernel.arg_names, args))
    values.update(kwargs)
    return {
        "module": fn.__module__, "kernel": fn.__name__, "signature": signature,
        "constants": constants, "attrs": attrs,
        "options": {k: kwargs[k] for k in _OPTIONS if k in kwargs},
        "values": {name: values[name] for name, kind in signature.items()
                   if kind in ("i32", "i64")},
    }


@contextlib.contextmanager
def gpu_launch_sizes(arch: int = 90) -> Iterator[None]:
    """Launch configurations take their GPU values for ``sm_<arch>`` on every device in the
    block (see :func:`fastvl.kernels.gpu_sizes` and :func:`fastvl.kernels.gpu_arch`): a CPU
    run then records the launches such a GPU would make."""
    import fastvl.kernels as kernels

    previous = kernels._GPU_SIZES_EVERYWHERE, kernels._GPU_ARCH_EVERYWHERE
    kernels._GPU_SIZES_EVERYWHERE, kernels._GPU_ARCH_EVERYWHERE = True, arch
    try:
        yield
    finally:
        kernels._GPU_SIZES_EVERYWHERE, kernels._GPU_ARCH_EVERYWHERE = previous


@contextlib.contextmanager
def recorded_launches(*modules) -> Iterator[list[dict]]:
    """Record the launches ``modules`` (kernels modules calling their ``wrap_triton``) make in
    the block; yields the list they are appended to."""
    launches: list[dict] = []
    wraps = [module.wrap_triton for module in modules]
    wrap = wraps[0]  # torch.library.wrap_triton, as each kernels module imports it
    if any(other is not wrap for other in wraps):
        raise ValueError("recorded_launches: the modules' wrap_triton differ")

    def recording_wrap(kernel):
        wrapped = wrap(kernel)

        class _Grid:
            def __getitem__(self, grid):
                launcher = wrapped[grid]

                def launch(*args, **kwargs):
                    launches.append(_describe(kernel, args, kwargs))
                    return launcher(*args, **kwargs)

                return launch

        return _Grid()

    for module in modules:
        module.wrap_triton = recording_wrap
    try:
        yield launches
    finally:
        for module in modules:
            module.wrap_triton = wrap


def with_pointer_type(launches: list[dict], old: str, new: str) -> list[dict]:
    """The launches with every ``*<old>`` pointer argument typed ``*<new>``: e.g. fp16 -> bf16
    for the bf16 variants of launches recorded in float16 (the interpreter runs no bf16
    ``tl.dot``)."""
    return [
        {**launch, "signature": {name: f"*{new}" if kind == f"*{old}" else kind
                                 for name, kind in launch["signature"].items()}}
        for launch in launches
    ]


def variant_key(launch: dict) -> str:
    """What a launch compiles to depends on (not its ``values``, nor tags added to it)."""
    return json.dumps({k: launch[k] for k in _VARIANT}, sort_keys=True)


def distinct(launches: list[dict]) -> list[dict]:
    """The first launch of each variant (:func:`variant_key`), in recorded order."""
    variants: dict[str, dict] = {}
    for launch in launches:
        variants.setdefault(variant_key(launch), launch)
    return list(variants.values())


def compile_errors(launches: list[dict], arch: int, timeout: float = 1800.0) -> list[str]:
    """Compile each distinct launch for ``sm_<arch>`` (e.g. 90 for H100 / H200, 80 for A100),
    spread over one subprocess per CPU core; one message per failure, [] when all compile."""
    return [row["error"] for row in _run_compiler(launches, arch, timeout) if "error" in row]


def resource_usage(launches: list[dict], arch: int, timeout: float = 1800.0) -> list[dict]:
    """Per distinct launch (:func:`distinct`, same order) compiled for ``sm_<arch>``:
    ``kernel``, ``constants``, ``dtypes`` (of its pointer arguments), ``num_warps``, ptxas's
    ``registers`` per thread, ``spill_bytes`` (spill stores) and ``shared_bytes``, and whether
    the PTX uses ``wgmma`` (Hopper's warpgroup MMA), ``mma`` (warp-level ``mma.sync``) and
    ``tma`` (``cp.async.bulk.tensor``), and ``dot`` (a ``tl.dot``); or ``error``. Spills cost
    local-memory traffic."""
    return _run_compiler(launches, arch, timeout, "usage")


def _run_compiler(launches: list[dict], arch: int, timeout: float, mode: str = "compile"):
    variants = distinct(launches)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    workers = max(1, min(len(variants), os.cpu_count() or 1))
    processes = [
        subprocess.Popen([sys.executable, "-m", "fastvl.triton_aot", str(arch), mode],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
        for _ in range(workers)
    ]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # feed and drain all at once
        outputs = list(pool.map(
            lambda i: processes[i].communicate(json.dumps(variants[i::workers]), timeout=timeout),
            range(workers),
        ))
    rows = [None] * len(variants)
    for i, (process, (stdout, stderr)) in enumerate(zip(processes, outputs)):
        if process.returncode != 0:
            failed = {"error": f"a compile subprocess failed ({process.returncode}): "
                               f"{stderr[-4000:]}"}
            rows[i::workers] = [{"kernel": launch["kernel"], **failed}
                                for launch in variants[i::workers]]
        else:
            rows[i::workers] = json.loads(stdout)
    return rows


def _compile(launch: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    names = kernel.arg_names
    target = GPUTarget("cuda", arch, 32)
    parse_attr = make_backend(target).parse_attr
    constexprs = {(names.index(name),): value for name, value in launch["constants"].items()}
    attrs = {(names.index(name),): parse_attr(spec) for name, spec in launch["attrs"].items()}
    source = ASTSource(fn=kernel, signature=launch["signature"], constexprs=constexprs,
                       attrs=attrs)
    return triton.compile(source, target=target, options=launch["options"])


def _usage(compiled, arch: int) -> dict:
    """ptxas -v's registers, spill stores and shared memory of a compiled kernel's PTX, its
    warps, the tensor-core / TMA instructions in the PTX, and whether it has a ``tl.dot``."""
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptx = compiled.asm["ptx"]
    target = re.search(r"\.target\s+(\S+)", ptx).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        report = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={target}",
                                 source.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_bytes": int(spills.group(1)) if spills else 0,
        "shared_bytes": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
        "wgmma": "wgmma.mma_async" in ptx,
        "mma": "mma.sync" in ptx,
        "tma": "cp.async.bulk.tensor" in ptx,
        "dot": "tt.dot" in compiled.asm["ttir"],
    }


def _main() -> None:
    arch, mode = int(sys.argv[1]), sys.argv[2]
    rows = []
    for launch in json.load(sys.stdin):
        constants = ", ".join(f"{k}={v}" for k, v in launch["constants"].items())
        row = {"kernel": launch["kernel"], "constants": constants,
               "dtypes": sorted({t for t in launch["signature"].values() if t.startswith("*")})}
        try:
            compiled = _compile(launch, arch)
            if mode == "usage":
                row.update(_usage(compiled, arch))
        except Exception as error:  # every failure is reported, not just the first
            row["error"] = (f"{launch['kernel']} ({constants}) for sm_{arch}: "
                            f"{type(error).__name__}: {str(error)[-2000:]}")
        rows.append(row)
    json.dump(rows, sys.stdout)


if __name__ == "__main__":
    _main()
