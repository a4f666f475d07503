"""fastvl.patch.timm on tiny random-init timm ViTs (never pretrained weights).

Patched and unpatched models run the same inputs: float32 on the torch backend must agree to
roundoff (outputs, input and parameter gradients, and over 5 optimizer steps); the triton
backend (interpreter on CPU) follows the flash-attn rule against the unpatched model in
float64 (2x / 3x the error of the unpatched float32 model, plus a floor).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import Attention as TimmAttention
from timm.layers import AttentionRope, DiffAttention
from timm.models.vision_transformer import ParallelThingsBlock, ResPostBlock
from torch import nn

import fastvl.patch.timm as fastvl_timm
from fastvl.nn import Attention
from fastvl.ops import BackendNotSupportedError
from fastvl.testing import assert_within_reference_error, poison_outputs, random_tensor
from tests.conftest import DEVICE, require_backend

BATCH, IMG = 2, 24  # 3 x 3 patches of 8 px
# Same math in float32: roundoff only. On CUDA, "auto" means the triton kernels against timm's
# SDPA kernels (other summation orders), hence the looser bound there.
TIGHT = dict(rtol=1e-5, atol=1e-6) if DEVICE.type == "cpu" else dict(rtol=1e-4, atol=2e-5)
VARIANTS = {
    "plain": dict(),
    "qk_norm": dict(qk_norm=True),
    "layerscale": dict(init_values=0.1),
    "registers_no_embed_class": dict(reg_tokens=3, no_embed_class=True),
    "avg_pool_no_class_token": dict(class_token=False, global_pool="avg"),
    "res_post_block": dict(block_fn=ResPostBlock, init_values=0.5),
    "parallel_things_block": dict(block_fn=ParallelThingsBlock),
    "distilled": dict(name="deit_tiny_distilled_patch16_224"),
}


def _vit(seed=0, name="vit_tiny_patch16_224", **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(
        name, pretrained=False, img_size=IMG, patch_size=8, depth=2, embed_dim=64,
        num_heads=2, num_classes=5, **kwargs,
    )
    return model.to(DEVICE)


def _images(seed=1, batch=BATCH):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return random_tensor(batch, 3, IMG, IMG, device=DEVICE, generator=g)


def _run(model, x, **kwargs):
    """Output and the gradients of (x, parameters...) for a fixed random output gradient."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x, **kwargs)
    g = torch.Generator(device=DEVICE).manual_seed(99)
    out.backward(random_tensor(*out.shape, dtype=out.dtype, device=DEVICE, generator=g))
    return out.detach(), [x.grad] + [p.grad for p in model.parameters()]


def _assert_same_result(actual, expected, **tol):
    (out, grads), (ref_out, ref_grads) = actual, expected
    torch.testing.assert_close(out, ref_out, **tol)
    assert len(grads) == len(ref_grads)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **tol)


def _timm_attentions(model):
    return [m for m in model.modules() if type(m) is TimmAttention]


@pytest.mark.parametrize("variant", VARIANTS)
def test_patched_equals_unpatched_and_remove_restores(variant):
    model = _vit(**VARIANTS[variant])
    x = _images()
    expected = _run(model, x)
    originals = dict(model.named_modules())
    state_keys = list(model.state_dict())
    parameters = list(model.parameters())
    num_attention = len(_timm_attentions(model))
    assert num_attention >= 2

    handle = fastvl_timm.apply(model, backend="torch")
    assert len(handle.replaced) == num_attention and handle.skipped == []
    assert not _timm_attentions(model)
    for name in handle.replaced:
        patched = model.get_submodule(name)
        assert isinstance(patched, Attention) and patched.backend == "torch"
    assert list(model.state_dict()) == state_keys
    assert all(p is q for p, q in zip(model.parameters(), parameters))
    _assert_same_result(_run(model, x), expected, **TIGHT)

    assert sorted(fastvl_timm.remove(model)) == sorted(handle.replaced)
    assert dict(model.named_modules()).keys() == originals.keys()
    assert all(module is originals[name] for name, module in model.named_modules())
    _assert_same_result(_run(model, x), expected, **TIGHT)


