"""The compiled extension fastvl._C: that it loads, what it registers, and the arch rules.

Runs without a GPU. When fastvl._C is not built, the tests that need it skip, unless
FASTVL_BUILD_CUDA=1 is set (as in CI), where a missing or broken extension is a failure.
The arch-compatibility rules and the setup.py build switch are tested either way.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastvl import _extension

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_REQUIRED = os.environ.get("FASTVL_BUILD_CUDA", "").strip() == "1"
ARCH_ENTRY = re.compile(r"\d+\.\d+[a-z]?(\+PTX)?")

SCHEMAS = {
    "gather_tokens_cuda": "fastvl::gather_tokens_cuda(Tensor x, Tensor index) -> Tensor",
    "scatter_add_tokens_cuda": (
        "fastvl::scatter_add_tokens_cuda(Tensor grad, Tensor index, int num_tokens) -> Tensor"
    ),
}


@pytest.fixture
def extension():
    if not _extension.is_built():
        note = " (failure reported by test_extension_loads)" if BUILD_REQUIRED else ""
        pytest.skip(f"fastvl._C not built: {_extension.LOAD_ERROR}{note}")
    return _extension.EXTENSION


def test_extension_loads():
    if _extension.is_built():
        return
    if BUILD_REQUIRED:
        pytest.fail(f"FASTVL_BUILD_CUDA=1 but fastvl._C did not load: {_extension.LOAD_ERROR}")
    pytest.skip(f"fastvl._C not built: {_extension.LOAD_ERROR}")


def test_load_state_is_consistent():
    assert _extension.is_built() == (_extension.EXTENSION is not None)
    assert (_extension.LOAD_ERROR is None) == _extension.is_built()
    if not _extension.is_built():
        assert isinstance(_extension.LOAD_ERROR, str) and _extension.LOAD_ERROR
        assert _extension.cuda_archs() == []
        assert _extension.cuda_version() is None


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_op_schema(extension, name):
    packet = getattr(torch.ops.fastvl, name)
    assert str(packet.default._schema) == SCHEMAS[name]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_only_a_cuda_kernel_is_registered_in_cpp(extension, name):
    qualified = f"fastvl::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(
        qualified, "CompositeImplicitAutograd"
    )


def test_build_info(extension):
    assert isinstance(extension.cuda_archs, str)
    archs = _extension.cuda_archs()
    assert archs, f"empty arch list {extension.cuda_archs!r}"
    assert archs == extension.cuda_archs.split(";")
    for arch in archs:
        assert ARCH_ENTRY.fullmatch(arch), f"unparseable arch {arch!r} in {extension.cuda_archs!r}"
    assert re.fullmatch(r"\d+\.\d+(\.\d+)*", _extension.cuda_version()), extension.cuda_version


def test_built_archs_run_on_their_own_capability(extension):
    for arch in _extension.cuda_archs():
        major, minor = (int(v) for v in re.match(r"(\d+)\.(\d+)", arch).groups())
        reason = _extension.arch_unsupported_reason(
            torch.device("cuda", 0), capability=(major, minor)
        )
        assert reason is None, reason


@pytest.mark.parametrize(
    "arch, capability, runs",
    [
        ("8.0", (8, 0), True),
        ("8.0", (8, 6), True),  # SASS: same major, higher minor
        ("8.0", (8, 9), True),
        ("8.6", (8, 0), False),  # SASS: lower minor
        ("8.0", (9, 0), False),  # SASS never crosses a major version
        ("9.0", (8, 9), False),
        ("9.0", (10, 0), False),
        ("12.0", (12, 1), True),
        ("10.0", (12, 0), False),
        ("8.0+PTX", (9, 0), True),  # PTX JIT-compiles for any newer device
        ("8.0+PTX", (12, 0), True),
        ("8.0+PTX", (8, 0), True),
        ("8.6+PTX", (8, 0), False),  # ... but not an older one
        ("8.0+PTX", (7, 5), False),
        ("9.0a", (9, 0), True),  # arch-specific: exactly that capability
        ("9.0a", (9, 1), False),
        ("9.0a+PTX", (10, 0), False),
        ("10.0f", (10, 3), True),  # family: same major, minor >= its own
        ("10.0f", (12, 0), False),
        ("garbage", (8, 0), False),
    ],
)
def test_arch_runs_on(arch, capability, runs):
    assert _extension.arch_runs_on(arch, capability) is runs


def test_arch_unsupported_reason_with_fake_capabilities():
    device = torch.device("cuda", 0)
    archs = ["8.0", "9.0"]
    assert _extension.arch_unsupported_reason(device, capability=(8, 0), archs=archs) is None
    assert _extension.arch_unsupported_reason(device, capability=(8, 6), archs=archs) is None
    assert _extension.arch_unsupported_reason(device, capability=(9, 0), archs=archs) is None

    for capability in [(7, 5), (10, 0), (12, 0)]:
        reason = _extension.arch_unsupported_reason(device, capability=capability, archs=archs)
        assert isinstance(reason, str)
        assert f"{capability[0]}.{capability[1]}" in reason
        assert "8.0;9.0" in reason
        assert "cuda:0" in reason

    assert _extension.arch_unsupported_reason(device, (12, 0), ["8.0", "9.0+PTX"]) is None
    assert _extension.arch_unsupported_reason(device, (8, 0), []) is not None


def test_arch_unsupported_reason_without_a_cuda_device():
    reason = _extension.arch_unsupported_reason(torch.device("cpu"), archs=["8.0"])
    assert reason is not None and "cpu" in reason
    if not _extension.is_built():
        reason = _extension.arch_unsupported_reason(torch.device("cuda", 0), capability=(9, 0))
        assert reason is not None and "not available" in reason


def _run_setup(*args: str, **env: str) -> subprocess.CompletedProcess:
    # Runs setup.py in a child that reports whether torch got imported.
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['setup.py', *{list(args)!r}]\n"
        "try:\n"
        "    runpy.run_path('setup.py', run_name='__main__')\n"
        "finally:\n"
        "    print('TORCH_IMPORTED=%s' % ('torch' in sys.modules))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_setup_pure_python_mode_never_imports_torch():
    result = _run_setup("--name", FASTVL_BUILD_CUDA="0")
    assert result.returncode == 0, result.stderr
    assert "fastvl" in result.stdout
    assert "TORCH_IMPORTED=False" in result.stdout
    assert "not building fastvl._C" in result.stderr


def test_setup_rejects_an_unknown_build_switch():
    result = _run_setup("--name", FASTVL_BUILD_CUDA="maybe")
    assert result.returncode != 0
    assert "FASTVL_BUILD_CUDA must be 1" in result.stdout + result.stderr


# ---- the build record and the version check at import ---------------------------------------


def test_build_mismatch_rule():
    """Another torch release (major.minor) or CUDA major version: not loaded, with a message
    naming both versions and the rebuild command; another patch release or CUDA minor: fine."""
    record = {"torch": "2.14.1+cu130", "torch_cuda": "13.0", "nvcc": "13.0.88",
              "cuda_archs": "8.0;9.0"}
    assert _extension.build_mismatch(record, "2.14.0", "13.1") is None
    assert _extension.build_mismatch(None, "2.14.0", "13.0") is None
    for torch_version, cuda in (("2.15.0+cu130", "13.0"), ("2.14.1+cu128", "12.8"),
                                ("2.14.1+cpu", None)):
        message = _extension.build_mismatch(record, torch_version, cuda)
        assert "torch 2.14.1+cu130 (CUDA 13.0)" in message
        assert f"torch {torch_version} (CUDA {cuda})" in message
        assert "FASTVL_BUILD_CUDA=1 pip install" in message


def test_mismatched_build_record_warns_and_falls_back():
    """A record from another torch: one RuntimeWarning, no extension, and the reason kept."""
    record = {"torch": "1.13.0", "torch_cuda": "11.7"}
    with pytest.warns(RuntimeWarning, match=r"built for torch 1\.13\.0 \(CUDA 11\.7\)"):
        extension, error = _extension._load(record=record)
    assert extension is None and torch.__version__ in error


def test_read_build_record(tmp_path):
    path = tmp_path / "_C_build.json"
    assert _extension.read_build_record(str(path)) is None
    path.write_text('{"torch": "2.14.1", "torch_cuda": "13.0"}')
    assert _extension.read_build_record(str(path)) == {"torch": "2.14.1", "torch_cuda": "13.0"}
    path.write_text("not json")
    assert _extension.read_build_record(str(path)) is None


def test_info_shows_the_build_record():
    from fastvl import info

    report = info.collect()
    report["extension"] = {"built": False, "cuda_archs": [], "cuda_version": None,
                           "error": "fastvl._C was built for torch 1.13.0 ...",
                           "build_record": {"torch": "1.13.0", "torch_cuda": "11.7",
                                            "nvcc": "11.7.99", "cuda_archs": "8.0"}}
    text = info.format_report(report)
    assert "build record: torch 1.13.0 (CUDA 11.7), nvcc 11.7.99, archs 8.0" in text
