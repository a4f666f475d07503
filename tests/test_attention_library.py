"""Library kernels registered as attention implementations: sdpa, flash_attn, xformers.

``sdpa`` runs here and is checked against a float64 reference written below. flash-attn and
xformers need a GPU; their adapters (layouts, GQA, causal alignment, argument passing) are
checked on CPU against stand-in modules that implement the libraries' documented interfaces
in float64 ((B, N, H, D) tensors, bottom-right causal, GQA by head groups).
"""

import math
import sys
import types

import pytest
import torch

from fastvl.ops import BackendNotSupportedError, attention, library_attention, registry
from fastvl.ops import varlen_attention
from fastvl.testing import random_tensor


def reference(q, k, v, *, causal=False, bias=None, scale=None):
    """float64 softmax(q k^T * scale + bias + causal mask) v; (B, H, Nq, D), GQA by groups;
    a row that sees no key gives 0."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        logits = logits + bias.double()
    if causal:
        num_queries, num_keys = q.shape[2], k.shape[2]
        rows = torch.arange(num_queries).unsqueeze(1)
        future = torch.arange(num_keys).unsqueeze(0) > rows + (num_keys - num_queries)
        logits = logits.masked_fill(future, -math.inf)
    empty = torch.isneginf(logits).all(-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return probs @ v


@pytest.mark.parametrize("num_queries,num_keys,kv_heads,causal", [
    (7, 7, 4, False), (7, 7, 2, True), (3, 9, 1, True), (1, 197, 4, True), (197, 197, 2, False),
])
def test_sdpa_backend_matches_float64_reference(num_queries, num_keys, kv_heads, causal):
    q = random_tensor(2, 4, num_queries, 32)
    k, v = (random_tensor(2, kv_heads, num_keys, 32) for _ in range(2))
    out = attention(q, k, v, causal=causal, backend="sdpa")
    expected = reference(q, k, v, causal=causal)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_sdpa_backend_dense_masks_key_bias_and_grads():
    q, k, v = (random_tensor(2, 2, 9, 16, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 9, 9) > 0.3
    mask[..., 0] = True  # every row sees a key
    float_mask = random_tensor(1, 2, 9, 9)
    key_bias = random_tensor(2, 9)
    key_bias[1, :] = -math.inf  # sample 1 sees no key: 0 on CPU
    for backend in ("sdpa", "torch"):
        out = attention(q, k, v, attn_mask=mask, causal=True, backend=backend)
        bool_bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf)
        torch.testing.assert_close(out.double(), reference(q, k, v, causal=True, bias=bool_bias),
                                   rtol=1e-5, atol=1e-5)
        out = attention(q, k, v, attn_mask=float_mask, key_bias=key_bias, backend=backend)
        bias = float_mask.double() + key_bias.double()[:, None, None, :]
        expected = reference(q, k, v, bias=bias)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-5)


def test_dropout_is_unbiased_on_sdpa_and_torch():
    q, k, v = (random_tensor(1, 2, 5, 8) for _ in range(3))
    expected = reference(q, k, v)
    for backend in ("sdpa", "torch"):
        torch.manual_seed(0)
        samples = torch.stack([
            attention(q, k, v, dropout_p=0.5, backend=backend).double() for _ in range(3000)
        ])
        assert not torch.allclose(samples[0], expected, atol=1e-3)  # dropout happened
        torch.testing.assert_close(samples.mean(0), expected, rtol=0, atol=0.08)


def test_sdpa_refuses_what_it_cannot_express():
    q = random_tensor(1, 2, 5, 8)
    with pytest.raises(BackendNotSupportedError) as info:
        attention(q, q, q, causal=True, causal_strength=0.5, prefix_len=2, return_lse=True,
                  backend="sdpa")
    assert info.value.reasons == [
        "a soft causal mask (causal_strength < 1): not supported by sdpa",
        "prefix-LM masking (prefix_len): not supported by sdpa",
        "the log-sum-exp output (return_lse=True): not supported by sdpa",
    ]
    with pytest.raises(BackendNotSupportedError, match="attn_mask .*: not supported by triton"):
        attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool), backend="triton")
    with pytest.raises(ValueError, match="attn_mask of shape \\(3, 3\\) does not broadcast"):
        attention(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p must lie in \\[0, 1\\)"):
        attention(q, q, q, dropout_p=1.0)


# ---- stand-ins for flash-attn and xformers -----------------------------------------------


def _bnhd_reference(q, k, v, causal, scale):
    """A library's (B, N, H, D) call through the float64 reference."""
    out = reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                    scale=scale)
    return out.transpose(1, 2).to(q.dtype)


