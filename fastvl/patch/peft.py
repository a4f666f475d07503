"""Run peft LoRA layers on fastvl's kernels: ``accelerate(model)`` swaps them in place.

Every ``peft.tuners.lora.layer.Linear`` whose forward is plain LoRA on an ``nn.Linear`` (one
active adapter on the layer, no DoRA or other LoRA variant, not merged, adapters enabled, no
``lora_bias``, adapter weights in the base weight's dtype) becomes a
:class:`fastvl.nn.LoRALinear` that *shares* its modules: the same ``base_layer``, the same
``lora_A[name]`` / ``lora_B[name]`` (so the same Parameter objects, seen by optimizers), the
same scaling (``use_rslora`` included) and dropout probability. State-dict keys do not change,
so ``load_state_dict`` works on the accelerated model; peft functions that find adapters by
module type (``save_pretrained``, ``get_peft_model_state_dict``) need the peft layers, which
``with peft_layers(model):`` puts back for the block. Other peft LoRA layers are left as they
are and listed in the report with the reason.

The outputs and gradients equal peft's; dropout draws its own mask (same distribution, not the
same random numbers). peft's per-layer machinery does not reach the fastvl modules: call
:func:`restore` (or ``report.remove()``) before ``merge_and_unload``, ``set_adapter``,
``disable_adapter()``, adding adapters or passing ``adapter_names`` to the forward, and
:func:`accelerate` again after.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Optional

from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from fastvl.nn.lora import LORA_BACKENDS, LoRALinear
from fastvl.patch._modules import marked_slots, patched_names, swap_back, swap_children

__all__ = ["accelerate", "restore", "peft_layers", "PeftPatch", "Skipped"]

# Set (outside the module registry, so not in state_dict) on each module accelerate() made.
_ORIGINAL = "_fastvl_peft_original"


class Skipped(NamedTuple):
    """A peft LoRA layer :func:`accelerate` left alone: where, its class, and why."""

    name: str
    cls: str
    reason: str


@dataclass
class PeftPatch:
    """What :func:`accelerate` did to ``model``: ``replaced`` names, ``skipped`` layers."""

    model: nn.Module = field(repr=False)
    backend: str
    replaced: list[str]
    skipped: list[Skipped]
    _created: tuple[LoRALinear, ...] = field(repr=False, default=())

    def remove(self) -> list[str]:
        """Put back the peft layers this call replaced (names restored; [] once done)."""
        created = {id(module) for module in self._created}
        return [slot[2] for slot in _restore(self.model, lambda module: id(module) in created)]

    def __str__(self) -> str:
        lines = [f"fastvl.patch.peft: {len(self.replaced)} LoRA layers on backend "
                 f"{self.backend!r}, {len(self.skipped)} skipped"]
        lines += [f"  replaced {name}" for name in self.replaced]
        lines += [f"  skipped {s.name} ({s.cls}): {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def _dropout_p(module: nn.Module) -> Optional[float]:
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return module.p
    return None


def _skip_reason(layer: LoraLayer) -> Optional[str]:
    """Why ``layer`` is not replaced, or None if a LoRALinear computes the same thing."""
    if type(layer) is not PeftLoraLinear:
        return ("not a peft lora.Linear (embedding, conv, quantized or subclassed layers keep "
                "peft's forward)")
    base = layer.base_layer
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return f"base layer is {type(base).__name__}, not a torch.nn.Linear"
    if layer.merged:
        return f"adapters {layer.merged_adapters} are merged into the base weight"
    if layer.disable_adapters:
        return "adapters are disabled on this layer"
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters on this layer ({active}); fastvl serves exactly one"
    (name,) = active
    if layer.use_dora.get(name, False):
        return f"adapter {name!r} uses DoRA"
    if name in layer.lora_variant:
        return f"adapter {name!r} is a LoRA variant ({type(layer.lora_variant[name]).__name__})"
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        return f"adapter {name!r} has lora_A / lora_B modules that are not plain nn.Linear"
    if lora_a.bias is not None or lora_b.bias is not None:
        return f"adapter {name!r} has a bias on lora_A / lora_B (lora_bias=True)"
    if not lora_a.weight.dtype == lora_b.weight.dtype == base.weight.dtype:
        return (f"adapter {name!r} weights are {lora_a.weight.dtype} and the base weight "
                f"{base.weight.dtype}; fastvl needs one dtype (pass autocast_adapter_dtype=False "
                "to get_peft_model to keep adapters in the base's dtype)")
    if _dropout_p(layer.lora_dropout[name]) is None:
        return f"adapter {name!r} has dropout module {type(layer.lora_dropout[name]).__name__}"
    return None


def _fastvl_layer(layer: PeftLoraLinear, backend: str) -> LoRALinear:
    (name,) = [n for n in layer.active_adapters if n in layer.lora_A]
    return LoRALinear.sharing(
        layer.base_layer, layer.lora_A[name], layer.lora_B[name], layer.scaling[name],
        dropout=_dropout_p(layer.lora_dropout[name]), adapter_name=name, backend=backend,
    )


def accelerate(model: nn.Module, *, backend: str = "auto") -> PeftPatch:
    """Swap :class:`fastvl.nn.LoRALinear` in for ``model``'s plain peft LoRA linear layers.

    ``model``: a ``PeftModel`` or any module holding peft LoRA layers; changed in place.
    Returns the :class:`PeftPatch` report (``replaced`` names, ``skipped`` with reasons).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: unknown ``backend``; ``model`` is itself a peft LoRA layer (use
            :meth:`fastvl.nn.LoRALinear.sharing`); ``model`` is already accelerated.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in LORA_BACKENDS:
        raise ValueError(f"accelerate: backend must be one of {LORA_BACKENDS}, got {backend!r}")
    if isinstance(model, LoraLayer):
        raise ValueError(
            "accelerate: model is itself a peft LoRA layer and cannot be replaced in place; use "
            "fastvl.nn.LoRALinear.sharing(...) instead"
        )
    patched = patched_names(model, _ORIGINAL)
    if patched:
        raise ValueError(
            f"accelerate: model is already accelerated ({len(patched)} layers, e.g. "
            f"{patched[0]!r}); call fastvl.patch.peft.restore(model) first"
        )

    def replacement_for(child):
        if not isinstance(child, LoraLayer):
            return None
        reason = _skip_reason(child)
        if reason is not None:
            return reason
        return lambda: _fastvl_layer(child, backend).train(child.training)

    replaced, skipped, modules = swap_children(model, _ORIGINAL, replacement_for)
    skipped = [
        Skipped(name, f"{type(child).__module__}.{type(child).__qualname__}", reason)
        for name, child, reason in skipped
    ]
    return PeftPatch(model, backend, replaced, skipped, modules)


