"""LoRA cases (issue #6): one LoRA linear (op ``lora_linear``) and routed LoRA (op
``routed_lora_linear``), tokens 4096, hidden 4096 -> 4096, rank 16, scaling 2 (alpha 32).

``lora_linear/t4096-h4096-r16``: ``fastvl[<backend>]`` is :func:`fastvl.ops.lora_linear`;
``peft`` (the baseline) a ``peft.tuners.lora.layer.Linear`` wrapped around an ``nn.Linear``
holding the same weights; ``addmm`` the plain-PyTorch formulation ``F.linear`` +
``torch.addmm(out, x Aᵀ, Bᵀ, alpha=scaling)``; ``base linear`` the frozen linear alone (no
LoRA: its time gives the LoRA overhead, so its result is compared with nothing).
forward+backward trains the adapter: the base weight is frozen, the gradients are w.r.t. x,
A and B (x requires grad, as inside a network) for a random gradient of the output
(``base linear``: w.r.t. x only).

``routed_lora_linear/...``: fastvl runs with ``check_route=False`` (no host sync), as a model
does inside one ``lora_route`` block after its first layer. ``t4096-h4096-r16-split50``: two
adapters, the middle half of the tokens (an image) routed to adapter 0 and the rest (text) to
adapter 1; fastvl vs the PLoRA way (the baseline ``boolean indexing``: per adapter,
``x[mask]`` through the LoRA branch, added back with ``index_put``). ``routed_lora_linear/multi-adapter-decode``: a decode step,
32 tokens each routed to one of 16 adapters at random, forward only; the baseline ``bmm
gather`` gathers each token's A and B (``lora_a[route]``) and runs two batched matmuls;
``boolean indexing`` runs here too. (32 rows: ``fastvl[triton]`` takes its decode path, one
program per row and column block, see :mod:`fastvl.kernels.lora`.)

On CPU the token count is divided by 8 (the decode batch stays 32); ``--quick`` also divides
hidden and rank by 8. Results are compared by relative error per tensor,
``||a - e|| / ||e||`` (:data:`RELATIVE_TOLERANCE`): weight-gradient entries sum over every
token, so an elementwise tolerance would depend on the token count.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvl.bench.cases import (
    BACKWARD,
    FASTVL_IMPLS,
    FORWARD,
    Built,
    Scale,
    fastvl_impls,
    register_case,
    requires_module,
    with_backward,
)
from fastvl.ops import lora_linear, routed_lora_linear

TOKENS, HIDDEN, RANK, ALPHA = 4096, 4096, 16, 32
DECODE_TOKENS, DECODE_ADAPTERS = 32, 16

PEFT, ADDMM, BASE = "peft", "addmm", "base linear"
BOOLEAN_INDEXING, BMM_GATHER = "boolean indexing", "bmm gather"

RELATIVE_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}


def _relative_errors(actual, expected, rtol: float) -> Optional[str]:
    """None if every tensor of ``actual`` is within ``rtol`` relative (norm) error of the
    matching tensor of ``expected``, else what differs."""
    if isinstance(expected, torch.Tensor):
        actual, expected = (actual,), (expected,)
    if len(actual) != len(expected):
        return f"returned {len(actual)} results, the reference {len(expected)}"
    for position, (a, e) in enumerate(zip(actual, expected)):
        if a.shape != e.shape:
            return f"result {position}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
        error = (a.double() - e.double()).norm() / e.double().norm()
        if not error <= rtol:  # (also catches NaN)
            return f"result {position}: relative error {error:.3g} > {rtol:g}"
    return None


def _weights(device, dtype, generator, adapters: Optional[int], hidden: int, rank: int):
    """(weight (out, in), lora_a (r, in), lora_b (out, r)), or with ``adapters`` E the
    adapters stacked: lora_a (E, r, in), lora_b (E, out, r). B is non-zero (a trained
    adapter), so the LoRA branch contributes to the output."""
    lead = () if adapters is None else (adapters,)

    def randn(*shape, std):
        return torch.randn(*shape, generator=generator, device=device) * std

    weight = randn(hidden, hidden, std=hidden ** -0.5).to(dtype)
    lora_a = randn(*lead, rank, hidden, std=hidden ** -0.5).to(dtype)
    lora_b = randn(*lead, hidden, rank, std=rank ** -0.5).to(dtype)
    return weight, lora_a, lora_b


def _flops(tokens: int, hidden: int, rank: int, backward: bool) -> float:
    """Forward: the base matmul plus the two LoRA matmuls; backward (base frozen): dx through
    the base and the LoRA branch, and dA, dB."""
    base, lora = 2 * tokens * hidden * hidden, 2 * tokens * rank * 2 * hidden
    return base + lora + (base + 2 * lora if backward else 0)


def make_peft_linear(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                     alpha: float) -> nn.Module:
    """A ``peft.tuners.lora.layer.Linear`` (adapter "default", no dropout) around a frozen
    bias-free ``nn.Linear`` holding ``weight`` (out, in), its LoRA weights set to lora_a
    (r, in) and lora_b (out, r)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    out_features, in_features = weight.shape
    rank = lora_a.shape[0]
    base = nn.Linear(in_features, out_features, bias=False, device=weight.device,
                     dtype=weight.dtype)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0)
    layer = PeftLinear(base, "default", config, r=rank, lora_alpha=alpha)
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
    base.weight.requires_grad_(False)
    return layer


