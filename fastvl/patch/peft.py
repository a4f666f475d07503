"""Run peft LoRA layers on fastvl's kernels: ``accelerate(model)`` swaps their compute.

Every ``peft.tuners.lora.layer.Linear`` of ``model`` on a plain ``nn.Linear`` keeps its place,
its adapters and its state dict; only its ``forward`` is replaced on the instance. Each call
reads the layer's state: with one active adapter that is plain LoRA (no DoRA or other LoRA
variant, no ``lora_bias``, dropout off or ``nn.Dropout``, adapter weights and input in the base
weight's dtype), not merged, adapters enabled, no hooks on the base layer, no extra arguments
(``adapter_names=``) and no autocast, it runs :func:`fastvl.ops.lora_linear` on the layer's own
parameters; in every other state it runs peft's forward. So peft's API works as without fastvl
(``set_adapter``, ``disable_adapter()``, ``merge_adapter`` / ``merge_and_unload``,
``add_adapter`` / ``delete_adapter``, ``save_pretrained``, ``requires_grad``); layers peft
creates later (``add_adapter`` on new target modules) run peft's forward until ``restore`` and
``accelerate`` again. The outputs and gradients equal peft's; dropout draws its own mask (same
distribution, not the same random numbers). :func:`restore` (or ``report.remove()``) puts
peft's forward back.

``serve_adapters(model, ["a", "b", ...])`` is for multi-adapter inference (peft's
mixed-batch ``adapter_names=``): every peft LoRA linear layer holding any of those adapters
becomes one :class:`fastvl.nn.RoutedLoRALinear` with the adapters stacked (copies; ranks
zero-padded to the largest, per-adapter scaling; an adapter absent from a layer is zero
there), and each sequence picks its adapter through the route::

    patch = fastvl.patch.peft.serve_adapters(model, ["math", "code"])
    with fastvl.nn.lora_route(patch.route(["code", "__base__", "math"])):   # (B, 1)
        out = model.generate(input_ids, max_new_tokens=32)

peft's per-layer machinery does not reach the routed modules: call :func:`restore` before
changing adapters, and ``with peft_layers(model):`` for peft functions that find adapters by
module type (``save_pretrained``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Optional

import torch

from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from fastvl.nn.lora import RoutedLoRALinear, check_lora_backend
from fastvl.ops.lora import lora_linear
from fastvl.patch._modules import marked_slots, patched_names, swap_back, swap_children

__all__ = [
    "accelerate", "serve_adapters", "restore", "peft_layers", "PeftPatch", "ServingPatch",
    "Skipped", "BASE_ADAPTER",
]

# peft's adapter name for "no adapter" in mixed-batch inference; a route of -1 here.
BASE_ADAPTER = "__base__"

# Set (outside the module registry, so not in state_dict) on each module serve_adapters() made.
_ORIGINAL = "_fastvl_peft_original"
# Set on each peft layer accelerate() patched: the backend of its fastvl forward.
_BACKEND = "_fastvl_peft_backend"


class Skipped(NamedTuple):
    """A peft LoRA layer not run by fastvl: where, its class, and why."""

    name: str
    cls: str
    reason: str


@dataclass
class PeftPatch:
    """What :func:`accelerate` did to ``model``: ``replaced`` names the layers fastvl runs and
    ``skipped`` those peft runs, with the reason, in their state at the call (an accelerated
    layer switches between the two as its state changes)."""

    model: nn.Module = field(repr=False)
    backend: str
    replaced: list[str]
    skipped: list[Skipped]
    _modules: tuple[nn.Module, ...] = field(repr=False, default=())

    def remove(self) -> list[str]:
        """Undo this call on the layers it changed (their names; [] once done)."""
        mine = {id(module) for module in self._modules}
        return _restore(self.model, lambda module: id(module) in mine)

    def __str__(self) -> str:
        lines = [f"fastvl.patch.peft: {len(self.replaced)} LoRA layers on backend "
                 f"{self.backend!r}, {len(self.skipped)} skipped"]
        lines += [f"  replaced {name}" for name in self.replaced]
        lines += [f"  skipped {s.name} ({s.cls}): {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def _skipped(name: str, layer: nn.Module, reason: str) -> Skipped:
    return Skipped(name, f"{type(layer).__module__}.{type(layer).__qualname__}", reason)


def _dropout_p(module: nn.Module) -> Optional[float]:
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return module.p
    return None


def _layer_reason(layer: LoraLayer) -> Optional[str]:
    """Why fastvl cannot stand in for ``layer`` whatever its adapters, or None."""
    if type(layer) is not PeftLoraLinear:
        return ("not a peft lora.Linear (embedding, conv, quantized or subclassed layers keep "
                "peft's forward)")
    base = layer.base_layer
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return f"base layer is {type(base).__name__}, not a torch.nn.Linear"
    if "forward" in layer.__dict__:
        return "its forward is already replaced on the instance (by another patch)"
    return None


def _merged_reason(layer: LoraLayer) -> Optional[str]:
    if layer.merged:
        return f"adapters {layer.merged_adapters} are merged into the base weight"
    return None


def _adapter_reason(layer: PeftLoraLinear, name: str) -> Optional[str]:
    """Why adapter ``name`` of ``layer`` is not plain LoRA in the base's dtype, or None."""
    if layer.use_dora.get(name, False):
        return f"adapter {name!r} uses DoRA"
    if name in layer.lora_variant:
        return f"adapter {name!r} is a LoRA variant ({type(layer.lora_variant[name]).__name__})"
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        return f"adapter {name!r} has lora_A / lora_B modules that are not plain nn.Linear"
    if lora_a.bias is not None or lora_b.bias is not None:
        return f"adapter {name!r} has a bias on lora_A / lora_B (lora_bias=True)"
    if not lora_a.weight.dtype == lora_b.weight.dtype == layer.base_layer.weight.dtype:
        return (f"adapter {name!r} weights are {lora_a.weight.dtype} and the base weight "
                f"{layer.base_layer.weight.dtype}; fastvl needs one dtype (pass "
                "autocast_adapter_dtype=False to get_peft_model to keep adapters in the base's "
                "dtype)")
    return None


