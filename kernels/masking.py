"""MAE kernels: the decoder-input unshuffle (forward / backward) and the masked pixel loss.

Unshuffle: one program per (output row, D-block) picks x's row or the mask token and adds the
position. Its backward runs one program per (position, D-block) looping over the batch, so
the position and mask-token gradients are sums in a fixed order (no atomics) and each x row
is written exactly once (``ids_restore`` is a permutation).

Pixel loss: one program per (pred row, patch); it reads the patch straight from the image
(any strides), normalises it in registers and reduces the squared error in float32. Layouts
are those of :mod:`fastvl.reference.masking`.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastvl._outputs import empty_output
from fastvl.kernels import cdiv, launchable, next_power_of_2
from fastvl.kernels.gather import channel_block

NORM_NONE, NORM_MAE, NORM_VIDEOMAE = 0, 1, 2


# ---- unshuffle_with_mask_token -----------------------------------------------------------


@triton.jit
def _unshuffle_fwd_kernel(
    x_ptr, ids_ptr, token_ptr, pos_ptr, out_ptr,
    num_rows, num_prefix, num_visible, dim,
    stride_xb, stride_xn, stride_xd,
    stride_ib, stride_il,
    stride_t,
    stride_pn, stride_pd,
    HAS_POS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * (P + L) + n
    b = row // num_rows
    n = row % num_rows
    is_prefix = n < num_prefix
    patch = tl.maximum(n - num_prefix, 0)
    restore = tl.load(ids_ptr + b * stride_ib + patch * stride_il, mask=n >= num_prefix, other=0)
    from_x = is_prefix | ((restore >= 0) & (restore < num_visible))
    src = tl.where(is_prefix, n, num_prefix + restore)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    # Exactly one of the two loads reads columns; the other is all zeros.
    x_end = tl.where(from_x, dim, 0)
    token_end = tl.where(from_x, 0, dim)
    value = tl.load(
        x_ptr + b * stride_xb + src * stride_xn + cols * stride_xd, mask=cols < x_end, other=0.0
    ).to(tl.float32)
    value += tl.load(token_ptr + cols * stride_t, mask=cols < token_end, other=0.0).to(tl.float32)
    if HAS_POS:
        value += tl.load(
            pos_ptr + n * stride_pn + cols * stride_pd, mask=cols < dim, other=0.0
        ).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, value.to(out_ptr.dtype.element_ty), mask=cols < dim)


@triton.jit
def _unshuffle_bwd_kernel(
    dy_ptr, ids_ptr, dx_ptr, dtoken_rows_ptr, dpos_ptr,
    batch, num_rows, num_prefix, num_visible, dim,
    stride_yb, stride_yn, stride_yd,
    stride_ib, stride_il,
    HAS_POS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # output position in [0, P + L)
    is_prefix = n < num_prefix
    patch = tl.maximum(n - num_prefix, 0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    num_x_rows = num_prefix + num_visible
    pos_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    token_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for b in range(0, batch):
        grad = tl.load(
            dy_ptr + b * stride_yb + n * stride_yn + cols * stride_yd, mask=col_mask, other=0.0
        )
        pos_sum += grad.to(tl.float32)
        restore = tl.load(
            ids_ptr + b * stride_ib + patch * stride_il, mask=n >= num_prefix, other=0
        )
        to_x = is_prefix | ((restore >= 0) & (restore < num_visible))
        dst = tl.where(is_prefix, n, num_prefix + restore)
        tl.store(
            dx_ptr + (b * num_x_rows + dst) * dim + cols,
            grad.to(dx_ptr.dtype.element_ty),
            mask=cols < tl.where(to_x, dim, 0),
        )
        token_sum += tl.where(to_x, 0.0, grad.to(tl.float32))
    tl.store(dtoken_rows_ptr + n * dim + cols, token_sum, mask=col_mask)
    if HAS_POS:
        tl.store(dpos_ptr + n * dim + cols, pos_sum, mask=col_mask)


def unshuffle_forward(x, ids_restore, mask_token, pos_embed, num_prefix_tokens, out_dtype):
    """x (B, P + K, D), ids_restore (B, L), mask_token (D,), pos_embed (P + L, D) or None ->
    (B, P + L, D) contiguous in ``out_dtype``."""
    batch, num_x_rows, dim = x.shape
    num_rows = num_prefix_tokens + ids_restore.shape[1]
    out = empty_output((batch, num_rows, dim), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    has_pos = pos_embed is not None
    pos = pos_embed if has_pos else mask_token.view(1, dim)  # a dummy pointer when absent
    block_d = channel_block(dim, 4)
    grid = (batch * num_rows, cdiv(dim, block_d))
    launchable(_unshuffle_fwd_kernel, wrap_triton)[grid](
        x, ids_restore, mask_token, pos, out,
        num_rows, num_prefix_tokens, num_x_rows - num_prefix_tokens, dim,
        x.stride(0), x.stride(1), x.stride(2),
        ids_restore.stride(0), ids_restore.stride(1),
        mask_token.stride(0),
        pos.stride(0), pos.stride(1),
        HAS_POS=has_pos,
        BLOCK_D=block_d,
    )
    return out


def unshuffle_backward(grad_out, ids_restore, num_prefix_tokens, num_visible, compute_dpos):
    """grad_out (B, P + L, D) -> (dx (B, P + K, D) in grad_out's dtype, float32 per-position
    mask-token gradients (P + L, D) (sum them over dim 0), float32 dpos (P + L, D) or an empty
    tensor)."""
    batch, num_rows, dim = grad_out.shape
    dx = empty_output(
        (batch, num_prefix_tokens + num_visible, dim), dtype=grad_out.dtype, device=grad_out.device
    )
    dtoken_rows = empty_output((num_rows, dim), dtype=torch.float32, device=grad_out.device)
    dpos = empty_output(
        (num_rows, dim) if compute_dpos else (0,), dtype=torch.float32, device=grad_out.device
    )
    if dtoken_rows.numel() == 0:
        return dx, dtoken_rows, dpos
    block_d = channel_block(dim, 4)
    grid = (num_rows, cdiv(dim, block_d))
    launchable(_unshuffle_bwd_kernel, wrap_triton)[grid](
        grad_out, ids_restore, dx, dtoken_rows, dpos,
        batch, num_rows, num_prefix_tokens, num_visible, dim,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        ids_restore.stride(0), ids_restore.stride(1),
        HAS_POS=compute_dpos,
        BLOCK_D=block_d,
    )
    return dx, dtoken_rows, dpos


# ---- masked_pixel_loss -------------------------------------------------------------------


@triton.jit
def _patch_target(
    imgs_ptr, b, patch, pix, chan, valid,
    num_pix, channels, grid_h, grid_w, patch_t, patch_h, patch_w, eps,
    stride_ib, stride_ic, stride_it, stride_ih, stride_iw,
    NORM: tl.constexpr,
):
    """The (BLOCK_P, BLOCK_C) float32 target of one patch (pixels x channels), zero outside
    ``valid``; NORM: 0 raw, 1 MAE (whole patch, eps in the sqrt), 2 VideoMAE (per channel,
    eps on the std). Unbiased variances."""
    gx = patch % grid_w
    gy = (patch // grid_w) % grid_h
    gt = patch // (grid_w * grid_h)
    ix = pix % patch_w
    iy = (pix // patch_w) % patch_h
    it = pix // (patch_w * patch_h)
    offsets = (
        b * stride_ib + chan * stride_ic + (gt * patch_t + it) * stride_it
        + (gy * patch_h + iy) * stride_ih + (gx * patch_w + ix) * stride_iw
    )
    x = tl.load(imgs_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    if NORM == 1:
        count = num_pix * channels
        mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
        centered = tl.where(valid, x - mean, 0.0)
        var = tl.sum(tl.sum(centered * centered, axis=1), axis=0) / (count - 1)
        x = centered / tl.sqrt(var + eps)
    elif NORM == 2:
        mean = tl.sum(x, axis=0) / num_pix
        centered = tl.where(valid, x - mean[None, :], 0.0)
        var = tl.sum(centered * centered, axis=0) / (num_pix - 1)
        x = centered / (tl.sqrt(var) + eps)[None, :]
    return x


@triton.jit
def _pixel_loss_fwd_kernel(
    pred_ptr, imgs_ptr, index_ptr, weight_ptr, row_error_ptr,
    num_rows, num_pix, channels, grid_h, grid_w, patch_t, patch_h, patch_w, eps,
    stride_pb, stride_pr, stride_pn,
    stride_ib, stride_ic, stride_it, stride_ih, stride_iw,
    HAS_INDEX: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * R + r
    b = row // num_rows
    r = row % num_rows
    error = 0.0
    if tl.load(weight_ptr + row) != 0:  # rows that do not count are not read
        patch = r
        if HAS_INDEX:
            patch = tl.load(index_ptr + row)
        pix = tl.arange(0, BLOCK_P)[:, None]
        chan = tl.arange(0, BLOCK_C)[None, :]
        valid = (pix < num_pix) & (chan < channels)
        target = _patch_target(
            imgs_ptr, b, patch, pix, chan, valid,
            num_pix, channels, grid_h, grid_w, patch_t, patch_h, patch_w, eps,
            stride_ib, stride_ic, stride_it, stride_ih, stride_iw, NORM,
        )
        pred = tl.load(
            pred_ptr + b * stride_pb + r * stride_pr + (pix * channels + chan) * stride_pn,
            mask=valid, other=0.0,
        ).to(tl.float32)
        diff = tl.where(valid, pred - target, 0.0)
        error = tl.sum(tl.sum(diff * diff, axis=1), axis=0) / (num_pix * channels)
    tl.store(row_error_ptr + row, error)


@triton.jit
def _pixel_loss_bwd_kernel(
    grad_rows_ptr, pred_ptr, imgs_ptr, index_ptr, dpred_ptr,
    num_rows, num_pix, channels, grid_h, grid_w, patch_t, patch_h, patch_w, eps,
    stride_gb, stride_gr,
    stride_pb, stride_pr, stride_pn,
    stride_ib, stride_ic, stride_it, stride_ih, stride_iw,
    HAS_INDEX: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // num_rows
    r = row % num_rows
    pix = tl.arange(0, BLOCK_P)[:, None]
    chan = tl.arange(0, BLOCK_C)[None, :]
    valid = (pix < num_pix) & (chan < channels)
    dpred_ptrs = dpred_ptr + row * num_pix * channels + pix * channels + chan
    grad = tl.load(grad_rows_ptr + b * stride_gb + r * stride_gr).to(tl.float32)
    if grad != 0:
        patch = r
        if HAS_INDEX:
            patch = tl.load(index_ptr + row)
        target = _patch_target(
            imgs_ptr, b, patch, pix, chan, valid,
            num_pix, channels, grid_h, grid_w, patch_t, patch_h, patch_w, eps,
            stride_ib, stride_ic, stride_it, stride_ih, stride_iw, NORM,
        )
        pred = tl.load(
            pred_ptr + b * stride_pb + r * stride_pr + (pix * channels + chan) * stride_pn,
            mask=valid, other=0.0,
        ).to(tl.float32)
        dpred = (2.0 * grad / (num_pix * channels)) * (pred - target)
        tl.store(dpred_ptrs, dpred.to(dpred_ptr.dtype.element_ty), mask=valid)
    else:
        zeros = tl.zeros([BLOCK_P, BLOCK_C], dtype=dpred_ptr.dtype.element_ty)
        tl.store(dpred_ptrs, zeros, mask=valid)


def _loss_geometry(pred, imgs, patch_size, norm):
    """Shared launch arguments: imgs as (B, C, T, H, W), the patch grid, block sizes."""
    if imgs.dim() == 4:
        imgs, patch_size = imgs.unsqueeze(2), (1, *patch_size)
    patch_t, patch_h, patch_w = patch_size
    channels = imgs.shape[1]
    num_pix = patch_t * patch_h * patch_w
    sizes = (
        pred.shape[1], num_pix, channels, imgs.shape[3] // patch_h, imgs.shape[4] // patch_w,
        patch_t, patch_h, patch_w,
    )
    block_p, block_c = next_power_of_2(num_pix), next_power_of_2(channels)
    meta = dict(NORM=norm, BLOCK_P=block_p, BLOCK_C=block_c,
                num_warps=8 if block_p * block_c >= 4096 else 4)
    return imgs, sizes, imgs.stride(), meta


def pixel_loss_forward(pred, imgs, patch_index, row_weight, patch_size, norm, eps):
    """pred (B, R, N), imgs (B, C, [T,] H, W), patch_index (B, R) contiguous int64 or None
    (row r is patch r), row_weight (B, R) contiguous: rows with weight 0 are skipped ->
    float32 (B, R) mean squared error of each row against its patch's target (0 if skipped)."""
    batch, num_rows = pred.shape[:2]
    row_error = empty_output((batch, num_rows), dtype=torch.float32, device=pred.device)
    if row_error.numel() == 0:
        return row_error
    imgs5, sizes, img_strides, meta = _loss_geometry(pred, imgs, patch_size, norm)
    has_index = patch_index is not None
    launchable(_pixel_loss_fwd_kernel, wrap_triton)[(batch * num_rows,)](
        pred, imgs5, patch_index if has_index else row_weight, row_weight, row_error,
        *sizes, eps,
        *pred.stride(),
        *img_strides,
        HAS_INDEX=has_index,
        **meta,
    )
    return row_error


def pixel_loss_backward(grad_rows, pred, imgs, patch_index, patch_size, norm, eps):
    """grad_rows (B, R) of the row errors -> dpred (B, R, N) contiguous in pred's dtype; rows
    whose gradient is 0 get zeros without reading the image."""
    batch, num_rows = pred.shape[:2]
    dpred = empty_output(pred.shape, dtype=pred.dtype, device=pred.device)
    if dpred.numel() == 0:
        return dpred
    imgs5, sizes, img_strides, meta = _loss_geometry(pred, imgs, patch_size, norm)
    has_index = patch_index is not None
    launchable(_pixel_loss_bwd_kernel, wrap_triton)[(batch * num_rows,)](
        grad_rows, pred, imgs5, patch_index if has_index else grad_rows, dpred,
        *sizes, eps,
        grad_rows.stride(0), grad_rows.stride(1),
        *pred.stride(),
        *img_strides,
        HAS_INDEX=has_index,
        **meta,
    )
    return dpred
