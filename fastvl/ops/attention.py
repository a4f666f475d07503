"""``attention`` and ``varlen_attention``: scaled dot-product attention with GQA, key bias,
soft-causal and prefix-LM masks, on (B, H, N, D) batches or packed variable-length ones.

Backends: ``torch`` (:func:`fastvl.reference.attention`: SDPA where it can express the call,
an explicit-softmax math path otherwise; :func:`fastvl.reference.varlen_attention`, the math
path on a padded copy; float64 capable) and ``triton`` (``fastvl::attention_fwd_triton`` /
``fastvl::attention_bwd_triton`` and their ``varlen_`` twins, FlashAttention-2 style
``torch.library.triton_op``\\ s with explicit fake impls; each forward op carries the gradient
through :func:`torch.library.register_autograd`, the backward ops have none, so double
backward is not supported on that backend).

The exact definition of the logits and masks is in :mod:`fastvl.reference.attention`; in short,
with ``offset = Nk - Nq``, key j is in the *future* of query i when ``j > i + offset`` and
``j >= prefix_len[b]``; ``causal`` gives future keys ``log(1 - causal_strength)`` (``-inf`` by
default). A query row that sees no key gets output 0 and lse ``-inf``, and zero gradients.
``varlen_attention`` applies exactly this to each packed sequence, with its own Nq and Nk.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastvl.ops._checks import check_tensor, host_readable, is_int
from fastvl.ops._eager import can_launch_directly
from fastvl.ops.library_attention import register_library_attention
from fastvl.ops.registry import (
    ALL, KERNEL_DTYPES, TRITON_IMPORT_ERROR, Call, Supports, register_op,
)
from fastvl.reference.attention import attention as _reference_attention
from fastvl.reference.attention import sdpa_attention
from fastvl.reference.attention import varlen_attention as _reference_varlen_attention

__all__ = [
    "attention", "varlen_attention", "ATTENTION", "VARLEN_ATTENTION", "MAX_TRITON_HEAD_DIM",
]

MAX_TRITON_HEAD_DIM = 256
_NUMBER = (int, float, torch.SymInt, torch.SymFloat)

# The optional features an attention call may use, as the registry names them in reasons.
ATTENTION_FEATURES = {
    "gqa": "grouped-query attention (fewer k/v heads than q heads)",
    "causal": "a causal mask",
    "causal_bottom_right": "a causal mask with fewer queries than keys (aligned bottom-right)",
    "causal_empty_rows": "a hard causal mask with more queries than keys (rows that see no key)",
    "soft_causal": "a soft causal mask (causal_strength < 1)",
    "prefix_len": "prefix-LM masking (prefix_len)",
    "key_bias": "a per-key bias (key_bias; -inf may hide whole rows)",
    "lse": "the log-sum-exp output (return_lse=True)",
    "attn_mask": "a dense attn_mask that differs between queries",
    "dropout": "attention dropout (dropout_p > 0)",
    "empty": "no queries or no keys",
}
HEAD_DIM = {"head_dim": "head dim"}


def _features(q, k, key_bias, prefix_len, causal, causal_strength, return_lse, attn_mask,
              dropout_p, packed: bool) -> tuple:
    """The optional features of an attention call (shapes and flags only)."""
    features = []
    if q.shape[1] != k.shape[1]:
        features.append("gqa")
    if causal:
        if causal_strength < 1.0:
            features.append("soft_causal")
        elif packed:
            features.append("causal_bottom_right")  # per sequence: Nq_b and Nk_b may differ
        else:
            num_queries, num_keys = q.shape[2], k.shape[2]
            features.append("causal" if num_queries == num_keys else (
                "causal_bottom_right" if num_queries < num_keys else "causal_empty_rows"
            ))
    if prefix_len is not None:
        features.append("prefix_len")
    if key_bias is not None:
        features.append("key_bias")
    if return_lse:
        features.append("lse")
    if attn_mask is not None:
        features.append("attn_mask")
    if dropout_p > 0.0:
        features.append("dropout")
    if q.numel() == 0 or k.numel() == 0:
        features.append("empty")
    return tuple(features)


def _describe(q, k, v, key_bias, prefix_len, scale, causal, causal_strength, return_lse,
              attn_mask, dropout_p) -> Call:
    features = _features(q, k, key_bias, prefix_len, causal, causal_strength, return_lse,
                         attn_mask, dropout_p, packed=False)
    return Call(q.device, q.dtype, features, (("head_dim", int(q.shape[-1])),))


def _describe_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias,
                     prefix_len, scale, causal, causal_strength, return_lse, dropout_p) -> Call:
    features = _features(q, k, key_bias, prefix_len, causal, causal_strength, return_lse,
                         None, dropout_p, packed=True)
    return Call(q.device, q.dtype, features, (("head_dim", int(q.shape[-1])),))


ATTENTION = register_op(
    "attention", features=ATTENTION_FEATURES, sizes=HEAD_DIM, describe=_describe
)
VARLEN_ATTENTION = register_op(
    "varlen_attention", features=ATTENTION_FEATURES, sizes=HEAD_DIM, describe=_describe_varlen
)

# What each implementation serves; the registry turns everything else into reasons.
TORCH_SUPPORTS = Supports(features=ALL, dtype_of="q")
TRITON_SUPPORTS = Supports(
    dtypes=KERNEL_DTYPES, dtype_of="q", max_sizes={"head_dim": MAX_TRITON_HEAD_DIM},
    features=frozenset(ATTENTION_FEATURES) - {"attn_mask", "dropout"},
)
SDPA_SUPPORTS = Supports(
    dtype_of="q",
    features=frozenset({"gqa", "causal", "causal_bottom_right", "attn_mask", "dropout"}),
    # SDPA's CPU kernels give 0 for a row a -inf bias empties; its CUDA kernels give NaN.
    features_on={"cpu": frozenset({"key_bias"})},
)
FLASH_ATTN_SUPPORTS = Supports(
    devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), dtype_of="q",
    max_sizes={"head_dim": 256},
    features=frozenset({"gqa", "causal", "causal_bottom_right", "dropout"}),
)
XFORMERS_SUPPORTS = Supports(
    devices=("cuda",), dtypes=KERNEL_DTYPES, dtype_of="q",
    features=frozenset({"gqa", "causal", "causal_bottom_right", "dropout"}),
)


# ---- implementations ---------------------------------------------------------------------
# Every attention implementation is called as
#   fn(q, k, v, key_bias, prefix_len, scale, causal, causal_strength, return_lse, attn_mask,
#      dropout_p)
# and every varlen_attention implementation as
#   fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
#      key_bias, prefix_len, scale, causal, causal_strength, return_lse, dropout_p)
# with validated, normalized arguments: scale a number, causal_strength a number in [0, 1]
# (1.0 = hard mask), prefix_len None or an integer (B,) tensor on q's device, dropout_p a
# float; each implementation is only called with the features its Supports declares.


def _torch_impl(q, k, v, key_bias, prefix_len, scale, causal, causal_strength, return_lse,
                attn_mask, dropout_p):
    return _reference_attention(
        q, k, v, causal=causal, key_bias=key_bias, scale=scale,
        causal_strength=causal_strength, prefix_len=prefix_len, return_lse=return_lse,
        attn_mask=attn_mask, dropout_p=dropout_p,
    )


def _sdpa_impl(q, k, v, key_bias, prefix_len, scale, causal, causal_strength, return_lse,
               attn_mask, dropout_p):
    return sdpa_attention(
        q, k, v, causal=causal, key_bias=key_bias, scale=scale, attn_mask=attn_mask,
        dropout_p=dropout_p,
    )


def _varlen_torch_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       key_bias, prefix_len, scale, causal, causal_strength, return_lse,
                       dropout_p):
    return _reference_varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
        key_bias=key_bias, scale=scale, causal_strength=causal_strength,
        prefix_len=prefix_len, return_lse=return_lse, dropout_p=dropout_p,
    )


ATTENTION.implement("torch", _torch_impl, TORCH_SUPPORTS)
ATTENTION.implement("sdpa", _sdpa_impl, SDPA_SUPPORTS)
VARLEN_ATTENTION.implement("torch", _varlen_torch_impl, TORCH_SUPPORTS)
register_library_attention(ATTENTION, VARLEN_ATTENTION, FLASH_ATTN_SUPPORTS, XFORMERS_SUPPORTS)


# The triton ops take the dense arguments, then for the varlen ops the packed layout:
# cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k. Shapes follow q in both layouts:
# out like q, lse q.shape[:-1] ((B, H, Nq) or (total_q, H)).


def _attention_fwd_fake(q, k, v, key_bias, prefix_len, scale, causal, causal_strength,
                        *packed_layout):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _attention_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, key_bias, prefix_len, scale,
                        causal, causal_strength, compute_dbias, *packed_layout):
    dbias = (
        key_bias.new_empty(key_bias.shape) if compute_dbias and key_bias is not None
        else q.new_empty(0)
    )
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


if TRITON_IMPORT_ERROR is None:
    from fastvl.kernels import attention as _triton_attention
    from fastvl.kernels.attention_backward import attention_backward as _triton_backward_kernels

    def _triton_backward(grad_out, grad_lse, q, k, v, out, lse, key_bias, prefix_len, scale,
                         causal, causal_strength, compute_dbias, *packed_layout, eager=False):
        """-> (dq, dk, dv, dkey_bias in key_bias's shape and dtype, or None)."""
        compute_dbias = compute_dbias and key_bias is not None
        dq, dk, dv, dbias = _triton_backward_kernels(
            grad_out, grad_lse, q, k, v, out, lse, key_bias, prefix_len,
            scale, causal, causal_strength, compute_dbias, *packed_layout, eager=eager,
        )
        if dbias is None:
            return dq, dk, dv, None
        if key_bias.dim() < dbias.dim():  # one bias shared by the heads (dim 1): sum them
            dbias = dbias.sum(dim=1)
        return dq, dk, dv, dbias.to(key_bias.dtype)

    def _schema_grads(q, grads):
        """The backward ops return a tensor for every gradient: an empty one for no dbias."""
        dq, dk, dv, dbias = grads
        return dq, dk, dv, q.new_empty(0) if dbias is None else dbias

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
        return _schema_grads(q, _triton_backward(
            grad_out, grad_lse, q, k, v, out, lse, key_bias, prefix_len, scale, causal,
            causal_strength, compute_dbias,
        ))

    @torch.library.triton_op("fastvl::varlen_attention_fwd_triton", mutates_args=())
    def varlen_attention_fwd_triton(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_bias: Optional[torch.Tensor],
        prefix_len: Optional[torch.Tensor],
        scale: float,
        causal: bool,
        causal_strength: float,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (out (total_q, H, D) contiguous, lse (total_q, H) float32)."""
        return _triton_attention.attention_forward(
            q, k, v, key_bias, prefix_len, scale, causal, causal_strength,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        )

    @torch.library.triton_op("fastvl::varlen_attention_bwd_triton", mutates_args=())
    def varlen_attention_bwd_triton(
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
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (dq, dk, dv, dkey_bias) of the packed layout, as ``attention_bwd_triton``."""
        return _schema_grads(q, _triton_backward(
            grad_out, grad_lse, q, k, v, out, lse, key_bias, prefix_len, scale, causal,
            causal_strength, compute_dbias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k,
        ))

    def _fwd_setup_context(ctx, inputs, output):
        q, k, v, key_bias, prefix_len, scale, causal, causal_strength, *packed_layout = inputs
        out, lse = output
        # packed_layout: () or (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k).
        ctx.save_for_backward(q, k, v, out, lse, key_bias, prefix_len, *packed_layout[:2])
        ctx.options = (scale, causal, causal_strength, *packed_layout[2:])

    def _fwd_backward_through(bwd):
        """The autograd formula of a forward whose backward is ``bwd`` (the backward op, or
        :func:`_eager_backward`); a missing grad_lse stays None."""

        def backward(ctx, grad_out, grad_lse):
            q, k, v, out, lse, key_bias, prefix_len, *cu_seqlens = ctx.saved_tensors
            if grad_out is None:
                grad_out = torch.zeros_like(out)
            compute_dbias = key_bias is not None and ctx.needs_input_grad[3]
            scale, causal, causal_strength, *max_seqlens = ctx.options
            dq, dk, dv, dbias = bwd(
                grad_out, grad_lse, q, k, v, out, lse, key_bias, prefix_len,
                scale, causal, causal_strength, compute_dbias, *cu_seqlens, *max_seqlens,
            )
            grads = (dq, dk, dv, dbias if compute_dbias else None)
            return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))

        return backward

    for _fwd, _bwd in (
        (attention_fwd_triton, attention_bwd_triton),
        (varlen_attention_fwd_triton, varlen_attention_bwd_triton),
    ):
        torch.library.register_fake(_fwd, _attention_fwd_fake)
        torch.library.register_fake(_bwd, _attention_bwd_fake)
        torch.library.register_autograd(
            _fwd, _fwd_backward_through(_bwd), setup_context=_fwd_setup_context
        )

    # Eager mode: the launchers straight from Python, through one autograd.Function (custom-op
    # dispatch and triton_op's eager wrapper cost more host time than the launch itself);
    # under torch.compile the registered ops above.

    def _eager_backward(*args):
        return _triton_backward(*args, eager=True)

    class _TritonAttention(torch.autograd.Function):
        """(q, k, v, key_bias, prefix_len, scale, causal, causal_strength[, cu_seqlens_q,
        cu_seqlens_k, max_seqlen_q, max_seqlen_k]) -> (out, lse), as the forward ops."""

        @staticmethod
        def forward(ctx, *args):  # (a separate setup_context costs an inspect.signature)
            output = _triton_attention.attention_forward(*args, eager=True)
            ctx.set_materialize_grads(False)  # no zero-filled gradient for an unused lse
            _fwd_setup_context(ctx, args, output)
            return output

        backward = staticmethod(once_differentiable(_fwd_backward_through(_eager_backward)))

    def _triton_forward(op, args):
        """``op(*args)`` under torch.compile and tracing modes; eager: the launcher, through autograd only where
        a gradient is needed (args: q, k, v, key_bias, ...)."""
        if not can_launch_directly():
            return op(*args)
        q, k, v, key_bias = args[:4]
        if torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad
            or (key_bias is not None and key_bias.requires_grad)
        ):
            return _TritonAttention.apply(*args)
        return _triton_attention.attention_forward(*args, eager=True)

    def _triton_impl(q, k, v, key_bias, prefix_len, scale, causal, causal_strength, return_lse,
                     attn_mask, dropout_p):
        out, lse = _triton_forward(
            torch.ops.fastvl.attention_fwd_triton,
            (q, k, v, key_bias, prefix_len, scale, causal, causal_strength),
        )
        return (out, lse) if return_lse else out

    def _varlen_triton_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            key_bias, prefix_len, scale, causal, causal_strength, return_lse,
                            dropout_p):
        out, lse = _triton_forward(
            torch.ops.fastvl.varlen_attention_fwd_triton,
            (q, k, v, key_bias, prefix_len, scale, causal, causal_strength,
             cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
        )
        return (out, lse) if return_lse else out

    ATTENTION.implement("triton", _triton_impl, TRITON_SUPPORTS)
    VARLEN_ATTENTION.implement("triton", _varlen_triton_impl, TRITON_SUPPORTS)


# ---- validation --------------------------------------------------------------------------
# Shared by attention and varlen_attention (and attention_key_mass through _validate); every
# message starts with the op's name.


def _validate_qkv(op: str, q, k, v, packed: bool) -> None:
    """q, k, v: (B, H, Nq, D) / (B, Hkv, Nk, D), or packed (total_q, H, D) / (total_k, Hkv, D);
    one float dtype and device, H a multiple of Hkv, D >= 1."""
    if packed:
        ndim, token_dim, keys_name = 3, 0, "total_k"
        q_layout, kv_layout = "(total_q, H, D)", "(total_k, Hkv, D)"
    else:
        ndim, token_dim, keys_name = 4, 2, "Nk"
        q_layout, kv_layout = "(B, H, Nq, D)", "(B, Hkv, Nk, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t)
    if q.dim() != ndim:
        raise ValueError(f"{op}: q must be {q_layout}, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != ndim:
            raise ValueError(f"{op}: {name} must be {kv_layout}, got shape {tuple(t.shape)}")
    if not q.is_floating_point():
        raise TypeError(f"{op}: q must be a floating-point tensor, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(
                f"{op}: q, k and v must share one dtype, got q {q.dtype} and {name} {t.dtype}"
            )
        if t.device != q.device:
            raise ValueError(
                f"{op}: q is on {q.device} but {name} is on {t.device}; "
                "put q, k and v on the same device"
            )
    heads, head_dim = q.shape[1], q.shape[-1]
    for name, t in (("k", k), ("v", v)):
        if not packed and t.shape[0] != q.shape[0]:
            raise ValueError(
                f"{op}: {name} batch size {t.shape[0]} does not match q's {q.shape[0]}"
            )
        if t.shape[-1] != head_dim:
            raise ValueError(
                f"{op}: {name} head dim {t.shape[-1]} does not match q's {head_dim}"
            )
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{op}: k has {k.shape[1]} heads but v has {v.shape[1]}; they must match")
    if k.shape[token_dim] != v.shape[token_dim]:
        raise ValueError(
            f"{op}: k has {k.shape[token_dim]} keys ({keys_name}) but v has "
            f"{v.shape[token_dim]}; they must match"
        )
    kv_heads = k.shape[1]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"{op}: the number of query heads ({heads}) must be a multiple of the number "
            f"of key/value heads ({kv_heads}) (MQA/GQA: query head h uses kv head h // (H // Hkv))"
        )
    if head_dim == 0:
        raise ValueError(f"{op}: head dim D must be at least 1")


def _validate_key_bias(op: str, key_bias, q, shapes: dict) -> None:
    """key_bias: None or a float tensor on q's device with one of ``shapes`` {name: shape}."""
    if key_bias is None:
        return
    check_tensor(op, "key_bias", key_bias)
    if not key_bias.is_floating_point():
        raise TypeError(f"{op}: key_bias must be a floating-point tensor, got {key_bias.dtype}")
    if tuple(key_bias.shape) not in shapes.values():
        expected = " or ".join(f"{name} = {shape}" for name, shape in shapes.items())
        raise ValueError(
            f"{op}: key_bias must be {expected}, got shape {tuple(key_bias.shape)}"
        )
    if key_bias.device != q.device:
        raise ValueError(f"{op}: q is on {q.device} but key_bias is on {key_bias.device}")


def _scale_ok(scale) -> bool:
    """A finite scale > 0 (NaN fails both comparisons); symbolic values pass."""
    return not isinstance(scale, (int, float)) or 0.0 < scale < math.inf


def _validate_options(op: str, q, batch: int, causal, scale, causal_strength, prefix_len,
                      return_lse) -> None:
    """causal, scale, causal_strength, prefix_len ((B,) or int) and return_lse."""
    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {type(flag).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, _NUMBER)):
        raise TypeError(f"{op}: scale must be a Python number or None, got {type(scale).__name__}")
    if scale is not None and not _scale_ok(scale):
        raise ValueError(f"{op}: scale must be a finite number > 0 or None, got {scale}")

    if causal_strength is not None:
        if isinstance(causal_strength, bool) or not isinstance(causal_strength, _NUMBER):
            raise TypeError(
                f"{op}: causal_strength must be a Python float in [0, 1] or None, got "
                f"{type(causal_strength).__name__}"
            )
        if not 0.0 <= causal_strength <= 1.0:
            raise ValueError(
                f"{op}: causal_strength must lie in [0, 1] (1 = hard causal mask, 0 = no "
                f"mask), got {causal_strength}"
            )
        if not causal:
            raise ValueError(
                f"{op}: causal_strength softens the causal mask; pass causal=True with it"
            )

    if prefix_len is not None:
        if not causal:
            raise ValueError(
                f"{op}: prefix_len makes the first keys visible through the causal mask; "
                "pass causal=True with it"
            )
        if isinstance(prefix_len, torch.Tensor):
            if prefix_len.dtype.is_floating_point or prefix_len.dtype.is_complex or (
                prefix_len.dtype == torch.bool
            ):
                raise TypeError(
                    f"{op}: prefix_len must be an integer tensor or int, got {prefix_len.dtype}"
                )
            if tuple(prefix_len.shape) != (batch,):
                raise ValueError(
                    f"{op}: prefix_len must have shape (B,) = ({batch},), "
                    f"got {tuple(prefix_len.shape)}"
                )
            if prefix_len.device != q.device:
                raise ValueError(
                    f"{op}: q is on {q.device} but prefix_len is on {prefix_len.device}"
                )
        elif not is_int(prefix_len):
            raise TypeError(
                f"{op}: prefix_len must be an int or a (B,) integer tensor, got "
                f"{type(prefix_len).__name__}"
            )


