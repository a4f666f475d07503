"""MM-LoRA and PLoRA for Hugging Face LLaMA-style decoders and LLaVA-style VLMs.

``apply_mm_lora(model, r, alpha, modalities=("vision", "language"))`` wraps the targeted
``nn.Linear`` layers of the language model (``model.get_decoder()``) in
:class:`fastvl.nn.RoutedLoRALinear` with one adapter per modality: image tokens use the
"vision" adapter and text tokens the "language" one (MM-LoRA, Arcana). A modality left out
routes its tokens to -1 (base only), so ``modalities=("vision",)`` is PLoRA
(InternLM-XComposer2): a LoRA on image tokens only.

Which tokens are image tokens: ``image_token_mask=(B, L) bool`` passed to ``model(...)`` or
``generate(...)``; or, when it is not given, ``input_ids == image_token_id`` (by default
``config.image_token_id``, which LLaVA configs have). The route, (B, N) int64 for the N tokens
of the forward, is computed once per forward without host synchronisation and set with
:func:`fastvl.nn.lora_route` for the whole call. A mask of N columns covers the forward's own
tokens; a wider one, e.g. the prompt's mask that ``generate`` passes to every step, covers the
sequence from position 0, and the forward continuing a cache of P tokens reads its columns
P..P+N-1; tokens past the mask's end (generated tokens) are text. With ``image_token_id`` the
new ``input_ids`` of a decode step say it themselves.

Like peft, every parameter of ``model`` is frozen (``requires_grad=False``) and the LoRA
parameters alone train; :meth:`MMLoRAPatch.remove` puts the ``nn.Linear`` layers, the
``requires_grad`` flags and the forward back. Not supported: FastV on the same model (pruned
layers see fewer tokens than the route).

Gradient checkpointing (``model.gradient_checkpointing_enable()``, before or after
``apply_mm_lora``; reentrant checkpoints also need ``model.enable_input_require_grads()``, as
with peft) recomputes decoder layers in the backward, after the forward's
``lora_route`` block has closed. transformers runs every checkpointed layer through the
``_gradient_checkpointing_func`` it sets on the decoder's modules; each forward of the patched
model wraps the ones it finds (once) so that the function they checkpoint re-enters the route
of the forward that called it, in the forward and in the recompute alike.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastvl.nn.lora import (
    RoutedLoRALinear,
    active_route_block,
    entered_route_block,
    lora_route,
)
from fastvl.ops._checks import is_int
from fastvl.patch._decoder import (
    IMAGE_TOKEN_MASK_KWARG,
    cache_argument,
    declare_image_token_mask,
    decoder_of,
    replace_forward,
)
from fastvl.patch._modules import child_slots

__all__ = ["apply_mm_lora", "MMLoRAPatch", "MODALITIES"]

MODALITIES = ("vision", "language")
_PATCH_ATTR = "_fastvl_mm_lora_patch"
_OP = "apply_mm_lora"
# What transformers' activation checkpointing calls as ``module.<attr>(function, *args)``.
_CHECKPOINT_FUNC_ATTR = "_gradient_checkpointing_func"


@dataclass
class MMLoRAPatch:
    """What :func:`apply_mm_lora` did: ``replaced`` names (relative to ``model``), the
    ``modalities`` (adapter i is ``modalities[i]``); :meth:`remove` undoes it."""

    model: nn.Module = field(repr=False)
    modalities: tuple[str, ...]
    image_token_id: Optional[int]
    replaced: list[str]
    _undo: list = field(default_factory=list, repr=False)
    _routed_checkpoints: set = field(default_factory=set, repr=False)

    def remove(self) -> None:
        """Put back the linear layers, ``requires_grad`` flags and forward (no-op once done)."""
        while self._undo:
            self._undo.pop()()


def _check_modalities(modalities) -> tuple[str, ...]:
    if isinstance(modalities, str) or not isinstance(modalities, Sequence):
        raise TypeError(f"{_OP}: modalities must be a sequence of str, got {modalities!r}")
    names = tuple(modalities)
    if not names or len(set(names)) != len(names) or not set(names) <= set(MODALITIES):
        raise ValueError(
            f"{_OP}: modalities must be distinct entries of {MODALITIES} (at least one), "
            f"got {names!r}"
        )
    return names


def _token_route(image_token_mask, tokens: torch.Tensor, past: int, vision: int,
                 language: int) -> torch.Tensor:
    """(B, N) int64 route of the forward's tokens (B, N, ...) that follow ``past`` cached ones."""
    batch, num_tokens = tokens.shape[:2]
    route = torch.full((batch, num_tokens), language, dtype=torch.int64, device=tokens.device)
    if image_token_mask is None:
        if vision >= 0:
            raise ValueError(
                f"{_OP}: no image tokens known; pass {IMAGE_TOKEN_MASK_KWARG}=(B, N) bool to "
                "model(...) / generate(...), or give apply_mm_lora an image_token_id"
            )
        return route
    if not isinstance(image_token_mask, torch.Tensor) or image_token_mask.dtype != torch.bool:
        raise TypeError(f"{_OP}: {IMAGE_TOKEN_MASK_KWARG} must be a torch.bool tensor")
    width = image_token_mask.shape[-1]
    if image_token_mask.dim() != 2 or image_token_mask.shape[0] != batch or (
        width != num_tokens and past == 0
    ):
        raise ValueError(
            f"{_OP}: {IMAGE_TOKEN_MASK_KWARG} must be (B, N) = ({batch}, {num_tokens}) like the "
            f"forward's tokens, or (B, L) over the sequence in a forward continuing a cache, "
            f"got shape {tuple(image_token_mask.shape)}"
        )
    if image_token_mask.device != route.device:
        raise ValueError(
            f"{_OP}: {IMAGE_TOKEN_MASK_KWARG} is on {image_token_mask.device}, the tokens on "
            f"{route.device}"
        )
    if width != num_tokens:  # the sequence's mask: this forward's columns, text past its end
        image_token_mask = F.pad(image_token_mask, (0, max(0, past + num_tokens - width)))
        image_token_mask = image_token_mask[:, past:past + num_tokens]
    return route.masked_fill_(image_token_mask, vision)