def test_triton_backend_matches_float64():
    require_backend("attention", "triton")
    model = _vit(reg_tokens=2, qk_norm=True, init_values=0.1)  # N = 9 + 3 tokens
    x = _images()
    reference64 = _run(copy.deepcopy(model).double(), x.double())
    low_precision = _run(model, x)
    fastvl_timm.apply(model, backend="triton")
    with poison_outputs():
        out, grads = _run(model, x)
    assert_within_reference_error(out, reference64[0], low_precision[0], factor=2, atol=1e-5)
    for i, (grad, ref, low) in enumerate(zip(grads, reference64[1], low_precision[1])):
        assert_within_reference_error(grad, ref, low, factor=3, atol=1e-5, name=f"grad {i}")


def test_attn_mask_through_the_model():
    model = _vit(reg_tokens=1).eval()
    x = _images()
    tokens = 9 + 2
    key_mask = torch.ones(BATCH, 1, 1, tokens, dtype=torch.bool, device=DEVICE)
    key_mask[0, ..., 5:] = False  # sample 0: hide its last patches (padding)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    general = random_tensor(tokens, tokens, device=DEVICE, generator=g)
    expected = [model.forward_features(x, attn_mask=m) for m in (key_mask, general)]
    expected_causal = model.forward_features(x, is_causal=True)
    fastvl_timm.apply(model)
    for mask, ref in zip((key_mask, general), expected):
        torch.testing.assert_close(model.forward_features(x, attn_mask=mask), ref, **TIGHT)
    torch.testing.assert_close(model.forward_features(x, is_causal=True), expected_causal, **TIGHT)


def test_attention_dropout_in_training():
    model = _vit(attn_drop_rate=0.3)
    x = _images()
    torch.manual_seed(5)
    expected = _run(model, x)
    fastvl_timm.apply(model)
    torch.manual_seed(5)
    _assert_same_result(_run(model, x), expected, **TIGHT)
    fastvl_timm.remove(model)
    fastvl_timm.apply(model, backend="triton")
    with pytest.raises(BackendNotSupportedError, match="dropout"):
        model(x)


def test_state_dict_round_trip_strict():
    patched, plain = _vit(seed=0), _vit(seed=1)
    fastvl_timm.apply(patched)
    x = _images()
    plain.load_state_dict(patched.state_dict(), strict=True)
    torch.testing.assert_close(plain(x), patched(x), **TIGHT)
    patched.load_state_dict(_vit(seed=2).state_dict(), strict=True)
    plain.load_state_dict(_vit(seed=2).state_dict(), strict=True)
    torch.testing.assert_close(patched(x), plain(x), **TIGHT)


def test_timm_accepts_fastvl_attention_as_attn_layer():
    native = _vit(attn_layer=Attention)
    assert len([m for m in native.modules() if isinstance(m, Attention)]) == 2
    plain = _vit()
    assert list(native.state_dict()) == list(plain.state_dict())
    native.load_state_dict(plain.state_dict(), strict=True)
    x = _images()
    torch.testing.assert_close(native(x), plain(x), **TIGHT)
    report = fastvl_timm.apply(native)  # not patched by us: reported, left alone
    assert report.replaced == [] and {s.reason for s in report.skipped} == {
        "already a fastvl.nn.Attention"
    }


class _SubclassedAttention(TimmAttention):
    pass


def test_skipped_modules_are_reported_with_reasons():
    model = _vit(block_fn=timm.models.vision_transformer.ParallelScalingBlock, global_pool="map")
    report = fastvl_timm.apply(model)
    assert report.replaced == []
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"blocks.0", "blocks.1", "attn_pool"}
    assert "inline" in reasons["blocks.0"] and "pooling" in reasons["attn_pool"]

    container = nn.ModuleDict({
        "plain": TimmAttention(64, 2), "rope": AttentionRope(64, 2), "diff": DiffAttention(64, 2),
        "subclass": _SubclassedAttention(64, 2), "torch_mha": nn.MultiheadAttention(64, 2),
    })
    report = fastvl_timm.apply(container)
    assert report.replaced == ["plain"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"rope", "diff", "subclass", "torch_mha"}
    assert "rope" in reasons["rope"] and "differential" in reasons["diff"]
    assert "subclass" in reasons["subclass"] and "not timm.layers.Attention" in reasons["torch_mha"]
    assert "skipped rope" in str(report)


