"""Token reduction inside timm ViTs: ToMe (:func:`apply_tome`), PiToMe (:func:`apply_pitome`),
EViT (:func:`apply_evit`) and Zero-TPrune (:func:`apply_zero_tprune`).

Both swap ``model.blocks`` (an ``nn.Sequential``) for a :class:`TokenReducingBlocks`, an
``nn.Sequential`` holding the *same* block modules (so parameters and state-dict keys do not
change) whose forward loops over the blocks, carrying the token sizes (and, when tracked, the
source map) from block to block as tensors: nothing is stored on a module during a forward
(except ``trace_source``'s ``source``, see :func:`apply_tome`), so a patched model compiles
with ``torch.compile(fullgraph=True)``. Each block is run from its own submodules, never from
a copy of its forward:

* ``timm.models.vision_transformer.Block`` (pre-norm):
  ``x + drop_path1(ls1(attn(norm1(x))))``, reduce, ``x + drop_path2(ls2(mlp(norm2(x))))``;
* ``ResPostBlock`` (post-norm): ``x + drop_path1(norm1(attn(x)))``, reduce,
  ``x + drop_path2(norm2(mlp(x)))``.

Other block classes (``ParallelScalingBlock``, whose attention is computed inline from a
fused projection, ``ParallelThingsBlock``, several attentions in parallel, and any subclass)
are refused with a ``ValueError`` naming them. The attention of every block becomes a
:class:`fastvl.nn.Attention` (by :func:`fastvl.patch.timm.apply` on ``model.blocks``, or the
one already there), so LayerScale, qk-norm and the prefix tokens (class, registers,
distillation) behave as in timm; ``model.num_prefix_tokens`` leading tokens are never reduced.

timm calls ``model.blocks(x)`` only in the plain path of ``forward_features``; with an
``attn_mask``, ``is_causal``, gradient checkpointing or ``forward_intermediates`` it iterates
the blocks itself and so runs them without token reduction (with fastvl attention).

``handle.remove()`` (or :func:`remove_token_reduction`) puts the original ``nn.Sequential``
back (with the blocks it then holds) and the timm attention modules if this patch swapped them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence, Union

import torch
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import nn

from fastvl.nn.attention import Attention, AttentionInternals
from fastvl.ops.registry import check_op_backend
from fastvl.ops._checks import is_int
from fastvl.ops.attention_key_mass import (
    attention_graph_rank,
    attention_key_mass,
    graph_rank_reads_lse,
)
from fastvl.ops.gather import gather_tokens
from fastvl.ops.pitome import check_pitome_options, pitome_match
from fastvl.ops.pruning import keep_topk_tokens, similarity_prune_scores
from fastvl.ops.tome import check_token_order, tome_match, tome_merge, tome_merge_source

if TYPE_CHECKING:
    from fastvl.patch.timm import TimmPatch

__all__ = [
    "apply_tome",
    "apply_evit",
    "apply_zero_tprune",
    "apply_pitome",
    "remove_token_reduction",
    "render_tome_regions",
    "tome_schedule",
    "ReducedTokens",
    "TokenReducingBlocks",
    "TomeBlocks",
    "EvitBlocks",
    "ZeroTPruneBlocks",
    "PitomeBlocks",
    "TokenReductionPatch",
]

SUPPORTED_BLOCKS = (Block, ResPostBlock)
# Pooling over the tokens: with ToMe these see the merged tokens expanded back to the original
# patches (source map), i.e. each merged token weighted by its size.
SIZE_WEIGHTED_POOLS = ("avg", "avgmax", "map", "prr")
TomeR = Union[int, Sequence[int], tuple[int, float]]


class ReducedTokens(NamedTuple):
    """What :meth:`TokenReducingBlocks.forward_tokens` returns.

    ``x``: (B, M, C) the tokens after the last block (prefix tokens first).
    ``size``: (B, M) float32 (float64 for float64 x), how many original tokens each holds
    (ToMe); None while no token
    has merged, and always for EViT.
    ``source``: (B, N) int64, the output token holding each input token (ToMe, when tracked:
    ``trace_source=True`` or a size-weighted pooling); else None.
    """

    x: torch.Tensor
    size: Optional[torch.Tensor]
    source: Optional[torch.Tensor]


# ---- running a block from its submodules -----------------------------------------------------


def _attention_branch(
    block: nn.Module, x: torch.Tensor, key_bias: Optional[torch.Tensor], return_lse: bool = False
) -> tuple[torch.Tensor, AttentionInternals]:
    """The residual branch of the block's attention (x: (B, N, C)) and the attention's q, k, lse."""
    attn = block.attn
    if not isinstance(attn, Attention):
        raise RuntimeError(
            f"{type(block).__name__}.attn is {type(attn).__qualname__}, not a fastvl Attention: "
            "fastvl.patch.timm.remove() was called on a model with token reduction; undo the "
            "token reduction with its handle's remove() (or remove_token_reduction) instead"
        )
    if type(block) is Block:
        out, internals = attn.forward_with_internals(
            block.norm1(x), key_bias=key_bias, return_lse=return_lse
        )
        return block.drop_path1(block.ls1(out)), internals
    out, internals = attn.forward_with_internals(x, key_bias=key_bias, return_lse=return_lse)
    return block.drop_path1(block.norm1(out)), internals


def _mlp_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The residual branch of the block's MLP."""
    if type(block) is Block:
        return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return block.drop_path2(block.norm2(block.mlp(x)))


