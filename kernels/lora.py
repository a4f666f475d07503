"""LoRA branch kernels: the shrink + expand added into a base output, and its backward.

Layouts as :mod:`fastvl.reference.lora`, with the plain op seen as one adapter: x (N, in),
lora_a (E, r, in), lora_b (E, out, r), a scale per adapter (a float32 (E,) tensor, or one
float for all: a kernel argument, no tensor to build per call), optional route (N,) int64 in
[-1, E). The base GEMMs (``x Wᵀ + b`` forward, ``dY W`` backward) are cuBLAS's; these
kernels add the LoRA terms into their outputs in place. Every pass is split over a 2-D grid
(rows × chunks of CHUNK columns) so that a whole GPU works on it even for few row blocks;
the r-column sums a pass needs across chunks go through a small float32 (chunks, N, BLOCK_R)
buffer of partials, summed in chunk order (no atomics). x, dY and the outputs are each read
or written once; only the rows of the adapter a block pass serves are touched.

Two forward paths, chosen by the row count alone (a shape, never data: compiled graphs and
CUDA graphs stay whole):

* **row blocks** (prefill, training): rows are visited in ``order``, ``argsort(route)``
  (stable, on the device: no host sync, CUDA graph safe), so a block of BLOCK_M rows mostly
  shares one adapter. A program loops over the adapters its rows use (from the first to the
  last, sorted), each selected (``tl.where``, so that an adapter's values, NaN / inf
  included, reach its rows only) to the rows of that adapter:

  * forward, shrink over (row block, chunk of ``in``): partial ``dropout(x) Aₑᵀ``; expand
    over (row block, chunk of ``out``): s = the sum of the partials (unscaled, float32,
    stored for the backward: N·r values), ``out += scaleₑ · s Bₑᵀ``;
  * backward, over (row block, chunk of ``out``), one pass over dY: partial
    ``ds = scaleₑ · dY Bₑ`` and ``dBₑ += scaleₑ · dYᵀ s``;
  * backward, over (row block, chunk of ``in``), one pass over x: ``dX += dropout'(ds Aₑ)``
    and ``dAₑ += dsᵀ dropout(x)``.

* **rows** (decode: at most :func:`row_path_max_rows` rows, e.g. one token per sequence of a
  serving batch whose sequences use tens of adapters): no sort, one program per (row, chunk
  of ``in``) computes a partial shrink of its row with its own adapter (a GEMV: a decode row
  block would hold as many adapters as rows), then one program per (row, block of output
  columns) sums the partials and adds ``scaleₑ · s Bₑᵀ`` into its columns. The same s is
  stored, so the backward is the one above.

Dropout keeps ``x[n, k]`` iff ``tl.rand(seed, n · in + k) >= p`` (Philox), regenerated in the
backward, never stored. dA and dB are float32 atomic sums over row blocks, so their last bits
can differ between runs, unless the backward is asked to be deterministic (then per-block
slices summed in a fixed order); everything else is deterministic.
Rows whose route value lies outside [0, E) get no adapter, like -1. x, A, B, dY and the
outputs are read through their strides; route and a scale tensor are made contiguous first.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastvl._outputs import empty_output
from fastvl.kernels import cdiv, gpu_sizes, launchable, next_power_of_2

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
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, CHUNK, num_warps) of the row-block path: a program
    takes BLOCK_M rows and CHUNK columns (of ``in`` or ``out``) in BLOCK_K / BLOCK_N tiles.

    GPU sizes: picked without a GPU so that no kernel spills registers on sm_90 (ptxas, see
    :func:`fastvl.triton_aot.resource_usage`; 64x64 tiles with 4 warps spill up to 944
    bytes); to be tuned by timing on the GPU."""
    block_r = shrink_columns(rank)
    if not gpu_sizes(device):
        return 16, 16, 16, block_r, 32, 4  # small blocks so the tests' shapes span several
    block_m = 64 if block_r <= 32 and dtype != torch.float32 else 32
    return block_m, 32, 32, block_r, 512, 8


