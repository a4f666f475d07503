"""PiToMe: pitome_energy (torch and Triton), pitome_match's plan, patch.timm.apply_pitome.

Oracles are written here from the paper's definitions: the energy with explicit cosine
similarities and the margin function spelled out (float64); the plan with per-sample Python
loops; the patched ViT as PiToMe's code computes it (explicit softmax attention with
proportional attention, energy, alternate split of the 2r most energetic tokens, size-weighted
``scatter_reduce`` merge, ``[prefix, protected, destinations]`` order), run on the unpatched
model in float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch

import fastvl.patch.timm as fastvl_timm
from fastvl import ops
from fastvl.testing import assert_opcheck, poison_outputs, random_tensor
from tests.conftest import DEVICE, require_backend

BACKENDS = ("torch", "triton")


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _energy_oracle(metric, margin, alpha):
    metric = metric.double()
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    shifted = unit @ unit.transpose(1, 2) - margin
    value = torch.where(shifted >= 0, shifted, alpha * (torch.exp(shifted) - 1))
    return value.sum(-1) / metric.shape[1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens,channels", [(1, 16), (7, 64), (33, 80), (196, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_energy_against_float64(backend, tokens, channels, dtype):
    require_backend("pitome_energy", backend)
    metric = random_tensor(2, tokens, channels, dtype=dtype, device=DEVICE, generator=_gen(tokens))
    metric[0, 0] = 0.0  # a zero row: cosine 0 with everything (normalised by the 1e-12 floor)
    for margin, alpha in ((0.9, 1.0), (0.1, 0.5)):
        with poison_outputs():
            energy = ops.pitome_energy(metric, margin=margin, alpha=alpha, backend=backend)
        assert energy.dtype == torch.float32 and energy.shape == (2, tokens)
        tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16 dot products round the inputs
        torch.testing.assert_close(energy.double(), _energy_oracle(metric, margin, alpha),
                                   rtol=tol, atol=tol)


def _plan_oracle(metric, r, prefix, margin):
    """dest (B, N) of PiToMe's merge, per sample."""
    energy = _energy_oracle(metric[:, prefix:], margin, 1.0)
    rows = []
    for b in range(metric.shape[0]):
        count = energy.shape[1]
        order = sorted(range(count), key=lambda j: (-float(energy[b, j]), j))
        sources, targets, kept = order[0:2 * r:2], order[1:2 * r:2], order[2 * r:]
        unit = metric[b, prefix:].double()
        unit = unit / unit.norm(dim=-1, keepdim=True)
        dest = list(range(prefix)) + [0] * count
        for rank, j in enumerate(kept):
            dest[prefix + j] = prefix + rank
        for rank, j in enumerate(targets):
            dest[prefix + j] = prefix + len(kept) + rank
        for j in sources:
            sims = [float(unit[j] @ unit[t]) for t in targets]
            dest[prefix + j] = prefix + len(kept) + sims.index(max(sims))
        rows.append(dest)
    return torch.tensor(rows, device=metric.device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens,prefix,r", [(17, 1, 4), (17, 1, 8), (12, 0, 3), (20, 3, 0),
                                              (9, 2, 3)])
def test_plan_against_loops(backend, tokens, prefix, r):
    require_backend("pitome_energy", backend)
    metric = random_tensor(3, tokens, 16, device=DEVICE, generator=_gen(tokens + r))
    plan = ops.pitome_match(metric, r, margin=0.5, num_prefix_tokens=prefix, backend=backend)
    assert torch.equal(plan.dest, _plan_oracle(metric, r, prefix, 0.5))
    assert plan.num_merged_tokens == tokens - r
    x = random_tensor(3, tokens, 5, dtype=torch.float64, device=DEVICE, generator=_gen(3))
    merged, size = ops.tome_merge(plan, x, check_plan=True, backend="torch")
    expected = torch.zeros(3, tokens - r, 5, dtype=torch.float64, device=DEVICE)
    counts = torch.zeros(3, tokens - r, dtype=torch.float64, device=DEVICE)
    for b in range(3):
        for i in range(tokens):
            expected[b, plan.dest[b, i]] += x[b, i]
            counts[b, plan.dest[b, i]] += 1
    torch.testing.assert_close(merged, expected / counts[..., None])
    torch.testing.assert_close(size.double(), counts)


def test_opcheck_triton_op():
    require_backend("pitome_energy", "triton")
    metric = random_tensor(2, 19, 16, device=DEVICE, generator=_gen(9))
    assert_opcheck(torch.ops.fastvl.pitome_energy_triton.default, (metric, 0.7, 1.0))


