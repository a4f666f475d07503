"""Keep the PyPI package ``kernels`` importable in a process started in the repository root.

The repository's top-level ``kernels/`` directory (installed as :mod:`fastvl.kernels`) is
also importable as a top-level ``kernels`` wherever the repository root is on ``sys.path``:
``python -m pytest`` and ``python -m fastvl`` run there put it first. transformers >= 5.25
imports the PyPI package ``kernels`` (Hugging Face's hub kernels), and would get fastvl's
directory instead. :func:`import_installed_kernels` imports the installed package first, with
the repository root hidden, so every later ``import kernels`` gets it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_root(entry: str) -> bool:
    return os.path.abspath(entry or os.curdir) == _ROOT


def import_installed_kernels() -> None:
    """Import the installed ``kernels`` package where the repository's directory of that name
    would shadow it; nothing otherwise (not shadowed, already imported, or not installed)."""
    if "kernels" in sys.modules or not any(_is_root(entry) for entry in sys.path):
        return
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None or not _is_root(
            os.path.dirname(os.path.dirname(spec.origin))):
        return
    saved = sys.path[:]
    sys.path[:] = [entry for entry in saved if not _is_root(entry)]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: nothing to protect
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved
