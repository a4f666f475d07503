"""Token merging (ToMe's bipartite soft matching) in plain PyTorch.

The merge plan type, the ``torch`` backend of :func:`fastvl.ops.tome_match`,
:func:`fastvl.ops.tome_merge` and :func:`fastvl.ops.tome_unmerge`, and their test oracle
(float64 capable). The Triton kernels compute exactly these definitions.

Sets. ``P = num_prefix_tokens`` leading tokens (class, registers, distillation) are protected:
never merged away, never merged into. The others split by the parity of their position:
set A = even positions ``>= P``, set B = odd positions ``>= P``. For P = 0, 1, 2 this is ToMe's
``x[::2]`` / ``x[1::2]`` split minus its protected class / distillation tokens, so one step
merges the same token groups as the original implementation.

Similarity. ``cos(a, b) = <a, b> / max(|a|, eps) / max(|b|, eps)`` (eps = 1e-12: a zero
vector is 0-similar to everything), computed in float32 (float64 for a float64 metric).

Matching. Each A token's partner is the B token maximising ``<a, b> / max(|b|, eps)`` (the same
argmax as the cosine), the lowest B position among equal values; its score is that maximum
divided by ``max(|a|, eps)``. The r A tokens with the highest scores merge into their
partners, the lowest A position first among equal scores. ``0 <= r <= (N - P) // 2``.

Layout (``token_order``). ``"tome"`` (the default): ToMe's order, ``[prefix, unmerged A,
B]``: the P prefix tokens, then the A tokens that were not merged away, then every B token in
position order (each holding the A tokens merged into it). The unmerged A tokens are in
position order when P > 0 and in descending score order (ties: lowest position first) when
P = 0, as ToMe, which sorts them only when there is a class token. The next step's
alternating split runs on this order, so a chain of steps merges the same groups as ToMe.
``"spatial"``: every token that was not merged away, in original order (the next split stays
spatially interleaved). Either way ``M = N - r`` tokens, the prefix tokens first and
unchanged; the two orders differ by a permutation of the merged tokens (only ``dest``
changes).

Plan (:class:`TomePlan`): ``dest`` (B, N), the merged token each input token goes to, and
the same map inverted as CSR: ``sources`` (B, N), the input tokens sorted by destination
(stable, so ascending position within one merged token), with ``offsets`` (B, M + 1): merged
token j gathers ``sources[offsets[j]:offsets[j + 1]]``.

Merge. With sizes ``s`` (B, N) (how many original patches each token holds; ones by
default): ``S_j = sum_{i -> j} s_i``, ``w_i = s_i / S_dest[i]``,
``merged[j] = sum_{i -> j} w_i x_i``, ``size_merged = S``. A token that merges with nothing has
``w = 1`` exactly, so it is copied bit for bit (r = 0 returns x's values). Sizes are
constants: no gradient flows to them (as in ToMe, where they only ever count patches).

Unmerge. ``unmerged[i] = merged[dest[i]]`` (each input token gets its merged token's value).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from fastvl.reference.gather import gather_tokens

__all__ = [
    "TomePlan",
    "NORM_EPS",
    "TOKEN_ORDERS",
    "token_sets",
    "identity_plan",
    "default_size",
    "best_partners",
    "plan_from_partners",
    "tome_match",
    "tome_merge",
    "tome_unmerge",
]

NORM_EPS = 1e-12
TOKEN_ORDERS = ("tome", "spatial")


class TomePlan(NamedTuple):
    """Where each token goes in one merge step (a pytree of int64 tensors, contiguous).

    ``dest``: (B, N), the merged token (in [0, M)) input token i goes to.
    ``offsets``: (B, M + 1), CSR row starts into ``sources``; ``offsets[:, 0] = 0``,
    ``offsets[:, M] = N``, every merged token has at least one source.
    ``sources``: (B, N), input tokens ordered by destination, ascending within one.
    """

    dest: torch.Tensor
    offsets: torch.Tensor
    sources: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """N, the number of tokens before merging."""
        return self.dest.shape[1]

    @property
    def num_merged_tokens(self) -> int:
        """M = N - r, the number of tokens after merging."""
        return self.offsets.shape[1] - 1


def token_sets(num_tokens: int, num_prefix_tokens: int) -> tuple[int, int, int, int]:
    """(first A position, |A|, first B position, |B|); A/B step by 2 (see module docstring)."""
    a_first = num_prefix_tokens + num_prefix_tokens % 2
    b_first = num_prefix_tokens + 1 - num_prefix_tokens % 2
    num_a = max(0, (num_tokens - a_first + 1) // 2)
    num_b = max(0, (num_tokens - b_first + 1) // 2)
    return a_first, num_a, b_first, num_b


def identity_plan(batch: int, num_tokens: int, device: torch.device) -> TomePlan:
    """The plan of r = 0: every token is its own merged token."""
    positions = torch.arange(num_tokens, device=device).expand(batch, num_tokens).contiguous()
    offsets = torch.arange(num_tokens + 1, device=device).expand(batch, num_tokens + 1)
    return TomePlan(positions, offsets.contiguous(), positions.clone())


def best_partners(metric: torch.Tensor, num_prefix_tokens: int):
    """metric (B, N, C) -> (score (B, |A|), partner (B, |A|) int64 position of the B token).

    ``score`` is float32 (float64 for a float64 metric); nothing is differentiable.
    """
    a_first, _, b_first, _ = token_sets(metric.shape[1], num_prefix_tokens)
    acc_dtype = torch.float64 if metric.dtype == torch.float64 else torch.float32
    metric = metric.detach().to(acc_dtype)
    a, b = metric[:, a_first::2], metric[:, b_first::2]
    a_norm = torch.linalg.vector_norm(a, dim=-1).clamp_min(NORM_EPS)
    b_norm = torch.linalg.vector_norm(b, dim=-1).clamp_min(NORM_EPS)
    scaled = (a @ b.transpose(1, 2)) / b_norm.unsqueeze(1)  # (B, |A|, |B|)
    best = scaled.argmax(dim=-1)  # documented to return the first maximum
    score = scaled.gather(-1, best.unsqueeze(-1)).squeeze(-1) / a_norm
    return score, b_first + 2 * best


def plan_from_partners(
    score: torch.Tensor,
    partner: torch.Tensor,
    r: int,
    num_prefix_tokens: int,
    num_tokens: int,
    token_order: str = "tome",
) -> TomePlan:
    """Select the r best-scoring A tokens and build the plan; no host synchronisation.

    score, partner: (B, |A|) from :func:`best_partners` (or the Triton kernel);
    token_order: "tome" or "spatial" (see the module docstring).
    """
    batch = score.shape[0]
    a_first = token_sets(num_tokens, num_prefix_tokens)[0]
    ranked = torch.sort(score, dim=1, descending=True, stable=True).indices  # (B, |A|)
    chosen = ranked[:, :r]
    merged_away = a_first + 2 * chosen  # (B, r) positions of the A tokens that merge
    into = partner.gather(1, chosen)  # (B, r) positions of their B partners
    if token_order == "spatial":
        kept = torch.ones(batch, num_tokens, dtype=torch.bool, device=score.device)
        position = kept.scatter(1, merged_away, False).cumsum(1) - 1
    else:
        position = _tome_order_positions(ranked, r, num_prefix_tokens, num_tokens)
    # position: (B, N) merged index of every kept token (overwritten at the merged-away ones)
    dest = position.scatter(1, merged_away, position.gather(1, into))
    offsets, sources, _ = csr_of_dest(dest, num_tokens - r)
    return TomePlan(dest, offsets, sources)


def csr_of_dest(dest: torch.Tensor, num_merged: int):
    """dest (B, N) in [0, M) -> (offsets (B, M + 1), sources (B, N), counts (B, M)): the
    tokens grouped by destination (ascending within one) and each group's start."""
    sources = torch.sort(dest, dim=1, stable=True).indices
    counts = torch.zeros(dest.shape[0], num_merged, dtype=torch.int64, device=dest.device)
    counts = counts.scatter_add(1, dest, torch.ones_like(dest))
    return F.pad(counts.cumsum(1), (1, 0)), sources, counts


