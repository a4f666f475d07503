"""ToMe cases: the merge step (op ``tome``) and end-to-end timm ViTs (op ``vit_tome``).

``tome``: one ToMe step as a ViT block runs it, after attention: plan the merge on the keys
averaged over heads (the metric, (B, N, 64)) and merge the tokens x (B, N, C) and their sizes.
``fastvl[<backend>]`` is :func:`fastvl.ops.tome_match` + :func:`fastvl.ops.tome_merge` on each
backend that can serve the call; the baseline ``torch ToMe`` is :func:`plain_tome_step`,
ToMe's bipartite soft matching written the plain-PyTorch way (a dense similarity matrix,
argsort, gather and ``scatter_reduce``). forward+backward adds the gradient w.r.t. x through
the merge (the matching is not differentiable).

Both put the merged tokens in ToMe's order (``token_order="tome"``, fastvl's default), but
the comparison does not rely on it: forward results are compared as sets, each merged token
of one paired with the nearest token (x and size) of the other, the pairing one to one, and
paired tokens must match. The backward is order-independent too: the gradient flowing back
is the merged output itself (the gradient of ``sum(merged^2) / 2``), and the gradients w.r.t.
x (in input order for both) must match elementwise.

``vit_tome``: images/s of a timm ViT (cases built by :func:`reduced_vit_case`, which the
other token-reduction suites share) (``pretrained=False``, eval, ``torch.inference_mode``):
unpatched timm (its attention is SDPA; the baseline), ``torch ToMe r<r>`` (the model run block
by block with :func:`plain_tome_step` after each attention and proportional attention through
an SDPA float mask, see :func:`plain_tome_vit`) and ``fastvl ToMe r<r>``
(:func:`fastvl.patch.timm.apply_tome` on a copy of the model, backend "auto"). The token order
decides the next block's alternating split; both use ToMe's, so they compute the same
model. ToMe changes the model's output, so each fastvl ToMe is checked against the plain ToMe
with the same r; the plain ones are not compared with anything else.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F

from fastvl.bench.cases import (
    BACKWARD,
    FASTVL_IMPLS,
    FORWARD,
    Built,
    Scale,
    fastvl_impls,
    register_case,
    requires_module,
)
from fastvl.bench.suites.attention import TOLERANCES
from fastvl.ops import tome_match, tome_merge

STEP_BASELINE = "torch ToMe"
STEP_IMPLS = (*FASTVL_IMPLS, STEP_BASELINE)
METRIC_DIM = 64  # ToMe's metric: the keys averaged over heads, head dim 64 in ViT-B/L/16

VIT_RS = (8, 13, 16)
# Relative error ||a - e|| / ||e|| allowed between the logits of fastvl ToMe and plain ToMe:
# the two run different (equally valid) attention kernels and similarity arithmetic, so in
# half precision a near-tie in the matching can occasionally merge a different pair.
VIT_LOGITS_RTOL = {torch.float16: 3e-2, torch.bfloat16: 6e-2, torch.float32: 1e-4}


# --------------------------------------------------------------------------- the ToMe step


def plain_tome_step(
    metric: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ToMe merge step in plain PyTorch, class token (token 0) protected.

    metric: (B, N, Cm); x: (B, N, C); size: (B, N) float, patches per token.
    Returns (merged (B, N - r, C), size (B, N - r)): the size-weighted mean of each group, in
    ToMe's order (unmerged even tokens by position, class token first, then the odd tokens).

    Even positions are the candidates, odd positions the destinations; each candidate's score
    is its best cosine similarity to a destination, and the r best candidates are summed
    into their destinations (``scatter_reduce``), weighted by size.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    similarity = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, N_even, N_odd)
    similarity[:, 0] = -torch.inf  # the class token is never merged
    score, partner = similarity.max(dim=-1)  # (B, N_even)
    ranked = score.argsort(dim=-1, descending=True)
    merging = ranked[:, :r]
    staying = ranked[:, r:].sort(dim=-1).values

    def rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))

    def merge(t: torch.Tensor) -> torch.Tensor:  # t: (B, N, K) size-weighted values
        even, odd = t[:, ::2], t[:, 1::2]
        into = partner.gather(1, merging)[..., None].expand(-1, -1, t.shape[-1])
        odd = odd.scatter_reduce(1, into, rows(even, merging), reduce="sum")
        return torch.cat([rows(even, staying), odd], dim=1)

    weights = size[..., None]
    total = merge(weights)  # (B, N - r, 1) in size's dtype
    merged = merge(x * weights.to(x.dtype)) / total.to(x.dtype)
    return merged, total[..., 0]


def _pair_tokens(actual, expected, rtol: float, atol: float) -> Optional[str]:
    """Compare two (merged (B, M, C), size (B, M)) results as sets of tokens (see module)."""
    (x_a, size_a), (x_e, size_e) = actual, expected
    if x_a.shape != x_e.shape or size_a.shape != size_e.shape:
        return (f"shapes {tuple(x_a.shape)}, {tuple(size_a.shape)} vs "
                f"{tuple(x_e.shape)}, {tuple(size_e.shape)}")
    tokens_a, tokens_e = (
        torch.cat([x.double(), s.double()[..., None]], dim=-1)
        for x, s in ((x_a, size_a), (x_e, size_e))
    )
    nearest = torch.cdist(tokens_a, tokens_e).argmin(dim=-1)  # (B, M) into expected
    positions = torch.arange(nearest.shape[1], device=nearest.device)
    if not torch.equal(nearest.sort(dim=-1).values, positions.expand_as(nearest)):
        return "the merged tokens do not pair up one to one with the reference's"
    paired_x = x_e.gather(1, nearest[..., None].expand_as(x_e))
    for name, got, want in (("merged", x_a, paired_x), ("size", size_a, size_e.gather(1, nearest))):
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        except AssertionError as exc:
            return f"paired {name} tokens differ: " + " ".join(str(exc).strip().splitlines()[:3])
    return None


def _build_step(device, dtype, scale: Scale, mode: str, batch, tokens, channels, r) -> Built:
    B, N, C = scale.batch(batch), scale.size(tokens), scale.size(channels)
    Cm, r = scale.size(METRIC_DIM), scale.size(r)
    backward = mode == BACKWARD
    generator = torch.Generator(device=device).manual_seed(0)
    metric = torch.randn(B, N, Cm, generator=generator, device=device, dtype=dtype)
    x = torch.randn(B, N, C, generator=generator, device=device, dtype=dtype)
    x.requires_grad_(backward)
    # a block after the first: tokens already hold 1-4 patches
    size = torch.randint(1, 5, (B, N), generator=generator, device=device).float()

    element, M = x.element_size(), N - r
    moved = element * (metric.numel() + x.numel() + B * M * C) + 4 * (B * N + B * M)
    if backward:  # read the merged output's gradient, write x's
        moved += element * (B * M * C + B * N * C)
    rtol, atol = TOLERANCES[dtype]
    built = Built(
        shapes={"metric": [B, N, Cm], "x": [B, N, C], "size": [B, N], "r": r,
                "merged": [B, M, C]},
        bytes=moved,
        rtol=rtol,
        atol=atol,
    )
    if not backward:
        built.compare = dict.fromkeys(
            FASTVL_IMPLS, lambda actual, expected: _pair_tokens(actual, expected, rtol, atol)
        )

    def finish(step):
        if not backward:
            return step

        def run():
            merged, _ = step()
            return torch.autograd.grad(merged, x, merged.detach())

        return run

    def fastvl_step(backend):
        def step():
            plan = tome_match(metric, r, num_prefix_tokens=1, backend=backend)
            return tome_merge(plan, x, size, backend=backend)

        return finish(step)

    # tome_match and tome_merge have the same backends with the same dtype support
    fastvl_impls(built, "tome_match", device, (metric, r, 1), fastvl_step)
    built.add(STEP_BASELINE, finish(lambda: plain_tome_step(metric, x, size, r)))
    return built


def _step_case(name: str, description: str, batch, tokens, channels, r) -> None:
    @register_case(
        op="tome",
        name=name,
        description=(
            f"{description}: one ToMe step, merge r {r} of N {tokens} tokens (B {batch}, "
            f"C {channels}, metric (B, N, {METRIC_DIM}) = keys averaged over heads, sizes "
            "1-4; batch / 8 on CPU) vs a plain-PyTorch ToMe step. forward+backward: the "
            "gradient w.r.t. x through the merge."
        ),
        impls=STEP_IMPLS,
        baseline=STEP_BASELINE,
    )
    def build(device, dtype, scale, mode):
        return _build_step(device, dtype, scale, mode, batch, tokens, channels, r)


_step_case("vit-b16-r16", "ViT-B/16", 256, 197, 768, 16)
_step_case("vit-l16-r8", "ViT-L/16", 256, 197, 1024, 8)


# --------------------------------------------------------------------------- end-to-end ViT


def _plain_attention(attn, x: torch.Tensor, size: Optional[torch.Tensor]):
    """timm ``Attention`` on x (B, N, C) with proportional attention (``log(size)`` added to
    the scores through an SDPA float mask); returns (out (B, N, C), metric (B, N, D))."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mask = None if size is None else size.log().to(q.dtype)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, -1))
    return attn.proj_drop(attn.proj(out)), k.mean(dim=1)


