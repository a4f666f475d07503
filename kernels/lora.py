"""LoRA branch kernels: the shrink + expand added into a base output in one launch, and its
backward in two.

Layouts as :mod:`fastvl.reference.lora`, with the plain op seen as one adapter: x (N, in),
lora_a (E, r, in), lora_b (E, out, r), a scale per adapter (a float32 (E,) tensor, or one
float for all: a kernel argument, no tensor to build per call), optional route (N,) int64 in
[-1, E). The base GEMMs (``x Wᵀ + b`` forward, ``dY W`` and ``dYᵀ x`` backward) stay
cuBLAS's (a Triton GEMM that loses to cuBLAS would cost more than the launches saved); these
kernels add the LoRA terms into their outputs in place. Launches beyond the base GEMMs: one
per forward, two per backward, no zero-fill and no cast (every element of every buffer is
written by a kernel, dA / dB in the adapters' dtype).

Forward, two paths chosen by the row count alone (a shape, never data: compiled graphs and
CUDA graphs stay whole):

* **row blocks** (prefill, training), ``_lora_fwd_kernel``: rows are visited in ``order``,
  ``argsort(route)`` (stable, on the device: no host sync, CUDA graph safe; routed only), so
  a block of BLOCK_M rows mostly shares one adapter; a program loops over the adapters its
  rows use (first to last, sorted), each selected (``tl.where``, so that an adapter's values,
  NaN / inf included, reach its rows only) to its rows. A program takes (a chunk of output
  columns, a row block): it computes the block's whole shrink ``s = dropout(x) Aₑᵀ`` (BLOCK_M
  x r, float32; the first chunk's program stores it for the backward: N·BLOCK_R values),
  then ``out += scaleₑ · s Bₑᵀ`` over its columns, read and written once.

  Why recompute the shrink per column chunk instead of one program per row block looping
  over every output column: at tokens 4096, hidden 4096, r 16 on an H100 (132 SMs) the
  latter is 64 programs (BLOCK_M 64): half the SMs idle in a memory-bound pass of ~96 MiB
  (x read, out read and written). Chunks are counted so that the grid fills one wave,
  ``chunks = ceil(SMs / row blocks)`` (at most one per BLOCK_N columns): here 3, so 192
  programs. The cost: each row block of x is read 3 times, but the chunks of a row block
  are adjacent in launch order (chunk is program_id 0), so 2 of the 3 reads come from L2
  (DRAM still reads x once); and the shrink is computed 3 times, 3 x 0.54 GFLOP of
  tensor-core work, ~1% of the 137 GFLOP base GEMM. With 2·SMs row blocks or more there is
  one chunk: no recompute at all. The old two-launch path (shrink to a float32 buffer of
  per-chunk partials, then expand) read x once from DRAM too but paid a launch and the
  partials' round trip; it is gone.

* **rows** (decode: at most :func:`row_path_max_rows` rows, e.g. one token per sequence of a
  serving batch whose sequences use tens of adapters), ``_lora_fwd_rows_kernel``: no sort,
  one program per (block of output columns, row) computes its row's shrink with its own
  adapter (a GEMV: a decode row block would hold as many adapters as rows; recomputed per
  column block, from L2) and adds ``scaleₑ · s Bₑᵀ`` into its columns. The same s is
  stored, so the backward is the one below.

Backward (row blocks, sorted as above):

* ``_lora_bwd_dx_kernel`` over (chunk of ``in``, row block): ``ds = scaleₑ · dY Bₑ`` over
  all output columns (recomputed per chunk like the forward's shrink; the first chunk stores
  it, float32 (N, BLOCK_R)), then ``dX += dropout'(ds Aₑ)`` in place over its columns of
  ``in``, in the same pass;
* ``_lora_bwd_dw_kernel`` over column tiles of ``in`` (dA) and of ``out`` (dB): each program
  walks every row block in order, ``dAₑᵀ[tile] = Σ dropout(x)ᵀ ds`` and
  ``dBₑ[tile] = scaleₑ · Σ dYᵀ s``, storing an adapter's tile once its rows are passed
  (zeros for adapters without rows). No atomics and no per-block slices: dA and dB are
  bit-reproducible always, summed in row order. Cost:
  dY is read twice in all (once per pass; x once), 32 MiB more than the byte minimum at
  tokens 4096, hidden 4096 in half precision, against the old path's zero-fill launch, dB
  partials / atomics and cast; at those shapes the grid is 64 + 64 programs of 64 columns
  (wgmma's minimum M), about one per SM. To be tuned by timing on the GPU.

Dropout keeps ``x[n, k]`` iff ``tl.rand(seed, n · in + k) >= p`` (Philox), regenerated in the
backward, never stored. Rows whose route value lies outside [0, E) get no adapter, like -1.
x, A, B, dY and the outputs are read through their strides; route and a scale tensor are
made contiguous first.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastvl._outputs import empty_output
from fastvl.kernels import cdiv, gpu_sizes, launchable, multiprocessors, next_power_of_2

_PRECISION = "ieee"  # float32 dots are not rounded to tf32
MAX_RANK = 64


def shrink_columns(rank: int) -> int:
    """Columns of the float32 shrink s the forward stores: r padded to a power of two >= 16."""
    return max(16, next_power_of_2(rank))


def row_path_max_rows(device: torch.device) -> int:
    """The forward takes the row (decode) path for at most this many rows, else row blocks."""
    return 256 if gpu_sizes(device) else 8  # small on CPU: the tests' shapes take both


def _row_blocks(device: torch.device, block_r: int):
    """(BLOCK_K, BLOCK_N) of the row path: tiles of 8192 float32 values (r=16: 512 columns)."""
    if not gpu_sizes(device):
        return 16, 16
    return 8192 // block_r, 8192 // block_r


def _blocks(device: torch.device, rank: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, num_warps) of the row-block kernels: a program
    takes BLOCK_M rows and its columns (of ``in`` or ``out``) in BLOCK_K / BLOCK_N tiles.

    GPU sizes: picked without a GPU so that no kernel spills registers on sm_80 / sm_90
    (ptxas, see :func:`fastvl.triton_aot.resource_usage`); to be tuned by timing on the
    GPU."""
    block_r = shrink_columns(rank)
    if not gpu_sizes(device):
        return 16, 16, 16, block_r, 4  # small blocks so the tests' shapes span several
    if block_r <= 32 and dtype != torch.float32:
        return 64, 64, 32, block_r, 8  # (BLOCK_K 64: the dropout tile spills on sm_80)
    return 32, 32, 16, block_r, 8  # (BLOCK_K 32: the float32 dropout forward spills)


