"""varlen_attention on every backend against a per-sequence float64 reference.

The oracle (:func:`_per_sequence`) runs the independent reference of
``tests/samples_attention.py`` (not fastvl.reference, the torch backend) on each packed
sequence alone, which is the contract. Tolerance rule as in test_attention.py (flash-attn's):
max error vs the float64 oracle <= 2x (forward) / 3x (gradients) the error of the same
written-out math run in the inputs' dtype, plus a small floor. Outputs are
poisoned (NaN) first, so an element no program writes fails.

The interpreter's blocks are 32 / 16 (queries / keys, forward and dQ) and 16 / 32 (dK/dV), so
the lengths below (0, 1, 15, 16, 17, 31, 33, 40) straddle every block size; bf16 and large
shapes are `gpu` tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastvl.ops import BackendNotSupportedError, attention, varlen_attention
from fastvl.testing import (
    ERROR_FLOOR,
    assert_grads_within_reference_error,
    assert_lse_within_reference_error,
    assert_opcheck,
    assert_within_reference_error,
    poison_outputs,
    random_tensor,
)
from tests.conftest import DEVICE, require_backend
from tests.samples_attention import forward_tile_configs, reference_attention

ALL_BACKENDS = ("torch", "triton")


def _cu_seqlens(lengths, device=DEVICE):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def _make_packed(lengths_q, lengths_k, heads, kv_heads, head_dim, dtype, seed, bias=None,
                 device=DEVICE):
    """q, k, v, key_bias (None, "shared" (total_k,) or "heads" (total_k, H)), cu_q, cu_k."""
    g = torch.Generator(device=device).manual_seed(seed)
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    q = random_tensor(total_q, heads, head_dim, dtype=dtype, device=device, generator=g)
    k = random_tensor(total_k, kv_heads, head_dim, dtype=dtype, device=device, generator=g)
    v = random_tensor(total_k, kv_heads, head_dim, dtype=dtype, device=device, generator=g)
    key_bias = None
    if bias is not None:
        shape = (total_k,) if bias == "shared" else (total_k, heads)
        key_bias = random_tensor(*shape, dtype=dtype, device=device, generator=g)
    return q, k, v, key_bias, _cu_seqlens(lengths_q, device), _cu_seqlens(lengths_k, device)


def _per_sequence(q, k, v, key_bias, cu_q, cu_k, prefix_len=None, low=False, **masks):
    """(out (total_q, H, D), lse (total_q, H)): the reference on each sequence alone, in
    float64 (or ``low``: in the inputs' dtype)."""
    outs, lses = [], []
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bounds_q) - 1):
        rows = slice(bounds_q[b], bounds_q[b + 1])
        keys = slice(bounds_k[b], bounds_k[b + 1])
        bias = None
        if key_bias is not None:
            bias = key_bias[keys].unsqueeze(0) if key_bias.dim() == 1 else key_bias[keys].T[None]
        out, lse = reference_attention(
            q[rows].transpose(0, 1)[None], k[keys].transpose(0, 1)[None],
            v[keys].transpose(0, 1)[None], key_bias=bias,
            prefix_len=None if prefix_len is None else prefix_len[b:b + 1], low=low, **masks,
        )
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].T)
    return torch.cat(outs), torch.cat(lses)


