"""Token gather (B, N, C) -> (B, K, C) and its adjoint, scatter-add, as Triton kernels.

One program copies one C-block of one output row. Indices outside [0, N) are never
dereferenced: gather writes zeros for them and scatter-add skips them (the op layer
validates ranges before launching, so this only keeps the kernels memory-safe).
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastvl._outputs import empty_output
from fastvl.kernels import cdiv, launchable, next_power_of_2

_MAX_BLOCK_BYTES = 4096


def channel_block(channels: int, element_size: int) -> int:
    """Power-of-two block of channels: all of a row, capped at 4 KiB per program."""
    return min(next_power_of_2(channels), _MAX_BLOCK_BYTES // element_size)


@triton.jit
def _gather_tokens_kernel(
    x_ptr, index_ptr, out_ptr,
    num_kept, num_tokens, channels,
    stride_xb, stride_xn, stride_xc,
    stride_ib, stride_ik,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * K + k
    b = row // num_kept
    k = row % num_kept
    token = tl.load(index_ptr + b * stride_ib + k * stride_ik)
    in_range = (token >= 0) & (token < num_tokens)
    # An out-of-range row reads no columns (its mask is empty) and is stored as zeros.
    read_end = tl.where(in_range, channels, 0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    values = tl.load(
        x_ptr + b * stride_xb + token * stride_xn + cols * stride_xc,
        mask=cols < read_end,
        other=0.0,
    )
    tl.store(out_ptr + row * channels + cols, values, mask=cols < channels)


@triton.jit
def _scatter_add_tokens_kernel(
    src_ptr, index_ptr, acc_ptr,
    num_kept, num_tokens, channels,
    stride_sb, stride_sk, stride_sc,
    stride_ib, stride_ik,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // num_kept
    k = row % num_kept
    token = tl.load(index_ptr + b * stride_ib + k * stride_ik)
    in_range = (token >= 0) & (token < num_tokens)
    write_end = tl.where(in_range, channels, 0)  # out-of-range rows are skipped
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < write_end
    values = tl.load(src_ptr + b * stride_sb + k * stride_sk + cols * stride_sc, mask=col_mask)
    acc_ptrs = acc_ptr + (b * num_tokens + token) * channels + cols
    tl.atomic_add(acc_ptrs, values.to(acc_ptr.dtype.element_ty), mask=col_mask)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, N, C) any strides, index: (B, K) int64 -> contiguous (B, K, C)."""
    batch, num_tokens, channels = x.shape
    num_kept = index.shape[1]
    out = empty_output((batch, num_kept, channels), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_c = channel_block(channels, x.element_size())
    grid = (batch * num_kept, cdiv(channels, block_c))
    launchable(_gather_tokens_kernel, wrap_triton)[grid](
        x, index, out, num_kept, num_tokens, channels, *x.stride(), *index.stride(),
        BLOCK_C=block_c,
    )
    return out


def scatter_add_tokens(src: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """src: (B, K, C), index: (B, K) -> (B, num_tokens, C) of src's dtype.

    Accumulates in float32 (float64 for float64 input) with atomics, so duplicate indices
    sum correctly; the order of those additions is not fixed (unique indices are exact).
    """
    batch, num_kept, channels = src.shape
    acc_dtype = torch.float64 if src.dtype == torch.float64 else torch.float32
    acc = torch.zeros((batch, num_tokens, channels), dtype=acc_dtype, device=src.device)
    if src.numel() > 0:
        block_c = channel_block(channels, 4)
        grid = (batch * num_kept, cdiv(channels, block_c))
        launchable(_scatter_add_tokens_kernel, wrap_triton)[grid](
            src, index, acc, num_kept, num_tokens, channels, *src.stride(), *index.stride(),
            BLOCK_C=block_c,
        )
    return acc.to(src.dtype)
