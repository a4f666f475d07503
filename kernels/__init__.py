"""Triton kernels and their launch wrappers, one file per kernel family.

Installed as ``fastvl.kernels``. Importing a submodule imports triton; callers check that
triton is available first (:data:`fastvl.ops.registry.TRITON_IMPORT_ERROR`).
"""