def _validate(q, k, v, causal, key_bias, scale, causal_strength, prefix_len, return_lse):
    """All of attention's checks."""
    _validate_qkv("attention", q, k, v, packed=False)
    batch, heads, num_keys = q.shape[0], q.shape[1], k.shape[2]
    _validate_key_bias(
        "attention", key_bias, q,
        {"(B, Nk)": (batch, num_keys), "(B, H, Nk)": (batch, heads, num_keys)},
    )
    _validate_options("attention", q, batch, causal, scale, causal_strength, prefix_len,
                      return_lse)


def _validate_cu_seqlens(op: str, name: str, cu_seqlens, max_name: str, max_seqlen,
                         total: int, tokens_name: str, device: torch.device) -> None:
    """One cu_seqlens / max_seqlen pair; the values only where :func:`host_readable`."""
    check_tensor(op, name, cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(
            f"{op}: {name} must be an int32 tensor of cumulative sequence lengths, "
            f"got {cu_seqlens.dtype}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] == 0:
        raise ValueError(f"{op}: {name} must have shape (B + 1,), got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{op}: q is on {device} but {name} is on {cu_seqlens.device}")
    if not is_int(max_seqlen):
        raise TypeError(f"{op}: {max_name} must be a Python int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"{op}: {max_name} must be >= 0, got {max_seqlen}")
    if total > 0 and (cu_seqlens.shape[0] == 1 or max_seqlen == 0):
        raise ValueError(
            f"{op}: {tokens_name} has {total} tokens but {name} has {cu_seqlens.shape[0] - 1} "
            f"sequences and {max_name} = {max_seqlen}"
        )
    _check_cu_seqlens_values(op, name, cu_seqlens, max_name, max_seqlen, total, tokens_name)


def _check_cu_seqlens_values(op: str, name: str, cu_seqlens, max_name: str, max_seqlen,
                             total: int, tokens_name: str) -> None:
    """The values of a checked cu_seqlens, where :func:`host_readable` (no device sync)."""
    if not host_readable(cu_seqlens):
        return
    offsets = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(offsets, offsets[1:])]
    if offsets[0] != 0:
        raise ValueError(f"{op}: {name} must start at 0, got {name}[0] = {offsets[0]}")
    if lengths and min(lengths) < 0:
        b = next(i for i, n in enumerate(lengths) if n < 0)
        raise ValueError(
            f"{op}: {name} must be non-decreasing, got {name}[{b}] = {offsets[b]} > "
            f"{name}[{b + 1}] = {offsets[b + 1]}"
        )
    if offsets[-1] != total:
        raise ValueError(
            f"{op}: {name}[-1] = {offsets[-1]} must equal the number of tokens in "
            f"{tokens_name} ({total})"
        )
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(
            f"{op}: {max_name} = {max_seqlen} is less than the longest sequence ({max(lengths)})"
        )


def _validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                     key_bias, scale, causal_strength, prefix_len, return_lse):
    """All of varlen_attention's checks."""
    op = "varlen_attention"
    _validate_qkv(op, q, k, v, packed=True)
    _validate_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, "max_seqlen_q", max_seqlen_q,
                         q.shape[0], "q", q.device)
    _validate_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, "max_seqlen_k", max_seqlen_k,
                         k.shape[0], "k", q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"{op}: cu_seqlens_q has shape {tuple(cu_seqlens_q.shape)} but cu_seqlens_k has "
            f"{tuple(cu_seqlens_k.shape)}; both must be (B + 1,)"
        )
    total_k, heads = k.shape[0], q.shape[1]
    _validate_key_bias(
        op, key_bias, q, {"(total_k,)": (total_k,), "(total_k, H)": (total_k, heads)}
    )
    _validate_options(op, q, cu_seqlens_q.shape[0] - 1, causal, scale, causal_strength,
                      prefix_len, return_lse)


