"""FastV and PyramidDrop for Hugging Face LLaMA-style decoders and LLaVA-style VLMs.

``apply_fastv(model, layer, keep_ratio)`` makes the decoder drop image tokens after decoder
layer ``layer``: the image tokens are ranked by the attention mass they receive in that
layer's attention call (:func:`fastvl.ops.attention_key_mass` over the layer's own q, k and
the ``lse`` of its :func:`fastvl.ops.attention` call, so no N x N weights and no second run
of the layer), the top ``round(keep_ratio * M)`` of the M image tokens of each sample are kept
with every text token, and the later layers run on the kept tokens only. Lists of layers and
ratios give a multi-stage schedule (PyramidDrop): ``layer=[8, 16, 24], keep_ratio=[0.5] * 3``
keeps half of the remaining image tokens after each of those layers.

Which tokens are image tokens: ``image_token_mask=(B, N) bool`` passed to ``model(...)`` or
``model.generate(...)`` (it travels with the other forward keyword arguments down to the
decoder layers); or, when it is not given, ``input_ids == image_token_id`` where
``image_token_id`` is :func:`apply_fastv`'s argument, by default ``config.image_token_id``
(LLaVA: computed from ``input_ids`` before the image features replace the placeholders).

Semantics:

* Rounding: ``keep = floor(keep_ratio * M + 0.5)`` (half up). A stage with
  ``keep_ratio = 1`` keeps every token, so it is not installed; with all ratios 1 the model is
  exactly the unpatched one.
* Criteria: ``"last_query"`` (FastV: the attention of the last token, position N - 1; use left
  padding, as ``generate`` does, so that it is a real token) or ``"all_queries"`` (summed over
  every query). Both average over heads.
* Batch: per-sample ranking and selection; every sample must hold the same number of image
  tokens (as LLaVA prompts with the same number of images do), so every sample keeps the same
  count and the batch stays rectangular. Unequal counts raise ``ValueError``. Reading M costs
  one host sync per pruning forward (a graph break under ``torch.compile``).
* After a stage the decoder's output, hence the logits, cover the kept tokens only
  (``(B, N', V)``): text tokens and the last token are always kept.
* Positions: kept tokens keep their original position ids (the rotary ``cos, sin`` are
  gathered). With ``renumber_positions=True`` each token's position is lowered by the number of
  tokens dropped before it (``0 .. N'-1`` for a plain prompt), and ``cos, sin`` are recomputed
  with the decoder's ``rotary_emb``.
* Padding: the ``fastvl`` mask (:class:`~fastvl.patch.transformers.KeyBiasMask`) is gathered at
  the kept keys. Layer ``layer`` must take the fastvl op path (causal + padding mask, no
  dropout); other mask kinds raise ``ValueError``.
* KV cache (:class:`transformers.DynamicCache`, full-attention layers): the forward that starts
  the cache (or runs without one) prunes; layers up to ``layer`` cache every token and later
  layers only the kept ones. The kept positions are stored on the cache object (attribute
  ``fastvl_fastv_record``), so later forwards with that cache (decode steps, continuations)
  gather the padding mask of the later layers at the kept keys plus the new ones and, with
  ``renumber_positions``, shift the new tokens' positions by the dropped count. New tokens are
  never pruned; they get the next original position id (the cache's layer-0 length counts
  every prompt token). Other cache types raise ``ValueError``.

How it is wired (per instance, undone by :meth:`FastVPatch.remove`): a forward pre-hook on the
decoder (``model.get_decoder()``, e.g. ``LlamaModel``) adds a fresh per-forward
:class:`_ForwardContext` to the keyword arguments that reach every decoder layer; the
``forward`` of each layer from the first stage on is replaced on the instance (parameter names
and hooks unchanged) by a wrapper around the original one that takes the pruned mask and
positions from the context, and at a stage layer passes a probe to the attention function
(:data:`fastvl.patch.transformers.ATTENTION_PROBE_KWARG`), which hands it q, k and lse; the
wrapper then gathers the hidden states and writes the pruned inputs of the next layers into the
context. That context (created and consumed within one decoder forward) and the record on the
cache are the only state. ``model.forward`` is wrapped on the instance too: its signature
declares ``image_token_mask`` (``generate`` rejects keyword arguments ``forward`` does not
declare) and, with an ``image_token_id``, it fills the mask from ``input_ids``.

Not supported: training with ``labels`` (the logits cover the kept tokens), static or
sliding-window caches, pruning in a forward that continues a cache (only the first forward
prunes), different image-token counts per sample.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from fastvl.ops._checks import is_int
from fastvl.ops.attention_key_mass import attention_key_mass
from fastvl.ops.gather import gather_tokens
from fastvl.ops.pruning import topk_candidate_index
from fastvl.patch._decoder import (
    IMAGE_TOKEN_MASK_KWARG,
    cache_argument,
    declare_image_token_mask,
    decoder_of,
    replace_forward,
)
from fastvl.patch.transformers import ATTENTION_PROBE_KWARG, ATTN_IMPLEMENTATION, KeyBiasMask

__all__ = [
    "apply_fastv", "FastVPatch", "FastVStage", "keep_count", "CRITERIA", "IMAGE_TOKEN_MASK_KWARG",
]

CRITERIA = ("last_query", "all_queries")
_CONTEXT_KWARG = "fastvl_fastv_context"
_RECORD_ATTR = "fastvl_fastv_record"
_PATCH_ATTR = "_fastvl_fastv_patch"
_OP = "apply_fastv"


@dataclass(frozen=True)
class FastVStage:
    """Drop image tokens after decoder layer ``layer``, keeping ``keep_ratio`` of those left."""

    layer: int
    keep_ratio: float


@dataclass
class _PrunedInputs:
    """What the layers after a stage get instead of the decoder's own arguments.

    kept: (B, N') int64 positions of the kept tokens in this forward's sequence, ascending.
    """

    kept: torch.Tensor
    attention_mask: Optional[KeyBiasMask]
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]


@dataclass(eq=False)
class _ForwardContext:
    """Per decoder forward: the pruned inputs of the last stage run (None before the first),
    and the image tokens left in each sample (known after the first pruning)."""

    pruned: Optional[_PrunedInputs] = None
    num_image_tokens: Optional[int] = None


@dataclass(eq=False)
class _CacheRecord:
    """Stored on a pruned prefill's cache: its length N and each stage's (B, N_s) kept
    positions (ascending, into the N prompt tokens)."""

    num_tokens: int
    kept: list[torch.Tensor] = field(default_factory=list)


class _KeyMassProbe:
    """Handed to the attention function of a stage layer; keeps the (B, Nk) attention mass
    each key receives from the last query or from all queries, averaged over heads."""

    def __init__(self, criterion: str):
        self.criterion = criterion
        self.scores: Optional[torch.Tensor] = None

    def __call__(self, *, query, key, lse, mask: KeyBiasMask, scale, backend: str) -> None:
        num_queries = query.shape[2]
        self.scores = attention_key_mass(
            query, key, lse, causal=mask.causal, key_bias=mask.key_bias, scale=scale,
            query_start=num_queries - 1 if self.criterion == "last_query" else 0,
            query_end=num_queries, backend=backend,
        )


def keep_count(keep_ratio: float, num_image_tokens: int) -> int:
    """The image tokens a stage keeps: ``floor(keep_ratio * M + 0.5)`` (round half up)."""
    return math.floor(keep_ratio * num_image_tokens + 0.5)


@dataclass
class FastVPatch:
    """What :func:`apply_fastv` installed on ``model``; :meth:`remove` undoes it."""

    model: nn.Module = field(repr=False)
    stages: tuple[FastVStage, ...]
    criterion: str
    renumber_positions: bool
    image_token_id: Optional[int]
    _undo: list = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Restore the layers' forwards and remove the hooks (a no-op once done)."""
        while self._undo:
            self._undo.pop()()


# ---- argument checks -----------------------------------------------------------------------


def _as_list(value, name: str) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) == 0:
            raise ValueError(f"{_OP}: {name} must not be empty")
        return list(value)
    return [value]


