"""The Triton attention forward's shape-decided layouts, forced on and off, vs float64.

* GQA packing (``PACK_GQA``): one program serves the query rows of a kv head's whole group,
  row r = token r // group of head r % group; chosen for H > Hkv with fewer than 64 queries
  per head, a head dim that is a multiple of 16 and a bias shared by the heads (or none).
* Split head dims (``BLOCK_DT``): a multiple of 16 that is not a power of two runs as a
  power-of-two main tile plus a power-of-two tail (80 = 64 + 16, 96 = 64 + 32, 48 = 32 + 16);
  40 (32 + 16, tail padded) only when forced.
* TMA loads (``TMA``): K / V tiles through tensor descriptors (out-of-bounds rows and head dims
  zero-filled, no masks); chosen on sm_90 for real tensors with 16-byte aligned rows, forced
  here in the interpreter.

Tolerance rule as in test_attention.py (flash-attn's): the max error against the independent
float64 reference of ``tests/samples_attention.py`` is at most 2x (forward: out, lse) / 3x
(gradients) the error of the same written-out math in the inputs' dtype, plus a small floor.
Outputs are poisoned (NaN) first. Which layout a launch used is read from its constexprs
(every forward launch is recorded), so a test cannot pass on the layout it did not mean.
Interpreted on a CPU: fp16 and fp32 only (``tl.dot`` on bf16 is wrong in the interpreter).
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from fastvl.ops import varlen_attention
from fastvl.ops.attention import attention
from fastvl.testing import (
    ERROR_FLOOR,
    assert_grads_within_reference_error,
    assert_lse_within_reference_error,
    assert_within_reference_error,
    poison_outputs,
    random_tensor,
)
from tests.conftest import DEVICE, require_backend
from tests.samples_attention import (
    attention_inputs, forward_tile_configs, reference_attention, reference_grads,
)

DTYPES = (torch.float32, torch.float16)


@pytest.fixture(autouse=True)
def _triton():
    require_backend("attention", "triton")


@contextlib.contextmanager
def _forward_launches():
    """The constexprs and grid of every forward launch in the block."""
    from fastvl.kernels import attention as kernels

    launches, launchable = [], kernels.launchable

    def recording(kernel, wrap, eager=False):
        target = launchable(kernel, wrap, eager)

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append({**kwargs, "grid": grid})
                    return target[grid](*args, **kwargs)

                return launch

        return _Grid()

    kernels.launchable = recording
    try:
        yield launches
    finally:
        kernels.launchable = launchable


@contextlib.contextmanager
def _layout(pack=None, split=None, config=None, tma=None):
    from fastvl.kernels.attention import forced_forward_config, forced_forward_layout

    with contextlib.ExitStack() as stack:
        stack.enter_context(forced_forward_layout(pack_gqa=pack, split_head_dim=split, tma=tma))
        if config is not None:
            stack.enter_context(forced_forward_config(config))
        yield stack.enter_context(_forward_launches())


def _expect_layout(launches, pack=None, split=None, tma=None):
    assert launches, "no forward launch"
    for launch in launches:
        if tma is not None:
            assert launch["TMA"] is tma, launch
        if pack is not None:
            assert launch["PACK_GQA"] is pack, launch
        if split is not None:
            assert (launch["BLOCK_DT"] > 0) is split, launch


def _check(batch, heads, kv_heads, nq, nk, head_dim, dtype, *, pack=None, split=None,
           config=None, tma=None, bias=None, prefix_len=None, seed=0, grads=False, **masks):
    """Forward (out, lse) vs float64 with the layouts forced; ``grads``: the backward too."""
    q, k, v, key_bias = attention_inputs(batch, heads, kv_heads, nq, nk, head_dim, dtype, seed,
                                         bias)
    inputs = [q, k, v] + ([key_bias] if key_bias is not None else [])
    leaves = [t.detach().clone().requires_grad_(grads) for t in inputs]
    with _layout(pack, split, config, tma) as launches, poison_outputs():
        out, lse = attention(*leaves[:3], key_bias=leaves[3] if key_bias is not None else None,
                             prefix_len=prefix_len, return_lse=True, backend="triton", **masks)
    _expect_layout(launches, pack, split, tma)
    ref_masks = dict(masks)
    if prefix_len is not None:
        ref_masks["prefix_len"] = torch.as_tensor(prefix_len, device=DEVICE).expand(batch)
    out64, lse64 = reference_attention(q, k, v, key_bias=key_bias, **ref_masks)
    out_low, lse_low = reference_attention(q, k, v, key_bias=key_bias, low=True, **ref_masks)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    assert_within_reference_error(out, out64, out_low, factor=2, atol=ERROR_FLOOR[dtype],
                                  name="out")
    assert_lse_within_reference_error(lse, lse64, lse_low, dtype)
    if not grads:
        return
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1000)
    grad_out = random_tensor(*out.shape, dtype=dtype, device=DEVICE, generator=g)
    grad_lse = random_tensor(*lse.shape, dtype=torch.float32, device=DEVICE, generator=g)
    with poison_outputs():
        got = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse))
    want64 = reference_grads(grad_out, grad_lse, inputs, **ref_masks)
    want_low = reference_grads(grad_out, grad_lse, inputs, low=True, **ref_masks)
    assert_grads_within_reference_error(("dq", "dk", "dv", "dkey_bias"), got, want64, want_low,
                                        atol=ERROR_FLOOR[dtype] * 10)


# ---- GQA packing ---------------------------------------------------------------------------

# Every (Nq, Nk) of {1, 7, 33} x {1, 7, 50}, with the masks, groups (2, 4), head dims (split
# and not) and dtypes spread over them; Nq > Nk gives causal rows with no visible key.
_MASKS = [
    dict(causal=True),
    dict(causal=True, causal_strength=0.5),
    dict(causal=True, prefix_len=3),
    dict(bias="b"),
    dict(causal=True, bias="b"),
    dict(),
]
PACK_CASES = [
    (2, 4, 4 // group, nq, nk, head_dim, dtype, opts)
    for (nq, nk), group, head_dim, dtype, opts in zip(
        itertools.product((1, 7, 33), (1, 7, 50)),
        itertools.cycle((2, 4, 4)),
        itertools.cycle((64, 80, 96, 48)),
        itertools.cycle(DTYPES),
        itertools.cycle(_MASKS),
    )
]


def _case_id(case):
    batch, heads, kv_heads, nq, nk, head_dim, dtype, opts = case
    tag = "-".join(f"{k}={v}" for k, v in opts.items())
    return (f"h{heads}kv{kv_heads}-q{nq}k{nk}-d{head_dim}-{str(dtype)[6:]}"
            + (f"-{tag}" if tag else ""))


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("case", PACK_CASES, ids=_case_id)
def test_gqa_packing(case, pack):
    batch, heads, kv_heads, nq, nk, head_dim, dtype, opts = case
    _check(batch, heads, kv_heads, nq, nk, head_dim, dtype, pack=pack, seed=nq * 100 + nk,
           **opts)


@pytest.mark.parametrize("case", PACK_CASES, ids=_case_id)
def test_tma_loads(case):
    """K / V through tensor descriptors, layouts by the rules: every mask, Nq > Nk rows with no
    visible key, split and power-of-two head dims."""
    batch, heads, kv_heads, nq, nk, head_dim, dtype, opts = case
    _check(batch, heads, kv_heads, nq, nk, head_dim, dtype, tma=True, seed=nq * 100 + nk,
           **opts)


def test_tma_rule():
    """TMA loads on sm_90 (recorded here with its launch sizes), never on sm_80, never for
    rows that are not 16-byte aligned (even forced), never for fake (traced) tensors."""
    from fastvl import triton_aot
    from fastvl.kernels.attention import _use_tma, forced_forward_layout
    from torch._subclasses.fake_tensor import FakeTensorMode

    cpu = torch.device("cpu")
    k = torch.zeros(1, 2, 8, 64, dtype=torch.float16)
    odd = torch.zeros(1, 2, 8, 36, dtype=torch.float16)  # 72-byte rows
    assert not _use_tma(k, k, cpu)
    with triton_aot.gpu_launch_sizes(90):
        assert _use_tma(k, k, cpu) and not _use_tma(odd, odd, cpu)
        assert _use_tma(k[..., 1:, :], k, cpu)  # a view 128 bytes in: aligned
        shifted = torch.zeros(1 + k.numel(), dtype=torch.float16)[1:].view(k.shape)
        assert not _use_tma(k, shifted, cpu)  # a data pointer 2 bytes off
        with FakeTensorMode() as mode:
            assert not _use_tma(mode.from_tensor(k), mode.from_tensor(k), cpu)
    with triton_aot.gpu_launch_sizes(80):
        assert not _use_tma(k, k, cpu)
    with forced_forward_layout(tma=True):
        assert _use_tma(k, k, cpu) and not _use_tma(odd, odd, cpu)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packing_without_groups(dtype):
    """H == Hkv: the rule does not pack; forced, a group of one is the plain layout."""
    _check(2, 2, 2, 7, 50, 64, dtype, pack=None, causal=True)
    with _layout() as launches:
        attention(*attention_inputs(1, 2, 2, 7, 50, 64, dtype, 0)[:3], backend="triton")
    _expect_layout(launches, pack=False)
    _check(2, 2, 2, 33, 50, 80, dtype, pack=True, causal=True, bias="b")


def test_per_head_bias_is_not_packed():
    """A (B, H, Nk) key bias differs per row of a packed block: never packed, even forced."""
    with _layout(pack=True) as launches:
        q, k, v, bias = attention_inputs(1, 4, 2, 7, 50, 64, torch.float32, 0, bias="bh")
        attention(q, k, v, key_bias=bias, backend="triton")
    _expect_layout(launches, pack=False)
    _check(2, 4, 2, 7, 50, 64, torch.float32, pack=False, bias="bh", causal=True)


def test_pack_rule():
    """Packed: H > Hkv, Nq < 64 (or max_seqlen_q < 64), head dim a multiple of 16, no
    per-head bias; the grid covers Nq * group rows of B * Hkv heads."""
    from fastvl.kernels.attention import _INTERPRETER_FWD_BLOCKS

    block_m = _INTERPRETER_FWD_BLOCKS[0]
    for (heads, kv_heads, nq, head_dim, bias), packed in [
        ((4, 2, 7, 32, None), True), ((4, 1, 63, 32, "b"), True), ((4, 2, 64, 32, None), False),
        ((4, 4, 7, 32, None), False), ((4, 2, 7, 32, "bh"), False), ((4, 2, 7, 40, None), False),
    ]:
        q, k, v, key_bias = attention_inputs(2, heads, kv_heads, nq, 9, head_dim, torch.float32,
                                             0, bias)
        with _layout() as launches, torch.no_grad():
            attention(q, k, v, key_bias=key_bias, backend="triton")
        _expect_layout(launches, pack=packed)
        rows, grid_heads = (nq * heads // kv_heads, kv_heads) if packed else (nq, heads)
        assert launches[0]["grid"] == (-(-rows // block_m), 2 * grid_heads)


def test_strided_packed_inputs():
    """Packed rows gather q by (token, head) strides: (B, N, H, D) memory viewed as
    (B, H, N, D), and a non-contiguous k / v."""
    g = torch.Generator(device=DEVICE).manual_seed(5)
    q = random_tensor(2, 33, 4, 80, device=DEVICE, generator=g).transpose(1, 2)
    kv = random_tensor(2, 50, 2, 2, 80, device=DEVICE, generator=g)
    k, v = kv[:, :, :, 0].transpose(1, 2), kv[:, :, :, 1].transpose(1, 2)
    with _layout(pack=True, split=True) as launches, poison_outputs():
        out, lse = attention(q, k, v, causal=True, return_lse=True, backend="triton")
    _expect_layout(launches, pack=True, split=True)
    out64, lse64 = reference_attention(q, k, v, causal=True)
    out_low, lse_low = reference_attention(q, k, v, causal=True, low=True)
    assert_within_reference_error(out, out64, out_low, atol=ERROR_FLOOR[torch.float32])
    assert_lse_within_reference_error(lse, lse64, lse_low, torch.float32)


def test_packed_forward_gradients():
    """A packed (and split) forward's out / lse feed the unchanged backward."""
    _check(2, 4, 2, 7, 50, 80, torch.float32, pack=True, split=True, causal=True, bias="b",
           grads=True)


