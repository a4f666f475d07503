"""Shared attention test inputs and an independent reference, for every attention test.

:func:`reference_attention` is written out here, not taken from :mod:`fastvl.reference`
(the torch backend, itself under test): logits ``s = scale * q k^T`` (kv heads repeated for
GQA) ``+ key_bias``; with ``causal``, key j is in the future of query i when
``j > i + Nk - Nq`` and ``j >= prefix_len[b]``: the hard mask sets those logits to ``-inf``,
a soft one adds ``log(1 - causal_strength)``; then ``softmax(s) @ v`` and
``lse = logsumexp(s)``. A row with no visible key gives out 0 and lse ``-inf`` (zero
gradients); a row holding a NaN gives NaN (IEEE).

The oracle is its float64 run; ``low=True`` is the "same math in the kernel's precision" of
the error rule (matmuls and ``p @ v`` in the inputs' dtype, softmax in float32).
"""

from __future__ import annotations

import contextlib
import math

import torch

from fastvl.testing import random_tensor
from tests.conftest import DEVICE


def attention_inputs(batch, heads, kv_heads, nq, nk, head_dim, dtype, seed, bias=None,
                bias_dtype=None, device=DEVICE):
    """q (B, H, Nq, D), k, v (B, Hkv, Nk, D) and key_bias: None, "b" (B, Nk) or "bh"
    (B, H, Nk); random, seeded."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = random_tensor(batch, heads, nq, head_dim, dtype=dtype, device=device, generator=g)
    k = random_tensor(batch, kv_heads, nk, head_dim, dtype=dtype, device=device, generator=g)
    v = random_tensor(batch, kv_heads, nk, head_dim, dtype=dtype, device=device, generator=g)
    key_bias = None
    if bias is not None:
        shape = (batch, nk) if bias == "b" else (batch, heads, nk)
        key_bias = random_tensor(*shape, dtype=bias_dtype or dtype, device=device, generator=g)
    return q, k, v, key_bias


def future_mask(batch, nq, nk, prefix_len=None, device=DEVICE):
    """Bool (B, 1, Nq, Nk): True where key j is in the future of query i (bottom-right)."""
    i = torch.arange(nq, device=device).view(nq, 1)
    j = torch.arange(nk, device=device).view(1, nk)
    future = (j > i + nk - nq).expand(batch, nq, nk)
    if prefix_len is not None:
        future = future & (j >= prefix_len.to(device).long().view(-1, 1, 1))
    return future.unsqueeze(1)


def reference_attention(q, k, v, *, key_bias=None, scale=None, causal=False,
                        causal_strength=None, prefix_len=None, low=False):
    """(out (B, H, Nq, D), lse (B, H, Nq)): float64, or with ``low`` in the inputs' dtype
    (lse float32). ``prefix_len``: None or a (B,) tensor. Differentiable."""
    if not low:
        q, k, v = q.double(), k.double(), v.double()
        key_bias = None if key_bias is None else key_bias.double()
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, nq, head_dim = q.shape
    nk = k.shape[2]
    if nk == 0:
        return q.new_zeros(q.shape), q.new_full(q.shape[:3], -math.inf, dtype=acc)
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    logits = (q @ k.transpose(-1, -2)).to(acc) * scale
    if key_bias is not None:
        kb = key_bias.to(acc)
        logits = logits + (kb[:, None, None, :] if kb.dim() == 2 else kb[:, :, None, :])
    if causal:
        future = future_mask(batch, nq, nk, prefix_len, q.device)
        strength = 1.0 if causal_strength is None else causal_strength
        if strength >= 1.0:
            logits = logits.masked_fill(future, -math.inf)
        elif strength > 0.0:
            logits = logits + future.to(acc) * math.log1p(-strength)
    row_max = logits.detach().amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isneginf(row_max), 0.0, row_max)  # empty rows: exp(-inf) = 0
    weights = torch.exp(logits - shift)
    total = weights.sum(dim=-1, keepdim=True)
    empty = total == 0
    total = torch.where(empty, 1.0, total)
    out = (weights / total).to(q.dtype) @ v
    lse = torch.where(empty, -math.inf, total.log() + shift).squeeze(-1)
    return out, lse


def reference_grads(grad_out, grad_lse, inputs, low=False, **masks):
    """(dq, dk, dv, dkey_bias or None) of :func:`reference_attention` through (out, lse);
    ``inputs``: [q, k, v] or [q, k, v, key_bias]."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    if not low:
        leaves = [t.double() for t in leaves]
        grad_out, grad_lse = grad_out.double(), grad_lse.double()
    out, lse = reference_attention(*leaves[:3], key_bias=leaves[3] if len(leaves) > 3 else None,
                                   low=low, **masks)
    grads = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse))
    return (*grads[:3], grads[3] if len(grads) > 3 else None)


def noncontiguous_prefix_lens(device=DEVICE) -> tuple:
    """Two (3,) prefix_len tensors that are not contiguous: a strided one whose memory holds
    99s between its values (4, 0, 7) and an expanded 5."""
    strided = torch.tensor([4, 99, 0, 99, 7, 99], device=device)[::2]
    return strided, torch.tensor(5, device=device).expand(3)


def forward_tile_configs(head_dim, dtype):
    """One configuration per distinct (BLOCK_M, BLOCK_N) of the Triton forward's GPU lists (any
    architecture; warps and stages do not change what the interpreter computes); [] without
    triton."""
    try:
        from fastvl.kernels.attention import forward_configs
    except ImportError:
        return []
    return list({c[:2]: c for c in forward_configs(head_dim, dtype)}.values())


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """``torch.use_deterministic_algorithms(enabled)`` inside the block, restored after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
