"""Masked (gather-first) patch embedding in Triton: only the kept patches are read and projected.

Layouts as :mod:`fastvl.reference.patch_embed`, with images seen as video of one frame: imgs
(B, C, T, H, W) any strides, weight (D, C, pt, ph, pw), patch grid (t, h, w) row-major, a patch
flattened channel-major (C, pt, ph, pw) into ``E = C * pt * ph * pw`` values. The kept rows
``m = b * K + k`` (M = B * K of them) are patch ``ids_keep[b, k]`` of sample b.

Forward: one GEMM, (M, E) x (E, D). The A tile is read straight from imgs (im2col on the fly:
row offset from the patch index, column offset from the flattened (c, dt, dy, dx)); the
epilogue adds bias and ``pos_embed[pos_row0 + l]`` in float32 and writes row ``out_row0 + k``
of sample b. The class-token row (cls + its position) is written by the launcher.

Backward, the im2col matrix never stored:

* dimgs: ``dY (M, D) x W (D, E)``, each row added into its patch's pixels of a float32 zero
  image (atomics; with distinct indices per sample every pixel gets one addition, so it is
  exact and deterministic, repeated indices sum in an unspecified order);
* dweight: ``dY^T (D, M) x A (M, E)``, A re-read from imgs, split over M into a fixed number
  of float32 partial sums added afterwards (deterministic);
* dpos: for each patch l, the sum of the dY rows that kept it, over the whole batch: the kept
  rows are sorted by patch index (stable), and one program per (l, D block) adds its rows in
  that order (deterministic, no atomics, repeated indices fine).

Indices outside [0, L) are never dereferenced (the op layer checks the range first): their
rows read no pixels and no position, and get no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastvl._outputs import empty_output
from fastvl.kernels import cdiv, gpu_sizes, launchable, multiprocessors, next_power_of_2

_INTERPRETER_BLOCKS = (16, 16, 16)  # small blocks so the tests' shapes span several
# tl.dot's input precision: float32 must not be rounded to tf32 (fp16 / bf16 ignore it).
_PRECISION = "ieee"


def _gemm_config(dtype: torch.dtype, device: torch.device):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if not gpu_sizes(device):
        return (*_INTERPRETER_BLOCKS, 4, 1)
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 128, 128, 32, 8, 3


@triton.jit
def _kept_patches(ids_ptr, rows, num_rows, num_kept, num_patches, grid_h, grid_w,
                  stride_ib, stride_ik, stride_b, stride_t, stride_h, stride_w,
                  PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """For kept rows ``rows`` (b * K + k): (b, k, patch l, valid, offset of the patch's first
    pixel in a (B, C, T, H, W) tensor with the given strides)."""
    b = (rows // num_kept).to(tl.int64)
    k = rows % num_kept
    in_rows = rows < num_rows
    patch = tl.load(ids_ptr + b * stride_ib + k * stride_ik, mask=in_rows, other=0)
    valid = in_rows & (patch >= 0) & (patch < num_patches)
    patch = tl.where(valid, patch, 0)
    col = patch % grid_w
    row = (patch // grid_w) % grid_h
    frame = patch // (grid_w * grid_h)
    start = b * stride_b + frame * PT * stride_t + row * PH * stride_h + col * PW * stride_w
    return b, k, patch, valid, start


@triton.jit
def _pixel_offsets(e, stride_c, stride_t, stride_h, stride_w,
                   PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """Offsets of flattened patch positions e = ((c * PT + dt) * PH + dy) * PW + dx."""
    dx = e % PW
    dy = (e // PW) % PH
    dt = (e // (PW * PH)) % PT
    c = e // (PW * PH * PT)
    return c.to(tl.int64) * stride_c + dt * stride_t + dy * stride_h + dx * stride_w


@triton.jit
def _embed_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, pos_ptr, ids_ptr, out_ptr,
    num_rows, num_kept, num_patches, grid_h, grid_w, dim, patch_len, pos_row0, out_row0,
    stride_xb, stride_xc, stride_xt, stride_xh, stride_xw,
    stride_wd, stride_we, stride_ib, stride_ik, stride_pn, stride_pd,
    stride_ob, stride_on,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b, k, patch, valid, start = _kept_patches(
        ids_ptr, rows, num_rows, num_kept, num_patches, grid_h, grid_w, stride_ib, stride_ik,
        stride_xb, stride_xt, stride_xh, stride_xw, PT, PH, PW,
    )
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < dim
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for e0 in range(0, patch_len, BLOCK_K):
        e = e0 + tl.arange(0, BLOCK_K)
        e_mask = e < patch_len
        offsets = _pixel_offsets(e, stride_xc, stride_xt, stride_xh, stride_xw, PT, PH, PW)
        a = tl.load(x_ptr + start[:, None] + offsets[None, :],
                    mask=valid[:, None] & e_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wd + e[:, None] * stride_we,
                    mask=e_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        pos = tl.load(pos_ptr + (pos_row0 + patch)[:, None] * stride_pn + cols[None, :] * stride_pd,
                      mask=valid[:, None] & col_mask[None, :], other=0.0)
        acc += pos.to(tl.float32)
    out_rows = b * stride_ob + (out_row0 + k) * stride_on
    out_ptrs = out_ptr + out_rows[:, None] + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=(rows < num_rows)[:, None] & col_mask[None, :])


@triton.jit
def _embed_dimgs_kernel(
    g_ptr, w_ptr, ids_ptr, dx_ptr,
    num_rows, num_kept, num_patches, grid_h, grid_w, dim, patch_len, out_row0,
    stride_gb, stride_gn, stride_gd, stride_wd, stride_we, stride_ib, stride_ik,
    stride_xb, stride_xc, stride_xt, stride_xh, stride_xw,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dx[pixels of kept patch m] += (dY W)[m]; dx: float32 (B, C, T, H, W), strides given."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b, k, patch, valid, start = _kept_patches(
        ids_ptr, rows, num_rows, num_kept, num_patches, grid_h, grid_w, stride_ib, stride_ik,
        stride_xb, stride_xt, stride_xh, stride_xw, PT, PH, PW,
    )
    e = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    e_mask = e < patch_len
    grad_rows = b * stride_gb + (out_row0 + k) * stride_gn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_K):
        d = d0 + tl.arange(0, BLOCK_K)
        d_mask = d < dim
        g = tl.load(g_ptr + grad_rows[:, None] + d[None, :] * stride_gd,
                    mask=valid[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptr + d[:, None] * stride_wd + e[None, :] * stride_we,
                    mask=d_mask[:, None] & e_mask[None, :], other=0.0)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
    offsets = _pixel_offsets(e, stride_xc, stride_xt, stride_xh, stride_xw, PT, PH, PW)
    tl.atomic_add(dx_ptr + start[:, None] + offsets[None, :], acc,
                  mask=valid[:, None] & e_mask[None, :])


@triton.jit
def _embed_dweight_kernel(
    g_ptr, x_ptr, ids_ptr, partial_ptr,
    num_rows, rows_per_split, num_kept, num_patches, grid_h, grid_w, dim, patch_len, out_row0,
    stride_gb, stride_gn, stride_gd, stride_ib, stride_ik,
    stride_xb, stride_xc, stride_xt, stride_xh, stride_xw,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """partial[s, d, e] = sum over kept rows m of split s of dY[m, d] * A[m, e]."""
    d = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    e = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    d_mask = d < dim
    e_mask = e < patch_len
    offsets = _pixel_offsets(e, stride_xc, stride_xt, stride_xh, stride_xw, PT, PH, PW)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, num_rows)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(first, last, BLOCK_K):
        rows = m0 + tl.arange(0, BLOCK_K)
        b, k, patch, valid, start = _kept_patches(
            ids_ptr, rows, last, num_kept, num_patches, grid_h, grid_w, stride_ib, stride_ik,
            stride_xb, stride_xt, stride_xh, stride_xw, PT, PH, PW,
        )
        grad_rows = b * stride_gb + (out_row0 + k) * stride_gn
        g_t = tl.load(g_ptr + d[:, None] * stride_gd + grad_rows[None, :],
                      mask=d_mask[:, None] & valid[None, :], other=0.0)
        a = tl.load(x_ptr + start[:, None] + offsets[None, :],
                    mask=valid[:, None] & e_mask[None, :], other=0.0)
        acc = tl.dot(g_t, a, acc, input_precision=PRECISION)
    out = partial_ptr + split * dim * patch_len + d[:, None] * patch_len + e[None, :]
    tl.store(out, acc, mask=d_mask[:, None] & e_mask[None, :])


@triton.jit
def _embed_dpos_kernel(
    g_ptr, order_ptr, bounds_ptr, dpos_ptr,
    num_kept, dim, out_row0, stride_gb, stride_gn, stride_gd,
    BLOCK_D: tl.constexpr,
):
    """dpos[l] = sum of dY over the kept rows ``order[bounds[l]:bounds[l + 1]]`` (float32)."""
    patch = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < dim
    first = tl.load(bounds_ptr + patch)
    last = tl.load(bounds_ptr + patch + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(first, last):
        row = tl.load(order_ptr + j)
        b = row // num_kept
        k = row % num_kept
        grad = tl.load(g_ptr + b * stride_gb + (out_row0 + k) * stride_gn + d * stride_gd,
                       mask=d_mask, other=0.0)
        acc += grad.to(tl.float32)
    tl.store(dpos_ptr + patch.to(tl.int64) * dim + d, acc, mask=d_mask)


def _grid_args(imgs: torch.Tensor, weight: torch.Tensor, ids_keep: torch.Tensor):
    """(num_rows M, num_kept K, num_patches L, grid_h, grid_w, dim D, patch_len E, patch size)."""
    patch = tuple(weight.shape[2:])
    frames, height, width = (n // p for n, p in zip(imgs.shape[2:], patch))
    batch, num_kept = ids_keep.shape
    return (batch * num_kept, num_kept, frames * height * width, height, width,
            weight.shape[0], weight[0].numel(), patch)


def masked_patch_embed_forward(imgs, weight, bias, pos_embed, ids_keep, cls_token):
    """imgs (B, C, T, H, W), weight (D, C, pt, ph, pw), bias (D,) or None, pos_embed (N, D) or
    None (N = L or 1 + L), ids_keep (B, K), cls_token (1, 1, D) or None -> contiguous
    (B, [1 +] K, D) in imgs' dtype."""
    num_rows, num_kept, num_patches, grid_h, grid_w, dim, patch_len, patch = _grid_args(
        imgs, weight, ids_keep
    )
    out_row0 = 0 if cls_token is None else 1
    out = empty_output((ids_keep.shape[0], out_row0 + num_kept, dim), dtype=imgs.dtype,
                       device=imgs.device)
    if cls_token is not None:
        cls = cls_token.reshape(1, dim)
        if pos_embed is not None and pos_embed.shape[0] == num_patches + 1:
            cls = cls + pos_embed[:1]
        out[:, 0] = cls
    if num_rows == 0 or dim == 0:
        return out
    w2 = weight.reshape(dim, patch_len)
    pos_row0 = 0 if pos_embed is None else pos_embed.shape[0] - num_patches
    pos_strides = (0, 0) if pos_embed is None else pos_embed.stride()
    block_m, block_n, block_k, warps, stages = _gemm_config(imgs.dtype, imgs.device)
    grid = (cdiv(num_rows, block_m), cdiv(dim, block_n))
    launchable(_embed_fwd_kernel, wrap_triton)[grid](
        imgs, w2, bias, pos_embed, ids_keep, out,
        num_rows, num_kept, num_patches, grid_h, grid_w, dim, patch_len, pos_row0, out_row0,
        *imgs.stride(), *w2.stride(), *ids_keep.stride(), *pos_strides,
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
        PT=patch[0], PH=patch[1], PW=patch[2],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_PRECISION,
        num_warps=warps, num_stages=stages,
    )
    return out


