"""Triton kernels and their launch wrappers, one file per kernel family.

Installed as ``fastvl.kernels``. Importing a submodule imports triton; callers check that
triton is available first (:data:`fastvl.ops.registry.TRITON_IMPORT_ERROR`).
"""

import torch

# Set by fastvl.triton_aot.gpu_launch_sizes(): launch configurations take their GPU sizes on
# every device, so that a CPU (interpreted) run records the launches a GPU would make.
_GPU_SIZES_EVERYWHERE = False
# Streaming multiprocessors assumed where there is no CUDA device to ask (an H100 SXM's).
NOMINAL_MULTIPROCESSORS = 132


def gpu_sizes(device: torch.device) -> bool:
    """Whether launch configurations (block sizes, warps, splits) take their GPU values: on a
    CUDA device, or anywhere inside :func:`fastvl.triton_aot.gpu_launch_sizes`."""
    return _GPU_SIZES_EVERYWHERE or device.type == "cuda"


def multiprocessors(device: torch.device) -> int:
    """The device's streaming multiprocessor count (:data:`NOMINAL_MULTIPROCESSORS` off CUDA)."""
    if device.type != "cuda":
        return NOMINAL_MULTIPROCESSORS
    return torch.cuda.get_device_properties(device).multi_processor_count
