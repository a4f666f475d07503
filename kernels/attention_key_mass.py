"""Attention mass received by each key, recomputed tile by tile from the forward's lse.

``mass[b, h, j] = sum_{i in [query_start, query_end)} w[b, h, i] P[b, h, i, j]`` with
``P = exp(S - lse)`` and w the optional query weights (1 without), the probabilities of :func:`fastvl.ops.attention` (same logits, key
bias and masks, see :mod:`fastvl.kernels.attention`), never stored: one program per key
block and (batch, kv head) loads its K tile once, loops the query heads of the GQA group and
the selected query blocks, and sums ``P`` over queries in registers (no atomics), as the
dK/dV kernel does. Rows with ``lse = -inf`` (no visible key) read it as ``+inf``, so their
``P`` is exactly 0. With a hard causal mask, query blocks entirely before the key block
are skipped.

Head reduction: per head (stored as is), or over the group in registers (sum, max; the mean
is a sum scaled by ``1 / H``) followed, when there are several kv heads, by a sum or max
over them in a small epilogue on the (B, Hkv, Nk) partials.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastvl._outputs import empty_output
from fastvl.kernels import cdiv, gpu_sizes, launchable
from fastvl.kernels.attention import (
    LOG2E,
    _bias_strides,
    _block_d,
    _dot_precision,
    _key_bias2,
    _last_dim_contiguous,
    _load_prefix,
    _mask_params,
    _masked_logits,
)


def _config(head_dim: int, dtype: torch.dtype, device) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): one product per tile, so larger key tiles
    than the dK/dV kernel's fit without spills on sm_80 and sm_90 (`python -m fastvl
    kernels`); float32's ieee dots need small ones. Small fixed blocks when interpreted."""
    if not gpu_sizes(device):
        return 16, 32, 4, 1
    if dtype == torch.float32:
        return (32, 32, 4, 2) if head_dim <= 64 else (16, 32, 4, 1)
    block_d = _block_d(head_dim)
    if block_d <= 64:
        return 64, 128, 8, 2
    if block_d <= 128:
        return 32, 128, 8, 2
    return 32, 32, 4, 1


def _weight_strides(query_weights) -> tuple:
    """(batch, head, query) strides of (B, Nq) / (B, H, Nq) weights (head stride 0 for one row
    per sample); zeros without weights."""
    if query_weights is None:
        return 0, 0, 0
    if query_weights.dim() == 2:
        return query_weights.stride(0), 0, query_weights.stride(1)
    return query_weights.stride()


