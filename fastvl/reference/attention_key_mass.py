"""Attention mass received by each key, in plain PyTorch, from explicit probabilities.

The ``torch`` backend of :func:`fastvl.ops.attention_key_mass` and the test oracle (run it
in float64). For batch b, query head h and key j::

    mass[b, h, j] = sum_{i in [query_start, query_end)} exp(s[b, h, i, j] - lse[b, h, i])

with the logits ``s`` of :mod:`fastvl.reference.attention` (same scale, key bias and masks)
and ``lse`` the row log-sum-exp that :func:`fastvl.ops.attention` returned; a row whose
``lse`` is ``-inf`` (no visible key) contributes 0. The head reduction ``"mean"``, ``"sum"``
or ``"max"`` then runs over the H query heads.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastvl.reference.attention import _expand_kv, attention_bias

HEAD_REDUCTIONS = ("mean", "max", "sum", None)


def reduce_heads(mass: torch.Tensor, head_reduce: Optional[str]) -> torch.Tensor:
    """(B, H, Nk) -> (B, Nk) by ``head_reduce`` ("mean", "max", "sum"), or as is for None."""
    if head_reduce is None:
        return mass
    if head_reduce == "mean":
        return mass.mean(dim=1)
    if head_reduce == "max":
        return mass.amax(dim=1)
    return mass.sum(dim=1)


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
) -> torch.Tensor:
    """Per-key attention mass of queries ``[query_start, query_end)``.

    q (B, H, Nq, D), k (B, Hkv, Nk, D), lse (B, H, Nq). Returns (B, Nk), or (B, H, Nk) with
    ``head_reduce=None``, in float32 (float64 for float64 q). The logits are ``q k^T`` in q's
    dtype, then the bias, exponentials and sums in the accumulation dtype, as in
    :func:`fastvl.reference.attention.attention_math`. Materialises the selected rows'
    (B, H, rows, Nk) probabilities.
    """
    num_queries = q.shape[2]
    query_end = num_queries if query_end is None else query_end
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = slice(query_start, query_end)
    keys = _expand_kv(k, q.shape[1])
    scores = (q[:, :, rows] @ keys.transpose(-1, -2)).to(acc_dtype) * scale
    # The mask depends on the query's position among all Nq queries, so it is built for
    # all of them and its selected rows are taken (a per-key bias alone has one row).
    bias = attention_bias(
        q, k, causal=causal, key_bias=key_bias, causal_strength=causal_strength,
        prefix_len=prefix_len, dtype=acc_dtype,
    )
    if bias is not None:
        scores = scores + (bias if bias.shape[2] == 1 else bias[:, :, rows])
    # A row without a visible key (lse = -inf) is shifted by +inf: all of its exps are 0.
    row_lse = lse[:, :, rows].to(acc_dtype)
    row_lse = torch.where(torch.isneginf(row_lse), math.inf, row_lse)
    mass = torch.exp(scores - row_lse.unsqueeze(-1)).sum(dim=2)
    return reduce_heads(mass, head_reduce)
