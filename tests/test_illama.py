"""fastvl.models.ILLaMAViT (iLLaMA) on tiny random-init models.

Oracle: the model's function written out here from the paper's equations (RMSNorm, RoPE as
LLaMA writes it with complex numbers, SwiGLU, the class token after the patches, the soft
causal mask as an explicit (N, N) additive matrix), run in float64 on the model's parameters.
Both paths (fused on fastvl's attention, plain PyTorch) must match it to roundoff; the Triton
kernels (the interpreter on CPU) within float32 roundoff. The soft mask's end points are
checked as properties: at strength 0 every token sees the future, at 1 none does. A Liger-style
convergence test trains two copies a few steps under the schedule, fused vs plain.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fastvl.models import ILLaMAViT, causal_strength_schedule, illama_tiny
from fastvl.testing import random_tensor
from tests.conftest import DEVICE, require_backend

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=7)


def _model(dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    return ILLaMAViT(**{**TINY, **kwargs}).to(DEVICE, dtype)


def _images(dtype=torch.float64, batch=2, seed=1):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return random_tensor(batch, 3, 32, 32, dtype=dtype, device=DEVICE, generator=g)


def _oracle(model, imgs, strength):
    """The paper's model, written out in float64 on ``model``'s parameters."""
    p = {name: t.detach().double() for name, t in model.named_parameters()}
    imgs = imgs.double()
    x = torch.nn.functional.conv2d(imgs, p["patch_embed.weight"], p["patch_embed.bias"],
                                   stride=model.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([x, p["cls_token"].expand(x.shape[0], -1, -1)], dim=1) + p["pos_embed"]
    batch, tokens, dim = x.shape
    heads = model.blocks[0].attn.num_heads
    head_dim = dim // heads
    freqs = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(tokens, dtype=torch.float64), freqs)
    rotation = torch.polar(torch.ones_like(angles), angles).to(x.device)  # (N, D / 2)
    future = torch.arange(tokens)[None, :] > torch.arange(tokens)[:, None]
    mask = torch.zeros(tokens, tokens, dtype=torch.float64)
    if strength >= 1:
        mask[future] = -math.inf
    elif strength > 0:
        mask[future] = math.log(1 - strength)
    mask = mask.to(x.device)

    def rms(t, weight):
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + 1e-6) * weight

    def rope(t):  # (B, N, H, Dh), pairs (2i, 2i + 1) as complex numbers
        c = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(c * rotation[None, :, None, :]).flatten(3)

    for i in range(len(model.blocks)):
        pre = f"blocks.{i}."
        h = rms(x, p[pre + "norm1.weight"])
        qkv = h @ p[pre + "attn.qkv.weight"].t() + p[pre + "attn.qkv.bias"]
        q, k, v = qkv.view(batch, tokens, 3, heads, head_dim).unbind(2)
        q, k = rope(q), rope(k)
        scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(head_dim) + mask
        out = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v).reshape(batch, tokens, dim)
        x = x + out @ p[pre + "attn.proj.weight"].t() + p[pre + "attn.proj.bias"]
        h = rms(x, p[pre + "norm2.weight"])
        gate = torch.nn.functional.silu(h @ p[pre + "mlp.gate.weight"].t())
        x = x + (gate * (h @ p[pre + "mlp.up.weight"].t())) @ p[pre + "mlp.down.weight"].t()
    x = rms(x, p["norm.weight"])
    return x[:, -1] @ p["head.weight"].t() + p["head.bias"]


@pytest.mark.parametrize("strength", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("fused", [True, False])
def test_matches_the_paper_float64(strength, fused):
    model = _model(backend="torch", fused=fused, causal_strength=strength)
    imgs = _images()
    torch.testing.assert_close(model(imgs), _oracle(model, imgs, strength),
                               rtol=1e-10, atol=1e-12)


def test_triton_backend_matches_the_paper():
    require_backend("attention", "triton")
    model = _model(torch.float32, backend="triton", causal_strength=0.5)
    imgs = _images(torch.float32)
    torch.testing.assert_close(model(imgs).double(), _oracle(model, imgs, 0.5),
                               rtol=1e-4, atol=1e-5)


def test_soft_mask_end_points():
    """Strength 1: a token's features do not depend on later patches; the class token
    (last) sees all of them. Strength 0: the first token's do (bidirectional)."""
    model = _model(backend="torch")
    imgs = _images()
    later = imgs.clone()
    later[:, :, 24:, 24:] += 1.0  # the last patch only
    for strength, first_changes in ((1.0, False), (0.0, True)):
        model.causal_strength = strength
        before, after = model.forward_features(imgs), model.forward_features(later)
        changed = (before - after).abs().amax(dim=(0, 2)) > 1e-9  # per token
        assert bool(changed[0]) is first_changes
        assert bool(changed[-1]) and bool(changed[-2])  # the class token, the changed patch
        if strength == 1.0:
            assert not changed[:-2].any()


def test_schedule():
    assert [causal_strength_schedule(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert causal_strength_schedule(0, 0) == 1.0


def test_training_converges_identically():
    """Liger-style: 6 AdamW steps of two copies, fused (fastvl attention) vs plain, the soft
    mask going from 0 to 1 over the first 4 steps; losses and parameters step by step."""
    fused = _model(torch.float32, backend="torch")
    plain = copy.deepcopy(fused)
    plain.fused = False
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (fused, plain)]
    g = torch.Generator(device=DEVICE).manual_seed(5)
    for step in range(6):
        imgs = random_tensor(4, 3, 32, 32, device=DEVICE, generator=g)
        labels = torch.randint(0, 7, (4,), device=DEVICE, generator=g)
        losses = []
        for model, optimizer in zip((fused, plain), optimizers):
            model.causal_strength = causal_strength_schedule(step, 4)
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(imgs), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_compiles_without_graph_breaks():
    model = _model(torch.float32, backend="torch", causal_strength=0.5)
    imgs = _images(torch.float32)
    compiler = "aot_eager" if DEVICE.type == "cpu" else "inductor"
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    torch.testing.assert_close(compiled(imgs), model(imgs), rtol=1e-5, atol=1e-6)


def test_sizes():
    assert sum(p.numel() for p in illama_tiny().parameters()) == 5_701_096  # the paper's 5.7M
    assert illama_tiny().blocks[0].mlp.gate.out_features == 512  # 2/3 * 4 * 192 -> 256k


@pytest.mark.parametrize("change, error, match", [
    (dict(imgs=torch.zeros(2, 3, 30, 30)), ValueError, r"imgs must be \(B, 3, 32, 32\)"),
    (dict(imgs=torch.zeros(2, 3, 32, 32, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(causal_strength=1.5), ValueError, r"causal_strength must lie in \[0, 1\]"),
    (dict(causal_strength="soft"), TypeError, "causal_strength must be a float"),
])
def test_bad_inputs(change, error, match):
    model = _model(torch.float32)
    model.causal_strength = change.get("causal_strength", 1.0)
    with pytest.raises(error, match=match):
        model(change.get("imgs", torch.zeros(2, 3, 32, 32)))


def test_bad_construction():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ILLaMAViT(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="heads of an even size"):
        ILLaMAViT(embed_dim=30, num_heads=2)
    with pytest.raises(ValueError, match="backend"):
        ILLaMAViT(backend="cuda-graphs")
