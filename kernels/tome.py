"""Token merging (ToMe) in Triton: best-partner search, and the merge / unmerge data movement.

The definitions (token sets, similarity, tie-breaking, plan layout, size weighting) are those
of :mod:`fastvl.reference.tome`; this file only computes them.

``best_partners``: one program per (A block, sample). It streams the B tokens in blocks and
the channels in chunks, accumulates the (A block x B block) dot products with ``tl.dot``
(float32 accumulation, IEEE precision for float32 inputs), divides by the B norms and keeps a
running row max / argmax (lowest B index on ties: the first tile wins, and inside a tile the
smallest column index). The (N/2)^2 similarity matrix is never stored.

``segment_reduce``: one program per (merged token, channel block) walks that token's sources
in CSR order (ascending position), so every sum has a fixed order: deterministic, no atomics.
In ``MEAN`` mode it is the merge: weights ``s_i / S`` with ``S`` summed first (IEEE division,
so a lone token has weight exactly 1 and is copied unchanged), and it writes ``S``. Otherwise
it is a plain sum (the unmerge gradient).

``spread``: one program per (input token, channel block) reads its merged token:
``out[i] = w_i * y[dest[i]]``, with ``w_i = s_i / S_dest[i]`` (the merge gradient) or 1 (the
unmerge). Each input token has exactly one destination, so this is a gather: deterministic.

Accumulation is float32; outputs take the input's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastvl._outputs import empty_output
from fastvl.kernels import cdiv, gpu_sizes, launchable, next_power_of_2
from fastvl.kernels.gather import channel_block
from fastvl.reference.tome import NORM_EPS, token_sets


def _match_blocks(channels: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_A, BLOCK_B, BLOCK_C, num_warps) of the best-partner kernel."""
    block_c = min(64, max(16, next_power_of_2(channels)))
    if not gpu_sizes(device):
        # Small interpreted blocks, so that the tests' small shapes span several of each.
        return 16, 16, 16, 4
    return 64, 64, block_c, 4


