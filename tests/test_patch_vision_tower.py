"""fastvl.patch.transformers.apply_pitome on tiny random-init CLIP / SigLIP vision models.

Oracle: the unpatched layers run one by one here, with PiToMe between them written out from
its definition (energy in float64 by the spelled-out margin function, the 2r most energetic
tokens split alternately, each source into its most similar destination, size-weighted
means, ``[prefix, protected, destinations]`` order), in float64.
"""

from __future__ import annotations

import pytest
import torch

import fastvl  # noqa: F401  (before transformers in the checkout root)
from fastvl.patch.transformers import apply_pitome
from tests.conftest import DEVICE, require_backend

transformers = pytest.importorskip("transformers")


def _model(kind):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))
    return model.to(DEVICE, torch.float64).eval()


def _merge_oracle(x, size, r, prefix, margin):
    body = x[:, prefix:]
    unit = body / body.norm(dim=-1, keepdim=True)
    shifted = unit @ unit.transpose(1, 2) - margin
    energy = torch.where(shifted >= 0, shifted, torch.exp(shifted) - 1).mean(-1)
    out_x, out_size = [], []
    for b in range(x.shape[0]):
        count = body.shape[1]
        order = sorted(range(count), key=lambda j: (-float(energy[b, j]), j))
        src, dst, kept = order[0:2 * r:2], order[1:2 * r:2], order[2 * r:]
        groups = [[j] for j in kept] + [[j] for j in dst]
        for j in src:
            sims = [float(unit[b, j] @ unit[b, t]) for t in dst]
            groups[len(kept) + sims.index(max(sims))].append(j)
        sizes = [sum(float(size[b, prefix + j]) for j in g) for g in groups]
        rows = [sum(size[b, prefix + j] * body[b, j] for j in g) / s for g, s in zip(groups, sizes)]
        out_x.append(torch.cat([x[b, :prefix], torch.stack(rows)]))
        out_size.append(torch.cat([size[b, :prefix],
                                   torch.tensor(sizes, dtype=x.dtype, device=x.device)]))
    return torch.stack(out_x), torch.stack(out_size)


@torch.no_grad()
def _oracle(model, pixels, r, prefix):
    vision = getattr(model, "vision_model", model)  # transformers 5 holds them directly
    x = vision.embeddings(pixels)
    if hasattr(vision, "pre_layrnorm"):
        x = vision.pre_layrnorm(x)
    size = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    depth = len(vision.encoder.layers)
    for i, layer in enumerate(vision.encoder.layers):
        x = layer(x, None)
        step = min(r, (x.shape[1] - prefix) // 2)
        if step:
            x, size = _merge_oracle(x, size, step, prefix, 0.9 - 0.8 * i / depth)
    return x


@pytest.mark.parametrize("kind, prefix", [("clip", 1), ("siglip", 0)])
@pytest.mark.parametrize("r", [0, 2, 5])
def test_matches_the_oracle_and_removes(kind, prefix, r):
    model = _model(kind)
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(1)).to(DEVICE)
    before = model(pixel_values=pixels)
    expected = _oracle(model, pixels, r, prefix)
    handle = apply_pitome(model, r, backend="torch")
    out = model(pixel_values=pixels)
    assert out.last_hidden_state.shape == expected.shape
    if kind == "clip":  # last_hidden_state is before the final norm; the pooled class token after
        torch.testing.assert_close(out.last_hidden_state, expected, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(out.pooler_output,
                                   getattr(model, "vision_model", model).post_layernorm(expected[:, 0]),
                                   rtol=1e-9, atol=1e-10)
    else:
        torch.testing.assert_close(out.last_hidden_state, getattr(model, "vision_model", model).post_layernorm(expected),
                                   rtol=1e-9, atol=1e-10)
    if r == 0:
        torch.testing.assert_close(out.last_hidden_state, before.last_hidden_state)
    assert handle.remove() and not handle.remove()
    torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state,
                               before.last_hidden_state, rtol=0, atol=0)


def test_triton_energy_gives_the_torch_tokens():
    require_backend("pitome_energy", "triton")
    model = _model("siglip").float()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    handle = apply_pitome(model, 3, backend="torch")
    expected = model(pixel_values=pixels).pooler_output
    handle.remove()
    apply_pitome(model, 3, backend="triton")
    torch.testing.assert_close(model(pixel_values=pixels).pooler_output, expected,
                               rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    model = _model("clip")
    with pytest.raises(TypeError, match="CLIP / SigLIP vision model"):
        apply_pitome(torch.nn.Linear(2, 2), 2)
    with pytest.raises(TypeError, match="r must be an int or 3 ints"):
        apply_pitome(model, [1, 2])
    with pytest.raises(ValueError, match="r must be >= 0"):
        apply_pitome(model, -1)
    with pytest.raises(ValueError, match="margins must be 3 finite numbers"):
        apply_pitome(model, 1, margins=[0.5])
    apply_pitome(model, 1)
    with pytest.raises(ValueError, match="already has PiToMe"):
        apply_pitome(model, 1)