def addmm_lora_linear(x, weight, lora_a, lora_b, scaling: float) -> torch.Tensor:
    """LoRA in plain PyTorch: ``F.linear(x, W) + scaling · (x Aᵀ) Bᵀ`` with the add fused
    into ``torch.addmm``. x: (N, in) -> (N, out)."""
    return torch.addmm(F.linear(x, weight), x @ lora_a.t(), lora_b.t(), alpha=scaling)


def boolean_indexing_lora_linear(x, weight, lora_a, lora_b, scaling: float,
                                 route: torch.Tensor) -> torch.Tensor:
    """Routed LoRA the PLoRA way: the base linear on every token, then per adapter e the
    tokens of ``route == e`` selected by a boolean mask, through adapter e, added back with
    ``index_put``. x: (N, in), lora_a (E, r, in), lora_b (E, out, r), route (N,)."""
    out = F.linear(x, weight)
    for adapter in range(lora_a.shape[0]):
        mask = route == adapter
        delta = (x[mask] @ lora_a[adapter].t()) @ lora_b[adapter].t()
        out = out.index_put((mask,), delta * scaling, accumulate=True)
    return out


def bmm_gather_lora_linear(x, weight, lora_a, lora_b, scaling: float,
                           route: torch.Tensor) -> torch.Tensor:
    """Multi-adapter LoRA by gathering each token's adapter: ``lora_a[route]``
    (N, r, in) and ``lora_b[route]`` (N, out, r), then two batched matmuls. Shapes as
    :func:`boolean_indexing_lora_linear`; every route value must name an adapter."""
    shrunk = torch.bmm(lora_a[route], x[:, :, None])  # (N, r, 1)
    delta = torch.bmm(lora_b[route], shrunk)[:, :, 0]
    return F.linear(x, weight) + delta * scaling


def _inputs(device, dtype, scale: Scale, tokens: int, backward: bool, adapters=None):
    """x (tokens, hidden), the weights of :func:`_weights`, grad_out (tokens, hidden) and the
    generator (seeded); x, lora_a and lora_b require grad for ``backward``."""
    hidden, rank = scale.size(HIDDEN), scale.size(RANK)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, hidden, generator=generator, device=device).to(dtype)
    weight, lora_a, lora_b = _weights(device, dtype, generator, adapters, hidden, rank)
    grad_out = torch.randn(tokens, hidden, generator=generator, device=device).to(dtype)
    for tensor in (x, lora_a, lora_b):
        tensor.requires_grad_(backward)
    return x, weight, lora_a, lora_b, grad_out, generator