@triton.jit
def _best_partner_kernel(
    metric_ptr, score_ptr, partner_ptr,
    num_a, num_b, a_first, b_first, channels,
    stride_mb, stride_mn, stride_mc,
    eps,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # inductor passes Python floats as fp64
    sample = tl.program_id(1).to(tl.int64)
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_valid = offs_a < num_a
    base = metric_ptr + sample * stride_mb
    a_rows = base + (a_first + 2 * offs_a.to(tl.int64)) * stride_mn
    offs_c0 = tl.arange(0, BLOCK_C)

    a_sq = tl.zeros([BLOCK_A], tl.float32)
    for start_c in range(0, channels, BLOCK_C):
        offs_c = start_c + offs_c0
        a = tl.load(a_rows[:, None] + offs_c[None, :] * stride_mc,
                    mask=a_valid[:, None] & (offs_c < channels)[None, :], other=0.0)
        a = a.to(tl.float32)
        a_sq += tl.sum(a * a, 1)

    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_b = tl.zeros([BLOCK_A], tl.int32)
    offs_b0 = tl.arange(0, BLOCK_B)
    for start_b in range(0, num_b, BLOCK_B):
        offs_b = start_b + offs_b0
        b_valid = offs_b < num_b
        b_rows = base + (b_first + 2 * offs_b.to(tl.int64)) * stride_mn
        dots = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        b_sq = tl.zeros([BLOCK_B], tl.float32)
        for start_c in range(0, channels, BLOCK_C):
            offs_c = start_c + offs_c0
            c_valid = offs_c < channels
            a = tl.load(a_rows[:, None] + offs_c[None, :] * stride_mc,
                        mask=a_valid[:, None] & c_valid[None, :], other=0.0)
            bt = tl.load(b_rows[None, :] + offs_c[:, None] * stride_mc,
                         mask=c_valid[:, None] & b_valid[None, :], other=0.0)
            dots = tl.dot(a, bt, dots, input_precision=DOT_PRECISION)
            bt = bt.to(tl.float32)
            b_sq += tl.sum(bt * bt, 0)
        b_norm = tl.maximum(tl.sqrt_rn(b_sq), eps)
        scaled = tl.where(b_valid[None, :], dots / b_norm[None, :], float("-inf"))
        tile_best = tl.max(scaled, 1)
        tile_b = tl.min(tl.where(scaled == tile_best[:, None], offs_b[None, :], num_b), 1)
        better = tile_best > best  # strict: an earlier tile keeps a tie
        best_b = tl.where(better, tile_b, best_b)
        best = tl.where(better, tile_best, best)

    score = best / tl.maximum(tl.sqrt_rn(a_sq), eps)
    out = sample * num_a + offs_a
    tl.store(score_ptr + out, score, mask=a_valid)
    tl.store(partner_ptr + out, b_first + 2 * best_b.to(tl.int64), mask=a_valid)


@triton.jit
def _segment_reduce_kernel(
    x_ptr, size_ptr, offsets_ptr, sources_ptr, out_ptr, size_out_ptr,
    num_tokens, num_merged, channels,
    stride_xb, stride_xn, stride_xc,
    stride_sb, stride_sn,
    MEAN: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # sample * M + merged token
    sample = row // num_merged
    merged = row % num_merged
    offsets_row = offsets_ptr + sample * (num_merged + 1) + merged
    first = tl.load(offsets_row)
    end = tl.load(offsets_row + 1)
    sources = sources_ptr + sample * num_tokens
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_valid = cols < channels
    x_base = x_ptr + sample * stride_xb + cols * stride_xc
    size_base = size_ptr + sample * stride_sb

    acc = tl.zeros([BLOCK_C], tl.float32)
    if MEAN:
        if HAS_SIZE:
            total = tl.zeros([], tl.float32)
            for p in range(first, end):
                total += tl.load(size_base + tl.load(sources + p) * stride_sn).to(tl.float32)
        else:
            total = (end - first).to(tl.float32)
        for p in range(first, end):
            src = tl.load(sources + p)
            if HAS_SIZE:
                size = tl.load(size_base + src * stride_sn).to(tl.float32)
            else:
                size = tl.full([], 1.0, tl.float32)
            weight = tl.math.div_rn(size, total)
            acc += weight * tl.load(x_base + src * stride_xn, mask=col_valid).to(tl.float32)
        if tl.program_id(1) == 0:
            tl.store(size_out_ptr + row, total.to(size_out_ptr.dtype.element_ty))
    else:
        for p in range(first, end):
            src = tl.load(sources + p)
            acc += tl.load(x_base + src * stride_xn, mask=col_valid).to(tl.float32)
    tl.store(out_ptr + row * channels + cols, acc.to(out_ptr.dtype.element_ty), mask=col_valid)


@triton.jit
def _spread_kernel(
    y_ptr, size_ptr, size_merged_ptr, dest_ptr, out_ptr,
    num_tokens, num_merged, channels,
    stride_yb, stride_yn, stride_yc,
    stride_sb, stride_sn,
    stride_tb, stride_tn,
    WEIGHTED: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # sample * N + input token
    sample = row // num_tokens
    token = row % num_tokens
    dest = tl.load(dest_ptr + row)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_valid = cols < channels
    values = tl.load(y_ptr + sample * stride_yb + dest * stride_yn + cols * stride_yc,
                     mask=col_valid)
    if WEIGHTED:
        total = tl.load(size_merged_ptr + sample * stride_tb + dest * stride_tn).to(tl.float32)
        if HAS_SIZE:
            size = tl.load(size_ptr + sample * stride_sb + token * stride_sn).to(tl.float32)
        else:
            size = tl.full([], 1.0, tl.float32)
        values = tl.math.div_rn(size, total) * values.to(tl.float32)
    tl.store(out_ptr + row * channels + cols, values.to(out_ptr.dtype.element_ty), mask=col_valid)


def _size_strides(size: Optional[torch.Tensor]) -> tuple[int, int]:
    return (0, 0) if size is None else (size.stride(0), size.stride(1))


def best_partners(metric: torch.Tensor, num_prefix_tokens: int):
    """metric (B, N, C) any strides -> (score (B, |A|) float32, partner (B, |A|) int64)."""
    batch, num_tokens, channels = metric.shape
    a_first, num_a, b_first, num_b = token_sets(num_tokens, num_prefix_tokens)
    score = empty_output((batch, num_a), dtype=torch.float32, device=metric.device)
    partner = empty_output((batch, num_a), dtype=torch.int64, device=metric.device)
    if score.numel() == 0:
        return score, partner
    block_a, block_b, block_c, warps = _match_blocks(channels, metric.device)
    grid = (cdiv(num_a, block_a), batch)
    launchable(_best_partner_kernel, wrap_triton)[grid](
        metric, score, partner,
        num_a, num_b, a_first, b_first, channels,
        *metric.stride(),
        NORM_EPS,
        BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_C=block_c,
        # float32 metrics must not be rounded to tf32; Triton ignores it for fp16/bf16.
        DOT_PRECISION="ieee", num_warps=warps,
    )
    return score, partner


def segment_reduce(x: torch.Tensor, size: Optional[torch.Tensor], offsets: torch.Tensor,
                   sources: torch.Tensor, mean: bool):
    """x (B, N, C) any strides, CSR plan tensors (contiguous) -> (out (B, M, C), size_out).

    ``mean``: the size-weighted average and ``size_out`` (B, M) (size's dtype, float32 without
    size); else the plain sum and ``size_out`` None.
    """
    batch, num_tokens, channels = x.shape
    num_merged = offsets.shape[1] - 1
    out = empty_output((batch, num_merged, channels), dtype=x.dtype, device=x.device)
    size_out = None
    if mean:
        size_dtype = torch.float32 if size is None else size.dtype
        size_out = empty_output((batch, num_merged), dtype=size_dtype, device=x.device)
    if batch * num_merged == 0:
        return out, size_out
    block_c = channel_block(channels, x.element_size())
    grid = (batch * num_merged, max(1, cdiv(channels, block_c)))
    launchable(_segment_reduce_kernel, wrap_triton)[grid](
        x, size if size is not None else x, offsets, sources, out,
        size_out if size_out is not None else out,
        num_tokens, num_merged, channels,
        *x.stride(), *_size_strides(size),
        MEAN=mean, HAS_SIZE=size is not None, BLOCK_C=block_c,
    )
    return out, size_out


def spread(y: torch.Tensor, size: Optional[torch.Tensor], size_merged: Optional[torch.Tensor],
           dest: torch.Tensor) -> torch.Tensor:
    """y (B, M, C) any strides, dest (B, N) contiguous -> (B, N, C): ``w_i * y[dest[i]]``.

    ``w_i = (size_i or 1) / size_merged[dest[i]]`` when ``size_merged`` is given, else 1.
    """
    batch, num_merged, channels = y.shape
    num_tokens = dest.shape[1]
    out = empty_output((batch, num_tokens, channels), dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    block_c = channel_block(channels, y.element_size())
    grid = (batch * num_tokens, cdiv(channels, block_c))
    launchable(_spread_kernel, wrap_triton)[grid](
        y, size if size is not None else y, size_merged if size_merged is not None else y,
        dest, out,
        num_tokens, num_merged, channels,
        *y.stride(),
        *_size_strides(size), *_size_strides(size_merged),
        WEIGHTED=size_merged is not None, HAS_SIZE=size is not None, BLOCK_C=block_c,
    )
    return out
