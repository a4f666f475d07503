"""host_overhead cases: the host side of one call of each op vs the plain-PyTorch chain it
replaces (``python -m fastvl bench --ops host_overhead``).

At ViT sizes a GPU kernel takes tens of microseconds, so validation, dispatch, autograd
bookkeeping and launch preparation decide whether a drop-in is faster. These cases use tiny
CPU tensors (kernels cost next to nothing) and are built and timed inside
:func:`fastvl.bench.host_overhead.gpu_path`: ``backend="auto"`` dispatches as on a GPU and
Triton launches are skipped and counted. The runner reports us/call, device launches per call
(:func:`~fastvl.bench.host_overhead.count_launches`), host syncs per call and the ratio to the
plain chain (target: <= 1.3x).

Implementations: ``plain`` (the baseline: the PyTorch call chain the op replaces),
``fastvl[auto]`` (what a GPU would run) and ``fastvl[triton]`` (fastvl's Triton kernels). Modes
``forward`` (inputs require grad, as in training) and ``forward+backward``
(:func:`~fastvl.bench.cases.with_backward`). Outside ``gpu_path`` (tests) every implementation
computes real results on CPU and they are checked against each other; ``fastvl[triton]`` then
runs in the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

import fastvl.ops
from fastvl.bench.cases import FORWARD, MODES, Built, register_case, with_backward
from fastvl.bench.suites.lora import boolean_indexing_lora_linear
from fastvl.bench.suites.tome import _pair_tokens, plain_tome_step
from fastvl.ops.registry import OPS
from fastvl.reference import masking as reference_masking
from fastvl.reference import patch_embed as reference_patch_embed

OP = "host_overhead"
PLAIN = "plain"
AUTO = "fastvl[auto]"
TRITON = "fastvl[triton]"
IMPLS = (PLAIN, AUTO, TRITON)
CPU = torch.device("cpu")
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # float32: kernels and chains sum in other orders


def _dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    return (torch.float32,)  # CPU tensors on every machine: host time does not depend on it


def _randn(generator, *shape, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).requires_grad_(grad)


def _fastvl(built: Built, op_name: str, call: Callable[[str], Any]) -> None:
    """``fastvl[auto]`` and, where ``op_name`` has a triton backend that can run here (on a
    GPU path, or interpreted), ``fastvl[triton]``; ``call(backend)`` makes one call."""
    built.add(AUTO, lambda: call("auto"))
    op = OPS.get(op_name)
    if op is None or "triton" not in op.impls:
        built.skip(TRITON, f"{op_name} has no triton backend")
        return
    reasons = op.device_reasons("triton", CPU)
    if reasons:
        built.skip(TRITON, "; ".join(reasons))
        return
    built.add(TRITON, lambda: call("triton"))


def _finish(built: Built, mode: str, inputs, make_grad: Callable[[Any], Any],
            select: Callable[[Any], Any] = lambda out: out) -> Built:
    """forward+backward: every implementation becomes forward + ``autograd.grad`` w.r.t.
    ``inputs`` of ``select(out)`` with one fixed gradient, ``make_grad`` of the plain one."""
    if mode == FORWARD:
        return built
    grad = make_grad(select(built.impls[PLAIN]()))
    for name, fn in list(built.impls.items()):
        built.impls[name] = with_backward(lambda fn=fn: select(fn()), inputs, grad)
    built.compare = {}
    return built


def _like(generator):
    return lambda out: torch.randn(out.shape, generator=generator, dtype=out.dtype)


def host_case(name: str, description: str, modes=MODES):
    """Register ``build(dtype, mode) -> Built`` as the host-overhead case ``name``."""

    def decorate(build):
        register_case(
            op=OP, name=name, description=description, impls=IMPLS, baseline=PLAIN,
            modes=modes, dtypes=_dtypes, host_overhead=True,
        )(lambda device, dtype, scale, mode: build(dtype, mode))
        return build

    return decorate


# --------------------------------------------------------------------------- attention


def _attention_case(mode: str, heads: int, kv_heads: int, causal: bool, key_bias: bool):
    generator = torch.Generator().manual_seed(0)
    q = _randn(generator, 1, heads, 8, 16, grad=True)
    k, v = (_randn(generator, 1, kv_heads, 8, 16, grad=True) for _ in range(2))
    bias = torch.randn(1, 8, generator=generator) if key_bias else None
    mask = bias[:, None, None, :] if key_bias else None  # ToMe's log(size) as SDPA's attn_mask
    built = Built(shapes={"q": list(q.shape), "k": list(k.shape)}, **TOLERANCE)
    built.add(PLAIN, lambda: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=heads != kv_heads))
    _fastvl(built, "attention", lambda backend: fastvl.ops.attention(
        q, k, v, causal=causal, key_bias=bias, backend=backend))
    return _finish(built, mode, (q, k, v), _like(generator))


@host_case("attention", "attention (1, 2, 8, 16) vs F.scaled_dot_product_attention")
def _attention(dtype, mode):
    return _attention_case(mode, 2, 2, causal=False, key_bias=False)


@host_case("attention-causal-gqa",
           "causal GQA attention q (1, 4, 8, 16), k/v (1, 2, 8, 16) vs SDPA(is_causal, "
           "enable_gqa)")
def _attention_causal_gqa(dtype, mode):
    return _attention_case(mode, 4, 2, causal=True, key_bias=False)


@host_case("attention-key-bias",
           "attention with a (B, Nk) key bias (ToMe) vs SDPA with the bias as attn_mask")
def _attention_key_bias(dtype, mode):
    return _attention_case(mode, 2, 2, causal=False, key_bias=True)


@host_case("varlen_attention",
           "varlen attention, 2 packed sequences (5 + 7 tokens, H 2, D 16) vs one SDPA call "
           "on the packed tokens with a block-diagonal mask (built once, outside the call)")
def _varlen(dtype, mode):
    generator = torch.Generator().manual_seed(0)
    lengths = (5, 7)
    total = sum(lengths)
    q, k, v = (_randn(generator, total, 2, 16, grad=True) for _ in range(3))
    cu_seqlens = torch.tensor([0, 5, total], dtype=torch.int32)
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    block_mask = sequence[:, None] == sequence[None, :]  # (total, total)

    def plain():
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=block_mask,
        )
        return out[0].transpose(0, 1)

    built = Built(shapes={"q": list(q.shape), "cu_seqlens": cu_seqlens.tolist()}, **TOLERANCE)
    built.add(PLAIN, plain)
    _fastvl(built, "varlen_attention", lambda backend: fastvl.ops.varlen_attention(
        q, k, v, cu_seqlens, cu_seqlens, max(lengths), max(lengths), backend=backend))
    return _finish(built, mode, (q, k, v), _like(generator))


@host_case("attention_key_mass",
           "key mass of all queries, mean over heads, (1, 2, 8, 16) vs the materialised "
           "softmax summed over queries", modes=(FORWARD,))
def _key_mass(dtype, mode):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (_randn(generator, 1, 2, 8, 16) for _ in range(3))
    _, lse = fastvl.ops.attention(q, k, v, return_lse=True, backend="torch")
    scale = 1.0 / math.sqrt(16)
    built = Built(shapes={"q": list(q.shape)}, **TOLERANCE)
    built.add(PLAIN, lambda: (q @ k.transpose(-1, -2) * scale).softmax(-1).sum(2).mean(1))
    _fastvl(built, "attention_key_mass",
            lambda backend: fastvl.ops.attention_key_mass(q, k, lse, backend=backend))
    return built


# --------------------------------------------------------------------------- tokens


@host_case("gather_tokens", "gather_tokens x (2, 16, 32), index (2, 6), check_bounds=False (no "
           "host sync, as torch.gather) vs torch.gather")
def _gather(dtype, mode):
    generator = torch.Generator().manual_seed(0)
    x = _randn(generator, 2, 16, 32, grad=True)
    index = torch.randint(0, 16, (2, 6), generator=generator)
    built = Built(shapes={"x": list(x.shape), "index": list(index.shape)}, **TOLERANCE)
    built.add(PLAIN, lambda: x.gather(1, index[..., None].expand(-1, -1, x.shape[-1])))
    _fastvl(built, "gather_tokens",
            lambda backend: fastvl.ops.gather_tokens(x, index, backend=backend,
                                                     check_bounds=False))
    return _finish(built, mode, (x,), _like(generator))


@host_case("tome_match+tome_merge",
           "one ToMe step, r 4 of 17 tokens (metric (2, 17, 16), x (2, 17, 32)) vs plain-PyTorch "
           "bipartite matching + merge (scatter_reduce)")
def _tome(dtype, mode):
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 17, 16, generator=generator)
    x = _randn(generator, 2, 17, 32, grad=True)
    size = torch.ones(2, 17)
    r = 4
    built = Built(shapes={"metric": list(metric.shape), "x": list(x.shape), "r": r}, **TOLERANCE)
    built.add(PLAIN, lambda: plain_tome_step(metric, x, size, r))

    def step(backend):
        plan = fastvl.ops.tome_match(metric, r, backend=backend)
        return fastvl.ops.tome_merge(plan, x, backend=backend)

    _fastvl(built, "tome_match", step)
    built.compare = dict.fromkeys(
        (AUTO, TRITON), lambda actual, expected: _pair_tokens(actual, expected, **TOLERANCE)
    )
    # backward: the merged tokens' gradient w.r.t. x, with a gradient that does not depend on
    # the token order (the two orders differ)
    return _finish(built, mode, (x,), lambda merged: torch.ones_like(merged),
                   select=lambda out: out[0])


@host_case("keep_topk_tokens",
           "keep the class token + top 6 of 16 tokens by score, x (2, 17, 32) vs "
           "topk + sort + torch.gather")
def _keep_topk(dtype, mode):
    generator = torch.Generator().manual_seed(0)
    x = _randn(generator, 2, 17, 32, grad=True)
    scores = torch.rand(2, 16, generator=generator)
    keep = 6

    def plain():
        kept = scores.topk(keep, dim=1).indices.sort(dim=1).values + 1
        index = torch.cat([kept.new_zeros(kept.shape[0], 1), kept], dim=1)
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1])), index

    built = Built(shapes={"x": list(x.shape), "keep": keep}, **TOLERANCE)
    built.add(PLAIN, plain)
    _fastvl(built, "gather_tokens",
            lambda backend: fastvl.ops.keep_topk_tokens(x, scores, keep, backend=backend))
    return _finish(built, mode, (x,), _like(generator), select=lambda out: out[0])


# --------------------------------------------------------------------------- MAE


def _masking(generator, batch: int, patches: int):
    noise = torch.rand(batch, patches, generator=generator)
    return reference_masking.random_masking(noise, 0.75)


@host_case("masked_patch_embed",
           "MAE encoder input: imgs (2, 3, 16, 16), patch 4, D 32, keep 4 of 16, class token, "
           "check_bounds=False vs conv patch embed + pos_embed + gather + cat (fastvl.reference)")
def _patch_embed(dtype, mode):
    generator = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 16, 16, generator=generator)
    weight = _randn(generator, 32, 3, 4, 4, grad=True)
    bias, cls = _randn(generator, 32, grad=True), _randn(generator, 1, 1, 32, grad=True)
    pos = _randn(generator, 1, 17, 32, grad=True)
    ids_keep, _, _ = _masking(generator, 2, 16)
    built = Built(shapes={"imgs": list(imgs.shape), "ids_keep": list(ids_keep.shape)},
                  **TOLERANCE)
    built.add(PLAIN, lambda: reference_patch_embed.masked_patch_embed(
        imgs, weight, bias, pos, ids_keep, (4, 4), cls))
    _fastvl(built, "masked_patch_embed", lambda backend: fastvl.ops.masked_patch_embed(
        imgs, weight, bias, pos, ids_keep, 4, cls_token=cls, backend=backend,
        check_bounds=False))
    return _finish(built, mode, (weight, bias, pos, cls), _like(generator))


@host_case("unshuffle_with_mask_token",
           "MAE decoder input: x (2, 1 + 4, 32), 16 patches, mask token and pos_embed vs "
           "cat + gather + add (fastvl.reference)")
def _unshuffle(dtype, mode):
    generator = torch.Generator().manual_seed(0)
    x = _randn(generator, 2, 5, 32, grad=True)
    token = _randn(generator, 1, 1, 32, grad=True)
    pos = _randn(generator, 1, 17, 32, grad=True)
    _, ids_restore, _ = _masking(generator, 2, 16)
    built = Built(shapes={"x": list(x.shape), "ids_restore": list(ids_restore.shape)},
                  **TOLERANCE)
    built.add(PLAIN, lambda: reference_masking.unshuffle_with_mask_token(
        x, ids_restore, token, 1, pos))
    _fastvl(built, "unshuffle_with_mask_token", lambda backend:
            fastvl.ops.unshuffle_with_mask_token(x, ids_restore, token, pos_embed=pos,
                                                 backend=backend))
    return _finish(built, mode, (x, token, pos), _like(generator))


@host_case("masked_pixel_loss",
           "MAE loss: pred (2, 16, 48), imgs (2, 3, 16, 16), patch 4, norm_pix vs patchify + "
           "normalise + masked mean (fastvl.reference)")
def _pixel_loss(dtype, mode):
    generator = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 16, 16, generator=generator)
    pred = _randn(generator, 2, 16, 48, grad=True)
    _, _, mask = _masking(generator, 2, 16)
    built = Built(shapes={"pred": list(pred.shape), "imgs": list(imgs.shape)}, **TOLERANCE)
    built.add(PLAIN, lambda: reference_masking.masked_pixel_loss(pred, imgs, mask, (4, 4)))
    _fastvl(built, "masked_pixel_loss", lambda backend: fastvl.ops.masked_pixel_loss(
        pred, imgs, mask, 4, backend=backend))
    return _finish(built, mode, (pred,), lambda loss: torch.ones_like(loss))


@host_case("random_masking",
           "MAE random masking of 16 patches, B 2, ratio 0.75, given noise vs argsort + "
           "argsort + compare (fastvl.reference)", modes=(FORWARD,))
def _random_masking(dtype, mode):
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 16, generator=generator)
    built = Built(shapes={"noise": list(noise.shape)})
    built.add(PLAIN, lambda: reference_masking.random_masking(noise, 0.75))
    _fastvl(built, "random_masking",
            lambda backend: fastvl.ops.random_masking(2, 16, 0.75, noise=noise))
    return built


# --------------------------------------------------------------------------- LoRA


@host_case("lora_linear",
           "LoRA linear x (2, 8, 32) -> 48, r 4, bias, frozen base vs F.linear + peft's "
           "lora_B(lora_A(x)) * scaling")
def _lora(dtype, mode):
    generator = torch.Generator().manual_seed(0)
    x = _randn(generator, 2, 8, 32, grad=True)
    weight, bias = torch.randn(48, 32, generator=generator), torch.randn(48, generator=generator)
    lora_a, lora_b = _randn(generator, 4, 32, grad=True), _randn(generator, 48, 4, grad=True)
    built = Built(shapes={"x": list(x.shape), "weight": list(weight.shape), "r": 4}, **TOLERANCE)
    built.add(PLAIN, lambda: F.linear(x, weight, bias)
              + F.linear(F.linear(x, lora_a), lora_b) * 2.0)
    _fastvl(built, "lora_linear", lambda backend: fastvl.ops.lora_linear(
        x, weight, bias, lora_a, lora_b, 2.0, backend=backend))
    return _finish(built, mode, (x, lora_a, lora_b), _like(generator))


@host_case("routed_lora_linear",
           "routed LoRA x (16, 32) -> 48, 2 adapters of r 4, routes in [-1, 2), check_route=False "
           "vs the PLoRA way: base linear + per adapter boolean indexing and index_put")
def _routed_lora(dtype, mode):
    generator = torch.Generator().manual_seed(0)
    x = _randn(generator, 16, 32, grad=True)
    weight = torch.randn(48, 32, generator=generator)
    lora_a, lora_b = _randn(generator, 2, 4, 32, grad=True), _randn(generator, 2, 48, 4, grad=True)
    route = torch.randint(-1, 2, (16,), generator=generator)
    built = Built(shapes={"x": list(x.shape), "adapters": 2, "r": 4}, **TOLERANCE)
    built.add(PLAIN, lambda: boolean_indexing_lora_linear(x, weight, lora_a, lora_b, 2.0, route))
    _fastvl(built, "routed_lora_linear", lambda backend: fastvl.ops.routed_lora_linear(
        x, weight, None, lora_a, lora_b, 2.0, route, backend=backend, check_route=False))
    return _finish(built, mode, (x, lora_a, lora_b), _like(generator))
