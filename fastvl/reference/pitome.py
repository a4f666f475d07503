"""PiToMe (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging",
NeurIPS 2024) in plain PyTorch: the energy scores and the merge plan. The ``torch`` backend of
:mod:`fastvl.ops.pitome` and the oracle of its Triton kernel.

Energy of token i among the T mergeable (non-prefix) tokens, from the cosine similarities of
their metric (the attention keys averaged over heads)::

    E_i = (1 / T) * sum_j f(cos(x_i, x_j) - m),   f(s) = s if s >= 0 else alpha (e^s - 1)

(PiToMe's margin function: an ELU shifted by the margin m; j runs over every token, i
included). High energy: a token similar to many others, redundant. The plan: tokens sorted by
energy, highest first (ties: lower position first); the first 2r are mergeable, alternately
sources (even ranks) and destinations (odd ranks); each source merges into its most similar
destination (the first on ties); the other tokens are protected. Merged tokens come out as
``[prefix, protected (by energy), destinations]`` (PiToMe's order; attention does not depend
on it), and :func:`fastvl.ops.tome_merge` averages each group by size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvl.reference.tome import NORM_EPS, TomePlan, csr_of_dest

__all__ = ["pitome_energy", "pitome_plan", "unit_rows"]


def unit_rows(metric: torch.Tensor) -> torch.Tensor:
    """metric (B, T, C) -> rows of unit length (``x / max(|x|, 1e-12)``), float32 (float64
    for float64)."""
    acc = torch.float64 if metric.dtype == torch.float64 else torch.float32
    metric = metric.detach().to(acc)
    return metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True).clamp_min(NORM_EPS)


def pitome_energy(metric: torch.Tensor, margin: float, alpha: float = 1.0) -> torch.Tensor:
    """metric (B, T, C) -> energy (B, T), float32 (float64 for float64 metric), no gradient."""
    unit = unit_rows(metric)
    similarity = unit @ unit.transpose(1, 2)
    return F.elu(similarity - margin, alpha=alpha).mean(dim=-1)


def pitome_plan(energy: torch.Tensor, metric: torch.Tensor, r: int,
                num_prefix_tokens: int) -> TomePlan:
    """The merge plan of N = P + T tokens (P prefix tokens first) from the energy (B, T) and
    the metric (B, T, C) of the T others; ``0 <= r <= T // 2``. No host synchronisation."""
    batch, count = energy.shape
    prefix = num_prefix_tokens
    device = energy.device
    order = torch.argsort(energy, dim=1, descending=True, stable=True)
    sources, targets, protected = order[:, 0:2 * r:2], order[:, 1:2 * r:2], order[:, 2 * r:]
    unit = unit_rows(metric)
    dim = unit.shape[-1]
    similarity = torch.bmm(unit.gather(1, sources.unsqueeze(-1).expand(-1, -1, dim)),
                           unit.gather(1, targets.unsqueeze(-1).expand(-1, -1, dim))
                           .transpose(1, 2))
    partner = similarity.argmax(dim=-1) if r else sources  # (B, r): the first maximum
    kept = count - 2 * r
    dest = torch.empty(batch, count, dtype=torch.int64, device=device)
    ranks = torch.arange(count, device=device).expand(batch, count)
    dest = dest.scatter(1, protected, prefix + ranks[:, :kept])
    dest = dest.scatter(1, targets, prefix + kept + ranks[:, :r])
    dest = dest.scatter(1, sources, prefix + kept + partner)
    dest = torch.cat([ranks[:, :prefix].to(dest.device), dest], dim=1).contiguous()
    offsets, members, _ = csr_of_dest(dest, prefix + count - r)
    return TomePlan(dest, offsets.contiguous(), members.contiguous())
