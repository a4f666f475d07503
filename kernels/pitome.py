"""PiToMe energy scores in Triton (the definition: :mod:`fastvl.reference.pitome`).

One program per (block of BLOCK_M tokens, sample): the block's rows are loaded once and their
norms taken, then the tokens stream by in blocks of BLOCK_N (channels BLOCK_C at a time):
``tl.dot`` gives the dot products (float32 accumulation, IEEE precision for float32 metrics),
divided by both norms they are the cosine similarities, the margin function is applied and
summed per row in registers. The T x T similarity matrix is never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastvl._outputs import empty_output
from fastvl.kernels import cdiv, gpu_sizes, launchable, next_power_of_2
from fastvl.reference.tome import NORM_EPS


def _blocks(channels: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_C, num_warps); small blocks when interpreted."""
    block_c = min(64, max(16, next_power_of_2(channels)))
    if not gpu_sizes(device):
        return 16, 16, 16, 4
    return 64, 64, block_c, 4


@triton.jit
def _row_norms(rows_ptr, valid, channels, stride_c, BLOCK: tl.constexpr,
               BLOCK_C: tl.constexpr, eps):
    """max(|row|, eps) of BLOCK rows (float32)."""
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
def _pitome_energy_kernel(
    metric_ptr, energy_ptr,
    num_tokens, channels,
    stride_mb, stride_mn, stride_mc,
    margin, alpha, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    margin = tl.cast(margin, tl.float32)  # inductor passes Python floats as fp64
    alpha = tl.cast(alpha, tl.float32)
    eps = tl.cast(eps, tl.float32)
    sample = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < num_tokens
    base = metric_ptr + sample * stride_mb
    m_rows = base + offs_m.to(tl.int64) * stride_mn
    m_norm = _row_norms(m_rows, m_valid, channels, stride_mc, BLOCK_M, BLOCK_C, eps)
    offs_c0 = tl.arange(0, BLOCK_C)
    offs_n0 = tl.arange(0, BLOCK_N)
    total = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, num_tokens, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < num_tokens
        n_rows = base + offs_n.to(tl.int64) * stride_mn
        dots = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        n_squares = tl.zeros([BLOCK_N], tl.float32)
        for start_c in range(0, channels, BLOCK_C):
            offs_c = start_c + offs_c0
            c_valid = offs_c < channels
            a = tl.load(m_rows[:, None] + offs_c[None, :] * stride_mc,
                        mask=m_valid[:, None] & c_valid[None, :], other=0.0)
            bt = tl.load(n_rows[None, :] + offs_c[:, None] * stride_mc,
                         mask=c_valid[:, None] & n_valid[None, :], other=0.0)
            dots = tl.dot(a, bt, dots, input_precision=DOT_PRECISION)
            bt = bt.to(tl.float32)
            n_squares += tl.sum(bt * bt, 0)
        n_norm = tl.maximum(tl.sqrt_rn(n_squares), eps)
        shifted = dots / m_norm[:, None] / n_norm[None, :] - margin
        value = tl.where(shifted >= 0, shifted, alpha * (tl.exp(tl.minimum(shifted, 0.0)) - 1.0))
        total += tl.sum(tl.where(n_valid[None, :], value, 0.0), 1)
    tl.store(energy_ptr + sample * num_tokens + offs_m, total / num_tokens, mask=m_valid)


def pitome_energy(metric: torch.Tensor, margin: float, alpha: float) -> torch.Tensor:
    """metric (B, T, C) any strides -> energy (B, T) float32 contiguous."""
    batch, num_tokens, channels = metric.shape
    energy = empty_output((batch, num_tokens), dtype=torch.float32, device=metric.device)
    if energy.numel() == 0:
        return energy
    block_m, block_n, block_c, warps = _blocks(channels, metric.device)
    grid = (cdiv(num_tokens, block_m), batch)
    launchable(_pitome_energy_kernel, wrap_triton)[grid](
        metric, energy, num_tokens, channels, *metric.stride(),
        float(margin), float(alpha), NORM_EPS,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c,
        # float32 metrics must not be rounded to tf32; Triton ignores it for fp16/bf16.
        DOT_PRECISION="ieee", num_warps=warps,
    )
    return energy
