"""Token merging (ToMe) in Triton: best-partner search, and the merge / unmerge data movement.

The definitions (token sets, similarity, tie-breaking, plan layout, size weighting) are those
of :mod:`fastvl.reference.tome`; this file only computes them.

``best_partners``: one program per (A block, sample). It streams the B tokens in blocks and
the channels in chunks, accumulates the (A block x B block) dot products with ``tl.dot``
(float32 accumulation, IEEE precision for float32 inputs), divides by the B norms and keeps a
running row max / argmax (lowest B index on ties: the first tile wins, and inside a tile the
smallest column index). The (N/2)^2 similarity matrix is never stored.

``tome_plan``: one program per sample turns the best partners into the whole plan (top r,
destinations, CSR offsets and sources; see :func:`plan_from_partners`).

``segment_reduce``: one program per ROWS merged tokens (all channels, BLOCK_C at a time)
walks each token's sources in CSR order (ascending position), so every sum has a fixed order:
deterministic, no atomics.
In ``MEAN`` mode it is the merge: weights ``s_i / S`` with ``S`` summed first (IEEE division,
so a lone token has weight exactly 1 and is copied unchanged), and it writes ``S``. Otherwise
it is a plain sum (the unmerge gradient).

``spread``: one program per ROWS input tokens (all channels) reads their merged tokens:
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
from fastvl.reference.tome import NORM_EPS, token_sets


def _match_blocks(channels: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_A, BLOCK_B, BLOCK_C, num_warps) of the best-partner kernel."""
    block_c = min(64, max(16, next_power_of_2(channels)))
    if not gpu_sizes(device):
        # Small interpreted blocks, so that the tests' small shapes span several of each.
        return 16, 16, 16, 4
    return 64, 64, block_c, 4


@triton.jit
def _row_norms(rows_ptr, valid, channels, stride_c, BLOCK: tl.constexpr,
               BLOCK_C: tl.constexpr, eps):
    """max(|row|, eps) of BLOCK rows (pointers ``rows_ptr``), in float32."""
    offs_c0 = tl.arange(0, BLOCK_C)
    squares = tl.zeros([BLOCK], tl.float32)
    for start_c in range(0, channels, BLOCK_C):
        offs_c = start_c + offs_c0
        x = tl.load(rows_ptr[:, None] + offs_c[None, :] * stride_c,
                    mask=valid[:, None] & (offs_c < channels)[None, :], other=0.0)
        x = x.to(tl.float32)
        squares += tl.sum(x * x, 1)
    return tl.maximum(tl.sqrt_rn(squares), eps)


