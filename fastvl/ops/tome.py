"""Token merging (ToMe): ``tome_match`` plans a merge step, ``tome_merge`` applies it,
``tome_unmerge`` undoes it (for dense tasks), ``tome_merge_source`` tracks original patches.

A ToMe step inside a ViT block (after attention, keys averaged over heads as the metric)::

    plan = tome_match(k.mean(1), r, num_prefix_tokens=1)        # k: (B, H, N, D)
    x, size = tome_merge(plan, x, size)                          # (B, N - r, C), (B, N - r)
    source = tome_merge_source(plan, source)                     # optional, (B, N_orig)
    # next block's proportional attention: attention(..., key_bias=size.log())

The definitions (which tokens may merge, cosine similarity, tie-breaking, the merged token
order, size weighting) are in :mod:`fastvl.reference.tome`. In short: the ``P`` prefix tokens
are protected, the rest alternate between sets A (even positions) and B (odd positions);
each A token's most similar B token is its partner; the r best A tokens merge into their
partners; ``M = N - r`` tokens come out in ToMe's order ``[prefix, unmerged A, B]``
(``token_order="tome"``, so chained steps merge as ToMe does) or in original order
(``token_order="spatial"``).

The plan, :class:`TomePlan`, is a NamedTuple of int64 tensors (``dest`` (B, N), ``offsets``
(B, M + 1), ``sources`` (B, N)) whose shapes carry N and M: a pytree that torch.compile
traces without data-dependent branches, reusable for any number of tensors of the step.

Backends:

* ``torch`` (:mod:`fastvl.reference.tome`): explicit similarity matrix, ``scatter_add``
  merge; float64 capable; the merge backward is autograd's (``scatter_add`` is not
  deterministic on CUDA).
* ``triton`` (:mod:`fastvl.kernels.tome`): ``fastvl::tome_match_triton``, two launches:
  the best partners (tiled similarity with a running row max / argmax, never storing the
  (N/2)^2 matrix; also registered alone as ``fastvl::tome_best_partners_triton``), then the
  whole plan in one kernel, one program per sample (top-r by counting, merged positions,
  CSR offsets and sources by prefix sums; no host synchronisation; r = 0: the plan kernel
  alone); ``fastvl::tome_merge_triton`` (one program per group of merged tokens, each
  summing its sources in a fixed order: deterministic, no atomics, no clones), whose
  gradient is ``fastvl::tome_spread_triton`` (a weighted gather, deterministic too); the
  unmerge is ``tome_spread_triton`` unweighted, with ``fastvl::tome_segment_sum_triton`` as
  its gradient. Each op's gradient is registered as the other op, so double backward works.
  A step (match + merge) is three launches. float16 / bfloat16 / float32. Eager mode launches
  the kernels directly (no custom-op dispatch, :class:`fastvl.ops._eager.EagerOp`);
  torch.compile sees the registered ops.

The checks of a call (and the implementation chosen) are memoized by the shapes, dtypes,
devices and flags they read, so repeated calls of a model skip them.

Sizes (how many original patches each token holds) are (B, N) floats and are treated as
constants, as in ToMe: no gradient flows to them. Bad input raises ``ValueError`` /
``TypeError`` naming the argument; ``r`` outside ``[0, (N - P) // 2]`` raises ``ValueError``.
``tome_merge`` / ``tome_unmerge`` trust the plans ``tome_match`` returned (unmodified); any
other plan has its values checked first (one host sync; ``check_plan=False`` skips it).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastvl.ops._checks import check_float_tensor, check_int, check_tensor, value_check_allowed
from fastvl.ops._eager import EagerOp, call_key, memoized
from fastvl.ops.registry import KERNEL_DTYPES, TRITON_IMPORT_ERROR, Call, Supports, register_op
from fastvl.reference import tome as _reference
from fastvl.reference.tome import TOKEN_ORDERS, TomePlan, csr_of_dest

__all__ = [
    "tome_match",
    "tome_merge",
    "tome_unmerge",
    "tome_merge_source",
    "TomePlan",
    "TOME_MATCH",
    "TOME_MERGE",
    "TOME_UNMERGE",
]



def _describe_merge(plan, x, size) -> Call:
    more = () if size is None else (("size", size.dtype),)
    return Call(x.device, x.dtype, more_dtypes=more)


TOME_MATCH = register_op(
    "tome_match", describe=lambda metric, *flags: Call(metric.device, metric.dtype)
)
TOME_MERGE = register_op("tome_merge", describe=_describe_merge)
TOME_UNMERGE = register_op("tome_unmerge", describe=lambda plan, x: Call(x.device, x.dtype))


# ---- implementations ---------------------------------------------------------------------
# Called with validated arguments (size detached):
#   match(metric, r, num_prefix_tokens, token_order) -> TomePlan
#   merge(plan, x, size or None) -> (merged, size_merged)
#   unmerge(plan, x) -> (B, N, C)

TOME_MATCH.implement("torch", _reference.tome_match, Supports(dtype_of="metric"))
TOME_MERGE.implement("torch", _reference.tome_merge, Supports(dtype_of="x"))
TOME_UNMERGE.implement("torch", _reference.tome_unmerge, Supports(dtype_of="x"))


def _best_partners_fake(metric, num_prefix_tokens):
    batch, num_tokens, _ = metric.shape
    num_a = _reference.token_sets(num_tokens, num_prefix_tokens)[1]
    return (metric.new_empty(batch, num_a, dtype=torch.float32),
            metric.new_empty(batch, num_a, dtype=torch.int64))


def _match_fake(metric, r, num_prefix_tokens, spatial):
    batch, num_tokens, _ = metric.shape
    return (metric.new_empty(batch, num_tokens, dtype=torch.int64),
            metric.new_empty(batch, num_tokens - r + 1, dtype=torch.int64),
            metric.new_empty(batch, num_tokens, dtype=torch.int64))


def _merge_fake(x, size, dest, offsets, sources):
    batch, num_merged = offsets.shape[0], offsets.shape[1] - 1
    size_dtype = torch.float32 if size is None else size.dtype
    return (x.new_empty(batch, num_merged, x.shape[2]),
            x.new_empty(batch, num_merged, dtype=size_dtype))


def _spread_fake(y, size, size_merged, dest, offsets, sources):
    return y.new_empty(dest.shape[0], dest.shape[1], y.shape[2])


def _segment_sum_fake(x, dest, offsets, sources):
    return x.new_empty(offsets.shape[0], offsets.shape[1] - 1, x.shape[2])


if TRITON_IMPORT_ERROR is None:
    from fastvl.kernels import tome as _kernels

    def _merge_kernels(x, size, dest, offsets, sources):
        return _kernels.segment_reduce(
            x, size, offsets.contiguous(), sources.contiguous(), mean=True
        )

    def _spread_kernels(y, size, size_merged, dest, offsets, sources):
        return _kernels.spread(y, size, size_merged, dest.contiguous())

    def _segment_sum_kernels(x, dest, offsets, sources):
        return _kernels.segment_reduce(
            x, None, offsets.contiguous(), sources.contiguous(), mean=False
        )[0]

    @torch.library.triton_op("fastvl::tome_best_partners_triton", mutates_args=())
    def tome_best_partners_triton(
        metric: torch.Tensor, num_prefix_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """metric (B, N, C) -> (score (B, |A|) float32, partner (B, |A|) int64 position)."""
        return _kernels.best_partners(metric, num_prefix_tokens)

    @torch.library.triton_op("fastvl::tome_match_triton", mutates_args=())
    def tome_match_triton(
        metric: torch.Tensor, r: int, num_prefix_tokens: int, spatial: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """metric (B, N, C) -> the plan's (dest (B, N), offsets (B, N - r + 1), sources
        (B, N)) int64: best partners, then the whole plan in one kernel (r = 0: the latter
        only, the identity plan). ``spatial``: token_order "spatial", else "tome"."""
        return _kernels.match_plan(metric, r, num_prefix_tokens, spatial)

    @torch.library.triton_op("fastvl::tome_merge_triton", mutates_args=())
    def tome_merge_triton(
        x: torch.Tensor,
        size: Optional[torch.Tensor],
        dest: torch.Tensor,
        offsets: torch.Tensor,
        sources: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (merged (B, M, C) x's dtype, size_merged (B, M) size's dtype or float32).

        ``dest`` is unused here; it is an input so that the gradient can use it."""
        return _merge_kernels(x, size, dest, offsets, sources)

    @torch.library.triton_op("fastvl::tome_spread_triton", mutates_args=())
    def tome_spread_triton(
        y: torch.Tensor,
        size: Optional[torch.Tensor],
        size_merged: Optional[torch.Tensor],
        dest: torch.Tensor,
        offsets: torch.Tensor,
        sources: torch.Tensor,
    ) -> torch.Tensor:
        """y (B, M, C) -> (B, N, C): ``(size_i or 1) / size_merged[dest_i] * y[dest_i]``, or
        ``y[dest_i]`` without ``size_merged``. ``offsets``/``sources`` serve the gradient."""
        return _spread_kernels(y, size, size_merged, dest, offsets, sources)

    @torch.library.triton_op("fastvl::tome_segment_sum_triton", mutates_args=())
    def tome_segment_sum_triton(
        x: torch.Tensor, dest: torch.Tensor, offsets: torch.Tensor, sources: torch.Tensor
    ) -> torch.Tensor:
        """x (B, N, C) -> (B, M, C): the sum of each merged token's sources (unweighted)."""
        return _segment_sum_kernels(x, dest, offsets, sources)

    def _merge_setup(ctx, inputs, output):
        _, size, dest, offsets, sources = inputs
        ctx.save_for_backward(size, output[1], dest, offsets, sources)
        ctx.mark_non_differentiable(output[1])

    def _merge_backward(ctx, grad_merged, _grad_size):
        size, size_merged, dest, offsets, sources = ctx.saved_tensors
        grad_x = _spread(grad_merged, size, size_merged, dest, offsets, sources)
        return grad_x, None, None, None, None

    def _spread_setup(ctx, inputs, output):
        _, size, size_merged, dest, offsets, sources = inputs
        ctx.weighted = size_merged is not None
        ctx.save_for_backward(size, dest, offsets, sources)

    def _spread_backward(ctx, grad_out):
        size, dest, offsets, sources = ctx.saved_tensors
        if ctx.weighted:  # the adjoint of a weighted gather is the weighted merge
            grad_y = _merge(grad_out, size, dest, offsets, sources)[0]
        else:
            grad_y = _segment_sum(grad_out, dest, offsets, sources)
        return grad_y, None, None, None, None, None

    def _segment_sum_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:])

    def _segment_sum_backward(ctx, grad_out):
        dest, offsets, sources = ctx.saved_tensors
        grad_x = _spread(grad_out, None, None, dest, offsets, sources)
        return grad_x, None, None, None

    torch.library.register_fake(tome_best_partners_triton, _best_partners_fake)
    torch.library.register_fake(tome_match_triton, _match_fake)
    torch.library.register_fake(tome_merge_triton, _merge_fake)
    torch.library.register_fake(tome_spread_triton, _spread_fake)
    torch.library.register_fake(tome_segment_sum_triton, _segment_sum_fake)
    _match = EagerOp(tome_match_triton, _kernels.match_plan)
    # Each op's gradient is one of the others: double backward works.
    _merge = EagerOp(tome_merge_triton, _merge_kernels, _merge_setup, _merge_backward, (0,),
                     double_backward=True)
    _spread = EagerOp(tome_spread_triton, _spread_kernels, _spread_setup, _spread_backward,
                      (0,), double_backward=True)
    _segment_sum = EagerOp(tome_segment_sum_triton, _segment_sum_kernels, _segment_sum_setup,
                           _segment_sum_backward, (0,), double_backward=True)

    def _match_triton(metric, r, num_prefix_tokens, token_order):
        return TomePlan(*_match(metric, r, num_prefix_tokens, token_order == "spatial"))

    def _merge_triton(plan, x, size):
        return _merge(x, size, *plan)

    def _unmerge_triton(plan, x):
        return _spread(x, None, None, *plan)

    TOME_MATCH.implement("triton", _match_triton,
                         Supports(dtypes=KERNEL_DTYPES, dtype_of="metric"))
    TOME_MERGE.implement("triton", _merge_triton, Supports(dtypes=KERNEL_DTYPES, dtype_of="x"))
    TOME_UNMERGE.implement("triton", _unmerge_triton,
                           Supports(dtypes=KERNEL_DTYPES, dtype_of="x"))