# ---- split head dims -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [True, False], ids=["split", "padded"])
@pytest.mark.parametrize("head_dim", [80, 96, 48, 40])
def test_split_head_dims(head_dim, split, dtype):
    _check(2, 2, 1, 33, 50, head_dim, dtype, pack=False, split=split, causal=True,
           prefix_len=5, seed=head_dim)


def test_split_rule():
    """Split multiples of 16 where main + tail is narrower than the padded power of two; never
    powers of two (64: unchanged), where it saves nothing (112 = 64 + 64) or unaligned head
    dims (40, 88: forced only)."""
    from fastvl.kernels.attention import _head_dim_tiles

    assert _head_dim_tiles(80) == (64, 16) and _head_dim_tiles(96) == (64, 32)
    assert _head_dim_tiles(48) == (32, 16) and _head_dim_tiles(160) == (128, 32)
    assert _head_dim_tiles(64) == (64, 0) and _head_dim_tiles(112) == (128, 0)
    assert _head_dim_tiles(40) == (64, 0) and _head_dim_tiles(88) == (128, 0)  # unaligned
    assert _head_dim_tiles(16) == (16, 0) and _head_dim_tiles(24) == (32, 0)
    for head_dim, split in ((80, True), (64, False), (112, False)):
        with _layout() as launches, torch.no_grad():
            attention(*attention_inputs(1, 2, 2, 7, 9, head_dim, torch.float16, 0)[:3],
                      backend="triton")
        _expect_layout(launches, split=split)


