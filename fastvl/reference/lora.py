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

from fastvl.ops._checks import host_readable

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


# On CPU tensors in eager mode, routed_lora_linear with at least this many adapters runs each
# adapter on its own rows (see _routed_by_segments); else the dense one-hot form.
SEGMENT_MIN_ADAPTERS = 2


def _use_segments(x: torch.Tensor, num_adapters: int) -> bool:
    """Enough adapters, and reading the per-adapter row counts costs no device sync
    (:func:`~fastvl.ops._checks.host_readable`); elsewhere the sync-free dense form."""
    return num_adapters >= SEGMENT_MIN_ADAPTERS and host_readable(x)


def _routed_by_segments(out, dropped, lora_a, lora_b, scaling, route):
    """out += the LoRA branch, each adapter on its own rows: one stable sort of the rows by
    route, one read of the rows per adapter (the only host read), one gather of the routed
    rows, per adapter ``((rows Aₑᵀ) · scalingₑ) Bₑᵀ``, one ``index_add_`` into out: r columns
    per row and no copy of the adapter weights (the dense form: E·r columns and a copy of the
    stacked B). Unused adapters get zero gradients (``unbind``); rows routed to -1 (or, like
    the dense form, to no adapter of [0, E)) get none of the branch. None when no row is
    routed (the caller then runs the dense form, whose gradients are zeros)."""
    num_adapters = lora_a.shape[0]
    bucket = (route + 1).clamp(0, num_adapters + 1)  # 0: no adapter, e + 1, E + 1: beyond
    counts = torch.bincount(bucket, minlength=num_adapters + 2).tolist()
    routed = route.numel() - counts[0] - counts[-1]
    if routed == 0:
        return None
    order = torch.argsort(route, stable=True)[counts[0]:counts[0] + routed]
    rows = dropped.index_select(0, order)
    scales = (scaling.to(dropped.dtype).unbind(0) if isinstance(scaling, torch.Tensor)
              else (scaling,) * num_adapters)
    deltas = [
        ((rows_e @ a.t()) * scale) @ b.t()
        for rows_e, a, b, scale in zip(rows.split(counts[1:-1]), lora_a.unbind(0),
                                       lora_b.unbind(0), scales)
        if rows_e.shape[0]
    ]
    return out.index_add_(0, order, deltas[0] if len(deltas) == 1 else torch.cat(deltas))


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

    Dense form, without host synchronisation or row copies: every row is shrunk against all E
    adapters at once, ``x A_allᵀ`` (N, E·r), the columns of the adapters it is not routed to
    are zeroed (one-hot of ``route``; -1 rows keep none), and one GEMM with the stacked B
    (out, E·r) adds the expand. That costs E·r instead of r columns per row: right for the few
    adapters of PLoRA-style routing (E small), not for many. On CPU in eager mode (where
    reading the counts syncs nothing) with E >= :data:`SEGMENT_MIN_ADAPTERS` each adapter runs
    on its own rows instead (:func:`_routed_by_segments`); the two compute the same sum.
    Unused adapters get zero gradients, and their values (A, B, scale: NaN / inf included)
    never reach the output or the gradients (selected out by ``torch.where``, not multiplied
    by 0). A non-finite value in an adapter that some row uses can reach the other rows.
    """
    num_adapters, rank, in_features = lora_a.shape
    num_rows, out_features = x.shape[0], lora_b.shape[1]
    out = F.linear(x, weight, bias)
    dropped = lora_dropout(x, dropout_p, seed)
    if _use_segments(x, num_adapters):
        result = _routed_by_segments(out, dropped, lora_a, lora_b, scaling, route)
        if result is not None:
            return result
    adapters = torch.arange(num_adapters, device=route.device)
    hit = route[:, None] == adapters  # (N, E); a -1 row is all False
    used = hit.any(0)[:, None, None]  # (E, 1, 1)
    lora_a = torch.where(used, lora_a, 0.0)
    stacked_b = torch.where(used, lora_b, 0.0).permute(1, 0, 2).reshape(
        out_features, num_adapters * rank)
    shrunk = (dropped @ lora_a.reshape(num_adapters * rank, in_features).t()).view(
        num_rows, num_adapters, rank)
    if isinstance(scaling, torch.Tensor):  # each row its own adapter's scale
        scaling = torch.where(hit, scaling.to(x.dtype), 0.0)[:, :, None]
    shrunk = torch.where(hit[:, :, None], shrunk * scaling, 0.0)
    return out.addmm_(shrunk.view(num_rows, num_adapters * rank), stacked_b.t())