def _checkpoint_in_route(checkpoint):
    """``checkpoint(function, *args, **kwargs)`` whose ``function`` runs inside the route
    active at the call, in the forward and again in the backward's recompute."""

    @functools.wraps(checkpoint)
    def checkpoint_in_route(function, *args, **kwargs):
        block = active_route_block()
        if block is None:
            return checkpoint(function, *args, **kwargs)

        def in_route(*function_args, **function_kwargs):
            with entered_route_block(block):
                return function(*function_args, **function_kwargs)

        return checkpoint(in_route, *args, **kwargs)

    return checkpoint_in_route


def _route_checkpointing(patch: "MMLoRAPatch", modules: Sequence[nn.Module]) -> None:
    """Wrap each checkpoint function transformers has set on ``modules`` (gradient
    checkpointing may be enabled after :func:`apply_mm_lora`) with
    :func:`_checkpoint_in_route`, once; the patch's undo puts the originals back."""
    for module in modules:
        current = module.__dict__.get(_CHECKPOINT_FUNC_ATTR)
        if current is None or current in patch._routed_checkpoints:
            continue
        wrapped = _checkpoint_in_route(current)
        patch._routed_checkpoints.add(wrapped)
        setattr(module, _CHECKPOINT_FUNC_ATTR, wrapped)

        def undo(module=module, original=current, wrapped=wrapped):
            if module.__dict__.get(_CHECKPOINT_FUNC_ATTR) is wrapped:
                setattr(module, _CHECKPOINT_FUNC_ATTR, original)

        patch._undo.append(undo)


def _routed_forward(original, vision: int, language: int, passes_mask: bool, before_call):
    """A forward that calls ``before_call()`` and runs ``original`` inside ``lora_route`` of
    this forward's tokens (valid by construction: no range check, no host sync)."""
    num_adapters = max(vision, language) + 1
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        before_call()
        image_token_mask = kwargs.get(IMAGE_TOKEN_MASK_KWARG)
        if not passes_mask:
            kwargs.pop(IMAGE_TOKEN_MASK_KWARG, None)
        bound = signature.bind_partial(*args, **kwargs).arguments
        tokens = bound.get("input_ids")
        if tokens is None:
            tokens = bound.get("inputs_embeds")
        if tokens is None:
            raise ValueError(f"{_OP}: the forward got neither input_ids nor inputs_embeds")
        cache = cache_argument(bound)
        past = cache.get_seq_length() if cache is not None else 0
        route = _token_route(image_token_mask, tokens, past, vision, language)
        with lora_route(route, num_adapters=num_adapters):
            return original(*args, **kwargs)

    return forward


