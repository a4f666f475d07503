"""Score-based token pruning in plain PyTorch, written for clarity: the oracle for
:mod:`fastvl.ops.pruning`.

A token's *rank* among the scored tokens is the number of tokens that beat it: a higher
score, or an equal score listed earlier. The ``keep`` tokens of rank below ``keep`` are kept.
Ranking compares every pair, (B, M, M), so this is for tests, not for speed.
"""

import torch


def score_rank(scores: torch.Tensor) -> torch.Tensor:
    """scores: (B, M) -> (B, M) int64, rank[b, i] = #{j: s_j > s_i, or s_j == s_i and j < i}."""
    position = torch.arange(scores.shape[1], device=scores.device)
    listed_earlier = position.unsqueeze(0) < position.unsqueeze(1)  # [i, j]: j before i
    own, other = scores.unsqueeze(2), scores.unsqueeze(1)
    beats = (other > own) | ((other == own) & listed_earlier)
    return beats.sum(dim=2)


def keep_mask(scores: torch.Tensor, keep: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """scores: (B, N - P) of the non-prefix tokens -> (B, N) bool, True for the prefix tokens
    and the ``keep`` best-scored ones."""
    kept = score_rank(scores) < keep
    prefix = kept.new_ones(scores.shape[0], num_prefix_tokens)
    return torch.cat([prefix, kept], dim=1)


def _true_positions(mask: torch.Tensor, per_row: int) -> torch.Tensor:
    """(B, N) bool with ``per_row`` Trues in every row -> (B, per_row) int64, ascending."""
    return mask.nonzero()[:, 1].reshape(mask.shape[0], per_row)


def topk_token_index(
    scores: torch.Tensor, keep: int, *, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """scores: (B, N - P) -> (B, P + keep) int64: 0..P-1, then the kept tokens ascending."""
    return _true_positions(keep_mask(scores, keep, num_prefix_tokens), num_prefix_tokens + keep)


def topk_candidate_index(scores: torch.Tensor, candidates: torch.Tensor, keep: int) -> torch.Tensor:
    """scores: (B, N), candidates: (B, M) or (M,) unique positions -> (B, N - M + keep) int64.

    Keeps every non-candidate token and the ``keep`` candidates of highest score (ties: the
    one listed first in ``candidates``), in ascending position order.
    """
    batch, num_tokens = scores.shape
    candidates = candidates.expand(batch, -1)
    kept_candidate = score_rank(scores.gather(1, candidates)) < keep
    dropped = torch.zeros(batch, num_tokens, dtype=torch.bool, device=scores.device)
    dropped.scatter_(1, candidates, ~kept_candidate)
    return _true_positions(~dropped, num_tokens - candidates.shape[1] + keep)


def keep_topk_tokens(
    x: torch.Tensor,
    scores: torch.Tensor,
    keep: int,
    *,
    num_prefix_tokens: int = 1,
    fuse_rest: bool = False,
):
    """x: (B, N, C), scores: (B, N - P) -> (x_kept (B, P + keep [+ 1], C), index (B, P + keep)).

    With ``fuse_rest`` the last token is sum over dropped j of scores[j] * x[j] (EViT),
    computed in the promoted dtype of x and scores and returned in x's dtype.
    """
    batch, _, channels = x.shape
    mask = keep_mask(scores, keep, num_prefix_tokens)
    x_kept = x[mask].reshape(batch, num_prefix_tokens + keep, channels)
    index = _true_positions(mask, num_prefix_tokens + keep)
    if fuse_rest:
        weights = scores.masked_fill(mask[:, num_prefix_tokens:], 0)
        fused = (weights.unsqueeze(-1) * x[:, num_prefix_tokens:]).sum(dim=1, keepdim=True)
        x_kept = torch.cat([x_kept, fused.to(x.dtype)], dim=1)
    return x_kept, index
