"""Scaled dot-product attention with the fastvl masks, in plain PyTorch.

The ``torch`` backend of :func:`fastvl.ops.attention` and the test oracle (run it in float64).

Logits, for batch b, query head h, query i and key j (``offset = Nk - Nq``)::

    s[b, h, i, j] = scale * <q[b, h, i], k[b, h // G, j]>      (G = H // Hkv, MQA/GQA)
                  + key_bias[b, (h,) j]                         (if given)
                  + mask(i, j)

``mask(i, j)`` is 0 unless ``causal`` and key j is *in the future* of query i, i.e.
``j > i + offset`` (bottom-right alignment, as flash-attn) and, with ``prefix_len``, also
``j >= prefix_len[b]`` (keys of the prefix are visible to every query). A future key gets
``log(1 - causal_strength)``: ``-inf`` for the hard mask (strength 1), nothing for strength 0.

``out = softmax(s) @ v`` and ``lse = logsumexp_j(s)``. A row without any visible key
(``lse = -inf``) has output 0, and its gradients are 0 rather than NaN. The hard mask sets
logits to ``-inf`` (not adds), so a NaN in k of a hidden key stays out of the row; a query
row holding a NaN or inf gives NaN (IEEE), on the SDPA route too.

:func:`varlen_attention` is the same per sequence of a packed batch (q (total_q, H, D) with
int32 ``cu_seqlens``): each sequence b is one sample with its own ``Nq_b``, ``Nk_b``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _future_mask(
    num_queries: int,
    num_keys: int,
    prefix_len: Optional[torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """Bool (B or 1, 1, Nq, Nk): True where key j is in the future of query i (masked)."""
    rows = torch.arange(num_queries, device=device).unsqueeze(1)
    cols = torch.arange(num_keys, device=device).unsqueeze(0)
    future = cols > rows + (num_keys - num_queries)  # (Nq, Nk)
    if prefix_len is not None:
        in_prefix = cols.unsqueeze(0) < prefix_len.to(device).view(-1, 1, 1)  # (B, 1, Nk)
        future = future.unsqueeze(0) & ~in_prefix  # (B, Nq, Nk)
        return future.unsqueeze(1)
    return future.view(1, 1, num_queries, num_keys)


def attention_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = False,
    key_bias: Optional[torch.Tensor] = None,
    causal_strength: Optional[float] = None,
    prefix_len: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> Optional[torch.Tensor]:
    """The additive float bias (broadcastable to (B, H, Nq, Nk)) of the call, or None.

    Carries ``key_bias`` (so autograd reaches it) and the causal / soft / prefix mask.
    """
    dtype = dtype or q.dtype
    batch, heads, num_queries = q.shape[0], q.shape[1], q.shape[2]
    num_keys = k.shape[2]
    bias = None
    if causal:
        strength = 1.0 if causal_strength is None else float(causal_strength)
        if strength > 0.0:
            future_value = -math.inf if strength >= 1.0 else math.log1p(-strength)
            future = _future_mask(num_queries, num_keys, prefix_len, q.device)
            zero = torch.zeros((), dtype=dtype, device=q.device)
            bias = torch.where(future, torch.full_like(zero, future_value), zero)
    if key_bias is not None:
        kb = key_bias.to(dtype)
        shape = (batch, 1, 1, num_keys) if kb.dim() == 2 else (batch, heads, 1, num_keys)
        kb = kb.reshape(shape)
        bias = kb if bias is None else bias + kb
    return bias


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    group = heads // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal_strength: Optional[float] = None,
    prefix_len: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit-softmax attention; returns (out, lse). Matmuls run in q's dtype.

    ``attn_mask`` (SDPA's: bool True = attend, or float added) joins the bias; ``dropout_p``
    drops probabilities (scaled by ``1 / (1 - p)``) after the lse is taken.

    The exponentials and sums run in float32 (float64 for float64 input), as a fused kernel
    would; the probabilities are cast back to q's dtype for ``p @ v``. ``lse`` is float32
    (float64 for float64 input). Differentiable in q, k, v, key_bias and lse is too.
    """
    heads = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = _expand_kv(k, heads), _expand_kv(v, heads)
    scores = (q @ k.transpose(-1, -2)).to(acc_dtype) * scale
    hard = causal and (causal_strength is None or causal_strength >= 1.0)
    bias = attention_bias(
        q, k, causal=causal and not hard, key_bias=key_bias, causal_strength=causal_strength,
        prefix_len=prefix_len, dtype=acc_dtype,
    )
    if attn_mask is not None:
        extra = mask_as_bias(attn_mask, acc_dtype)
        bias = extra if bias is None else bias + extra
    if bias is not None:
        scores = scores + bias
    if hard:  # set, not added: a NaN / inf logit of a hidden key stays out of the row
        future = _future_mask(q.shape[2], k.shape[2], prefix_len, q.device)
        scores = scores.masked_fill(future, -math.inf)
    # Row max without gradient (softmax is shift invariant); a fully masked row has max -inf,
    # shifted by 0 instead so that every exp is exp(-inf) = 0 and nothing is NaN.
    row_max = scores.detach().amax(dim=-1, keepdim=True) if scores.shape[-1] else (
        scores.new_full((*scores.shape[:-1], 1), -math.inf)
    )
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    exp_scores = torch.exp(scores - row_max)
    denom = exp_scores.sum(dim=-1, keepdim=True)
    empty = denom == 0
    safe_denom = torch.where(empty, torch.ones_like(denom), denom)
    probs = exp_scores / safe_denom
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    out = probs.to(q.dtype) @ v
    lse = torch.where(
        empty, torch.full_like(denom, -math.inf), torch.log(safe_denom) + row_max
    ).squeeze(-1)
    return out, lse


