"""FlashAttention-2 style attention backward in Triton: five matrix products per tile.

Layouts, logits and masks as in :mod:`fastvl.kernels.attention` (whose helpers this uses).

1. Preprocess (one program per query block and head): ``delta = rowsum(dO * O) - dlse``,
   float32 laid out like lse, and the dQ accumulator's rows zeroed (no separate memset).
2. One program per key block and head (or kv head, see below), looping over the query blocks
   that see its keys (hard causal skips those entirely before the block), with key-major
   tiles (``BLOCK_N`` keys x ``BLOCK_M`` queries) so that no register tile is transposed:
   ``S^T = K Q^T``, ``P^T = exp2(S^T - lse)``, ``dV += P^T dO``, ``dP^T = V dO^T``,
   ``dS^T = P^T (dP^T - delta)``, ``dK += dS^T Q``, the key-bias gradient ``sum_i dS``, and
   ``dQ += dS K``, added to a float32 accumulator with atomics (the fifth product; float32
   inputs accumulate into dQ itself, half-precision ones into a scratch cast afterwards).
3. Deterministic mode (``torch.use_deterministic_algorithms(True)``): no atomics; step 2
   computes dK, dV and the bias gradient only, and a separate kernel computes dQ per query
   block, recomputing ``P`` and ``dP`` (seven products instead of five, in a fixed order).

GQA: with few key blocks to go round (fewer than :data:`_SPLIT_GROUP_WAVES` programs per SM,
as for LLaMA shapes), each program serves one query head and writes its dK/dV rows to a
float32 per-head buffer, which one more kernel sums over the group and casts (deterministic);
with many, each program loops over the group's query heads, summing in registers. Without
GQA each program serves one head, with no loop.

Head dims are padded to a power of two (>= 16) in registers, with masks (the forward's split
head-dim tiles are not used here: D 80 does 62.5% useful head-dim work).

A query row with no visible key has lse ``-inf``; the kernels read it as ``+inf``, so its
probabilities, and every gradient it contributes, are exactly 0.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastvl._outputs import empty_output
from fastvl.kernels import cdiv, gpu_arch, gpu_sizes, launchable, multiprocessors
from fastvl.kernels.attention import (
    LOG2E,
    _block_d,
    _bias_strides,
    _dot_precision,
    _key_bias2,
    _last_dim_contiguous,
    _layout,
    _load_prefix,
    _mask_params,
    _masked_logits,
    _rows,
    _sequence,
    _sequence_offset,
    _token_strides,
    _visible_key_end,
)

# Interpreted (CPU) launches: small blocks, different for queries and keys, so that the tests'
# small shapes span several blocks of each kind.
_INTERPRETER_BLOCKS = {"dkdv": (16, 32), "dq": (32, 16)}
# Split the GQA group over programs when the unsplit grid has fewer than this many programs
# per SM.
_SPLIT_GROUP_WAVES = 4


# GPU configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture, kernel kind
# and (float32 inputs, BLOCK_D >= 64), picked with the compile report (`python -m fastvl
# kernels`). Half precision: no spills, and on sm_90 >= 2 CTAs per SM at head dims 64 and 128
# with wgmma where BLOCK_N >= 64 (key-major tiles: the products' M dimension is BLOCK_N); head
# dim 256 fits without spills only with 32-key tiles, too small for wgmma (mma.sync instead).
# sm_80's mma.sync keeps the operands in registers: at head dim 128, 8 warps and one CTA per
# SM. float32 runs ieee dots on the CUDA cores, whose operands take far more registers:
# smaller tiles, and at head dims 128 / 256 a few bytes of spills remain on sm_80.
_SM90_CONFIGS = {
    "dkdv": {
        (False, 64): (32, 64, 4, 2), (False, 128): (16, 64, 4, 2), (False, 256): (16, 32, 4, 2),
        (True, 64): (16, 32, 4, 2), (True, 128): (16, 16, 4, 1), (True, 256): (16, 16, 8, 1),
    },
    "dq": {
        (False, 64): (128, 32, 8, 2), (False, 128): (64, 32, 4, 2), (False, 256): (32, 32, 4, 1),
        (True, 64): (32, 32, 4, 1), (True, 128): (32, 16, 4, 1), (True, 256): (16, 16, 4, 1),
    },
}
_GPU_CONFIGS = {
    90: _SM90_CONFIGS,
    80: {**_SM90_CONFIGS, "dkdv": {**_SM90_CONFIGS["dkdv"], (False, 128): (32, 64, 8, 2)}},
}


def _config(kind: str, head_dim: int, dtype: torch.dtype, device) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of one kernel kind: "dkdv" (with or without
    the atomic dQ) or "dq" (deterministic mode), for the device's architecture (sm_90's from
    sm_90 on, else sm_80's); small fixed blocks when interpreted."""
    if not gpu_sizes(device):
        return (*_INTERPRETER_BLOCKS[kind], 4, 1)
    per_arch = _GPU_CONFIGS[90 if gpu_arch(device) >= 90 else 80]
    return per_arch[kind][(dtype == torch.float32, max(64, _block_d(head_dim)))]