@triton.jit
def _block_rows(route_ptr, order_ptr, num_rows, num_adapters, ROUTED: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """This program's rows: (row index, in range, adapter per row (-1 none, also for route
    values outside [0, E)), first and last adapter used in the block)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
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
def _lora_shrink_kernel(
    x_ptr, a_ptr, route_ptr, order_ptr, partial_ptr,
    num_rows, num_adapters, in_features, rank, seed, dropout_p,
    stride_xm, stride_xk, stride_ae, stride_ar, stride_ak,
    ROUTED: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
):
    """partial[c, n] = dropout(x[n, chunk c]) Aₑ[:, chunk c]ᵀ (e = route[n]; zeros without an
    adapter) for the row block of program 0 and the CHUNK columns of ``in`` of program 1;
    float32 (chunks, N, BLOCK_R)."""
    rows, in_rows, adapter, first, last = _block_rows(
        route_ptr, order_ptr, num_rows, num_adapters, ROUTED, BLOCK_M)
    chunk = tl.program_id(1)
    r = tl.arange(0, BLOCK_R)
    s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for e in range(first, last + 1):
        mine = in_rows & (adapter == e)
        for k0 in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < in_features
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                        mask=mine[:, None] & k_mask[None, :], other=0.0)
            if DROPOUT:
                x = _dropout(x, rows[:, None] * in_features + k[None, :], seed, dropout_p)
            a = tl.load(a_ptr + e * stride_ae + r[None, :] * stride_ar + k[:, None] * stride_ak,
                        mask=k_mask[:, None] & (r < rank)[None, :], other=0.0)
            # Selected, not multiplied by other rows' zeros: A may hold NaN / inf.
            s = tl.where(mine[:, None], tl.dot(x, a, s, input_precision=PRECISION), s)
    tl.store(partial_ptr + (chunk * num_rows + rows[:, None]) * BLOCK_R + r[None, :], s,
             mask=in_rows[:, None])


@triton.jit
def _block_sum(partial_ptr, rows, in_rows, num_rows, num_chunks, BLOCK_M: tl.constexpr,
               BLOCK_R: tl.constexpr):
    """The rows' sums over the chunks of a float32 (chunks, N, BLOCK_R) partial buffer, in
    chunk order."""
    r = tl.arange(0, BLOCK_R)
    total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for chunk in range(0, num_chunks):
        total += tl.load(partial_ptr + (chunk * num_rows + rows[:, None]) * BLOCK_R + r[None, :],
                         mask=in_rows[:, None], other=0.0)
    return total


@triton.jit
def _lora_expand_kernel(
    partial_ptr, b_ptr, scale_ptr, scaling, route_ptr, order_ptr, out_ptr, s_ptr,
    num_rows, num_adapters, out_features, rank, num_chunks,
    stride_be, stride_bo, stride_br, stride_om, stride_on,
    ROUTED: tl.constexpr, PER_ADAPTER_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
):
    """s = the summed shrink of the row block of program 0 (stored by the programs of the
    first chunk); out[n, cols] += scaleₑ · s[n] Bₑ[cols]ᵀ over the CHUNK output columns of
    program 1, read and written once for every row with an adapter."""
    rows, in_rows, adapter, first, last = _block_rows(
        route_ptr, order_ptr, num_rows, num_adapters, ROUTED, BLOCK_M)
    chunk = tl.program_id(1)
    r = tl.arange(0, BLOCK_R)
    s = _block_sum(partial_ptr, rows, in_rows, num_rows, num_chunks, BLOCK_M, BLOCK_R)
    tl.store(s_ptr + rows[:, None] * BLOCK_R + r[None, :], s,
             mask=in_rows[:, None] & (chunk == 0))
    has = in_rows & (adapter >= 0)
    scale = _adapter_scale(scale_ptr, scaling, tl.maximum(adapter, 0), has, PER_ADAPTER_SCALE)
    scaled = (s * scale[:, None]).to(out_ptr.dtype.element_ty)
    for n0 in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < out_features
        out_ptrs = out_ptr + rows[:, None] * stride_om + n[None, :] * stride_on
        tile_mask = has[:, None] & n_mask[None, :]
        total = tl.load(out_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        for e in range(first, last + 1):
            b = tl.load(b_ptr + e * stride_be + n[None, :] * stride_bo + r[:, None] * stride_br,
                        mask=(r < rank)[:, None] & n_mask[None, :], other=0.0)
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
def _lora_shrink_rows_kernel(
    x_ptr, a_ptr, route_ptr, partial_ptr,
    num_rows, num_adapters, in_features, rank, seed, dropout_p,
    stride_xm, stride_xk, stride_ae, stride_ar, stride_ak,
    ROUTED: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """partial[c, n] = dropout(x[n, chunk c]) Aₑ[:, chunk c]ᵀ for row n = program 0 and the
    chunk c = program 1 of BLOCK_K columns; float32 (chunks, N, BLOCK_R), zeros for rows
    without an adapter."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    adapter, used = _row_adapter(route_ptr, row, num_adapters, ROUTED)
    r = tl.arange(0, BLOCK_R)
    k = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = (k < in_features) & used
    x = tl.load(x_ptr + row * stride_xm + k * stride_xk, mask=k_mask, other=0.0)
    if DROPOUT:
        x = _dropout(x, row * in_features + k, seed, dropout_p)
    a = tl.load(a_ptr + adapter * stride_ae + r[:, None] * stride_ar + k[None, :] * stride_ak,
                mask=(r < rank)[:, None] & k_mask[None, :], other=0.0)
    partial = tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    tl.store(partial_ptr + (chunk * num_rows + row) * BLOCK_R + r, partial)


@triton.jit
def _lora_expand_rows_kernel(
    partial_ptr, b_ptr, scale_ptr, scaling, route_ptr, out_ptr, s_ptr,
    num_rows, num_adapters, out_features, rank, num_chunks,
    stride_be, stride_bo, stride_br, stride_om, stride_on,
    ROUTED: tl.constexpr, PER_ADAPTER_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """s[n] = the sum of row n's partial shrinks (in chunk order), stored by the programs of
    the first column block; out[n, cols] += scaleₑ · s[n] Bₑ[cols]ᵀ for row n = program 0 and
    the BLOCK_N columns of program 1."""
    row = tl.program_id(0).to(tl.int64)
    column_block = tl.program_id(1)
    adapter, used = _row_adapter(route_ptr, row, num_adapters, ROUTED)
    r = tl.arange(0, BLOCK_R)
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for chunk in range(0, num_chunks):
        s += tl.load(partial_ptr + (chunk * num_rows + row) * BLOCK_R + r)
    tl.store(s_ptr + row * BLOCK_R + r, s, mask=(r < BLOCK_R) & (column_block == 0))
    # Rounded to the input dtype like the row-block path's expand operand.
    scale = _adapter_scale(scale_ptr, scaling, adapter, used, PER_ADAPTER_SCALE)
    scaled = (s * scale).to(out_ptr.dtype.element_ty).to(tl.float32)
    n = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = (n < out_features) & used
    b = tl.load(b_ptr + adapter * stride_be + n[:, None] * stride_bo + r[None, :] * stride_br,
                mask=n_mask[:, None] & (r < rank)[None, :], other=0.0)
    delta = tl.sum(b.to(tl.float32) * scaled[None, :], axis=1)
    out_ptrs = out_ptr + row * stride_om + n * stride_on
    base = tl.load(out_ptrs, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (base + delta).to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _add_to_weight_grad(grad_ptr, offsets, values, mask, block_stride,
                        DETERMINISTIC: tl.constexpr):
    """grad[offsets] += values: a float32 atomic add, or (DETERMINISTIC) a store into this
    program's own slice, ``block_stride`` apart, which the launcher sums in a fixed order."""
    if DETERMINISTIC:
        tl.store(grad_ptr + tl.program_id(0).to(tl.int64) * block_stride + offsets, values,
                 mask=mask)
    else:
        tl.atomic_add(grad_ptr + offsets, values, mask=mask)


@triton.jit
def _lora_bwd_dy_kernel(
    g_ptr, b_ptr, scale_ptr, scaling, route_ptr, order_ptr, s_ptr, ds_partial_ptr, db_ptr,
    num_rows, num_adapters, out_features, rank, db_block_stride,
    stride_gm, stride_gn, stride_be, stride_bo, stride_br,
    ROUTED: tl.constexpr, PER_ADAPTER_SCALE: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """For the row block of program 0 and the CHUNK output columns of program 1, one pass
    over dY: ds_partial[c, n] = scaleₑ · dY[n, chunk c] Bₑ[chunk c] (float32 (chunks, N,
    BLOCK_R)) and db[e] += scaleₑ · dY[rows of e, chunk c]ᵀ s (float32 (E, out, r))."""
    rows, in_rows, adapter, first, last = _block_rows(
        route_ptr, order_ptr, num_rows, num_adapters, ROUTED, BLOCK_M)
    chunk = tl.program_id(1)
    r = tl.arange(0, BLOCK_R)
    r_mask = r < rank
    has = in_rows & (adapter >= 0)
    scale = _adapter_scale(scale_ptr, scaling, tl.maximum(adapter, 0), has, PER_ADAPTER_SCALE)
    s = tl.load(s_ptr + rows[:, None] * BLOCK_R + r[None, :], mask=has[:, None], other=0.0)
    s = s.to(g_ptr.dtype.element_ty)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < out_features
        g = tl.load(g_ptr + rows[:, None] * stride_gm + n[None, :] * stride_gn,
                    mask=has[:, None] & n_mask[None, :], other=0.0)
        for e in range(first, last + 1):
            mine = (adapter == e)[:, None]
            b = tl.load(b_ptr + e * stride_be + n[:, None] * stride_bo + r[None, :] * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            ds += tl.where(mine, tl.dot(g, b, input_precision=PRECISION), 0.0)
            s_e = tl.where(mine, s, 0.0).to(s.dtype)
            db = tl.dot(tl.trans(g), s_e, input_precision=PRECISION) * _adapter_scale(
                scale_ptr, scaling, e, True, PER_ADAPTER_SCALE)
            in_block = tl.max(mine.to(tl.int32)) > 0  # else its scale may be NaN / inf
            _add_to_weight_grad(db_ptr, (e * out_features + n[:, None]) * rank + r[None, :],
                                db, n_mask[:, None] & r_mask[None, :] & in_block,
                                db_block_stride, DETERMINISTIC)
    tl.store(ds_partial_ptr + (chunk * num_rows + rows[:, None]) * BLOCK_R + r[None, :],
             ds * scale[:, None], mask=in_rows[:, None])


@triton.jit
def _lora_bwd_x_kernel(
    x_ptr, a_ptr, route_ptr, order_ptr, ds_partial_ptr, dx_ptr, da_ptr,
    num_rows, num_adapters, in_features, rank, seed, dropout_p, num_ds_chunks,
    da_block_stride,
    stride_xm, stride_xk, stride_ae, stride_ar, stride_ak, stride_dm, stride_dk,
    ROUTED: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """For the row block of program 0 and the CHUNK columns of ``in`` of program 1, one pass
    over x: dx[n] += dropout'(ds[n] Aₑ) in place and da[e] += ds[rows of e]ᵀ dropout(x)
    (float32 (E, r, in)); ds is the sum of the dY pass's partials."""
    rows, in_rows, adapter, first, last = _block_rows(
        route_ptr, order_ptr, num_rows, num_adapters, ROUTED, BLOCK_M)
    chunk = tl.program_id(1)
    r = tl.arange(0, BLOCK_R)
    r_mask = r < rank
    has = in_rows & (adapter >= 0)
    ds = _block_sum(ds_partial_ptr, rows, in_rows, num_rows, num_ds_chunks, BLOCK_M, BLOCK_R)
    ds = ds.to(x_ptr.dtype.element_ty)
    for k0 in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < in_features
        tile_mask = has[:, None] & k_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=tile_mask, other=0.0)
        if DROPOUT:
            x = _dropout(x, rows[:, None] * in_features + k[None, :], seed, dropout_p)
        dx_lora = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        tile = r[:, None] * in_features + k[None, :]  # of the (r, in) dA of one adapter
        tile_mask_a = r_mask[:, None] & k_mask[None, :]
        for e in range(first, last + 1):
            ds_e = tl.where((adapter == e)[:, None], ds, 0.0).to(ds.dtype)
            if COMPUTE_DX:
                a = tl.load(a_ptr + e * stride_ae + r[:, None] * stride_ar + k[None, :] * stride_ak,
                            mask=tile_mask_a, other=0.0)
                dx_lora = tl.where((adapter == e)[:, None],
                                   tl.dot(ds_e, a, dx_lora, input_precision=PRECISION), dx_lora)
            da = tl.dot(tl.trans(ds_e), x, input_precision=PRECISION)
            _add_to_weight_grad(da_ptr, e * rank * in_features + tile, da, tile_mask_a,
                                da_block_stride, DETERMINISTIC)
        if COMPUTE_DX:
            if DROPOUT:
                dx_lora = _dropout(dx_lora, rows[:, None] * in_features + k[None, :], seed,
                                   dropout_p)
            dx_ptrs = dx_ptr + rows[:, None] * stride_dm + k[None, :] * stride_dk
            dx = tl.load(dx_ptrs, mask=tile_mask, other=0.0).to(tl.float32) + dx_lora
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)


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
    (adapter 0 when route is None). x (N, in), lora_a (E, r, in), lora_b (E, out, r), scale
    (E,) float32 or one float for every adapter. ``row_path``: the decode path (default:
    N <= :func:`row_path_max_rows`).
    Returns s = dropout(x) Aₑᵀ, float32 (N, BLOCK_R) (columns >= r unused)."""
    num_rows, in_features = x.shape
    num_adapters, out_features, rank = lora_b.shape
    block_m, block_n, block_k, block_r, chunk, warps = _blocks(x.device, rank, x.dtype)
    if row_path is None:
        row_path = num_rows <= row_path_max_rows(x.device)
    if num_rows == 0 or lora_a.numel() == 0 or lora_b.numel() == 0:  # a zero branch
        return torch.zeros((num_rows, block_r), dtype=torch.float32, device=x.device)
    route = _contiguous(route)
    if row_path:
        return _row_forward(x, lora_a, lora_b, scale, route, dropout_p, seed, out, block_r,
                            warps)
    route, order = _route_order(route)
    num_blocks, in_chunks = cdiv(num_rows, block_m), cdiv(in_features, chunk)
    partial = _partial_sums(in_chunks, num_rows, block_r, x.device)
    launchable(_lora_shrink_kernel, wrap_triton)[(num_blocks, in_chunks)](
        x, lora_a, route, order, partial, num_rows, num_adapters, in_features, rank, seed,
        dropout_p, *x.stride(), *lora_a.stride(),
        ROUTED=route is not None, DROPOUT=dropout_p > 0, BLOCK_M=block_m, BLOCK_K=block_k,
        BLOCK_R=block_r, CHUNK=chunk, PRECISION=_PRECISION, num_warps=warps,
    )
    s = empty_output((num_rows, block_r), dtype=torch.float32, device=x.device)
    scale_ptr, scaling, per_adapter = _scale_args(scale, lora_b)
    grid = (num_blocks, cdiv(out_features, chunk))
    launchable(_lora_expand_kernel, wrap_triton)[grid](
        partial, lora_b, scale_ptr, scaling, route, order, out, s, num_rows, num_adapters,
        out_features, rank, in_chunks, *lora_b.stride(), *out.stride(),
        ROUTED=route is not None, PER_ADAPTER_SCALE=per_adapter, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_R=block_r, CHUNK=chunk, PRECISION=_PRECISION, num_warps=warps,
    )
    return s


def _partial_sums(num_chunks: int, num_rows: int, block_r: int, device) -> torch.Tensor:
    """The float32 (chunks, N, BLOCK_R) buffer of per-chunk partial sums (every element is
    written by a kernel)."""
    return empty_output((num_chunks, num_rows, block_r), dtype=torch.float32, device=device)


def _row_forward(x, lora_a, lora_b, scale, route, dropout_p, seed, out, block_r, warps):
    """The row path of :func:`lora_forward` (two launches, no sort)."""
    num_rows, in_features = x.shape
    num_adapters, out_features, rank = lora_b.shape
    block_k, block_n = _row_blocks(x.device, block_r)
    num_chunks = cdiv(in_features, block_k)
    partial = _partial_sums(num_chunks, num_rows, block_r, x.device)
    s = empty_output((num_rows, block_r), dtype=torch.float32, device=x.device)
    launchable(_lora_shrink_rows_kernel, wrap_triton)[(num_rows, num_chunks)](
        x, lora_a, route, partial, num_rows, num_adapters, in_features, rank, seed, dropout_p,
        *x.stride(), *lora_a.stride(),
        ROUTED=route is not None, DROPOUT=dropout_p > 0, BLOCK_K=block_k, BLOCK_R=block_r,
        num_warps=warps,
    )
    scale_ptr, scaling, per_adapter = _scale_args(scale, lora_b)
    grid = (num_rows, cdiv(out_features, block_n))
    launchable(_lora_expand_rows_kernel, wrap_triton)[grid](
        partial, lora_b, scale_ptr, scaling, route, out, s, num_rows, num_adapters,
        out_features, rank, num_chunks, *lora_b.stride(), *out.stride(),
        ROUTED=route is not None, PER_ADAPTER_SCALE=per_adapter, BLOCK_N=block_n,
        BLOCK_R=block_r, num_warps=warps,
    )
    return s


def lora_backward(grad_out, x, lora_a, lora_b, scale, route, s, dropout_p: float, seed: int,
                  dx, deterministic: bool = False):
    """The LoRA branch's backward: adds its part of dX into ``dx`` (N, in) in place unless dx
    is None, and returns dA (E, r, in) and dB (E, out, r) flattened one after the other in one
    float32 (E·r·in + E·out·r,) tensor (:func:`split_adapter_grads`), zeros for adapters
    without rows. s: the forward's float32 (N, BLOCK_R) shrink; scale as in
    :func:`lora_forward`. ``deterministic``: each row block writes its own dA, dB slice and
    the slices are summed in order (bit-reproducible; one such buffer per BLOCK_M rows)
    instead of atomic adds."""
    num_rows, in_features = x.shape
    num_adapters, out_features, rank = lora_b.shape
    block_m, block_n, block_k, block_r, chunk, warps = _blocks(x.device, rank, x.dtype)
    num_blocks = cdiv(num_rows, block_m)
    slices = num_blocks if deterministic and num_rows else 1
    # dA and dB of each slice side by side in one buffer: one zero-fill, one sum.
    size_a = num_adapters * rank * in_features
    size = size_a + num_adapters * out_features * rank
    grads = torch.zeros((slices, size), dtype=torch.float32, device=x.device)
    da, db = grads[:, :size_a], grads[:, size_a:]
    if num_rows and lora_a.numel() and lora_b.numel():
        route, order = _route_order(_contiguous(route))
        out_chunks, in_chunks = cdiv(out_features, chunk), cdiv(in_features, chunk)
        ds_partial = _partial_sums(out_chunks, num_rows, block_r, x.device)
        scale_ptr, scaling, per_adapter = _scale_args(scale, lora_b)
        launchable(_lora_bwd_dy_kernel, wrap_triton)[(num_blocks, out_chunks)](
            grad_out, lora_b, scale_ptr, scaling, route, order, s, ds_partial, db,
            num_rows, num_adapters, out_features, rank, size,
            *grad_out.stride(), *lora_b.stride(),
            ROUTED=route is not None, PER_ADAPTER_SCALE=per_adapter,
            DETERMINISTIC=deterministic,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, CHUNK=chunk,
            PRECISION=_PRECISION, num_warps=warps,
        )
        dx_strides = (0, 0) if dx is None else dx.stride()
        launchable(_lora_bwd_x_kernel, wrap_triton)[(num_blocks, in_chunks)](
            x, lora_a, route, order, ds_partial, dx, da,
            num_rows, num_adapters, in_features, rank, seed, dropout_p, out_chunks, size,
            *x.stride(), *lora_a.stride(), *dx_strides,
            ROUTED=route is not None, DROPOUT=dropout_p > 0, COMPUTE_DX=dx is not None,
            DETERMINISTIC=deterministic,
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, CHUNK=chunk,
            PRECISION=_PRECISION, num_warps=warps,
        )
    return grads[0] if slices == 1 else grads.sum(0)


def split_adapter_grads(grads: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor):
    """(dA, dB) shaped like lora_a, lora_b: views of the flat ``grads`` of
    :func:`lora_backward` (or of its cast to another dtype)."""
    size_a = lora_a.numel()
    return grads[:size_a].view(lora_a.shape), grads[size_a:].view(lora_b.shape)