# ---- validation --------------------------------------------------------------------------


def check_token_order(op: str, token_order) -> None:
    """ValueError unless ``token_order`` is one of ``TOKEN_ORDERS``."""
    if not isinstance(token_order, str) or token_order not in TOKEN_ORDERS:
        raise ValueError(
            f"{op}: token_order must be 'tome' (ToMe's [prefix, unmerged A, B]) or 'spatial' "
            f"(original order), got {token_order!r}"
        )


def _check_tokens(op: str, name: str, t, shape_name: str = "(B, N, C)") -> None:
    check_float_tensor(op, name, t)
    if t.dim() != 3:
        raise ValueError(f"{op}: {name} must be {shape_name}, got shape {tuple(t.shape)}")


def _check_plan(op: str, plan) -> None:
    if not isinstance(plan, TomePlan):
        raise TypeError(
            f"{op}: plan must be the TomePlan returned by tome_match, got {type(plan).__name__}"
        )
    for name, t in zip(plan._fields, plan):
        check_tensor(op, f"plan.{name}", t)
        if t.dim() != 2 or t.dtype != torch.int64:
            raise ValueError(
                f"{op}: plan.{name} must be a 2-D int64 tensor, got shape {tuple(t.shape)} "
                f"and dtype {t.dtype}; pass the plan returned by tome_match"
            )
    if plan.sources.shape != plan.dest.shape or plan.offsets.shape[0] != plan.dest.shape[0] or (
        not 1 <= plan.offsets.shape[1] <= plan.dest.shape[1] + 1
    ):
        raise ValueError(
            f"{op}: inconsistent plan: dest {tuple(plan.dest.shape)}, offsets "
            f"{tuple(plan.offsets.shape)}, sources {tuple(plan.sources.shape)}; expected "
            "(B, N), (B, M + 1), (B, N) with M <= N"
        )