# ---- the blocks wrappers -------------------------------------------------------------------


class TokenReducingBlocks(nn.Sequential):
    """A ViT's ``blocks`` that reduce tokens between attention and MLP; see the module docs.

    Subclasses implement :meth:`forward_tokens`. ``forward(x)``: (B, N, C) -> (B, M, C).
    """

    method = ""

    def __init__(self, blocks: nn.Sequential, model: nn.Module, backend: str) -> None:
        super().__init__(OrderedDict(blocks._modules))
        self.backend = backend
        self.num_prefix_tokens = model.num_prefix_tokens
        # Plain attributes, not submodules: no second path to the parameters, no cycle in the
        # module tree, nothing in the state dict.
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_original_blocks", blocks)
        object.__setattr__(self, "_attention_patch", None)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, backend={self.backend!r}"

    def forward_tokens(self, x: torch.Tensor) -> ReducedTokens:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x).x


class TomeBlocks(TokenReducingBlocks):
    """ToMe: after each block's attention, merge ``r`` tokens (see :func:`apply_tome`)."""

    method = "tome"

    def __init__(self, blocks, model, backend, prop_attn: bool, trace_source: bool,
                 token_order: str) -> None:
        super().__init__(blocks, model, backend)
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.token_order = token_order
        self.source: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, prop_attn={self.prop_attn}, "
                f"trace_source={self.trace_source}, token_order={self.token_order!r}")

    def _pools_over_tokens(self) -> bool:
        return getattr(self._model, "global_pool", "") in SIZE_WEIGHTED_POOLS

    def forward_tokens(self, x: torch.Tensor) -> ReducedTokens:
        """x: (B, N, C) block input -> :class:`ReducedTokens` (merged tokens, sizes, source)."""
        schedule = tome_schedule(
            self._model.r, len(self), x.shape[1], self.num_prefix_tokens, name="model.r"
        )
        track_source = self.trace_source or self._pools_over_tokens()
        size = source = None
        for index, (block, r) in enumerate(zip(self, schedule)):
            key_bias = size.log() if self.prop_attn and size is not None else None
            branch, internals = _attention_branch(block, x, key_bias)
            x = x + branch
            if r > 0:
                plan = self._plan(internals.k.mean(1), r, index)
                x, size = tome_merge(plan, x, size, backend=self.backend, check_plan=False)
                if track_source:
                    source = tome_merge_source(plan, source)
            x = x + _mlp_branch(block, x)
        return ReducedTokens(x, size, source)

    def _plan(self, metric: torch.Tensor, r: int, index: int):
        """The merge plan of block ``index``: ToMe's bipartite matching on ``metric``."""
        return tome_match(metric, r, num_prefix_tokens=self.num_prefix_tokens,
                          token_order=self.token_order, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, M, C) merged tokens; (B, N, C) under a size-weighted pooling."""
        x, _, source = self.forward_tokens(x)
        if self.trace_source:
            self.source = source
        if source is not None and self._pools_over_tokens():
            # Token j repeated size_j times: mean = size-weighted mean, max unchanged,
            # attention pooling = proportional attention.
            x = gather_tokens(x, source, backend=self.backend, check_bounds=False)
        return x


class PitomeBlocks(TomeBlocks):
    """PiToMe: ToMe's blocks (sizes, proportional attention, source map, pooling) with
    PiToMe's energy-guided merge plan (see :func:`apply_pitome`)."""

    method = "pitome"

    def __init__(self, blocks, model, backend, prop_attn: bool, trace_source: bool,
                 margins: tuple[float, ...], alpha: float) -> None:
        super().__init__(blocks, model, backend, prop_attn, trace_source, "tome")
        self.margins = margins
        self.alpha = alpha

    def extra_repr(self) -> str:
        margins = ", ".join(f"{m:.3g}" for m in self.margins)
        return (f"method={self.method!r}, backend={self.backend!r}, prop_attn={self.prop_attn}, "
                f"trace_source={self.trace_source}, margins=({margins}), alpha={self.alpha}")

    def _plan(self, metric: torch.Tensor, r: int, index: int):
        return pitome_match(metric, r, margin=self.margins[index], alpha=self.alpha,
                            num_prefix_tokens=self.num_prefix_tokens, backend=self.backend)


