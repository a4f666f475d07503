"""Triton kernels and their launch wrappers, one file per kernel family.

Installed as ``fastvl.kernels``. Importing a submodule imports triton; callers check that
triton is available first (:data:`fastvl.ops.registry.TRITON_IMPORT_ERROR`).
"""

import torch
from torch._library.triton import is_wrap_triton_enabled
from torch.library import wrap_triton as _torch_wrap_triton

# Set by fastvl.triton_aot.gpu_launch_sizes(): launch configurations take their GPU sizes on
# every device, so that a CPU (interpreted) run records the launches a GPU would make, for the
# architecture _GPU_ARCH_EVERYWHERE (e.g. 90).
_GPU_SIZES_EVERYWHERE = False
_GPU_ARCH_EVERYWHERE = 90
# Streaming multiprocessors assumed where there is no CUDA device to ask (an H100 SXM's).
NOMINAL_MULTIPROCESSORS = 132


def gpu_sizes(device: torch.device) -> bool:
    """Whether launch configurations (block sizes, warps, splits) take their GPU values: on a
    CUDA device, or anywhere inside :func:`fastvl.triton_aot.gpu_launch_sizes`."""
    return _GPU_SIZES_EVERYWHERE or device.type == "cuda"


_ARCHS: dict = {}  # per CUDA device index, as the caches below
_MULTIPROCESSORS: dict = {}


def gpu_arch(device: torch.device) -> int:
    """The compute capability whose launch configurations apply, as major * 10 + minor: the
    CUDA device's, else the one :func:`fastvl.triton_aot.gpu_launch_sizes` records for."""
    if device.type != "cuda":
        return _GPU_ARCH_EVERYWHERE
    arch = _ARCHS.get(device.index)
    if arch is None:
        major, minor = torch.cuda.get_device_capability(device)
        arch = _ARCHS[device.index] = major * 10 + minor
    return arch


def multiprocessors(device: torch.device) -> int:
    """The device's streaming multiprocessor count (:data:`NOMINAL_MULTIPROCESSORS` off CUDA)."""
    if device.type != "cuda":
        return NOMINAL_MULTIPROCESSORS
    count = _MULTIPROCESSORS.get(device.index)
    if count is None:
        count = _MULTIPROCESSORS[device.index] = (
            torch.cuda.get_device_properties(device).multi_processor_count)
    return count


# ---- host-side launch helpers (plain Python: triton.cdiv and triton.next_power_of_2 cost
# microseconds per call)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (and SymInts)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, and 1 for n <= 1 (a block size: concrete, so a SymInt
    is specialised)."""
    n = int(n)
    return 1 << (n - 1).bit_length() if n > 1 else 1


def launchable(kernel, wrap, eager: bool = False):
    """What a launcher launches: ``wrap(kernel)``, ``wrap`` being the launching module's
    ``wrap_triton`` (which :func:`fastvl.triton_aot.recorded_launches` replaces). Where that
    is torch's and nothing traces (``eager``: the caller says so; else torch.library's switch
    says so), wrap_triton would return the kernel itself after microseconds of imports: that
    case is answered here."""
    if wrap is _torch_wrap_triton and (eager or not is_wrap_triton_enabled()):
        return kernel
    return wrap(kernel)