def mask_as_bias(attn_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An SDPA-style ``attn_mask`` (bool: True = attend; float: added) as a float bias."""
    if attn_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=attn_mask.device)
        return torch.where(attn_mask, zero, torch.full_like(zero, -math.inf))
    return attn_mask.to(dtype)


def sdpa_can_serve(q, k, causal, key_bias, causal_strength, prefix_len) -> bool:
    """Whether SDPA gives this call's exact semantics, decided from shapes and devices only.

    A row with no visible key must give 0 (and zero gradients). SDPA's CPU kernels do that
    (checked by the tests), so on CPU a key_bias, which may hide whole rows with -inf, goes to
    SDPA as a float mask (ToMe's proportional attention, padding); elsewhere calls that may
    empty a row take the math path.
    """
    if k.shape[2] == 0 or q.shape[2] == 0:
        return False
    if key_bias is not None and q.device.type != "cpu":
        return False
    if not causal:
        return True
    hard = causal_strength is None or causal_strength >= 1.0
    # Bottom-right causal rows all see key 0 when Nq <= Nk; a soft mask masks nothing.
    return not hard or q.shape[2] <= k.shape[2]


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal_strength: Optional[float] = None,
    prefix_len: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The call on :func:`torch.nn.functional.scaled_dot_product_attention` (callers check
    :func:`sdpa_can_serve`): ``is_causal`` for a plain square causal mask, one float mask for
    anything else, GQA by ``enable_gqa`` (no copies of k and v)."""
    if causal and q.shape[2] == 1:
        causal = False  # bottom-right: no key is in the future of a single query
    hard = causal_strength is None or causal_strength >= 1.0
    is_causal = (causal and hard and prefix_len is None and q.shape[2] == k.shape[2]
                 and key_bias is None and attn_mask is None)
    mask = None
    if not is_causal:
        mask = attention_bias(
            q, k, causal=causal, key_bias=key_bias, causal_strength=causal_strength,
            prefix_len=prefix_len,
        )
        if attn_mask is not None:
            extra = mask_as_bias(attn_mask, q.dtype)
            mask = extra if mask is None else mask + extra
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal_strength: Optional[float] = None,
    prefix_len: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
):
    """Attention in PyTorch: SDPA where it can express the call, :func:`attention_math` otherwise.

    q (B, H, Nq, D), k/v (B, Hkv, Nk, D); see the module docstring for the masks; ``attn_mask``
    (bool, True = attend, or float; broadcastable to (B, H, Nq, Nk)) and ``dropout_p`` (on the
    probabilities) as in SDPA. Returns ``out`` (B, H, Nq, D), or ``(out, lse)`` with
    ``return_lse`` (lse needs the math path; dropout does not change it).
    """
    if return_lse or not sdpa_can_serve(q, k, causal, key_bias, causal_strength, prefix_len):
        out, lse = attention_math(
            q, k, v, causal=causal, key_bias=key_bias, scale=scale,
            causal_strength=causal_strength, prefix_len=prefix_len, attn_mask=attn_mask,
            dropout_p=dropout_p,
        )
        return (out, lse) if return_lse else out
    out = sdpa_attention(
        q, k, v, causal=causal, key_bias=key_bias, scale=scale,
        causal_strength=causal_strength, prefix_len=prefix_len, attn_mask=attn_mask,
        dropout_p=dropout_p,
    )
    # SDPA's CPU kernels give 0 for a row whose logits are all NaN; IEEE (and the math path,
    # and the kernels): a query row holding a NaN or inf gives NaN. Every row here sees a key.
    return out.masked_fill(~torch.isfinite(q).all(dim=-1, keepdim=True), math.nan)


def _padded_slots(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> torch.Tensor:
    """(total,) int64: where each packed token goes in a (B * max_seqlen) padded layout.

    Sequences are right-aligned (padding first): token t of sequence b, which ends at
    ``cu_seqlens[b + 1]``, goes to ``(b + 1) * max_seqlen - (cu_seqlens[b + 1] - t)``.
    """
    ends = cu_seqlens[1:].long()
    tokens = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(ends, tokens, right=True)  # the sequence holding each token
    return (seq + 1) * max_seqlen - (ends.gather(0, seq) - tokens)


def _pad(packed: torch.Tensor, slots: torch.Tensor, batch: int, max_seqlen: int) -> torch.Tensor:
    """(total, ...) -> (B, max_seqlen, ...) with zeros in the padding (differentiable)."""
    padded = packed.new_zeros((batch * max_seqlen, *packed.shape[1:]))
    return padded.index_copy(0, slots, packed).view(batch, max_seqlen, *packed.shape[1:])


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    key_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal_strength: Optional[float] = None,
    prefix_len: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    dropout_p: float = 0.0,
):
    """Attention per sequence of a packed batch, via :func:`attention_math` on a padded copy.

    q (total_q, H, D), k/v (total_k, Hkv, D), int32 ``cu_seqlens_*`` (B + 1,), valid and
    within ``max_seqlen_*``; key_bias None, (total_k,) or (total_k, H); prefix_len None or
    (B,). Returns ``out`` (total_q, H, D), or ``(out, lse)`` with lse (total_q, H).

    Sequences are right-aligned in the padded (B, H, max_seqlen, D) tensors and padded keys
    get a ``-inf`` bias, so the dense bottom-right causal rule ``j > i + Mk - Mq`` on padded
    indices is exactly ``j > i + Nk_b - Nq_b`` on each sequence's own indices; prefix_len is
    shifted by the key padding ``Mk - Nk_b`` likewise. No host sync, no data-dependent shapes.
    """
    batch = cu_seqlens_q.shape[0] - 1
    total_q, total_k = q.shape[0], k.shape[0]
    q_slots = _padded_slots(cu_seqlens_q, total_q, max_seqlen_q)
    k_slots = _padded_slots(cu_seqlens_k, total_k, max_seqlen_k)
    q_pad = _pad(q, q_slots, batch, max_seqlen_q).transpose(1, 2)  # (B, H, Mq, D)
    k_pad, v_pad = (_pad(t, k_slots, batch, max_seqlen_k).transpose(1, 2) for t in (k, v))

    key_lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    key_padding = max_seqlen_k - key_lengths  # (B,)
    is_padding = torch.arange(max_seqlen_k, device=q.device) < key_padding.unsqueeze(1)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    bias = torch.zeros(is_padding.shape, dtype=acc_dtype, device=q.device).masked_fill(
        is_padding, -math.inf
    )  # (B, Mk)
    if key_bias is not None:
        padded_bias = _pad(key_bias.to(acc_dtype), k_slots, batch, max_seqlen_k)
        bias = padded_bias + bias if key_bias.dim() == 1 else (
            padded_bias.transpose(1, 2) + bias.unsqueeze(1)  # (B, H, Mk)
        )
    if prefix_len is not None:
        prefix_len = prefix_len.long().clamp(0) + key_padding

    out_pad, lse_pad = attention_math(
        q_pad, k_pad, v_pad, causal=causal, key_bias=bias, scale=scale,
        causal_strength=causal_strength, prefix_len=prefix_len, dropout_p=dropout_p,
    )
    flat_rows = batch * max_seqlen_q
    out = out_pad.transpose(1, 2).reshape(flat_rows, *q.shape[1:]).index_select(0, q_slots)
    if not return_lse:
        return out
    lse = lse_pad.transpose(1, 2).reshape(flat_rows, q.shape[1]).index_select(0, q_slots)
    return out, lse