class EvitBlocks(TokenReducingBlocks):
    """EViT: after the attention of the given blocks, keep the tokens the class token attends
    to most and fuse the rest into one (see :func:`apply_evit`)."""

    method = "evit"

    def __init__(self, blocks, model, backend, keep_rate: float, layers: tuple[int, ...]):
        super().__init__(blocks, model, backend)
        self.keep_rate = keep_rate
        self.layers = layers

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keep_rate={self.keep_rate}, layers={self.layers}"

    def forward_tokens(self, x: torch.Tensor) -> ReducedTokens:
        """x: (B, N, C) block input -> :class:`ReducedTokens` (size and source None)."""
        prefix = self.num_prefix_tokens
        keeps = _evit_keep_counts(self.keep_rate, self.layers, len(self), x.shape[1], prefix)
        for block, keep in zip(self, keeps):
            branch, internals = _attention_branch(block, x, None, return_lse=keep is not None)
            x = x + branch
            if keep is not None:
                q, k, lse = internals
                # Row 0 is the class token's attention; mean over heads.
                scores = attention_key_mass(
                    q, k, lse, scale=block.attn.scale, query_start=0, query_end=1,
                    backend=self.backend,
                )
                x, _ = keep_topk_tokens(
                    x, scores[:, prefix:], keep, num_prefix_tokens=prefix, fuse_rest=True,
                    backend=self.backend,
                )
            x = x + _mlp_branch(block, x)
        return ReducedTokens(x, None, None)


class ZeroTPruneBlocks(TokenReducingBlocks):
    """Zero-TPrune: after each block's attention, drop ``r`` tokens chosen by importance (a
    PageRank over the attention graph) and similarity (see :func:`apply_zero_tprune`)."""

    method = "zero_tprune"

    def __init__(self, blocks, model, backend, iterations: int):
        super().__init__(blocks, model, backend)
        self.iterations = iterations

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, iterations={self.iterations}"

    def forward_tokens(self, x: torch.Tensor) -> ReducedTokens:
        """x: (B, N, C) block input -> :class:`ReducedTokens` (size and source None)."""
        prefix = self.num_prefix_tokens
        schedule = tome_schedule(self._model.r, len(self), x.shape[1], prefix, name="model.r")
        # the lse only where the importance's implementation reads it (the torch one
        # normalises itself, so the attention keeps its fastest path); always while
        # torch.compile traces (the registry's choice is not traced)
        reads_lse = torch.compiler.is_compiling() or graph_rank_reads_lse(
            x.device, x.dtype, self[0].attn.head_dim, self.backend)
        for block, r in zip(self, schedule):
            branch, internals = _attention_branch(block, x, None, return_lse=r > 0 and reads_lse)
            x = x + branch
            if r > 0:
                q, k, lse = internals
                importance = attention_graph_rank(q, k, lse, scale=block.attn.scale,
                                                  iterations=self.iterations,
                                                  backend=self.backend)
                scores = similarity_prune_scores(importance[:, prefix:], k.mean(1)[:, prefix:])
                x, _ = keep_topk_tokens(x, scores, x.shape[1] - prefix - r,
                                        num_prefix_tokens=prefix, backend=self.backend)
            x = x + _mlp_branch(block, x)
        return ReducedTokens(x, None, None)


