"""Test setup: Triton runs in its interpreter where there is no GPU; `gpu` tests skip there."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported (fastvl imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def own_backends(*op_names: str) -> tuple:
    """fastvl's own implementations (``cuda``, ``triton``, ``torch``) of any of ``op_names``, as
    the registry lists them: what a test sweeps (library kernels have their own tests)."""
    from fastvl.ops.registry import OPS, OWN_BACKENDS

    return tuple(b for b in OWN_BACKENDS if any(b in OPS[name].impls for name in op_names))


def require_backend(op_name: str, backend: str, device: torch.device = DEVICE) -> None:
    """Skip unless ``backend`` can run ``op_name`` on ``device``.

    With FASTVL_BUILD_CUDA=1 a missing cuda backend on a GPU machine fails instead.
    """
    from fastvl.ops.registry import OPS

    reasons = OPS[op_name].device_reasons(backend, device)
    if not reasons:
        return
    if backend == "cuda" and device.type == "cuda" and os.environ.get("FASTVL_BUILD_CUDA") == "1":
        pytest.fail(f"cuda backend required (FASTVL_BUILD_CUDA=1) but: {reasons}")
    pytest.skip(f"{op_name}/{backend} unavailable on {device}: {'; '.join(reasons)}")