def _check(backend, lengths_q, lengths_k, heads, kv_heads, head_dim, dtype, *, bias=None,
           grads=True, seed=0, extra_max_seqlen=0, make_inputs=None, **masks):
    """Forward (out, lse) and backward (q, k, v, key_bias; through out and lse) vs float64."""
    if make_inputs is None:
        q, k, v, key_bias, cu_q, cu_k = _make_packed(lengths_q, lengths_k, heads, kv_heads,
                                                     head_dim, dtype, seed, bias)
    else:
        q, k, v, key_bias, cu_q, cu_k = make_inputs()
    inputs = [q, k, v] + ([key_bias] if key_bias is not None else [])
    leaves = [t.detach().clone().requires_grad_(grads) for t in inputs]
    max_q, max_k = max(lengths_q) + extra_max_seqlen, max(lengths_k) + extra_max_seqlen
    with poison_outputs():
        out, lse = varlen_attention(
            *leaves[:3], cu_q, cu_k, max_q, max_k,
            key_bias=leaves[3] if key_bias is not None else None,
            return_lse=True, backend=backend, **masks,
        )
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.shape == q.shape[:2]

    ref_masks = dict(masks)
    if isinstance(masks.get("prefix_len"), int):
        ref_masks["prefix_len"] = torch.full((len(lengths_q),), masks["prefix_len"])

    def reference(ins, low):
        return _per_sequence(*ins[:3], ins[3] if len(ins) > 3 else None, cu_q, cu_k, low=low,
                             **ref_masks)

    ins64 = [t.detach().double().requires_grad_(grads) for t in inputs]
    ins_low = [t.detach().clone().requires_grad_(grads) for t in inputs]
    out64, lse64 = reference(ins64, low=False)
    out_low, lse_low = reference(ins_low, low=True)
    assert_within_reference_error(out, out64, out_low, factor=2, atol=ERROR_FLOOR[dtype], name="out")
    assert_lse_within_reference_error(lse, lse64, lse_low, dtype)
    if not grads:
        return

    g = torch.Generator(device=DEVICE).manual_seed(seed + 1000)
    grad_out = random_tensor(*out.shape, dtype=dtype, device=DEVICE, generator=g)
    grad_lse = random_tensor(*lse.shape, dtype=torch.float32, device=DEVICE, generator=g)
    with poison_outputs():
        got = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse))
    want64 = torch.autograd.grad((out64, lse64), ins64, (grad_out.double(), grad_lse.double()))
    want_low = torch.autograd.grad((out_low, lse_low), ins_low, (grad_out, grad_lse))
    assert_grads_within_reference_error(
        ("dq", "dk", "dv", "dkey_bias"), got, want64, want_low, atol=ERROR_FLOOR[dtype] * 10
    )


# ---- the interpreter / GPU sweep ---------------------------------------------------------

# (lengths_q, lengths_k, heads, kv_heads, D, dtype, options). Lengths include 0 and 1 and
# straddle the block sizes; Nq_b != Nk_b in every causal case.
SWEEP = [
    ((0, 1, 17, 33, 5), (3, 0, 1, 31, 40), 4, 2, 32, torch.float32, dict(bias="heads")),
    ((7, 33, 1, 0, 16), (16, 17, 1, 5, 15), 2, 1, 64, torch.float16,
     dict(causal=True, bias="shared")),
    ((20, 15, 1, 33), (9, 40, 2, 33), 4, 1, 80, torch.float32,
     dict(causal=True, causal_strength=0.7, prefix_len=(3, 0, 5, 40), bias="heads")),
    ((31, 2, 0, 17), (17, 32, 4, 1), 2, 2, 16, torch.float16,
     dict(causal=True, prefix_len=(0, 30, 2, 1), bias="heads")),
]


def _sweep_id(case):
    lengths_q, lengths_k, heads, kv_heads, head_dim, dtype, opts = case
    tag = "-".join(f"{k}={v}" for k, v in opts.items() if k != "prefix_len")
    tag += "-prefix" if "prefix_len" in opts else ""
    sizes = f"h{heads}kv{kv_heads}d{head_dim}-q{sum(lengths_q)}k{sum(lengths_k)}"
    return f"{str(dtype)[6:]}-{sizes}-{tag}"


def _run_case(backend, case, **kwargs):
    lengths_q, lengths_k, heads, kv_heads, head_dim, dtype, opts = case
    opts = dict(opts)
    if "prefix_len" in opts:
        opts["prefix_len"] = torch.tensor(opts["prefix_len"], device=DEVICE)
    _check(backend, lengths_q, lengths_k, heads, kv_heads, head_dim, dtype, **opts, **kwargs)


@pytest.mark.parametrize("case", SWEEP, ids=_sweep_id)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sweep(backend, case):
    require_backend("varlen_attention", backend)
    _run_case(backend, case)


# As in test_attention.py's: the last sequence's Nk - Nq = 126 ends its first query block's
# unmasked keys just before a tile boundary.
CONFIG_SWEEP = [
    ((0, 150, 1, 77), (5, 140, 1, 203), 4, 2, 64, torch.float16,
     dict(causal=True, bias="heads")),
    ((33, 0, 40), (20, 3, 45), 2, 1, 32, torch.float32,
     dict(causal=True, causal_strength=0.6, prefix_len=(3, 0, 30), bias="shared")),
]