def _check_matches_plan(op: str, name: str, t: torch.Tensor, plan: TomePlan,
                        num_tokens: int, what: str) -> None:
    batch = plan.dest.shape[0]
    if t.shape[0] != batch or t.shape[1] != num_tokens:
        raise ValueError(
            f"{op}: {name} must have (B, {what}) = ({batch}, {num_tokens}) leading dims to "
            f"match the plan, got shape {tuple(t.shape)}"
        )
    if t.device != plan.dest.device:
        raise ValueError(
            f"{op}: {name} is on {t.device} but the plan is on {plan.dest.device}; "
            "put both on the same device"
        )


def tome_match(
    metric: torch.Tensor,
    r: int,
    *,
    num_prefix_tokens: int = 1,
    token_order: str = "tome",
    backend: str = "auto",
) -> TomePlan:
    """Plan one ToMe step: merge the r most similar (A, B) token pairs of each sample.

    Args:
        metric: (B, N, C) float, what similarity is measured on (ToMe: the attention keys
            averaged over heads). Not differentiated.
        r: tokens to remove, an int in ``[0, (N - num_prefix_tokens) // 2]``; 0 gives the
            identity plan.
        num_prefix_tokens: leading tokens (class, registers, distillation) that are never
            merged away nor merged into.
        token_order: the order of the merged tokens: "tome" (ToMe's ``[prefix, unmerged
            A, B]``) or "spatial" (original order); see :mod:`fastvl.reference.tome`.
        backend: "auto", "triton" or "torch" (see ``python -m fastvl info``).

    Returns:
        A :class:`TomePlan` for ``N`` -> ``N - r`` tokens (int64 tensors on metric's device).
    """
    fn = memoized(TOME_MATCH, call_key((metric,), r, num_prefix_tokens, token_order, backend),
                  lambda: _resolve_match(metric, r, num_prefix_tokens, token_order, backend))
    plan = fn(metric, r, num_prefix_tokens, token_order)
    if not torch.compiler.is_compiling():
        setattr(plan.dest, _MATCHED, (plan.offsets, plan.sources, _versions(plan)))
    return plan


