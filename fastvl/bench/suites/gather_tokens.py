"""gather_tokens cases: MAE masking, ViT token pruning, VLM image-token selection.

Baselines are the two ways PyTorch code writes this gather: ``torch.gather`` with the index
expanded over channels (timm, MAE), and advanced indexing ``x[arange(B)[:, None], index]``.
No third-party library ships a dedicated kernel for it, so there are no other peers.
Indices are unique per row (as in masking and pruning), so every implementation, the
backward scatter-adds included, gives bit-identical results.
"""

from __future__ import annotations

import torch

from fastvl.bench.cases import (
    BACKWARD,
    FASTVL_IMPLS,
    Built,
    Scale,
    fastvl_impls,
    register_case,
    with_backward,
)
from fastvl.ops import gather_tokens
from fastvl.testing import random_index

IMPLS = (*FASTVL_IMPLS, "torch.gather", "torch indexing")
BASELINE = "torch.gather"

_COMMON = (
    " fastvl calls use check_bounds=False (no host sync). forward+backward: the gradient"
    " w.r.t. x of sum(out * w) for a random w."
)


def _build(device, dtype, scale: Scale, mode: str, batch, tokens, kept, channels) -> Built:
    B, N, K, C = scale.batch(batch), scale.size(tokens), scale.size(kept), scale.size(channels)
    generator = torch.Generator(device=device).manual_seed(0)
    backward = mode == BACKWARD
    x = torch.randn(B, N, C, generator=generator, device=device, dtype=dtype)
    x.requires_grad_(backward)
    index = random_index(B, K, N, unique=True, device=device, generator=generator)
    batch_index = torch.arange(B, device=device)[:, None]
    weights = torch.randn(B, K, C, generator=generator, device=device, dtype=dtype)

    element = x.element_size()
    moved = 2 * B * K * C * element + index.numel() * index.element_size()
    if backward:  # read the output gradient and the index, write the whole input gradient
        moved += B * K * C * element + index.numel() * index.element_size() + B * N * C * element
    built = Built(
        shapes={"x": [B, N, C], "index": [B, K], "out": [B, K, C]},
        bytes=moved,
        rtol=0.0,
        atol=0.0,
    )

    def finish(forward):
        return with_backward(forward, (x,), weights) if backward else forward

    def fastvl_call(backend):
        return finish(lambda: gather_tokens(x, index, backend=backend, check_bounds=False))

    fastvl_impls(built, "gather_tokens", device, (x, index), fastvl_call)
    built.add(
        "torch.gather",
        finish(lambda: torch.gather(x, 1, index[..., None].expand(-1, -1, C))),
    )
    built.add("torch indexing", finish(lambda: x[batch_index, index]))
    return built


def _case(name, description, batch, tokens, kept, channels):
    shape = f" (B {batch}, N {tokens}, K {kept}, C {channels}; batch / 8 on CPU)."

    @register_case(
        op="gather_tokens",
        name=name,
        description=description + shape + _COMMON,
        impls=IMPLS,
        baseline=BASELINE,
    )
    def build(device, dtype, scale, mode):
        return _build(device, dtype, scale, mode, batch, tokens, kept, channels)

    return build


_case(
    "vit-b16-mae-keep25",
    "ViT-B/16 MAE encoder: keep 25% of the 196 patch tokens",
    64, 196, 49, 768,
)
_case(
    "vit-l14-prune-keep50",
    "ViT-L/14 at 336 px, token pruning: keep 50% of the 577 tokens",
    32, 577, 288, 1024,
)
_case(
    "vlm-image-tokens",
    "VLM: select 576 of 2880 image tokens (5 tiles x 576) at LLM width 4096",
    8, 2880, 576, 4096,
)