def _freeze(model: nn.Module):
    """Set ``requires_grad=False`` on every parameter; returns the undo."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)

    def undo():
        for p, flag in flags:
            p.requires_grad_(flag)

    return undo


def _swap(parent: nn.Module, attribute: str, module: nn.Module):
    """Set ``parent.<attribute> = module``; returns the undo."""
    previous = getattr(parent, attribute)
    setattr(parent, attribute, module)
    return lambda: setattr(parent, attribute, previous)


def apply_mm_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    *,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    modalities: Sequence[str] = MODALITIES,
    dropout: float = 0.0,
    backend: str = "auto",
    image_token_id: Optional[int] = None,
) -> MMLoRAPatch:
    """Add one LoRA per modality to the language model's linear layers (MM-LoRA; PLoRA with
    ``modalities=("vision",)``).

    Args:
        model: a transformers LLaMA-style model (``LlamaForCausalLM``, ``LlamaModel``) or
            LLaVA-style VLM (``LlavaForConditionalGeneration``); changed in place.
        r, alpha: rank and ``scaling = alpha / r`` of every adapter.
        target_modules: attribute names of the decoder's ``nn.Linear`` layers to wrap.
        modalities: the adapters, in order, from ("vision", "language"); tokens of a modality
            left out use the base layer only.
        dropout: dropout on the LoRA branch's input, in training mode.
        backend: of :func:`fastvl.ops.routed_lora_linear`.
        image_token_id: mark tokens ``input_ids == image_token_id`` as image tokens when the
            forward gets no ``image_token_mask``; default ``model.config.image_token_id`` if
            the config has one.

    Returns:
        an :class:`MMLoRAPatch`; ``.replaced`` lists the wrapped layers, ``.remove()`` undoes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OP}: model must be a torch.nn.Module, got {type(model).__name__}")
    decoder = decoder_of(model, _OP)
    names = _check_modalities(modalities)
    if isinstance(target_modules, str) or not isinstance(target_modules, Sequence) or not all(
        isinstance(name, str) for name in target_modules
    ) or not target_modules:
        raise TypeError(f"{_OP}: target_modules must be a non-empty sequence of str, got "
                        f"{target_modules!r}")
    if image_token_id is None:
        image_token_id = getattr(getattr(model, "config", None), "image_token_id", None)
    elif not is_int(image_token_id):
        raise TypeError(f"{_OP}: image_token_id must be an int or None, got {image_token_id!r}")
    if getattr(model, _PATCH_ATTR, None) is not None:
        raise ValueError(f"{_OP}: the model already has MM-LoRA applied; remove() that first")
    slots = [
        (parent, attribute, name, child) for parent, attribute, name, child in child_slots(decoder)
        if attribute in target_modules and type(child) is nn.Linear
    ]
    if not slots:
        raise ValueError(f"{_OP}: no nn.Linear named {tuple(target_modules)} in the decoder")

    vision = names.index("vision") if "vision" in names else -1
    language = names.index("language") if "language" in names else -1
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    # Built before anything changes: RoutedLoRALinear checks r, alpha, dropout and backend.
    routed = [
        RoutedLoRALinear(child, r, alpha, len(names), dropout=dropout, backend=backend)
        for _, _, _, child in slots
    ]
    patch = MMLoRAPatch(model, names, image_token_id, [])
    try:
        patch._undo.append(_freeze(model))
        for (parent, attribute, name, _), module in zip(slots, routed):
            patch._undo.append(_swap(parent, attribute, module))
            patch.replaced.append(f"{prefix}.{name}" if prefix else name)
        passes_mask = IMAGE_TOKEN_MASK_KWARG in inspect.signature(model.forward).parameters
        checkpointed = (decoder, *decoder.layers)
        patch._undo.append(replace_forward(model, _routed_forward(
            model.forward, vision, language, passes_mask,
            lambda: _route_checkpointing(patch, checkpointed),
        )))
        patch._undo.append(
            replace_forward(model, declare_image_token_mask(model, image_token_id, _OP))
        )
    except BaseException:
        patch.remove()
        raise
    setattr(model, _PATCH_ATTR, patch)
    patch._undo.append(lambda: delattr(model, _PATCH_ATTR))
    return patch