def _check_dropout(op: str, dropout_p) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, _NUMBER):
        raise TypeError(f"{op}: dropout_p must be a Python float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must lie in [0, 1), got {dropout_p}")


def _validate_dense_extras(q, k, attn_mask, dropout_p) -> None:
    """attention's attn_mask (bool or float, broadcastable to (B, H, Nq, Nk)) and dropout_p."""
    op = "attention"
    _check_dropout(op, dropout_p)
    if attn_mask is None:
        return
    check_tensor(op, "attn_mask", attn_mask)
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(
            f"{op}: attn_mask must be bool (True = attend) or floating point (added to the "
            f"logits), got {attn_mask.dtype}"
        )
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        broadcast = torch.broadcast_shapes(attn_mask.shape, full)
    except RuntimeError:
        broadcast = None
    if broadcast != full:
        raise ValueError(
            f"{op}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
            f"(B, H, Nq, Nk) = {full}"
        )
    if attn_mask.device != q.device:
        raise ValueError(f"{op}: q is on {q.device} but attn_mask is on {attn_mask.device}")


def _default_scale(q) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


def _normalize(q, batch: int, scale, causal_strength, prefix_len):
    """(scale, causal_strength, prefix_len) with the defaults filled in, prefix_len a
    contiguous tensor (the kernels read it as one)."""
    if scale is None:
        scale = _default_scale(q)
    if causal_strength is None:
        causal_strength = 1.0
    if prefix_len is not None:
        if isinstance(prefix_len, torch.Tensor):
            prefix_len = prefix_len.contiguous()
        else:
            prefix_len = torch.full((batch,), prefix_len, dtype=torch.int64, device=q.device)
    return scale, causal_strength, prefix_len


