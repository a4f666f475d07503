"""What each Triton kernel costs on a GPU at the benchmark shapes, found without a GPU.

``python -m fastvl kernels [--arch sm_90|sm_80|all] [--json]``: the ``fastvl[triton]``
implementation of every benchmark case (:mod:`fastvl.bench.suites`) runs at its GPU shapes
and dtypes on CPU tensors, dispatched as on a GPU with GPU launch sizes and every launch
skipped (:func:`fastvl.bench.host_overhead.gpu_path`) and matrix products unwritten, so the
largest shapes cost little (the builders stop before their peers, which would run once at
full size);
the launches are recorded with the specialisation a real launch gets
(:func:`fastvl.triton_aot.recorded_launches`) and each distinct one is compiled for the arch
(:func:`fastvl.triton_aot.resource_usage`). One row per kernel, configuration and shape:
registers per thread, spill bytes, shared memory, CTAs per SM, whether the PTX uses wgmma,
mma.sync and TMA, and the useful share of the tile work (:func:`useful_share`).

The model-level cases (MAE, ToMe ViT, FastV) run the same ops inside a model and are not
recorded here; neither are the host-overhead cases (tiny shapes).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import pkgutil
import sys
from typing import Iterator, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

__all__ = ["ARCHS", "ctas_per_sm", "kernel_rows", "print_report", "problems",
           "recorded_case_launches", "useful_share"]

ARCHS = {"sm_90": 90, "sm_80": 80}
# Per SM: shared memory (KB) usable by CTAs (each CTA also reserves 1 KB); both archs have
# 64K registers, 64 resident warps and 32 resident CTAs per SM.
_SHARED_KB = {90: 228, 80: 164}
_REGISTERS, _WARPS, _CTAS, _RESERVED_SHARED = 65536, 64, 32, 1024
_HALF = {"*fp16", "*bf16"}
# (size argument, block constexpr) of the tiled dimensions of the attention family.
_TILED = (("num_queries", "BLOCK_M"), ("num_keys", "BLOCK_N"), ("head_dim", "BLOCK_D"))


def ctas_per_sm(registers: int, num_warps: int, shared_bytes: int, arch: int) -> int:
    """Resident CTAs per SM, limited by registers (allocated per warp in units of 256),
    warps, shared memory (plus 1 KB reserved per CTA) and the 32-CTA cap; 0 if one CTA's
    shared memory exceeds the SM's."""
    registers_per_warp = math.ceil(registers * 32 / 256) * 256
    shared = shared_bytes + _RESERVED_SHARED
    return min(_CTAS, _WARPS // num_warps, _REGISTERS // (registers_per_warp * num_warps),
               _SHARED_KB[arch] * 1024 // shared)


def useful_share(launch: dict) -> Optional[float]:
    """Share of a launch's tile work that touches real elements: the product over its tiled
    dimensions (queries / BLOCK_M, keys / BLOCK_N, head dim / BLOCK_D) of real over padded
    size; key mass tiles only its query range, a packed GQA forward (``PACK_GQA``) Nq x group
    rows, a split head dim (``BLOCK_DT``) BLOCK_D + BLOCK_DT columns. Tiles skipped by
    causal masking are not counted as work. None for kernels outside the attention family."""
    values = {**launch["values"], **launch["constants"]}
    if "query_end" in values:  # key mass: queries query_start..query_end
        values["num_queries"] = values["query_end"] - values["query_start"]
    if values.get("PACK_GQA") and "num_queries" in values:  # rows: tokens x the group's heads
        values["num_queries"] = values["num_queries"] * values.get("group", 1)
    tiled = [(values[size], values[block]) for size, block in _TILED
             if size in values and block in values]
    if not tiled:
        return None
    shares = [n / (math.ceil(n / block) * block) for n, block in tiled]
    if values.get("BLOCK_DT") and "head_dim" in values:  # a split head dim: main + tail tile
        shares[-1] = values["head_dim"] / (values["BLOCK_D"] + values["BLOCK_DT"])
    return math.prod(shares)


def _kernel_modules() -> list:
    import fastvl.kernels as kernels

    return [importlib.import_module(f"{kernels.__name__}.{module.name}")
            for module in pkgutil.iter_modules(kernels.__path__)]


class _Captured(Exception):
    """Raised by the builders' ``fastvl_impls`` once the Triton call is captured."""


@contextlib.contextmanager
def _triton_calls(calls: list) -> Iterator[None]:
    """Case builders in the block stop at their ``fastvl_impls`` call and append its
    ``fastvl[triton]`` callable to ``calls``: the peers they build afterwards (SDPA backends,
    FlexAttention, PEFT, ...) would run once at the full shapes on the CPU."""
    from fastvl.bench.cases import fastvl_impls

    def capture(built, op_name, device, args, make):
        calls.append(make("triton"))
        raise _Captured

    suites = [module for name, module in sys.modules.items()
              if name.startswith("fastvl.bench.suites.")
              and getattr(module, "fastvl_impls", None) is fastvl_impls]
    for module in suites:
        module.fastvl_impls = capture
    try:
        yield
    finally:
        for module in suites:
            module.fastvl_impls = fastvl_impls


class _UnwrittenMatmuls(TorchDispatchMode):
    """Matrix products (the cuBLAS calls beside LoRA's kernels) return unwritten outputs of
    the right shape: at the full shapes they would take minutes on the CPU."""

    supports_higher_order_operators = True  # Triton launches pass through unchanged
    _OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
            torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in self._OPS:
            return func(*args, **(kwargs or {}))
        meta = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs or {}))
        return torch.empty_like(func(*meta[0], **meta[1]), device=args[-1].device)


