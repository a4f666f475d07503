"""Distributions for GPU clusters: sdist -> CUDA wheel (built in a clean directory from the sdist,
compile only, one arch) -> a fresh virtual environment -> ``python -m fastvl info``; and the
pure wheel. Needs nvcc and a CUDA build of torch (CI has both); a few minutes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, **env):
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-I", "setup.py", "-q", "sdist", "-d", out], ROOT,
         FASTVL_BUILD_CUDA="0")
    (path,) = out.glob("fastvl-*.tar.gz")
    return path


def _wheel_files(wheel: Path) -> tuple[list[str], str]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    return names, metadata


def test_sdist_carries_the_sources_and_tests(sdist):
    import tarfile

    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for required in ("csrc/gather_tokens.cu", "csrc/registration.cpp", "csrc/row_kernels.h",
                     "csrc/cuda_rows.cuh", "tests/csrc/emulated_row_kernels.cpp", "LICENSE",
                     "kernels/attention.py", "tests/conftest.py", "conftest.py",
                     "pyproject.toml", "setup.py", "MANIFEST.in"):
        assert required in names, required
    assert not any(name.endswith(".so") for name in names)


@pytest.mark.slow
def test_pure_wheel_from_the_sdist(sdist, tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
          "-w", tmp_path, sdist], tmp_path, FASTVL_BUILD_CUDA="0")
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel.name == "fastvl-0.1.0-py3-none-any.whl"
    names, metadata = _wheel_files(wheel)
    assert "fastvl/kernels/attention.py" in names and "fastvl/ops/dispatch_table.json" in names
    assert "Requires-Dist: torch>=2.6" in metadata


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
                    reason="needs a CUDA toolkit (nvcc) to compile fastvl._C")
@pytest.mark.skipif(not torch.version.cuda, reason="needs a CUDA build of torch")
def test_cuda_wheel_from_the_sdist_installs_and_reports(sdist, tmp_path):
    """The wheel pins the torch it was built with, names it in its version, carries the build
    record, and works in a fresh environment that only shares this one's torch."""
    build = tmp_path / "build"
    build.mkdir()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
          "-w", build, sdist], build, FASTVL_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0",
         MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    (wheel,) = build.glob("*.whl")
    major, minor = re.findall(r"\d+", torch.__version__)[:2]
    cuda = torch.version.cuda.replace(".", "")
    assert wheel.name.startswith(f"fastvl-0.1.0+torch{major}.{minor}cu{cuda}-")
    assert wheel.name.endswith("-linux_x86_64.whl")
    names, metadata = _wheel_files(wheel)
    assert f"Requires-Dist: torch<{major}.{int(minor) + 1},>={major}.{minor}" in metadata
    assert "fastvl/_C_build.json" in names and any(n.startswith("fastvl/_C.") for n in names)

    # A fresh environment: its own site-packages for fastvl, this one's for torch & co.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                tmp_path).strip()
    Path(site, "shared-torch.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
          "--no-index", wheel], tmp_path)
    info = _run([python, "-m", "fastvl", "info"], tmp_path)
    assert "fastvl._C built for sm 9.0" in info, info
    assert f"build record: torch {torch.__version__}" in info, info
    location = _run([python, "-c", "import fastvl; print(fastvl.__file__)"], tmp_path)
    assert location.startswith(site), location