# ---- the memo fast path -------------------------------------------------------------------
# A call with plain arguments (tensors of type torch.Tensor, Python bool / float flags, no
# prefix_len, causal_strength or attn_mask) is keyed by everything its checks and dispatch
# read: shapes, dtypes, devices and flags. The first call with a key runs every check and
# the registry's selection and stores in the op's memo (:meth:`fastvl.ops.registry.Op.memo`)
# a callable ``run(q, k, v, key_bias, scale)`` that makes the chosen implementation's call;
# later calls with that key skip both. Not under torch.compile, where the checks cost nothing
# at run time.

_TENSOR = torch.Tensor


def _memo_key(q, k, v, key_bias, causal, scale, causal_strength, prefix_len, return_lse,
              dropout_p, backend, *extra):
    """The memo key of a call with plain arguments (see above; ``extra``: more of what the
    call's checks read), or None for a call that takes the full path (also one whose scale
    value fails its check, which the key does not hold)."""
    if not (
        type(q) is _TENSOR and type(k) is _TENSOR and type(v) is _TENSOR
        and (key_bias is None or type(key_bias) is _TENSOR)
        and prefix_len is None and causal_strength is None
        and type(causal) is bool and type(return_lse) is bool and type(dropout_p) is float
        and (scale is None or (type(scale) is float and 0.0 < scale < math.inf))
        and type(backend) is str
        and not torch.compiler.is_compiling()
    ):
        return None
    bias = None if key_bias is None else (key_bias.shape, key_bias.dtype, key_bias.device)
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device,
            v.device, bias, causal, return_lse, dropout_p, backend, *extra)