@pytest.mark.parametrize(
    "case, config",
    [(case, config) for case in CONFIG_SWEEP for config in forward_tile_configs(*case[4:6])],
    ids=lambda x: _sweep_id(x) if len(x) == 7 else "m{}n{}w{}s{}".format(*x),
)
def test_forward_configs(case, config):
    """The varlen forward with each GPU configuration (forced), interpreted on a CPU."""
    require_backend("varlen_attention", "triton")
    from fastvl.kernels.attention import forced_forward_config

    with forced_forward_config(config):
        _run_case("triton", case, grads=False)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_overestimated_max_seqlen_and_int_prefix(backend):
    """max_seqlen larger than the longest sequence is harmless; an int prefix_len works."""
    require_backend("varlen_attention", backend)
    _check(backend, (9, 1, 12), (12, 3, 12), 2, 1, 32, torch.float32, causal=True,
           prefix_len=4, extra_max_seqlen=20, grads=False, seed=3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_inputs(backend):
    """q from a fused qkv buffer, k with a non-contiguous last dim, a strided (total_k, H) bias."""
    require_backend("varlen_attention", backend)
    lengths_q, lengths_k = (13, 0, 21), (13, 6, 21)

    def make():
        g = torch.Generator(device=DEVICE).manual_seed(4)
        qkv = random_tensor(34, 3, 4, 32, device=DEVICE, generator=g)
        k = random_tensor(32, 2, 40, device=DEVICE, generator=g).permute(2, 1, 0)
        v = random_tensor(40, 2, 32, device=DEVICE, generator=g)
        key_bias = random_tensor(40, 8, device=DEVICE, generator=g)[:, ::2]
        assert k.stride(-1) != 1 and not key_bias.is_contiguous()
        return (qkv[:, 0], k, v, key_bias, _cu_seqlens(lengths_q), _cu_seqlens(lengths_k))

    _check(backend, lengths_q, lengths_k, 4, 2, 32, torch.float32, causal=True,
           make_inputs=make)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_dense_attention(backend):
    """Equal lengths: varlen == attention on the (B, H, N, D) batch, forward and gradients.
    Unequal lengths: == attention on the right-padded batch with padded keys biased to -inf."""
    require_backend("varlen_attention", backend)
    batch, heads, kv_heads, n, head_dim = 3, 4, 2, 19, 32
    g = torch.Generator(device=DEVICE).manual_seed(5)
    q = random_tensor(batch, heads, n, head_dim, device=DEVICE, generator=g)
    k = random_tensor(batch, kv_heads, n + 4, head_dim, device=DEVICE, generator=g)
    v = random_tensor(batch, kv_heads, n + 4, head_dim, device=DEVICE, generator=g)
    key_bias = random_tensor(batch, heads, n + 4, device=DEVICE, generator=g)
    prefix = torch.tensor([0, 7, 30], device=DEVICE)
    dense_leaves = [t.clone().requires_grad_(True) for t in (q, k, v, key_bias)]
    packed_leaves = [t.transpose(1, 2).flatten(0, 1).detach().requires_grad_(True)
                     for t in (q, k, v, key_bias)]
    masks = dict(causal=True, causal_strength=0.8, prefix_len=prefix)
    out, lse = attention(*dense_leaves[:3], key_bias=dense_leaves[3], return_lse=True,
                         backend=backend, **masks)
    packed_out, packed_lse = varlen_attention(
        *packed_leaves[:3], _cu_seqlens([n] * batch), _cu_seqlens([n + 4] * batch), n, n + 4,
        key_bias=packed_leaves[3], return_lse=True, backend=backend, **masks,
    )
    torch.testing.assert_close(packed_out, out.transpose(1, 2).flatten(0, 1))
    torch.testing.assert_close(packed_lse, lse.transpose(1, 2).flatten(0, 1))
    (out.square().sum() + lse.sum()).backward()
    (packed_out.square().sum() + packed_lse.sum()).backward()
    for dense, packed in zip(dense_leaves, packed_leaves):
        torch.testing.assert_close(packed.grad, dense.grad.transpose(1, 2).flatten(0, 1))

    lengths = (19, 4, 11)
    key_padding = (torch.arange(n + 4, device=DEVICE)
                   >= torch.tensor(lengths, device=DEVICE)[:, None])
    padded_bias = torch.zeros(batch, n + 4, device=DEVICE).masked_fill(key_padding, -math.inf)
    out = attention(q, k, v, key_bias=padded_bias, backend=backend)
    packed = varlen_attention(
        *(torch.cat([t[b, :, :length].transpose(0, 1) for b, length in enumerate(lengths)])
          for t in (q, k, v)),
        _cu_seqlens(lengths), _cu_seqlens(lengths), max(lengths), max(lengths), backend=backend,
    )
    expected = torch.cat([out[b, :, :length].transpose(0, 1) for b, length in enumerate(lengths)])
    torch.testing.assert_close(packed, expected)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rows_without_visible_keys(backend):
    """Nk_b = 0, every key of a sequence biased to -inf, causal rows before the first key:
    out 0, lse -inf, finite gradients that are zero for those rows; never NaN."""
    require_backend("varlen_attention", backend)
    lengths_q, lengths_k = (5, 9, 20, 3), (0, 6, 7, 17)  # seq 2: causal, 13 rows see nothing
    q, k, v, key_bias, cu_q, cu_k = _make_packed(lengths_q, lengths_k, 2, 1, 32, torch.float32,
                                                 seed=6, bias="shared")
    key_bias[0:6] = -math.inf  # sequence 1: every key hidden
    leaves = [t.requires_grad_(True) for t in (q, k, v, key_bias)]
    with poison_outputs():
        out, lse = varlen_attention(*leaves[:3], cu_q, cu_k, 20, 17, key_bias=leaves[3],
                                    causal=True, return_lse=True, backend=backend)
    empty = torch.zeros(q.shape[0], dtype=torch.bool, device=DEVICE)
    empty[0:14] = True  # sequence 0 (no keys) and 1 (all keys hidden)
    empty[14:14 + 13] = True  # sequence 2: Nq - Nk = 13 rows before its first key
    assert torch.count_nonzero(out[empty]) == 0 and torch.isneginf(lse[empty]).all()
    assert torch.isfinite(lse[~empty]).all() and not out.isnan().any()
    (out.sum() + lse[~empty].sum()).backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    assert torch.count_nonzero(q.grad[empty]) == 0
    assert torch.count_nonzero(k.grad[:6]) == 0 and torch.count_nonzero(key_bias.grad[:6]) == 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty(backend):
    """No tokens at all, and B = 0: empty outputs; only key-less queries: out 0, lse -inf."""
    require_backend("varlen_attention", backend)
    for lengths_q, lengths_k in (((0, 0), (0, 0)), ((), ()), ((3, 2), (0, 0))):
        q, k, v, _, cu_q, cu_k = _make_packed(lengths_q, lengths_k, 2, 2, 16, torch.float32, 7)
        q.requires_grad_(True)
        out, lse = varlen_attention(q, k, v, cu_q, cu_k, max(lengths_q, default=0),
                                    max(lengths_k, default=0), return_lse=True, backend=backend)
        assert out.shape == q.shape and lse.shape == q.shape[:2]
        assert torch.count_nonzero(out) == 0 and torch.isneginf(lse).all()
        out.sum().backward()
        assert torch.count_nonzero(q.grad) == 0


# ---- the torch backend -------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [
        dict(bias="heads"),
        dict(causal=True, bias="shared", return_lse=True),
        dict(causal=True, causal_strength=0.6, prefix_len=(1, 0, 2), bias="heads"),
    ],
    ids=["bias-heads", "causal-shared-lse", "soft-prefix"],
)
def test_torch_backend_gradcheck(opts):
    opts = dict(opts)
    bias = opts.pop("bias")
    return_lse = opts.pop("return_lse", False)
    if "prefix_len" in opts:
        opts["prefix_len"] = torch.tensor(opts["prefix_len"], device=DEVICE)
    lengths_q, lengths_k = (3, 0, 4), (2, 3, 5)
    q, k, v, key_bias, cu_q, cu_k = _make_packed(lengths_q, lengths_k, 2, 1, 4, torch.float64,
                                                 seed=8, bias=bias)
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v, key_bias))

    def fn(q, k, v, key_bias):
        result = varlen_attention(q, k, v, cu_q, cu_k, 4, 5, key_bias=key_bias,
                                  return_lse=return_lse, backend="torch", **opts)
        if return_lse:
            out, lse = result
            return out, torch.where(torch.isneginf(lse), 0.0, lse)
        return result

    assert torch.autograd.gradcheck(fn, inputs)


