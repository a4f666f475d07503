"""Sample inputs of lora_linear / routed_lora_linear and their independent float64 reference.

One list of samples per op, shared by the correctness, gradient, opcheck and compile tests.
The reference is the formula written out per token, ``x Wᵀ + b + scaling · (x Aₑᵀ) Bₑᵀ`` with
e = route[token] (no adapter for -1), each adapter applied to its own tokens only: it shares
no code with fastvl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from fastvl.ops import lora_linear, routed_lora_linear
from fastvl.testing import random_tensor
from tests.conftest import DEVICE

NAMES = ("x", "weight", "bias", "lora_a", "lora_b")


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def lora_params(lead, in_f, out_f, rank, num_adapters, seed):
    """float64 (x (*lead, in), weight (out, in), bias (out,), lora_a ([E,] r, in), lora_b
    ([E,] out, r)), scaled so outputs are O(1); plain when ``num_adapters`` is None."""
    g = generator(seed)
    adapters = () if num_adapters is None else (num_adapters,)

    def rand(*shape, fan=1):
        return random_tensor(*shape, dtype=torch.float64, device=DEVICE, generator=g) / max(
            fan, 1) ** 0.5

    return (rand(*lead, in_f), rand(out_f, in_f, fan=in_f), rand(out_f),
            rand(*adapters, rank, in_f, fan=in_f), rand(*adapters, out_f, rank, fan=rank))


def lora_reference(x, weight, bias, lora_a, lora_b, scaling, route=None, lora_input=None):
    """The float64 formula: x (..., in), weight (out, in), bias (out,) or None, plain lora_a
    (r, in), lora_b (out, r) (route None) or routed lora_a (E, r, in), lora_b (E, out, r),
    scaling float or (E,), route broadcastable to x.shape[:-1] -> (..., out).
    ``lora_input``: the LoRA branch's input (e.g. x after a dropout mask), default x."""
    tokens, in_f, out_f = x.shape[:-1], x.shape[-1], weight.shape[0]
    rows = x.reshape(math.prod(tokens), in_f)
    lora_rows = rows if lora_input is None else lora_input.reshape(rows.shape)
    out = rows @ weight.t()
    if bias is not None:
        out = out + bias
    if route is None:
        out = out + scaling * (lora_rows @ lora_a.t()) @ lora_b.t()
    else:
        route = route.expand(tokens).reshape(-1)
        for e in range(lora_a.shape[0]):
            mine = (route == e).nonzero()[:, 0]
            scale = scaling[e].double() if isinstance(scaling, torch.Tensor) else scaling
            out = out.index_add(0, mine, scale * (lora_rows[mine] @ lora_a[e].t()) @ lora_b[e].t())
    return out.view(*tokens, out_f)


@dataclass
class LoRASample:
    """One call: float64 ``tensors`` (x, weight, bias, lora_a, lora_b), ``scaling``, and for
    the routed op ``route`` (else None)."""

    name: str
    tensors: tuple
    scaling: Union[float, torch.Tensor]
    route: Optional[torch.Tensor] = None

    @property
    def routed(self) -> bool:
        return self.route is not None

    def call(self, *tensors, backend: str = "auto", **kwargs) -> torch.Tensor:
        """The op on ``tensors`` (default: the sample's own) with the sample's other args."""
        tensors = tensors or self.tensors
        if self.routed:
            return routed_lora_linear(*tensors, self.scaling, self.route, backend=backend,
                                      **kwargs)
        return lora_linear(*tensors, self.scaling, backend=backend, **kwargs)

    def reference(self, *tensors) -> torch.Tensor:
        return lora_reference(*(tensors or self.tensors), self.scaling, self.route)


def route_values(kind, lead, num_adapters, seed):
    """int64 route of shape ``lead``: "mixed" (-1 rows, adapters [0, E - 1): the last one
    unused), "one_adapter" (all 1) or "none" (all -1)."""
    if kind == "mixed":
        return torch.randint(-1, num_adapters - 1, lead, generator=generator(seed),
                             device=DEVICE)
    return torch.full(lead, {"one_adapter": 1, "none": -1}[kind], device=DEVICE)


def plain_samples() -> list[LoRASample]:
    """Shapes with non-multiples of the 16-wide interpreter blocks (r = 20 spans the rank
    padding), one without bias, and degenerate sizes (N, in, out or r = 0)."""
    cases = [  # (name, lead, in, out, r, bias)
        ("2x19_40to33_r8", (2, 19), 40, 33, 8, True),
        ("37_24to50_r20", (37,), 24, 50, 20, True),
        ("1_16to16_r1_nobias", (1,), 16, 16, 1, False),
        ("in0", (2, 3), 0, 6, 4, True),
        ("out0", (5,), 8, 0, 4, True),
        ("r0", (5,), 8, 6, 0, True),
        ("n0", (0, 3), 8, 6, 4, True),
    ]
    samples = []
    for seed, (name, lead, in_f, out_f, rank, bias) in enumerate(cases):
        x, weight, b, lora_a, lora_b = lora_params(lead, in_f, out_f, rank, None, seed)
        samples.append(LoRASample(name, (x, weight, b if bias else None, lora_a, lora_b), 0.8))
    return samples


def routed_samples() -> list[LoRASample]:
    """Routes with -1 rows and an unused adapter, one adapter for all, none, one adapter per
    sequence ((B, 1) broadcast), per-adapter (E,) and float scalings, and degenerate sizes
    (E = 0, in = 0, r = 0)."""
    scales = torch.tensor([0.5, 2.0, 1.0], device=DEVICE)
    samples = []
    for seed, kind in enumerate(("mixed", "one_adapter", "none")):
        params = lora_params((3, 13), 40, 33, 8, 3, 10 + seed)
        samples.append(LoRASample(kind, params, scales,
                                  route_values(kind, (3, 13), 3, 20 + seed)))
    samples.append(LoRASample("per_sequence", lora_params((3, 10), 24, 18, 4, 5, 13), 1.5,
                              torch.tensor([[4], [-1], [1]], device=DEVICE)))
    for name, lead, in_f, out_f, rank, num_adapters in [
        ("e0", (2, 5), 8, 6, 4, 0), ("routed_in0", (2, 5), 0, 6, 4, 2),
        ("routed_r0", (7,), 8, 6, 0, 2),
    ]:
        params = lora_params(lead, in_f, out_f, rank, num_adapters, 14)
        route = (torch.full(lead, -1, device=DEVICE) if num_adapters == 0
                 else route_values("mixed", lead, num_adapters + 1, 24))
        samples.append(LoRASample(name, params, 1.5, route))
    return samples
