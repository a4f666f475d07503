"""Score-based token pruning: keep the prefix tokens and the top-``keep`` tokens by score.

* :func:`topk_token_index` picks the tokens of one sequence layout (protected prefix, then
  scored tokens; EViT / VisionZip on a ViT).
* :func:`topk_candidate_index` picks among a given set of positions and keeps every other
  token (FastV: the top-k image tokens of a LLaMA sequence, text tokens all kept).
* :func:`keep_topk_tokens` gathers the picked tokens with :func:`fastvl.ops.gather_tokens`
  (any of its backends; the backward is its scatter-add) and can fuse the dropped tokens
  into one (EViT).

The selection is plain PyTorch: a stable sort of the scores, then a sort of the kept
positions. No host sync, so it can be captured in a CUDA graph and compiled with
``fullgraph=True``. Scores rank highest first; ties go to the token listed earlier (the
lower position), so results are deterministic on every device. NaN ranks above every
number (as in :func:`torch.sort`). The selection itself has no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvl.ops._checks import check_float_tensor, check_tensor, is_int, value_check_allowed
from fastvl.ops._eager import call_key, memoized
from fastvl.ops.gather import GATHER_TOKENS
from fastvl.ops.registry import check_op_backend

__all__ = ["keep_topk_tokens", "similarity_prune_scores", "topk_token_index",
           "topk_candidate_index"]



# ---- validation --------------------------------------------------------------------------


def _check_count(op: str, name: str, value, high=None, high_text: str = "") -> None:
    """``value`` must be an int >= 0, and <= ``high`` unless that is None (``high_text``
    names the bound)."""
    if not is_int(value):
        raise TypeError(
            f"{op}: {name} must be an int (a token count), got {type(value).__name__}"
        )
    if value < 0 or (high is not None and value > high):
        bound = f"lie in [0, {high_text}] = [0, {high}]" if high is not None else "be >= 0"
        raise ValueError(f"{op}: {name} must {bound}, got {value}")


def _check_scores(op: str, scores) -> None:
    check_float_tensor(op, "scores", scores)
    if scores.dim() != 2:
        raise ValueError(f"{op}: scores must be 2-D (B, tokens), got shape {tuple(scores.shape)}")


def _check_candidate_values(candidates: torch.Tensor, num_tokens: int) -> None:
    """Every row of candidates (B, M) must hold unique positions in [0, num_tokens).

    One host sync, so skipped while torch.compile traces and while a CUDA graph is captured.
    """
    if not value_check_allowed(candidates):
        return
    ascending = candidates.sort(dim=1).values
    repeats = (ascending[:, 1:] == ascending[:, :-1]).sum()
    low, high, repeats = torch.stack(
        [ascending[:, 0].min(), ascending[:, -1].max(), repeats]
    ).tolist()
    if low < 0 or high >= num_tokens:
        raise ValueError(
            f"topk_candidate_index: candidates must lie in [0, {num_tokens}) (the token axis "
            f"of scores), found values from {low} to {high}"
        )
    if repeats:
        raise ValueError(
            "topk_candidate_index: candidates must not repeat a position within a row, "
            f"found {repeats} repeat(s)"
        )


# ---- selection ---------------------------------------------------------------------------


def _best_first(scores: torch.Tensor) -> torch.Tensor:
    """(B, M) -> (B, M) column order, highest score first, ties in column order."""
    # (torch.sort's indices: argsort's Python wrapper costs µs more)
    return torch.sort(scores.detach(), dim=1, descending=True, stable=True)[1]


def topk_token_index(
    scores: torch.Tensor, keep: int, *, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Indices of the prefix tokens and the ``keep`` best-scored tokens, in original order.

    Args:
        scores: (B, N - P) float, one score per non-prefix token (token ``P + j`` has
            ``scores[:, j]``), e.g. the class token's attention ``attn[:, :, 0, P:]``
            averaged over heads. Higher is kept first; ties go to the earlier token.
        keep: int in [0, N - P], how many non-prefix tokens to keep.
        num_prefix_tokens: P >= 0 leading tokens (class token, registers) that are always
            kept and never scored.

    Returns:
        index (B, P + keep) int64 into the N tokens: ``0 .. P-1`` first, then the kept
        tokens in ascending order. Never requires grad.
    """
    op = "topk_token_index"
    _check_scores(op, scores)
    _check_count(op, "num_prefix_tokens", num_prefix_tokens)
    _check_count(op, "keep", keep, scores.shape[1], "scores.shape[1]")
    return _topk_token_index(scores, keep, num_prefix_tokens)