def test_torch_backend_float64_lse():
    q, k, v, _, cu_q, cu_k = _make_packed((2, 3), (4, 1), 2, 2, 8, torch.float64, seed=9)
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, 3, 4, return_lse=True, backend="torch")
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    logits = torch.einsum("qhd,khd->qhk", q[:2], k[:4]) / math.sqrt(8)  # sequence 0
    torch.testing.assert_close(lse[:2], torch.logsumexp(logits, dim=-1))


# ---- registration, compile ---------------------------------------------------------------


def test_opcheck_triton_ops():
    require_backend("varlen_attention", "triton")
    q, k, v, key_bias, cu_q, cu_k = _make_packed((5, 0, 9), (7, 2, 4), 4, 2, 32, torch.float32,
                                                 seed=10, bias="shared")
    prefix = torch.tensor([3, 0, 1], device=DEVICE)
    fwd = torch.ops.fastvl.varlen_attention_fwd_triton.default
    bwd = torch.ops.fastvl.varlen_attention_bwd_triton.default
    seqlens = (cu_q, cu_k, 9, 7)
    grad_ins = [t.clone().requires_grad_(True) for t in (q, k, v, key_bias)]
    for args in (
        (*grad_ins, prefix, 0.3, True, 0.8, *seqlens),
        (q, k, v, None, None, 0.25, False, 1.0, *seqlens),
    ):
        assert_opcheck(fwd, args)
    out, lse = fwd(q, k, v, key_bias, prefix, 0.3, True, 1.0, *seqlens)
    grad_out = random_tensor(*out.shape, device=DEVICE)
    for args in (
        (grad_out, None, q, k, v, out, lse, key_bias, prefix, 0.3, True, 1.0, True, *seqlens),
        (grad_out, lse.clone(), q, k, v, out, lse, None, None, 0.3, True, 1.0, False, *seqlens),
    ):
        assert_opcheck(bwd, args)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compiles_without_graph_breaks(backend):
    """fullgraph compile, forward and backward (sum gradients: stride-0 expanded), vs float64."""
    require_backend("varlen_attention", backend)
    torch._dynamo.reset()
    if DEVICE.type == "cuda":
        compiler = "inductor"
    else:
        compiler = "aot_eager" if backend == "torch" else "eager"
    q, k, v, key_bias, cu_q, cu_k = _make_packed((6, 0, 17), (9, 4, 11), 4, 2, 32,
                                                 torch.float32, seed=11, bias="heads")
    prefix = torch.tensor([3, 0, 2], device=DEVICE)

    def fn(q, k, v, key_bias, cu_q, cu_k, prefix):
        out, lse = varlen_attention(q, k, v, cu_q, cu_k, 17, 11, key_bias=key_bias,
                                    causal=True, causal_strength=0.75, prefix_len=prefix,
                                    return_lse=True, backend=backend)
        return out * 2, lse

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, key_bias)]
    out, lse = compiled(*leaves, cu_q, cu_k, prefix)
    leaves64 = [t.double().requires_grad_(True) for t in (q, k, v, key_bias)]
    out64, lse64 = _per_sequence(*leaves64, cu_q, cu_k, causal=True, causal_strength=0.75,
                                 prefix_len=prefix)
    torch.testing.assert_close(out.double(), out64 * 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=1e-5)
    (out.sum() + lse.sum()).backward()
    (out64.sum() * 2 + lse64.sum()).backward()
    for a, b in zip(leaves, leaves64):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------


