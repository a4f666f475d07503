"""FlashAttention-2 style attention in Triton: forward, and backward in three kernels.

Shapes: q (B, H, Nq, D), k/v (B, Hkv, Nk, D), query head h reads kv head h // (H // Hkv).
Any batch/head/token strides are served; the last dim must be contiguous (the launchers copy
otherwise). D is padded to a power of two (>= 16) in registers, with masks.

Logits are kept in base 2: ``s2 = log2(e) * (scale * q.k + key_bias + mask)``, so softmax uses
``exp2``. ``lse`` (natural log) is stored per query row in float32. The masks (see
:mod:`fastvl.reference.attention` for the exact definition, ``offset = Nk - Nq``):

* hard causal: key j is masked for query i when ``j > i + offset`` (bottom-right aligned),
  unless ``j < prefix_len[b]`` (prefix-LM); key blocks entirely in the future of a query
  block are skipped (forward and dQ), as are query blocks entirely before a key block (dK/dV);
* soft causal (0 < strength < 1): the same future keys get ``log(1 - strength)`` added and
  nothing is skipped.

A query row with no visible key keeps ``m = -inf``; the exponentials are then shifted by 0
(never ``-inf - -inf``), so the row's sum is 0, its output 0, its lse -inf and, in backward,
its probabilities are exactly 0 (the kernels read its lse as +inf).

Backward: ``delta = rowsum(dO * O) - dlse`` (preprocess kernel), then one kernel per key
block (all query heads of the kv group looped inside, so GQA needs no atomics and no extra
memory) for dK, dV and the per-head key-bias gradient ``sum_i dS``, then one kernel per query
block for dQ, each recomputing ``P = exp(S - lse)`` and ``dS = P * (dP - delta)``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastvl._outputs import empty_output

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Interpreted (CPU) launches use small blocks, different for queries and keys, so that the
# tests' small shapes still span several blocks of each kind.
_INTERPRETER_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _config(kind: str, head_dim: int, dtype: torch.dtype, device: torch.device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one kernel kind."""
    if device.type != "cuda":
        block_m, block_n = _INTERPRETER_BLOCKS[kind]
        return block_m, block_n, 4, 1
    block_d = _block_d(head_dim)
    wide = block_d * (2 if dtype == torch.float32 else 1)  # fp32 tiles need 2x registers/smem
    if kind == "fwd":
        if wide <= 64:
            return 128, 64, 4, 3
        if wide <= 128:
            return 128, 64, 8, 3
        return 64, 32, 4, 2
    if kind == "dkdv":
        if wide <= 64:
            return 64, 128, 8, 2
        if wide <= 128:
            return 32, 128, 8, 2
        return 32, 32, 4, 1
    if wide <= 64:  # dq
        return 128, 64, 8, 2
    if wide <= 128:
        return 128, 32, 8, 2
    return 32, 32, 4, 1


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs must not be rounded to tf32 (ieee); Triton ignores it for fp16/bf16.
    return "ieee"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _bias_strides(key_bias):
    """(batch, head, key) strides of key_bias; head stride 0 for a (B, Nk) bias shared by heads."""
    if key_bias is None:
        return 0, 0, 0
    if key_bias.dim() == 2:
        return key_bias.stride(0), 0, key_bias.stride(1)
    return key_bias.stride(0), key_bias.stride(1), key_bias.stride(2)


def _mask_params(causal: bool, causal_strength: float, prefix_len):
    """(CAUSAL, SOFT, HAS_PREFIX, future_bias in base 2) of a call."""
    strength = float(causal_strength)
    if not causal or strength <= 0.0:
        return False, False, False, 0.0
    soft = strength < 1.0
    future_bias = math.log1p(-strength) * 1.4426950408889634 if soft else 0.0
    return True, soft, prefix_len is not None, future_bias