def _plain_adapter(layer: PeftLoraLinear) -> tuple[Optional[str], Optional[str]]:
    """(the adapter fastvl computes ``layer`` with in its current state, None), or
    (None, why peft's forward runs)."""
    if layer.disable_adapters:
        return None, "adapters are disabled on this layer"
    reason = _merged_reason(layer)
    if reason is not None:
        return None, reason
    base = layer.base_layer
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        return None, ("the base layer has forward hooks or its own forward (peft's forward "
                      "calls it)")
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None, (f"{len(active)} active adapters on this layer ({active}); fastvl serves "
                      "exactly one")
    (name,) = active
    reason = _adapter_reason(layer, name)
    if reason is None and _dropout_p(layer.lora_dropout[name]) is None:
        reason = f"adapter {name!r} has dropout module {type(layer.lora_dropout[name]).__name__}"
    return (name, None) if reason is None else (None, reason)


def _forward(layer: PeftLoraLinear, backend: str, x: torch.Tensor, *args, **kwargs):
    """An accelerated layer's forward: fastvl's op where the layer's state allows, else peft's."""
    base = layer.base_layer
    name = None
    if not (args or kwargs or x.dtype != base.weight.dtype
            or torch.is_autocast_enabled(x.device.type)):
        name, _ = _plain_adapter(layer)
    if name is None:
        return PeftLoraLinear.forward(layer, x, *args, **kwargs)
    dropout = layer.lora_dropout[name]
    return lora_linear(
        x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
        layer.scaling[name], dropout_p=_dropout_p(dropout) if dropout.training else 0.0,
        backend=backend,
    )


def accelerate(model: nn.Module, *, backend: str = "auto") -> PeftPatch:
    """Run ``model``'s peft LoRA linear layers on :func:`fastvl.ops.lora_linear` where they can.

    ``model``: a ``PeftModel`` or any module holding peft LoRA layers; each peft ``lora.Linear``
    on a plain ``nn.Linear`` gets fastvl's forward on the instance (see the module docstring).
    Returns the :class:`PeftPatch` report (``replaced`` names, ``skipped`` with reasons).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: unknown ``backend``; ``model`` is itself a peft LoRA layer (use
            :meth:`fastvl.nn.LoRALinear.sharing`); ``model`` is already accelerated.
    """
    _check_model("accelerate", model, backend)
    replaced, skipped, layers = [], [], []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        reason = _layer_reason(layer)
        if reason is None:
            layer.forward = functools.partial(_forward, layer, backend)
            setattr(layer, _BACKEND, backend)
            layers.append(layer)
            _, reason = _plain_adapter(layer)
        if reason is None:
            replaced.append(name)
        else:
            skipped.append(_skipped(name, layer, reason))
    return PeftPatch(model, backend, replaced, skipped, tuple(layers))