def _build_lora(device, dtype, scale: Scale, mode: str) -> Built:
    backward = mode == BACKWARD
    tokens = scale.batch(TOKENS)
    x, weight, lora_a, lora_b, grad_out, _ = _inputs(device, dtype, scale, tokens, backward)
    hidden, rank = weight.shape[0], lora_a.shape[0]
    scaling = ALPHA / RANK
    rtol = RELATIVE_TOLERANCE[dtype]
    built = Built(
        shapes={"x": [tokens, hidden], "weight": [hidden, hidden], "lora_a": [rank, hidden],
                "lora_b": [hidden, rank], "scaling": scaling},
        flops=_flops(tokens, hidden, rank, backward),
        references={BASE: None},
    )
    lora_inputs = (x, lora_a, lora_b)

    def finish(forward, inputs=lora_inputs):
        return with_backward(forward, inputs, grad_out) if backward else forward

    args = (x, weight, None, lora_a, lora_b, scaling, 0.0, None)
    fastvl_impls(
        built, "lora_linear", device, args,
        lambda backend: finish(
            lambda: lora_linear(x, weight, None, lora_a, lora_b, scaling, backend=backend)
        ),
    )
    layer = make_peft_linear(weight, lora_a.detach(), lora_b.detach(), scaling * rank)
    peft_inputs = (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    for tensor in peft_inputs[1:]:
        tensor.requires_grad_(backward)
    built.add(PEFT, finish(lambda: layer(x), peft_inputs))
    built.add(ADDMM, finish(lambda: addmm_lora_linear(x, weight, lora_a, lora_b, scaling)))
    built.add(BASE, finish(lambda: F.linear(x, weight), (x,)))
    built.compare = dict.fromkeys(
        (*FASTVL_IMPLS, ADDMM), lambda actual, expected: _relative_errors(actual, expected, rtol)
    )
    return built


def _register_lora_case() -> None:
    @register_case(
        op="lora_linear",
        name="t4096-h4096-r16",
        description=(
            f"LoRA linear, tokens {TOKENS} (/ 8 on CPU), hidden {HIDDEN} -> {HIDDEN}, r {RANK}, "
            f"alpha {ALPHA}, no bias: fastvl vs peft's lora.Linear vs F.linear + addmm vs the "
            "base linear alone (the LoRA overhead). forward+backward: base frozen, grads "
            "w.r.t. x, A, B"
        ),
        impls=(*FASTVL_IMPLS, PEFT, ADDMM, BASE),
        baseline=PEFT,
    )
    def build(device, dtype, scale, mode):
        return _build_lora(device, dtype, scale, mode)


if requires_module("peft") is None:  # peft is the baseline
    _register_lora_case()


def _build_routed(device, dtype, scale: Scale, mode: str, decode: bool) -> Built:
    backward = mode == BACKWARD
    tokens = DECODE_TOKENS if decode else scale.batch(TOKENS)
    adapters = DECODE_ADAPTERS if decode else 2
    x, weight, lora_a, lora_b, grad_out, generator = _inputs(
        device, dtype, scale, tokens, backward, adapters
    )
    hidden, rank = weight.shape[0], lora_a.shape[1]
    scaling = ALPHA / RANK
    if decode:
        route = torch.randint(0, adapters, (tokens,), generator=generator, device=device)
    else:  # an image in the middle of the text: vision tokens -> adapter 0, text -> 1
        route = torch.ones(tokens, dtype=torch.int64, device=device)
        route[tokens // 4: tokens // 4 + tokens // 2] = 0
    rtol = RELATIVE_TOLERANCE[dtype]
    built = Built(
        shapes={"x": [tokens, hidden], "weight": [hidden, hidden],
                "lora_a": [adapters, rank, hidden], "lora_b": [adapters, hidden, rank],
                "route": [tokens], "scaling": scaling},
        flops=_flops(tokens, hidden, rank, backward),
    )

    def finish(forward):
        return with_backward(forward, (x, lora_a, lora_b), grad_out) if backward else forward

    args = (x, weight, None, lora_a, lora_b, scaling, route, 0.0, None)
    fastvl_impls(
        built, "routed_lora_linear", device, args,
        lambda backend: finish(lambda: routed_lora_linear(
            x, weight, None, lora_a, lora_b, scaling, route, backend=backend, check_route=False
        )),
    )
    built.add(BOOLEAN_INDEXING, finish(
        lambda: boolean_indexing_lora_linear(x, weight, lora_a, lora_b, scaling, route)
    ))
    compared = FASTVL_IMPLS
    if decode:
        built.add(BMM_GATHER, finish(
            lambda: bmm_gather_lora_linear(x, weight, lora_a, lora_b, scaling, route)
        ))
        compared = (*FASTVL_IMPLS, BOOLEAN_INDEXING)
    built.compare = dict.fromkeys(
        compared, lambda actual, expected: _relative_errors(actual, expected, rtol)
    )
    return built


@register_case(
    op="routed_lora_linear",
    name="t4096-h4096-r16-split50",
    description=(
        f"routed LoRA, tokens {TOKENS} (/ 8 on CPU), hidden {HIDDEN}, r {RANK}, 2 adapters: "
        "the middle half of the tokens (vision) adapter 0, the rest (text) adapter 1; fastvl "
        "vs PLoRA-style boolean indexing + index_put per adapter. forward+backward: base "
        "frozen, grads w.r.t. x, A, B"
    ),
    impls=(*FASTVL_IMPLS, BOOLEAN_INDEXING),
    baseline=BOOLEAN_INDEXING,
)
def _split_case(device, dtype, scale, mode):
    return _build_routed(device, dtype, scale, mode, decode=False)


@register_case(
    op="routed_lora_linear",
    name="multi-adapter-decode",
    description=(
        f"multi-adapter decode step: {DECODE_TOKENS} tokens, each routed to one of "
        f"{DECODE_ADAPTERS} adapters at random, hidden {HIDDEN}, r {RANK}; fastvl vs "
        "gathering each token's A, B (lora_a[route]) + bmm vs boolean indexing per adapter"
    ),
    impls=(*FASTVL_IMPLS, BMM_GATHER, BOOLEAN_INDEXING),
    baseline=BMM_GATHER,
    modes=(FORWARD,),
)
def _decode_case(device, dtype, scale, mode):
    return _build_routed(device, dtype, scale, mode, decode=True)