_FORCED_GROUP_SPLIT = None


@contextlib.contextmanager
def forced_group_split(split: bool):
    """Test hook: backward launches in the block split (True) or loop (False) the GQA group,
    whatever the shapes say."""
    global _FORCED_GROUP_SPLIT
    previous, _FORCED_GROUP_SPLIT = _FORCED_GROUP_SPLIT, bool(split)
    try:
        yield
    finally:
        _FORCED_GROUP_SPLIT = previous


def _split_group(group: int, key_blocks: int, batch_kv_heads: int, device) -> bool:
    """Whether the dK/dV programs serve one query head each (see the module docstring)."""
    if group == 1:
        return False
    if _FORCED_GROUP_SPLIT is not None:
        return _FORCED_GROUP_SPLIT
    return key_blocks * batch_kv_heads < _SPLIT_GROUP_WAVES * multiprocessors(device)


@triton.jit
def _attn_bwd_preprocess_kernel(
    out_ptr, dout_ptr, dlse_ptr, cu_q_ptr, delta_ptr, dq_acc_ptr,
    num_heads, num_queries, head_dim,
    stride_ob, stride_oh, stride_om,
    stride_db, stride_dh, stride_dm,
    stride_lb, stride_lh, stride_lm,
    HAS_DLSE: tl.constexpr, ZERO_DQ: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse, float32 and laid out like lse; zeroes the dQ
    accumulator's rows (contiguous, q's shape) when ZERO_DQ."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    first_q, num_queries = _sequence(cu_q_ptr, b, num_queries, VARLEN)
    if VARLEN:
        if start_m >= num_queries:
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < num_queries
    mask = m_valid[:, None] & (offs_d < head_dim)[None, :]
    o_ptrs = (out_ptr + _sequence_offset(b, first_q, stride_ob, stride_om, VARLEN)
              + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :])
    do_ptrs = (dout_ptr + _sequence_offset(b, first_q, stride_db, stride_dm, VARLEN)
               + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :])
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptrs, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = _rows(offs_m, bh, h, first_q, num_heads, num_queries, VARLEN)
    if HAS_DLSE:
        dlse_ptrs = (dlse_ptr + _sequence_offset(b, first_q, stride_lb, stride_lm, VARLEN)
                     + h * stride_lh + offs_m * stride_lm)
        delta -= tl.load(dlse_ptrs, mask=m_valid, other=0.0).to(tl.float32)
    tl.store(delta_ptr + row, delta, mask=m_valid)
    if ZERO_DQ:
        tl.store(dq_acc_ptr + row[:, None] * head_dim + offs_d[None, :],
                 tl.zeros([BLOCK_M, BLOCK_D], tl.float32), mask=mask)