def _bad_inputs():
    """q (5, 4, 8), k/v (6, 2, 8), two sequences: q 2 + 3, k 4 + 2."""
    q, k, v, _, cu_q, cu_k = _make_packed((2, 3), (4, 2), 4, 2, 8, torch.float32, seed=12,
                                          device="cpu")
    return q, k, v, cu_q, cu_k, 3, 4


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def _replace(position, value):
    return lambda args: (args[:position] + (value,) + args[position + 1:], {})


@pytest.mark.parametrize(
    "make_call, error, match",
    [
        (lambda a: ((a[0][None],) + a[1:], {}), ValueError, r"q must be \(total_q, H, D\)"),
        (lambda a: ((a[0], a[1][None]) + a[2:], {}), ValueError,
         r"k must be \(total_k, Hkv, D\)"),
        (lambda a: ((a[0].half(),) + a[1:], {}), TypeError, r"share one dtype"),
        (lambda a: ((a[0], a[1], a[2][:5]) + a[3:], {}), ValueError,
         r"k has 6 keys \(total_k\) but v has 5"),
        (lambda a: ((a[0][:, :3],) + a[1:], {}), ValueError, r"query heads \(3\) must be"),
        (_replace(3, [0, 2, 5]), TypeError, r"cu_seqlens_q must be a torch.Tensor"),
        (_replace(3, torch.tensor([0, 2, 5])), TypeError,
         r"cu_seqlens_q must be an int32 tensor.*got torch.int64"),
        (_replace(4, _i32(0, 4, 6)[None]), ValueError,
         r"cu_seqlens_k must have shape \(B \+ 1,\), got \(1, 3\)"),
        (_replace(4, _i32(0, 4, 6).to("meta")), ValueError,
         r"q is on cpu but cu_seqlens_k is on meta"),
        (lambda a: (a[:4] + (_i32(0, 6), a[5], 6), {}), ValueError,
         r"cu_seqlens_q has shape \(3,\) but cu_seqlens_k has \(2,\)"),
        (_replace(3, _i32(1, 2, 5)), ValueError, r"cu_seqlens_q must start at 0"),
        (_replace(4, _i32(0, 4, 3)), ValueError,
         r"cu_seqlens_k must be non-decreasing, got cu_seqlens_k\[1\] = 4 > "),
        (_replace(3, _i32(0, 2, 4)), ValueError,
         r"cu_seqlens_q\[-1\] = 4 must equal the number of tokens in q \(5\)"),
        (_replace(3, _i32(0)), ValueError, r"q has 5 tokens but cu_seqlens_q has 0 sequences"),
        (_replace(5, 2), ValueError,
         r"max_seqlen_q = 2 is less than the longest sequence \(3\)"),
        (_replace(6, 0), ValueError, r"k has 6 tokens .* max_seqlen_k = 0"),
        (_replace(5, -1), ValueError, r"max_seqlen_q must be >= 0"),
        (_replace(5, 3.0), TypeError, r"max_seqlen_q must be a Python int, got float"),
        (_replace(6, True), TypeError, r"max_seqlen_k must be a Python int, got bool"),
        (lambda a: (a, dict(key_bias=torch.zeros(2, 4))), ValueError,
         r"key_bias must be \(total_k,\) = \(6,\) or \(total_k, H\) = \(6, 4\), "
         r"got shape \(2, 4\)"),
        (lambda a: (a, dict(key_bias=torch.zeros(6, dtype=torch.long))), TypeError,
         r"key_bias must be a floating-point"),
        (lambda a: (a, dict(causal=True, prefix_len=torch.ones(5, dtype=torch.long))),
         ValueError, r"prefix_len must have shape \(B,\) = \(2,\), got \(5,\)"),
        (lambda a: (a, dict(causal_strength=0.5)), ValueError,
         r"varlen_attention: causal_strength softens the causal mask"),
    ],
)
def test_bad_inputs_raise_clear_errors(make_call, error, match):
    args, kwargs = make_call(_bad_inputs())
    with pytest.raises(error, match=match):
        varlen_attention(*args, backend="torch", **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(causal="False"), TypeError, r"varlen_attention: causal must be a bool, got str"),
        (dict(return_lse=1), TypeError, r"return_lse must be a bool, got int"),
        (dict(scale=math.nan), ValueError, r"scale must be a finite number > 0 or None"),
        (dict(scale=-math.inf), ValueError, r"scale must be a finite number > 0 or None"),
    ],
)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_wrong_kind_flags_and_bad_scale_raise(kwargs, error, match, backend):
    """Also after a memoised valid call with the same shapes."""
    args = _bad_inputs()
    varlen_attention(*args, scale=0.5, backend=backend)
    with pytest.raises(error, match=match):
        varlen_attention(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_index_tensors_are_read_by_value(backend):
    """Non-contiguous cu_seqlens_q / cu_seqlens_k and an expanded prefix_len mean their
    values (first call and memoised calls alike)."""
    require_backend("varlen_attention", backend)
    lengths_q, lengths_k = (5, 0, 17), (9, 4, 11)
    q, k, v, _, cu_q, cu_k = _make_packed(lengths_q, lengths_k, 2, 1, 16, torch.float32, 13)

    def strided(cu):  # the values of cu at even positions, garbage between them
        return torch.stack([cu, torch.full_like(cu, 999)], dim=1).flatten()[::2]

    prefix = torch.tensor(3, device=DEVICE).expand(3)
    for masks in (dict(), dict(causal=True, prefix_len=prefix)):
        ref_masks = dict(masks, prefix_len=prefix.clone()) if masks else {}
        expected, expected_lse = _per_sequence(q, k, v, None, cu_q, cu_k, **ref_masks)
        for _ in range(2):  # the second call takes the memo fast path where it applies
            out, lse = varlen_attention(q, k, v, strided(cu_q), strided(cu_k), 17, 11,
                                        return_lse=True, backend=backend, **masks)
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-5)