def test_patch_twice_remove_and_handles():
    model = _vit()
    first = fastvl_timm.apply(model)
    with pytest.raises(ValueError, match="already patched"):
        fastvl_timm.apply(model, backend="torch")
    assert first.remove() == ["blocks.0.attn", "blocks.1.attn"]
    assert first.remove() == [] and fastvl_timm.remove(model) == []
    second = fastvl_timm.apply(model, backend="torch")
    assert first.remove() == []  # a stale handle leaves the new patch alone
    assert isinstance(model.blocks[0].attn, Attention)
    # What changed on the patched modules carries over to the restored ones.
    patched_attention = model.blocks[1].attn
    wrapped_qkv = nn.Sequential(model.blocks[0].attn.qkv)
    model.blocks[0].attn.qkv = wrapped_qkv
    model.eval()
    assert fastvl_timm.remove(model) == second.replaced
    assert type(model.blocks[0].attn) is TimmAttention and model.blocks[0].attn.qkv is wrapped_qkv
    assert not any(m.training for m in model.modules())
    # A module put back by hand after remove() is a plain fastvl Attention, not a patch.
    model.blocks[1].attn = patched_attention
    assert fastvl_timm.apply(model).skipped[0].reason == "already a fastvl.nn.Attention"


def test_shared_module_and_deepcopy():
    shared = TimmAttention(64, 2)
    model = nn.Sequential(shared, nn.GELU(), shared)
    fastvl_timm.apply(model)
    assert isinstance(model[0], Attention) and model[0] is model[2]
    copied = copy.deepcopy(model)
    assert fastvl_timm.remove(copied) == ["0", "2"]
    assert copied[0] is copied[2] and type(copied[0]) is TimmAttention and copied[0] is not shared
    assert copied[0].qkv.weight is not shared.qkv.weight
    assert fastvl_timm.remove(model) == ["0", "2"] and model[0] is shared and model[2] is shared


def test_bad_arguments():
    model = _vit()
    with pytest.raises(ValueError, match="backend"):
        fastvl_timm.apply(model, backend="fast")
    assert _timm_attentions(model)  # untouched
    with pytest.raises(TypeError, match="nn.Module"):
        fastvl_timm.apply("vit")
    with pytest.raises(TypeError, match="nn.Module"):
        fastvl_timm.remove(None)
    with pytest.raises(ValueError, match="from_timm"):
        fastvl_timm.apply(TimmAttention(64, 2))


def test_training_converges_identically():
    """Liger-style: 5 AdamW steps with and without the patch, step by step."""
    base = _vit(init_values=0.1, reg_tokens=2)
    patched = copy.deepcopy(base)
    fastvl_timm.apply(patched, backend="torch")
    initial = [p.detach().clone() for p in base.parameters()]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (base, patched)]
    g = torch.Generator(device=DEVICE).manual_seed(3)
    for step in range(5):
        x = random_tensor(4, 3, IMG, IMG, device=DEVICE, generator=g)
        labels = torch.randint(0, 5, (4,), device=DEVICE, generator=g)
        losses = []
        for model, optimizer in zip((base, patched), optimizers):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], **TIGHT, msg=f"loss at step {step}")
        for (name, p), q in zip(base.named_parameters(), patched.parameters()):
            torch.testing.assert_close(q, p, **TIGHT, msg=f"{name} at step {step}")
    # It did train: every parameter moved, attention's included.
    assert all(not torch.equal(p, p0) for p, p0 in zip(base.parameters(), initial))