def plain_tome_vit(model, images: torch.Tensor, r: int) -> torch.Tensor:
    """Logits of a timm ``VisionTransformer`` (pre-norm ``Block``\\ s, class token) with ToMe:
    in every block, :func:`plain_tome_step` of r tokens (at most (N - 1) // 2, as in ToMe)
    after attention, proportional attention from the first merge on, the merged tokens in
    ToMe's order (the next block's alternating split depends on it): the model
    :func:`fastvl.patch.timm.apply_tome` computes by default.
    images: (B, 3, H, W) -> (B, num_classes)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    size = None
    for block in model.blocks:
        out, metric = _plain_attention(block.attn, block.norm1(x), size)
        x = x + block.drop_path1(block.ls1(out))
        if size is None:
            size = torch.ones(x.shape[:2], device=x.device, dtype=torch.float32)
        x, size = plain_tome_step(metric, x, size, min(r, (x.shape[1] - 1) // 2))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return model.forward_head(model.norm(x))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> Optional[str]:
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    error = (actual.double() - expected.double()).norm() / expected.double().norm()
    if not error <= rtol:  # (also catches NaN)
        return f"relative error ||a - e|| / ||e|| = {error:.3g} > {rtol:g}"
    return None


def vit_batch(scale: Scale, gpu_batch: int) -> int:
    """GPU batch at full scale; 8 images on CPU (the issue's CPU target), 2 for --quick."""
    return {"full": gpu_batch, "cpu": 8}.get(scale.name, 2)


def _vit_dtypes(gpu_only: bool):
    def dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
        if device.type == "cuda":
            return (torch.float16,)
        return () if gpu_only else (torch.float32,)

    return dtypes


def reduced_vit_case(op: str, name: str, model_name: str, gpu_batch: int, label: str,
                     rs: tuple[int, ...], plain, apply, description: str,
                     gpu_only: bool = False) -> None:
    """Register an images/s case of a timm ViT with token reduction (op ``op``): unpatched
    timm (the baseline), ``torch <label> r<r>`` = ``plain(model, images, r)`` and ``fastvl
    <label> r<r>`` = ``apply(copy of model, r)`` then a forward with ``model.r = r``, checked
    against the plain one at the same r (relative error of the logits, as ToMe's)."""
    baseline = "timm sdpa"
    impls = (baseline, *(f"torch {label} r{r}" for r in rs), *(f"fastvl {label} r{r}" for r in rs))

    def build(device, dtype, scale: Scale, mode: str) -> Built:
        import timm

        overrides = {}
        if scale.name == "quick":  # 50 tokens, a tiny width, 3 blocks
            overrides = {"img_size": 112, "embed_dim": 64, "depth": 3, "num_heads": 2}
        torch.manual_seed(0)
        model = timm.create_model(model_name, pretrained=False, **overrides)
        model = model.to(device=device, dtype=dtype).eval()
        batch = vit_batch(scale, gpu_batch)
        size = model.patch_embed.img_size
        images = torch.randn(batch, 3, *size, device=device, dtype=dtype)
        built = Built(
            shapes={"images": [batch, 3, *size], "tokens": model.patch_embed.num_patches + 1,
                    "width": model.embed_dim, "depth": len(model.blocks)},
            items=batch,
            references={f"torch {label} r{r}": None for r in rs},
        )

        def inference(fn):
            def run():
                with torch.inference_mode():
                    return fn()

            return run

        built.add(baseline, inference(lambda: model(images)))
        patched = copy.deepcopy(model)
        apply(patched, rs[0])
        for r in rs:
            built.add(f"torch {label} r{r}", inference(lambda r=r: plain(model, images, r)))

            def fastvl_run(r=r):
                patched.r = r  # read by the patched blocks at every forward
                return patched(images)

            impl = f"fastvl {label} r{r}"
            built.add(impl, inference(fastvl_run))
            built.references[impl] = f"torch {label} r{r}"
            built.compare[impl] = lambda actual, expected: _relative_error(
                actual, expected, VIT_LOGITS_RTOL[dtype])
        return built

    register_case(op=op, name=name, description=description, impls=impls, baseline=baseline,
                  modes=(FORWARD,), dtypes=_vit_dtypes(gpu_only))(build)




def _apply_tome(model, r):
    from fastvl.patch.timm import apply_tome

    apply_tome(model, r)


def _vit_tome_description(model_name: str, gpu_batch: int, gpu_only: bool) -> str:
    where = "GPU only" if gpu_only else "CPU: 8 images, float32"
    return (
        f"timm {model_name} images/s (pretrained=False, eval, inference_mode; batch "
        f"{gpu_batch} float16 on GPU, {where}): unpatched (SDPA), plain-PyTorch ToMe and "
        f"fastvl.patch.timm.apply_tome at r {', '.join(map(str, VIT_RS))} (proportional "
        "attention); fastvl ToMe logits checked against plain ToMe at the same r"
    )


if requires_module("timm") is None:
    for _name, _model, _batch, _gpu_only in (("vit-b16", "vit_base_patch16_224", 256, False),
                                             ("vit-l16", "vit_large_patch16_224", 256, True)):
        reduced_vit_case("vit_tome", _name, _model, _batch, "ToMe", VIT_RS, plain_tome_vit,
                         _apply_tome, _vit_tome_description(_model, _batch, _gpu_only),
                         gpu_only=_gpu_only)