@triton.jit
def _masked_logits(
    qk, q_idx, k_idx, num_keys, offset, prefix, bias_row_ptr, stride_bn,
    qk_scale, future_bias,
    CAUSAL: tl.constexpr, SOFT: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Base-2 logits of one tile with bias and masks; -inf = masked.

    ``q_idx`` / ``k_idx``: the query / key indices as 2D tensors broadcasting to the tile,
    (M, 1) and (1, N) for a query-major tile, (1, M) and (N, 1) for a key-major one.
    """
    key_valid = k_idx < num_keys
    s = qk * qk_scale
    if HAS_BIAS:
        kb = tl.load(bias_row_ptr + k_idx * stride_bn, mask=key_valid, other=0.0)
        s += kb.to(tl.float32) * LOG2E
    if CAUSAL:
        future = k_idx > q_idx + offset
        if HAS_PREFIX:
            future = future & (k_idx >= prefix)
        if SOFT:
            s = tl.where(future, s + future_bias, s)
        else:
            s = tl.where(future, float("-inf"), s)
    return tl.where(key_valid, s, float("-inf"))


@triton.jit
def _load_prefix(prefix_ptr, b, num_keys):
    """prefix_len[b] clamped to [0, Nk] (any integer dtype, so int64 values never wrap)."""
    prefix = tl.load(prefix_ptr + b)
    return tl.minimum(tl.maximum(prefix, 0), num_keys).to(tl.int32)


@triton.jit
def _visible_key_end(start_m, num_keys, offset, prefix, BLOCK_M: tl.constexpr,
                     SKIP: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """Exclusive end of the keys that queries [start_m, start_m + BLOCK_M) may see."""
    if SKIP:
        end = tl.minimum(num_keys, start_m + BLOCK_M + offset)
        if HAS_PREFIX:
            end = tl.maximum(end, tl.minimum(prefix, num_keys))
        return tl.maximum(end, 0)
    else:
        return num_keys


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, prefix_ptr, out_ptr, lse_ptr,
    num_heads, group, num_queries, num_keys, head_dim,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bn,
    qk_scale, future_bias,
    CAUSAL: tl.constexpr, SOFT: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr,
    SKIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor passes Python floats as fp64
    future_bias = tl.cast(future_bias, tl.float32)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    kvh = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    m_valid = offs_m < num_queries

    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=m_valid[:, None] & d_valid[None, :], other=0.0,
    )
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    kt_ptrs = k_base + offs_n0[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = v_base + offs_n0[:, None] * stride_vn + offs_d[None, :]
    bias_row_ptr = bias_ptr + b * stride_bb + h * stride_bh
    prefix = 0
    if HAS_PREFIX:
        prefix = _load_prefix(prefix_ptr, b, num_keys)
    offset = num_keys - num_queries
    end_n = _visible_key_end(start_m, num_keys, offset, prefix, BLOCK_M, SKIP, HAS_PREFIX)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < num_keys
        kt = tl.load(kt_ptrs + start_n * stride_kn, mask=n_valid[None, :] & d_valid[:, None],
                     other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        s = _masked_logits(qk, offs_m[:, None], offs_n[None, :], num_keys, offset, prefix,
                           bias_row_ptr, stride_bn, qk_scale, future_bias,
                           CAUSAL, SOFT, HAS_PREFIX, HAS_BIAS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Shift a still fully masked row by 0: exp2(-inf - 0) = 0, never exp2(-inf + inf).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - shift[:, None])
        rescale = tl.math.exp2(m_i - shift)
        l_i = l_i * rescale + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=n_valid[:, None] & d_valid[None, :],
                    other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    row = bh.to(tl.int64) * num_queries + offs_m
    tl.store(lse_ptr + row, lse, mask=m_valid)
    tl.store(
        out_ptr + row[:, None] * head_dim + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_valid[:, None] & d_valid[None, :],
    )


@triton.jit
def _attn_bwd_delta_kernel(
    out_ptr, dout_ptr, dlse_ptr, delta_ptr,
    num_heads, num_queries, head_dim,
    stride_ob, stride_oh, stride_om,
    stride_db, stride_dh, stride_dm,
    stride_lb, stride_lh, stride_lm,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse, float32 (B, H, Nq) contiguous."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < num_queries
    mask = m_valid[:, None] & (offs_d < head_dim)[None, :]
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    do_ptrs = (dout_ptr + b * stride_db + h * stride_dh
               + offs_m[:, None] * stride_dm + offs_d[None, :])
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptrs, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = bh.to(tl.int64) * num_queries + offs_m
    if HAS_DLSE:
        dlse_ptrs = dlse_ptr + b * stride_lb + h * stride_lh + offs_m * stride_lm
        delta -= tl.load(dlse_ptrs, mask=m_valid, other=0.0).to(tl.float32)
    tl.store(delta_ptr + row, delta, mask=m_valid)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, prefix_ptr, dout_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, dbias_ptr,
    num_heads, num_kv_heads, group, num_queries, num_keys, head_dim,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bn,
    stride_db, stride_dh, stride_dm,
    qk_scale, future_bias, sm_scale,
    CAUSAL: tl.constexpr, SOFT: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr,
    SKIP: tl.constexpr, HAS_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key block of one kv head: dK, dV summed over the group's query heads, dbias per head."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor passes Python floats as fp64
    future_bias = tl.cast(future_bias, tl.float32)
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b = (bkv // num_kv_heads).to(tl.int64)
    kvh = (bkv % num_kv_heads).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    n_valid = offs_n < num_keys
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
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
    for g in range(0, group):
        h = kvh * group + g
        bh = b * num_heads + h
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = dout_ptr + b * stride_db + h * stride_dh
        bias_row_ptr = bias_ptr + b * stride_bb + h * stride_bh
        dbias = tl.zeros([BLOCK_N], tl.float32)
        for start_m in range(start_m_lo, num_queries, BLOCK_M):
            offs_m = start_m + offs_m0
            m_valid = offs_m < num_queries
            qt = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None],
                         mask=m_valid[None, :] & d_valid[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dm + offs_d[None, :],
                         mask=m_valid[:, None] & d_valid[None, :], other=0.0)
            row = bh * num_queries + offs_m
            # Padded rows and rows without a visible key read lse = +inf, so their P is 0.
            lse = tl.load(lse_ptr + row, mask=m_valid, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
            delta = tl.load(delta_ptr + row, mask=m_valid, other=0.0)
            qkt = tl.dot(k, qt, input_precision=DOT_PRECISION)
            st = _masked_logits(qkt, offs_m[None, :], offs_n[:, None], num_keys, offset, prefix,
                                bias_row_ptr, stride_bn, qk_scale, future_bias,
                                CAUSAL, SOFT, HAS_PREFIX, HAS_BIAS)
            pt = tl.math.exp2(st - lse2[None, :])
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
            if HAS_DBIAS:
                dbias += tl.sum(dst, 1)
        if HAS_DBIAS:
            tl.store(dbias_ptr + bh * num_keys + offs_n, dbias, mask=n_valid)

    out_offs = (bkv.to(tl.int64) * num_keys + offs_n[:, None]) * head_dim + offs_d[None, :]
    dk *= tl.cast(sm_scale, tl.float32)
    tl.store(dk_ptr + out_offs, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, prefix_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    num_heads, group, num_queries, num_keys, head_dim,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bn,
    stride_db, stride_dh, stride_dm,
    qk_scale, future_bias, sm_scale,
    CAUSAL: tl.constexpr, SOFT: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr,
    SKIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One query block of one head: dQ = scale * sum_j dS K, over the visible key blocks."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor passes Python floats as fp64
    future_bias = tl.cast(future_bias, tl.float32)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    kvh = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    m_valid = offs_m < num_queries
    q_mask = m_valid[:, None] & d_valid[None, :]
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    do_ptrs = (dout_ptr + b * stride_db + h * stride_dh
               + offs_m[:, None] * stride_dm + offs_d[None, :])
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(do_ptrs, mask=q_mask, other=0.0)
    row = bh.to(tl.int64) * num_queries + offs_m
    lse = tl.load(lse_ptr + row, mask=m_valid, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(delta_ptr + row, mask=m_valid, other=0.0)

    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    kt_ptrs = k_base + offs_n0[None, :] * stride_kn + offs_d[:, None]
    vt_ptrs = v_base + offs_n0[None, :] * stride_vn + offs_d[:, None]
    bias_row_ptr = bias_ptr + b * stride_bb + h * stride_bh
    prefix = 0
    if HAS_PREFIX:
        prefix = _load_prefix(prefix_ptr, b, num_keys)
    offset = num_keys - num_queries
    end_n = _visible_key_end(start_m, num_keys, offset, prefix, BLOCK_M, SKIP, HAS_PREFIX)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + offs_n0
        t_mask = (offs_n < num_keys)[None, :] & d_valid[:, None]
        kt = tl.load(kt_ptrs + start_n * stride_kn, mask=t_mask, other=0.0)
        vt = tl.load(vt_ptrs + start_n * stride_vn, mask=t_mask, other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        s = _masked_logits(qk, offs_m[:, None], offs_n[None, :], num_keys, offset, prefix,
                           bias_row_ptr, stride_bn, qk_scale, future_bias,
                           CAUSAL, SOFT, HAS_PREFIX, HAS_BIAS)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)

    tl.store(dq_ptr + row[:, None] * head_dim + offs_d[None, :],
             (dq * tl.cast(sm_scale, tl.float32)).to(dq_ptr.dtype.element_ty), mask=q_mask)


# ---- launchers ---------------------------------------------------------------------------


def attention_forward(q, k, v, key_bias, prefix_len, scale: float, causal: bool,
                      causal_strength: float):
    """-> (out (B, H, Nq, D) contiguous in q's dtype, lse (B, H, Nq) float32).

    ``key_bias``: None, (B, Nk) or (B, H, Nk), any float dtype and strides. ``prefix_len``:
    None or an integer (B,) tensor (used only with a hard or soft causal mask).
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    batch, heads, num_queries, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    out = empty_output((batch, heads, num_queries, head_dim), dtype=q.dtype, device=q.device)
    lse = empty_output((batch, heads, num_queries), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        if lse.numel():
            lse.fill_(float("-inf"))
        return out, lse
    is_causal, soft, has_prefix, future_bias = _mask_params(causal, causal_strength, prefix_len)
    block_m, block_n, warps, stages = _config("fwd", head_dim, q.dtype, q.device)
    grid = (triton.cdiv(num_queries, block_m), batch * heads)
    wrap_triton(_attn_fwd_kernel)[grid](
        q, k, v,
        key_bias if key_bias is not None else q,
        prefix_len if has_prefix else q,
        out, lse,
        heads, heads // kv_heads, num_queries, num_keys, head_dim,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *_bias_strides(key_bias),
        scale * 1.4426950408889634, future_bias,
        CAUSAL=is_causal, SOFT=soft, HAS_PREFIX=has_prefix, HAS_BIAS=key_bias is not None,
        SKIP=is_causal and not soft,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim),
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def attention_backward(grad_out, grad_lse, q, k, v, out, lse, key_bias, prefix_len,
                       scale: float, causal: bool, causal_strength: float, compute_dbias: bool):
    """-> (dq, dk, dv, dbias): contiguous, in q's dtype; dbias float32 (B, H, Nk) or None.

    ``grad_lse`` (B, H, Nq), any strides (e.g. an expanded gradient of ``lse.sum()``), or
    None adds the gradient of the returned lse.
    """
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    batch, heads, num_queries, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    device = q.device
    dq = empty_output((batch, heads, num_queries, head_dim), dtype=q.dtype, device=device)
    dk = empty_output((batch, kv_heads, num_keys, head_dim), dtype=k.dtype, device=device)
    dv = empty_output((batch, kv_heads, num_keys, head_dim), dtype=v.dtype, device=device)
    dbias = None
    if compute_dbias:
        dbias = empty_output((batch, heads, num_keys), dtype=torch.float32, device=device)
    if q.numel() == 0 or k.numel() == 0:
        # Nothing to attend to or from: every gradient is zero.
        for t in (dq, dk, dv, dbias):
            if t is not None:
                t.zero_()
        return dq, dk, dv, dbias

    is_causal, soft, has_prefix, future_bias = _mask_params(causal, causal_strength, prefix_len)
    block_d = _block_d(head_dim)
    group = heads // kv_heads
    bias_arg = key_bias if key_bias is not None else q
    prefix_arg = prefix_len if has_prefix else q
    common_strides = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *_bias_strides(key_bias),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
    )
    masks = dict(CAUSAL=is_causal, SOFT=soft, HAS_PREFIX=has_prefix,
                 HAS_BIAS=key_bias is not None, SKIP=is_causal and not soft)
    qk_scale = scale * 1.4426950408889634

    delta = empty_output((batch, heads, num_queries), dtype=torch.float32, device=device)
    delta_block = 16 if device.type != "cuda" else max(16, min(128, 8192 // block_d))
    wrap_triton(_attn_bwd_delta_kernel)[(triton.cdiv(num_queries, delta_block), batch * heads)](
        out, grad_out, grad_lse if grad_lse is not None else lse, delta,
        heads, num_queries, head_dim,
        out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        *(grad_lse.stride() if grad_lse is not None else (0, 0, 0)),
        HAS_DLSE=grad_lse is not None, BLOCK_M=delta_block, BLOCK_D=block_d,
    )

    block_m, block_n, warps, stages = _config("dkdv", head_dim, q.dtype, device)
    wrap_triton(_attn_bwd_dkdv_kernel)[(triton.cdiv(num_keys, block_n), batch * kv_heads)](
        q, k, v, bias_arg, prefix_arg, grad_out, lse, delta,
        dk, dv, dbias if dbias is not None else dk,
        heads, kv_heads, group, num_queries, num_keys, head_dim,
        *common_strides,
        qk_scale, future_bias, scale,
        **masks, HAS_DBIAS=dbias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )

    block_m, block_n, warps, stages = _config("dq", head_dim, q.dtype, device)
    wrap_triton(_attn_bwd_dq_kernel)[(triton.cdiv(num_queries, block_m), batch * heads)](
        q, k, v, bias_arg, prefix_arg, grad_out, lse, delta, dq,
        heads, group, num_queries, num_keys, head_dim,
        *common_strides,
        qk_scale, future_bias, scale,
        **masks,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv, dbias