# A plan made by tome_match is consistent by construction: its dest carries this attribute,
# (offsets, sources, the three versions), so the merge ops skip the value check while the
# plan is unchanged (inference tensors have no version: their in-place changes go unseen).
_MATCHED = "_fastvl_tome_match"


def _versions(plan: TomePlan) -> Optional[tuple[int, int, int]]:
    if plan.dest.is_inference():
        return None
    return plan.dest._version, plan.offsets._version, plan.sources._version


def _check_plan_values(op: str, plan: TomePlan, check_plan: bool) -> None:
    """ValueError unless the plan is what tome_match would build for its ``dest``: dest in
    [0, M), every merged token with a source, offsets and sources the CSR inverse of dest.

    Skipped for unmodified plans from :func:`tome_match`, with ``check_plan=False``, under
    torch.compile and CUDA-graph capture; else one host sync."""
    if not check_plan or not value_check_allowed(plan.dest):
        return
    matched = getattr(plan.dest, _MATCHED, None)
    if matched is not None and matched[0] is plan.offsets and matched[1] is plan.sources \
            and matched[2] == _versions(plan):
        return
    dest = plan.dest
    num_merged = plan.num_merged_tokens
    low, high = torch.stack(torch.aminmax(dest)).tolist()
    if low < 0 or high >= num_merged:
        raise ValueError(
            f"{op}: plan.dest values must lie in [0, M) = [0, {num_merged}), found values "
            f"from {low} to {high}; pass the plan returned by tome_match"
        )
    offsets, sources, counts = csr_of_dest(dest, num_merged)
    consistent = torch.stack([(counts > 0).all(), (plan.offsets == offsets).all(),
                              (plan.sources == sources).all()]).tolist()
    problems = [what for ok, what in zip(consistent, (
        "every merged token in [0, M) must receive a token (dest covers [0, M))",
        "plan.offsets must be the CSR row starts of dest (0, cumulative counts, N)",
        "plan.sources must list the tokens by destination, ascending within one",
    )) if not ok]
    if problems:
        raise ValueError(f"{op}: inconsistent plan: " + "; ".join(problems)
                         + "; pass the plan returned by tome_match")