# ---- every GPU configuration, both layouts -------------------------------------------------


def _packed_configs(head_dim, dtype):
    from fastvl.kernels.attention import forward_configs

    return forward_configs(head_dim, dtype, pack_gqa=True)


@pytest.mark.parametrize(
    "dtype, config",
    [(dtype, config) for dtype in DTYPES for config in forward_tile_configs(80, dtype)],
    ids=lambda x: str(x)[6:] if isinstance(x, torch.dtype) else "m{}n{}w{}s{}".format(*x),
)
def test_forward_configs(dtype, config):
    """Each GPU configuration of the per-head layout (forced), split and padded, TMA loads
    (as sm_90 runs them) and pointer loads."""
    _check(1, 4, 1, 33, 50, 80, dtype, pack=False, split=True, config=config, causal=True,
           bias="b", tma=True)
    _check(1, 4, 1, 33, 50, 80, dtype, pack=False, split=True, config=config, causal=True,
           bias="b", tma=False)
    _check(1, 2, 1, 7, 50, 80, dtype, pack=False, split=False, config=config,
           causal=True, causal_strength=0.5)


@pytest.mark.parametrize(
    "dtype, head_dim, config",
    [(dtype, head_dim, config) for dtype in DTYPES for head_dim in (80, 64)
     for config in _packed_configs(head_dim, dtype)],
    ids=lambda x: (str(x)[6:] if isinstance(x, torch.dtype) else
                   f"d{x}" if isinstance(x, int) else "m{}n{}w{}s{}".format(*x)),
)
def test_packed_forward_configs(dtype, head_dim, config):
    """Each GPU configuration of packed launches (forced): a block holding part of a token's
    heads (33 x 4 rows), and decode (one query, group 2)."""
    _check(1, 4, 1, 33, 50, head_dim, dtype, pack=True, config=config, causal=True, bias="b",
           tma=True)
    _check(2, 4, 2, 1, 50, head_dim, dtype, pack=True, config=config, causal=True)