def _restore(model: nn.Module, selected: Callable[[LoRALinear], bool]) -> list[tuple]:
    """Swap the selected accelerated layers of ``model`` back; the swaps done, as
    (parent, attribute, name, fastvl module, peft layer)."""
    slots = marked_slots(model, _ORIGINAL, lambda m: isinstance(m, LoRALinear) and selected(m))
    merged = [name for *_, name, child, _ in slots if child.merged]
    if merged:
        raise ValueError(
            f"restore: fastvl layers {merged} are merged; call unmerge() on them first (the "
            "peft layers would not know their adapter is in the base weight)"
        )
    for _, _, _, fast, original in slots:
        original.train(fast.training)
    swap_back(slots, _ORIGINAL)
    return slots


def restore(model: nn.Module) -> list[str]:
    """Put back every peft layer :func:`accelerate` replaced in ``model``; the names restored
    ([] for a model that is not accelerated). Parameters were shared, so training done while
    accelerated is kept."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"restore: model must be a torch.nn.Module, got {type(model).__name__}")
    return [slot[2] for slot in _restore(model, lambda module: True)]


@contextlib.contextmanager
def peft_layers(model: nn.Module) -> Iterator[list[str]]:
    """Put the peft layers back for the block, then the same fastvl modules again.

    For peft functions that find adapters by module type, e.g.
    ``with peft_layers(model): model.save_pretrained(path)``. Changes of adapter state in the
    block (merging, adding or switching adapters) are not carried over. Yields the names.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"peft_layers: model must be a torch.nn.Module, got {type(model).__name__}")
    slots = _restore(model, lambda module: True)
    try:
        yield [slot[2] for slot in slots]
    finally:
        for parent, attribute, _, fast, original in slots:
            object.__setattr__(fast, _ORIGINAL, original)
            fast.train(original.training)
            setattr(parent, attribute, fast)
