"""fastvl.patch.timm.apply_tome / apply_evit on tiny random-init timm ViTs (never pretrained).

Correctness is checked against plain-PyTorch implementations of ToMe and EViT on timm written
here (explicit softmax attention; ToMe batched as facebookresearch/ToMe computes it, in its
token order; EViT with per-sample Python loops), run on the unpatched model in float64; the
patched model runs in float64 on the torch backend, so both agree to roundoff (1e-10; EViT
1e-6, its scores are float32) unless a merge / keep decision or the token order differs,
which changes the logits by far more (percents). r = 0 is bit-exact against unpatched
timm on CPU (the same SDPA call in the same block order, no sizes until a first merge); on
CUDA "auto" means the triton kernels, hence the roundoff tolerance there.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import Block, ParallelScalingBlock, ResPostBlock
from torch import nn

import fastvl.patch.timm as fastvl_timm
from fastvl.nn import Attention
from fastvl.ops import tome_match
from fastvl.testing import random_tensor
from tests.conftest import DEVICE, require_backend

BATCH, IMG, PATCH, DEPTH = 2, 32, 8, 3  # 4 x 4 patches
VARIANTS = {
    "plain": dict(),
    "layerscale_qk_norm": dict(init_values=0.1, qk_norm=True),
    "registers": dict(reg_tokens=3),
    "avg_pool_no_class_token": dict(class_token=False, global_pool="avg"),
    "res_post_block": dict(block_fn=ResPostBlock, init_values=0.5),
}
TIGHT64 = dict(rtol=1e-9, atol=1e-10)
# attention_key_mass returns float32 scores: EViT's fused token weights carry float32 roundoff.
EVIT64 = dict(rtol=1e-6, atol=1e-7)


def _vit(seed=0, dtype=torch.float64, depth=DEPTH, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=PATCH, depth=depth,
        embed_dim=64, num_heads=2, num_classes=5, **kwargs,
    )
    return model.to(DEVICE, dtype).eval()


def _images(seed=1, dtype=torch.float64):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return random_tensor(BATCH, 3, IMG, IMG, dtype=dtype, device=DEVICE, generator=g)


# ---- plain-PyTorch references ----------------------------------------------------------------


def _attention_eager(attn, x, key_bias=None):
    """timm Attention by hand: (output, k (B, H, N, D), probabilities (B, H, N, N))."""
    batch, num_tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = q @ k.transpose(-1, -2) * attn.scale
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :]
    probs = logits.softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, num_tokens, -1)
    return attn.proj(attn.norm(out)), k, probs


def _reference_blocks(model, x, reduce):
    """Run model.blocks by hand; ``reduce(i, x, k, probs) -> x`` after each attention."""
    for i, block in enumerate(model.blocks):
        pre_norm = type(block) is Block
        out, k, probs = _attention_eager(block.attn, block.norm1(x) if pre_norm else x,
                                         reduce.key_bias())
        x = x + (block.ls1(out) if pre_norm else block.norm1(out))
        x = reduce(i, x, k, probs)
        x = x + (block.ls2(block.mlp(block.norm2(x))) if pre_norm else block.norm2(block.mlp(x)))
    return x


class _ReferenceTome:
    """ToMe as facebookresearch/ToMe computes it, batched, in the test's own words: the P
    prefix tokens are protected; A = even, B = odd non-prefix positions; cosine similarity of
    the head-averaged keys; each A token's best B partner; the r A tokens with the best
    scores (r clamped to (N - P) // 2) are summed into their partners, size-weighted; the
    output is [prefix, unmerged A, B], the unmerged A tokens sorted by position only when
    there is a prefix (ToMe sorts them when there is a class token). ``token_order="spatial"``
    reorders that output by the position of the token each output token kept.
    Sources are ToMe's (B, N, N_orig) 0/1 matrices, merged by max."""

    def __init__(self, schedule, num_prefix_tokens, prop_attn=True, token_order="tome"):
        self.schedule, self.prefix, self.prop_attn = schedule, num_prefix_tokens, prop_attn
        self.token_order = token_order
        self.size = self.source = None

    def key_bias(self):
        return self.size.log() if self.prop_attn and self.size is not None else None

    def __call__(self, i, x, k, probs):
        batch, num_tokens, _ = x.shape
        prefix = self.prefix
        if self.size is None:
            self.size = torch.ones(batch, num_tokens, dtype=x.dtype, device=x.device)
            self.source = torch.eye(num_tokens, dtype=x.dtype, device=x.device).repeat(batch, 1, 1)
        r = min(self.schedule[i], (num_tokens - prefix) // 2)
        if r <= 0:
            return x
        a_pos = torch.arange(prefix + prefix % 2, num_tokens, 2, device=x.device)
        b_pos = torch.arange(prefix + 1 - prefix % 2, num_tokens, 2, device=x.device)
        metric = k.mean(1)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        best, partner = (metric[:, a_pos] @ metric[:, b_pos].transpose(1, 2)).max(dim=-1)
        edges = best.argsort(dim=-1, descending=True)
        unmerged, merged_away = edges[:, r:], edges[:, :r]
        if prefix:
            unmerged = unmerged.sort(dim=-1).values
        into = partner.gather(1, merged_away)

        def merge(t, reduce):  # (B, N, c) -> (B, N - r, c) in ToMe's order
            c = t.shape[-1]
            a, b = t[:, a_pos], t[:, b_pos]
            moved = a.gather(1, merged_away[..., None].expand(-1, -1, c))
            b = b.scatter_reduce(1, into[..., None].expand(-1, -1, c), moved, reduce=reduce)
            kept = a.gather(1, unmerged[..., None].expand(-1, -1, c))
            return torch.cat([t[:, :prefix], kept, b], dim=1)

        x = merge(x * self.size[..., None], "sum")
        self.size = merge(self.size[..., None], "sum")[..., 0]
        x = x / self.size[..., None]
        self.source = merge(self.source, "amax")
        if self.token_order == "spatial":
            kept_pos = torch.cat([
                torch.arange(prefix, device=x.device).expand(batch, prefix), a_pos[unmerged],
                b_pos.expand(batch, -1)], dim=1)
            order = kept_pos.argsort(dim=1)
            x = x.gather(1, order[..., None].expand_as(x))
            self.size = self.size.gather(1, order)
            self.source = self.source.gather(1, order[..., None].expand_as(self.source))
        return x


def _reference_tome_logits(model, images, schedule, prop_attn=True, token_order="tome"):
    """(logits, sizes, source (B, N_orig) token index) of ToMe on the unpatched model; the
    pooling over tokens ("avg") is size-weighted, as fastvl's."""
    prefix = model.num_prefix_tokens
    reduce = _ReferenceTome(schedule, prefix, prop_attn, token_order)
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    x = model.norm(_reference_blocks(model, x, reduce))
    source = reduce.source.argmax(dim=1)
    if model.global_pool == "avg":
        size = reduce.size[:, prefix:, None]
        pooled = (x[:, prefix:] * size).sum(1) / size.sum(1)
        return model.head(model.fc_norm(pooled)), reduce.size, source
    return model.forward_head(x), reduce.size, source


class _ReferenceEvit:
    """EViT: keep the ceil(rate * (N - P)) tokens with the highest class-token attention
    (mean over heads), fuse the rest weighted by that attention into one appended token."""

    def __init__(self, keep_rate, layers, num_prefix_tokens):
        self.keep_rate, self.layers, self.prefix = keep_rate, layers, num_prefix_tokens

    def key_bias(self):
        return None

    def __call__(self, i, x, k, probs):
        num_rest = x.shape[1] - self.prefix
        keep = math.ceil(self.keep_rate * num_rest)
        if i not in self.layers or keep == num_rest:
            return x
        cls_attn = probs[:, :, 0, self.prefix:].mean(1)  # (B, N - P)
        out = []
        for b in range(x.shape[0]):
            kept = sorted(cls_attn[b].argsort(descending=True)[:keep].tolist())
            dropped = [j for j in range(num_rest) if j not in kept]
            fused = (cls_attn[b, dropped, None] * x[b, self.prefix:][dropped]).sum(0)
            rest = x[b, self.prefix:]
            out.append(torch.cat([x[b, :self.prefix], rest[kept], fused[None]]))
        return torch.stack(out)


def _reference_evit_logits(model, images, keep_rate, layers):
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    reduce = _ReferenceEvit(keep_rate, layers, model.num_prefix_tokens)
    return model.forward_head(model.norm(_reference_blocks(model, x, reduce)))


# ---- ToMe ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "registers", "avg_pool_no_class_token"])
def test_r0_identical_to_unpatched(variant):
    model = _vit(dtype=torch.float32, **VARIANTS[variant])
    images = _images(dtype=torch.float32)
    expected = model(images)
    fastvl_timm.apply_tome(model, 0)
    got = model(images)
    if DEVICE.type == "cpu":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("token_order", ["tome", "spatial"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tome_matches_reference(variant, token_order):
    model = _vit(**VARIANTS[variant])
    images = _images()
    reference = copy.deepcopy(model)
    fastvl_timm.apply_tome(model, 2, token_order=token_order, backend="torch")
    prefix = model.num_prefix_tokens
    num_tokens = prefix + (IMG // PATCH) ** 2
    features = model.forward_features(images)
    if model.global_pool == "avg":  # expanded back to the original tokens for the pooling
        assert features.shape[1] == num_tokens
    else:
        assert features.shape[1] == num_tokens - 2 * DEPTH
    expected, size, source = _reference_tome_logits(reference, images, [2] * DEPTH,
                                                    token_order=token_order)
    torch.testing.assert_close(model(images), expected, **TIGHT64)
    tokens = model.blocks.forward_tokens(model._pos_embed(model.patch_embed(images)))
    torch.testing.assert_close(tokens.size, size)
    if tokens.source is not None:
        assert torch.equal(tokens.source, source)


def test_tome_without_proportional_attention():
    model = _vit(**VARIANTS["layerscale_qk_norm"])
    images = _images()
    expected = _reference_tome_logits(copy.deepcopy(model), images, [3] * DEPTH, False)[0]
    fastvl_timm.apply_tome(model, 3, prop_attn=False, backend="torch")
    torch.testing.assert_close(model(images), expected, **TIGHT64)


@pytest.mark.parametrize("variant", ["plain", "avg_pool_no_class_token"])
def test_default_reproduces_tome(variant):
    """Depth 4: from the second merging block on, the token order decides which tokens the
    alternating split pairs; the default is ToMe's, the logits agree to float64 roundoff,
    and the spatial order gives other logits (so this test sees the order)."""
    model = _vit(depth=4, **VARIANTS[variant])
    images = _images()
    reference = copy.deepcopy(model)
    expected, size, source = _reference_tome_logits(reference, images, [2] * 4)
    handle = fastvl_timm.apply_tome(model, 2, trace_source=True, backend="torch")
    tokens = model.blocks.forward_tokens(model._pos_embed(model.patch_embed(images)))
    assert tokens.x.shape[1] == model.num_prefix_tokens + 16 - 8
    torch.testing.assert_close(tokens.size, size, rtol=0, atol=0)
    assert torch.equal(tokens.source, source)
    torch.testing.assert_close(model(images), expected, rtol=1e-12, atol=1e-12)
    handle.remove()
    fastvl_timm.apply_tome(model, 2, token_order="spatial", backend="torch")
    assert (model(images) - expected).abs().max() > 1e-3 * expected.abs().max()


def test_r_clamped_per_block_as_tome():
    """A block's r above (N - P) // 2 is clamped (17 tokens: 8, then 4, 2), as ToMe does,
    at apply time and when model.r changes; the op itself still refuses it."""
    model = _vit()
    images = _images()
    expected = _reference_tome_logits(copy.deepcopy(model), images, [20] * DEPTH)[0]
    fastvl_timm.apply_tome(model, 20, backend="torch")
    assert model.forward_features(images).shape[1] == 17 - 8 - 4 - 2
    torch.testing.assert_close(model(images), expected, **TIGHT64)
    model.r = (30, 0.5)
    assert model.forward_features(images).shape[1] == 17 - 8 - 4 - 2
    with pytest.raises(ValueError, match=r"r must lie in \[0, \(N - num_prefix_tokens\) // 2\]"):
        tome_match(torch.ones(1, 17, 4), 9)


def test_schedules():
    assert fastvl_timm.tome_schedule(4, 3, 17, 1) == [4, 4, 4]
    assert fastvl_timm.tome_schedule(8, 3, 17, 1) == [8, 4, 2]  # later blocks capped
    assert fastvl_timm.tome_schedule(9, 3, 17, 1) == [8, 4, 2]  # the first one too
    assert fastvl_timm.tome_schedule((4, 0.5), 3, 17, 1) == [2, 4, 5]
    assert fastvl_timm.tome_schedule([1, 0, 5], 3, 41, 1) == [1, 0, 5]
    assert fastvl_timm.tome_schedule((4, 0.5), 3, 41, 1) == [2, 4, 6]  # increasing
    assert fastvl_timm.tome_schedule((4, -1.0), 3, 41, 1) == [8, 4, 0]  # decreasing
    assert fastvl_timm.tome_schedule((4, 0.0), 3, 41, 2) == [4, 4, 4]


@pytest.mark.parametrize("r, schedule", [([1, 0, 5], [1, 0, 5]), ((3, 0.5), [1, 3, 5])])
def test_schedule_in_model_and_changing_r(r, schedule):
    model = _vit(**VARIANTS["plain"])
    images = _images()
    reference = copy.deepcopy(model)
    fastvl_timm.apply_tome(model, r, backend="torch")
    torch.testing.assert_close(
        model(images), _reference_tome_logits(reference, images, schedule)[0], **TIGHT64
    )
    model.r = 1  # a plain attribute, read at every forward
    assert model.forward_features(images).shape[1] == 17 - DEPTH
    torch.testing.assert_close(
        model(images), _reference_tome_logits(reference, images, [1] * DEPTH)[0], **TIGHT64
    )


def test_remove_restores():
    model = _vit(dtype=torch.float32, **VARIANTS["layerscale_qk_norm"])
    images = _images(dtype=torch.float32)
    expected = model(images)
    keys = list(model.state_dict())
    handle = fastvl_timm.apply_tome(model, 2)
    assert list(model.state_dict()) == keys  # same parameters, same keys
    assert all(type(block.attn) is Attention for block in model.blocks)
    assert not torch.allclose(model(images), expected)
    assert handle.remove() and not handle.remove()
    assert type(model.blocks) is nn.Sequential and not hasattr(model, "r")
    assert all(type(block.attn).__module__.startswith("timm") for block in model.blocks)
    assert torch.equal(model(images), expected)
    # Removing the attention patch alone leaves the wrapper unable to run: a clear error.
    handle = fastvl_timm.apply_tome(model, 2)
    fastvl_timm.remove(model)
    with pytest.raises(RuntimeError, match="remove_token_reduction"):
        model(images)
    assert fastvl_timm.remove_token_reduction(model)
    assert not fastvl_timm.remove_token_reduction(model)


def test_train_step_gradients_match_reference():
    model = _vit(**VARIANTS["layerscale_qk_norm"]).train()
    reference = copy.deepcopy(model)
    images = _images()
    fastvl_timm.apply_tome(model, 2, backend="torch")
    target = torch.tensor([1, 3], device=DEVICE)
    F.cross_entropy(model(images), target).backward()
    F.cross_entropy(_reference_tome_logits(reference, images, [2] * DEPTH)[0], target).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, **TIGHT64, msg=name)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(model(images)).all()


def test_compiles_fullgraph():
    model = _vit(dtype=torch.float32, **VARIANTS["registers"])
    images = _images(dtype=torch.float32)
    fastvl_timm.apply_tome(model, 2)
    compiler = "aot_eager" if DEVICE.type == "cpu" else "inductor"
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-5)
    model.r = 3  # a new r recompiles
    torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("token_order", ["tome", "spatial"])
def test_trace_source_and_render_png(tmp_path, token_order):
    model = _vit(**VARIANTS["plain"])
    images = _images()
    source = _reference_tome_logits(copy.deepcopy(model), images, [3] * DEPTH,
                                    token_order=token_order)[2]
    fastvl_timm.apply_tome(model, 3, trace_source=True, token_order=token_order,
                           backend="torch")
    assert model.blocks.source is None
    model(images)
    assert torch.equal(model.blocks.source, source)
    path = tmp_path / "regions.png"
    fastvl_timm.render_tome_regions(images[0].sigmoid(), model.blocks.source[0], PATCH, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as png:
        assert png.size == (IMG, IMG) and png.mode == "RGB"
        # 16 patches in 16 - 9 = 7 regions: region outlines are drawn between patches.
        assert len(png.getcolors(maxcolors=IMG * IMG)) > 7
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        fastvl_timm.render_tome_regions(images[0], source[0, 1:], PATCH, path)


@pytest.mark.gpu
def test_tome_triton_matches_torch_backend():
    model = _vit(dtype=torch.float32, **VARIANTS["layerscale_qk_norm"])
    images = _images(dtype=torch.float32)
    reference = copy.deepcopy(model)
    fastvl_timm.apply_tome(model, 3, trace_source=True, backend="triton")
    fastvl_timm.apply_tome(reference, 3, trace_source=True, backend="torch")
    got, expected = model(images), reference(images)
    assert torch.equal(model.blocks.source, reference.blocks.source)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


# ---- EViT ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "registers", "res_post_block"])
def test_evit_matches_reference(variant):
    model = _vit(**VARIANTS[variant])
    images = _images()
    expected = _reference_evit_logits(copy.deepcopy(model), images, 0.5, (1, 2))
    fastvl_timm.apply_evit(model, 0.5, [2, 1], backend="torch")
    prefix = model.num_prefix_tokens
    # 16 -> ceil(8) kept + 1 fused = 9 -> ceil(4.5) = 5 kept + 1 fused.
    assert model.forward_features(images).shape[1] == prefix + 6
    torch.testing.assert_close(model(images), expected, **EVIT64)


def test_evit_keep_all_and_compile():
    model = _vit(dtype=torch.float32)
    images = _images(dtype=torch.float32)
    expected = model(images)
    handle = fastvl_timm.apply_evit(model, 1.0, [0, 1, 2])
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-6)
    handle.remove()
    fastvl_timm.apply_evit(model, 0.7, [1])
    compiler = "aot_eager" if DEVICE.type == "cpu" else "inductor"
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-5)


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("r, error, match", [
    (-1, ValueError, ">= 0"),
    ([1, 2], ValueError, "one int per block"),
    ((2, 1.5), ValueError, "inflection"),
    (2.0, TypeError, "must be an int"),
    (True, TypeError, "must be an int"),
])
def test_tome_bad_r(r, error, match):
    model = _vit()
    with pytest.raises(error, match=match):
        fastvl_timm.apply_tome(model, r)
    assert type(model.blocks) is nn.Sequential  # nothing changed
    fastvl_timm.apply_tome(model, 1)
    model.r = r  # checked again at forward time
    with pytest.raises(error, match="model.r"):
        model(_images())


def test_tome_bad_token_order():
    model = _vit()
    with pytest.raises(ValueError, match=r"apply_tome: token_order must be 'tome' .*'original'"):
        fastvl_timm.apply_tome(model, 2, token_order="original")
    assert type(model.blocks) is nn.Sequential  # nothing changed


@pytest.mark.parametrize("keep_rate, layers, error, match", [
    (0.0, [1], ValueError, r"keep_rate must lie in \(0, 1\]"),
    (1.5, [1], ValueError, r"keep_rate must lie in \(0, 1\]"),
    (0.5, [3], ValueError, r"in \[0, 3\)"),
    (0.5, [1, 1], ValueError, "distinct"),
    (0.5, 1, TypeError, "sequence of ints"),
])
def test_evit_bad_arguments(keep_rate, layers, error, match):
    with pytest.raises(error, match=match):
        fastvl_timm.apply_evit(_vit(), keep_rate, layers)


def test_unsupported_models():
    with pytest.raises(ValueError, match="no class token"):
        fastvl_timm.apply_evit(_vit(**VARIANTS["avg_pool_no_class_token"]), 0.5, [1])
    with pytest.raises(ValueError, match="ParallelScalingBlock"):
        fastvl_timm.apply_tome(_vit(block_fn=ParallelScalingBlock), 1)
    with pytest.raises(TypeError, match="VisionTransformer"):
        fastvl_timm.apply_tome(nn.Sequential(nn.Linear(2, 2)), 1)
    model = _vit()
    fastvl_timm.apply_tome(model, 1)
    with pytest.raises(ValueError, match="already has token reduction"):
        fastvl_timm.apply_evit(model, 0.5, [1])
    with pytest.raises(ValueError, match="backend"):
        fastvl_timm.apply_tome(_vit(), 1, backend="cuda")


# ---- Zero-TPrune ---------------------------------------------------------------------------


class _ReferenceZeroTPrune:
    """Zero-TPrune in the test's own words, on explicit probabilities: importance = the
    per-head power iteration s <- A^T s from uniform, averaged over heads; per sample, the
    non-prefix tokens sorted by importance (ties: lower position first), the first
    ceil(M / 2) kept, and of the others the r whose head-averaged key is most cosine-similar
    to a kept one dropped; the rest keep their order."""

    def __init__(self, schedule, num_prefix_tokens, iterations):
        self.schedule, self.prefix, self.iterations = schedule, num_prefix_tokens, iterations

    def key_bias(self):
        return None

    def __call__(self, i, x, k, probs):
        batch, num_tokens, _ = x.shape
        prefix, count = self.prefix, num_tokens - self.prefix
        r = min(self.schedule[i], count // 2)
        if r <= 0:
            return x
        scores = torch.full(probs.shape[:3], 1.0 / num_tokens, dtype=probs.dtype)
        for _ in range(self.iterations):
            scores = torch.einsum("bhi,bhij->bhj", scores, probs)
        importance = scores.mean(1)[:, prefix:].detach()
        keys = k.mean(1)[:, prefix:].detach()
        out = []
        for b in range(batch):
            order = sorted(range(count), key=lambda j: (-float(importance[b, j]), j))
            kept_group, others = order[:(count + 1) // 2], order[(count + 1) // 2:]
            unit = keys[b] / keys[b].norm(dim=-1, keepdim=True)
            similarity = {j: max(float(unit[j] @ unit[i]) for i in kept_group) for j in others}
            dropped = set(sorted(others, key=lambda j: -similarity[j])[:r])
            kept = [j for j in range(count) if j not in dropped]
            out.append(torch.cat([x[b, :prefix], x[b, prefix:][kept]]))
        return torch.stack(out)


def _reference_zero_tprune_logits(model, images, r, iterations):
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    reduce = _ReferenceZeroTPrune([r] * len(model.blocks), model.num_prefix_tokens, iterations)
    return model.forward_head(model.norm(_reference_blocks(model, x, reduce)))


@pytest.mark.parametrize("variant", ["plain", "registers", "avg_pool_no_class_token",
                                     "res_post_block", "layerscale_qk_norm"])
@pytest.mark.parametrize("r,iterations", [(3, 10), (8, 1)])
def test_zero_tprune_matches_reference(variant, r, iterations):
    model = _vit(**VARIANTS[variant])
    images = _images()
    expected = _reference_zero_tprune_logits(copy.deepcopy(model), images, r, iterations)
    handle = fastvl_timm.apply_zero_tprune(model, r, iterations=iterations, backend="torch")
    prefix = model.num_prefix_tokens
    tokens = 16
    for _ in range(DEPTH):  # r clamped to half of the non-prefix tokens, as ToMe's
        tokens -= min(r, tokens // 2)
    assert model.forward_features(images).shape[1] == prefix + tokens
    torch.testing.assert_close(model(images), expected, **TIGHT64)
    assert handle.remove() and not hasattr(model, "r")
    assert type(model.blocks) is nn.Sequential


def test_zero_tprune_triton_and_compile():
    """The Triton kernels (interpreted on CPU) give the torch backend's tokens; the patched
    model compiles with fullgraph=True."""
    model = _vit(dtype=torch.float32, **VARIANTS["registers"])
    images = _images(dtype=torch.float32)
    fastvl_timm.apply_zero_tprune(model, 2, backend="torch")
    expected = model(images)
    fastvl_timm.remove_token_reduction(model)
    require_backend("attention_key_mass", "triton")
    fastvl_timm.apply_zero_tprune(model, 2, backend="triton")
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5)
    fastvl_timm.remove_token_reduction(model)
    fastvl_timm.apply_zero_tprune(model, 2)
    compiler = "aot_eager" if DEVICE.type == "cpu" else "inductor"
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(r=-1), ValueError, r"r must be >= 0|r .*negative|>= 0"),
    (dict(r=1, iterations=0), ValueError, r"iterations must be >= 1"),
    (dict(r=1, iterations=2.0), TypeError, r"iterations must be an int"),
    (dict(r=1, backend="cuda-graphs"), ValueError, r"backend"),
])
def test_zero_tprune_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastvl_timm.apply_zero_tprune(_vit(), **kwargs)