def test_packed_config_lists():
    """Packed launches autotune over their own list (64-row tiles for half precision, the
    fp32 tiles as unpacked); the unpacked lists stay keyed by the padded head dim."""
    from fastvl.kernels.attention import forward_configs

    assert forward_configs(80, torch.float16, pack_gqa=True) == forward_configs(
        128, torch.float16, pack_gqa=True)
    assert all(c[0] == 64 for c in forward_configs(64, torch.float16, pack_gqa=True))
    assert forward_configs(80, torch.float16, 90) == forward_configs(128, torch.float16, 90)
    assert (64, 128, 8, 2) not in forward_configs(96, torch.float16, 80)
    assert forward_configs(80, torch.float16, 80) == forward_configs(128, torch.float16, 80)


# ---- packed variable-length batches --------------------------------------------------------


def _varlen_reference(q, k, v, cu_q, cu_k, key_bias, low, **masks):
    outs, lses = [], []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bq) - 1):
        rows, keys = slice(bq[b], bq[b + 1]), slice(bk[b], bk[b + 1])
        bias = None if key_bias is None else key_bias[keys][None]
        prefix = masks.pop("prefix_len", None)
        out, lse = reference_attention(
            q[rows].transpose(0, 1)[None], k[keys].transpose(0, 1)[None],
            v[keys].transpose(0, 1)[None], key_bias=bias, low=low,
            prefix_len=None if prefix is None else prefix[b:b + 1], **masks,
        )
        masks["prefix_len"] = prefix
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].T)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("dtype, head_dim", [(torch.float16, 80), (torch.float32, 48),
                                             (torch.float16, 64)])
