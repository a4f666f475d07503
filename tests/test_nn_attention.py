"""fastvl.nn.Attention against timm.layers.Attention (timm 1.0): construction, state dicts,
forward/backward, masks, key_bias, the dropout route, from_timm sharing, bad inputs.

torch-backend outputs are compared with timm's in float32 (same SDPA math: tight tolerance).
The triton backend (interpreter on CPU, float32) follows the flash-attn rule: its error against
timm run in float64 is at most 2x (outputs) / 3x (gradients) the error of timm in float32,
plus a small floor. Shapes are tiny and odd (N = 13 tokens) to keep the interpreter quick.
"""

from __future__ import annotations

import pytest
import torch
from timm.layers import Attention as TimmAttention
from torch import nn

from fastvl.nn import Attention
from fastvl.ops import BackendNotSupportedError
from fastvl.testing import assert_within_reference_error, poison_outputs, random_tensor
from tests.conftest import DEVICE, own_backends, require_backend

BATCH, TOKENS, DIM, HEADS = 2, 13, 64, 2
CONFIGS = {
    "plain": dict(dim=DIM, num_heads=HEADS),
    "qk_norm_scale_norm_gated": dict(dim=DIM, num_heads=HEADS, qkv_bias=True, qk_norm=True,
                                     scale_norm=True, gated=True, norm_layer=nn.LayerNorm),
    "head_dim_dim_out": dict(dim=DIM, num_heads=4, attn_head_dim=8, dim_out=48,
                             proj_bias=False),
}
# Same math in float32: roundoff only. On CUDA, "auto" means the triton kernels against timm's
# SDPA kernels (other summation orders), hence the looser bound there.
TIGHT = dict(rtol=1e-5, atol=1e-6) if DEVICE.type == "cpu" else dict(rtol=1e-4, atol=2e-5)


def _pair(config="plain", backend="torch", seed=0, **overrides):
    """(timm Attention, fastvl Attention) built from one seed: identical parameters."""
    kwargs = {**CONFIGS[config], **overrides}
    torch.manual_seed(seed)
    reference = TimmAttention(**kwargs, device=DEVICE)
    torch.manual_seed(seed)
    fast = Attention(**kwargs, device=DEVICE, backend=backend)
    return reference, fast


def _tokens(seed=1, batch=BATCH, tokens=TOKENS, dim=DIM):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return random_tensor(batch, tokens, dim, device=DEVICE, generator=g)


def _run(module, x, **kwargs):
    """Output and the gradients of (x, parameters...) for a random output gradient."""
    x = x.detach().clone().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    out = module(x, **kwargs)
    g = torch.Generator(device=DEVICE).manual_seed(99)
    out.backward(random_tensor(*out.shape, dtype=out.dtype, device=DEVICE, generator=g))
    return out.detach(), [x.grad] + [p.grad for p in module.parameters()]


def _assert_same_result(actual, expected, **tol):
    out, grads = actual
    ref_out, ref_grads = expected
    torch.testing.assert_close(out, ref_out, **tol)
    assert len(grads) == len(ref_grads)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **tol)


@pytest.mark.parametrize("config", CONFIGS)
def test_same_parameters_and_state_dict_as_timm(config):
    reference, fast = _pair(config)
    ref_state, fast_state = reference.state_dict(), fast.state_dict()
    assert list(fast_state) == list(ref_state)
    for key in ref_state:
        assert torch.equal(fast_state[key], ref_state[key]), key
    # Strict loading both ways, from modules with other values.
    other_reference, other_fast = _pair(config, seed=5)
    fast.load_state_dict(other_reference.state_dict(), strict=True)
    reference.load_state_dict(other_fast.state_dict(), strict=True)
    for key, value in other_reference.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value)
        assert torch.equal(reference.state_dict()[key], value)


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_backward_match_timm(config):
    reference, fast = _pair(config)
    x = _tokens()
    _assert_same_result(_run(fast, x), _run(reference, x), **TIGHT)


def test_triton_backend_matches_timm_float64():
    require_backend("attention", "triton")
    reference, fast = _pair("qk_norm_scale_norm_gated", backend="triton")
    x = _tokens()
    with poison_outputs():
        out, grads = _run(fast, x)
    ref_out, ref_grads = _run(reference.double(), x.double())
    low_out, low_grads = _run(reference.float(), x)
    assert_within_reference_error(out, ref_out, low_out, factor=2, atol=1e-5)
    for i, (grad, ref_grad, low_grad) in enumerate(zip(grads, ref_grads, low_grads)):
        assert_within_reference_error(grad, ref_grad, low_grad, factor=3, atol=1e-5,
                                      name=f"grad {i}")