def _weight_splits(tiles: int, num_rows: int, block_k: int, device: torch.device) -> int:
    """How many partial sums dweight's reduction over the kept rows is split into."""
    chunks = cdiv(num_rows, block_k)
    if not gpu_sizes(device):
        return min(2, chunks)  # exercise the split path in the interpreter
    programs = 2 * multiprocessors(device)
    return max(1, min(cdiv(programs, tiles), chunks // 4))


def masked_patch_embed_backward(grad_out, imgs, weight, ids_keep, num_pos_rows: int,
                                compute_dimgs: bool, compute_dweight: bool):
    """grad_out (B, [1 +] K, D) -> (dimgs (B, C, T, H, W) or empty, dweight or empty,
    dpos (num_pos_rows, D) or empty), each in its input's dtype. dbias and dcls are plain sums
    of grad_out left to the caller; dpos's class-token row (num_pos_rows = 1 + L) is one."""
    num_rows, num_kept, num_patches, grid_h, grid_w, dim, patch_len, patch = _grid_args(
        imgs, weight, ids_keep
    )
    out_row0 = grad_out.shape[1] - num_kept
    block_m, block_n, block_k, warps, stages = _gemm_config(imgs.dtype, imgs.device)
    geometry = dict(PT=patch[0], PH=patch[1], PW=patch[2], BLOCK_M=block_m, BLOCK_N=block_n,
                    BLOCK_K=block_k, PRECISION=_PRECISION, num_warps=warps,
                    num_stages=stages)
    w2 = weight.reshape(dim, patch_len)
    run = num_rows > 0 and dim > 0 and patch_len > 0

    dimgs = imgs.new_empty(0)  # not asked for
    if compute_dimgs:
        acc = torch.zeros(imgs.shape, dtype=torch.float32, device=imgs.device)
        if run:
            grid = (cdiv(num_rows, block_m), cdiv(patch_len, block_n))
            launchable(_embed_dimgs_kernel, wrap_triton)[grid](
                grad_out, w2, ids_keep, acc,
                num_rows, num_kept, num_patches, grid_h, grid_w, dim, patch_len, out_row0,
                *grad_out.stride(), *w2.stride(), *ids_keep.stride(), *acc.stride(),
                **geometry,
            )
        dimgs = acc.to(imgs.dtype)

    dweight = imgs.new_empty(0)  # not asked for
    if compute_dweight:
        tiles = cdiv(dim, block_m) * cdiv(patch_len, block_n)
        splits = _weight_splits(tiles, num_rows, block_k, imgs.device) if run else 1
        rows_per_split = cdiv(cdiv(num_rows, splits), block_k) * block_k
        # Every element of every split is written by the kernel (zeros only without a launch).
        new_partial = empty_output if run else torch.zeros
        partial = new_partial((splits, dim, patch_len), dtype=torch.float32, device=imgs.device)
        if run:
            grid = (cdiv(dim, block_m), cdiv(patch_len, block_n), splits)
            launchable(_embed_dweight_kernel, wrap_triton)[grid](
                grad_out, imgs, ids_keep, partial,
                num_rows, rows_per_split, num_kept, num_patches, grid_h, grid_w, dim,
                patch_len, out_row0, *grad_out.stride(), *ids_keep.stride(), *imgs.stride(),
                **geometry,
            )
        total = partial[0] if splits == 1 else partial.sum(0)
        dweight = total.to(weight.dtype).reshape(weight.shape)

    dpos = imgs.new_empty(0)  # not asked for
    if num_pos_rows:
        # The kernel writes every patch row, the class token's row is written below.
        new_dpos = empty_output if run else torch.zeros
        dpos = new_dpos((num_pos_rows, dim), dtype=torch.float32, device=imgs.device)
        if num_pos_rows > num_patches:  # the class token's row
            torch.sum(grad_out[:, 0], 0, dtype=torch.float32, out=dpos[0])
        if run:
            flat = ids_keep.reshape(-1)
            sorted_ids, order = torch.sort(flat, stable=True)
            patches = torch.arange(num_patches + 1, device=flat.device, dtype=flat.dtype)
            bounds = torch.searchsorted(sorted_ids, patches)  # rows of patch l: [b[l], b[l+1])
            block_d = min(next_power_of_2(dim), 1024 if gpu_sizes(imgs.device) else 64)
            grid = (num_patches, cdiv(dim, block_d))
            launchable(_embed_dpos_kernel, wrap_triton)[grid](
                grad_out, order, bounds, dpos[num_pos_rows - num_patches:],
                num_kept, dim, out_row0, *grad_out.stride(), BLOCK_D=block_d,
            )
        dpos = dpos.to(imgs.dtype)
    return dimgs, dweight, dpos