def _tome_order_positions(ranked, r, num_prefix_tokens, num_tokens):
    """(B, N) merged index of every token in ToMe's ``[prefix, unmerged A, B]`` order.

    ranked: (B, |A|) A indices by descending score; its first r merge away (their entries
    here are meaningless). Unmerged A: score order for P = 0, position order otherwise."""
    batch, num_a = ranked.shape
    a_first, _, b_first, num_b = token_sets(num_tokens, num_prefix_tokens)
    device = ranked.device
    if num_prefix_tokens == 0:
        rank = torch.arange(-r, num_a - r, device=device).expand(batch, num_a)
        a_rank = torch.empty_like(ranked).scatter_(1, ranked, rank)
    else:
        unmerged = torch.ones(batch, num_a, dtype=torch.int64, device=device)
        a_rank = unmerged.scatter(1, ranked[:, :r], 0).cumsum(1) - 1
    position = torch.arange(num_tokens, device=device).repeat(batch, 1)  # the prefix
    position[:, a_first::2] = num_prefix_tokens + a_rank
    position[:, b_first::2] = num_prefix_tokens + num_a - r + torch.arange(num_b, device=device)
    return position


def tome_match(
    metric: torch.Tensor,
    r: int,
    num_prefix_tokens: int,
    token_order: str = "tome",
    find_partners=best_partners,
) -> TomePlan:
    """metric (B, N, C) -> the plan merging r tokens (arguments already validated).

    ``find_partners(metric, num_prefix_tokens) -> (score, partner)``: :func:`best_partners`,
    or the Triton kernel computing the same.
    """
    batch, num_tokens, _ = metric.shape
    if r == 0:
        return identity_plan(batch, num_tokens, metric.device)
    score, partner = find_partners(metric, num_prefix_tokens)
    return plan_from_partners(score, partner, r, num_prefix_tokens, num_tokens, token_order)