def _check_stages(layer, keep_ratio, num_layers: int) -> list[FastVStage]:
    layers, ratios = _as_list(layer, "layer"), _as_list(keep_ratio, "keep_ratio")
    if len(ratios) == 1 and len(layers) > 1:
        ratios = ratios * len(layers)
    if len(ratios) != len(layers):
        raise ValueError(
            f"{_OP}: keep_ratio must be one number or one per layer ({len(layers)}), "
            f"got {len(ratios)}"
        )
    for value in layers:
        if not is_int(value):
            raise TypeError(f"{_OP}: layer must be an int or a list of ints, got {value!r}")
        if not 0 <= value <= num_layers - 2:
            raise ValueError(
                f"{_OP}: layer must lie in [0, num_layers - 2] = [0, {num_layers - 2}] (a "
                f"decoder layer followed by another), got {value}"
            )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"{_OP}: layers must be strictly increasing, got {layers}")
    for value in ratios:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{_OP}: keep_ratio must be a float or a list of floats, got {value!r}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{_OP}: keep_ratio must lie in [0, 1], got {value}")
    return [FastVStage(int(k), float(r)) for k, r in zip(layers, ratios)]


# ---- per-forward pieces ----------------------------------------------------------------------


def _check_cache(cache) -> None:
    if not isinstance(cache, DynamicCache) or any(
        type(layer) is not DynamicLayer for layer in cache.layers
    ):
        raise ValueError(
            f"FastV: the KV cache must be a DynamicCache with full-attention layers, got "
            f"{type(cache).__name__} (static and sliding-window caches are not supported)"
        )


