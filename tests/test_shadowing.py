"""The repository's kernels/ directory must not shadow the PyPI package ``kernels`` (which
transformers imports) in a process started in the repository root."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = """
import importlib.util, os, sys
import fastvl, kernels
import transformers.integrations  # imports the hub kernels integration where installed
print(os.path.abspath(kernels.__file__))
"""


def _installed_kernels_package():
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != ROOT]
    try:
        import importlib.machinery

        return importlib.machinery.PathFinder.find_spec("kernels", sys.path)
    finally:
        sys.path[:] = saved


def test_repository_root_does_not_shadow_the_pypi_kernels_package():
    if _installed_kernels_package() is None:
        pytest.skip("the PyPI package `kernels` is not installed here")
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    path = result.stdout.strip().splitlines()[-1]
    assert not path.startswith(os.path.join(ROOT, "kernels")), path
