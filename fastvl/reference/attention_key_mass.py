"""Attention mass received by each key, in plain PyTorch, from explicit probabilities.

The ``torch`` backend of :func:`fastvl.ops.attention_key_mass` and the test oracle (run it
in float64). For batch b, query head h and key j::

    mass[b, h, j] = sum_{i in [query_start, query_end)}
                        w[b, h, i] exp(s[b, h, i, j] - lse[b, h, i])

(w = 1 unless ``query_weights`` are given) with the logits ``s`` of
:mod:`fastvl.reference.attention` (same scale, key bias and masks)
and ``lse`` the row log-sum-exp that :func:`fastvl.ops.attention` returned; a row whose
``lse`` is ``-inf`` (no visible key) contributes 0. The head reduction ``"mean"``, ``"sum"``
or ``"max"`` then runs over the H query heads.

The probabilities are computed a block at a time (:data:`BLOCK_BYTES` of logits: whole
(batch, kv head) slices, or row blocks of one when a slice is larger), so each block's
scale, bias, exponential and row sum run on data in cache, and the (B, H, rows, Nk) matrix
is never held whole. The H / Hkv query heads of a kv head are one matmul against its keys
(no copy of k per query head), and with the hard causal mask (no ``prefix_len``) a row block
skips the keys that all of its rows have in their future.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["attention_key_mass", "attention_graph_rank", "reduce_heads", "HEAD_REDUCTIONS"]

HEAD_REDUCTIONS = ("mean", "max", "sum", None)

# Logits per block, in bytes: about a CPU's last-level cache, and few enough blocks that their
# per-op cost (dispatch, thread start and join) stays small; 4 MiB is a little faster on an
# idle 2-core machine, 16 MiB much less sensitive to a loaded one. Tests shrink it.
BLOCK_BYTES = 16 << 20


def reduce_heads(mass: torch.Tensor, head_reduce: Optional[str]) -> torch.Tensor:
    """(B, H, Nk) -> (B, Nk) by ``head_reduce`` ("mean", "max", "sum"), or as is for None."""
    if head_reduce is None:
        return mass
    if head_reduce == "mean":
        return mass.mean(dim=1)
    if head_reduce == "max":
        return mass.amax(dim=1)
    return mass.sum(dim=1)


def _blocks(slices: int, rows: int, row_elems: int, block_elems: int) -> list:
    """(s0, s1, r0, r1) blocks of at most ``block_elems`` logits (at least one row): several
    whole slices per block, or one slice in row blocks."""
    per_slice = rows * row_elems
    if per_slice <= block_elems:
        step = max(1, block_elems // max(1, per_slice))
        return [(s0, min(slices, s0 + step), 0, rows) for s0 in range(0, slices, step)]
    step = max(1, block_elems // max(1, row_elems))
    return [
        (s0, s0 + 1, r0, min(rows, r0 + step))
        for s0 in range(slices)
        for r0 in range(0, rows, step)
    ]


def attention_key_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = False,
    key_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal_strength: Optional[float] = None,
    prefix_len: Optional[torch.Tensor] = None,
    query_start: int = 0,
    query_end: Optional[int] = None,
    head_reduce: Optional[str] = "mean",
    query_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-key attention mass of queries ``[query_start, query_end)``.

    q (B, H, Nq, D), k (B, Hkv, Nk, D), lse (B, H, Nq); query_weights None, (B, Nq) or
    (B, H, Nq): each query row's probabilities weighted before the sum. Returns (B, Nk), or
    (B, H, Nk) with ``head_reduce=None``, in float32 (float64 for float64 q). The logits are
    ``q k^T`` in q's dtype, then the scale, bias, exponentials and sums in the accumulation
    dtype, as in
    :func:`fastvl.reference.attention.attention_math`. Materialises one block of the
    selected rows' probabilities at a time (see the module docstring).
    """
    batch, heads, num_queries, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    query_end = num_queries if query_end is None else query_end
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    num_rows = query_end - query_start
    group = heads // kv_heads if kv_heads else 0
    slices = batch * kv_heads  # (sample, kv head) pairs; each holds `group` query heads
    mass = torch.zeros(slices, group, num_keys, dtype=acc_dtype, device=q.device)
    if num_rows == 0 or mass.numel() == 0:
        return reduce_heads(mass.view(batch, heads, num_keys), head_reduce)

    strength = 1.0 if causal_strength is None else float(causal_strength)
    masked = causal and strength > 0.0
    hard = strength >= 1.0
    offset = num_keys - num_queries  # bottom-right: query i sees keys j <= i + offset
    # A row without a visible key (lse = -inf) is shifted by -inf: all of its exps are 0.
    row_lse = lse[:, :, query_start:query_end].to(acc_dtype)
    neg_lse = torch.where(torch.isneginf(row_lse), -math.inf, -row_lse)
    neg_lse = neg_lse.reshape(slices, group, num_rows, 1)
    q_rows = q[:, :, query_start:query_end].reshape(slices, group, num_rows, head_dim)
    weights = None
    if query_weights is not None:  # per slice: (slices, 1 or group, rows, 1)
        weights = query_weights[..., query_start:query_end].to(acc_dtype)
        if weights.dim() == 2:
            weights = weights.view(batch, 1, 1, num_rows).expand(batch, kv_heads, 1, num_rows)
        weights = weights.reshape(slices, -1, num_rows, 1)
    keys = k.reshape(slices, num_keys, head_dim)
    bias = None
    if key_bias is not None:  # per slice: (slices, 1 or group, 1, Nk)
        bias = key_bias.to(acc_dtype)
        if bias.dim() == 2:
            bias = bias.view(batch, 1, 1, 1, num_keys).expand(batch, kv_heads, 1, 1, num_keys)
        bias = bias.reshape(slices, -1, 1, num_keys)
    prefix = None
    if masked and prefix_len is not None:  # keys j < prefix_len[b] are never in the future
        prefix = prefix_len.to(q.device).long().repeat_interleave(kv_heads).view(slices, 1, 1, 1)
    skip_future = masked and hard and prefix is None
    block_elems = max(1, BLOCK_BYTES // (torch.finfo(acc_dtype).bits // 8))
    blocks = _blocks(slices, num_rows, group * num_keys, block_elems)
    triangle = None
    if skip_future:  # triangle[r, t] = t >= r: which of a row block's diagonal keys are future
        step = max(r1 - r0 for _, _, r0, r1 in blocks)
        steps = torch.arange(step, device=q.device)
        triangle = steps.unsqueeze(0) >= steps.unsqueeze(1)

    for s0, s1, r0, r1 in blocks:
        count, rows = s1 - s0, r1 - r0
        first = query_start + r0  # the block's first query index
        cols = num_keys
        if skip_future:  # keys after the last row's visible ones get nothing from this block
            cols = max(0, min(num_keys, first + rows + offset))
            if cols == 0:
                continue
        q_block = q_rows[s0:s1, :, r0:r1].reshape(count, group * rows, head_dim)
        k_block = keys[s0:s1, :cols].transpose(1, 2)
        shift = neg_lse[s0:s1, :, r0:r1].reshape(count, group * rows, 1)
        if q.dtype == acc_dtype:  # scale * q k^T - lse in one call
            scores = torch.baddbmm(shift, q_block, k_block, alpha=scale)
        else:  # logits in q's dtype, then the accumulation dtype
            scores = torch.bmm(q_block, k_block).to(acc_dtype).mul_(scale).add_(shift)
        scores = scores.view(count, group, rows, cols)
        if bias is not None:
            scores.add_(bias[s0:s1, :, :, :cols])
        if skip_future:
            # Key j is in the future of row i iff j > i + offset: in this block only keys
            # from diagonal = first + offset + 1 on, where the triangle gives them.
            diagonal = first + offset + 1
            low = max(0, diagonal)
            if low < cols:
                scores[..., low:].masked_fill_(
                    triangle[:rows, low - diagonal:cols - diagonal], -math.inf
                )
        elif masked:
            row = torch.arange(first, first + rows, device=q.device).unsqueeze(1)
            col = torch.arange(cols, device=q.device)
            future = col > row + offset  # (rows, cols)
            if prefix is not None:
                future = future & (col >= prefix[s0:s1])  # (count, 1, rows, cols)
            if hard:
                scores.masked_fill_(future, -math.inf)
            else:
                scores.add_(future.to(acc_dtype) * math.log1p(-strength))
        scores = scores.exp_()
        if weights is not None:
            scores.mul_(weights[s0:s1, :, r0:r1])
        if rows == num_rows and cols == num_keys:  # the block's whole mass: summed in place
            torch.sum(scores, dim=2, out=mass[s0:s1])
        else:
            mass[s0:s1, :, :cols] += scores.sum(dim=2)
    return reduce_heads(mass.view(batch, heads, num_keys), head_reduce)


def attention_graph_rank(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: Optional[torch.Tensor],
    *,
    iterations: int,
    key_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Per-head power iteration ``s <- A^T s`` from ``s = 1 / N`` on the attention
    probabilities ``A = exp(scale q k^T + bias - lse)`` of self-attention (no mask).

    q (B, H, N, D), k (B, Hkv, N, D), lse (B, H, N) or None (each row's log-sum-exp then
    computed here) -> (B, H, N) float32 (float64 for float64 q). The probabilities of a
    block of (sample, kv head) slices are computed once and the
    ``iterations`` steps run on them while they are in cache (:data:`BLOCK_BYTES` per block; a
    slice larger than 4 blocks iterates :func:`attention_key_mass` with query weights
    instead, one row block at a time). Rows with ``lse = -inf`` contribute nothing.
    """
    batch, heads, num_tokens, head_dim = q.shape
    kv_heads = k.shape[1]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores = torch.full((batch, heads, num_tokens), 1.0 / max(num_tokens, 1), dtype=acc_dtype,
                        device=q.device)
    element = torch.finfo(acc_dtype).bits // 8
    group = heads // kv_heads if kv_heads else 0
    per_slice = group * num_tokens * num_tokens * element
    if scores.numel() == 0 or per_slice > 4 * BLOCK_BYTES:
        if lse is None and scores.numel():  # the row normalisation, a row block at a time
            lse = _row_lse(q, k, key_bias, scale, acc_dtype)
        for _ in range(iterations if scores.numel() else 0):
            scores = attention_key_mass(q, k, lse, key_bias=key_bias, scale=scale,
                                        head_reduce=None, query_weights=scores)
        return scores
    slices = batch * kv_heads
    q_rows = q.reshape(slices, group * num_tokens, head_dim)
    keys = k.reshape(slices, num_tokens, head_dim).transpose(1, 2)
    shift = None
    if lse is not None:
        row_lse = lse.to(acc_dtype).reshape(slices, group * num_tokens, 1)
        shift = torch.where(torch.isneginf(row_lse), -math.inf, -row_lse)
    bias = None
    if key_bias is not None:  # (slices, 1 or group, 1, N)
        bias = key_bias.to(acc_dtype)
        if bias.dim() == 2:
            bias = bias.view(batch, 1, 1, 1, num_tokens).expand(batch, kv_heads, 1, 1,
                                                                num_tokens)
        bias = bias.reshape(slices, -1, 1, num_tokens)
    out = scores.view(slices, group, 1, num_tokens)
    step = max(1, BLOCK_BYTES // max(per_slice, 1))
    for s0 in range(0, slices, step):
        s1 = min(slices, s0 + step)
        probs = torch.bmm(q_rows[s0:s1], keys[s0:s1]).to(acc_dtype).mul_(scale)
        if shift is not None:
            probs.add_(shift[s0:s1])
        probs = probs.view(s1 - s0, group, num_tokens, num_tokens)
        if bias is not None:
            probs.add_(bias[s0:s1])
        if shift is not None:
            probs.exp_()
        else:  # rows whose keys are all hidden (a -inf bias) contribute nothing
            probs = probs.softmax(dim=-1).nan_to_num_(0.0)
        block = out[s0:s1].clone()
        for _ in range(iterations):
            block = torch.matmul(block, probs)
        out[s0:s1] = block
    return scores


def _row_lse(q, k, key_bias, scale, acc_dtype):
    """(B, H, N) log-sum-exp of each row of ``scale q k^T + bias`` (one head at a time)."""
    batch, heads, num_tokens, _ = q.shape
    group = heads // k.shape[1]
    out = torch.empty(batch, heads, num_tokens, dtype=acc_dtype, device=q.device)
    for h in range(heads):
        logits = (q[:, h] @ k[:, h // group].transpose(1, 2)).to(acc_dtype) * scale
        if key_bias is not None:
            bias = key_bias if key_bias.dim() == 2 else key_bias[:, h]
            logits = logits + bias.to(acc_dtype).unsqueeze(1)
        out[:, h] = torch.logsumexp(logits, dim=-1)
    return out
