"""attention on every backend against a float64 reference; masks, GQA, key bias, lse, grads.

Tolerance rule (flash-attn's): a backend's max error against the independent float64
reference of ``tests/samples_attention.py`` (not fastvl.reference, the torch backend) is at
most 2x (forward: out, lse) / 3x (gradients) the error of the same written-out math done by
PyTorch in the inputs' dtype (``low=True``), plus a small absolute floor. Outputs are poisoned
(NaN) first, so unwritten elements fail.

On a CPU machine the Triton kernels run in the interpreter with small blocks (32/16), so the
small shapes here still span several query and key blocks; bf16 (``tl.dot`` on bf16 is wrong
in the interpreter) and large shapes are `gpu` tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastvl.ops import BackendNotSupportedError
from fastvl.ops.attention import attention
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
from tests.samples_attention import (
    attention_inputs, deterministic_algorithms, forward_tile_configs, noncontiguous_prefix_lens,
    reference_attention, reference_grads,
)

ALL_BACKENDS = ("torch", "triton")
CPU_DTYPES = (torch.float32, torch.float16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _check(backend, batch, heads, kv_heads, nq, nk, head_dim, dtype, *, causal=False,
           causal_strength=None, prefix_len=None, bias=None, bias_dtype=None, grads=True,
           seed=0, make_inputs=None):
    """Forward (out, lse) and backward (q, k, v, key_bias; through out and lse) vs float64."""
    if make_inputs is None:
        q, k, v, key_bias = attention_inputs(batch, heads, kv_heads, nq, nk, head_dim, dtype, seed,
                                         bias, bias_dtype)
    else:
        q, k, v, key_bias = make_inputs()
    masks = dict(causal=causal, causal_strength=causal_strength)
    ref_prefix = prefix_len
    if isinstance(prefix_len, int):
        ref_prefix = torch.full((batch,), prefix_len, device=DEVICE)
    inputs = [q, k, v] + ([key_bias] if key_bias is not None else [])
    leaves = [t.detach().clone().requires_grad_(grads) for t in inputs]
    with poison_outputs():
        out, lse = attention(
            *leaves[:3], key_bias=leaves[3] if key_bias is not None else None,
            prefix_len=prefix_len, return_lse=True, backend=backend, **masks,
        )
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.shape == q.shape[:3]

    ref_masks = dict(prefix_len=ref_prefix, **masks)
    key_bias_in = inputs[3] if len(inputs) > 3 else None
    out64, lse64 = reference_attention(*inputs[:3], key_bias=key_bias_in, **ref_masks)
    out_low, lse_low = reference_attention(*inputs[:3], key_bias=key_bias_in, low=True,
                                           **ref_masks)
    assert not out.isnan().any(), "NaN in out"
    assert_within_reference_error(out, out64, out_low, factor=2, atol=ERROR_FLOOR[dtype], name="out")
    assert_lse_within_reference_error(lse, lse64, lse_low, dtype)
    if not grads:
        return

    g = _gen(seed + 1000)
    grad_out = random_tensor(*out.shape, dtype=dtype, device=DEVICE, generator=g)
    grad_lse = random_tensor(*lse.shape, dtype=torch.float32, device=DEVICE, generator=g)
    with poison_outputs():
        got = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse))
    want64 = reference_grads(grad_out, grad_lse, inputs, **ref_masks)
    want_low = reference_grads(grad_out, grad_lse, inputs, low=True, **ref_masks)
    assert_grads_within_reference_error(
        ("dq", "dk", "dv", "dkey_bias"), got, want64, want_low, atol=ERROR_FLOOR[dtype] * 10
    )


# ---- the interpreter / GPU sweep ---------------------------------------------------------

# (batch, heads, kv_heads, Nq, Nk, D, dtype, options): every Nq/Nk in {1, 7, 64, 197} and
# every D in {32, 64, 80, 88, 128} appears; masks x GQA x bias x dtype are spread over cases.
SWEEP = [
    (2, 2, 2, 1, 1, 32, torch.float32, {}),
    (1, 2, 2, 7, 7, 64, torch.float16, dict(causal=True)),
    (2, 4, 2, 64, 64, 80, torch.float32, dict(causal=True, bias="bh")),
    (1, 4, 1, 197, 197, 32, torch.float16, dict(bias="b")),
    (1, 2, 1, 7, 197, 128, torch.float32, dict(causal=True)),  # bottom-right, Nq < Nk
    (1, 2, 2, 197, 64, 64, torch.float16, dict(causal=True)),  # Nq > Nk: empty rows
    (2, 4, 2, 64, 197, 80, torch.float16, dict(causal=True, causal_strength=0.5)),
    (2, 2, 1, 64, 64, 32, torch.float32, dict(causal=True, prefix_len=(0, 20), bias="b")),
    (2, 4, 4, 7, 64, 88, torch.float16, dict(causal=True, prefix_len=3, bias="bh")),
    (2, 2, 1, 64, 7, 128, torch.float32, dict(causal=True, prefix_len=(3, 0))),  # Nq > Nk
    (2, 2, 2, 1, 197, 80, torch.float16, dict(causal=True, bias="b")),  # decode-like
    (2, 4, 2, 64, 64, 32, torch.float32, dict(causal=True, causal_strength=0.9,
                                              prefix_len=(10, 69), bias="bh")),
    (1, 4, 2, 64, 7, 64, torch.float32, dict(causal=True, causal_strength=0.3)),
    (1, 2, 1, 197, 7, 32, torch.float32, dict(bias="bh")),
    (1, 2, 2, 7, 1, 64, torch.float16, dict(causal=True)),  # Nq > Nk = 1
    (2, 2, 2, 64, 64, 64, torch.float16, dict(bias="b", bias_dtype=torch.float32)),
]


def _sweep_id(case):
    batch, heads, kv_heads, nq, nk, head_dim, dtype, opts = case
    tag = "-".join(f"{k}={v}" for k, v in opts.items() if k != "bias_dtype")
    return f"{str(dtype)[6:]}-b{batch}h{heads}kv{kv_heads}-q{nq}k{nk}d{head_dim}-{tag or 'plain'}"


def _run_case(backend, case, grads=True):
    batch, heads, kv_heads, nq, nk, head_dim, dtype, opts = case
    opts = dict(opts)
    if isinstance(opts.get("prefix_len"), tuple):
        opts["prefix_len"] = torch.tensor(opts["prefix_len"], device=DEVICE)
    _check(backend, batch, heads, kv_heads, nq, nk, head_dim, dtype, grads=grads, **opts)


@pytest.mark.parametrize("case", SWEEP, ids=_sweep_id)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sweep(backend, case):
    require_backend("attention", backend)
    _run_case(backend, case)


# ---- every forward configuration a GPU's autotuner may pick, interpreted ----------------

# Sizes straddle the largest tiles (128): several query blocks, unmasked key tiles, a tail and
# (causal) tiles crossing the diagonal; each head-dim / dtype class of the lists appears.
# Nk - Nq = 126 puts the first query block's last unmasked key just before a tile boundary of
# every BLOCK_N (16 to 128).
CONFIG_SWEEP = [
    (1, 4, 2, 150, 150, 64, torch.float16, dict(causal=True, bias="bh")),
    (1, 2, 1, 70, 196, 80, torch.float16, dict(causal=True, causal_strength=0.5,
                                               prefix_len=(90,), bias="b")),
    (1, 2, 2, 200, 130, 256, torch.float16, dict(causal=True)),  # Nq > Nk: empty rows
    (1, 2, 1, 45, 171, 32, torch.float32, dict(causal=True, prefix_len=(50,), bias="bh")),
    (1, 2, 2, 40, 33, 128, torch.float32, dict(bias="b")),
    (1, 1, 1, 20, 37, 256, torch.float32, dict(causal=True)),
]


@pytest.mark.parametrize(
    "case, config",
    [(case, config) for case in CONFIG_SWEEP for config in forward_tile_configs(*case[5:7])],
    ids=lambda x: _sweep_id(x) if len(x) == 8 else "m{}n{}w{}s{}".format(*x),
)
def test_forward_configs(case, config):
    """The forward with each GPU configuration (forced), in the interpreter on a CPU."""
    require_backend("attention", "triton")
    from fastvl.kernels.attention import forced_forward_config

    with forced_forward_config(config):
        _run_case("triton", case, grads=False)


# ---- the backward's modes: atomic dQ or deterministic, GQA group split or looped ---------

# GQA and MHA cases of the sweep with every mask kind, key bias (shared and per head), Nq != Nk.
BACKWARD_MODE_CASES = [SWEEP[i] for i in (2, 5, 6, 7, 11, 12, 13)]


@pytest.mark.parametrize("case", BACKWARD_MODE_CASES, ids=_sweep_id)
@pytest.mark.parametrize("split", [True, False], ids=["group-split", "group-loop"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
def test_backward_modes(case, split, deterministic):
    """Every combination of the backward's dQ path and GQA work split against float64."""
    require_backend("attention", "triton")
    from fastvl.kernels.attention_backward import forced_group_split

    with forced_group_split(split), deterministic_algorithms(deterministic):
        _run_case("triton", case)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
