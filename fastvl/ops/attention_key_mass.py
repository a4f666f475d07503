"""``attention_key_mass``: how much attention each key receives, for token pruners.

For each key, the sum over a range of queries of the softmax probabilities of an
:func:`fastvl.ops.attention` call, recomputed from the ``lse`` that call returned, so the
Nq x Nk probability matrix is never stored on the triton backend. It scores tokens for
EViT / VisionZip (the class token's row), FastV (the last query, or all queries) and
FitPrune (the maximum over heads).

Backends: ``torch`` (:func:`fastvl.reference.attention_key_mass`, explicit probabilities of
the selected rows; float64 capable) and ``triton`` (``fastvl::attention_key_mass_triton``, a
``torch.library.triton_op`` with an explicit fake impl, used under torch.compile; in eager
mode the launcher is called directly). No gradient: the output never requires grad.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Union

import torch

from fastvl.ops._checks import check_float_tensor, check_int, check_tensor
from fastvl.ops._eager import can_launch_directly
from fastvl.ops.attention import HEAD_DIM, TRITON_SUPPORTS
from fastvl.ops.attention import (  # the checks and the memo key shared with attention
    _default_scale,
    _memo_key,
    _normalize,
    _validate_key_bias,
    _validate_options,
    _validate_qkv,
)
from fastvl.ops.registry import TRITON_IMPORT_ERROR, Call, Supports, register_op
from fastvl.reference.attention_key_mass import HEAD_REDUCTIONS
from fastvl.reference.attention_key_mass import reduce_heads as _reduce_heads
from fastvl.reference.attention_key_mass import attention_graph_rank as _reference_graph_rank
from fastvl.reference.attention_key_mass import attention_key_mass as _reference_key_mass

__all__ = ["attention_key_mass", "attention_graph_rank", "graph_rank_reads_lse",
           "ATTENTION_KEY_MASS", "ATTENTION_GRAPH_RANK", "HEAD_REDUCTIONS"]



def _describe(q, *other_args) -> Call:
    return Call(q.device, q.dtype, sizes=(("head_dim", int(q.shape[-1])),))


ATTENTION_KEY_MASS = register_op("attention_key_mass", sizes=HEAD_DIM, describe=_describe)


# ---- implementations ---------------------------------------------------------------------
# Every implementation is called as
#   fn(q, k, lse, key_bias, prefix_len, scale, causal, causal_strength, query_start,
#      query_end, head_reduce, query_weights)
# with validated, normalized arguments: scale a number, causal_strength a number in [0, 1]
# (1.0 = hard mask), prefix_len None or an integer (B,) tensor on q's device,
# 0 <= query_start <= query_end <= Nq ints; q, k, lse and key_bias may require grad (each
# implementation detaches what it differentiates through).


def _detached(*tensors):
    return tuple(None if t is None else t.detach() for t in tensors)


def _torch_impl(q, k, lse, key_bias, prefix_len, scale, causal, causal_strength, query_start,
                query_end, head_reduce, query_weights):
    q, k, lse, key_bias, query_weights = _detached(q, k, lse, key_bias, query_weights)
    return _reference_key_mass(
        q, k, lse, causal=causal, key_bias=key_bias, scale=scale,
        causal_strength=causal_strength, prefix_len=prefix_len, query_start=query_start,
        query_end=query_end, head_reduce=head_reduce, query_weights=query_weights,
    ).float()


ATTENTION_KEY_MASS.implement("torch", _torch_impl, Supports(dtype_of="q"))


def _key_mass_fake(q, k, lse, key_bias, prefix_len, scale, causal, causal_strength,
                   query_start, query_end, head_reduce, query_weights):
    batch, heads = q.shape[0], q.shape[1]
    shape = (batch, heads, k.shape[2]) if head_reduce is None else (batch, k.shape[2])
    return q.new_empty(shape, dtype=torch.float32)


if TRITON_IMPORT_ERROR is None:
    from fastvl.kernels import attention_key_mass as _triton_key_mass

    @torch.library.triton_op("fastvl::attention_key_mass_triton", mutates_args=())
    def attention_key_mass_triton(
        q: torch.Tensor,
        k: torch.Tensor,
        lse: torch.Tensor,
        key_bias: Optional[torch.Tensor],
        prefix_len: Optional[torch.Tensor],
        scale: float,
        causal: bool,
        causal_strength: float,
        query_start: int,
        query_end: int,
        head_reduce: Optional[str],
        query_weights: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """-> float32 (B, Nk), or (B, H, Nk) for ``head_reduce=None``; no autograd."""
        return _triton_key_mass.attention_key_mass(
            q, k, lse, key_bias, prefix_len, scale, causal, causal_strength,
            query_start, query_end, head_reduce, query_weights,
        )

    torch.library.register_fake(attention_key_mass_triton, _key_mass_fake)

    def _triton_impl(q, k, lse, *args):
        if not can_launch_directly():  # the registered op (it has no autograd: detach)
            q, k, lse, key_bias, query_weights = _detached(q, k, lse, args[0], args[-1])
            return attention_key_mass_triton(q, k, lse, key_bias, *args[1:-1], query_weights)
        # eager: the launcher (its output has no grad)
        return _triton_key_mass.attention_key_mass(q, k, lse, *args, eager=True)

    # The attention kernels' limits (dtype, head dim); every mask feature is served.
    ATTENTION_KEY_MASS.implement("triton", _triton_impl, Supports(
        dtypes=TRITON_SUPPORTS.dtypes, dtype_of="q", max_sizes=TRITON_SUPPORTS.max_sizes,
    ))


# ---- validation --------------------------------------------------------------------------


def _validate(q, k, lse, causal, key_bias, scale, causal_strength, prefix_len, query_start,
              query_end, head_reduce, query_weights, op="attention_key_mass",
              lse_optional=False):
    # q, k and the mask arguments follow attention's rules (k stands in for v).
    _validate_qkv(op, q, k, k, packed=False)
    batch, heads, num_queries = q.shape[:3]
    num_keys = k.shape[2]
    _validate_key_bias(
        op, key_bias, q, {"(B, Nk)": (batch, num_keys), "(B, H, Nk)": (batch, heads, num_keys)}
    )
    _validate_options(op, q, batch, causal, scale, causal_strength, prefix_len, False)
    if lse is not None or not lse_optional:  # (attention_graph_rank may normalise itself)
        check_tensor(op, "lse", lse)
        if tuple(lse.shape) != (batch, heads, num_queries):
            raise ValueError(
                f"{op}: lse must be (B, H, Nq) = ({batch}, {heads}, {num_queries}) "
                f"like the lse of attention(q, k, v, return_lse=True), got shape "
                f"{tuple(lse.shape)}"
            )
        allowed = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
        if lse.dtype not in allowed:
            raise TypeError(
                f"{op}: lse must be float32 (or float64 with float64 q, k), as "
                f"attention(..., return_lse=True) returns it, got {lse.dtype}"
            )
        if lse.device != q.device:
            raise ValueError(f"{op}: q is on {q.device} but lse is on {lse.device}")
    check_int(op, "query_start", query_start)
    if query_end is not None:
        check_int(op, "query_end", query_end, "an int or None")
    end = num_queries if query_end is None else query_end
    if not 0 <= query_start <= end <= num_queries:
        raise ValueError(
            f"{op}: the query range must satisfy 0 <= query_start <= query_end "
            f"<= Nq = {num_queries}, got query_start={query_start}, query_end={query_end}"
        )
    if head_reduce not in HEAD_REDUCTIONS:
        raise ValueError(
            f"{op}: head_reduce must be one of {HEAD_REDUCTIONS}, "
            f"got {head_reduce!r}"
        )
    if head_reduce is not None and heads == 0:
        raise ValueError(
            f"{op}: head_reduce={head_reduce!r} needs at least one query head, "
            "got H = 0"
        )
    if query_weights is not None:
        check_float_tensor(op, "query_weights", query_weights)
        if tuple(query_weights.shape) not in ((batch, num_queries), (batch, heads, num_queries)):
            raise ValueError(
                f"{op}: query_weights must be (B, Nq) = ({batch}, {num_queries}) or (B, H, Nq) "
                f"= ({batch}, {heads}, {num_queries}), got shape {tuple(query_weights.shape)}"
            )
        if query_weights.device != q.device:
            raise ValueError(f"{op}: q is on {q.device} but query_weights is on "
                             f"{query_weights.device}")


def attention_key_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = False,
    key_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal_strength: Optional[float] = None,
    prefix_len: Union[torch.Tensor, int, None] = None,
    query_start: int = 0,
    query_end: Optional[int] = None,
    head_reduce: Optional[str] = "mean",
    query_weights: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention mass each key receives from queries ``[query_start, query_end)``.

    ``mass[b, h, j] = sum_i w[b, h, i] softmax(s[b, h, i])[j]`` over the selected queries i
    (w = 1 unless ``query_weights`` are given), where the
    probabilities are those of ``attention(q, k, v, causal=..., key_bias=..., scale=...,
    causal_strength=..., prefix_len=..., return_lse=True)`` recomputed from its ``lse``.

    Args:
        q: (B, H, Nq, D). k: (B, Hkv, Nk, D), ``H % Hkv == 0`` (GQA). One float dtype.
        lse: (B, H, Nq) float32 (float64 allowed with float64 q, k), the ``lse`` of the
            attention call with the same q, k and masks. A row with ``lse = -inf`` (no
            visible key) contributes 0.
        causal, key_bias, scale, causal_strength, prefix_len: as in
            :func:`fastvl.ops.attention`; they must match the call that produced ``lse``.
        query_start, query_end: the queries summed over, ``0 <= query_start <= query_end
            <= Nq`` (``query_end=None`` is Nq). EViT / VisionZip: ``0, 1`` (class token);
            FastV: ``Nq - 1, Nq`` (last query) or all queries.
        head_reduce: "mean" (default), "sum" or "max" (FitPrune) over the H query heads,
            or None to keep them.
        query_weights: optional (B, Nq) or (B, H, Nq) weights of the query rows (any float
            dtype, read in float32; entries outside the query range unused): the mass is
            then the attention graph applied to them, ``A^T w`` per head, one step of a
            PageRank over the attention graph (Zero-TPrune), still without the Nq x Nk
            matrix.
        backend: "auto", "triton" or "torch" (see ``python -m fastvl info``).

    Returns:
        float32 (B, Nk), or (B, H, Nk) with ``head_reduce=None``. Not differentiable: the
        inputs are detached, so the result never requires grad (also under torch.compile).
    """
    key = None
    if (query_weights is None and type(query_start) is int
            and (query_end is None or type(query_end) is int)
            and (head_reduce is None or type(head_reduce) is str)):
        # the memo fast path of fastvl.ops.attention (lse stands in for v)
        key = _memo_key(q, k, lse, key_bias, causal, scale, causal_strength, prefix_len, False,
                        0.0, backend, query_start, query_end, head_reduce)
    if key is not None:
        hit = ATTENTION_KEY_MASS.memo().get(key)
        if hit is not None:
            fn, default_scale, end = hit
            return fn(q, k, lse, key_bias, None, default_scale if scale is None else scale,
                      causal, 1.0, query_start, end, head_reduce, None)
    _validate(q, k, lse, causal, key_bias, scale, causal_strength, prefix_len, query_start,
              query_end, head_reduce, query_weights)
    scale_value, causal_strength, prefix_len = _normalize(
        q, q.shape[0], scale, causal_strength, prefix_len
    )
    end = q.shape[2] if query_end is None else query_end
    args = (q, k, lse, key_bias, prefix_len, scale_value, bool(causal), causal_strength,
            query_start, end, head_reduce, query_weights)
    fn = ATTENTION_KEY_MASS.select(backend, q.device, *args)
    if key is not None:
        ATTENTION_KEY_MASS.remember(key, (fn, _default_scale(q), end))
    return fn(*args)


