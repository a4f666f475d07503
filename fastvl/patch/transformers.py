"""``attn_implementation="fastvl"`` for Hugging Face transformers models.

``register(backend="auto")`` adds ``"fastvl"`` to transformers' two registries: an attention
function (:class:`transformers.AttentionInterface`) and a mask function
(:class:`transformers.masking_utils.AttentionMaskInterface`). Every model whose attention
layers call ``ALL_ATTENTION_FUNCTIONS.get_interface(...)`` (LLaMA, Mistral, Qwen2, BERT, CLIP,
ViT, ...) then accepts ``attn_implementation="fastvl"`` (``from_pretrained``, ``from_config`` or
``model.set_attn_implementation``). ``unregister()`` removes both entries; models set to
``"fastvl"`` then fail at their next forward, as with any unknown implementation.

How masks travel. The model builds its mask once per forward through
:mod:`transformers.masking_utils`, which hands our mask function the pattern (``mask_function``),
the 2D padding mask, the query/key lengths and offsets. Where the pattern is *causal (aligned
bottom-right) or bidirectional, plus a per-key visibility*, the mask function returns a
:class:`KeyBiasMask` (``causal`` flag and a ``(B, Nk)`` ``key_bias`` with ``-inf`` on hidden keys)
and the attention function passes them to :func:`fastvl.ops.attention`, with GQA natively (no
``repeat_kv``). Otherwise it returns the dense boolean ``(B, 1, Nq, Nk)`` mask transformers'
``"sdpa"`` would get, and the op gets it as ``attn_mask``. Either way one op call, on the
registered backend; with ``"auto"`` the op registry picks what serves it (a dense mask, dropout
and ``position_bias`` are served by SDPA or the torch backend, not by the kernels). Which mask, by
case:

=====================================================  =====================================
case                                                   mask
=====================================================  =====================================
no mask, padding (left or right), causal or            causal + key_bias
bidirectional, cross-attention, KV-cache decoding
and cache continuation (``Nq <= Nk``, dynamic cache:
the queries are the last ``Nq`` positions, which is
our bottom-right ``causal``)
any pattern with one query (``Nq == 1``: sliding       its mask row as key_bias
window / chunked decoding)
sliding window or chunked with ``Nq > 1``, packed      dense ``attn_mask``
sequences (``position_ids`` resets), ``or``/``and``
mask overlays (image tokens), static caches (keys
not aligned bottom-right, or masks materialized for
compiled decoding), custom 4D masks given by the user
attention dropout > 0 (training), ``position_bias``    as above, plus ``dropout_p`` / the
(T5-style logit bias)                                  bias added to a dense ``attn_mask``
``softcap``, attention sinks (``s_aux`` / ``sinks``)   ValueError (use ``"eager"``)
=====================================================  =====================================

The structured mask is only returned where transformers allows a mask function not to
materialize the mask (``allow_is_causal_skip`` / ``allow_is_bidirectional_skip``); where a model
needs a real tensor (e.g. ``generate`` with a static cache precomputes masks and calls
``.contiguous()`` on them) it gets the dense one.

Differences from ``"eager"``: a query that sees no key at all (a left-padding position under a
causal mask) gets output 0, as with ``"sdpa"``, where eager averages every value; only padded
positions are affected. Attention weights are never materialized: the function returns
``None`` for them, like ``"sdpa"`` (with ``output_attentions=True`` it warns, and the model's
``attentions`` come back empty). With no
mask at all, ``is_causal`` (keyword, else ``module.is_causal``, default True) decides
causality, aligned bottom-right.

Attention probe (for token pruners, e.g. :mod:`fastvl.patch.fastv`): a call that gets the
keyword argument ``fastvl_attention_probe=probe`` (:data:`ATTENTION_PROBE_KWARG`; a decoder
layer forwards its keyword arguments to its attention) runs the op with ``return_lse=True``
and then calls ``probe(query=..., key=..., lse=..., mask=..., scale=..., backend=...)`` with
the post-RoPE query (B, H, Nq, D), the key (B, Hkv, Nk, D) including cached keys, the lse
(B, H, Nq), the :class:`KeyBiasMask` and scale of the call, and the op backend, so the probe
can compute e.g. :func:`fastvl.ops.attention_key_mass` without a second attention pass. Only
calls with a :class:`KeyBiasMask` can serve a probe; others raise ``ValueError``.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from fastvl.nn.attention import check_backend
from fastvl.ops.attention import attention
from fastvl.reference.attention import mask_as_bias

__all__ = [
    "ATTN_IMPLEMENTATION",
    "ATTENTION_PROBE_KWARG",
    "KeyBiasMask",
    "fastvl_attention_forward",
    "fastvl_attention_mask",
    "register",
    "unregister",
    "is_registered",
    "apply_fastv",
    "apply_mm_lora",
    "apply_pitome",
]

ATTN_IMPLEMENTATION = "fastvl"
ATTENTION_PROBE_KWARG = "fastvl_attention_probe"
# Keyword arguments some models pass that change the attention math and that we cannot serve.
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
}


@dataclass(frozen=True, eq=False)
class KeyBiasMask:
    """A mask that :func:`fastvl.ops.attention` takes as is: ``causal`` (aligned bottom-right)
    and ``key_bias`` (B, Nk) float32, 0 on visible keys and ``-inf`` on hidden ones, or None."""

    causal: bool
    key_bias: Optional[torch.Tensor] = None


def _visibility_to_key_bias(visible: torch.Tensor) -> torch.Tensor:
    """(B, Nk) bool, True = visible -> (B, Nk) float32 additive bias (0 / -inf)."""
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
    return bias.masked_fill_(~visible, -math.inf)


def fastvl_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: Optional[torch.Tensor] = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    device="cpu",
    **kwargs,
):
    """The mask function registered for ``"fastvl"`` (AttentionMaskInterface signature).

    ``attention_mask``: the 2D (B, tokens so far) bool padding mask (True = token) or None. Returns
    a :class:`KeyBiasMask`, or the dense bool (B, 1, q_length, kv_length) mask (True = attend)
    that ``"sdpa"`` would get; see the module docstring for which.
    """
    dense_kwargs = dict(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
        allow_is_causal_skip=False, allow_is_bidirectional_skip=False, use_vmap=use_vmap,
        device=device,
    )
    if not (allow_is_causal_skip or allow_is_bidirectional_skip):
        return sdpa_mask(**dense_kwargs)
    # Static caches give a tensor q_offset; reading it would sync and break compiled graphs.
    aligned = (
        isinstance(q_offset, (int, torch.SymInt))
        and q_offset + q_length == kv_offset + kv_length
    )
    causal = mask_function is causal_mask_function
    if (causal and aligned) or mask_function is bidirectional_mask_function:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        key_bias = None
        if padding is not None:
            key_bias = _visibility_to_key_bias(padding[:, kv_offset : kv_offset + kv_length])
        return KeyBiasMask(causal=causal, key_bias=key_bias)
    if q_length == 1:
        row = sdpa_mask(**dense_kwargs)[:, 0, 0, :]
        return KeyBiasMask(causal=False, key_bias=_visibility_to_key_bias(row))
    return sdpa_mask(**dense_kwargs)


def _check_supported(kwargs: dict) -> None:
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f'attn_implementation="fastvl" does not support {what} ({name}={kwargs[name]!r}); '
                'use attn_implementation="eager" for this model'
            )
    if kwargs.get("output_attentions"):
        warnings.warn(
            'attn_implementation="fastvl" does not compute attention weights; they are returned '
            'as None (use attn_implementation="eager" to get them)',
            stacklevel=3,
        )


def fastvl_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    *,
    backend: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function registered for ``"fastvl"`` (AttentionInterface signature).

    query: (B, H, Nq, D); key, value: (B, Hkv, Nk, D), ``H % Hkv == 0``. ``attention_mask``: a
    :class:`KeyBiasMask`, a dense 4D mask (bool, True = attend, or additive float) or None.
    Returns ``(out (B, Nq, H, D), None)``. ``fastvl_attention_probe``: see the module docstring.
    """
    probe = kwargs.pop(ATTENTION_PROBE_KWARG, None)
    _check_supported(kwargs)
    if attention_mask is None:
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        attention_mask = KeyBiasMask(causal=bool(is_causal))
    if not isinstance(attention_mask, KeyBiasMask) and probe is not None:
        raise ValueError(
            "fastvl_attention_forward: an attention probe needs a causal or bidirectional + "
            f"padding mask, this call has a dense {type(attention_mask).__name__} mask"
        )
    causal, key_bias, dense = False, None, None
    if isinstance(attention_mask, KeyBiasMask):
        causal, key_bias = attention_mask.causal, attention_mask.key_bias
    else:  # a dense 4D mask, possibly longer than the keys (transformers slices it too)
        dense = attention_mask[:, :, :, : key.shape[-2]]
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # T5-style additive logit bias
        dense = position_bias if dense is None else mask_as_bias(dense, query.dtype) + position_bias
    out = attention(
        query, key, value, causal=causal, key_bias=key_bias, attn_mask=dense,
        dropout_p=float(dropout), scale=scaling, return_lse=probe is not None, backend=backend,
    )
    if probe is not None:
        out, lse = out
        probe(query=query, key=key, lse=lse, mask=attention_mask, scale=scaling, backend=backend)
    return out.transpose(1, 2).contiguous(), None


