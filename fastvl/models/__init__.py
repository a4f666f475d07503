"""Reference models fastvl ships, each with a switch between fastvl's fused ops and the
plain-PyTorch formulation: MAE / VideoMAE (V2) pretraining on timm blocks, the iLLaMA causal
ViT on LLaMA blocks."""

from fastvl.models.illama import (
    ILLaMAViT,
    causal_strength_schedule,
    illama_base,
    illama_small,
    illama_tiny,
)

from fastvl.models.mae import (
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_large_patch16,
    mae_vit_tiny,
)

__all__ = [
    "ILLaMAViT",
    "causal_strength_schedule",
    "illama_base",
    "illama_small",
    "illama_tiny",
    "MaskedAutoencoderViT",
    "mae_vit_base_patch16",
    "mae_vit_large_patch16",
    "mae_vit_tiny",
]