def _memo_run(fn, q, k, key_bias, causal: bool, return_lse: bool, dropout_p: float):
    """``run(q, k, v, key_bias, scale)`` for calls like this one: ``fn``'s call, or where SDPA
    serves a call without masks (none, or the square causal one), SDPA's own call with only
    its non-default options (each keyword argument costs SDPA's parser time), as
    :func:`fastvl.reference.attention.sdpa_attention` would make it."""
    default_scale = _default_scale(q)
    if fn is _sdpa_impl and key_bias is None and (not causal or q.shape[2] == k.shape[2]):
        options = {"is_causal": True} if causal else {}
        if q.shape[1] != k.shape[1]:
            options["enable_gqa"] = True
        if dropout_p:
            options["dropout_p"] = dropout_p

        def run(q, k, v, key_bias, scale):
            if scale is None:  # SDPA's default is ours
                return F.scaled_dot_product_attention(q, k, v, **options)
            return F.scaled_dot_product_attention(q, k, v, scale=scale, **options)

        return run

    def run(q, k, v, key_bias, scale):
        return fn(q, k, v, key_bias, None, default_scale if scale is None else scale, causal,
                  1.0, return_lse, None, dropout_p)

    return run


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
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
):
    """Scaled dot-product attention: softmax(scale * q k^T + bias + mask) v.

    Args:
        q: (B, H, Nq, D). k, v: (B, Hkv, Nk, D), ``H % Hkv == 0`` (MQA/GQA: query head h
            reads kv head ``h // (H // Hkv)``). One float dtype for all three. Any strides;
            the triton kernels copy an input whose last dim is not contiguous.
        causal: a bool; mask keys in the future of each query: key j is hidden from query i
            when ``j > i + Nk - Nq`` (aligned bottom-right when Nq != Nk, as flash-attn).
        key_bias: additive per-key logit bias, (B, Nk) or (B, H, Nk), float (ToMe proportional
            attention: ``log(size)``; ``-inf`` hides a key). Differentiable: its gradient is
            ``sum_i dS[i, j]`` (summed over heads for a (B, Nk) bias).
        scale: logit scale, a finite number > 0; default ``1 / sqrt(D)``.
        causal_strength: with ``causal=True``, soften the mask (iLLaMA): future keys get
            ``log(1 - causal_strength)`` added, so 1.0 (the default) is the hard mask and 0.0
            no mask. A Python float in [0, 1].
        prefix_len: with ``causal=True``, prefix-LM masking: an int or an integer (B,) tensor;
            keys ``j < prefix_len[b]`` are visible to every query of sample b (e.g. image
            tokens attend bidirectionally), the rest follow the causal rule above. Values are
            clamped to [0, Nk]. With a soft mask the prefix keys are exempt from the softening.
        return_lse: a bool; also return ``lse`` (B, H, Nq), the natural-log softmax denominator
            ``logsumexp_j`` of the scaled, biased, masked logits; float32 (float64 for
            float64 inputs). Differentiable.
        attn_mask: a dense mask as SDPA takes it, broadcastable to (B, H, Nq, Nk): bool
            (True = attend) or float (added to the logits), combined with the masks above.
            Served by ``sdpa`` and ``torch`` only; prefer ``key_bias`` for a per-key mask. A
            row it hides entirely gives 0 on CPU; on CUDA, as SDPA there, it may give NaN.
        dropout_p: attention dropout on the probabilities (training), as SDPA's; served by
            ``sdpa``, ``flash_attn``, ``xformers`` and ``torch``. Does not change ``lse``.
        backend: "auto" or one implementation: "triton", "torch", "sdpa", "flash_attn",
            "xformers", "cuda" (``python -m fastvl info`` lists what serves what here).

    Returns:
        ``out`` (B, H, Nq, D) in q's dtype (contiguous on the triton backend), or
        ``(out, lse)``. A query row with no visible key (all keys masked or biased to
        ``-inf``, or a causal row before the first key when Nq > Nk) gets output 0, lse
        ``-inf`` and zero gradients, never NaN.

    Non-finite inputs (IEEE): a query row holding a NaN or inf gets NaN out and lse on the
    ``torch`` and ``triton`` backends, other rows unchanged (unless the hard causal mask
    hides every key from it: then 0). A NaN or inf in k of a key the hard causal mask hides
    from a row does not reach that row; one in v may (``0 * nan`` in ``p @ v``). The ``sdpa``
    backend is SDPA's own behaviour: on CPU a NaN query row gives 0 instead of NaN.
    """
    key = None if attn_mask is not None else _memo_key(
        q, k, v, key_bias, causal, scale, causal_strength, prefix_len, return_lse, dropout_p,
        backend,
    )
    if key is not None:
        run = ATTENTION.memo().get(key)
        if run is not None:
            return run(q, k, v, key_bias, scale)
    _validate(q, k, v, causal, key_bias, scale, causal_strength, prefix_len, return_lse)
    _validate_dense_extras(q, k, attn_mask, dropout_p)
    scale_value, causal_strength, prefix_len = _normalize(
        q, q.shape[0], scale, causal_strength, prefix_len
    )
    args = (q, k, v, key_bias, prefix_len, scale_value, bool(causal), causal_strength,
            return_lse, attn_mask, float(dropout_p))
    fn = ATTENTION.select(backend, q.device, *args)
    if key is not None:
        ATTENTION.remember(key, _memo_run(fn, q, k, key_bias, causal, return_lse, dropout_p))
    return fn(*args)


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
    prefix_len: Union[torch.Tensor, int, None] = None,
    return_lse: bool = False,
    dropout_p: float = 0.0,
    backend: str = "auto",
):
    """:func:`attention` on each sequence of a packed variable-length batch.

    Sequence b is made of the queries ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]`` and the keys
    and values ``k, v[cu_seqlens_k[b]:cu_seqlens_k[b + 1]]``; its output is exactly
    ``attention`` on that sample alone (Nq_b and Nk_b its own lengths, which may be 0).

    Args:
        q: (total_q, H, D). k, v: (total_k, Hkv, D), GQA as in :func:`attention`. One float
            dtype. Any strides; the triton kernels copy an input whose last dim is not
            contiguous.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative lengths on q's device: start at
            0, non-decreasing, last = total_q / total_k.
        max_seqlen_q, max_seqlen_k: Python ints >= the longest query / key sequence (they size
            the kernel grid).
        causal: per sequence, key j is hidden from query i when ``j > i + Nk_b - Nq_b``
            (aligned bottom-right per sequence).
        key_bias: (total_k,) or (total_k, H) float, token-major like k; differentiable.
        scale, causal_strength: as :func:`attention`.
        prefix_len: with ``causal=True``, an int or an integer (B,) tensor: keys
            ``j < prefix_len[b]`` of sequence b are visible to all its queries (clamped to
            [0, Nk_b]).
        return_lse: a bool; also return ``lse`` of shape (total_q, H), token-major (lse[t, h] is the
            row of query token t, head h); float32 (float64 for float64 inputs).
            Differentiable.
        dropout_p: attention dropout, as :func:`attention`'s.
        backend: "auto" or one implementation ("triton", "torch", "flash_attn", ...).

    Returns:
        ``out`` (total_q, H, D) in q's dtype, or ``(out, lse)``. A query row with no visible
        key (Nk_b = 0, all keys biased to ``-inf``, or a causal row before the first key)
        gets output 0, lse ``-inf`` and zero gradients.

    Checked without reading tensor values: types, dtypes, shapes, devices, ``B`` equal for
    both cu_seqlens, ``max_seqlen_* >= 0``, and nonzero ``B`` and ``max_seqlen`` when there
    are tokens. The values of cu_seqlens (start 0, non-decreasing, last = total, lengths
    <= max_seqlen) are checked only where reading them costs no device sync: CPU tensors
    outside torch.compile. On a GPU, invalid cu_seqlens or a too small max_seqlen leave
    outputs unwritten (triton) or fail in an indexing op (torch).
    """
    key = None
    if (type(cu_seqlens_q) is _TENSOR and type(cu_seqlens_k) is _TENSOR
            and type(max_seqlen_q) is int and type(max_seqlen_k) is int):
        key = _memo_key(
            q, k, v, key_bias, causal, scale, causal_strength, prefix_len, return_lse,
            dropout_p, backend, cu_seqlens_q.shape, cu_seqlens_k.shape, cu_seqlens_q.dtype,
            cu_seqlens_k.dtype, cu_seqlens_q.device, cu_seqlens_k.device, max_seqlen_q,
            max_seqlen_k,
        )
    if key is not None:
        hit = VARLEN_ATTENTION.memo().get(key)
        if hit is not None:
            fn, default_scale = hit
            op = "varlen_attention"
            cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
            _check_cu_seqlens_values(op, "cu_seqlens_q", cu_seqlens_q, "max_seqlen_q",
                                     max_seqlen_q, q.shape[0], "q")
            _check_cu_seqlens_values(op, "cu_seqlens_k", cu_seqlens_k, "max_seqlen_k",
                                     max_seqlen_k, k.shape[0], "k")
            return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias,
                      None, default_scale if scale is None else scale, causal, 1.0, return_lse,
                      dropout_p)
    _validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                     key_bias, scale, causal_strength, prefix_len, return_lse)
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    scale_value, causal_strength, prefix_len = _normalize(
        q, cu_seqlens_q.shape[0] - 1, scale, causal_strength, prefix_len
    )
    _check_dropout("varlen_attention", dropout_p)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias,
            prefix_len, scale_value, bool(causal), causal_strength, return_lse,
            float(dropout_p))
    fn = VARLEN_ATTENTION.select(backend, q.device, *args)
    if key is not None:
        VARLEN_ATTENTION.remember(key, (fn, _default_scale(q)))
    return fn(*args)