def test_triton_not_supported_reasons():
    args = _bad_inputs()
    with pytest.raises(ValueError, match=r"varlen_attention: backend must be 'auto' or one of"):
        varlen_attention(*args, backend="cuda")  # varlen_attention has no cuda implementation
    require_backend("varlen_attention", "triton", args[0].device)
    as64 = tuple(t.double() for t in args[:3]) + args[3:]
    with pytest.raises(BackendNotSupportedError, match=r"q has dtype torch.float64; triton"):
        varlen_attention(*as64, backend="triton")
    assert varlen_attention(*as64, backend="auto").dtype == torch.float64  # falls back


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c[:5] + (torch.bfloat16, c[6]) for c in SWEEP], ids=_sweep_id)
def test_gpu_sweep_bf16(case):
    require_backend("varlen_attention", "triton")
    _run_case("triton", case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case",
    [
        # ViT-B at 224 with ToMe-merged lengths, proportional attention bias
        ((197, 131, 98, 1, 0, 197, 64), None, 12, 12, 64, dict(bias="shared")),
        # VLM packing: image prefix + text, causal with prefix-LM, GQA
        ((833, 577, 1025, 3), None, 8, 2, 128,
         dict(causal=True, prefix_len=(577, 577, 0, 3), bias="heads")),
        # decode / chunked prefill: few queries against long keys, bottom-right causal
        ((1, 64, 300, 7), (1025, 64, 2048, 700), 16, 4, 80, dict(causal=True)),
        ((577, 200, 577), (577, 577, 100), 6, 2, 256, dict(causal=True, causal_strength=0.3)),
    ],
    ids=["vit-tome", "vlm-prefix-gqa", "decode", "soft-d256"],
)
def test_gpu_large(dtype, case):
    require_backend("varlen_attention", "triton")
    lengths_q, lengths_k, heads, kv_heads, head_dim, opts = case
    _run_case("triton", (lengths_q, lengths_k or lengths_q, heads, kv_heads, head_dim, dtype,
                         opts))


@pytest.mark.gpu
def test_gpu_auto_uses_triton():
    from fastvl.ops.registry import OPS

    q = torch.zeros(3, 1, 8, device="cuda", dtype=torch.float16)
    cu = torch.tensor([0, 3], dtype=torch.int32, device="cuda")
    impl = OPS["varlen_attention"].select("auto", q.device, q, q, q, cu, cu, 3, 3, None, None,
                                          1.0, False, 1.0, True, 0.0)  # lse: fastvl's only
    assert impl.__name__ == "_varlen_triton_impl"