# ---- schedules -----------------------------------------------------------------------------


def _parse_r(r, num_blocks: int, name: str) -> list[int]:
    """r (int, per-block list, or (r, inflection)) -> the requested r of every block."""
    if is_int(r):
        requested = [int(r)] * num_blocks
    elif isinstance(r, tuple):
        if len(r) != 2 or not is_int(r[0]) or isinstance(r[1], bool) or not isinstance(
            r[1], (int, float)
        ):
            raise TypeError(
                f"{name} as a tuple must be (r, inflection) with an int r and a float "
                f"inflection, got {r!r}"
            )
        base, inflection = int(r[0]), float(r[1])
        if not -1.0 <= inflection <= 1.0:
            raise ValueError(f"{name}: inflection must lie in [-1, 1], got {inflection}")
        if base < 0:
            raise ValueError(f"{name}: r must be >= 0, got {base}")
        first = int(base * (1.0 - inflection))
        step = 0.0 if num_blocks == 1 else (2 * base - 2 * first) / (num_blocks - 1)
        requested = [int(first + step * i) for i in range(num_blocks)]
    elif isinstance(r, list):
        if len(r) != num_blocks or not all(is_int(v) for v in r):
            raise ValueError(
                f"{name} as a list must hold one int per block ({num_blocks}), got {r!r}"
            )
        requested = [int(v) for v in r]
    else:
        raise TypeError(
            f"{name} must be an int, a list of ints (one per block) or a tuple (r, inflection), "
            f"got {type(r).__name__}"
        )
    negative = [i for i, v in enumerate(requested) if v < 0]
    if negative:
        raise ValueError(f"{name}: r must be >= 0 in every block, got {requested}")
    return requested