def _resolve_match(metric, r, num_prefix_tokens, token_order, backend):
    op = "tome_match"
    _check_tokens(op, "metric", metric)
    check_int(op, "num_prefix_tokens", num_prefix_tokens)
    check_int(op, "r", r)
    check_token_order(op, token_order)
    num_tokens = metric.shape[1]
    if not 0 <= num_prefix_tokens <= num_tokens:
        raise ValueError(
            f"{op}: num_prefix_tokens must lie in [0, N] = [0, {num_tokens}], "
            f"got {num_prefix_tokens}"
        )
    max_r = (num_tokens - num_prefix_tokens) // 2
    if not 0 <= r <= max_r:
        raise ValueError(
            f"{op}: r must lie in [0, (N - num_prefix_tokens) // 2] = [0, {max_r}] "
            f"(N = {num_tokens}, num_prefix_tokens = {num_prefix_tokens}), got {r}"
        )
    return TOME_MATCH.select(backend, metric.device, metric, r, num_prefix_tokens, token_order)


def tome_merge(
    plan: TomePlan,
    x: torch.Tensor,
    size: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
    check_plan: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens by the plan: the size-weighted average of each group.

    Args:
        plan: from :func:`tome_match` on the same tokens.
        x: (B, N, C) float, any strides. Differentiable.
        size: (B, N) float, how many original patches each token holds; None = all ones.
            A constant: it is detached, no gradient flows to it.
        backend: "auto", "triton" or "torch".
        check_plan: check the values of a plan that is not an unmodified one from
            :func:`tome_match` (one host sync; skipped under torch.compile and CUDA-graph
            capture): an inconsistent plan would read out of bounds on the triton backend.

    Returns:
        ``(merged, size_merged)``: merged (B, M, C) in x's dtype (contiguous on the triton
        backend), ``merged[j] = sum_i size_i x_i / sum_i size_i`` over the tokens i that go to
        j; size_merged (B, M), those sums, in size's dtype (float32 by default, float64 for
        float64 x). Tokens merged with nothing are copied exactly, so r = 0 returns x's values.
    """
    fn = memoized(TOME_MERGE, _plan_key(plan, (x, size), backend),
                  lambda: _resolve_merge(plan, x, size, backend))
    _check_plan_values("tome_merge", plan, check_plan)
    return fn(plan, x, None if size is None else size.detach())


def _plan_key(plan, tensors, backend):
    """The memo key of a call on ``plan`` and ``tensors`` (None if plan is not a TomePlan)."""
    if type(plan) is not TomePlan:
        return None
    return call_key((*plan, *tensors), backend)


def _resolve_merge(plan, x, size, backend):
    op = "tome_merge"
    _check_plan(op, plan)
    _check_tokens(op, "x", x)
    _check_matches_plan(op, "x", x, plan, plan.num_tokens, "N")
    if size is not None:
        check_tensor(op, "size", size)
        if not size.is_floating_point():
            raise TypeError(f"{op}: size must be a floating-point tensor, got {size.dtype}")
        if size.dim() != 2:
            raise ValueError(
                f"{op}: size must be (B, N) = {tuple(x.shape[:2])}, got shape {tuple(size.shape)}"
            )
        _check_matches_plan(op, "size", size, plan, plan.num_tokens, "N")
    return TOME_MERGE.select(backend, x.device, plan, x, size)


def tome_unmerge(
    plan: TomePlan, x: torch.Tensor, *, backend: str = "auto", check_plan: bool = True
) -> torch.Tensor:
    """Undo one merge step for dense outputs: x (B, M, C) -> (B, N, C).

    Every token of the step gets the value of the merged token it went to,
    ``out[:, i] = x[:, plan.dest[:, i]]``. Differentiable (the gradient sums each merged
    token's copies, deterministically on the triton backend). Chain it in reverse over the
    steps, or map straight to the original patches with :func:`tome_merge_source` and
    :func:`fastvl.ops.gather_tokens`. ``check_plan``: as in :func:`tome_merge`.
    """
    fn = memoized(TOME_UNMERGE, _plan_key(plan, (x,), backend),
                  lambda: _resolve_unmerge(plan, x, backend))
    _check_plan_values("tome_unmerge", plan, check_plan)
    return fn(plan, x)


def _resolve_unmerge(plan, x, backend):
    op = "tome_unmerge"
    _check_plan(op, plan)
    _check_tokens(op, "x", x, "(B, M, C)")
    _check_matches_plan(op, "x", x, plan, plan.num_merged_tokens, "M")
    return TOME_UNMERGE.select(backend, x.device, plan, x)


def tome_merge_source(plan: TomePlan, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Track which token holds each original patch: ``plan.dest[source]`` per sample.

    ``source``: (B, N_orig) int64, the current token (in [0, N)) holding each original patch,
    from the previous step; None before the first merge (original patch p is token p, so
    N_orig = N). Returns (B, N_orig) int64 with values in [0, M). For visualisation,
    ``gather_tokens(values, source)`` paints each original patch with its token's value.
    Index arithmetic only (a gather), the same on every backend.
    """
    op = "tome_merge_source"
    _check_plan(op, plan)
    if source is None:
        return plan.dest
    check_tensor(op, "source", source)
    if source.dtype != torch.int64:
        raise TypeError(f"{op}: source must be an int64 tensor, got {source.dtype}")
    if source.dim() != 2:
        raise ValueError(f"{op}: source must be (B, N_orig), got shape {tuple(source.shape)}")
    if source.shape[0] != plan.dest.shape[0] or source.device != plan.dest.device:
        raise ValueError(
            f"{op}: source (shape {tuple(source.shape)}, on {source.device}) must have the "
            f"plan's batch size {plan.dest.shape[0]} and device {plan.dest.device}"
        )
    return plan.dest.gather(1, source)
