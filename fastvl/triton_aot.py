"""Compile Triton kernels for a GPU architecture on a machine without a GPU.

The CPU interpreter (``TRITON_INTERPRET=1``) checks what kernels compute, not whether Triton's
real compiler accepts them for a GPU: dtype mismatches in loops, ``tl.dot`` shapes, bf16
paths, register and shared-memory limits only show up there. Inside
:func:`gpu_launch_sizes` the launch wrappers pick their GPU block sizes on any device;
:func:`recorded_launches` records every launch the given kernels modules make through
``wrap_triton`` in a block (argument types, constexprs, ``num_warps``; the launches still
run), and :func:`compile_errors` compiles each distinct one for ``sm_<arch>`` with Triton's
compiler and ptxas, in subprocesses (the interpreter replaces ``triton.jit`` in the recording
process). Nothing runs on a GPU.

:func:`resource_usage` also reports ptxas's registers, spills and shared memory per launch.
``python -m fastvl.triton_aot ARCH compile|usage`` reads recorded launches (JSON) on stdin
and prints one row per launch (JSON).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import inspect
import json
import os
import subprocess
import sys
from typing import Iterator

import torch

__all__ = [
    "gpu_launch_sizes", "recorded_launches", "with_pointer_type", "compile_errors",
    "resource_usage",
]

_POINTER_TYPES = {
    torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
    torch.float64: "*fp64", torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16",
    torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1",
}
_OPTIONS = ("num_warps", "num_stages")


def _argument_type(value) -> str:
    """Triton's signature type of a launch argument ("constexpr" for None and strings)."""
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype]
    if value is None or isinstance(value, str):
        return "constexpr"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


def _describe(kernel, args: tuple, kwargs: dict) -> dict:
    """One launch as JSON-able data: module, kernel name, signature, constexprs, options."""
    fn = kernel.fn
    parameters = inspect.signature(fn).parameters
    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
    signature, constants = {}, {}
    for name in kernel.arg_names:
        value = values[name]
        if "constexpr" in str(parameters[name].annotation):
            signature[name], constants[name] = "constexpr", value
        else:
            signature[name] = _argument_type(value)
            if signature[name] == "constexpr":
                constants[name] = value
    return {
        "module": fn.__module__, "kernel": fn.__name__, "signature": signature,
        "constants": constants, "options": {k: kwargs[k] for k in _OPTIONS if k in kwargs},
    }


@contextlib.contextmanager
def gpu_launch_sizes() -> Iterator[None]:
    """Launch configurations take their GPU values on every device in the block (see
    :func:`fastvl.kernels.gpu_sizes`): a CPU run then records the launches a GPU would make."""
    import fastvl.kernels as kernels

    previous = kernels._GPU_SIZES_EVERYWHERE
    kernels._GPU_SIZES_EVERYWHERE = True
    try:
        yield
    finally:
        kernels._GPU_SIZES_EVERYWHERE = previous


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


def compile_errors(launches: list[dict], arch: int, timeout: float = 1800.0) -> list[str]:
    """Compile each distinct launch for ``sm_<arch>`` (e.g. 90 for H100 / H200, 80 for A100),
    spread over one subprocess per CPU core; one message per failure, [] when all compile."""
    return [row["error"] for row in _run_compiler(launches, arch, timeout) if "error" in row]


def resource_usage(launches: list[dict], arch: int, timeout: float = 1800.0) -> list[dict]:
    """Per distinct launch compiled for ``sm_<arch>``: ``kernel``, ``constants``, ``dtypes``
    (of its pointer arguments), and ptxas's ``registers`` per thread, ``spill_bytes`` (spill
    stores) and ``shared_bytes``; or ``error``. Spills cost local-memory traffic."""
    return _run_compiler(launches, arch, timeout, "usage")


def _run_compiler(launches: list[dict], arch: int, timeout: float, mode: str = "compile"):
    distinct = list({json.dumps(launch, sort_keys=True): launch for launch in launches}.values())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    workers = max(1, min(len(distinct), os.cpu_count() or 1))
    processes = [
        subprocess.Popen([sys.executable, "-m", "fastvl.triton_aot", str(arch), mode],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
        for _ in range(workers)
    ]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # feed and drain all at once
        outputs = list(pool.map(
            lambda i: processes[i].communicate(json.dumps(distinct[i::workers]), timeout=timeout),
            range(workers),
        ))
    rows = []
    for process, (stdout, stderr) in zip(processes, outputs):
        if process.returncode != 0:
            rows.append({"error": f"a compile subprocess failed ({process.returncode}): "
                                  f"{stderr[-4000:]}"})
        else:
            rows += json.loads(stdout)
    return rows


def _compile(launch: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    names = kernel.arg_names
    constexprs = {(names.index(name),): value for name, value in launch["constants"].items()}
    source = ASTSource(fn=kernel, signature=launch["signature"], constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch["options"])


def _ptxas_usage(compiled, arch: int) -> dict:
    """ptxas -v's registers, spill stores and shared memory of a compiled kernel's PTX."""
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
                row.update(_ptxas_usage(compiled, arch))
        except Exception as error:  # every failure is reported, not just the first
            row["error"] = (f"{launch['kernel']} ({constants}) for sm_{arch}: "
                            f"{type(error).__name__}: {str(error)[-2000:]}")
        rows.append(row)
    json.dump(rows, sys.stdout)


if __name__ == "__main__":
    _main()