def _image_candidates(image_token_mask, hidden_states: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, M) ascending image-token positions and M; one host sync (the per-sample counts)."""
    batch, num_tokens = hidden_states.shape[:2]
    if image_token_mask is None:
        raise ValueError(
            f"FastV: pass {IMAGE_TOKEN_MASK_KWARG}=(B, N) bool to model(...) / generate(...), "
            "or give apply_fastv an image_token_id (LLaVA configs have one)"
        )
    if not isinstance(image_token_mask, torch.Tensor) or image_token_mask.dtype != torch.bool:
        raise TypeError(f"FastV: {IMAGE_TOKEN_MASK_KWARG} must be a torch.bool tensor")
    if tuple(image_token_mask.shape) != (batch, num_tokens):
        raise ValueError(
            f"FastV: {IMAGE_TOKEN_MASK_KWARG} must be (B, N) = ({batch}, {num_tokens}) like the "
            f"tokens of the forward that prunes, got shape {tuple(image_token_mask.shape)}"
        )
    if image_token_mask.device != hidden_states.device:
        raise ValueError(
            f"FastV: {IMAGE_TOKEN_MASK_KWARG} is on {image_token_mask.device}, the model's "
            f"activations on {hidden_states.device}"
        )
    low, high = torch.stack(torch.aminmax(image_token_mask.sum(dim=1))).tolist()
    if low != high:
        raise ValueError(
            "FastV: every sample must hold the same number of image tokens (found counts from "
            f"{low} to {high}); batch samples with the same number of images"
        )
    return _true_positions(image_token_mask, low), low


def _true_positions(flags: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) ascending positions of the True entries of flags (B, N), ``count`` per row."""
    # A stable sort of the negated flags lists the True positions first, in order.
    return torch.argsort((~flags).to(torch.uint8), dim=1, stable=True)[:, :count]