def test_varlen(pack, dtype, head_dim, tma):
    """Sequences of (1, 33, 0, 7) queries over (7, 50, 3, 1) keys, group 2, shared bias."""
    require_backend("varlen_attention", "triton")
    lengths_q, lengths_k = (1, 33, 0, 7), (7, 50, 3, 1)
    g = torch.Generator(device=DEVICE).manual_seed(head_dim)
    q = random_tensor(sum(lengths_q), 4, head_dim, dtype=dtype, device=DEVICE, generator=g)
    k, v = (random_tensor(sum(lengths_k), 2, head_dim, dtype=dtype, device=DEVICE, generator=g)
            for _ in range(2))
    key_bias = random_tensor(sum(lengths_k), dtype=dtype, device=DEVICE, generator=g)
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device=DEVICE)
                  for n in (lengths_q, lengths_k))
    prefix = torch.tensor([0, 4, 1, 0], device=DEVICE)
    masks = dict(causal=True, prefix_len=prefix)
    with _layout(pack=pack, tma=tma) as launches, poison_outputs():
        out, lse = varlen_attention(q, k, v, cu_q, cu_k, 33, 50, key_bias=key_bias,
                                    return_lse=True, backend="triton", **masks)
    _expect_layout(launches, pack=pack, split=head_dim != 64, tma=tma)
    out64, lse64 = _varlen_reference(q, k, v, cu_q, cu_k, key_bias, False, **masks)
    out_low, lse_low = _varlen_reference(q, k, v, cu_q, cu_k, key_bias, True, **masks)
    assert_within_reference_error(out, out64, out_low, atol=ERROR_FLOOR[dtype], name="out")
    assert_lse_within_reference_error(lse, lse64, lse_low, dtype)


def test_useful_share_counts_the_layouts():
    """The kernel report's useful share: packed rows are Nq x group, a split head dim pads to
    BLOCK_D + BLOCK_DT."""
    from fastvl.kernel_report import useful_share

    values = {"num_queries": 7, "num_keys": 64, "head_dim": 80, "group": 4}
    packed = {"values": values, "constants": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64,
                                              "BLOCK_DT": 16, "PACK_GQA": True}}
    plain = {"values": values, "constants": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128,
                                             "BLOCK_DT": 0, "PACK_GQA": False}}
    assert useful_share(packed) == pytest.approx(28 / 64)
    assert useful_share(plain) == pytest.approx(7 / 64 * 80 / 128)


# ---- GPU: bf16, forward and backward, each layout ------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("case", PACK_CASES, ids=_case_id)
def test_gpu_layouts_bf16(case, tma):
    """bf16 (wrong in the interpreter, so GPU only) through the layouts the rules pick, with
    TMA loads forced on and off (off is what sm_80 runs), forward and backward."""
    batch, heads, kv_heads, nq, nk, head_dim, _, opts = case
    _check(batch, heads, kv_heads, nq, nk, head_dim, torch.bfloat16, tma=tma, grads=True,
           seed=nq * 100 + nk, **opts)