def recorded_case_launches(ops: Optional[Sequence[str]] = None, arch: int = 90) -> list[dict]:
    """Launches of every benchmark case's ``fastvl[triton]`` call (or of ``ops``' cases) on an
    ``sm_<arch>`` GPU, in each dtype and mode a GPU run benchmarks, tagged with ``case``
    (``op/name dtype mode``)."""
    from fastvl import triton_aot
    from fastvl.bench.cases import SCALES, all_cases, fastvl_impl_name
    from fastvl.bench.host_overhead import gpu_path

    triton = fastvl_impl_name("triton")
    cases = [case for case in all_cases(ops) if not case.host_overhead and triton in case.impls]
    tagged, calls = [], []
    with triton_aot.gpu_launch_sizes(arch), gpu_path(), _triton_calls(calls), \
            _UnwrittenMatmuls(), triton_aot.recorded_launches(*_kernel_modules()) as launches:
        for case in cases:
            for dtype in case.dtypes_for(torch.device("cuda")):
                for mode in case.modes:
                    with contextlib.suppress(_Captured):
                        case.build(torch.device("cpu"), dtype, SCALES["full"], mode)
                    start = len(launches)
                    calls.pop()()
                    tag = f"{case.id} {str(dtype).removeprefix('torch.')} {mode}"
                    tagged += [{**launch, "case": tag} for launch in launches[start:]]
    return tagged


def _config(launch: dict, usage: dict) -> str:
    """The constexprs that pick the variant, short: flags set, sizes, warps and stages."""
    parts = []
    for name, value in launch["constants"].items():
        if name.isupper() and value not in (False, None):
            parts.append(name if value is True else f"{name}={value}")
    stages = launch["options"].get("num_stages")
    return " ".join(parts + [f"w{usage['num_warps']}"] + ([f"s{stages}"] if stages else []))


def kernel_rows(launches: list[dict], arch: int) -> list[dict]:
    """One row per kernel variant and shape of ``launches`` compiled for ``sm_<arch>``:
    ``kernel``, ``config``, ``dtypes``, ``cases``, the compiler's usage (registers,
    spill_bytes, shared_bytes, num_warps, wgmma, mma, tma, dot) or ``error``, ``ctas_per_sm``
    and ``useful`` (None where not defined)."""
    from fastvl import triton_aot

    variants = triton_aot.distinct(launches)
    usage = dict(zip(map(triton_aot.variant_key, variants),
                     triton_aot.resource_usage(variants, arch)))
    rows: dict[tuple, dict] = {}
    for launch in launches:
        key = triton_aot.variant_key(launch)
        row = usage[key]
        useful = useful_share(launch)
        entry = rows.get((key, useful))
        if entry is None:
            entry = rows[(key, useful)] = {**row, "useful": useful, "cases": []}
            if "error" not in row:
                entry["config"] = _config(launch, row)
                entry["ctas_per_sm"] = ctas_per_sm(row["registers"], row["num_warps"],
                                                   row["shared_bytes"], arch)
        if launch["case"] not in entry["cases"]:
            entry["cases"].append(launch["case"])
    return sorted(rows.values(), key=lambda r: (r["kernel"], r.get("config", ""), r["dtypes"]))


def problems(rows: list[dict], arch: int) -> list[str]:
    """What CI rejects: compile errors, any spill, and on sm_90 a kernel with a half-precision
    ``tl.dot`` that does not use wgmma."""
    found = []
    for row in rows:
        name = f"{row['kernel']} [{row.get('config', '')}; {','.join(row['dtypes'])}]"
        if "error" in row:
            found.append(f"{name}: {row['error']}")
            continue
        if row["spill_bytes"]:
            found.append(f"{name}: spills {row['spill_bytes']} bytes on sm_{arch}")
        if arch == 90 and row["dot"] and _HALF & set(row["dtypes"]) and not row["wgmma"]:
            found.append(f"{name}: half-precision tl.dot without wgmma on sm_90")
    return found


def _table(rows: list[dict]) -> str:
    header = ("kernel", "config", "dtypes", "regs", "spill", "smem KB", "CTAs/SM", "wgmma",
              "mma", "TMA", "useful", "cases")
    yes = lambda flag: "yes" if flag else "-"
    lines = [header]
    for row in rows:
        if "error" in row:
            lines.append((row["kernel"], "", "", "error: " + row["error"][:200]))
            continue
        lines.append((
            row["kernel"], row["config"], ",".join(t.lstrip("*") for t in row["dtypes"]),
            str(row["registers"]), str(row["spill_bytes"]), f"{row['shared_bytes'] / 1024:.1f}",
            str(row["ctas_per_sm"]), yes(row["wgmma"]), yes(row["mma"]), yes(row["tma"]),
            "-" if row["useful"] is None else f"{row['useful']:.0%}", "; ".join(row["cases"]),
        ))
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in lines)


def print_report(arch: str = "sm_90", as_json: bool = False,
                 ops: Optional[Sequence[str]] = None) -> int:
    """Print the report for ``arch`` (``sm_90``, ``sm_80`` or ``all``); 1 if
    :func:`problems` finds any, else 0."""
    archs = list(ARCHS) if arch == "all" else [arch]
    report = {name: kernel_rows(recorded_case_launches(ops, ARCHS[name]), ARCHS[name])
              for name in archs}
    found = {name: problems(rows, ARCHS[name]) for name, rows in report.items()}
    if as_json:
        print(json.dumps({name: {"rows": rows, "problems": found[name]}
                          for name, rows in report.items()}, indent=1))
    else:
        for name, rows in report.items():
            print(f"{name}: {len(rows)} kernel variants x shapes")
            print(_table(rows))
            print("\n".join(f"PROBLEM {problem}" for problem in found[name]) or "no problems")
            print()
    return int(any(found.values()))
