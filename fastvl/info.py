"""``python -m fastvl info``: versions, device, extension build and op x backend availability."""

from __future__ import annotations

import json
import os
import platform
from typing import Optional

import torch

import fastvl
from fastvl import _extension
from fastvl.ops import registry


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def describe_device(device: torch.device) -> dict:
    """Name and size of a device, as plain data (also recorded with benchmark results)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        }
    return {
        "type": "cpu",
        "name": _cpu_name(),
        "capability": None,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def triton_version() -> Optional[str]:
    """The installed triton's version, or None when triton cannot be imported."""
    if registry.TRITON_IMPORT_ERROR is not None:
        return None
    import triton

    return triton.__version__


def collect() -> dict:
    """Everything ``fastvl info`` reports, as plain data."""
    device = default_device()
    return {
        "fastvl": fastvl.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version(),
        "triton_interpreter": registry.TRITON_INTERPRETER,
        "device": describe_device(device),
        "extension": {
            "built": _extension.is_built(),
            "cuda_archs": _extension.cuda_archs(),
            "cuda_version": _extension.cuda_version(),
            "error": _extension.LOAD_ERROR,
            "build_record": _extension.read_build_record(),
        },
        "ops": registry.availability(device),
    }


def format_report(report: dict) -> str:
    device = report["device"]
    if device["type"] == "cuda":
        device_line = (
            f"cuda: {device['name']} (sm {device['capability']}, "
            f"{device['multiprocessors']} SMs, {device['memory_gib']} GiB)"
        )
    else:
        device_line = f"cpu: {device['name']} (no CUDA device)"
    triton = report["triton"] or "not available"
    if report["triton_interpreter"]:
        triton += " (TRITON_INTERPRET=1: kernels run in the interpreter)"
    ext = report["extension"]
    if ext["built"]:
        ext_line = f"built for sm {';'.join(ext['cuda_archs'])} with CUDA {ext['cuda_version']}"
    else:
        ext_line = f"not available: {ext['error']}"
    record = ext.get("build_record")
    if record:
        ext_line += (f" [build record: torch {record.get('torch')} (CUDA "
                     f"{record.get('torch_cuda')}), nvcc {record.get('nvcc')}, archs "
                     f"{record.get('cuda_archs')}]")
    lines = [
        f"fastvl {report['fastvl']}",
        f"python {report['python']}",
        f"torch  {report['torch']} (CUDA {report['torch_cuda'] or 'none'})",
        f"triton {triton}",
        f"device {device_line}",
        f"fastvl._C {ext_line}",
        "",
        f"ops on {device['type']} (implementations in the order backend='auto' tries them: "
        "available, or why not):",
    ]
    width = max(len(b) for b in registry.BACKENDS)
    for op, backends in report["ops"].items():
        lines.append(f"  {op}")
        for backend, reasons in backends.items():
            status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            lines.append(f"    {backend:<{width}}  {status}")
    return "\n".join(lines)


def print_info(as_json: bool = False) -> int:
    report = collect()
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return 0