@pytest.mark.parametrize("call, error, match", [
    (lambda m: ops.pitome_energy(m[0], margin=0.5), ValueError, r"metric must be \(B, N, C\)"),
    (lambda m: ops.pitome_energy(m.long(), margin=0.5), TypeError, "metric must be a floating"),
    (lambda m: ops.pitome_energy(m, margin=float("nan")), TypeError, "margin must be a finite"),
    (lambda m: ops.pitome_energy(m, margin=0.5, alpha=True), TypeError, "alpha must be a finite"),
    (lambda m: ops.pitome_match(m, 5, margin=0.5), ValueError,
     r"r must lie in \[0, \(N - P\) // 2\] = \[0, 4\], got 5"),
    (lambda m: ops.pitome_match(m, 1, margin=0.5, num_prefix_tokens=10), ValueError,
     r"num_prefix_tokens must lie in \[0, N\] = \[0, 9\]"),
    (lambda m: ops.pitome_match(m, 1.0, margin=0.5), TypeError, "r must be an int"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 9, 4))


# ---- apply_pitome on timm ViTs -----------------------------------------------------------


def _vit(dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=3, embed_dim=64, num_heads=2, num_classes=5,
                              **kwargs)
    return model.to(DEVICE, dtype).eval()


def _pitome_reference_logits(model, images, r, margins):
    """PiToMe's code path on timm's modules, float64."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    prefix = model.num_prefix_tokens
    size = None
    for block, margin in zip(model.blocks, margins):
        attn = block.attn
        batch, tokens, _ = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        logits = q @ k.transpose(-1, -2) * attn.scale
        if size is not None:
            logits = logits + size.log()[:, None, None, :]
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, -1)
        x = x + block.ls1(attn.proj(out))
        if size is None:
            size = torch.ones(batch, tokens, dtype=x.dtype, device=x.device)
        count = tokens - prefix
        step = min(r, count // 2)
        if step:
            metric = k.mean(1)[:, prefix:]
            energy = _energy_oracle(metric, margin, 1.0)
            order = energy.argsort(dim=1, descending=True, stable=True)
            a, b, kept = order[:, 0:2 * step:2], order[:, 1:2 * step:2], order[:, 2 * step:]
            unit = metric / metric.norm(dim=-1, keepdim=True)
            dim = unit.shape[-1]
            sims = (unit.gather(1, a[..., None].expand(-1, -1, dim))
                    @ unit.gather(1, b[..., None].expand(-1, -1, dim)).transpose(1, 2))
            dst = sims.argmax(-1)

            def merge(t):  # (B, N, c) summed into [prefix, kept, b]
                body = t[:, prefix:]
                c = t.shape[-1]
                src = body.gather(1, a[..., None].expand(-1, -1, c))
                dst_rows = body.gather(1, b[..., None].expand(-1, -1, c))
                dst_rows = dst_rows.scatter_reduce(1, dst[..., None].expand(-1, -1, c), src, "sum")
                protected = body.gather(1, kept[..., None].expand(-1, -1, c))
                return torch.cat([t[:, :prefix], protected, dst_rows], dim=1)

            x = merge(x * size[..., None])
            size = merge(size[..., None])[..., 0]
            x = x / size[..., None]
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("kwargs", [dict(), dict(reg_tokens=2), dict(init_values=0.1)])
@pytest.mark.parametrize("r", [2, 8])
def test_apply_pitome_matches_reference(kwargs, r):
    model = _vit(**kwargs)
    images = random_tensor(2, 3, 32, 32, dtype=torch.float64, device=DEVICE, generator=_gen(2))
    margins = ops.pitome_margins(3)
    expected = _pitome_reference_logits(copy.deepcopy(model), images, r, margins)
    handle = fastvl_timm.apply_pitome(model, r, backend="torch")
    tokens = 16
    for _ in range(3):
        tokens -= min(r, tokens // 2)
    assert model.forward_features(images).shape[1] == model.num_prefix_tokens + tokens
    torch.testing.assert_close(model(images), expected, rtol=1e-9, atol=1e-10)
    assert handle.remove() and not hasattr(model, "r")


def test_apply_pitome_triton_avg_pool_and_compile():
    """The Triton energy (interpreted on CPU) picks the torch backend's tokens; a mean pool
    sees the merged tokens expanded back (size-weighted); compiles with fullgraph=True."""
    model = _vit(torch.float32, class_token=False, global_pool="avg")
    images = random_tensor(2, 3, 32, 32, device=DEVICE, generator=_gen(4))
    fastvl_timm.apply_pitome(model, 3, backend="torch")
    expected = model(images)
    assert model.forward_features(images).shape[1] == 16  # expanded back for the mean
    fastvl_timm.remove_token_reduction(model)
    require_backend("pitome_energy", "triton")
    fastvl_timm.apply_pitome(model, 3, backend="triton")
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5)
    fastvl_timm.remove_token_reduction(model)
    fastvl_timm.apply_pitome(model, 3)  # auto: AOT tracing of interpreted kernels is GPU-only
    compiler = "aot_eager" if DEVICE.type == "cpu" else "inductor"
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(margins=[0.5, 0.4]), ValueError, r"margins must be 3 finite numbers"),
    (dict(margins=[0.5, math.nan, 0.1]), ValueError, r"margins must be 3 finite numbers"),
    (dict(alpha="one"), TypeError, r"alpha must be a finite number"),
    (dict(prop_attn=1), TypeError, r"prop_attn must be a bool"),
])
def test_apply_pitome_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastvl_timm.apply_pitome(_vit(), 2, **kwargs)