@triton.jit
def _key_mass_kernel(
    q_ptr, k_ptr, lse_ptr, bias_ptr, prefix_ptr, weight_ptr, out_ptr,
    num_heads, num_kv_heads, group, num_queries, num_keys, head_dim,
    query_start, query_end,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_lb, stride_lh, stride_lm,
    stride_bb, stride_bh, stride_bn,
    stride_wb, stride_wh, stride_wm,
    qk_scale, future_bias, out_scale,
    CAUSAL: tl.constexpr, SOFT: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    SKIP: tl.constexpr, PER_HEAD: tl.constexpr, REDUCE_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key block of one kv head: the mass of each key, per query head or group-reduced.

    Writes out[b, h, j] (PER_HEAD) or out[b, kvh, j] = out_scale * (sum or max over the
    group's heads), float32 contiguous.
    """
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
    k = tl.load(
        k_ptr + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
        mask=n_valid[:, None] & d_valid[None, :], other=0.0,
    )
    prefix = 0
    if HAS_PREFIX:
        prefix = _load_prefix(prefix_ptr, b, num_keys)
    offset = num_keys - num_queries
    start_m_lo = query_start
    if SKIP:
        # Queries before start_n - offset see none of these keys (unless they are a prefix).
        first = tl.maximum(start_n - offset, 0)
        if HAS_PREFIX:
            first = tl.where(start_n < prefix, 0, first)
        start_m_lo = tl.maximum(first, query_start)

    # Key-major tiles (BLOCK_N keys x BLOCK_M queries), so the sum over queries is axis 1.
    if REDUCE_MAX:  # (weighted masses may be negative)
        mass = tl.full([BLOCK_N], float("-inf"), tl.float32)
    else:
        mass = tl.zeros([BLOCK_N], tl.float32)
    for g in range(0, group):
        h = kvh * group + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        lse_base = lse_ptr + b * stride_lb + h * stride_lh
        kb2 = _key_bias2(bias_ptr + b * stride_bb + h * stride_bh, offs_n, n_valid, stride_bn,
                         HAS_BIAS, 0)
        head_mass = tl.zeros([BLOCK_N], tl.float32)
        for start_m in range(start_m_lo, query_end, BLOCK_M):
            offs_m = start_m + offs_m0
            m_valid = offs_m < query_end
            qt = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None],
                         mask=m_valid[None, :] & d_valid[:, None], other=0.0)
            # Padded rows and rows without a visible key read lse = +inf, so their P is 0.
            lse = tl.load(lse_base + offs_m * stride_lm, mask=m_valid, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
            qkt = tl.dot(k, qt, input_precision=DOT_PRECISION)
            st = _masked_logits(qkt * qk_scale + kb2, offs_m[None, :], offs_n[:, None], num_keys,
                                offset, prefix, future_bias, CAUSAL, SOFT, HAS_PREFIX)
            p = tl.math.exp2(st - lse2[None, :])
            if HAS_WEIGHTS:
                w = tl.load(weight_ptr + b * stride_wb + h * stride_wh + offs_m * stride_wm,
                            mask=m_valid, other=0.0).to(tl.float32)
                p = p * w[None, :]
            head_mass += tl.sum(p, 1)
        if PER_HEAD:
            tl.store(out_ptr + (b * num_heads + h) * num_keys + offs_n, head_mass, mask=n_valid)
        elif REDUCE_MAX:
            mass = tl.maximum(mass, head_mass)
        else:
            mass += head_mass
    if not PER_HEAD:
        mass *= tl.cast(out_scale, tl.float32)
        tl.store(out_ptr + bkv.to(tl.int64) * num_keys + offs_n, mass, mask=n_valid)


def attention_key_mass(q, k, lse, key_bias, prefix_len, scale: float, causal: bool,
                       causal_strength: float, query_start: int, query_end: int,
                       head_reduce: Optional[str], query_weights=None, *, eager: bool = False):
    """-> float32 (B, Nk) reduced over heads by ``head_reduce`` ("mean", "max", "sum"), or
    (B, H, Nk) for None; contiguous.

    q (B, H, Nq, D), k (B, Hkv, Nk, D), lse (B, H, Nq) float32 with any strides,
    ``0 <= query_start <= query_end <= Nq``. ``key_bias``: None, (B, Nk) or (B, H, Nk), any
    float dtype and strides. ``prefix_len``: None or an integer (B,) tensor.
    ``query_weights``: None, (B, Nq) or (B, H, Nq), any float dtype and strides. ``eager``:
    as :func:`fastvl.kernels.attention.attention_forward`'s.
    """
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    batch, heads, num_queries, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    per_head = head_reduce is None
    if per_head:
        out_shape = (batch, heads, num_keys)
    elif kv_heads == 1:  # the group is every head: the kernel writes the result directly
        out_shape = (batch, num_keys)
    else:
        out_shape = (batch, kv_heads, num_keys)
    out = empty_output(out_shape, dtype=torch.float32, device=q.device)
    if out.numel():
        is_causal, soft, has_prefix, future_bias = _mask_params(causal, causal_strength,
                                                                prefix_len)
        block_m, block_n, warps, stages = _config(head_dim, q.dtype, q.device)
        grid = (cdiv(num_keys, block_n), batch * kv_heads)
        launchable(_key_mass_kernel, wrap_triton, eager)[grid](
            q, k, lse,
            key_bias if key_bias is not None else q,
            prefix_len if has_prefix else q,
            query_weights if query_weights is not None else q,
            out,
            heads, kv_heads, heads // kv_heads, num_queries, num_keys, head_dim,
            query_start, query_end,
            *q.stride()[:3], *k.stride()[:3], *lse.stride(),
            *_bias_strides(key_bias, packed=False),
            *_weight_strides(query_weights),
            scale * 1.4426950408889634, future_bias,
            1.0 / heads if head_reduce == "mean" else 1.0,
            CAUSAL=is_causal, SOFT=soft, HAS_PREFIX=has_prefix, HAS_BIAS=key_bias is not None,
            HAS_WEIGHTS=query_weights is not None, SKIP=is_causal and not soft, PER_HEAD=per_head, REDUCE_MAX=head_reduce == "max",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim),
            DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=warps, num_stages=stages,
        )
    if out.dim() == 3 and not per_head:  # combine the kv groups' partial reductions
        return out.amax(dim=1) if head_reduce == "max" else out.sum(dim=1)
    return out
