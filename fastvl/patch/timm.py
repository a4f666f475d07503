"""Swap :class:`fastvl.nn.Attention` into timm models, in place and per module instance.

``apply(model)`` replaces every ``timm.layers.Attention`` child of ``model`` (the attention of
``Block``, ``ResPostBlock`` and ``ParallelThingsBlock``, in ``VisionTransformer`` and any other
timm model built from that class) by a :class:`fastvl.nn.Attention` that *shares* its
submodules. Only the attention modules change, so everything around them (LayerScale, qk-norm,
class / register / distillation tokens, ``no_embed_class``, every ``global_pool``) works as
before, parameters are the same objects and the state-dict keys are unchanged.

Attention-like modules whose math differs are left alone and listed in the returned
:class:`TimmPatch` with the reason (rope, relative position bias, differential attention,
attention pooling, attention computed inline in a fused block, subclasses).

``remove(model)`` (or ``handle.remove()``, which undoes only that call) puts the original
timm modules back; the submodules the fastvl modules hold at that time are handed back to
them, so later changes to those (e.g. a wrapped ``qkv``) are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

from timm.layers import Attention as TimmAttention
from torch import nn

from fastvl.nn.attention import TIMM_SUBMODULES, Attention, check_backend
from fastvl.patch._modules import marked_slots, patched_names, swap_back, swap_children
from fastvl.patch.timm_tome import (
    TokenReductionPatch,
    apply_evit,
    apply_pitome,
    apply_tome,
    apply_zero_tprune,
    remove_token_reduction,
    render_tome_regions,
    tome_schedule,
)

__all__ = [
    "apply", "remove", "TimmPatch", "Skipped", "apply_tome", "apply_evit", "apply_zero_tprune",
    "apply_pitome",
    "remove_token_reduction", "render_tome_regions", "tome_schedule", "TokenReductionPatch",
]

# Set (outside the module registry, so not in state_dict) on each fastvl module apply() made.
_ORIGINAL = "_fastvl_timm_original"

_ROPE = "applies rotary position embeddings (rope) to q and k, which fastvl.nn.Attention does not"
_REL_POS = "adds a relative position bias over query-key pairs to the logits"
_INLINE = (
    "computes attention inline in the block's forward from a fused qkv+mlp projection; "
    "there is no attention module to swap"
)
_POOL = "attention pooling (learned latent queries, or parameter-free), not a timm Attention"
# Why known attention-like classes are not swapped, by "module.QualName".
_KNOWN_SKIPS = {
    "timm.layers.attention.AttentionRope": _ROPE,
    "timm.models.eva.EvaAttention": _ROPE,
    "timm.layers.diff_attention.DiffAttention": (
        "differential attention: the difference of two softmax maps, not one"
    ),
    "timm.layers.attention_pool.AttentionPoolLatent": _POOL,
    "timm.layers.attention_pool.AttentionPoolPrr": _POOL,
    "timm.models.vision_transformer.ParallelScalingBlock": _INLINE,
    "timm.models.vision_transformer.DiffParallelScalingBlock": _INLINE,
    "timm.models.vision_transformer_relpos.RelPosAttention": _REL_POS,
    "timm.models.beit.Attention": _REL_POS,
}
_GENERIC_SKIP = (
    "not timm.layers.Attention; its forward is not known to be equivalent "
    "(relative position bias, rope, windows, pooling, ...)"
)


class Skipped(NamedTuple):
    """An attention-like module :func:`apply` left alone: where, its class, and why."""

    name: str
    cls: str
    reason: str


@dataclass
class TimmPatch:
    """What :func:`apply` did to ``model``: ``replaced`` names, ``skipped`` modules, ``backend``."""

    model: nn.Module = field(repr=False)
    backend: str
    replaced: list[str]
    skipped: list[Skipped]
    _created: tuple[Attention, ...] = field(repr=False, default=())

    def remove(self) -> list[str]:
        """Restore the timm modules this call replaced (names restored; [] once done)."""
        created = {id(module) for module in self._created}
        return _restore(self.model, lambda module: id(module) in created)

    def __str__(self) -> str:
        lines = [f"fastvl.patch.timm: {len(self.replaced)} attention modules on backend "
                 f"{self.backend!r}, {len(self.skipped)} skipped"]
        lines += [f"  replaced {name}" for name in self.replaced]
        lines += [f"  skipped {s.name} ({s.cls}): {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _skip_reason(module: nn.Module) -> Optional[str]:
    """Why an attention-like module is not swapped, or None if it is not attention-like."""
    cls = type(module)
    if isinstance(module, TimmAttention):
        return f"subclass of timm.layers.Attention ({cls.__qualname__}); it may override forward"
    if isinstance(module, Attention):
        return "already a fastvl.nn.Attention"
    if _qualname(cls) in _KNOWN_SKIPS:
        return _KNOWN_SKIPS[_qualname(cls)]
    if "Attention" in cls.__name__ or "Attn" in cls.__name__:
        return _GENERIC_SKIP
    return None


def apply(model: nn.Module, *, backend: str = "auto") -> TimmPatch:
    """Swap fastvl attention into ``model`` in place; returns the :class:`TimmPatch` report.

    Every child that is exactly a ``timm.layers.Attention`` becomes
    ``fastvl.nn.Attention.from_timm(child, backend)`` (shared parameters, same state-dict keys).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: unknown ``backend``; ``model`` is itself a timm Attention (use
            :meth:`fastvl.nn.Attention.from_timm`); ``model`` was already patched (call
            :func:`remove` first; patching twice would otherwise silently keep the first
            backend).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply: model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend(backend)
    if type(model) is TimmAttention:
        raise ValueError(
            "apply: model is itself a timm Attention and cannot be replaced in place; use "
            "fastvl.nn.Attention.from_timm(model) instead"
        )
    patched = patched_names(model, _ORIGINAL)
    if patched:
        raise ValueError(
            f"apply: model is already patched by fastvl.patch.timm ({len(patched)} modules, "
            f"e.g. {patched[0]!r}); call fastvl.patch.timm.remove(model) first"
        )

    def replacement_for(child):
        if type(child) is TimmAttention:
            return lambda: Attention.from_timm(child, backend)
        return _skip_reason(child)

    replaced, skipped, modules = swap_children(model, _ORIGINAL, replacement_for)
    skipped = [Skipped(name, _qualname(type(child)), reason) for name, child, reason in skipped]
    return TimmPatch(model, backend, replaced, skipped, modules)


def _restore(model: nn.Module, selected: Callable[[Attention], bool]) -> list[str]:
    """Swap the selected patched fastvl modules of ``model`` back; the names restored."""
    slots = marked_slots(model, _ORIGINAL, lambda m: isinstance(m, Attention) and selected(m))
    for _, _, _, fast, original in slots:
        for submodule in TIMM_SUBMODULES:
            setattr(original, submodule, getattr(fast, submodule))
        original.training = fast.training
    swap_back(slots, _ORIGINAL)
    return [name for _, _, name, _, _ in slots]


def remove(model: nn.Module) -> list[str]:
    """Put back every timm Attention that :func:`apply` replaced in ``model``.

    Returns the names restored ([] for a model that is not patched).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"remove: model must be a torch.nn.Module, got {type(model).__name__}")
    return _restore(model, lambda module: True)