def default_size(x: torch.Tensor) -> torch.Tensor:
    """Ones (B, N) in float32 (float64 for float64 x): every token holds one patch."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.ones(x.shape[:2], dtype=dtype, device=x.device)


def tome_merge(plan: TomePlan, x: torch.Tensor, size: Optional[torch.Tensor] = None):
    """x (B, N, C), size (B, N) or None -> (merged (B, M, C) x's dtype, size_merged (B, M)).

    The weighted average is taken in x's dtype (weights in size's dtype, then cast);
    differentiable in x only. ``size_merged`` has size's dtype (float32 / float64 default).
    """
    size = default_size(x) if size is None else size.detach()
    batch, num_tokens, channels = x.shape
    num_merged = plan.num_merged_tokens
    size_merged = size.new_zeros(batch, num_merged).scatter_add(1, plan.dest, size)
    weight = (size / size_merged.gather(1, plan.dest)).to(x.dtype)
    # One index_add over the flattened rows: no (B, N, C) expanded index (several times faster
    # than scatter_add on CPU).
    rows = (plan.dest + torch.arange(batch, device=x.device).unsqueeze(1) * num_merged).reshape(-1)
    weighted = (x * weight.unsqueeze(-1)).reshape(batch * num_tokens, channels)
    merged = x.new_zeros(batch * num_merged, channels).index_add_(0, rows, weighted)
    return merged.view(batch, num_merged, channels), size_merged


def tome_unmerge(plan: TomePlan, x: torch.Tensor) -> torch.Tensor:
    """x (B, M, C) -> (B, N, C): every input token of the step gets its merged token's value."""
    return gather_tokens(x, plan.dest)