def register(backend: str = "auto") -> None:
    """Make ``attn_implementation="fastvl"`` available to transformers models.

    ``backend`` ("auto" or an implementation, e.g. "triton") is the :func:`fastvl.ops.attention`
    backend every call uses; an explicit one that cannot serve a call raises
    :class:`fastvl.ops.BackendNotSupportedError`. Calling again replaces the backend.
    """
    check_backend(backend)
    AttentionInterface.register(
        ATTN_IMPLEMENTATION, functools.partial(fastvl_attention_forward, backend=backend)
    )
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, fastvl_attention_mask)


def unregister() -> None:
    """Remove ``"fastvl"`` from transformers' attention and mask registries (no-op if absent)."""
    AttentionInterface._global_mapping.pop(ATTN_IMPLEMENTATION, None)
    AttentionMaskInterface._global_mapping.pop(ATTN_IMPLEMENTATION, None)


def is_registered() -> bool:
    """Whether ``attn_implementation="fastvl"`` is currently available."""
    return ATTN_IMPLEMENTATION in AttentionInterface._global_mapping


def __getattr__(name: str):
    # ``apply_fastv`` lives in fastvl.patch.fastv, which builds on this module,
    # ``apply_mm_lora`` in fastvl.patch.mm_lora and ``apply_pitome`` in
    # fastvl.patch.vision_tower: imported on first use so that either module can be imported
    # first.
    if name == "apply_fastv":
        from fastvl.patch.fastv import apply_fastv

        return apply_fastv
    if name == "apply_mm_lora":
        from fastvl.patch.mm_lora import apply_mm_lora

        return apply_mm_lora
    if name == "apply_pitome":  # the CLIP / SigLIP vision towers
        from fastvl.patch.vision_tower import apply_pitome

        return apply_pitome
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
