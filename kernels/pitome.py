"""PiToMe energy scores in Triton (the definition: :mod:`fastvl.reference.pitome`).

One program per (block of BLOCK_M tokens, sample): the block's norms are taken, then the
tokens stream by in blocks of BLOCK_N (channels BLOCK_C at a time, the tile loop of ToMe's
best-partner kernel): ``tl.dot`` gives the dot products (float32 accumulation, IEEE precision for float32 metrics),
divided by both norms they are the cosine similarities, the margin function is applied and
summed per row in registers. The T x T similarity matrix is never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastvl._outputs import empty_output
from fastvl.kernels import cdiv, launchable
from fastvl.kernels.tome import _match_blocks, _row_norms, _tile_dots
from fastvl.reference.tome import NORM_EPS


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
    offs_n0 = tl.arange(0, BLOCK_N)
    total = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, num_tokens, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < num_tokens
        n_rows = base + offs_n.to(tl.int64) * stride_mn
        dots, n_squares = _tile_dots(m_rows, m_valid, n_rows, n_valid, channels, stride_mc,
                                     BLOCK_M, BLOCK_N, BLOCK_C, DOT_PRECISION)
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
    block_m, block_n, block_c, warps = _match_blocks(channels, metric.device)  # ToMe's tiles
    grid = (cdiv(num_tokens, block_m), batch)
    launchable(_pitome_energy_kernel, wrap_triton)[grid](
        metric, energy, num_tokens, channels, *metric.stride(),
        float(margin), float(alpha), NORM_EPS,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c,
        # float32 metrics must not be rounded to tf32; Triton ignores it for fp16/bf16.
        DOT_PRECISION="ieee", num_warps=warps,
    )
    return energy
