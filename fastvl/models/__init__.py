"""Reference models fastvl ships, built from timm blocks with a switch to the fused ops."""

from fastvl.models.mae import (
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_large_patch16,
    mae_vit_tiny,
)

__all__ = [
    "MaskedAutoencoderViT",
    "mae_vit_base_patch16",
    "mae_vit_large_patch16",
    "mae_vit_tiny",
]
