"""``attention``: scaled dot-product attention with GQA, key bias, soft-causal and prefix-LM masks.

Backends: ``torch`` (:func:`fastvl.reference.attention`: SDPA where it can express the call,
an explicit-softmax math path otherwise; float64 capable) and ``triton``
(``fastvl::attention_fwd_triton`` / ``fastvl::attention_bwd_triton``, FlashAttention-2 style
``torch.library.triton_op``\\ s with explicit fake impls; the forward op carries the gradient
through :func:`torch.library.register_autograd`, the backward op has none, so double backward
is not supported on that backend).

The exact definition of the logits and masks is in :mod:`fastvl.reference.attention`; in short,
with ``offset = Nk - Nq``, key j is in the *future* of query i when ``j > i + offset`` and
``j >= prefix_len[b]``; ``causal`` gives future keys ``log(1 - causal_strength)`` (``-inf`` by
default). A query row that sees no key gets output 0 and lse ``-inf``, and zero gradients.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from fastvl.ops.registry import TRITON_IMPORT_ERROR, register_op
from fastvl.reference.attention import attention as _reference_attention

__all__ = ["attention", "ATTENTION", "MAX_TRITON_HEAD_DIM"]

ATTENTION = register_op("attention")
MAX_TRITON_HEAD_DIM = 256
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NUMBER = (int, float, torch.SymInt, torch.SymFloat)


# ---- implementations ---------------------------------------------------------------------
# Every implementation is called as
#   fn(q, k, v, key_bias, prefix_len, scale, causal, causal_strength, return_lse)
# with validated, normalized arguments: scale a number, causal_strength a number in [0, 1]
# (1.0 = hard mask), prefix_len None or an integer (B,) tensor on q's device.


def _torch_impl(q, k, v, key_bias, prefix_len, scale, causal, causal_strength, return_lse):
    return _reference_attention(
        q, k, v, causal=causal, key_bias=key_bias, scale=scale,
        causal_strength=causal_strength, prefix_len=prefix_len, return_lse=return_lse,
    )


def _triton_call_reasons(q, k, v, key_bias, prefix_len, scale, causal, causal_strength,
                         return_lse) -> list[str]:
    reasons = []
    if q.dtype not in TRITON_DTYPES:
        reasons.append(
            f"q, k, v have dtype {q.dtype}; the triton kernels support float16, bfloat16 and "
            "float32 (use backend='torch' for float64)"
        )
    if q.shape[-1] > MAX_TRITON_HEAD_DIM:
        reasons.append(
            f"head dim {q.shape[-1]} is larger than the triton kernels' maximum "
            f"{MAX_TRITON_HEAD_DIM}"
        )
    return reasons


ATTENTION.implement("torch", _torch_impl)


def _attention_fwd_fake(q, k, v, key_bias, prefix_len, scale, causal, causal_strength):
    batch, heads, num_queries, head_dim = q.shape
    out = q.new_empty(batch, heads, num_queries, head_dim)
    lse = q.new_empty(batch, heads, num_queries, dtype=torch.float32)
    return out, lse


def _attention_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, key_bias, prefix_len, scale,
                        causal, causal_strength, compute_dbias):
    dbias = (
        key_bias.new_empty(key_bias.shape) if compute_dbias and key_bias is not None
        else q.new_empty(0)
    )
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


if TRITON_IMPORT_ERROR is None:
    from fastvl.kernels import attention as _triton_attention

    @torch.library.triton_op("fastvl::attention_fwd_triton", mutates_args=())
    def attention_fwd_triton(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_bias: Optional[torch.Tensor],
        prefix_len: Optional[torch.Tensor],
        scale: float,
        causal: bool,
        causal_strength: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (out (B, H, Nq, D) contiguous, lse (B, H, Nq) float32)."""
        return _triton_attention.attention_forward(
            q, k, v, key_bias, prefix_len, scale, causal, causal_strength
        )

    @torch.library.triton_op("fastvl::attention_bwd_triton", mutates_args=())
    def attention_bwd_triton(
        grad_out: torch.Tensor,
        grad_lse: Optional[torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        key_bias: Optional[torch.Tensor],
        prefix_len: Optional[torch.Tensor],
        scale: float,
        causal: bool,
        causal_strength: float,
        compute_dbias: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (dq, dk, dv, dkey_bias); dkey_bias has key_bias's shape and dtype, or is empty
        (shape (0,)) unless ``compute_dbias``."""
        compute_dbias = compute_dbias and key_bias is not None
        dq, dk, dv, dbias = _triton_attention.attention_backward(
            grad_out, grad_lse, q, k, v, out, lse, key_bias, prefix_len,
            scale, causal, causal_strength, compute_dbias,
        )
        if dbias is None:
            return dq, dk, dv, q.new_empty(0)
        if key_bias.dim() == 2:  # one bias shared by the heads: its gradient sums over them
            dbias = dbias.sum(dim=1)
        return dq, dk, dv, dbias.to(key_bias.dtype)

    def _fwd_setup_context(ctx, inputs, output):
        q, k, v, key_bias, prefix_len, scale, causal, causal_strength = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, key_bias, prefix_len)
        ctx.scale, ctx.causal, ctx.causal_strength = scale, causal, causal_strength

    def _fwd_backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, key_bias, prefix_len = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        compute_dbias = key_bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = torch.ops.fastvl.attention_bwd_triton(
            grad_out, grad_lse, q, k, v, out, lse, key_bias, prefix_len,
            ctx.scale, ctx.causal, ctx.causal_strength, compute_dbias,
        )
        return dq, dk, dv, (dbias if compute_dbias else None), None, None, None, None

    torch.library.register_fake(attention_fwd_triton, _attention_fwd_fake)
    torch.library.register_fake(attention_bwd_triton, _attention_bwd_fake)
    torch.library.register_autograd(
        attention_fwd_triton, _fwd_backward, setup_context=_fwd_setup_context
    )

    def _triton_impl(q, k, v, key_bias, prefix_len, scale, causal, causal_strength, return_lse):
        out, lse = torch.ops.fastvl.attention_fwd_triton(
            q, k, v, key_bias, prefix_len, scale, causal, causal_strength
        )
        return (out, lse) if return_lse else out

    ATTENTION.implement("triton", _triton_impl, _triton_call_reasons)


# ---- validation --------------------------------------------------------------------------


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")


def _validate(q, k, v, causal, key_bias, scale, causal_strength, prefix_len, return_lse):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    if q.dim() != 4:
        raise ValueError(f"attention: q must be (B, H, Nq, D), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"attention: {name} must be (B, Hkv, Nk, D), got shape {tuple(t.shape)}"
            )
    if not q.is_floating_point():
        raise TypeError(f"attention: q must be a floating-point tensor, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(
                f"attention: q, k and v must share one dtype, got q {q.dtype} and {name} {t.dtype}"
            )
        if t.device != q.device:
            raise ValueError(
                f"attention: q is on {q.device} but {name} is on {t.device}; "
                "put q, k and v on the same device"
            )
    batch, heads, _, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != batch:
            raise ValueError(
                f"attention: {name} batch size {t.shape[0]} does not match q's {batch}"
            )
        if t.shape[3] != head_dim:
            raise ValueError(
                f"attention: {name} head dim {t.shape[3]} does not match q's {head_dim}"
            )
    if k.shape[1] != v.shape[1]:
        raise ValueError(
            f"attention: k has {k.shape[1]} heads but v has {v.shape[1]}; they must match"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            f"attention: k has {k.shape[2]} keys (Nk) but v has {v.shape[2]}; they must match"
        )
    kv_heads, num_keys = k.shape[1], k.shape[2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"attention: the number of query heads ({heads}) must be a multiple of the number "
            f"of key/value heads ({kv_heads}) (MQA/GQA: query head h uses kv head h // (H // Hkv))"
        )
    if head_dim == 0:
        raise ValueError("attention: head dim D must be at least 1")

    if key_bias is not None:
        _check_tensor("key_bias", key_bias)
        if not key_bias.is_floating_point():
            raise TypeError(
                f"attention: key_bias must be a floating-point tensor, got {key_bias.dtype}"
            )
        if tuple(key_bias.shape) not in ((batch, num_keys), (batch, heads, num_keys)):
            raise ValueError(
                f"attention: key_bias must be (B, Nk) = ({batch}, {num_keys}) or (B, H, Nk) = "
                f"({batch}, {heads}, {num_keys}), got shape {tuple(key_bias.shape)}"
            )
        if key_bias.device != q.device:
            raise ValueError(f"attention: q is on {q.device} but key_bias is on {key_bias.device}")

    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, _NUMBER)):
        raise TypeError(
            f"attention: scale must be a Python number or None, got {type(scale).__name__}"
        )

    if causal_strength is not None:
        if isinstance(causal_strength, bool) or not isinstance(causal_strength, _NUMBER):
            raise TypeError(
                "attention: causal_strength must be a Python float in [0, 1] or None, got "
                f"{type(causal_strength).__name__}"
            )
        if not 0.0 <= causal_strength <= 1.0:
            raise ValueError(
                f"attention: causal_strength must lie in [0, 1] (1 = hard causal mask, 0 = no "
                f"mask), got {causal_strength}"
            )
        if not causal:
            raise ValueError(
                "attention: causal_strength softens the causal mask; pass causal=True with it"
            )

    if prefix_len is not None:
        if not causal:
            raise ValueError(
                "attention: prefix_len makes the first keys visible through the causal mask; "
                "pass causal=True with it"
            )
        if isinstance(prefix_len, torch.Tensor):
            if prefix_len.dtype.is_floating_point or prefix_len.dtype.is_complex or (
                prefix_len.dtype == torch.bool
            ):
                raise TypeError(
                    "attention: prefix_len must be an integer tensor or int, got "
                    f"{prefix_len.dtype}"
                )
            if tuple(prefix_len.shape) != (batch,):
                raise ValueError(
                    f"attention: prefix_len must have shape (B,) = ({batch},), "
                    f"got {tuple(prefix_len.shape)}"
                )
            if prefix_len.device != q.device:
                raise ValueError(
                    f"attention: q is on {q.device} but prefix_len is on {prefix_len.device}"
                )
        elif isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, torch.SymInt)):
            raise TypeError(
                f"attention: prefix_len must be an int or a (B,) integer tensor, got "
                f"{type(prefix_len).__name__}"
            )
    if not isinstance(return_lse, bool):
        raise TypeError(f"attention: return_lse must be a bool, got {type(return_lse).__name__}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal_strength: Optional[float] = None,
    prefix_len: Union[torch.Tensor, int, None] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Scaled dot-product attention: softmax(scale * q k^T + bias + mask) v.

    Args:
        q: (B, H, Nq, D). k, v: (B, Hkv, Nk, D), ``H % Hkv == 0`` (MQA/GQA: query head h
            reads kv head ``h // (H // Hkv)``). One float dtype for all three. Any strides;
            the triton kernels copy an input whose last dim is not contiguous.
        causal: mask keys in the future of each query: key j is hidden from query i when
            ``j > i + Nk - Nq`` (aligned bottom-right when Nq != Nk, as flash-attn).
        key_bias: additive per-key logit bias, (B, Nk) or (B, H, Nk), float (ToMe proportional
            attention: ``log(size)``; ``-inf`` hides a key). Differentiable: its gradient is
            ``sum_i dS[i, j]`` (summed over heads for a (B, Nk) bias).
        scale: logit scale, default ``1 / sqrt(D)``.
        causal_strength: with ``causal=True``, soften the mask (iLLaMA): future keys get
            ``log(1 - causal_strength)`` added, so 1.0 (the default) is the hard mask and 0.0
            no mask. A Python float in [0, 1].
        prefix_len: with ``causal=True``, prefix-LM masking: an int or an integer (B,) tensor;
            keys ``j < prefix_len[b]`` are visible to every query of sample b (e.g. image
            tokens attend bidirectionally), the rest follow the causal rule above. Values are
            clamped to [0, Nk]. With a soft mask the prefix keys are exempt from the softening.
        return_lse: also return ``lse`` (B, H, Nq), the natural-log softmax denominator
            ``logsumexp_j`` of the scaled, biased, masked logits; float32 (float64 for
            float64 inputs). Differentiable.
        backend: "auto", "triton" or "torch" (see ``python -m fastvl info``).

    Returns:
        ``out`` (B, H, Nq, D) in q's dtype (contiguous on the triton backend), or
        ``(out, lse)``. A query row with no visible key (all keys masked or biased to
        ``-inf``, or a causal row before the first key when Nq > Nk) gets output 0, lse
        ``-inf`` and zero gradients, never NaN.
    """
    _validate(q, k, v, causal, key_bias, scale, causal_strength, prefix_len, return_lse)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if causal_strength is None:
        causal_strength = 1.0
    if prefix_len is not None and not isinstance(prefix_len, torch.Tensor):
        prefix_len = torch.full((q.shape[0],), prefix_len, dtype=torch.int64, device=q.device)
    args = (q, k, v, key_bias, prefix_len, scale, bool(causal), causal_strength, return_lse)
    return ATTENTION.select(backend, q.device, *args)(*args)
