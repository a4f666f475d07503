"""flash-attn and xformers as registered implementations of ``attention`` / ``varlen_attention``.

Registered whether or not the libraries are installed, so ``python -m fastvl info`` lists them
with the reason when they cannot run; the registry only calls them with the features their
``Supports`` declare (GQA, causal aligned bottom-right, dropout; no bias, no lse). Both take
(B, N, H, D) tensors: fastvl's (B, H, N, D) inputs are passed as transposed views (the head
dim stays contiguous, no copy) and the output is transposed back.
"""

from __future__ import annotations

import importlib

import torch

_MODULES: dict = {}


def _module(name: str):
    if name not in _MODULES:
        _MODULES[name] = importlib.import_module(name)
    return _MODULES[name]


def _flash_attn_impl(q, k, v, key_bias, prefix_len, scale, causal, causal_strength, return_lse,
                     attn_mask, dropout_p):
    """flash_attn.flash_attn_func: GQA and bottom-right causal are native."""
    out = _module("flash_attn").flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
        softmax_scale=scale, causal=causal,
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )
    return out.transpose(1, 2)


def _flash_attn_varlen_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            key_bias, prefix_len, scale, causal, causal_strength, return_lse,
                            dropout_p):
    """flash_attn.flash_attn_varlen_func: the same packed layout and cu_seqlens as fastvl."""
    return _module("flash_attn").flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p,
        softmax_scale=scale, causal=causal,
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )


def _xformers_impl(q, k, v, key_bias, prefix_len, scale, causal, causal_strength, return_lse,
                   attn_mask, dropout_p):
    """xformers.ops.memory_efficient_attention; GQA through its 5-D (B, N, Hkv, G, D) form
    with k / v broadcast over the group (a stride-0 view, no copy)."""
    xops = _module("xformers.ops")
    batch, heads, num_queries, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    bias = xops.fmha.attn_bias.LowerTriangularFromBottomRightMask() if causal else None
    query, key, value = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kv_heads != heads:
        group = heads // kv_heads
        query = query.reshape(batch, num_queries, kv_heads, group, head_dim)
        key, value = (
            t.unsqueeze(3).expand(batch, num_keys, kv_heads, group, head_dim) for t in (key, value)
        )
    out = xops.memory_efficient_attention(query, key, value, attn_bias=bias, p=dropout_p,
                                          scale=scale)
    return out.reshape(batch, num_queries, heads, head_dim).transpose(1, 2)


def register_library_attention(attention_op, varlen_op, flash_attn_supports, xformers_supports):
    """Register the adapters above on the two attention ops."""
    attention_op.implement("flash_attn", _flash_attn_impl, flash_attn_supports)
    attention_op.implement("xformers", _xformers_impl, xformers_supports)
    varlen_op.implement("flash_attn", _flash_attn_varlen_impl, flash_attn_supports)