def attention_graph_rank(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: Optional[torch.Tensor],
    *,
    iterations: int = 10,
    key_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    head_reduce: Optional[str] = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Token importance as Zero-TPrune's weighted PageRank over the attention graph.

    The attention probabilities ``A`` (per head, rows the queries) are the transition
    matrix of a graph over the N tokens: from the uniform ``s = 1 / N`` it runs ``s <- A^T s``
    ``iterations`` times per head, so a token is important when important tokens attend to
    it; ``s`` stays a distribution (sums to 1 per head). Backends: ``triton``, one
    :func:`attention_key_mass` kernel per step with ``query_weights=s`` (no N x N matrix);
    ``torch``, each block of heads' probabilities computed once and iterated in cache
    (:func:`fastvl.reference.attention_key_mass.attention_graph_rank`).

    Args:
        q, k, lse: self-attention (B, H, N, D), (B, Hkv, N, D), the (B, H, N) lse of
            :func:`fastvl.ops.attention` on them (same ``key_bias`` and ``scale``; no mask),
            or ``lse=None``: the op normalises the rows itself (the torch backend only; so
            the attention can take a path that returns no lse, e.g. SDPA on a CPU; see
            :func:`graph_rank_reads_lse`).
        iterations: steps of the power iteration (an int >= 1). Zero-TPrune iterates until
            the scores settle; 10 is the default here.
        head_reduce: "mean" (default: the heads' distributions averaged, still summing to 1),
            "sum", "max", or None for (B, H, N).
        backend: "auto", "triton" or "torch".

    Returns:
        float32 (B, N), or (B, H, N) for ``head_reduce=None``; never requires grad.
    """
    op = "attention_graph_rank"
    if not (isinstance(iterations, int) and not isinstance(iterations, bool)):
        raise TypeError(f"{op}: iterations must be an int, got {type(iterations).__name__}")
    if iterations < 1:
        raise ValueError(f"{op}: iterations must be >= 1, got {iterations}")
    if head_reduce not in HEAD_REDUCTIONS:
        raise ValueError(f"{op}: head_reduce must be one of {HEAD_REDUCTIONS}, got "
                         f"{head_reduce!r}")
    if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and (
            q.dim() != 4 or k.dim() != 4 or q.shape[2] != k.shape[2]):
        raise ValueError(
            f"{op}: the attention graph needs self-attention, q (B, H, N, D) and k "
            f"(B, Hkv, N, D) over the same N tokens, got shapes {tuple(q.shape)} and "
            f"{tuple(k.shape)}"
        )
    _validate(q, k, lse, False, key_bias, scale, None, None, 0, None, None, None, op,
              lse_optional=True)
    scale_value = _default_scale(q) if scale is None else float(scale)
    fn = ATTENTION_GRAPH_RANK.select(backend, q.device, q, k, lse, key_bias, scale_value,
                                     iterations)
    return _reduce_heads(fn(q, k, lse, key_bias, scale_value, iterations), head_reduce)


# ---- attention_graph_rank's implementations: fn(q, k, lse, key_bias, scale, iterations)
# with validated arguments -> float32 (B, H, N)

def _describe_graph_rank(q, k, lse, *other_args) -> Call:
    features = ("own_lse",) if lse is None else ()
    return Call(q.device, q.dtype, features=features, sizes=(("head_dim", int(q.shape[-1])),))


ATTENTION_GRAPH_RANK = register_op(
    "attention_graph_rank", sizes=HEAD_DIM, describe=_describe_graph_rank,
    features={"own_lse": "the softmax normalisation computed by the op (lse=None)"},
)


def _graph_rank_torch(q, k, lse, key_bias, scale, iterations):
    q, k, lse, key_bias = _detached(q, k, lse, key_bias)  # lse may be None
    return _reference_graph_rank(q, k, lse, iterations=iterations, key_bias=key_bias,
                                 scale=scale).float()


ATTENTION_GRAPH_RANK.implement("torch", _graph_rank_torch,
                                Supports(dtype_of="q", features=frozenset({"own_lse"})))

if TRITON_IMPORT_ERROR is None:

    def _graph_rank_triton(q, k, lse, key_bias, scale, iterations):
        num_tokens = q.shape[2]
        scores = torch.full(q.shape[:3], 1.0 / max(num_tokens, 1), dtype=torch.float32,
                            device=q.device)
        for _ in range(iterations):
            scores = _triton_impl(q, k, lse, key_bias, None, scale, False, 1.0, 0, num_tokens,
                                  None, scores)
        return scores

    ATTENTION_GRAPH_RANK.implement("triton", _graph_rank_triton, Supports(
        dtypes=TRITON_SUPPORTS.dtypes, dtype_of="q", max_sizes=TRITON_SUPPORTS.max_sizes,
    ))


def graph_rank_reads_lse(device: torch.device, dtype: torch.dtype, head_dim: int,
                         backend: str = "auto") -> bool:
    """Whether :func:`attention_graph_rank` on such q would run an implementation that reads
    the attention's lse (the triton one); if not (the torch one normalises the rows itself),
    the attention need not return one and can take its fastest path."""
    q_like = SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(0, 0, 0, head_dim))
    chosen = ATTENTION_GRAPH_RANK.select(backend, q_like.device, q_like, q_like, q_like)
    return chosen is not _graph_rank_torch
