"""LoRA modules whose forward runs on :func:`fastvl.ops.lora_linear` / ``routed_lora_linear``.

:class:`LoRALinear` wraps an ``nn.Linear`` (the same object, not a copy) with one low-rank
adapter, ``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``. Its submodules are laid out like one
adapter of a peft ``lora.Linear``, so its state dict *is* peft's for that layer::

    base_layer.weight, base_layer.bias          (the wrapped nn.Linear)
    lora_A.<adapter_name>.weight   (r, in)      lora_B.<adapter_name>.weight   (out, r)

``adapter_name`` defaults to peft's ``"default"``; pick the peft adapter's name to load its
checkpoint (``load_state_dict`` works both ways with ``strict=True``).

:class:`RoutedLoRALinear` holds E adapters stacked, ``lora_A`` (E, r, in) and ``lora_B``
(E, out, r); each token uses the adapter its ``route`` entry names (-1: none). The route is
the forward's ``route`` argument or, inside a model whose forward cannot pass it down (Hugging
Face models), the tensor set by the :func:`lora_route` context manager for the whole call.
:meth:`RoutedLoRALinear.to_peft_state_dict` / ``load_peft_state_dict`` convert to and from the
state dict of a peft layer holding the E adapters under E names.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from fastvl.ops.lora import lora_linear, routed_lora_linear
from fastvl.ops.registry import check_op_backend

__all__ = [
    "LoRALinear", "RoutedLoRALinear", "lora_route", "active_route_block", "entered_route_block",
    "RouteBlock", "check_lora_backend",
]


def check_lora_backend(what: str, backend) -> str:
    """``backend`` if ``"auto"`` or an implementation of the LoRA ops, else ValueError."""
    return check_op_backend(what, backend, "lora_linear", "routed_lora_linear")


class RouteBlock:
    """The state of one :func:`lora_route` block: its ``route`` and the adapter counts E its
    values are known to fit ([-1, E)), so that each E is range-checked (one host sync) once
    per block, not once per layer."""

    def __init__(self, route: torch.Tensor, checked: Iterable[int] = ()):
        self.route, self.checked = route, set(checked)


# The block around the RoutedLoRALinear modules called inside `lora_route`, per thread: an
# attribute of a threading.local, which torch.compile traces (a ContextVar it cannot set).
_ACTIVE_ROUTE = threading.local()


@contextlib.contextmanager
def lora_route(route: torch.Tensor, *, num_adapters: Optional[int] = None
               ) -> Iterator[torch.Tensor]:
    """Route every :class:`RoutedLoRALinear` called (without a ``route`` argument) in the block.

    ``route``: int64 of the token shape ``x.shape[:-1]`` each module sees, entries in [-1, E);
    size-1 dims broadcast, so ``(B, 1)`` gives each sequence of a batch its adapter for the
    prefill and every decode step of ``generate`` alike (multi-adapter serving).
    The modules range-check it once per block and number of adapters (the first call: one
    host sync), not at every layer; ``num_adapters=E`` says its values are known to lie in
    [-1, E) (e.g. built from a mask), so modules with E adapters skip even that.
    Blocks nest; the innermost wins and the outer route is back on exit. The block is per
    thread (not per asyncio task), and may be entered outside or inside a function compiled
    with ``torch.compile`` (``fullgraph=True`` included).
    """
    if not isinstance(route, torch.Tensor):
        raise TypeError(f"lora_route: route must be a torch.Tensor, got {type(route).__name__}")
    with entered_route_block(RouteBlock(route, () if num_adapters is None else (num_adapters,))):
        yield route


@contextlib.contextmanager
def entered_route_block(block: RouteBlock) -> Iterator[RouteBlock]:
    """Make ``block`` (e.g. one saved by :func:`active_route_block`) the active one."""
    outer = active_route_block()
    _ACTIVE_ROUTE.block = block
    try:
        yield block
    finally:
        _ACTIVE_ROUTE.block = outer


def active_route_block() -> Optional[RouteBlock]:
    """The innermost :func:`lora_route` block around this call in this thread, or None."""
    return getattr(_ACTIVE_ROUTE, "block", None)


def _check_args(cls: str, base, r, alpha, dropout, backend, alpha_name="alpha") -> None:
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{cls}: base must be a torch.nn.Linear, got {type(base).__name__}")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{cls}: r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise TypeError(f"{cls}: {alpha_name} must be a finite int or float, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{cls}: dropout must be a float in [0, 1), got {dropout!r}")
    check_lora_backend(cls, backend)


def _check_adapter_name(cls: str, adapter_name) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(
            f"{cls}: adapter_name must be a non-empty str without '.', got {adapter_name!r}"
        )


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """peft's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _init_lora_(lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """peft's default init, per adapter: A kaiming-uniform(a=√5) over ``in``, B zeros."""
    with torch.no_grad():
        for a in lora_a.view(-1, *lora_a.shape[-2:]):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        lora_b.zero_()


class LoRALinear(nn.Module):
    """``base`` (nn.Linear, kept as ``base_layer``) plus one rank-``r`` adapter.

    Args:
        base: the wrapped layer; its parameters are used as they are (not copied).
        r: rank. alpha: ``scaling = alpha / r`` (``alpha / sqrt(r)`` if ``use_rslora``).
        dropout: dropout probability on the LoRA branch's input, in training mode only.
        adapter_name: the key under ``lora_A`` / ``lora_B`` (peft's adapter name).
        backend: of :func:`fastvl.ops.lora_linear`.

    Forward: x (..., in) -> (..., out). After :meth:`merge` it is ``base`` alone.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_name: str = "default",
        backend: str = "auto",
    ):
        super().__init__()
        _check_args("LoRALinear", base, r, alpha, dropout, backend)
        _check_adapter_name("LoRALinear", adapter_name)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        lora_a = nn.Linear(base.in_features, r, bias=False, **factory)
        lora_b = nn.Linear(r, base.out_features, bias=False, **factory)
        _init_lora_(lora_a.weight, lora_b.weight)
        self._attach(base, lora_a, lora_b, lora_scaling(r, alpha, use_rslora), dropout,
                     adapter_name, backend)

    def _attach(self, base, lora_a, lora_b, scaling, dropout, adapter_name, backend) -> None:
        self.base_layer = base
        self.lora_A = nn.ModuleDict({adapter_name: lora_a})
        self.lora_B = nn.ModuleDict({adapter_name: lora_b})
        self.adapter_name, self.r, self.scaling = adapter_name, lora_a.out_features, float(scaling)
        self.dropout, self.backend, self.merged = float(dropout), backend, False

    @classmethod
    def sharing(
        cls,
        base: nn.Linear,
        lora_a: nn.Linear,
        lora_b: nn.Linear,
        scaling: float,
        *,
        dropout: float = 0.0,
        adapter_name: str = "default",
        backend: str = "auto",
    ) -> "LoRALinear":
        """A LoRALinear around existing modules (no copies): ``lora_a`` (in -> r) and
        ``lora_b`` (r -> out) bias-free nn.Linear, e.g. one adapter of a peft layer."""
        if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)):
            raise TypeError("LoRALinear.sharing: lora_a and lora_b must be torch.nn.Linear")
        r = lora_a.out_features
        _check_args("LoRALinear.sharing", base, r, scaling, dropout, backend, "scaling")
        _check_adapter_name("LoRALinear.sharing", adapter_name)
        if lora_a.bias is not None or lora_b.bias is not None:
            raise ValueError("LoRALinear.sharing: lora_a and lora_b must have no bias")
        if (lora_a.in_features, lora_b.in_features, lora_b.out_features) != (
            base.in_features, r, base.out_features
        ):
            raise ValueError(
                f"LoRALinear.sharing: expected lora_a {base.in_features} -> r and lora_b r -> "
                f"{base.out_features}, got lora_a {lora_a.in_features} -> {r} and lora_b "
                f"{lora_b.in_features} -> {lora_b.out_features}"
            )
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._attach(base, lora_a, lora_b, scaling, dropout, adapter_name, backend)
        return module

    @property
    def weight_a(self) -> nn.Parameter:
        """A, (r, in)."""
        return self.lora_A[self.adapter_name].weight

    @property
    def weight_b(self) -> nn.Parameter:
        """B, (out, r)."""
        return self.lora_B[self.adapter_name].weight

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` (out, in), computed in float32 at least, in the base's dtype."""
        compute = torch.promote_types(self.weight_b.dtype, torch.float32)
        delta = (self.weight_b.to(compute) @ self.weight_a.to(compute)) * self.scaling
        return delta.to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: ``W += scaling · B A``; forward = base only."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: the adapter is already merged")
        self.base_layer.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W -= scaling · B A`` (exact up to rounding of W's dtype)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: the adapter is not merged")
        self.base_layer.weight -= self.delta_weight()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer  # (each submodule / parameter lookup is a Python call)
        if self.merged:
            return base(x)
        name = self.adapter_name
        return lora_linear(
            x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
            self.scaling, dropout_p=self.dropout if self.training else 0.0, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"adapter_name={self.adapter_name!r}, r={self.r}, scaling={self.scaling:g}, "
                f"dropout={self.dropout:g}, backend={self.backend!r}, merged={self.merged}")


class RoutedLoRALinear(nn.Module):
    """``base`` (nn.Linear, kept as ``base_layer``) plus ``num_adapters`` rank-``r`` adapters,
    one per token as ``route`` says.

    Parameters: ``lora_A`` (E, r, in), ``lora_B`` (E, out, r), each adapter initialised like
    peft's; ``scaling = alpha / r`` (``alpha / sqrt(r)`` if ``use_rslora``) for all of them.

    Forward: x (..., in), route (x.shape[:-1], or broadcastable from size-1 dims such as
    (B, 1) per sequence) int64 in [-1, E) (-1: base only) -> (..., out).
    Without ``route``, the one set by :func:`lora_route` is used (range-checked once per block
    and adapter count; an explicit ``route`` at every call).
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        num_adapters: int,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        _check_args("RoutedLoRALinear", base, r, alpha, dropout, backend)
        if isinstance(num_adapters, bool) or not isinstance(num_adapters, int) or num_adapters <= 0:
            raise ValueError(
                f"RoutedLoRALinear: num_adapters must be a positive int, got {num_adapters!r}"
            )
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        lora_a = torch.empty(num_adapters, r, base.in_features, **factory)
        lora_b = torch.empty(num_adapters, base.out_features, r, **factory)
        _init_lora_(lora_a, lora_b)
        self._attach(base, lora_a, lora_b, lora_scaling(r, alpha, use_rslora), dropout, backend)

    def _attach(self, base, lora_a, lora_b, scaling, dropout, backend) -> None:
        self.base_layer = base
        self.lora_A, self.lora_B = nn.Parameter(lora_a), nn.Parameter(lora_b)
        self.num_adapters, self.r = lora_a.shape[:2]
        if isinstance(scaling, torch.Tensor):  # one per adapter; moves with the module
            self.register_buffer("scaling", scaling, persistent=False)
        else:
            self.scaling = float(scaling)
        self.dropout, self.backend = float(dropout), backend

    @classmethod
    def stacked(
        cls,
        base: nn.Linear,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float | Sequence[float],
        *,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> "RoutedLoRALinear":
        """A RoutedLoRALinear with the given adapters (the tensors become its parameters):
        ``lora_a`` (E, r, in), ``lora_b`` (E, out, r) in the base's dtype and device, and
        ``scaling`` one float for all or E floats (e.g. adapters trained with different
        alpha / r; kept as a float32 (E,) buffer outside the state dict)."""
        name = "RoutedLoRALinear.stacked"
        if not isinstance(lora_a, torch.Tensor) or not isinstance(lora_b, torch.Tensor):
            raise TypeError(f"{name}: lora_a and lora_b must be tensors")
        if lora_a.dim() != 3 or lora_b.dim() != 3:
            raise ValueError(f"{name}: lora_a must be (E, r, in) and lora_b (E, out, r), got "
                             f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
        num_adapters, r, _ = lora_a.shape
        _check_args(name, base, r, 1.0, dropout, backend)
        expected_b = (num_adapters, base.out_features, r)
        if lora_a.shape[2] != base.in_features or tuple(lora_b.shape) != expected_b:
            raise ValueError(
                f"{name}: expected lora_a (E, r, {base.in_features}) and lora_b {expected_b}, "
                f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
            )
        for tensor_name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if t.dtype != base.weight.dtype or t.device != base.weight.device:
                raise ValueError(f"{name}: {tensor_name} must be {base.weight.dtype} on "
                                 f"{base.weight.device} like the base weight, got {t.dtype} "
                                 f"on {t.device}")
        if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
            values = [float(v) for v in scaling]
            if len(values) != num_adapters:
                raise ValueError(f"{name}: scaling must be one float or E = {num_adapters}, "
                                 f"got {len(values)}")
            scaling = torch.tensor(values, dtype=torch.float32, device=base.weight.device)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._attach(base, lora_a, lora_b, scaling, dropout, backend)
        return module

    def forward(self, x: torch.Tensor, route: Optional[torch.Tensor] = None) -> torch.Tensor:
        block = None
        if route is None:
            block = active_route_block()
            if block is None:
                raise ValueError(
                    "RoutedLoRALinear: no route; pass route= or call the model inside "
                    "`with fastvl.nn.lora_route(route):`"
                )
            route = block.route
        check = block is None or (
            self.num_adapters not in block.checked and not torch.compiler.is_compiling()
        )
        base = self.base_layer
        out = routed_lora_linear(
            x, base.weight, base.bias, self.lora_A, self.lora_B,
            self.scaling, route, dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend, check_route=check,
        )
        if block is not None and check:
            block.checked.add(self.num_adapters)
        return out

    def _check_names(self, adapter_names: Sequence[str], caller: str) -> list[str]:
        names = list(adapter_names)
        if len(names) != self.num_adapters or len(set(names)) != len(names) or not all(
            isinstance(n, str) and n and "." not in n for n in names
        ):
            raise ValueError(
                f"RoutedLoRALinear.{caller}: adapter_names must be {self.num_adapters} distinct "
                f"non-empty str without '.', got {names!r}"
            )
        return names

    def to_peft_state_dict(self, adapter_names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The state dict of a peft ``lora.Linear`` holding adapter i as ``adapter_names[i]``
        (detached views of this module's tensors)."""
        names = self._check_names(adapter_names, "to_peft_state_dict")
        state = {f"base_layer.{k}": v for k, v in self.base_layer.state_dict().items()}
        for index, name in enumerate(names):
            state[f"lora_A.{name}.weight"] = self.lora_A.detach()[index]
            state[f"lora_B.{name}.weight"] = self.lora_B.detach()[index]
        return state

    @torch.no_grad()
    def load_peft_state_dict(self, state_dict: dict, adapter_names: Sequence[str]) -> None:
        """Copy a peft ``lora.Linear`` state dict in: its adapter ``adapter_names[i]`` becomes
        adapter i; ``base_layer.*`` entries, if present, go to the base. Other keys: ValueError."""
        names = self._check_names(adapter_names, "load_peft_state_dict")
        expected = {f"lora_{ab}.{n}.weight" for n in names for ab in "AB"}
        missing = sorted(expected - state_dict.keys())
        unexpected = sorted(
            k for k in state_dict if k not in expected and not k.startswith("base_layer.")
        )
        if missing or unexpected:
            raise ValueError(
                f"RoutedLoRALinear.load_peft_state_dict: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        base_state = {k.removeprefix("base_layer."): v for k, v in state_dict.items()
                      if k.startswith("base_layer.")}
        if base_state:
            self.base_layer.load_state_dict(base_state)
        for index, name in enumerate(names):
            self.lora_A[index].copy_(state_dict[f"lora_A.{name}.weight"])
            self.lora_B[index].copy_(state_dict[f"lora_B.{name}.weight"])

    def extra_repr(self) -> str:
        scaling = (f"{self.scaling:g}" if isinstance(self.scaling, float)
                   else str([round(v, 6) for v in self.scaling.tolist()]))
        return (f"num_adapters={self.num_adapters}, r={self.r}, scaling={scaling}, "
                f"dropout={self.dropout:g}, backend={self.backend!r}")
