"""PiToMe cases.

``pitome_energy``: the energy of every token (the costly part of a PiToMe step), every fastvl
backend against the dense formulation of PiToMe's code (``elu(cos - margin).mean(-1)`` on the
full similarity matrix), on the head-averaged keys of ViT-B/16 (B 256, 196 tokens, 64).

``vit_pitome``: images/s of unpatched timm (the baseline), PiToMe as its code computes it
(:func:`plain_pitome_vit`: the dense similarity matrix for the energy, ``scatter_reduce``
merges) and :func:`fastvl.patch.timm.apply_pitome` (tiled energy, the plan's size-weighted
merge kernel), same r, logits compared."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvl.bench.cases import (
    FASTVL_IMPLS,
    FORWARD,
    Built,
    Scale,
    fastvl_impls,
    register_case,
    requires_module,
)
from fastvl.bench.suites.tome import _plain_attention, reduced_vit_case

RS = (8, 16)
ENERGY_BASELINE = "PiToMe (dense)"
MARGIN = 0.5


@register_case(
    op="pitome_energy", name="vit-b16-keys",
    description="PiToMe energy of ViT-B/16's head-averaged keys (B 256, 196 tokens, 64 "
                f"channels; batch / 8 on CPU), margin {MARGIN}: fastvl's backends vs the dense "
                "similarity matrix",
    impls=(*FASTVL_IMPLS, ENERGY_BASELINE), baseline=ENERGY_BASELINE, modes=(FORWARD,),
)
def _energy_case(device, dtype, scale: Scale, mode: str) -> Built:
    from fastvl.ops import pitome_energy

    batch, tokens, channels = scale.batch(256), scale.size(196), 64
    metric = torch.randn(batch, tokens, channels, device=device, dtype=dtype)
    element = metric.element_size()
    built = Built(shapes={"metric": [batch, tokens, channels]},
                  bytes=batch * tokens * (channels * element + 4), rtol=2e-3, atol=2e-3)
    fastvl_impls(built, "pitome_energy", device, (metric, MARGIN, 1.0),
                 lambda backend: lambda: pitome_energy(metric, margin=MARGIN, backend=backend))

    def dense():
        unit = F.normalize(metric.float(), dim=-1)
        return F.elu(unit @ unit.transpose(1, 2) - MARGIN).mean(-1)

    built.add(ENERGY_BASELINE, dense)
    return built


def plain_pitome_vit(model, images: torch.Tensor, r: int) -> torch.Tensor:
    """Logits of a timm ``VisionTransformer`` (pre-norm ``Block``\\ s) with PiToMe as plain
    PyTorch computes it: per block, after attention (proportional from the first merge on),
    the energy ``mean_j elu(cos - margin)`` of the non-prefix tokens on the head-averaged keys
    (margin ``0.9 - 0.8 * i / depth``), the 2r most energetic split alternately into merging
    tokens and destinations, each merged into its most similar destination by size-weighted
    ``scatter_reduce``, the tokens in ``[prefix, protected, destinations]`` order."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    prefix = model.num_prefix_tokens
    depth = len(model.blocks)
    size = None
    for i, block in enumerate(model.blocks):
        out, metric = _plain_attention(block.attn, block.norm1(x), size)
        x = x + block.drop_path1(block.ls1(out))
        if size is None:
            size = torch.ones(x.shape[:2], device=x.device, dtype=torch.float32)
        count = x.shape[1] - prefix
        step = min(r, count // 2)
        if step:
            unit = F.normalize(metric[:, prefix:].float(), dim=-1)
            energy = F.elu(unit @ unit.transpose(1, 2) - (0.9 - 0.8 * i / depth)).mean(-1)
            order = energy.argsort(dim=1, descending=True, stable=True)
            a, b, kept = order[:, 0:2 * step:2], order[:, 1:2 * step:2], order[:, 2 * step:]
            dim = unit.shape[-1]
            dst = (unit.gather(1, a[..., None].expand(-1, -1, dim))
                   @ unit.gather(1, b[..., None].expand(-1, -1, dim)).transpose(1, 2)).argmax(-1)

            def merge(t):
                body, c = t[:, prefix:], t.shape[-1]
                rows = body.gather(1, b[..., None].expand(-1, -1, c)).scatter_reduce(
                    1, dst[..., None].expand(-1, -1, c),
                    body.gather(1, a[..., None].expand(-1, -1, c)), "sum")
                protected = body.gather(1, kept[..., None].expand(-1, -1, c))
                return torch.cat([t[:, :prefix], protected, rows], dim=1)

            x = merge(x * size[..., None].to(x.dtype))
            size = merge(size[..., None])[..., 0]
            x = x / size[..., None].to(x.dtype)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return model.forward_head(model.norm(x))


def _apply(model, r):
    from fastvl.patch.timm import apply_pitome

    apply_pitome(model, r)


if requires_module("timm") is None:
    reduced_vit_case(
        "vit_pitome", "vit-b16", "vit_base_patch16_224", 256, "PiToMe", RS, plain_pitome_vit,
        _apply,
        "timm vit_base_patch16_224 images/s (pretrained=False, eval, inference_mode; batch 256 "
        "float16 on GPU, CPU: 8 images, float32): unpatched (SDPA), PiToMe's plain-PyTorch "
        f"formulation and fastvl.patch.timm.apply_pitome at r {', '.join(map(str, RS))} per "
        "block (proportional attention); fastvl logits checked against plain at the same r",
    )