def test_from_timm_shares_parameters():
    reference, _ = _pair("qk_norm_scale_norm_gated")
    reference.eval()
    fast = Attention.from_timm(reference, backend="torch")
    assert fast.backend == "torch" and not fast.training
    assert list(fast.state_dict()) == list(reference.state_dict())
    for (name, p), (ref_name, ref_p) in zip(fast.named_parameters(), reference.named_parameters()):
        assert name == ref_name and p is ref_p
    x = _tokens()
    with torch.no_grad():
        reference.qkv.weight.mul_(1.5)  # seen by both
    torch.testing.assert_close(fast(x), reference(x), **TIGHT)
    with pytest.raises(TypeError, match="timm.layers.Attention"):
        Attention.from_timm(nn.Linear(4, 4))

    class SubclassedAttention(TimmAttention):
        pass

    with pytest.raises(TypeError, match="SubclassedAttention"):
        Attention.from_timm(SubclassedAttention(DIM, HEADS))


def _key_mask(shape=(BATCH, 1, 1, TOKENS), dtype=torch.bool, seed=3):
    """A per-key mask (query dim 1): bool (a few keys hidden) or float (random biases)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    if dtype == torch.bool:
        mask = torch.rand(*shape, generator=g, device=DEVICE) > 0.3
        mask[..., 0] = True  # every query keeps a key (timm gives NaN otherwise)
        return mask
    return random_tensor(*shape, dtype=dtype, device=DEVICE, generator=g)


# Per-key masks, shared by the heads or not, with broadcast batch / head dims.
KEY_MASKS = {
    "bool_b11n": (torch.bool, (BATCH, 1, 1, TOKENS)),
    "float_bh1n": (torch.float32, (BATCH, HEADS, 1, TOKENS)),
    "float_1h1n": (torch.float32, (1, HEADS, 1, TOKENS)),
    "bool_1n": (torch.bool, (1, TOKENS)),
}


@pytest.mark.parametrize("backend", own_backends("attention"))
@pytest.mark.parametrize("mask_kind", KEY_MASKS)
def test_per_key_attn_mask_runs_on_the_op(backend, mask_kind):
    require_backend("attention", backend)
    # backend="triton" refuses the SDPA route, so passing here shows the mask went to the op.
    reference, fast = _pair(backend=backend)
    dtype, shape = KEY_MASKS[mask_kind]
    mask = _key_mask(shape, dtype)
    x = _tokens()
    tol = TIGHT if backend == "torch" else dict(rtol=1e-4, atol=1e-5)
    _assert_same_result(
        _run(fast, x, attn_mask=mask), _run(reference, x, attn_mask=mask), **tol
    )


def test_general_attn_mask_goes_to_sdpa():
    reference, fast = _pair()
    g = torch.Generator(device=DEVICE).manual_seed(4)
    mask = random_tensor(TOKENS, TOKENS, device=DEVICE, generator=g)  # differs per query
    x = _tokens()
    _assert_same_result(_run(fast, x, attn_mask=mask), _run(reference, x, attn_mask=mask),
                        **TIGHT)
    bool_mask = mask > -0.5
    bool_mask.fill_diagonal_(True)
    _assert_same_result(_run(fast, x, attn_mask=bool_mask),
                        _run(reference, x, attn_mask=bool_mask), **TIGHT)
    _, triton_fast = _pair(backend="triton")
    with pytest.raises(BackendNotSupportedError, match="differs between queries"):
        triton_fast(x, attn_mask=mask)


def test_causal_alone_and_with_masks():
    reference, fast = _pair()
    x = _tokens()
    _assert_same_result(_run(fast, x, is_causal=True), _run(reference, x, is_causal=True),
                        **TIGHT)
    # Both a causal mask and attn_mask apply (timm's SDPA path refuses the pair): compare with
    # timm given their sum as one float mask, for a per-key (op) and a general (SDPA) mask.
    causal = torch.full((TOKENS, TOKENS), float("-inf"), device=DEVICE).triu(1)
    g = torch.Generator(device=DEVICE).manual_seed(6)
    for mask in (_key_mask(dtype=torch.float32),
                 random_tensor(TOKENS, TOKENS, device=DEVICE, generator=g)):
        _assert_same_result(_run(fast, x, attn_mask=mask, is_causal=True),
                            _run(reference, x, attn_mask=mask + causal), **TIGHT)


@pytest.mark.parametrize("shape", ["b", "bh"])
def test_key_bias_equals_a_float_key_mask(shape):
    reference, fast = _pair()
    x = _tokens()
    g = torch.Generator(device=DEVICE).manual_seed(7)
    bias_shape = (BATCH, TOKENS) if shape == "b" else (BATCH, HEADS, TOKENS)
    key_bias = random_tensor(*bias_shape, device=DEVICE, generator=g, requires_grad=True)
    mask = key_bias.detach().clone().requires_grad_(True)
    as_mask = mask.view(BATCH, 1, 1, TOKENS) if shape == "b" else mask.unsqueeze(2)
    _assert_same_result(_run(fast, x, key_bias=key_bias),
                        _run(reference, x, attn_mask=as_mask), **TIGHT)
    torch.testing.assert_close(key_bias.grad, mask.grad, **TIGHT)
    # With a per-key attn_mask of the other layout (op route), the two add up.
    key_mask = _key_mask((BATCH, HEADS if shape == "b" else 1, 1, TOKENS))
    key_mask_bias = torch.zeros(key_mask.shape, device=DEVICE).masked_fill(~key_mask, -torch.inf)
    _assert_same_result(_run(fast, x, key_bias=key_bias.detach(), attn_mask=key_mask),
                        _run(reference, x, attn_mask=as_mask.detach() + key_mask_bias), **TIGHT)
    # With a general attn_mask (SDPA route) too.
    general = random_tensor(TOKENS, TOKENS, device=DEVICE, generator=g)
    _assert_same_result(_run(fast, x, key_bias=key_bias.detach(), attn_mask=general),
                        _run(reference, x, attn_mask=as_mask.detach() + general), **TIGHT)


def test_attention_dropout_in_training_follows_timm():
    reference, fast = _pair(attn_drop=0.4)
    reference.train(), fast.train()
    x = _tokens()
    torch.manual_seed(11)
    expected = _run(reference, x)
    torch.manual_seed(11)
    actual = _run(fast, x)
    _assert_same_result(actual, expected, **TIGHT)
    torch.manual_seed(12)
    other = fast(x)
    assert not torch.allclose(other, actual[0]), "dropout did not act"
    # Eval mode: no dropout, the op runs (triton included).
    reference.eval()
    _, triton_fast = _pair(attn_drop=0.4, backend="triton")
    triton_fast.eval()
    torch.testing.assert_close(triton_fast(x), reference(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(BackendNotSupportedError, match="dropout"):
        triton_fast.train()(x)


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    reference, fast = _pair("qk_norm_scale_norm_gated")
    compiled = torch.compile(fast, fullgraph=True,
                             backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    x = _tokens()
    key_bias = random_tensor(BATCH, TOKENS, device=DEVICE)
    as_mask = key_bias.view(BATCH, 1, 1, TOKENS)
    torch.testing.assert_close(compiled(x, key_bias=key_bias),
                               reference(x, attn_mask=as_mask), rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    _, fast = _pair()
    x = _tokens()
    with pytest.raises(ValueError, match="backend"):
        Attention(DIM, HEADS, backend="cuda")
    with pytest.raises(ValueError, match="divisible"):
        Attention(DIM, 3)
    with pytest.raises(ValueError, match="norm_layer"):
        Attention(DIM, HEADS, qk_norm=True)
    with pytest.raises(ValueError, match=r"x must be a \(B, N, C\)"):
        fast(x[0])
    with pytest.raises(TypeError, match="is_causal"):
        fast(x, is_causal=1)
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        fast(x, attn_mask=torch.ones(TOKENS, dtype=torch.int64))
    with pytest.raises(TypeError, match="attn_mask must be a torch.Tensor"):
        fast(x, attn_mask=[1.0])
    with pytest.raises(ValueError, match=r"attn_mask must broadcast to \(B, H, N, N\)"):
        fast(x, attn_mask=torch.ones(3, 1, 1, TOKENS, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_bias must be \(B, N\)"):
        fast(x, key_bias=torch.zeros(BATCH, TOKENS + 1))
    with pytest.raises(TypeError, match="key_bias must be floating"):
        fast(x, key_bias=torch.zeros(BATCH, TOKENS, dtype=torch.int64))
