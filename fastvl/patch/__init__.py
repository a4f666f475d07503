"""Applying fastvl to existing models in place: ``fastvl.patch.timm`` (timm ViTs),
``fastvl.patch.transformers`` (Hugging Face models).

Each submodule imports its library, so import the one you need, e.g.
``from fastvl.patch import timm as fastvl_timm; handle = fastvl_timm.apply(model)``.
"""