def _fake_flash_attn(calls):
    module = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                        deterministic=False):
        assert q.stride(-1) == 1 and q.dim() == 4 and dropout_p == 0.0
        calls.append("flash_attn_func")
        return _bnhd_reference(q, k, v, causal, softmax_scale)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False,
                               deterministic=False):
        calls.append("flash_attn_varlen_func")
        out = torch.empty_like(q)
        for b in range(cu_seqlens_q.shape[0] - 1):
            qs = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
            ks = slice(int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1]))
            out[qs] = _bnhd_reference(q[None, qs], k[None, ks], v[None, ks], causal,
                                      softmax_scale)[0]
        return out

    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def _fake_xformers(calls):
    package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")

    class LowerTriangularFromBottomRightMask:
        pass

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        calls.append(query.dim())
        causal = isinstance(attn_bias, LowerTriangularFromBottomRightMask)
        if query.dim() == 5:  # (B, N, G, H, D): flatten the groups into heads
            flat = [t.reshape(t.shape[0], t.shape[1], -1, t.shape[-1]) for t in (query, key, value)]
            return _bnhd_reference(*flat, causal, scale).reshape(query.shape)
        return _bnhd_reference(query, key, value, causal, scale)

    ops.memory_efficient_attention = memory_efficient_attention
    ops.fmha = types.SimpleNamespace(attn_bias=types.SimpleNamespace(
        LowerTriangularFromBottomRightMask=LowerTriangularFromBottomRightMask))
    package.ops = ops
    return {"xformers": package, "xformers.ops": ops}


@pytest.fixture
def libraries(monkeypatch):
    """flash_attn and xformers importable (stand-ins), on a simulated GPU."""
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn(calls))
    for name, module in _fake_xformers(calls).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(registry, "_LIBRARY_IMPORT_ERRORS", {})
    monkeypatch.setattr(library_attention, "_MODULES", {})
    with registry.simulate_gpu_dispatch("9.0"):
        yield calls


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
@pytest.mark.parametrize("num_queries,num_keys,kv_heads,causal", [
    (7, 7, 4, True), (3, 9, 2, True), (197, 197, 1, False), (1, 33, 2, True),
])
def test_library_adapters(libraries, backend, num_queries, num_keys, kv_heads, causal):
    q = random_tensor(2, 4, num_queries, 32, dtype=torch.float16)
    k, v = (random_tensor(2, kv_heads, num_keys, 32, dtype=torch.float16) for _ in range(2))
    out = attention(q, k, v, causal=causal, scale=0.2, backend=backend)
    assert libraries and out.shape == q.shape
    expected = reference(q, k, v, causal=causal, scale=0.2)
    torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=2e-3)


def test_flash_attn_varlen_adapter(libraries):
    # Sequences of 3/4, 1/1 and 5/5 query/key tokens.
    cu_q = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 5, 10], dtype=torch.int32)
    q = random_tensor(9, 4, 16, dtype=torch.bfloat16)
    k, v = (random_tensor(10, 2, 16, dtype=torch.bfloat16) for _ in range(2))
    out = varlen_attention(q, k, v, cu_q, cu_k, 5, 5, causal=True, backend="flash_attn")
    assert libraries == ["flash_attn_varlen_func"]
    for b in range(3):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        expected = reference(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None],
                             v[ks].transpose(0, 1)[None], causal=True)
        torch.testing.assert_close(out[qs].double(), expected[0].transpose(0, 1),
                                   rtol=2e-2, atol=2e-2)


def test_auto_on_a_gpu_takes_flash_attn_where_it_serves(libraries):
    q = random_tensor(1, 4, 8, 32, dtype=torch.float16)
    k = random_tensor(1, 2, 8, 32, dtype=torch.float16)
    attention_op = registry.OPS["attention"]
    plain = (q, k, k, None, None, 0.2, True, 1.0, False, None, 0.0)
    assert attention_op.select("auto", q.device, *plain) is attention_op.impls["flash_attn"].fn
    with_bias = (q, k, k, torch.zeros(1, 8), None, 0.2, True, 1.0, False, None, 0.0)
    chosen = attention_op.select("auto", q.device, *with_bias)
    assert chosen is attention_op.impls["triton" if not registry.TRITON_IMPORT_ERROR else "torch"].fn
    # float32 is not flash-attn's: the next library in the GPU order (SDPA) serves it.
    q32, k32 = q.float(), k.float()
    fp32 = (q32, k32, k32, None, None, 0.2, True, 1.0, False, None, 0.0)
    assert attention_op.select("auto", q.device, *fp32) is attention_op.impls["sdpa"].fn


def test_sdpa_backend_gradcheck():
    q = random_tensor(1, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    k, v = (random_tensor(1, 2, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    key_bias = random_tensor(1, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: attention(q, k, v, causal=True, key_bias=b, backend="sdpa"),
        (q, k, v, key_bias),
    )
