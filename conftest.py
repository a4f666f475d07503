"""Loaded by pytest before any test module (tests/ and benches/): imports the installed PyPI
package ``kernels`` (which transformers imports) before the repository's ``kernels/``
directory can shadow it (see fastvl/_shadowing.py). The helper is loaded from its file, not
through ``import fastvl``: tests/conftest.py must set TRITON_INTERPRET before fastvl imports
triton."""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "_fastvl_shadowing", os.path.join(os.path.dirname(__file__), "fastvl", "_shadowing.py")
)
_shadowing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_shadowing)
_shadowing.import_installed_kernels()