def tome_schedule(
    r: TomeR, num_blocks: int, num_tokens: int, num_prefix_tokens: int, *, name: str = "r"
) -> list[int]:
    """The number of tokens each block merges, for ``num_tokens`` tokens entering block 0.

    ``r``: an int (every block), a list of ints (one per block), or ``(r, inflection)``: a
    linear schedule from ``int(r * (1 - inflection))`` in block 0 to ``2 r - that`` in the last
    block (about ``r`` per block on average; inflection in [-1, 1], 0 = constant, > 0
    increasing), as in ToMe. Every block merges at most ``(N - P) // 2`` of its N tokens: a
    larger r is clamped to that, silently, as in ToMe (so a schedule made for a deeper or
    larger model stops merging once few tokens are left).
    """
    schedule = []
    for wanted in _parse_r(r, num_blocks, name):
        schedule.append(min(wanted, (num_tokens - num_prefix_tokens) // 2))
        num_tokens -= schedule[-1]
    return schedule


def _evit_keep_counts(
    keep_rate: float,
    layers: Sequence[int],
    num_blocks: int,
    num_tokens: int,
    num_prefix_tokens: int,
) -> list[Optional[int]]:
    """Per block, how many non-prefix tokens EViT keeps (None: the block does not prune).

    At a pruning block with N tokens, ``ceil(keep_rate * (N - P))`` (rounded up, as EViT); the
    others are fused into one token, so ``P + keep + 1`` tokens go on. A block that would
    keep all its tokens does not prune (and adds no fused token).
    """
    keeps: list[Optional[int]] = [None] * num_blocks
    for i in range(num_blocks):
        if i in layers:
            keep = math.ceil(keep_rate * (num_tokens - num_prefix_tokens))
            if keep < num_tokens - num_prefix_tokens:
                keeps[i] = keep
                num_tokens = num_prefix_tokens + keep + 1
    return keeps


# ---- patching ------------------------------------------------------------------------------


@dataclass
class TokenReductionPatch:
    """What :func:`apply_tome` / :func:`apply_evit` did: ``method``, ``backend``, the number
    of ``blocks``, and the attention swap it made (``attention``, None if the model's attention
    was already fastvl's)."""

    model: nn.Module = field(repr=False)
    method: str
    backend: str
    blocks: int
    attention: Optional[TimmPatch]
    _wrapper: TokenReducingBlocks = field(repr=False, default=None)

    def remove(self) -> bool:
        """Undo the patch (False if it was already undone)."""
        if self.model.blocks is not self._wrapper:
            return False
        return remove_token_reduction(self.model)

    def __str__(self) -> str:
        attention = ("attention already fastvl's" if self.attention is None
                     else f"{len(self.attention.replaced)} attention modules swapped")
        return (f"fastvl.patch.timm: {self.method} on {self.blocks} blocks, backend "
                f"{self.backend!r}, {attention}")


def _check_model(op: str, model) -> None:
    """ValueError / TypeError unless ``model`` is an unpatched timm ViT of supported blocks."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"{op}: model must be a timm VisionTransformer (or subclass), got "
            f"{type(model).__module__}.{type(model).__qualname__}"
        )
    if isinstance(model.blocks, TokenReducingBlocks):
        raise ValueError(
            f"{op}: model already has token reduction ({model.blocks.method}); call the "
            "handle's remove() (or remove_token_reduction(model)) first"
        )
    if type(model.blocks) is not nn.Sequential:
        raise ValueError(
            f"{op}: model.blocks must be an nn.Sequential, got {type(model.blocks).__qualname__}"
        )
    problems = []
    for name, block in model.blocks.named_children():
        if type(block) not in SUPPORTED_BLOCKS:
            problems.append(
                f"blocks.{name} is {type(block).__qualname__} (supported: Block, ResPostBlock; "
                "ParallelScalingBlock computes attention inline, ParallelThingsBlock runs "
                "several attentions in parallel, subclasses may change forward)"
            )
        elif type(block.attn) not in (TimmAttention, Attention):
            problems.append(
                f"blocks.{name}.attn is {type(block.attn).__qualname__}, not timm.layers."
                "Attention (rope, relative position bias and the like are not supported)"
            )
    if problems:
        raise ValueError(f"{op}: unsupported model structure: " + "; ".join(problems))


def _check_flags(op: str, **flags) -> None:
    """TypeError unless every flag is a bool."""
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {type(flag).__name__}")


def _install(model: VisionTransformer, make_wrapper, backend: str) -> TokenReductionPatch:
    """Swap fastvl attention into the blocks if needed, then ``model.blocks`` for the wrapper."""
    # Imported here: fastvl.patch.timm re-exports this module.
    from fastvl.patch.timm import apply as apply_attention

    blocks = model.blocks
    attention_patch = None
    if any(type(block.attn) is TimmAttention for block in blocks):
        attention_patch = apply_attention(blocks, backend=backend)
    wrapper = make_wrapper(blocks)
    object.__setattr__(wrapper, "_attention_patch", attention_patch)
    model.blocks = wrapper
    return TokenReductionPatch(
        model, wrapper.method, backend, len(wrapper), attention_patch, wrapper
    )


def apply_tome(
    model: nn.Module,
    r: TomeR,
    *,
    prop_attn: bool = True,
    trace_source: bool = False,
    token_order: str = "tome",
    backend: str = "auto",
) -> TokenReductionPatch:
    """Token Merging (ToMe) in a timm VisionTransformer, in place; returns the handle.

    In every block, after attention, the ``r`` most similar token pairs merge (bipartite
    matching on the attention keys averaged over heads, :func:`fastvl.ops.tome_match`;
    size-weighted averages, :func:`fastvl.ops.tome_merge`); the prefix tokens stay first and
    unmerged. With the default ``token_order="tome"`` this is facebookresearch/ToMe's
    algorithm (its ``[prefix, unmerged A, B]`` token order, on which the next block's split
    runs): on models without LayerScale and qk-norm the same logits to float64 roundoff;
    LayerScale and qk-norm are kept (ToMe's patch drops them).

    Args:
        model: a timm ``VisionTransformer`` of ``Block`` / ``ResPostBlock`` blocks.
        r: tokens merged per block: an int, a list (one per block) or ``(r, inflection)``
            (see :func:`tome_schedule`). Stored as ``model.r``, a plain attribute read at
            every forward: change it between calls (under torch.compile a new value
            recompiles).
        prop_attn: proportional attention, ``attention(..., key_bias=log(size))`` on the
            fastvl op, from the first merge on (before it the sizes are all 1).
        trace_source: track the (B, N) source map (which output token holds each input
            token, :func:`fastvl.ops.tome_merge_source`) and store the last one in
            ``model.blocks.source``: the only state a forward writes, and only when tracing.
            ``model.blocks.forward_tokens(x)`` returns it without storing anything.
        token_order: "tome" (ToMe's order, the default) or "spatial" (merged tokens keep
            their original order, so the next block's split stays spatially interleaved:
            a different algorithm from the second merging block on).
        backend: the backend of every fastvl op ("auto" or an implementation name listed by
            ``python -m fastvl info``), fixed now.

    Pooling: ``global_pool="token"`` (and "") read the merged tokens; "avg", "avgmax", "map"
    and "prr" pool over tokens, so there the blocks end by expanding the merged tokens back
    to the original positions (a gather by the source map, tracked for that): the mean is
    then size-weighted, the max unchanged, attention pooling proportional. ``forward_features``
    then returns (B, N, C), as unpatched.

    Raises:
        TypeError / ValueError: not a timm VisionTransformer; unsupported blocks; already
            reduced; r of a bad type or negative (a block's r above what it can merge,
            ``(N - P) // 2``, is clamped, as in ToMe); unknown token_order or backend.
    """
    op = "apply_tome"
    _check_model(op, model)
    check_op_backend(op, backend, "attention", "tome_match", "tome_merge", "gather_tokens")
    _check_flags(op, prop_attn=prop_attn, trace_source=trace_source)
    check_token_order(op, token_order)
    _parse_r(r, len(model.blocks), f"{op}: r")
    handle = _install(
        model,
        lambda blocks: TomeBlocks(blocks, model, backend, prop_attn, trace_source, token_order),
        backend,
    )
    model.r = r
    return handle


def apply_evit(
    model: nn.Module,
    keep_rate: float,
    layers: Sequence[int],
    *,
    backend: str = "auto",
) -> TokenReductionPatch:
    """EViT token reorganisation in a timm VisionTransformer with a class token, in place.

    In each block of ``layers``, after attention, the class token's attention to every
    non-prefix token (mean over heads of query row 0, :func:`fastvl.ops.attention_key_mass`
    from the attention's lse; no eager attention matrix) ranks the tokens: the best
    ``ceil(keep_rate * (N - P))`` are kept in their original order, the rest fused into one
    appended token weighted by those scores (:func:`fastvl.ops.keep_topk_tokens` with
    ``fuse_rest``), as EViT. The scores are constants (no gradient reaches the attention
    through them, unlike EViT's eager version).

    Args:
        model: a timm ``VisionTransformer`` with a class token, ``Block`` / ``ResPostBlock``.
        keep_rate: float in (0, 1], the fraction of non-prefix tokens kept (1: none dropped).
        layers: distinct block indices in [0, depth) where tokens are pruned (EViT on
            DeiT-S: (3, 6, 9)).
        backend: the backend of every fastvl op ("auto" or an implementation name listed by
            ``python -m fastvl info``), fixed now.

    The attention of the pruning blocks needs the fastvl op path (for the lse): in training,
    attention dropout there raises. Pooling is left as is (the class token, or the mean of the
    remaining tokens).
    """
    op = "apply_evit"
    _check_model(op, model)
    check_op_backend(op, backend, "attention", "attention_key_mass", "gather_tokens")
    if not model.has_class_token:
        raise ValueError(
            f"{op}: EViT ranks tokens by the class token's attention, but model has no class "
            "token (class_token=False)"
        )
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)):
        raise TypeError(f"{op}: keep_rate must be a float, got {type(keep_rate).__name__}")
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"{op}: keep_rate must lie in (0, 1], got {keep_rate}")
    depth = len(model.blocks)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not all(
        is_int(i) for i in layers
    ):
        raise TypeError(f"{op}: layers must be a sequence of ints (block indices), got {layers!r}")
    if any(not 0 <= i < depth for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(
            f"{op}: layers must be distinct block indices in [0, {depth}) (depth = {depth}), "
            f"got {list(layers)}"
        )
    layers = tuple(sorted(int(i) for i in layers))
    return _install(
        model, lambda blocks: EvitBlocks(blocks, model, backend, float(keep_rate), layers),
        backend,
    )


def apply_zero_tprune(
    model: nn.Module,
    r: TomeR,
    *,
    iterations: int = 10,
    backend: str = "auto",
) -> TokenReductionPatch:
    """Zero-TPrune (zero-shot token pruning) in a timm VisionTransformer, in place.

    In every block, after attention, ``r`` tokens are dropped (not merged):

    1. importance (I-stage): the weighted PageRank of the attention graph,
       :func:`fastvl.ops.attention_graph_rank` (``s <- A^T s`` from uniform, per head, from
       the attention's lse: no N x N matrix), averaged over heads;
    2. similarity (S-stage): the non-prefix tokens are split by importance, the more
       important half kept; of the other half the ``r`` tokens whose attention key (averaged
       over heads) has the highest cosine similarity to a key of the important half are
       dropped (:func:`fastvl.ops.similarity_prune_scores`); the rest keep their order
       (:func:`fastvl.ops.keep_topk_tokens`).

    Choices where the paper leaves room: heads are averaged (no head filter or informative-
    region weighting), ``iterations`` power steps (default 10), the sequential importance
    split into halves, keys as the similarity features, the prefix tokens part of the graph
    but never dropped. No fine-tuning, no gradient through the selection.

    Args:
        model: a timm ``VisionTransformer`` of ``Block`` / ``ResPostBlock`` blocks.
        r: tokens dropped per block, as :func:`apply_tome`'s ``r`` (int, per-block list or
            ``(r, inflection)``; at most half of a block's non-prefix tokens); stored as
            ``model.r``, read at every forward.
        iterations: power-iteration steps of the importance (int >= 1).
        backend: the backend of every fastvl op, fixed now.

    The attention of every block then needs the fastvl op path (for the lse): attention
    dropout in training raises. Undo with the handle's ``remove()``.
    """
    op = "apply_zero_tprune"
    _check_model(op, model)
    check_op_backend(op, backend, "attention", "attention_key_mass", "gather_tokens")
    if not (isinstance(iterations, int) and not isinstance(iterations, bool)):
        raise TypeError(f"{op}: iterations must be an int, got {type(iterations).__name__}")
    if iterations < 1:
        raise ValueError(f"{op}: iterations must be >= 1, got {iterations}")
    _parse_r(r, len(model.blocks), f"{op}: r")
    handle = _install(
        model, lambda blocks: ZeroTPruneBlocks(blocks, model, backend, iterations), backend,
    )
    model.r = r
    return handle


def apply_pitome(
    model: nn.Module,
    r: TomeR,
    *,
    margins: Optional[Sequence[float]] = None,
    alpha: float = 1.0,
    prop_attn: bool = True,
    trace_source: bool = False,
    backend: str = "auto",
) -> TokenReductionPatch:
    """PiToMe (spectrum-preserving token merging) in a timm VisionTransformer, in place.

    As :func:`apply_tome`, except for which tokens merge: in each block the non-prefix tokens
    get PiToMe's energy (:func:`fastvl.ops.pitome_energy` on the keys averaged over heads,
    tiled on the triton backend), the 2r most energetic alternate between merging tokens and
    destinations, each merging token goes to its most similar destination, and the rest are
    kept (:func:`fastvl.ops.pitome_match`); then the size-weighted merge, proportional
    attention, the source map and the pooling rules of :func:`apply_tome`.

    Args:
        model: a timm ``VisionTransformer`` of ``Block`` / ``ResPostBlock`` blocks.
        r: tokens merged per block, as :func:`apply_tome`'s (``model.r``).
        margins: the margin of each block; default PiToMe's ``0.9 - 0.8 * i / depth``
            (:func:`fastvl.ops.pitome_margins`).
        alpha: the margin function's negative scale (PiToMe: 1).
        prop_attn, trace_source, backend: as :func:`apply_tome`'s.
    """
    op = "apply_pitome"
    _check_model(op, model)
    check_op_backend(op, backend, "attention", "pitome_energy", "tome_merge", "gather_tokens")
    _check_flags(op, prop_attn=prop_attn, trace_source=trace_source)
    depth = len(model.blocks)
    margins, alpha = check_pitome_options(op, margins, alpha, depth)
    _parse_r(r, depth, f"{op}: r")
    handle = _install(
        model,
        lambda blocks: PitomeBlocks(blocks, model, backend, prop_attn, trace_source, margins,
                                    alpha),
        backend,
    )
    model.r = r
    return handle


def remove_token_reduction(model: nn.Module) -> bool:
    """Undo :func:`apply_tome` / :func:`apply_pitome` / :func:`apply_evit` /
    :func:`apply_zero_tprune` on ``model``; False if it has none.

    The original ``nn.Sequential`` comes back holding the blocks the wrapper holds now; the
    timm attention modules come back if the patch swapped them; ``model.r`` is deleted.
    """
    wrapper = getattr(model, "blocks", None)
    if not isinstance(wrapper, TokenReducingBlocks):
        return False
    original = wrapper._original_blocks
    for name, block in wrapper._modules.items():
        original._modules[name] = block
    original.train(wrapper.training)
    model.blocks = original
    if wrapper._attention_patch is not None:
        wrapper._attention_patch.remove()
    if isinstance(wrapper, (TomeBlocks, ZeroTPruneBlocks)) and "r" in vars(model):  # PiToMe too
        del model.r
    return True


# ---- visualisation -------------------------------------------------------------------------


def render_tome_regions(
    image: torch.Tensor,
    source: torch.Tensor,
    patch_size: int,
    path,
    *,
    num_prefix_tokens: int = 1,
) -> None:
    """Write a PNG of ``image`` showing the patches each merged token holds (PIL).

    Every region (the patches one token holds) is painted with its mean colour and outlined.

    Args:
        image: (3, H, W) float in [0, 1] or uint8; H and W multiples of ``patch_size``.
        source: (N,) or (1, N) int64 source map of this image (``model.blocks.source[i]``
            with ``trace_source=True``), N = num_prefix_tokens + (H / p) * (W / p).
        patch_size: the ViT's patch size p in pixels.
        path: where to write the PNG (str or path-like); it is H x W pixels.
    """
    from PIL import Image

    op = "render_tome_regions"
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{op}: image must be a (3, H, W) tensor, got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else image!r}")
    if not is_int(patch_size) or patch_size <= 0:
        raise ValueError(f"{op}: patch_size must be a positive int, got {patch_size!r}")
    _, height, width = image.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"{op}: image size {height} x {width} must be a multiple of patch_size {patch_size}"
        )
    grid_h, grid_w = height // patch_size, width // patch_size
    if not isinstance(source, torch.Tensor) or source.dtype != torch.int64:
        raise TypeError(f"{op}: source must be an int64 tensor")
    source = source.reshape(-1)
    if source.numel() != num_prefix_tokens + grid_h * grid_w:
        raise ValueError(
            f"{op}: source must hold num_prefix_tokens + (H / p) * (W / p) = "
            f"{num_prefix_tokens} + {grid_h * grid_w} entries, got {source.numel()}"
        )
    pixels = image.detach().cpu().double()
    if image.dtype == torch.uint8:
        pixels = pixels / 255.0
    region = source[num_prefix_tokens:].cpu().view(grid_h, grid_w)
    region = region.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)  # (H, W)
    flat_region = region.reshape(-1)
    count = torch.zeros(int(flat_region.max()) + 1, dtype=torch.float64)
    count.index_add_(0, flat_region, torch.ones_like(flat_region, dtype=torch.float64))
    colour_sum = torch.zeros(3, count.numel(), dtype=torch.float64)
    colour_sum.index_add_(1, flat_region, pixels.reshape(3, -1))
    painted = (colour_sum / count.clamp_min(1))[:, flat_region].view(3, height, width)
    edge = torch.zeros(height, width, dtype=torch.bool)
    edge[:, 1:] |= region[:, 1:] != region[:, :-1]
    edge[1:, :] |= region[1:, :] != region[:-1, :]
    painted = torch.where(edge, torch.ones_like(painted), painted)
    array = (painted.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path, format="PNG")