def _weight_blocks(device: torch.device, rank: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_C, num_warps) of the dA / dB kernel: column tiles of BLOCK_C (64 on a
    GPU: the M of its ``xᵀ ds`` / ``dYᵀ s`` dots, wgmma's minimum), rows by BLOCK_M."""
    if not gpu_sizes(device):
        return 16, 16, 4
    if shrink_columns(rank) <= 32 and dtype != torch.float32:
        return 64, 64, 4
    return 32, 32, 4  # (no wgmma in float32; 64-wide tiles spill on sm_80 / sm_90)


def _column_chunks(device: torch.device, row_blocks: int, columns: int, block: int):
    """(chunks, columns per chunk) of a pass over (column chunks x row blocks): enough chunks
    that the grid fills the GPU's SMs once (at most one per ``block`` columns); on the CPU
    two tiles per chunk, so that the tests' shapes span several."""
    tiles = max(cdiv(columns, block), 1)
    if gpu_sizes(device):
        chunks = min(tiles, max(1, cdiv(multiprocessors(device), max(row_blocks, 1))))
    else:
        chunks = cdiv(tiles, 2)
    per_chunk = cdiv(tiles, chunks) * block
    return max(cdiv(columns, per_chunk), 1), per_chunk


@triton.jit
def _block_rows(route_ptr, order_ptr, block, num_rows, num_adapters, ROUTED: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """The rows of row block ``block``: (row index, in range, adapter per row (-1 none, also
    for route values outside [0, E)), first and last adapter used in the block)."""
    m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = m < num_rows
    if ROUTED:
        rows = tl.load(order_ptr + m, mask=in_rows, other=0)
        adapter = tl.load(route_ptr + rows, mask=in_rows, other=-1)
        adapter = tl.where(adapter < num_adapters, adapter, -1)
    else:
        rows = m.to(tl.int64)
        adapter = tl.where(in_rows, 0, -1).to(tl.int64)
    first = tl.maximum(tl.min(tl.where(adapter >= 0, adapter, 1 << 40)), 0)
    last = tl.max(adapter)
    return rows, in_rows, adapter, first, last


@triton.jit
def _adapter_scale(scale_ptr, scaling, adapter, mask, PER_ADAPTER: tl.constexpr):
    """The scale of ``adapter`` (0 where not ``mask``): ``scale[adapter]`` of the float32 (E,)
    scales, or without PER_ADAPTER the one float ``scaling`` of every adapter."""
    if PER_ADAPTER:
        scale = tl.load(scale_ptr + adapter, mask=mask, other=0.0)
    else:
        scale = tl.where(mask, tl.cast(scaling, tl.float32), 0.0)  # inductor passes fp64
    return scale


@triton.jit
def _dropout(values, offsets, seed, dropout_p):
    """Inverted dropout of the elements at ``offsets`` (row · in + column) of an (N, in)
    tensor; the same mask for the same offsets every call, whatever the tile shape."""
    keep = tl.rand(seed, offsets) >= dropout_p
    return tl.where(keep, values * (1.0 / (1.0 - dropout_p)), 0.0).to(values.dtype)


@triton.jit
def _lora_fwd_kernel(
    x_ptr, a_ptr, b_ptr, scale_ptr, scaling, route_ptr, order_ptr, out_ptr, s_ptr,
    num_rows, num_adapters, in_features, out_features, rank, chunk_columns, seed, dropout_p,
    stride_xm, stride_xk, stride_ae, stride_ar, stride_ak, stride_be, stride_bo, stride_br,
    stride_om, stride_on,
    ROUTED: tl.constexpr, DROPOUT: tl.constexpr, PER_ADAPTER_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """For the chunk of ``chunk_columns`` output columns of program 0 and the row block of
    program 1: s = dropout(x) Aₑᵀ of the block's rows (all of ``in``; stored by the first
    chunk, float32 (N, BLOCK_R), zeros without an adapter), then out[n, cols] +=
    scaleₑ · s[n] Bₑ[cols]ᵀ, read and written once for every row with an adapter."""
    chunk = tl.program_id(0)
    rows, in_rows, adapter, first, last = _block_rows(
        route_ptr, order_ptr, tl.program_id(1), num_rows, num_adapters, ROUTED, BLOCK_M)
    r = tl.arange(0, BLOCK_R)
    r_mask = r < rank
    s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for e in range(first, last + 1):
        mine = in_rows & (adapter == e)
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < in_features
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                        mask=mine[:, None] & k_mask[None, :], other=0.0)
            if DROPOUT:
                x = _dropout(x, rows[:, None] * in_features + k[None, :], seed, dropout_p)
            a = tl.load(a_ptr + e * stride_ae + r[None, :] * stride_ar + k[:, None] * stride_ak,
                        mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            # Selected, not multiplied by other rows' zeros: A may hold NaN / inf.
            s = tl.where(mine[:, None], tl.dot(x, a, s, input_precision=PRECISION), s)
    tl.store(s_ptr + rows[:, None] * BLOCK_R + r[None, :], s,
             mask=in_rows[:, None] & (chunk == 0))
    has = in_rows & (adapter >= 0)
    scale = _adapter_scale(scale_ptr, scaling, tl.maximum(adapter, 0), has, PER_ADAPTER_SCALE)
    scaled = (s * scale[:, None]).to(out_ptr.dtype.element_ty)
    start = chunk * chunk_columns
    for n0 in range(start, tl.minimum(start + chunk_columns, out_features), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < out_features
        out_ptrs = out_ptr + rows[:, None] * stride_om + n[None, :] * stride_on
        tile_mask = has[:, None] & n_mask[None, :]
        total = tl.load(out_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        for e in range(first, last + 1):
            b = tl.load(b_ptr + e * stride_be + n[None, :] * stride_bo + r[:, None] * stride_br,
                        mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            mine = (adapter == e)[:, None]
            total = tl.where(mine, tl.dot(scaled, b, total, input_precision=PRECISION), total)
        tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _row_adapter(route_ptr, row, num_adapters, ROUTED: tl.constexpr):
    """(adapter of ``row`` clamped to >= 0 for addressing, whether it has one: a route value
    in [0, E))."""
    if ROUTED:
        adapter = tl.load(route_ptr + row)
    else:
        adapter = row * 0
    return tl.maximum(adapter, 0), (adapter >= 0) & (adapter < num_adapters)


@triton.jit
def _lora_fwd_rows_kernel(
    x_ptr, a_ptr, b_ptr, scale_ptr, scaling, route_ptr, out_ptr, s_ptr,
    num_adapters, in_features, out_features, rank, seed, dropout_p,
    stride_xm, stride_xk, stride_ae, stride_ar, stride_ak, stride_be, stride_bo, stride_br,
    stride_om, stride_on,
    ROUTED: tl.constexpr, DROPOUT: tl.constexpr, PER_ADAPTER_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """For the BLOCK_N output columns of program 0 and row n = program 1: s[n] =
    dropout(x[n]) Aₑᵀ (a GEMV over all of ``in``; stored by the first column block, zeros
    without an adapter), then out[n, cols] += scaleₑ · s[n] Bₑ[cols]ᵀ."""
    column_block = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    adapter, used = _row_adapter(route_ptr, row, num_adapters, ROUTED)
    r = tl.arange(0, BLOCK_R)
    r_mask = r < rank
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = (k < in_features) & used
        x = tl.load(x_ptr + row * stride_xm + k * stride_xk, mask=k_mask, other=0.0)
        if DROPOUT:
            x = _dropout(x, row * in_features + k, seed, dropout_p)
        a = tl.load(a_ptr + adapter * stride_ae + r[:, None] * stride_ar + k[None, :] * stride_ak,
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        s += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    tl.store(s_ptr + row * BLOCK_R + r, s, mask=(r < BLOCK_R) & (column_block == 0))
    # Rounded to the input dtype like the row-block path's expand operand.
    scale = _adapter_scale(scale_ptr, scaling, adapter, used, PER_ADAPTER_SCALE)
    scaled = (s * scale).to(out_ptr.dtype.element_ty).to(tl.float32)
    n = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = (n < out_features) & used
    b = tl.load(b_ptr + adapter * stride_be + n[:, None] * stride_bo + r[None, :] * stride_br,
                mask=n_mask[:, None] & r_mask[None, :], other=0.0)
    delta = tl.sum(b.to(tl.float32) * scaled[None, :], axis=1)
    out_ptrs = out_ptr + row * stride_om + n * stride_on
    base = tl.load(out_ptrs, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (base + delta).to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _lora_bwd_dx_kernel(
    g_ptr, x_ptr, a_ptr, b_ptr, scale_ptr, scaling, route_ptr, order_ptr, ds_ptr, dx_ptr,
    num_rows, num_adapters, in_features, out_features, rank, chunk_columns, seed, dropout_p,
    stride_gm, stride_gn, stride_ae, stride_ar, stride_ak, stride_be, stride_bo, stride_br,
    stride_dm, stride_dk,
    ROUTED: tl.constexpr, DROPOUT: tl.constexpr, PER_ADAPTER_SCALE: tl.constexpr,
    COMPUTE_DX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """For the chunk of ``chunk_columns`` columns of ``in`` of program 0 and the row block of
    program 1: ds = scaleₑ · dY Bₑ of the block's rows over all of ``out`` (stored by the
    first chunk, float32 (N, BLOCK_R)), then (COMPUTE_DX) dx[n, cols] += dropout'(ds[n] Aₑ)
    in place."""
    chunk = tl.program_id(0)
    rows, in_rows, adapter, first, last = _block_rows(
        route_ptr, order_ptr, tl.program_id(1), num_rows, num_adapters, ROUTED, BLOCK_M)
    r = tl.arange(0, BLOCK_R)
    r_mask = r < rank
    has = in_rows & (adapter >= 0)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, out_features, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < out_features
        g = tl.load(g_ptr + rows[:, None] * stride_gm + n[None, :] * stride_gn,
                    mask=has[:, None] & n_mask[None, :], other=0.0)
        for e in range(first, last + 1):
            b = tl.load(b_ptr + e * stride_be + n[:, None] * stride_bo + r[None, :] * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            ds = tl.where((adapter == e)[:, None], tl.dot(g, b, ds, input_precision=PRECISION),
                          ds)
    scale = _adapter_scale(scale_ptr, scaling, tl.maximum(adapter, 0), has, PER_ADAPTER_SCALE)
    ds = ds * scale[:, None]
    tl.store(ds_ptr + rows[:, None] * BLOCK_R + r[None, :], ds,
             mask=in_rows[:, None] & (chunk == 0))
    if COMPUTE_DX:
        ds = ds.to(x_ptr.dtype.element_ty)
        start = chunk * chunk_columns
        for k0 in range(start, tl.minimum(start + chunk_columns, in_features), BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < in_features
            dx_lora = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for e in range(first, last + 1):
                a = tl.load(a_ptr + e * stride_ae + r[:, None] * stride_ar + k[None, :] * stride_ak,
                            mask=r_mask[:, None] & k_mask[None, :], other=0.0)
                dx_lora = tl.where((adapter == e)[:, None],
                                   tl.dot(ds, a, dx_lora, input_precision=PRECISION), dx_lora)
            if DROPOUT:
                dx_lora = _dropout(dx_lora, rows[:, None] * in_features + k[None, :], seed,
                                   dropout_p)
            tile_mask = has[:, None] & k_mask[None, :]
            dx_ptrs = dx_ptr + rows[:, None] * stride_dm + k[None, :] * stride_dk
            dx = tl.load(dx_ptrs, mask=tile_mask, other=0.0).to(tl.float32) + dx_lora
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _lora_bwd_dw_kernel(
    x_ptr, g_ptr, s_ptr, ds_ptr, scale_ptr, scaling, route_ptr, order_ptr, grad_ptr,
    num_rows, num_adapters, in_features, out_features, rank, in_tiles, seed, dropout_p,
    stride_xm, stride_xk, stride_gm, stride_gn,
    ROUTED: tl.constexpr, DROPOUT: tl.constexpr, PER_ADAPTER_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program p < in_tiles: dA[:, :, tile p of ``in``]; else dB[:, tile p - in_tiles of
    ``out``, :], into ``grad`` (dA (E, r, in) and dB (E, out, r) flattened one after the
    other, in its dtype). dAₑᵀ[tile] = Σ dropout(x[rows of e, tile])ᵀ ds[rows of e] and
    dBₑ[tile] = scaleₑ · Σ dY[rows of e, tile]ᵀ s[rows of e], walking every row block in
    order; an adapter's tile is stored once the walk has passed its rows (rows are sorted by
    adapter), zeros for adapters without rows."""
    pid = tl.program_id(0)
    for_a = pid < in_tiles  # (selects, not branches: one code path for both)
    tile = tl.where(for_a, pid, pid - in_tiles)
    columns = tl.where(for_a, in_features, out_features)
    src_ptr = tl.where(for_a, x_ptr, g_ptr)
    vec_ptr = tl.where(for_a, ds_ptr, s_ptr)
    stride_m = tl.where(for_a, stride_xm, stride_gm)
    stride_c = tl.where(for_a, stride_xk, stride_gn)
    c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < columns
    r = tl.arange(0, BLOCK_R)
    r_mask = r < rank
    # dA[e, r, c] at e·r·in + r·in + c; dB[e, c, r] after dA, at e·out·r + c·r + r
    base = tl.where(for_a, 0, num_adapters * rank * in_features).to(tl.int64)
    adapter_stride = tl.where(for_a, rank * in_features, out_features * rank).to(tl.int64)
    tile_offsets = (base + c[:, None].to(tl.int64) * tl.where(for_a, 1, rank)
                    + r[None, :] * tl.where(for_a, in_features, 1))
    tile_mask = c_mask[:, None] & r_mask[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    current = tl.program_id(0).to(tl.int64) * 0  # the adapter whose sum acc holds
    for block in range(0, tl.cdiv(num_rows, BLOCK_M)):
        rows, in_rows, adapter, first, last = _block_rows(
            route_ptr, order_ptr, block, num_rows, num_adapters, ROUTED, BLOCK_M)
        has = in_rows & (adapter >= 0)
        src = tl.load(src_ptr + rows[:, None] * stride_m + c[None, :] * stride_c,
                      mask=has[:, None] & c_mask[None, :], other=0.0)
        if DROPOUT:
            if for_a:
                src = _dropout(src, rows[:, None] * in_features + c[None, :], seed, dropout_p)
        vec = tl.load(vec_ptr + rows[:, None] * BLOCK_R + r[None, :], mask=has[:, None],
                      other=0.0)
        scale = _adapter_scale(scale_ptr, scaling, tl.maximum(adapter, 0), has,
                               PER_ADAPTER_SCALE)  # dB's (ds holds its scale already)
        vec = (vec * tl.where(for_a, 1.0, scale)[:, None]).to(src.dtype)
        for e in range(first, last + 1):
            for passed in range(current, e):  # acc is complete for `current`: store it
                tl.store(grad_ptr + passed * adapter_stride + tile_offsets,
                         acc.to(grad_ptr.dtype.element_ty), mask=tile_mask)
                acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
            current = tl.maximum(current, e)
            vec_e = tl.where((adapter == e)[:, None], vec, 0.0).to(vec.dtype)
            acc = tl.dot(tl.trans(src), vec_e, acc, input_precision=PRECISION)
    for passed in range(current, num_adapters):
        tl.store(grad_ptr + passed * adapter_stride + tile_offsets,
                 acc.to(grad_ptr.dtype.element_ty), mask=tile_mask)
        acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)


def _route_order(route: Optional[torch.Tensor]):
    """(route, order) for the kernels: rows sorted by adapter, or (None, None) unrouted."""
    if route is None:
        return None, None
    return route, torch.argsort(route, stable=True)


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t contiguous (route and a scale tensor are read as dense (N,) / (E,)), or None."""
    return None if t is None else t.contiguous()


def _scale_args(scale, dummy: torch.Tensor) -> tuple:
    """The kernels' (scale_ptr, scaling, PER_ADAPTER_SCALE) for ``scale``, a float32 (E,)
    tensor or one float (then ``dummy`` stands for the pointer the kernel never reads)."""
    if isinstance(scale, torch.Tensor):
        return _contiguous(scale), 0.0, True
    return dummy, float(scale), False


def lora_forward(x, lora_a, lora_b, scale, route, dropout_p: float, seed: int, out,
                 row_path: Optional[bool] = None):
    """Add ``scale[e] · (dropout(x) Aₑᵀ) Bₑᵀ`` into ``out`` (N, out) in place, e = route[n]
    (adapter 0 when route is None): one launch (plus the sort of a routed row-block call).
    x (N, in), lora_a (E, r, in), lora_b (E, out, r), scale (E,) float32 or one float for
    every adapter. ``row_path``: the decode path (default: N <= :func:`row_path_max_rows`).
    Returns s = dropout(x) Aₑᵀ, float32 (N, BLOCK_R) (columns >= r unused)."""
    num_rows, in_features = x.shape
    num_adapters, out_features, rank = lora_b.shape
    block_m, block_n, block_k, block_r, warps = _blocks(x.device, rank, x.dtype)
    if row_path is None:
        row_path = num_rows <= row_path_max_rows(x.device)
    if num_rows == 0 or lora_a.numel() == 0 or lora_b.numel() == 0:  # a zero branch
        return torch.zeros((num_rows, block_r), dtype=torch.float32, device=x.device)
    route = _contiguous(route)
    s = empty_output((num_rows, block_r), dtype=torch.float32, device=x.device)
    scale_ptr, scaling, per_adapter = _scale_args(scale, lora_b)
    if row_path:
        row_k, row_n = _row_blocks(x.device, block_r)
        launchable(_lora_fwd_rows_kernel, wrap_triton)[(cdiv(out_features, row_n), num_rows)](
            x, lora_a, lora_b, scale_ptr, scaling, route, out, s, num_adapters, in_features,
            out_features, rank, seed, dropout_p,
            *x.stride(), *lora_a.stride(), *lora_b.stride(), *out.stride(),
            ROUTED=route is not None, DROPOUT=dropout_p > 0, PER_ADAPTER_SCALE=per_adapter,
            BLOCK_N=row_n, BLOCK_K=row_k, BLOCK_R=block_r, num_warps=8 if gpu_sizes(
                x.device) else 4,
        )
        return s
    route, order = _route_order(route)
    num_blocks = cdiv(num_rows, block_m)
    chunks, chunk_columns = _column_chunks(x.device, num_blocks, out_features, block_n)
    launchable(_lora_fwd_kernel, wrap_triton)[(chunks, num_blocks)](
        x, lora_a, lora_b, scale_ptr, scaling, route, order, out, s, num_rows, num_adapters,
        in_features, out_features, rank, chunk_columns, seed, dropout_p,
        *x.stride(), *lora_a.stride(), *lora_b.stride(), *out.stride(),
        ROUTED=route is not None, DROPOUT=dropout_p > 0, PER_ADAPTER_SCALE=per_adapter,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
        PRECISION=_PRECISION, num_warps=warps,
    )
    return s


def lora_backward(grad_out, x, lora_a, lora_b, scale, route, s, dropout_p: float, seed: int,
                  dx):
    """The LoRA branch's backward: adds its part of dX into ``dx`` (N, in) in place unless dx
    is None, and returns dA (E, r, in) and dB (E, out, r) flattened one after the other in one
    (E·r·in + E·out·r,) tensor of lora_a's dtype (:func:`split_adapter_grads`), zeros for
    adapters without rows. Two launches (plus the sort of a routed call), no zero-fill.
    s: the forward's float32 (N, BLOCK_R) shrink; scale as in :func:`lora_forward`. dA and dB
    are summed without atomics, in row order: bit-reproducible always."""
    num_rows, in_features = x.shape
    num_adapters, out_features, rank = lora_b.shape
    size = lora_a.numel() + lora_b.numel()
    if num_rows == 0 or lora_a.numel() == 0 or lora_b.numel() == 0:  # a zero branch
        return torch.zeros((size,), dtype=lora_a.dtype, device=x.device)
    block_m, block_n, block_k, block_r, warps = _blocks(x.device, rank, x.dtype)
    route, order = _route_order(_contiguous(route))
    scale_ptr, scaling, per_adapter = _scale_args(scale, lora_b)
    num_blocks = cdiv(num_rows, block_m)
    if dx is None:
        chunks, chunk_columns, dx_strides = 1, 0, (0, 0)
    else:
        chunks, chunk_columns = _column_chunks(x.device, num_blocks, in_features, block_k)
        dx_strides = dx.stride()
    ds = empty_output((num_rows, block_r), dtype=torch.float32, device=x.device)
    # (dY tiles of 32 columns: with 64, ptxas spills on sm_80 at the benchmark shapes)
    launchable(_lora_bwd_dx_kernel, wrap_triton)[(chunks, num_blocks)](
        grad_out, x, lora_a, lora_b, scale_ptr, scaling, route, order, ds, dx,
        num_rows, num_adapters, in_features, out_features, rank, chunk_columns, seed,
        dropout_p, *grad_out.stride(), *lora_a.stride(), *lora_b.stride(), *dx_strides,
        ROUTED=route is not None, DROPOUT=dropout_p > 0, PER_ADAPTER_SCALE=per_adapter,
        COMPUTE_DX=dx is not None, BLOCK_M=block_m, BLOCK_N=min(block_n, 32), BLOCK_K=block_k,
        BLOCK_R=block_r, PRECISION=_PRECISION, num_warps=warps,
    )
    grads = empty_output((size,), dtype=lora_a.dtype, device=x.device)
    w_block_m, block_c, w_warps = _weight_blocks(x.device, rank, x.dtype)
    in_tiles = cdiv(in_features, block_c)
    launchable(_lora_bwd_dw_kernel, wrap_triton)[(in_tiles + cdiv(out_features, block_c),)](
        x, grad_out, s, ds, scale_ptr, scaling, route, order, grads,
        num_rows, num_adapters, in_features, out_features, rank, in_tiles, seed, dropout_p,
        *x.stride(), *grad_out.stride(),
        ROUTED=route is not None, DROPOUT=dropout_p > 0, PER_ADAPTER_SCALE=per_adapter,
        BLOCK_M=w_block_m, BLOCK_C=block_c, BLOCK_R=block_r, PRECISION=_PRECISION,
        num_warps=w_warps,
    )
    return grads


def split_adapter_grads(grads: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor):
    """(dA, dB) shaped like lora_a, lora_b: views of the flat ``grads`` of
    :func:`lora_backward`."""
    size_a = lora_a.numel()
    return grads[:size_a].view(lora_a.shape), grads[size_a:].view(lora_b.shape)