def _check_model(op: str, model, backend: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    check_lora_backend(op, backend)
    if isinstance(model, LoraLayer):
        raise ValueError(
            f"{op}: model is itself a peft LoRA layer and cannot be replaced in place; use "
            "fastvl.nn.LoRALinear.sharing(...) or RoutedLoRALinear.stacked(...) instead"
        )
    patched = patched_names(model, _BACKEND) + patched_names(model, _ORIGINAL)
    if patched:
        raise ValueError(
            f"{op}: model is already accelerated or serving ({len(patched)} layers, e.g. "
            f"{patched[0]!r}); call fastvl.patch.peft.restore(model) first"
        )


@dataclass
class ServingPatch(PeftPatch):
    """What :func:`serve_adapters` did; adapter i of every routed layer is
    ``adapter_names[i]``. :meth:`route` makes the route of a batch."""

    adapter_names: tuple[str, ...] = ()

    def route(self, names: Sequence[Optional[str]]) -> torch.Tensor:
        """(B, 1) int64 on the model's device: sequence b uses adapter ``names[b]``
        (``"__base__"`` or None: the base model). For :func:`fastvl.nn.lora_route`."""
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise TypeError(f"ServingPatch.route: names must be a sequence of adapter names, "
                            f"got {names!r}")
        index = {name: i for i, name in enumerate(self.adapter_names)}
        unknown = [n for n in names if n is not None and n != BASE_ADAPTER and n not in index]
        if unknown:
            raise ValueError(f"ServingPatch.route: unknown adapters {unknown}; served: "
                             f"{list(self.adapter_names)} (or {BASE_ADAPTER!r} for none)")
        device = self._modules[0].lora_A.device if self._modules else None
        values = [index.get(n, -1) if n is not None else -1 for n in names]
        return torch.tensor(values, dtype=torch.int64, device=device)[:, None]


def _stacked_layer(layer: PeftLoraLinear, names: tuple[str, ...], backend: str):
    """A RoutedLoRALinear holding copies of ``layer``'s adapters ``names`` (zeros for those
    it lacks), ranks zero-padded to the largest."""
    base = layer.base_layer
    present = [name for name in names if name in layer.lora_A]
    rank = max(layer.r[name] for name in present)
    factory = dict(dtype=base.weight.dtype, device=base.weight.device)
    lora_a = torch.zeros(len(names), rank, base.in_features, **factory)
    lora_b = torch.zeros(len(names), base.out_features, rank, **factory)
    scaling = [float(layer.scaling[name]) if name in present else 1.0 for name in names]
    with torch.no_grad():
        for index, name in enumerate(names):
            if name in present:
                r = layer.r[name]
                lora_a[index, :r] = layer.lora_A[name].weight
                lora_b[index, :, :r] = layer.lora_B[name].weight
    module = RoutedLoRALinear.stacked(base, lora_a, lora_b, scaling, backend=backend)
    module.lora_A.requires_grad_(False)
    module.lora_B.requires_grad_(False)
    return module.train(layer.training)


def serve_adapters(model: nn.Module, adapter_names: Sequence[str], *,
                   backend: str = "auto") -> ServingPatch:
    """Serve several peft LoRA adapters in one batch, one adapter per sequence (inference).

    Every peft ``lora.Linear`` of ``model`` that holds any of ``adapter_names`` (plain LoRA:
    no DoRA or other variant, not merged, adapter weights in the base's dtype) becomes a
    :class:`fastvl.nn.RoutedLoRALinear` whose adapter i is ``adapter_names[i]`` (copied:
    training it does not update peft's weights; dropout off). Others are listed in
    ``skipped`` with the reason. Run the model inside
    ``fastvl.nn.lora_route(patch.route(names_per_sequence))``; the outputs equal peft's
    ``model(..., adapter_names=names_per_sequence)``. :meth:`ServingPatch.remove` or
    :func:`restore` puts the peft layers back.

    Raises:
        TypeError / ValueError: as :func:`accelerate`; ``adapter_names`` empty, repeated, or
            naming an adapter no layer of ``model`` holds.
    """
    op = "serve_adapters"
    _check_model(op, model, backend)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"{op}: adapter_names must be a sequence of str, got {adapter_names!r}")
    names = tuple(adapter_names)
    if not names or len(set(names)) != len(names) or BASE_ADAPTER in names:
        raise ValueError(f"{op}: adapter_names must be distinct adapter names (not "
                         f"{BASE_ADAPTER!r}), at least one, got {names!r}")
    held = {name for module in model.modules() if isinstance(module, LoraLayer)
            for name in module.lora_A}
    missing = [name for name in names if name not in held]
    if missing:
        raise ValueError(f"{op}: no LoRA layer of the model holds adapters {missing} "
                         f"(adapters found: {sorted(held)})")

    def replacement_for(child):
        if not isinstance(child, LoraLayer):
            return None
        reason = _layer_reason(child) or _merged_reason(child)
        present = [name for name in names if name in child.lora_A] if reason is None else []
        if reason is None and not present:
            reason = (f"holds none of {list(names)} (peft's forward, with its own active "
                      "adapters, still runs here)")
        if reason is None:
            reasons = (_adapter_reason(child, name) for name in present)
            reason = next((r for r in reasons if r is not None), None)
        if reason is not None:
            return reason
        return lambda: _stacked_layer(child, names, backend)

    replaced, skipped, modules = swap_children(model, _ORIGINAL, replacement_for)
    skipped = [_skipped(name, child, reason) for name, child, reason in skipped]
    return ServingPatch(model, backend, replaced, skipped, modules, adapter_names=names)


