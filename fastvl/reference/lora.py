"""LoRA linear layers in plain PyTorch: the test oracle and the ``torch`` backend of
:func:`fastvl.ops.lora_linear` and :func:`fastvl.ops.routed_lora_linear`.

Layouts (peft's): ``x`` (N, in) (the op layer flattens leading dims), ``weight`` (out, in),
``bias`` (out,) or None, and

* plain: ``lora_a`` (r, in), ``lora_b`` (out, r), ``scaling`` a float;
* routed: ``lora_a`` (E, r, in), ``lora_b`` (E, out, r), ``scaling`` a float or (E,),
  ``route`` (N,) int64 in [-1, E): row n uses adapter ``route[n]``, -1 none.

``out = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``. The base output is the only full-size
tensor: the shrink ``x Aᵀ`` has r columns and the expand is added into the base output in
place (``addmm_``). Dropout (``dropout_p > 0``) applies to the LoRA branch's input only, as in
peft; its keep-mask comes from ``torch.Generator().manual_seed(seed)`` when a seed is given,
else from torch's default generator, and autograd stores it for the backward.

Gradients follow ``requires_grad``: a frozen (``requires_grad=False``) weight or bias gets none.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["lora_dropout", "lora_linear", "routed_lora_linear"]


def lora_dropout(x: torch.Tensor, dropout_p: float, seed: Optional[int] = None) -> torch.Tensor:
    """Inverted dropout of x (any shape); the keep-mask from ``seed`` if given (reproducible),
    else from torch's default generator. ``dropout_p = 0`` returns x itself."""
    if dropout_p == 0.0:
        return x
    if seed is None:
        return F.dropout(x, dropout_p, training=True)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= dropout_p
    return x * keep / (1.0 - dropout_p)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """x (N, in), weight (out, in), lora_a (r, in), lora_b (out, r) -> (N, out)."""
    out = F.linear(x, weight, bias)
    shrunk = lora_dropout(x, dropout_p, seed) @ lora_a.t()  # (N, r)
    return out.addmm_(shrunk, lora_b.t(), alpha=scaling)


def routed_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Union[float, torch.Tensor],
    route: torch.Tensor,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """x (N, in), lora_a (E, r, in), lora_b (E, out, r), scaling float or (E,), route (N,)
    -> (N, out).

    Without host synchronisation or row copies: every row is shrunk against all E adapters at
    once, ``x A_allᵀ`` (N, E·r), the columns of the adapters it is not routed to are zeroed
    (one-hot of ``route``; -1 rows keep none), and one GEMM with the stacked B (out, E·r) adds
    the expand. That costs E·r instead of r columns per row: right for the few adapters of
    PLoRA-style routing (E small), not for many. Unused adapters get zero gradients.
    """
    num_adapters, rank, in_features = lora_a.shape
    out = F.linear(x, weight, bias)
    shrunk = lora_dropout(x, dropout_p, seed) @ lora_a.reshape(num_adapters * rank, in_features).t()
    adapters = torch.arange(num_adapters, device=route.device)
    gate = (route[:, None] == adapters).to(x.dtype)  # (N, E); a -1 row is all zeros
    gate = gate * (scaling.to(x.dtype) if isinstance(scaling, torch.Tensor) else scaling)
    shrunk = (shrunk.view(-1, num_adapters, rank) * gate[:, :, None]).view(-1, num_adapters * rank)
    stacked_b = lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], num_adapters * rank)
    return out.addmm_(shrunk, stacked_b.t())