def _topk_token_index(scores, keep, num_prefix_tokens):
    # Scores of all N tokens, NaN for the prefix: NaN ranks first and ties go to the lower
    # position, so one sort picks the prefix and the best `keep` tokens (fewer launches
    # than picking the kept tokens and concatenating the prefix's positions).
    if num_prefix_tokens:
        scores = F.pad(scores.detach(), (num_prefix_tokens, 0), value=float("nan"))
    return _best_first(scores)[:, : num_prefix_tokens + keep].sort(dim=1)[0]


def topk_candidate_index(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    keep: int,
    *,
    check_candidates: bool = True,
) -> torch.Tensor:
    """Indices of every non-candidate token and the ``keep`` best-scored candidates (FastV).

    Args:
        scores: (B, N) float, a score for every token; only the candidates' are read.
        candidates: (B, M) or (M,) int64 positions in [0, N), unique within a row, e.g. the
            image tokens: ``(input_ids == image_token_id).nonzero()[:, 1].view(B, -1)``
            when every sample has M of them. Ties in score go to the candidate listed first.
        keep: int in [0, M], how many candidates to keep.
        check_candidates: verify the positions are in range and unique (one host sync,
            skipped under torch.compile and CUDA-graph capture); pass False in hot loops.

    Returns:
        index (B, N - M + keep) int64, ascending: all non-candidates plus the kept
        candidates. Never requires grad.
    """
    op = "topk_candidate_index"
    _check_scores(op, scores)
    check_tensor(op, "candidates", candidates)
    batch, num_tokens = scores.shape
    if candidates.dtype != torch.int64:
        raise TypeError(f"{op}: candidates must be torch.int64, got {candidates.dtype}")
    if candidates.dim() not in (1, 2) or (candidates.dim() == 2 and candidates.shape[0] != batch):
        raise ValueError(
            f"{op}: candidates must be (B, M) = ({batch}, M) or (M,), got shape "
            f"{tuple(candidates.shape)}"
        )
    if candidates.device != scores.device:
        raise ValueError(
            f"{op}: scores is on {scores.device} but candidates is on {candidates.device}"
        )
    num_candidates = candidates.shape[-1]
    if num_candidates > num_tokens:
        raise ValueError(
            f"{op}: {num_candidates} candidates cannot be unique positions among N = "
            f"{num_tokens} tokens"
        )
    _check_count(op, "keep", keep, num_candidates, "M (the number of candidates)")
    candidates = candidates.expand(batch, -1)
    if check_candidates:
        _check_candidate_values(candidates, num_tokens)

    order = _best_first(scores.gather(1, candidates))
    dropped_positions = candidates.gather(1, order[:, keep:])
    dropped = torch.zeros(batch, num_tokens, dtype=torch.bool, device=scores.device)
    dropped.scatter_(1, dropped_positions, True)
    # A stable sort of the flags puts the kept positions (False) first, in ascending order.
    kept_first = torch.argsort(dropped, dim=1, stable=True)
    return kept_first[:, : num_tokens - num_candidates + keep]