def test_backward_launches(deterministic):
    """Triton launches per backward: preprocess, dK/dV (+ atomic dQ), the group sum when the
    GQA group is split, the dQ kernel in deterministic mode only (then no atomics)."""
    require_backend("attention", "triton")
    from fastvl import triton_aot
    from fastvl.kernels import attention_backward

    q, k, v, _ = attention_inputs(1, 4, 2, 20, 20, 32, torch.float16, seed=3)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, causal=True, backend="triton")
    with (deterministic_algorithms(deterministic), attention_backward.forced_group_split(True),
          triton_aot.recorded_launches(attention_backward) as launches):
        out.sum().backward()
    names = [launch["kernel"] for launch in launches]
    assert names == ["_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                     "_attn_bwd_group_sum_kernel"] + (["_attn_bwd_dq_kernel"] * deterministic)
    assert launches[1]["constants"]["ATOMIC_DQ"] is (not deterministic)


@pytest.mark.parametrize("case", CONFIG_SWEEP, ids=_sweep_id)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
def test_backward_gpu_configs(case, deterministic, arch):
    """The backward with the tiles, warps and group split an sm_90 / sm_80 GPU uses,
    interpreted on a CPU (the forward runs every configuration its autotuner may pick)."""
    require_backend("attention", "triton")
    from fastvl import triton_aot

    with triton_aot.gpu_launch_sizes(arch), deterministic_algorithms(deterministic):
        _run_case("triton", case)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_causal_strength_endpoints(backend, strength):
    """Strength 1 is the hard causal mask, strength 0 no mask at all."""
    require_backend("attention", backend)
    q, k, v, _ = attention_inputs(1, 2, 1, 40, 40, 32, torch.float32, seed=11)
    out = attention(q, k, v, causal=True, causal_strength=strength, backend=backend)
    plain = attention(q, k, v, causal=strength == 1.0, backend="torch")
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bias", ["b", "bh"])
def test_fully_masked_rows(backend, bias):
    """Rows whose keys are all biased to -inf: out 0, lse -inf, finite (zero) grads, no NaN."""
    require_backend("attention", backend)
    batch, heads, nq, nk, head_dim = 2, 2, 40, 23, 32

    def make():
        q, k, v, key_bias = attention_inputs(batch, heads, 1, nq, nk, head_dim, torch.float32,
                                         seed=12, bias=bias)
        key_bias[0] = -math.inf  # sample 0: every key dropped (all heads)
        key_bias[1, ..., 5:] = -math.inf  # sample 1: only the first 5 keys kept
        return q, k, v, key_bias

    _check(backend, batch, heads, 1, nq, nk, head_dim, torch.float32, bias=bias,
           make_inputs=make)
    q, k, v, key_bias = (t.requires_grad_(True) for t in make())
    out, lse = attention(q, k, v, key_bias=key_bias, return_lse=True, backend=backend)
    assert torch.count_nonzero(out[0]) == 0
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()
    out.sum().backward()
    for t in (q, k, v, key_bias):
        assert torch.isfinite(t.grad).all()
    assert torch.count_nonzero(q.grad[0]) == 0 and torch.count_nonzero(k.grad[0]) == 0
    assert torch.count_nonzero(key_bias.grad[1, ..., 5:]) == 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_causal_rows_before_first_key(backend):
    """Causal with Nq > Nk (bottom-right): the first Nq - Nk query rows see nothing."""
    require_backend("attention", backend)
    q, k, v, _ = attention_inputs(1, 2, 2, 20, 6, 32, torch.float32, seed=13)
    q.requires_grad_(True)
    out, lse = attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert torch.count_nonzero(out[:, :, :14]) == 0 and torch.isneginf(lse[:, :, :14]).all()
    assert torch.isfinite(lse[:, :, 14:]).all()
    # Row 14 sees exactly key 0: its output is v[0].
    torch.testing.assert_close(out[:, :, 14], v[:, :, 0], rtol=1e-5, atol=1e-5)
    (out.sum() + lse[:, :, 14:].sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.count_nonzero(q.grad[:, :, :14]) == 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_prefix_lm_mask_definition(backend):
    """prefix_len: keys < prefix visible to all queries; later keys causal; values clamped."""
    require_backend("attention", backend)
    nq = nk = 12
    q, k, v, _ = attention_inputs(3, 1, 1, nq, nk, 16, torch.float32, seed=14)
    prefix = torch.tensor([4, -3, 50], device=DEVICE)  # clamped to 4, 0 (plain causal), 12 (none)
    out = attention(q, k, v, causal=True, prefix_len=prefix, backend=backend)
    rows = torch.arange(nq).view(-1, 1)
    cols = torch.arange(nk).view(1, -1)
    for b, p in enumerate([4, 0, 12]):
        visible = (cols <= rows) | (cols < p)
        scores = (q[b, 0] @ k[b, 0].T) / 4.0
        expected = scores.masked_fill(~visible.to(DEVICE), -math.inf).softmax(-1) @ v[b, 0]
        torch.testing.assert_close(out[b, 0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gqa_matches_repeated_heads(backend):
    require_backend("attention", backend)
    q, k, v, key_bias = attention_inputs(2, 6, 2, 19, 23, 32, torch.float32, seed=15, bias="b")
    for t in (q, k, v, key_bias):
        t.requires_grad_(True)
    out = attention(q, k, v, key_bias=key_bias, causal=True, backend=backend)
    kr, vr = (t.detach().repeat_interleave(3, dim=1).requires_grad_(True) for t in (k, v))
    expected = attention(q.detach(), kr, vr, key_bias=key_bias.detach(), causal=True,
                         backend="torch")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = random_tensor(*out.shape, generator=_gen(16), device=DEVICE)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(k.grad, kr.grad.view(2, 2, 3, 23, 32).sum(2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v.grad, vr.grad.view(2, 2, 3, 23, 32).sum(2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_inputs(backend):
    """(B, N, H, D) views, a non-contiguous last dim (copied by the kernels), a strided bias."""
    require_backend("attention", backend)

    def make():
        g = _gen(17)
        q = random_tensor(2, 37, 4, 64, device=DEVICE, generator=g).transpose(1, 2)
        k = random_tensor(2, 64, 45, 2, device=DEVICE, generator=g).permute(0, 3, 2, 1)
        v = random_tensor(2, 45, 2, 64, device=DEVICE, generator=g).transpose(1, 2)
        key_bias = random_tensor(2, 4, 90, device=DEVICE, generator=g)[:, :, ::2]
        assert k.stride(-1) != 1 and not key_bias.is_contiguous()
        return q, k, v, key_bias

    _check(backend, 2, 4, 2, 37, 45, 64, torch.float32, causal=True, bias="bh",
           make_inputs=make)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_expanded_output_gradients(backend):
    """Gradients of out.sum() / lse.sum() arrive as stride-0 expanded tensors."""
    require_backend("attention", backend)
    q, k, v, key_bias = attention_inputs(2, 2, 1, 21, 19, 32, torch.float32, seed=27, bias="bh")
    leaves = [t.requires_grad_(True) for t in (q, k, v, key_bias)]
    out, lse = attention(*leaves[:3], key_bias=leaves[3], causal=True, return_lse=True,
                         backend=backend)
    got = torch.autograd.grad(out.sum(dim=2).sum() + lse.sum(), leaves)
    ins64 = [t.detach().double().requires_grad_(True) for t in leaves]
    out64, lse64 = reference_attention(*ins64[:3], key_bias=ins64[3], causal=True)
    want = torch.autograd.grad(out64.sum() + lse64.sum(), ins64)
    for name, a, b in zip(("dq", "dk", "dv", "dkey_bias"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 5, 7), (2, 2, 0, 7), (2, 2, 5, 0)])
def test_empty(backend, shape):
    """B = 0, Nq = 0, or Nk = 0 (nothing to attend to: out 0, lse -inf, zero grads)."""
    require_backend("attention", backend)
    batch, heads, nq, nk = shape
    q = random_tensor(batch, heads, nq, 32, device=DEVICE, requires_grad=True)
    k = random_tensor(batch, heads, nk, 32, device=DEVICE, requires_grad=True)
    v = random_tensor(batch, heads, nk, 32, device=DEVICE, requires_grad=True)
    out, lse = attention(q, k, v, return_lse=True, backend=backend)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert torch.count_nonzero(out) == 0 and torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.count_nonzero(q.grad) == 0


def test_default_scale_and_explicit_scale():
    require_backend("attention", "triton")
    q, k, v, _ = attention_inputs(1, 2, 2, 9, 11, 80, torch.float32, seed=18)
    for scale in (None, 0.3):
        out = attention(q, k, v, scale=scale, backend="triton")
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ---- the torch backend -------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(causal=True),
        dict(causal=True, causal_strength=0.6, bias="b"),
        dict(causal=True, prefix_len=(2, 0), bias="bh"),
        dict(bias="bh", return_lse=True),
        dict(causal=True, nq=7, nk=4, return_lse=True),  # empty rows, math path
    ],
    ids=["plain-sdpa", "causal-sdpa", "soft-bias", "prefix-bias", "lse", "empty-rows"],
)
def test_torch_backend_gradcheck(opts):
    opts = dict(opts)
    nq, nk = opts.pop("nq", 5), opts.pop("nk", 6)
    bias = opts.pop("bias", None)
    return_lse = opts.pop("return_lse", False)
    if isinstance(opts.get("prefix_len"), tuple):
        opts["prefix_len"] = torch.tensor(opts["prefix_len"], device=DEVICE)
    q, k, v, key_bias = attention_inputs(2, 4, 2, nq, nk, 8, torch.float64, seed=19, bias=bias)
    inputs = [t.requires_grad_(True) for t in (q, k, v)]
    if key_bias is not None:
        inputs.append(key_bias.requires_grad_(True))

    def fn(*ins):
        result = attention(*ins[:3], key_bias=ins[3] if len(ins) > 3 else None,
                           return_lse=return_lse, backend="torch", **opts)
        if return_lse:
            out, lse = result
            return out, torch.where(torch.isneginf(lse), 0.0, lse)
        return result

    assert torch.autograd.gradcheck(fn, tuple(inputs))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_torch_backend_sdpa_path_matches_math(dtype):
    q, k, v, _ = attention_inputs(2, 4, 2, 33, 40, 64, dtype, seed=20)
    for opts in (dict(), dict(causal=True), dict(causal=True, causal_strength=0.4),
                 dict(causal=True, prefix_len=torch.tensor([5, 0], device=DEVICE))):
        out = attention(q, k, v, backend="torch", **opts)
        out64, _ = reference_attention(q, k, v, **opts)
        low, _ = reference_attention(q, k, v, low=True, **opts)
        assert_within_reference_error(out, out64, low, factor=2, atol=ERROR_FLOOR[dtype], name=str(opts))


def test_torch_backend_float64_lse():
    q, k, v, _ = attention_inputs(1, 2, 2, 4, 5, 8, torch.float64, seed=21)
    out, lse = attention(q, k, v, return_lse=True, backend="torch")
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(8), -1))


# ---- registration, compile ---------------------------------------------------------------


def test_opcheck_triton_ops():
    require_backend("attention", "triton")
    q, k, v, key_bias = attention_inputs(2, 4, 2, 9, 11, 32, torch.float32, seed=22, bias="b")
    prefix = torch.tensor([3, 0], device=DEVICE)
    fwd = torch.ops.fastvl.attention_fwd_triton.default
    bwd = torch.ops.fastvl.attention_bwd_triton.default
    grad_ins = [t.clone().requires_grad_(True) for t in (q, k, v, key_bias)]
    for args in (
        (*grad_ins, prefix, 0.3, True, 0.8),
        (q, k, v, None, None, 0.25, False, 1.0),
    ):
        assert_opcheck(fwd, args)
    out, lse = fwd(q, k, v, key_bias, prefix, 0.3, True, 1.0)
    grad_out = random_tensor(*out.shape, device=DEVICE, generator=_gen(23))
    for args in (
        (grad_out, None, q, k, v, out, lse, key_bias, prefix, 0.3, True, 1.0, True),
        (grad_out, lse.clone(), q, k, v, out, lse, None, None, 0.3, True, 1.0, False),
    ):
        assert_opcheck(bwd, args)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compiles_without_graph_breaks(backend):
    require_backend("attention", backend)
    torch._dynamo.reset()
    if DEVICE.type == "cuda":
        compiler = "inductor"
    else:
        compiler = "aot_eager" if backend == "torch" else "eager"
    q, k, v, key_bias = attention_inputs(2, 4, 2, 17, 17, 32, torch.float32, seed=24, bias="b")
    prefix = torch.tensor([3, 9], device=DEVICE)

    def fn(q, k, v, key_bias, prefix):
        out, lse = attention(q, k, v, key_bias=key_bias, causal=True, causal_strength=0.75,
                             prefix_len=prefix, return_lse=True, backend=backend)
        return out * 2, lse

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, key_bias)]
    out, lse = compiled(*leaves, prefix)
    expected_leaves = [t.clone().requires_grad_(True) for t in (q, k, v, key_bias)]
    expected, expected_lse = fn(*expected_leaves, prefix)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)
    (out.sum() + lse.sum()).backward()
    (expected.sum() + expected_lse.sum()).backward()
    for a, b in zip(leaves, expected_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    # An int prefix_len and the default scale compile too.
    compiled_int = torch.compile(
        lambda q, k, v: attention(q, k, v, causal=True, prefix_len=4, backend=backend),
        fullgraph=True, backend=compiler,
    )
    torch.testing.assert_close(
        compiled_int(q, k, v),
        attention(q, k, v, causal=True, prefix_len=4, backend="torch"), rtol=1e-5, atol=1e-5,
    )


def test_auto_on_cpu_uses_sdpa_then_torch():
    from fastvl.ops.registry import OPS

    q, k, v, _ = attention_inputs(1, 1, 1, 3, 3, 8, torch.float32, seed=25, device="cpu")
    args = (q, k, v, None, None, 1.0, False, 1.0, False, None, 0.0)
    assert OPS["attention"].select("auto", q.device, *args).__name__ == "_sdpa_impl"
    with_lse = args[:8] + (True,) + args[9:]  # what SDPA cannot return
    assert OPS["attention"].select("auto", q.device, *with_lse).__name__ == "_torch_impl"


# ---- bad input ---------------------------------------------------------------------------


def _bad_inputs():
    q, k, v, _ = attention_inputs(2, 4, 2, 5, 6, 8, torch.float32, seed=26, device="cpu")
    return q, k, v


@pytest.mark.parametrize(
    "make_call, error, match",
    [
        (lambda q, k, v: ((q[0], k, v), {}), ValueError, r"q must be \(B, H, Nq, D\)"),
        (lambda q, k, v: ((q, k[0], v), {}), ValueError, r"k must be \(B, Hkv, Nk, D\)"),
        (lambda q, k, v: ((q, k, v[0]), {}), ValueError, r"v must be \(B, Hkv, Nk, D\)"),
        (lambda q, k, v: ((q.tolist(), k, v), {}), TypeError, r"q must be a torch.Tensor"),
        (lambda q, k, v: ((q.long(), k, v), {}), TypeError, r"q must be a floating-point"),
        (lambda q, k, v: ((q, k.half(), v), {}), TypeError, r"share one dtype.*k torch.float16"),
        (lambda q, k, v: ((q, k, v.to("meta")), {}), ValueError, r"q is on cpu but v is on meta"),
        (lambda q, k, v: ((q, k[:1], v), {}), ValueError, r"k batch size 1 does not match q's 2"),
        (lambda q, k, v: ((q, k[..., :4], v), {}), ValueError,
         r"k head dim 4 does not match q's 8"),
        (lambda q, k, v: ((q, k, v[..., :4]), {}), ValueError, r"v head dim 4 does not match"),
        (lambda q, k, v: ((q, k, v[:, :, :5]), {}), ValueError, r"k has 6 keys \(Nk\) but v has 5"),
        (lambda q, k, v: ((q, k, v[:, :1]), {}), ValueError, r"k has 2 heads but v has 1"),
        (lambda q, k, v: ((q[:, :3], k, v), {}), ValueError,
         r"query heads \(3\) must be a multiple"),
        (lambda q, k, v: ((q, k, v), dict(key_bias=torch.zeros(2, 5))), ValueError,
         r"key_bias must be \(B, Nk\) = \(2, 6\) or \(B, H, Nk\) = \(2, 4, 6\), "
         r"got shape \(2, 5\)"),
        (lambda q, k, v: ((q, k, v), dict(key_bias=torch.zeros(2, 2, 6))), ValueError,
         r"key_bias must be"),
        (lambda q, k, v: ((q, k, v), dict(key_bias=torch.zeros(2, 6, dtype=torch.long))),
         TypeError, r"key_bias must be a floating-point"),
        (lambda q, k, v: ((q, k, v), dict(key_bias=torch.zeros(2, 6, device="meta"))),
         ValueError, r"key_bias is on meta"),
        (lambda q, k, v: ((q, k, v), dict(causal=True, causal_strength=1.5)), ValueError,
         r"causal_strength must lie in \[0, 1\].*got 1.5"),
        (lambda q, k, v: ((q, k, v), dict(causal=True, causal_strength=-0.1)), ValueError,
         r"causal_strength must lie in \[0, 1\]"),
        (lambda q, k, v: ((q, k, v), dict(causal_strength=0.5)), ValueError,
         r"causal_strength softens the causal mask; pass causal=True"),
        (lambda q, k, v: ((q, k, v), dict(causal=True, causal_strength=torch.tensor(0.5))),
         TypeError, r"causal_strength must be a Python float"),
        (lambda q, k, v: ((q, k, v), dict(prefix_len=3)), ValueError,
         r"prefix_len .* pass causal=True"),
        (lambda q, k, v: ((q, k, v), dict(causal=True, prefix_len=torch.ones(2))), TypeError,
         r"prefix_len must be an integer tensor"),
        (lambda q, k, v: ((q, k, v), dict(causal=True, prefix_len=torch.ones(3, dtype=torch.long))),
         ValueError, r"prefix_len must have shape \(B,\) = \(2,\), got \(3,\)"),
        (lambda q, k, v: ((q, k, v), dict(causal=True, prefix_len=2.0)), TypeError,
         r"prefix_len must be an int or a \(B,\) integer tensor"),
        (lambda q, k, v: ((q, k, v), dict(scale="0.1")), TypeError,
         r"scale must be a Python number"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_inputs_raise_clear_errors(make_call, error, match, backend):
    attention(*_bad_inputs(), backend=backend)  # a valid call first: the memo skips no check
    args, kwargs = make_call(*_bad_inputs())
    with pytest.raises(error, match=match):
        attention(*args, backend=backend, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(causal="False"), TypeError, r"attention: causal must be a bool, got str"),
        (dict(causal=1), TypeError, r"causal must be a bool, got int"),
        (dict(return_lse="True"), TypeError, r"return_lse must be a bool, got str"),
        (dict(scale=math.nan), ValueError, r"scale must be a finite number > 0 or None, got nan"),
        (dict(scale=math.inf), ValueError, r"scale must be a finite number > 0"),
        (dict(scale=0.0), ValueError, r"scale must be a finite number > 0"),
        (dict(scale=-0.5), ValueError, r"scale must be a finite number > 0"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_wrong_kind_flags_and_bad_scale_raise(kwargs, error, match, backend):
    """Non-bool flags are not truth-tested; a NaN / inf / non-positive scale is refused, also
    after a memoised valid call with the same shapes (the memo key does not hold scale)."""
    q, k, v = _bad_inputs()
    attention(q, k, v, scale=0.5, backend=backend)
    with pytest.raises(error, match=match):
        attention(q, k, v, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_prefix_len_is_read_by_value(backend):
    """A non-contiguous or expanded prefix_len means its values, not the memory after them."""
    require_backend("attention", backend)
    q, k, v, _ = attention_inputs(3, 2, 1, 9, 11, 16, torch.float32, seed=31)
    for prefix in noncontiguous_prefix_lens():
        assert not prefix.is_contiguous()
        out, lse = attention(q, k, v, causal=True, prefix_len=prefix, return_lse=True,
                             backend=backend)
        out64, lse64 = reference_attention(q, k, v, causal=True, prefix_len=prefix.clone())
        torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_query_row_stays_in_its_row(backend, return_lse, causal):
    """IEEE contract: a query row holding a NaN (or inf) gives NaN out and lse in that row
    only; a NaN in k of a key the causal mask hides reaches no row it is hidden from."""
    require_backend("attention", backend)
    q, k, v, _ = attention_inputs(1, 2, 1, 9, 9, 16, torch.float32, seed=32)
    q[0, 0, 3, 5] = math.nan
    q[0, 1, 6, 0] = math.inf
    k[0, 0, 7, 2] = math.nan
    result = attention(q, k, v, causal=causal, return_lse=return_lse, backend=backend)
    out, lse = result if return_lse else (result, None)
    out64, lse64 = reference_attention(q, k, v, causal=causal)
    bad_rows = torch.zeros(1, 2, 9, dtype=torch.bool)
    bad_rows[0, 0, 3] = bad_rows[0, 1, 6] = True
    if causal:
        bad_rows[..., 7:] = True  # the rows that see key 7
    else:
        bad_rows[:] = True
    assert torch.equal(out64.isnan().any(-1).cpu(), bad_rows)  # the oracle's contract
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5, equal_nan=True)
    if return_lse:
        torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(return_lse=0), TypeError, r"return_lse must be a bool"),
        (dict(dropout_p=False), TypeError, r"dropout_p must be a Python float"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must lie in \[0, 1\)"),
        (dict(backend="flash"), ValueError, r"backend must be 'auto' or one of"),
    ],
)
def test_memo_keeps_value_equal_bad_arguments_out(kwargs, error, match):
    """Arguments equal (and hash-equal) to a memoised valid call's still fail their checks."""
    q, k, v = _bad_inputs()
    attention(q, k, v, return_lse=False, dropout_p=0.0)
    attention(q, k, v, return_lse=True, dropout_p=0.0)
    with pytest.raises(error, match=match):
        attention(q, k, v, **kwargs)


def test_memo_follows_dispatch_changes():
    """A memoised choice is dropped when dispatch changes (here: the simulated GPU path, where
    a key bias goes to triton instead of SDPA)."""
    from fastvl.bench.host_overhead import gpu_path

    q, k, v = _bad_inputs()
    bias = torch.zeros(2, 6)
    expected = attention(q, k, v, key_bias=bias)  # CPU: SDPA serves a key bias
    assert torch.equal(attention(q, k, v, key_bias=bias), expected)  # memoised, same result
    require_backend("attention", "triton", q.device)
    with gpu_path() as launches:
        attention(q, k, v, key_bias=bias)
    assert launches.triton == 1


def test_eager_triton_path_skips_custom_op_dispatch():
    """Eager calls launch the kernels from Python (torch.compile uses torch.ops.fastvl.*);
    the backward needs no zero-filled lse gradient and is not differentiable again."""
    from torch.utils._python_dispatch import TorchDispatchMode

    require_backend("attention", "triton", DEVICE)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(f"{func.namespace}::{func.__name__}")
            return func(*args, **(kwargs or {}))

    q, k, v, _ = attention_inputs(1, 2, 1, 5, 7, 8, torch.float32, seed=27)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    with Ops() as seen:
        out = attention(*leaves, backend="triton")
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out), create_graph=True)
    assert not [name for name in seen.names if name.startswith("fastvl::")], seen.names
    assert not [name for name in seen.names if name.startswith("aten::zeros")], seen.names
    with pytest.raises(RuntimeError, match="does not require grad|twice"):
        torch.autograd.grad(grads[0].sum(), leaves[0])


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of"):
        attention(*_bad_inputs(), backend="flash")


def test_triton_not_supported_reasons():
    q, k, v = _bad_inputs()
    with pytest.raises(ValueError, match=r"attention: backend must be 'auto' or one of .*'cuda'"):
        attention(q, k, v, backend="cuda")  # attention has no cuda implementation
    require_backend("attention", "triton", q.device)
    with pytest.raises(BackendNotSupportedError,
                       match=r"q has dtype torch.float64; triton supports") as info:
        attention(q.double(), k.double(), v.double(), backend="triton")
    assert info.value.op == "attention" and info.value.reasons
    big = torch.zeros(1, 1, 2, 320)
    with pytest.raises(BackendNotSupportedError, match=r"head dim 320 is above triton's maximum 256"):
        attention(big, big, big, backend="triton")
    # auto falls back to torch for what triton cannot serve
    out = attention(big, big, big, backend="auto")
    assert out.shape == big.shape


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c[:6] + (torch.bfloat16, c[7]) for c in SWEEP], ids=_sweep_id)
def test_gpu_sweep_bf16(case):
    require_backend("attention", "triton")
    _run_case("triton", case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(
    "case",
    [
        (4, 12, 12, 197, 197, 64, {}),  # ViT-B/16 at 224
        (2, 16, 16, 577, 577, 64, dict(bias="b")),  # ViT-L at 384, ToMe sizes
        (2, 8, 8, 1025, 1025, 80, dict(causal=True)),
        (2, 6, 2, 577, 577, 88, dict(causal=True, causal_strength=0.3, bias="bh")),
        (2, 8, 4, 1025, 333, 128, dict(causal=True, prefix_len=(100, 0))),
        (2, 4, 4, 300, 1025, 256, dict(causal=True, bias="b")),
        (2, 4, 1, 577, 577, 128, dict(causal=True, prefix_len=(577, 257), bias="b")),
    ],
    ids=lambda c: f"q{c[3]}k{c[4]}d{c[5]}-{'-'.join(c[6])}" if isinstance(c, tuple) else None,
)
def test_gpu_large_shapes(dtype, case):
    require_backend("attention", "triton")
    _run_case("triton", case[:6] + (dtype, case[6]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama_gqa_causal(dtype):
    """LLaMA-style GQA: H 32, Hkv 8, N 2048, D 128, causal, forward and backward."""
    require_backend("attention", "triton")
    _check("triton", 1, 32, 8, 2048, 2048, 128, dtype, causal=True, seed=30)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [True, False], ids=["group-split", "group-loop"])
def test_gpu_deterministic_backward_is_bitwise_reproducible(split):
    """Deterministic mode: two backward passes give identical bits (atomics would not)."""
    require_backend("attention", "triton")
    from fastvl.kernels.attention_backward import forced_group_split

    q, k, v, bias = attention_inputs(2, 8, 2, 577, 577, 64, torch.bfloat16, 31, "b", None)
    leaves = [t.requires_grad_() for t in (q, k, v, bias)]
    grads = []
    with forced_group_split(split), deterministic_algorithms(True):
        for _ in range(2):
            out = attention(*leaves[:3], key_bias=leaves[3], causal=True, backend="triton")
            grads.append(torch.autograd.grad(out.float().square().sum(), leaves))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.gpu
def test_gpu_auto_uses_libraries_then_triton():
    from fastvl.ops.registry import OPS

    q = torch.zeros(1, 1, 3, 8, device="cuda", dtype=torch.float16)
    bias = torch.zeros(1, 3, device="cuda")
    plain = OPS["attention"].select("auto", q.device, q, q, q, None, None, 1.0, False, 1.0,
                                    False, None, 0.0)
    assert plain.__name__ in ("_flash_attn_impl", "_sdpa_impl")
    impl = OPS["attention"].select("auto", q.device, q, q, q, bias, None, 1.0, False, 1.0,
                                   False, None, 0.0)
    assert impl.__name__ == "_triton_impl"