@triton.jit
def _dkdv_one_head(
    dk, dv, k, v, h, b, q_seq_ptr, do_seq_ptr, bias_seq_ptr, lse_ptr, delta_ptr, dbias_ptr,
    dq_acc_ptr, offs_n, n_valid, start_m_lo, first_q, first_k, num_heads, num_queries,
    num_keys, head_dim, offset, prefix, stride_qh, stride_qm, stride_bh, stride_bn, stride_dh,
    stride_dm, qk_scale, future_bias, sm_scale,
    CAUSAL: tl.constexpr, SOFT: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DBIAS: tl.constexpr, VARLEN: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Query head h's part of one key block: (dk, dv) accumulated over its query blocks from
    ``start_m_lo``; stores its key-bias gradient and, with ATOMIC_DQ, adds its dQ."""
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    bh = b * num_heads + h
    q_base = q_seq_ptr + h * stride_qh
    do_base = do_seq_ptr + h * stride_dh
    kb2 = _key_bias2(bias_seq_ptr + h * stride_bh, offs_n, n_valid, stride_bn, HAS_BIAS, 0)
    dbias = tl.zeros([offs_n.shape[0]], tl.float32)
    for start_m in range(start_m_lo, num_queries, BLOCK_M):
        offs_m = start_m + offs_m0
        m_valid = offs_m < num_queries
        qt = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None],
                     mask=m_valid[None, :] & d_valid[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dm + offs_d[None, :],
                     mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        row = _rows(offs_m, bh, h, first_q, num_heads, num_queries, VARLEN)
        # Padded rows and rows without a visible key read lse = +inf, so their P is 0.
        lse = tl.load(lse_ptr + row, mask=m_valid, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        delta = tl.load(delta_ptr + row, mask=m_valid, other=0.0)
        qkt = tl.dot(k, qt, input_precision=DOT_PRECISION)
        st = _masked_logits(qkt * qk_scale + kb2, offs_m[None, :], offs_n[:, None], num_keys,
                            offset, prefix, future_bias, CAUSAL, SOFT, HAS_PREFIX)
        pt = tl.math.exp2(st - lse2[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        ds_in = dst.to(qt.dtype)
        dk += tl.dot(ds_in, tl.trans(qt), input_precision=DOT_PRECISION)
        if HAS_DBIAS:
            dbias += tl.sum(dst, 1)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_in), k, input_precision=DOT_PRECISION) * sm_scale
            tl.atomic_add(dq_acc_ptr + row[:, None] * head_dim + offs_d[None, :], dq,
                          mask=m_valid[:, None] & d_valid[None, :], sem="relaxed")
    if HAS_DBIAS:
        dbias_rows = _rows(offs_n, bh, h, first_k, num_heads, num_keys, VARLEN)
        tl.store(dbias_ptr + dbias_rows, dbias, mask=n_valid)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, prefix_ptr, cu_q_ptr, cu_k_ptr, dout_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, dbias_ptr, dq_acc_ptr,
    num_heads, num_kv_heads, group, num_queries, num_keys, head_dim,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bn,
    stride_db, stride_dh, stride_dm,
    qk_scale, future_bias, sm_scale,
    CAUSAL: tl.constexpr, SOFT: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr,
    SKIP: tl.constexpr, HAS_DBIAS: tl.constexpr, VARLEN: tl.constexpr,
    ONE_HEAD: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key block of one query head (ONE_HEAD: no GQA, or the group split; dK/dV rows per
    query head) or of one kv head (dK/dV summed over the group's query heads in registers):
    dK, dV, dbias per query head, and with ATOMIC_DQ the dQ contributions added to the float32
    accumulator (q's shape, contiguous)."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor passes Python floats as fp64
    future_bias = tl.cast(future_bias, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    start_n = tl.program_id(0) * BLOCK_N
    b_out = tl.program_id(1)  # b * (H if ONE_HEAD else Hkv) + head of the dK/dV rows
    if ONE_HEAD:
        num_out_heads = num_heads
    else:
        num_out_heads = num_kv_heads
    b = (b_out // num_out_heads).to(tl.int64)
    out_head = (b_out % num_out_heads).to(tl.int64)
    if ONE_HEAD:
        kvh = out_head // group
    else:
        kvh = out_head
    first_k, num_keys = _sequence(cu_k_ptr, b, num_keys, VARLEN)
    if VARLEN:
        if start_n >= num_keys:
            return
    first_q, num_queries = _sequence(cu_q_ptr, b, num_queries, VARLEN)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < num_keys
    kv_mask = n_valid[:, None] & (offs_d < head_dim)[None, :]
    k_base = k_ptr + _sequence_offset(b, first_k, stride_kb, stride_kn, VARLEN) + kvh * stride_kh
    v_base = v_ptr + _sequence_offset(b, first_k, stride_vb, stride_vn, VARLEN) + kvh * stride_vh
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    q_seq_ptr = q_ptr + _sequence_offset(b, first_q, stride_qb, stride_qm, VARLEN)
    do_seq_ptr = dout_ptr + _sequence_offset(b, first_q, stride_db, stride_dm, VARLEN)
    bias_seq_ptr = bias_ptr + _sequence_offset(b, first_k, stride_bb, stride_bn, VARLEN)
    prefix = 0
    if HAS_PREFIX:
        prefix = _load_prefix(prefix_ptr, b, num_keys)
    offset = num_keys - num_queries
    start_m_lo = 0
    if SKIP:
        # Queries before start_n - offset see none of these keys (unless they are a prefix).
        first = tl.maximum(start_n - offset, 0)
        if HAS_PREFIX:
            first = tl.where(start_n < prefix, 0, first)
        start_m_lo = (first // BLOCK_M) * BLOCK_M

    # Key-major tiles (BLOCK_N keys x BLOCK_M queries): S^T = K Q^T, so that dV += P^T dO and
    # dK += dS^T Q are plain products with no transposed register tiles.
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if ONE_HEAD:
        dk, dv = _dkdv_one_head(
            dk, dv, k, v, out_head, b, q_seq_ptr, do_seq_ptr, bias_seq_ptr, lse_ptr, delta_ptr,
            dbias_ptr, dq_acc_ptr, offs_n, n_valid, start_m_lo, first_q, first_k, num_heads,
            num_queries, num_keys, head_dim, offset, prefix, stride_qh, stride_qm, stride_bh,
            stride_bn, stride_dh, stride_dm, qk_scale, future_bias, sm_scale,
            CAUSAL, SOFT, HAS_PREFIX, HAS_BIAS, HAS_DBIAS, VARLEN, ATOMIC_DQ,
            BLOCK_M, BLOCK_D, DOT_PRECISION,
        )
    else:
        for h in range(kvh * group, kvh * group + group):
            dk, dv = _dkdv_one_head(
                dk, dv, k, v, h, b, q_seq_ptr, do_seq_ptr, bias_seq_ptr, lse_ptr, delta_ptr,
                dbias_ptr, dq_acc_ptr, offs_n, n_valid, start_m_lo, first_q, first_k,
                num_heads, num_queries, num_keys, head_dim, offset, prefix, stride_qh,
                stride_qm, stride_bh, stride_bn, stride_dh, stride_dm, qk_scale, future_bias,
                sm_scale, CAUSAL, SOFT, HAS_PREFIX, HAS_BIAS, HAS_DBIAS, VARLEN, ATOMIC_DQ,
                BLOCK_M, BLOCK_D, DOT_PRECISION,
            )

    kv_rows = _rows(offs_n, b_out, out_head, first_k, num_out_heads, num_keys, VARLEN)
    out_offs = kv_rows[:, None] * head_dim + offs_d[None, :]
    dk *= sm_scale
    tl.store(dk_ptr + out_offs, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, prefix_ptr, cu_q_ptr, cu_k_ptr, dout_ptr, lse_ptr, delta_ptr,
    dq_ptr,
    num_heads, group, num_queries, num_keys, head_dim,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bn,
    stride_db, stride_dh, stride_dm,
    qk_scale, future_bias, sm_scale,
    CAUSAL: tl.constexpr, SOFT: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr,
    SKIP: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Deterministic mode: one query block of one head, dQ = scale * sum_j dS K over the
    visible key blocks."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor passes Python floats as fp64
    future_bias = tl.cast(future_bias, tl.float32)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    first_q, num_queries = _sequence(cu_q_ptr, b, num_queries, VARLEN)
    if VARLEN:
        if start_m >= num_queries:
            return
    first_k, num_keys = _sequence(cu_k_ptr, b, num_keys, VARLEN)
    kvh = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    m_valid = offs_m < num_queries
    q_mask = m_valid[:, None] & d_valid[None, :]
    q_ptrs = (q_ptr + _sequence_offset(b, first_q, stride_qb, stride_qm, VARLEN)
              + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :])
    do_ptrs = (dout_ptr + _sequence_offset(b, first_q, stride_db, stride_dm, VARLEN)
               + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :])
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(do_ptrs, mask=q_mask, other=0.0)
    row = _rows(offs_m, bh, h, first_q, num_heads, num_queries, VARLEN)
    lse = tl.load(lse_ptr + row, mask=m_valid, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(delta_ptr + row, mask=m_valid, other=0.0)

    k_base = k_ptr + _sequence_offset(b, first_k, stride_kb, stride_kn, VARLEN) + kvh * stride_kh
    v_base = v_ptr + _sequence_offset(b, first_k, stride_vb, stride_vn, VARLEN) + kvh * stride_vh
    kt_ptrs = k_base + offs_n0[None, :] * stride_kn + offs_d[:, None]
    vt_ptrs = v_base + offs_n0[None, :] * stride_vn + offs_d[:, None]
    bias_row_ptr = (bias_ptr + _sequence_offset(b, first_k, stride_bb, stride_bn, VARLEN)
                    + h * stride_bh)
    prefix = 0
    if HAS_PREFIX:
        prefix = _load_prefix(prefix_ptr, b, num_keys)
    offset = num_keys - num_queries
    end_n = _visible_key_end(start_m, num_keys, offset, prefix, BLOCK_M, SKIP, HAS_PREFIX)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < num_keys
        t_mask = n_valid[None, :] & d_valid[:, None]
        kt = tl.load(kt_ptrs + start_n * stride_kn, mask=t_mask, other=0.0)
        vt = tl.load(vt_ptrs + start_n * stride_vn, mask=t_mask, other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        kb2 = _key_bias2(bias_row_ptr, offs_n, n_valid, stride_bn, HAS_BIAS, 1)
        s = _masked_logits(qk * qk_scale + kb2, offs_m[:, None], offs_n[None, :], num_keys,
                           offset, prefix, future_bias, CAUSAL, SOFT, HAS_PREFIX)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)

    tl.store(dq_ptr + row[:, None] * head_dim + offs_d[None, :],
             (dq * tl.cast(sm_scale, tl.float32)).to(dq_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _attn_bwd_group_sum_kernel(
    dkv_heads_ptr, dk_ptr, dv_ptr, num_rows, num_kv_heads, group, inner, head_dim,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK and dV rows = sums over the GQA group of the float32 per-query-head rows, cast.

    ``dkv_heads``: (2, outer, H, inner, D) contiguous, dK then dV (dense: outer B, inner Nk;
    packed: outer total_k, inner 1); dk / dv: (outer, Hkv, inner, D) contiguous, ``num_rows``
    rows of D each.
    """
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_valid = offs_r < num_rows
    mask = r_valid[:, None] & (offs_d < head_dim)[None, :]
    rows = offs_r.to(tl.int64)
    outer = rows // (num_kv_heads * inner)
    kvh_inner = rows % (num_kv_heads * inner)
    kvh = kvh_inner // inner
    first = outer * (num_kv_heads * group * inner) + kvh * (group * inner) + kvh_inner % inner
    half = num_rows * group * head_dim  # the dV part's offset
    dk = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for g in range(0, group):
        offs = (first + g * inner)[:, None] * head_dim + offs_d[None, :]
        dk += tl.load(dkv_heads_ptr + offs, mask=mask, other=0.0)
        dv += tl.load(dkv_heads_ptr + half + offs, mask=mask, other=0.0)
    out = rows[:, None] * head_dim + offs_d[None, :]
    tl.store(dk_ptr + out, dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=mask)


def attention_backward(grad_out, grad_lse, q, k, v, out, lse, key_bias, prefix_len,
                       scale: float, causal: bool, causal_strength: float, compute_dbias: bool,
                       cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int = 0,
                       max_seqlen_k: int = 0, *, eager: bool = False):
    """-> (dq, dk, dv, dbias): contiguous, in q's dtype; dbias float32 per head and key,
    (B, H, Nk) dense or (total_k, H) packed, or None.

    Dense or packed layout (see :mod:`fastvl.kernels.attention`). ``grad_lse`` (lse's shape,
    any strides, e.g. an expanded gradient of ``lse.sum()``), or None, adds the gradient of
    the returned lse. Deterministic (no atomics) when torch's deterministic algorithms are on.
    """
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    batch, num_queries, num_keys, cu_q, cu_k, varlen = _layout(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[-1]
    dtype, device = q.dtype, q.device
    dbias = None
    if compute_dbias:
        dbias_shape = (k.shape[0], heads) if varlen else (batch, heads, num_keys)
        dbias = empty_output(dbias_shape, dtype=torch.float32, device=device)
    if q.numel() == 0 or k.numel() == 0:
        # Nothing to attend to or from: every gradient is zero.
        grads = [empty_output(t.shape, dtype=dtype, device=device) for t in (q, k, v)]
        for t in (*grads, dbias):
            if t is not None:
                t.zero_()
        return (*grads, dbias)

    is_causal, soft, has_prefix, future_bias = _mask_params(causal, causal_strength, prefix_len)
    block_d = _block_d(head_dim)
    group = heads // kv_heads
    atomic_dq = not torch.are_deterministic_algorithms_enabled()
    bias_arg = key_bias if key_bias is not None else q
    prefix_arg = prefix_len if has_prefix else q
    common_strides = (
        *_token_strides(q, varlen), *_token_strides(k, varlen), *_token_strides(v, varlen),
        *_bias_strides(key_bias, varlen), *_token_strides(grad_out, varlen),
    )
    masks = dict(CAUSAL=is_causal, SOFT=soft, HAS_PREFIX=has_prefix,
                 HAS_BIAS=key_bias is not None, SKIP=is_causal and not soft, VARLEN=varlen)
    qk_scale = scale * 1.4426950408889634

    # dQ: accumulated by the atomics in float32 (for float32 inputs, dq itself), or written
    # by the dq kernel.
    dq_acc = empty_output(q.shape, dtype=torch.float32 if atomic_dq else dtype, device=device)
    delta = empty_output(lse.shape, dtype=torch.float32, device=device)
    delta_block = max(16, min(128, 8192 // block_d)) if gpu_sizes(device) else 16
    launchable(_attn_bwd_preprocess_kernel, wrap_triton, eager)[
        (cdiv(num_queries, delta_block), batch * heads)
    ](
        out, grad_out, grad_lse if grad_lse is not None else lse, cu_q, delta, dq_acc,
        heads, num_queries, head_dim,
        *_token_strides(out, varlen), *_token_strides(grad_out, varlen),
        *(_token_strides(grad_lse, varlen) if grad_lse is not None else (0, 0, 0)),
        HAS_DLSE=grad_lse is not None, ZERO_DQ=atomic_dq, VARLEN=varlen,
        BLOCK_M=delta_block, BLOCK_D=block_d,
    )

    block_m, block_n, warps, stages = _config("dkdv", head_dim, dtype, device)
    key_blocks = cdiv(num_keys, block_n)
    split = _split_group(group, key_blocks, batch * kv_heads, device)
    if split:  # float32 rows per query head, summed over the group below
        dkv = empty_output((2, *k.shape[:-2], heads, k.shape[-1]) if varlen else
                           (2, batch, heads, *k.shape[2:]), dtype=torch.float32, device=device)
        dk, dv = dkv[0], dkv[1]
    else:
        dk = empty_output(k.shape, dtype=dtype, device=device)
        dv = empty_output(v.shape, dtype=dtype, device=device)
    launchable(_attn_bwd_dkdv_kernel, wrap_triton, eager)[
        (key_blocks, batch * (kv_heads if group > 1 and not split else heads))
    ](
        q, k, v, bias_arg, prefix_arg, cu_q, cu_k, grad_out, lse, delta,
        dk, dv, dbias if dbias is not None else dk, dq_acc,
        heads, kv_heads, group, num_queries, num_keys, head_dim,
        *common_strides,
        qk_scale, future_bias, scale,
        **masks, HAS_DBIAS=dbias is not None, ONE_HEAD=split or group == 1, ATOMIC_DQ=atomic_dq,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(dtype),
        num_warps=warps, num_stages=stages,
    )
    if split:
        dk = empty_output(k.shape, dtype=dtype, device=device)
        dv = empty_output(v.shape, dtype=dtype, device=device)
        num_rows = k.numel() // head_dim
        sum_block = max(8, 2048 // block_d) if gpu_sizes(device) else 16  # few registers
        launchable(_attn_bwd_group_sum_kernel, wrap_triton, eager)[
            (cdiv(num_rows, sum_block),)
        ](
            dkv, dk, dv, num_rows, kv_heads, group, 1 if varlen else num_keys, head_dim,
            BLOCK_R=sum_block, BLOCK_D=block_d,
        )

    if atomic_dq:
        return dq_acc.to(dtype), dk, dv, dbias

    block_m, block_n, warps, stages = _config("dq", head_dim, dtype, device)
    launchable(_attn_bwd_dq_kernel, wrap_triton, eager)[
        (cdiv(num_queries, block_m), batch * heads)
    ](
        q, k, v, bias_arg, prefix_arg, cu_q, cu_k, grad_out, lse, delta, dq_acc,
        heads, group, num_queries, num_keys, head_dim,
        *common_strides,
        qk_scale, future_bias, scale,
        **masks,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(dtype),
        num_warps=warps, num_stages=stages,
    )
    return dq_acc, dk, dv, dbias