def _gather_mask(attention_mask, key_index: torch.Tensor):
    """The fastvl mask of the kept keys: key_bias (B, Nk) gathered at key_index (B, Nk')."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, KeyBiasMask):
        raise ValueError(
            "FastV: the layers after a stage need the fastvl causal + padding mask "
            f'(attn_implementation="{ATTN_IMPLEMENTATION}", a DynamicCache, no custom 4D '
            f"mask or packed sequences), got a {type(attention_mask).__name__}"
        )
    if attention_mask.key_bias is None:
        return attention_mask
    return KeyBiasMask(attention_mask.causal, attention_mask.key_bias.gather(1, key_index))


def _layer_forward(patch: FastVPatch, decoder: nn.Module, layer_idx: int,
                   stage_idx: Optional[int], original_forward, hidden_states, **kwargs):
    """The forward of a decoder layer from the first stage on (see the module docstring)."""
    context = kwargs.pop(_CONTEXT_KWARG, None)
    image_token_mask = kwargs.pop(IMAGE_TOKEN_MASK_KWARG, None)
    if context is None:
        raise RuntimeError(
            f"FastV: decoder layer {layer_idx} was called outside its decoder's forward "
            "(the decoder's pre-hook provides the pruning context)"
        )
    # The decoder's own mask and positions (for every token of this forward).
    decoder_inputs = {
        name: kwargs.get(name)
        for name in ("attention_mask", "position_ids", "position_embeddings")
    }
    if context.pruned is not None:
        kwargs.update(
            attention_mask=context.pruned.attention_mask,
            position_ids=context.pruned.position_ids,
            position_embeddings=context.pruned.position_embeddings,
        )
    if stage_idx is None:
        return original_forward(hidden_states, **kwargs)

    cache = cache_argument(kwargs)
    if cache is not None:
        _check_cache(cache)
    if cache is not None and cache.get_seq_length(layer_idx) > 0:  # decode / continuation
        output = original_forward(hidden_states, **kwargs)
        record = getattr(cache, _RECORD_ATTR, None)
        if record is not None:
            context.pruned = _continuation_inputs(
                patch, decoder, record, stage_idx, decoder_inputs, hidden_states
            )
        return output

    probe = _KeyMassProbe(patch.criterion)
    output = original_forward(hidden_states, **kwargs, **{ATTENTION_PROBE_KWARG: probe})
    if probe.scores is None:
        raise RuntimeError(
            f"FastV: the attention of decoder layer {layer_idx} did not run fastvl's attention "
            f'function; set attn_implementation="{ATTN_IMPLEMENTATION}" and call '
            "fastvl.patch.transformers.register()"
        )
    batch, num_tokens = output.shape[:2]
    if context.pruned is None:  # the first stage of this forward
        candidates, num_images = _image_candidates(image_token_mask, output)
        kept_before = torch.arange(num_tokens, device=output.device).expand(batch, -1)
        if cache is not None:
            setattr(cache, _RECORD_ATTR, _CacheRecord(num_tokens))
    else:
        kept_before, num_images = context.pruned.kept, context.num_image_tokens
        candidates = _true_positions(image_token_mask.gather(1, kept_before), num_images)
    keep = keep_count(patch.stages[stage_idx].keep_ratio, num_images)
    local = topk_candidate_index(probe.scores, candidates, keep, check_candidates=False)
    kept = kept_before.gather(1, local)
    context.num_image_tokens = keep
    context.pruned = _prefill_inputs(patch, decoder, kept, decoder_inputs, output)
    if cache is not None:
        getattr(cache, _RECORD_ATTR).kept.append(kept)
    return gather_tokens(output, local, check_bounds=False)


def _positions(patch, decoder, position_ids, shift, hidden_states, cos_sin, index):
    """Position ids and (cos, sin) of the tokens at ``index`` (B, N'), or renumbered: lowered
    by ``shift`` (B, N') (the tokens dropped before each) and recomputed."""
    position_ids = position_ids.expand(index.shape[0], -1).gather(1, index)
    if patch.renumber_positions:
        position_ids = position_ids - shift
        return position_ids, decoder.rotary_emb(hidden_states, position_ids)
    cos_sin = tuple(torch.take_along_dim(t, index.unsqueeze(-1), dim=1) for t in cos_sin)
    return position_ids, cos_sin


def _prefill_inputs(patch, decoder, kept, decoder_inputs, hidden_states) -> _PrunedInputs:
    """Inputs of the layers after a stage that kept ``kept`` (B, N') of this forward's tokens."""
    ranks = torch.arange(kept.shape[1], device=kept.device)
    position_ids, cos_sin = _positions(
        patch, decoder, decoder_inputs["position_ids"], kept - ranks, hidden_states,
        decoder_inputs["position_embeddings"], kept,
    )
    return _PrunedInputs(
        kept, _gather_mask(decoder_inputs["attention_mask"], kept), position_ids, cos_sin
    )


def _continuation_inputs(patch, decoder, record, stage_idx, decoder_inputs,
                         hidden_states) -> _PrunedInputs:
    """Inputs of the layers after a stage for new tokens, with a pruned prefill in the cache:
    the keys are the stage's kept prompt tokens and every token after the prompt."""
    kept = record.kept[stage_idx]
    batch = hidden_states.shape[0]
    dropped = record.num_tokens - kept.shape[1]
    mask = decoder_inputs["attention_mask"]
    if isinstance(mask, KeyBiasMask) and mask.key_bias is not None:
        later = torch.arange(record.num_tokens, mask.key_bias.shape[1], device=kept.device)
        mask = _gather_mask(mask, torch.cat([kept, later.expand(batch, -1)], dim=1))
    else:  # None or a KeyBiasMask without bias: as is (anything else raises)
        mask = _gather_mask(mask, kept)
    position_ids = decoder_inputs["position_ids"].expand(batch, -1)
    cos_sin = decoder_inputs["position_embeddings"]
    if patch.renumber_positions:
        position_ids = position_ids - dropped
        cos_sin = decoder.rotary_emb(hidden_states, position_ids)
    return _PrunedInputs(kept, mask, position_ids, cos_sin)


# ---- installing ------------------------------------------------------------------------------


def _add_context(module, args, kwargs):
    """Decoder forward pre-hook: a fresh pruning context for this forward's layers."""
    kwargs[_CONTEXT_KWARG] = _ForwardContext()
    return args, kwargs


def apply_fastv(
    model: nn.Module,
    layer: int | Sequence[int],
    keep_ratio: float | Sequence[float],
    *,
    criterion: str = "last_query",
    renumber_positions: bool = False,
    image_token_id: Optional[int] = None,
) -> FastVPatch:
    """Drop the least-attended image tokens after decoder layer(s) ``layer`` (FastV, PyramidDrop).

    Args:
        model: a transformers LLaMA-style model (``LlamaForCausalLM``, ``LlamaModel``) or
            LLaVA-style VLM (``LlavaForConditionalGeneration``) built with
            ``attn_implementation="fastvl"`` (see :func:`fastvl.patch.transformers.register`).
        layer: the decoder layer (0-based) after which image tokens are dropped, in
            ``[0, num_layers - 2]``, or a strictly increasing list of them (multi-stage).
        keep_ratio: the fraction in [0, 1] of the image tokens left that each stage keeps
            (``floor(ratio * M + 0.5)`` of M), one number for every stage or one per stage.
        criterion: "last_query" (FastV) or "all_queries": which queries' attention ranks.
        renumber_positions: give kept and later tokens positions without gaps (default: the
            original position ids).
        image_token_id: mark tokens ``input_ids == image_token_id`` as image tokens when the
            forward gets no ``image_token_mask``; default ``model.config.image_token_id`` if
            the config has one. Without it, pass ``image_token_mask=(B, N) bool`` to
            ``model(...)`` / ``generate(...)``.

    Returns:
        a :class:`FastVPatch`; ``.remove()`` restores the model.
    """
    decoder = decoder_of(model, _OP)
    layers = decoder.layers
    stages = [s for s in _check_stages(layer, keep_ratio, len(layers)) if s.keep_ratio < 1.0]
    if criterion not in CRITERIA:
        raise ValueError(f"{_OP}: criterion must be one of {CRITERIA}, got {criterion!r}")
    if not isinstance(renumber_positions, bool):
        raise TypeError(f"{_OP}: renumber_positions must be a bool, got {renumber_positions!r}")
    if image_token_id is None:
        image_token_id = getattr(model.config, "image_token_id", None)
    elif not is_int(image_token_id):
        raise TypeError(f"{_OP}: image_token_id must be an int or None, got {image_token_id!r}")
    implementation = getattr(decoder.config, "_attn_implementation", None)
    if implementation != ATTN_IMPLEMENTATION:
        raise ValueError(
            f'{_OP}: the decoder must use attn_implementation="{ATTN_IMPLEMENTATION}" (FastV '
            f"ranks with the lse of fastvl's attention), got {implementation!r}"
        )
    if getattr(decoder, _PATCH_ATTR, None) is not None:
        raise ValueError(f"{_OP}: the model already has FastV applied; remove() that patch first")

    patch = FastVPatch(model, tuple(stages), criterion, renumber_positions, image_token_id)
    if not stages:
        return patch
    stage_of = {stage.layer: i for i, stage in enumerate(stages)}
    for idx in range(stages[0].layer, len(layers)):
        module = layers[idx]
        forward = functools.partial(
            _layer_forward, patch, decoder, idx, stage_of.get(idx), module.forward
        )
        patch._undo.append(replace_forward(module, forward))
    patch._undo.append(
        decoder.register_forward_pre_hook(_add_context, with_kwargs=True).remove
    )
    patch._undo.append(
        replace_forward(model, declare_image_token_mask(model, image_token_id, _OP))
    )
    setattr(decoder, _PATCH_ATTR, patch)
    patch._undo.append(lambda: delattr(decoder, _PATCH_ATTR))
    return patch