def keep_topk_tokens(
    x: torch.Tensor,
    scores: torch.Tensor,
    keep: int,
    *,
    num_prefix_tokens: int = 1,
    fuse_rest: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the prefix tokens and the top-``keep`` tokens by score, in original order.

    Args:
        x: (B, N, C) float tokens.
        scores: (B, N - P) float on x's device, scores of the non-prefix tokens only
            (token ``P + j`` has ``scores[:, j]``); see :func:`topk_token_index`. May
            require grad (it gets one with ``fuse_rest``).
        keep: int in [0, N - P], how many non-prefix tokens to keep.
        num_prefix_tokens: P, leading tokens always kept (class token, registers).
        fuse_rest: append one token, ``sum over dropped j of scores[:, j] * x[:, P + j]``
            (EViT's inattentive-token fusion, unnormalised; zero if nothing is dropped),
            computed by a batched matmul in x's dtype.
        backend: the :func:`fastvl.ops.gather_tokens` backend ("auto", "cuda", "triton",
            "torch").

    Returns:
        ``(x_kept, index)``: x_kept (B, P + keep, C), or (B, P + keep + 1, C) with
        ``fuse_rest``, in x's dtype; index (B, P + keep) int64 into the N tokens as
        :func:`topk_token_index` returns it (the fused token has no index).
        Differentiable in x (gather backward: a scatter-add) and, with ``fuse_rest``, in
        scores.
    """
    gather = memoized(
        GATHER_TOKENS, call_key((x, scores), keep, num_prefix_tokens, fuse_rest, backend),
        lambda: _resolve_keep_topk(x, scores, keep, num_prefix_tokens, fuse_rest, backend),
    )
    index = _topk_token_index(scores, keep, num_prefix_tokens)
    # The index is in range by construction: no bounds check (a host sync).
    x_kept = gather(x, index)
    if fuse_rest:
        weights = scores.scatter(1, index[:, num_prefix_tokens:] - num_prefix_tokens, 0.0)
        fused = torch.bmm(weights.unsqueeze(1).to(x.dtype), x[:, num_prefix_tokens:])
        x_kept = torch.cat([x_kept, fused], dim=1)
    return x_kept, index


def _resolve_keep_topk(x, scores, keep, num_prefix_tokens, fuse_rest, backend):
    """The gather_tokens implementation for a :func:`keep_topk_tokens` call, whose arguments
    are checked."""
    op = "keep_topk_tokens"
    check_tensor(op, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, N, C), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    batch, num_tokens, _ = x.shape
    _check_count(op, "num_prefix_tokens", num_prefix_tokens, num_tokens, "N")
    _check_scores(op, scores)
    expected = (batch, num_tokens - num_prefix_tokens)
    if tuple(scores.shape) != expected:
        raise ValueError(
            f"{op}: scores must be (B, N - num_prefix_tokens) = {expected}, one score per "
            f"non-prefix token, got shape {tuple(scores.shape)}"
        )
    if scores.device != x.device:
        raise ValueError(f"{op}: x is on {x.device} but scores is on {scores.device}")
    _check_count(op, "keep", keep, num_tokens - num_prefix_tokens, "N - num_prefix_tokens")
    if not isinstance(fuse_rest, bool):
        raise TypeError(f"{op}: fuse_rest must be a bool, got {type(fuse_rest).__name__}")
    if backend != "auto":
        check_op_backend(op, backend, "gather_tokens")
    return GATHER_TOKENS.select(backend, x.device, x, None)


def similarity_prune_scores(importance: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Zero-TPrune's similarity stage as keep scores for :func:`keep_topk_tokens`.

    The tokens are split by importance: the ``ceil(M / 2)`` most important form the kept
    group (score ``+inf``), and every other token scores minus its highest cosine similarity
    to a token of that group. Keeping the top ``M - r`` scores therefore drops the ``r``
    tokens most redundant with an important one (``r <= M // 2``), and only those.

    Args:
        importance: (B, M) float, e.g. :func:`fastvl.ops.attention_graph_rank` of the
            non-prefix tokens (ties: the lower index counts as more important).
        keys: (B, M, D) float, the features compared (Zero-TPrune: the attention keys,
            averaged over heads).

    Returns:
        float32 (B, M); no gradient.
    """
    op = "similarity_prune_scores"
    check_float_tensor(op, "importance", importance)
    check_float_tensor(op, "keys", keys)
    if importance.dim() != 2 or keys.dim() != 3 or keys.shape[:2] != importance.shape:
        raise ValueError(
            f"{op}: importance must be (B, M) and keys (B, M, D) for the same tokens, got "
            f"shapes {tuple(importance.shape)} and {tuple(keys.shape)}"
        )
    if keys.device != importance.device:
        raise ValueError(f"{op}: importance is on {importance.device} but keys is on "
                         f"{keys.device}")
    batch, num_tokens = importance.shape
    importance, keys = importance.detach(), keys.detach().float()
    order = torch.argsort(importance, dim=1, descending=True, stable=True)
    num_important = (num_tokens + 1) // 2
    important, candidates = order[:, :num_important], order[:, num_important:]
    scores = torch.full((batch, num_tokens), float("inf"), device=keys.device)
    if candidates.shape[1] == 0:
        return scores
    unit = F.normalize(keys, dim=-1)
    dim = unit.shape[-1]
    group = unit.gather(1, important.unsqueeze(-1).expand(-1, -1, dim))
    rest = unit.gather(1, candidates.unsqueeze(-1).expand(-1, -1, dim))
    similarity = torch.bmm(rest, group.transpose(1, 2)).amax(dim=-1)  # (B, M - ceil(M / 2))
    return scores.scatter(1, candidates, -similarity)
