"""PiToMe in the Hugging Face CLIP / SigLIP vision towers VLMs use (:func:`apply_pitome`).

The tower's encoder (``vision_model.encoder``) is swapped for a :class:`PitomeVisionEncoder`
that holds the *same* layer modules (parameters and state-dict keys unchanged) and calls each
of them unchanged, merging ``r`` tokens between consecutive layers: PiToMe on the layer's
output hidden states as the metric (as PiToMe's own CLIP patch does), then the size-weighted
merge (:func:`fastvl.ops.tome_merge`; PiToMe's CLIP patch averages without sizes). The class
token of CLIP is never merged (SigLIP has none). Layer outputs are merged, so
``last_hidden_state`` (and every captured hidden state after the first merge) holds fewer
tokens; CLIP's pooled output (the class token) keeps its meaning, SigLIP's attention-pooling
head pools the merged tokens without their sizes. In a VLM the language model then receives
fewer image tokens: its processor must expect that many (not done here).

``handle.remove()`` puts the original encoder back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from fastvl.ops.pitome import check_pitome_options, pitome_match
from fastvl.ops.registry import check_op_backend
from fastvl.ops.tome import tome_merge

__all__ = ["PitomeVisionEncoder", "VisionTowerPatch", "apply_pitome"]


class PitomeVisionEncoder(nn.Module):
    """A CLIP / SigLIP encoder's layers with a PiToMe merge after each (``r`` per layer, the
    last layer's output included). ``forward(inputs_embeds, attention_mask=None, **kwargs)``
    as the encoder's; returns a ``BaseModelOutput`` with ``last_hidden_state`` (B, M, D)."""

    def __init__(self, encoder: nn.Module, r: Sequence[int], margins: Sequence[float],
                 alpha: float, num_prefix_tokens: int, backend: str):
        super().__init__()
        self.layers = encoder.layers  # the same ModuleList: same parameters and keys
        self.r = tuple(r)
        self.margins = tuple(margins)
        self.alpha = alpha
        self.num_prefix_tokens = num_prefix_tokens
        self.backend = backend
        object.__setattr__(self, "_original", encoder)

    def extra_repr(self) -> str:
        return (f"r={self.r}, num_prefix_tokens={self.num_prefix_tokens}, "
                f"backend={self.backend!r}")

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs):
        if attention_mask is not None:
            raise ValueError(
                "fastvl PiToMe vision encoder: an attention_mask cannot follow merged tokens; "
                "vision towers run without one"
            )
        x, size = inputs_embeds, None
        for layer, r, margin in zip(self.layers, self.r, self.margins):
            x = layer(x, None, **kwargs)
            step = min(r, (x.shape[1] - self.num_prefix_tokens) // 2)
            if step > 0:
                plan = pitome_match(x, step, margin=margin, alpha=self.alpha,
                                    num_prefix_tokens=self.num_prefix_tokens,
                                    backend=self.backend)
                x, size = tome_merge(plan, x, size, backend=self.backend, check_plan=False)
        return BaseModelOutput(last_hidden_state=x)


@dataclass
class VisionTowerPatch:
    """What :func:`apply_pitome` did; ``remove()`` undoes it (False if already undone)."""

    vision_model: nn.Module = field(repr=False)
    encoder: PitomeVisionEncoder = field(repr=False)

    def remove(self) -> bool:
        if self.vision_model.encoder is not self.encoder:
            return False
        self.vision_model.encoder = self.encoder._original
        return True


def _vision_model(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings`` and ``encoder.layers`` (CLIPVisionModel /
    SiglipVisionModel hold it as ``vision_model``; a VLM's ``vision_tower`` too)."""
    for candidate in (model, getattr(model, "vision_model", None)):
        if candidate is not None and hasattr(candidate, "embeddings") and hasattr(
                getattr(candidate, "encoder", None), "layers"):
            return candidate
    raise TypeError(
        "apply_pitome: model must be a Hugging Face CLIP / SigLIP vision model (with "
        f"vision_model.embeddings and vision_model.encoder.layers), got {type(model).__name__}"
    )


def apply_pitome(model: nn.Module, r, *, margins: Optional[Sequence[float]] = None,
                 alpha: float = 1.0, backend: str = "auto") -> VisionTowerPatch:
    """PiToMe in a Hugging Face CLIP / SigLIP vision model, in place; returns the handle.

    Args:
        model: ``CLIPVisionModel`` / ``SiglipVisionModel`` (or their ``vision_model``, a
            VLM's vision tower).
        r: tokens merged after each layer: an int, or one per layer (at most half of the
            mergeable tokens each time, as ToMe).
        margins: one per layer; default PiToMe's ``0.9 - 0.8 * i / depth``.
        alpha: the margin function's negative scale.
        backend: the backend of the fastvl ops ("auto", "triton", "torch").
    """
    op = "apply_pitome"
    vision = _vision_model(model)
    if isinstance(vision.encoder, PitomeVisionEncoder):
        raise ValueError(f"{op}: the model already has PiToMe; call the handle's remove() first")
    check_op_backend(op, backend, "pitome_energy", "tome_merge")
    depth = len(vision.encoder.layers)
    if isinstance(r, bool) or not (isinstance(r, int) or (
            isinstance(r, Sequence) and len(r) == depth
            and all(isinstance(v, int) and not isinstance(v, bool) for v in r))):
        raise TypeError(f"{op}: r must be an int or {depth} ints (one per layer), got {r!r}")
    schedule = [r] * depth if isinstance(r, int) else list(r)
    if any(v < 0 for v in schedule):
        raise ValueError(f"{op}: r must be >= 0, got {r!r}")
    margins, alpha = check_pitome_options(op, margins, alpha, depth)
    prefix = 1 if hasattr(vision.embeddings, "class_embedding") else 0
    wrapper = PitomeVisionEncoder(vision.encoder, schedule, margins, alpha, prefix, backend)
    vision.encoder = wrapper
    return VisionTowerPatch(vision, wrapper)