@triton.jit
def _tile_dots(a_rows, a_valid, b_rows, b_valid, channels, stride_c,
               BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """The (BLOCK_A, BLOCK_B) float32 dot products of two blocks of rows (channels BLOCK_C at
    a time) and the B rows' squared norms."""
    offs_c0 = tl.arange(0, BLOCK_C)
    dots = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    b_squares = tl.zeros([BLOCK_B], tl.float32)
    for start_c in range(0, channels, BLOCK_C):
        offs_c = start_c + offs_c0
        c_valid = offs_c < channels
        a = tl.load(a_rows[:, None] + offs_c[None, :] * stride_c,
                    mask=a_valid[:, None] & c_valid[None, :], other=0.0)
        bt = tl.load(b_rows[None, :] + offs_c[:, None] * stride_c,
                     mask=c_valid[:, None] & b_valid[None, :], other=0.0)
        dots = tl.dot(a, bt, dots, input_precision=DOT_PRECISION)
        bt = bt.to(tl.float32)
        b_squares += tl.sum(bt * bt, 0)
    return dots, b_squares


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
    a_norm = _row_norms(a_rows, a_valid, channels, stride_mc, BLOCK_A, BLOCK_C, eps)

    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_b = tl.zeros([BLOCK_A], tl.int32)
    offs_b0 = tl.arange(0, BLOCK_B)
    for start_b in range(0, num_b, BLOCK_B):
        offs_b = start_b + offs_b0
        b_valid = offs_b < num_b
        b_rows = base + (b_first + 2 * offs_b.to(tl.int64)) * stride_mn
        dots, b_sq = _tile_dots(a_rows, a_valid, b_rows, b_valid, channels, stride_mc,
                                BLOCK_A, BLOCK_B, BLOCK_C, DOT_PRECISION)
        b_norm = tl.maximum(tl.sqrt_rn(b_sq), eps)
        scaled = tl.where(b_valid[None, :], dots / b_norm[None, :], float("-inf"))
        tile_best = tl.max(scaled, 1)
        tile_b = tl.min(tl.where(scaled == tile_best[:, None], offs_b[None, :], num_b), 1)
        better = tile_best > best  # strict: an earlier tile keeps a tie
        best_b = tl.where(better, tile_b, best_b)
        best = tl.where(better, tile_best, best)

    score = best / a_norm
    out = sample * num_a + offs_a
    tl.store(score_ptr + out, score, mask=a_valid)
    tl.store(partner_ptr + out, b_first + 2 * best_b.to(tl.int64), mask=a_valid)


def _row_blocks(channels: int, device: torch.device) -> tuple[int, int, int]:
    """(ROWS, BLOCK_C, num_warps) of the merge / spread kernels: ROWS tokens per program,
    their channels BLOCK_C at a time (a loop), about 2048 elements per step, so 16 bytes per
    thread and load at 4 warps in half precision. BLOCK_C = the row up to 256: ViT widths
    (384, 768, 1024) are multiples of it, no idle lanes."""
    block_c = min(256, max(16, next_power_of_2(channels)))
    if not gpu_sizes(device):
        return 4, 16, 4  # several rows and channel chunks at the tests' small shapes
    return max(1, min(16, 2048 // block_c)), block_c, 4


@triton.jit
def _segment_reduce_kernel(
    x_ptr, size_ptr, offsets_ptr, sources_ptr, out_ptr, size_out_ptr,
    num_rows, num_tokens, num_merged, channels,
    stride_xb, stride_xn, stride_xc,
    stride_sb, stride_sn,
    MEAN: tl.constexpr, HAS_SIZE: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # sample * M + merged
    row_valid = rows < num_rows
    rows = tl.where(row_valid, rows, 0)
    sample = rows // num_merged
    offsets_row = offsets_ptr + sample * (num_merged + 1) + rows % num_merged
    first = tl.load(offsets_row, mask=row_valid, other=0)
    count = tl.load(offsets_row + 1, mask=row_valid, other=0) - first
    longest = tl.max(count, 0)
    sources = sources_ptr + sample * num_tokens + first
    x_rows = x_ptr + sample * stride_xb
    size_rows = size_ptr + sample * stride_sb

    if MEAN:
        if HAS_SIZE:
            total = tl.zeros([ROWS], tl.float32)
            for p in range(0, longest):
                live = p < count
                src = tl.load(sources + p, mask=live, other=0)
                size = tl.load(size_rows + src * stride_sn, mask=live, other=0.0)
                total = tl.where(live, total + size.to(tl.float32), total)
        else:
            total = count.to(tl.float32)
        tl.store(size_out_ptr + rows, total.to(size_out_ptr.dtype.element_ty), mask=row_valid)
    offs_c = tl.arange(0, BLOCK_C)
    for start_c in range(0, channels, BLOCK_C):
        cols = start_c + offs_c
        col_valid = cols < channels
        acc = tl.zeros([ROWS, BLOCK_C], tl.float32)
        # Each row sums its sources in CSR order (ascending position): a fixed order.
        for p in range(0, longest):
            live = p < count
            src = tl.load(sources + p, mask=live, other=0)
            values = tl.load(x_rows[:, None] + src[:, None] * stride_xn
                             + cols[None, :] * stride_xc,
                             mask=live[:, None] & col_valid[None, :], other=0.0)
            values = values.to(tl.float32)
            if MEAN:
                if HAS_SIZE:
                    size = tl.load(size_rows + src * stride_sn, mask=live, other=0.0)
                    size = size.to(tl.float32)
                else:
                    size = tl.full([ROWS], 1.0, tl.float32)
                # IEEE division: a lone token has weight exactly 1 (copied unchanged)
                values = tl.math.div_rn(size, tl.where(live, total, 1.0))[:, None] * values
            acc = tl.where(live[:, None], acc + values, acc)
        tl.store(out_ptr + rows[:, None] * channels + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty),
                 mask=row_valid[:, None] & col_valid[None, :])


@triton.jit
def _spread_kernel(
    y_ptr, size_ptr, size_merged_ptr, dest_ptr, out_ptr,
    num_rows, num_tokens, num_merged, channels,
    stride_yb, stride_yn, stride_yc,
    stride_sb, stride_sn,
    stride_tb, stride_tn,
    WEIGHTED: tl.constexpr, HAS_SIZE: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # sample * N + token
    row_valid = rows < num_rows
    rows = tl.where(row_valid, rows, 0)
    sample = rows // num_tokens
    dest = tl.load(dest_ptr + rows, mask=row_valid, other=0)
    y_rows = y_ptr + sample * stride_yb + dest * stride_yn
    if WEIGHTED:
        total = tl.load(size_merged_ptr + sample * stride_tb + dest * stride_tn,
                        mask=row_valid, other=1.0).to(tl.float32)
        if HAS_SIZE:
            size = tl.load(size_ptr + sample * stride_sb + (rows % num_tokens) * stride_sn,
                           mask=row_valid, other=0.0).to(tl.float32)
        else:
            size = tl.full([ROWS], 1.0, tl.float32)
        weight = tl.math.div_rn(size, total)
    offs_c = tl.arange(0, BLOCK_C)
    for start_c in range(0, channels, BLOCK_C):
        cols = start_c + offs_c
        mask = row_valid[:, None] & (cols < channels)[None, :]
        values = tl.load(y_rows[:, None] + cols[None, :] * stride_yc, mask=mask)
        if WEIGHTED:
            values = weight[:, None] * values.to(tl.float32)
        tl.store(out_ptr + rows[:, None] * channels + cols[None, :],
                 values.to(out_ptr.dtype.element_ty), mask=mask)


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
    rows, block_c, warps = _row_blocks(channels, x.device)
    launchable(_segment_reduce_kernel, wrap_triton)[(cdiv(batch * num_merged, rows),)](
        x, size if size is not None else x, offsets, sources, out,
        size_out if size_out is not None else out,
        batch * num_merged, num_tokens, num_merged, channels,
        *x.stride(), *_size_strides(size),
        MEAN=mean, HAS_SIZE=size is not None, ROWS=rows, BLOCK_C=block_c, num_warps=warps,
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
    rows, block_c, warps = _row_blocks(channels, y.device)
    launchable(_spread_kernel, wrap_triton)[(cdiv(batch * num_tokens, rows),)](
        y, size if size is not None else y, size_merged if size_merged is not None else y,
        dest, out,
        batch * num_tokens, num_tokens, num_merged, channels,
        *y.stride(),
        *_size_strides(size), *_size_strides(size_merged),
        WEIGHTED=size_merged is not None, HAS_SIZE=size is not None, ROWS=rows,
        BLOCK_C=block_c, num_warps=warps,
    )
    return out


def _plan_blocks(num_a: int, num_b: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK, BLOCK_J, num_warps) of the plan kernel: BLOCK covers every A and every B token
    of a sample; the A tokens are compared BLOCK_J at a time."""
    block = max(16, next_power_of_2(max(num_a, num_b)))
    if not gpu_sizes(device):
        return block, 4, 4  # several J tiles at the tests' small shapes
    block_j = max(1, min(16, 2048 // block))
    return block, block_j, 4 if block <= 128 else (8 if block <= 1024 else 16)


@triton.jit
def _rank_key_and_partner(score_ptr, partner_ptr, row, offs, valid, b_first):
    """(key, B index of the partner) of the A tokens ``offs`` of one sample (``row`` = its
    first score). The key is one int64 whose order is the reference's ranking: descending
    score, then lowest index; NaN above everything, -0.0 equal to 0.0."""
    s = tl.load(score_ptr + row + offs, mask=valid, other=0.0) + 0.0
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(s != s, 0x7FFFFFFF, key)
    key = (key.to(tl.int64) << 32) | (2147483647 - offs).to(tl.int64)
    partner = (tl.load(partner_ptr + row + offs, mask=valid, other=0) - b_first) // 2
    return key, partner.to(tl.int32)


@triton.jit
def _tome_plan_kernel(
    score_ptr, partner_ptr, dest_ptr, offsets_ptr, sources_ptr,
    num_tokens, num_prefix, num_a, num_b, a_first, b_first, r,
    IDENTITY: tl.constexpr, SPATIAL: tl.constexpr, B_AFTER_A: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """One program per sample: the whole merge plan from the best partners (see
    ``plan_from_partners``)."""
    sample = tl.program_id(0).to(tl.int64)
    num_merged = num_tokens - r
    dest = dest_ptr + sample * num_tokens
    sources = sources_ptr + sample * num_tokens
    offsets = offsets_ptr + sample * (num_merged + 1)
    offs = tl.arange(0, BLOCK)
    # Tokens that stay in place: the prefix, or (IDENTITY, r = 0) every token, whatever the
    # order.
    if IDENTITY:
        in_place = num_tokens
    else:
        in_place = num_prefix
    for start in range(0, in_place, BLOCK):
        t = start + offs
        keep = t < in_place
        tl.store(dest + t, t.to(tl.int64), mask=keep)
        tl.store(sources + t, t.to(tl.int64), mask=keep)
        tl.store(offsets + t, t.to(tl.int64), mask=keep)
    tl.store(offsets + num_merged, tl.zeros([], tl.int64) + num_tokens)
    if not IDENTITY:

        # i: A index (token a_first + 2 i); k: B index (token b_first + 2 k); same vector.
        # d = 1 when B tokens follow their A neighbour (b_first > a_first): then the A token j
        # lies before the B token k iff j < k + d, and the B token k before the A token i
        # iff k < i + 1 - d.
        d = 1 if B_AFTER_A else 0
        valid_i = offs < num_a
        valid_k = offs < num_b
        key_i, partner_i = _rank_key_and_partner(score_ptr, partner_ptr, sample * num_a, offs,
                                                 valid_i, b_first)

        rank_i = tl.zeros([BLOCK], tl.int32)
        cnt_k = tl.zeros([BLOCK], tl.int32)  # A tokens merged into B token k
        before_k = tl.zeros([BLOCK], tl.int32)  # ... of them lying before it
        same_before_i = tl.zeros([BLOCK], tl.int32)  # merged A < i with i's partner
        lower_i = tl.zeros([BLOCK], tl.int32)  # merged A with a partner below i's
        if SPATIAL:
            merged_before_k = tl.zeros([BLOCK], tl.int32)  # merged A before B token k
            merged_before_pi = tl.zeros([BLOCK], tl.int32)  # ... before i's partner
            into_before_i = tl.zeros([BLOCK], tl.int32)  # merged A whose partner is before i
        offs_j0 = tl.arange(0, BLOCK_J)
        for start_j in range(0, num_a, BLOCK_J):
            j = start_j + offs_j0
            valid_j = j < num_a
            key_j, partner_j = _rank_key_and_partner(score_ptr, partner_ptr, sample * num_a, j,
                                                     valid_j, b_first)
            # rank of j: the A tokens ranked above it (all of them are in this block)
            above = (key_i[:, None] > key_j[None, :]) & valid_i[:, None]
            rank_j = tl.sum(above.to(tl.int32), 0)
            merged_j = valid_j & (rank_j < r)
            rank_i += tl.sum(((key_j[None, :] > key_i[:, None]) & valid_j[None, :]).to(tl.int32), 1)
            m_j = merged_j[None, :]
            p_j = tl.where(merged_j, partner_j, -1)[None, :]
            into_k = p_j == offs[:, None]
            cnt_k += tl.sum(into_k.to(tl.int32), 1)
            j_before_k = j[None, :] < offs[:, None] + d
            before_k += tl.sum((into_k & j_before_k).to(tl.int32), 1)
            same_before_i += tl.sum(((p_j == partner_i[:, None]) & (j[None, :] < offs[:, None]))
                                    .to(tl.int32), 1)
            lower_i += tl.sum((m_j & (p_j < partner_i[:, None])).to(tl.int32), 1)
            if SPATIAL:
                merged_before_k += tl.sum((m_j & j_before_k).to(tl.int32), 1)
                merged_before_pi += tl.sum((m_j & (j[None, :] < partner_i[:, None] + d))
                                           .to(tl.int32), 1)
                into_before_i += tl.sum((m_j & (p_j < offs[:, None] + 1 - d)).to(tl.int32), 1)

        merged_i = valid_i & (rank_i < r)
        kept_i = valid_i & (rank_i >= r)
        merged_below_i = tl.cumsum(merged_i.to(tl.int32), 0) - merged_i.to(tl.int32)
        cnt_below_k = tl.cumsum(cnt_k, 0) - cnt_k  # merged A tokens into B tokens below k
        a_pos = a_first + 2 * offs
        b_pos = b_first + 2 * offs
        partner_after = (partner_i < offs + 1 - d).to(tl.int32)  # i's partner lies before i
        if SPATIAL:
            pos_a = a_pos - merged_below_i
            off_a = pos_a + into_before_i
            pos_b = b_pos - merged_before_k
            dest_merged = b_first + 2 * partner_i - merged_before_pi
        else:
            first_b = num_prefix + num_a - r
            if num_prefix == 0:  # ToMe sorts the unmerged A tokens only with a class token
                pos_a = rank_i - r
            else:
                pos_a = num_prefix + offs - merged_below_i
            off_a = pos_a
            pos_b = first_b + offs
            dest_merged = first_b + partner_i
        off_b = pos_b + cnt_below_k
        slot_merged = dest_merged + lower_i + same_before_i + partner_after

        tl.store(dest + a_pos, tl.where(merged_i, dest_merged, pos_a).to(tl.int64),
                 mask=valid_i)
        tl.store(offsets + pos_a, off_a.to(tl.int64), mask=kept_i)
        tl.store(sources + tl.where(merged_i, slot_merged, off_a), a_pos.to(tl.int64),
                 mask=valid_i)
        tl.store(dest + b_pos, pos_b.to(tl.int64), mask=valid_k)
        tl.store(offsets + pos_b, off_b.to(tl.int64), mask=valid_k)
        tl.store(sources + off_b + before_k, b_pos.to(tl.int64), mask=valid_k)


def plan_from_partners(score: torch.Tensor, partner: torch.Tensor, r: int,
                       num_prefix_tokens: int, num_tokens: int, spatial: bool):
    """score (B, |A|) float32, partner (B, |A|) int64 (contiguous, from :func:`best_partners`)
    -> the plan (dest (B, N), offsets (B, M + 1), sources (B, N), int64) of
    :func:`fastvl.reference.tome.plan_from_partners` (the identity plan for r = 0), in one
    launch, one program per sample.

    The program holds every A and B token of its sample in one block. It streams the A
    tokens in tiles and counts, for each token, the A tokens ranked above it (one int64 key:
    descending score, then lowest index, as the reference's stable sort), so which A tokens
    merge (rank < r); in the same pass, from the merged ones of each tile, how many merge
    into each B token, lie before each position, have a partner below each partner, and so
    on. Merged positions, CSR offsets and slots follow by prefix sums (``tl.cumsum``), no
    sort and no scratch memory."""
    a_first, num_a, b_first, num_b = token_sets(num_tokens, num_prefix_tokens)
    return _launch_plan(score, partner, r, num_prefix_tokens, num_tokens, spatial,
                        score.shape[0], score.device, a_first, num_a, b_first, num_b,
                        num_tokens - r)


def _launch_plan(score, partner, r, num_prefix_tokens, num_tokens, spatial, batch, device,
                 a_first, num_a, b_first, num_b, num_merged):
    dest = empty_output((batch, num_tokens), dtype=torch.int64, device=device)
    offsets = empty_output((batch, num_merged + 1), dtype=torch.int64, device=device)
    sources = empty_output((batch, num_tokens), dtype=torch.int64, device=device)
    if batch == 0:
        return dest, offsets, sources
    block, block_j, warps = _plan_blocks(num_a, num_b, device)
    identity = r == 0
    launchable(_tome_plan_kernel, wrap_triton)[(batch,)](
        dest if identity else score, dest if identity else partner, dest, offsets, sources,
        num_tokens, num_prefix_tokens, num_a, num_b, a_first, b_first, r,
        IDENTITY=identity, SPATIAL=spatial, B_AFTER_A=b_first > a_first, BLOCK=block,
        BLOCK_J=block_j, num_warps=warps,
    )
    return dest, offsets, sources


def match_plan(metric: torch.Tensor, r: int, num_prefix_tokens: int, spatial: bool):
    """metric (B, N, C) -> the plan (dest, offsets, sources) of r merges: the best-partner
    kernel, then the plan kernel (only the plan kernel for r = 0). Two launches at most."""
    batch, num_tokens, _ = metric.shape
    a_first, num_a, b_first, num_b = token_sets(num_tokens, num_prefix_tokens)
    score = partner = None
    if r > 0:
        score, partner = best_partners(metric, num_prefix_tokens)
    return _launch_plan(score, partner, r, num_prefix_tokens, num_tokens, spatial, batch,
                        metric.device, a_first, num_a, b_first, num_b, num_tokens - r)
