"""Zero-TPrune on end-to-end timm ViTs (op ``vit_zero_tprune``, built by
:func:`fastvl.bench.suites.tome.reduced_vit_case`).

Images/s of a timm ViT (``pretrained=False``, eval, ``torch.inference_mode``): unpatched timm
(SDPA; the baseline), ``torch Zero-TPrune r<r>`` (the paper's plain-PyTorch formulation,
:func:`plain_zero_tprune_vit`: each block's attention with its probability matrix written
out, the power iteration ``s <- A^T s`` on that matrix, then the similarity stage) and
``fastvl Zero-TPrune r<r>`` (:func:`fastvl.patch.timm.apply_zero_tprune` on a copy, backend
"auto": the importance from the attention's lse by ``attention_key_mass`` with query
weights, no N x N matrix). Both drop the same tokens, so fastvl's logits are checked against
the plain ones at the same r (in half precision a near-tie may drop another token: a
relative tolerance, as for ToMe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvl.bench.cases import requires_module
from fastvl.bench.suites.tome import reduced_vit_case

RS = (8, 16)
ITERATIONS = 10  # apply_zero_tprune's default


def plain_zero_tprune_vit(model, images: torch.Tensor, r: int,
                          iterations: int = ITERATIONS) -> torch.Tensor:
    """Logits of a timm ``VisionTransformer`` (pre-norm ``Block``\\ s) with Zero-TPrune as
    plain PyTorch writes it: in every block, after attention, the importance ``s <- A^T s``
    (from uniform, ``iterations`` steps, per head on the explicit probabilities, averaged
    over heads), the more important half of the non-prefix tokens kept and, of the others,
    the ``min(r, M // 2)`` whose head-averaged key is most cosine-similar to a kept one
    dropped; the rest keep their order. images: (B, 3, H, W) -> (B, num_classes)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    prefix = model.num_prefix_tokens
    for block in model.blocks:
        attn = block.attn
        batch, num_tokens, _ = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(batch, num_tokens, 3, attn.num_heads,
                                                attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)  # (B, H, N, N)
        out = attn.norm((probs @ v).transpose(1, 2).reshape(batch, num_tokens, -1))
        x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
        count = num_tokens - prefix
        dropped = min(r, count // 2)
        if dropped > 0:
            scores = torch.full(probs.shape[:3], 1.0 / num_tokens, device=x.device,
                                dtype=probs.dtype)
            for _ in range(iterations):
                scores = (scores.unsqueeze(-2) @ probs).squeeze(-2)
            importance = scores.mean(dim=1)[:, prefix:].float()
            order = importance.argsort(dim=1, descending=True, stable=True)
            kept_group, others = order[:, :(count + 1) // 2], order[:, (count + 1) // 2:]
            metric = F.normalize(k.mean(dim=1)[:, prefix:].float(), dim=-1)
            dim = metric.shape[-1]
            similarity = (metric.gather(1, others[..., None].expand(-1, -1, dim))
                          @ metric.gather(1, kept_group[..., None].expand(-1, -1, dim))
                          .transpose(1, 2)).amax(dim=-1)
            drop = others.gather(1, similarity.argsort(dim=1, descending=True)[:, :dropped])
            keep = torch.ones(batch, count, dtype=torch.bool, device=x.device)
            keep = keep.scatter(1, drop, False)
            kept = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :count - dropped]
            rest = x[:, prefix:].gather(1, kept[..., None].expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :prefix], rest], dim=1)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return model.forward_head(model.norm(x))


def _apply(model, r):
    from fastvl.patch.timm import apply_zero_tprune

    apply_zero_tprune(model, r, iterations=ITERATIONS)


if requires_module("timm") is None:
    reduced_vit_case(
        "vit_zero_tprune", "vit-b16", "vit_base_patch16_224", 256, "Zero-TPrune", RS,
        plain_zero_tprune_vit, _apply,
        "timm vit_base_patch16_224 images/s (pretrained=False, eval, inference_mode; batch 256 "
        "float16 on GPU, CPU: 8 images, float32): unpatched (SDPA), the paper's plain-PyTorch "
        f"Zero-TPrune and fastvl.patch.timm.apply_zero_tprune at r {', '.join(map(str, RS))} per "
        f"block, {ITERATIONS} power iterations; fastvl logits checked against plain at the same r",
    )
