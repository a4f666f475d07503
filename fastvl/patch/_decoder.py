"""Helpers shared by the patches of Hugging Face LLaMA-style decoders (FastV, MM-LoRA)."""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

from torch import nn

IMAGE_TOKEN_MASK_KWARG = "image_token_mask"
# The KV cache argument of models and decoder layers: "cache" since transformers 5.2x,
# "past_key_values" before (still accepted there, with a deprecation warning).
CACHE_KWARGS = ("cache", "past_key_values")


def cache_argument(arguments: dict):
    """The KV cache among a forward's keyword ``arguments`` (either name), or None."""
    for name in CACHE_KWARGS:
        if arguments.get(name) is not None:
            return arguments[name]
    return None


def decoder_of(model: nn.Module, op: str) -> nn.Module:
    """``model.get_decoder()`` (or ``model``) if it is a LLaMA-style decoder, else TypeError."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not (
        isinstance(layers, nn.ModuleList)
        and len(layers) > 0
        and isinstance(getattr(decoder, "rotary_emb", None), nn.Module)
        and all(hasattr(layer, "self_attn") for layer in layers)
    ):
        raise TypeError(
            f"{op}: {type(model).__name__} is not a LLaMA-style decoder (expected "
            "model.get_decoder() with .layers of decoder layers with .self_attn and .rotary_emb)"
        )
    return decoder


def declare_image_token_mask(model: nn.Module, image_token_id: Optional[int], op: str):
    """A forward for ``model`` that declares the ``image_token_mask`` keyword argument (generate
    checks model kwargs against ``forward``'s signature) and, with ``image_token_id``, fills it
    with ``input_ids == image_token_id`` when not given; calls the model's forward."""
    original = model.forward
    signature = inspect.signature(original)
    params = list(signature.parameters.values())
    if not params or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
        raise TypeError(
            f"{op}: {type(model).__name__}.forward takes no **kwargs, so it cannot pass "
            f"{IMAGE_TOKEN_MASK_KWARG} on to the decoder layers"
        )
    if IMAGE_TOKEN_MASK_KWARG not in signature.parameters:
        mask_param = inspect.Parameter(
            IMAGE_TOKEN_MASK_KWARG, inspect.Parameter.KEYWORD_ONLY, default=None
        )
        params.insert(len(params) - 1, mask_param)
    input_ids_position = list(signature.parameters).index("input_ids") \
        if "input_ids" in signature.parameters else None

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if image_token_id is not None and kwargs.get(IMAGE_TOKEN_MASK_KWARG) is None:
            input_ids = kwargs.get("input_ids")
            if input_ids is None and input_ids_position is not None and len(args) > input_ids_position:
                input_ids = args[input_ids_position]
            if input_ids is not None:
                kwargs[IMAGE_TOKEN_MASK_KWARG] = input_ids == image_token_id
        return original(*args, **kwargs)

    forward.__signature__ = signature.replace(parameters=params)
    return forward


def replace_forward(module: nn.Module, forward) -> Callable[[], None]:
    """Set ``module.forward`` on the instance; returns the undo."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward

    def undo():
        if had_own:
            module.forward = previous
        else:
            del module.forward

    return undo