def _swap_back_served(model: nn.Module, selected: Callable[[nn.Module], bool]) -> list:
    """Put the peft layers back in place of the selected modules serve_adapters made; the
    swaps done, as :func:`fastvl.patch._modules.marked_slots`."""
    slots = marked_slots(model, _ORIGINAL, selected)
    for _, _, _, fast, original in slots:
        original.train(fast.training)
    swap_back(slots, _ORIGINAL)
    return slots


def _restore(model: nn.Module, selected: Callable[[nn.Module], bool]) -> list[str]:
    """Undo accelerate / serve_adapters on the selected modules of ``model``; their names."""
    accelerated = [(name, module) for name, module in model.named_modules()
                   if _BACKEND in module.__dict__ and selected(module)]
    for _, layer in accelerated:
        del layer.forward
        delattr(layer, _BACKEND)
    served = _swap_back_served(model, selected)
    return [name for name, _ in accelerated] + [slot[2] for slot in served]


def restore(model: nn.Module) -> list[str]:
    """Give back peft's forward to every layer :func:`accelerate` patched and put back every
    peft layer :func:`serve_adapters` replaced in ``model``; the names ([] for a model that
    is neither)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"restore: model must be a torch.nn.Module, got {type(model).__name__}")
    return _restore(model, lambda module: True)


@contextlib.contextmanager
def peft_layers(model: nn.Module) -> Iterator[list[str]]:
    """Put the peft layers :func:`serve_adapters` replaced back for the block, then the same
    fastvl modules again (accelerated layers are peft's own and stay as they are).

    For peft functions that find adapters by module type, e.g.
    ``with peft_layers(model): model.save_pretrained(path)``. Changes of adapter state in the
    block (merging, adding or switching adapters) are not carried over to served modules.
    Yields the names of the layers fastvl patched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"peft_layers: model must be a torch.nn.Module, got {type(model).__name__}")
    slots = _swap_back_served(model, lambda module: True)
    try:
        yield patched_names(model, _BACKEND) + [slot[2] for slot in slots]
    finally:
        for parent, attribute, _, fast, original in slots:
            object.__setattr__(fast, _ORIGINAL, original)
            fast.train(original.training)
            setattr(parent, attribute, fast)
