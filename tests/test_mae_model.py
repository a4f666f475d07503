"""fastvl.models.MaskedAutoencoderViT: the fused path against the plain-PyTorch path.

Both paths of one model (same parameters) run on the same images and noise; the loss, the
predictions of the removed patches and the gradient of every parameter must agree: to
roundoff in float64 on the torch backend, within float32 roundoff on the Triton kernels
(the interpreter on CPU, so the model is the tiny one). A Liger-style convergence test trains
two copies a few AdamW steps and compares losses and parameters step by step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import Attention as TimmAttention

from fastvl.models import (
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_large_patch16,
    mae_vit_tiny,
)
from fastvl.nn import Attention as FastvlAttention
from tests.conftest import DEVICE, require_backend

# (rtol, atol) of fused vs plain: float64 on the torch backend, float32 on the kernels.
TOLERANCE = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-4, 2e-5)}


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _video_tiny(**kwargs):
    return mae_vit_tiny(num_frames=4, tubelet_size=2, **kwargs)


def _inputs(model, batch, seed, dtype):
    """Images (or clips) for ``model`` and the (B, S) masking noise."""
    size = (model.num_frames,) * (model.num_frames > 1) + (model.img_size,) * 2
    imgs = torch.randn(batch, model.in_chans, *size, generator=_gen(seed), device=DEVICE)
    noise = torch.rand(batch, model.num_patches // model.frames, generator=_gen(seed + 1),
                       device=DEVICE)
    return imgs.to(dtype), noise


def _run(model, imgs, noise, mask_ratio, fused):
    """(loss, pred of the removed patches (B, M, N), mask, {parameter name: grad})."""
    model.fused = fused
    model.zero_grad(set_to_none=True)
    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    loss.backward()
    if not fused:
        pred = pred[mask.bool()].view(pred.shape[0], -1, pred.shape[-1])
    grads = {name: p.grad for name, p in model.named_parameters()}
    return loss.detach(), pred.detach(), mask, grads


def _assert_fused_matches_plain(model, imgs, noise, mask_ratio, dtype):
    rtol, atol = TOLERANCE[dtype]
    fused = _run(model, imgs, noise, mask_ratio, fused=True)
    plain = _run(model, imgs, noise, mask_ratio, fused=False)
    torch.testing.assert_close(fused[2], plain[2], rtol=0, atol=0)
    torch.testing.assert_close(fused[0], plain[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(fused[1], plain[1], rtol=rtol, atol=atol)
    for name, grad in plain[3].items():
        assert grad is not None and fused[3][name] is not None, name
        torch.testing.assert_close(fused[3][name], grad, rtol=rtol, atol=atol,
                                   msg=lambda text: f"grad of {name}: {text}")


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("make", [mae_vit_tiny, _video_tiny], ids=["image", "video"])
def test_fused_matches_plain_torch_backend_float64(make, norm_pix):
    torch.manual_seed(0)
    model = make(norm_pix_loss=norm_pix, backend="torch").to(DEVICE, torch.float64)
    imgs, noise = _inputs(model, 3, seed=1, dtype=torch.float64)
    _assert_fused_matches_plain(model, imgs, noise, 0.75, torch.float64)


@pytest.mark.parametrize("make", [mae_vit_tiny, _video_tiny], ids=["image", "video"])
def test_fused_matches_plain_triton_backend(make):
    for op in ("masked_patch_embed", "unshuffle_with_mask_token", "masked_pixel_loss",
               "gather_tokens", "attention"):
        require_backend(op, "triton")
    torch.manual_seed(0)
    model = make(norm_pix_loss=True, backend="triton").to(DEVICE)
    imgs, noise = _inputs(model, 2, seed=2, dtype=torch.float32)
    _assert_fused_matches_plain(model, imgs, noise, 0.75, torch.float32)


def test_mask_ratio_zero_masks_nothing():
    model = mae_vit_tiny(backend="torch").to(DEVICE)
    imgs, noise = _inputs(model, 2, seed=3, dtype=torch.float32)
    for fused in (True, False):
        model.fused = fused
        loss, pred, mask = model(imgs, mask_ratio=0.0, noise=noise)
        assert loss.item() == 0.0 and not mask.any()
        assert pred.shape == (2, 0 if fused else 16, 8 * 8 * 3)


def test_masking_follows_the_noise():
    model = mae_vit_tiny(backend="torch").to(DEVICE)
    imgs, noise = _inputs(model, 2, seed=4, dtype=torch.float32)
    _, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    kept = noise.argsort(dim=1)[:, :4]
    expected = torch.ones_like(mask).scatter(1, kept, 0.0)
    torch.testing.assert_close(mask, expected, rtol=0, atol=0)
    assert pred.shape == (2, 12, 8 * 8 * 3)
    _, _, default_mask = model(imgs)  # random noise: 4 of 16 kept per sample
    assert default_mask.sum(dim=1).tolist() == [12.0, 12.0]


def test_training_converges_identically():
    """Liger-style: 5 AdamW steps on two copies, fused vs plain, compared step by step.

    Parameters are compared with atol = lr / 10: the key bias of each attention has a zero
    true gradient (softmax ignores a shift shared by all keys), so its computed gradient is
    roundoff, which Adam's normalisation turns into updates of up to ``lr * |g| / eps``.
    """
    torch.manual_seed(0)
    lr = 1e-3
    fused = mae_vit_tiny(norm_pix_loss=True, backend="torch").to(DEVICE)
    plain = copy.deepcopy(fused)
    plain.fused = False
    optimizers = [torch.optim.AdamW(m.parameters(), lr=lr) for m in (fused, plain)]
    history = []
    for step in range(5):
        imgs, noise = _inputs(fused, 4, seed=10 + 2 * step, dtype=torch.float32)
        losses = []
        for model, optimizer in zip((fused, plain), optimizers):
            optimizer.zero_grad(set_to_none=True)
            loss = model(imgs, mask_ratio=0.75, noise=noise)[0]
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6,
                                   msg=lambda text: f"loss at step {step}: {text}")
        for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=lr / 10,
                                       msg=lambda text: f"{name} after step {step}: {text}")
        history.append(losses[0].item())
    assert history[-1] < history[0] - 0.05, history  # and it trains


def test_fused_switch_keeps_parameters_and_state_dict():
    model = mae_vit_tiny()
    assert model.fused and isinstance(model.blocks[0].attn, FastvlAttention)
    params = dict(model.named_parameters())
    state = model.state_dict()
    model.fused = False
    assert type(model.blocks[0].attn) is TimmAttention
    assert type(model.decoder_blocks[0].attn) is TimmAttention
    assert {n: p for n, p in model.named_parameters()} == params
    assert list(model.state_dict()) == list(state)
    plain = mae_vit_tiny(fused=False)
    plain.load_state_dict(state, strict=True)
    assert not plain.fused
    with pytest.raises(TypeError, match="fused must be a bool"):
        model.fused = 1


def test_checkpoint_layout_and_fixed_positions():
    model = mae_vit_tiny()
    keys = set(model.state_dict())
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
                "mask_token", "decoder_pos_embed", "decoder_pred.weight", "norm.weight",
                "decoder_norm.bias", "blocks.1.attn.qkv.weight", "decoder_blocks.0.mlp.fc2.bias"):
        assert key in keys, key
    assert model.patch_embed.proj.weight.shape == (64, 3, 8, 8)
    assert model.decoder_pred.weight.shape == (8 * 8 * 3, 32)
    names = {n for n, _ in model.named_parameters()}
    assert "pos_embed" not in names and "decoder_pos_embed" not in names  # fixed
    pos = model.pos_embed[0]
    assert pos.shape == (17, 64) and not pos[0].any()  # class token row
    # patch (i, j) of the 4 x 4 grid: first half of the channels encodes j, second half i
    grid = pos[1:].view(4, 4, 64)
    torch.testing.assert_close(grid[:, :, :32], grid[:1, :, :32].expand(4, -1, -1))
    torch.testing.assert_close(grid[:, :, 32:], grid[:, :1, 32:].expand(-1, 4, -1))
    assert len(torch.unique(pos[1:], dim=0)) == 16


def test_factory_sizes_match_timm_vits():
    """The encoders of base / large have timm ViT-B/16 / ViT-L/16's parameters (minus the
    learned pos_embed, fixed here); built on the meta device (no memory, no time)."""
    import timm

    for make, name, decoder in ((mae_vit_base_patch16, "vit_base_patch16_224", 512),
                                (mae_vit_large_patch16, "vit_large_patch16_224", 512)):
        with torch.device("meta"):
            model = make()
            vit = timm.create_model(name, num_classes=0)
        encoder = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(
            ("decoder", "mask_token")))
        expected = sum(p.numel() for n, p in vit.named_parameters() if n != "pos_embed")
        assert encoder == expected, name
        assert model.decoder_embed.out_features == decoder and len(model.decoder_blocks) == 8


@pytest.mark.parametrize(
    "imgs_shape, kwargs, error, match",
    [
        ((2, 3, 32, 32), {"mask_ratio": 1.0}, ValueError, r"mask_ratio must lie in \[0, 1\)"),
        ((2, 3, 32, 32), {"mask_ratio": -0.1}, ValueError, r"mask_ratio must lie in \[0, 1\)"),
        ((2, 3, 32, 32), {"mask_ratio": True}, TypeError, "mask_ratio must be a float"),
        ((2, 3, 33, 33), {}, ValueError, "not divisible by the patch size"),
        ((2, 3, 40, 40), {}, ValueError, r"do not match the model's \(32, 32\)"),
        ((3, 32, 32), {}, ValueError, r"imgs must be \(B, C, H, W\)"),
        ((2, 3, 1, 32, 32), {}, ValueError, r"imgs must be \(B, C, H, W\)"),
        ((2, 4, 32, 32), {}, ValueError, "imgs has 4 channels, the model 3"),
        ((2, 3, 32, 32), {"noise": torch.rand(2, 15)}, ValueError, "noise must be"),
    ],
)
def test_bad_inputs(imgs_shape, kwargs, error, match):
    model = mae_vit_tiny()
    with pytest.raises(error, match=match):
        model(torch.randn(imgs_shape), **kwargs)


def test_bad_inputs_video_and_construction():
    model = _video_tiny()
    with pytest.raises(ValueError, match=r"imgs must be \(B, C, T, H, W\)"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"do not match the model's \(4, 32, 32\)"):
        model(torch.randn(2, 3, 6, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 3, 4, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        MaskedAutoencoderViT(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="multiple of tubelet_size"):
        mae_vit_tiny(num_frames=3, tubelet_size=2)
    with pytest.raises(ValueError, match="backend must be .auto. or one of"):
        mae_vit_tiny(backend="cuda-graphs")


# ---- VideoMAE V2 dual masking -----------------------------------------------------------


def _dual_tiny(**kwargs):
    """T' = 4 time slots of a 4 x 4 grid (64 patches), the decoder dropping half."""
    return mae_vit_tiny(num_frames=8, tubelet_size=2, decoder_mask_ratio=0.5, **kwargs)


def _videomae_v2_loss(model, imgs, noise, phase, mask_ratio):
    """VideoMAE V2's formulation on ``model``'s parameters, written out here: the decoder
    input is the encoded tokens (+ their positions) concatenated with a mask token (+ its
    position) per patch that the encoder removed and the running cell keeps, in ascending
    patch order; its last rows predict those patches; the loss is MAE's normalised-pixel MSE
    over them. The cell is the generator's, stepped in a loop. -> (loss, pred (B, M2, N))."""
    batch, frames = imgs.shape[0], model.frames
    side = model.img_size // model.patch_size[-1]
    spatial = side * side
    keep = int(spatial * (1 - mask_ratio))
    kept_spatial = noise.argsort(dim=1)[:, :keep]
    ids_keep = torch.cat([kept_spatial + t * spatial for t in range(frames)], dim=1)
    removed = torch.ones(batch, frames * spatial, dtype=torch.bool, device=imgs.device)
    removed.scatter_(1, ids_keep, False)
    queue = [1, 1, 0, 0]  # half of each cell dropped, the dropped ones first
    decoded = torch.zeros_like(removed)
    for b in range(batch):
        pointer = int(phase[b])
        for t in range(frames):
            pointer += 1
            for y in range(side):
                for x in range(side):
                    cell = 2 * (y % 2) + x % 2
                    decoded[b, (t * side + y) * side + x] = queue[(cell + pointer) % 4] == 0
    decoded &= removed
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(batch, -1, -1), x], dim=1)
    for block in model.blocks:
        x = block(x)
    x = model.decoder_embed(model.norm(x))
    pos = model.decoder_pos_embed[0]
    visible_pos = torch.cat([pos[:1].expand(batch, 1, -1), pos[1 + ids_keep]], dim=1)
    num_decoded = int(decoded[0].sum())
    decoded_ids = torch.stack([row.nonzero()[:, 0] for row in decoded])  # ascending
    mask_rows = model.mask_token + pos[1 + decoded_ids]
    x = torch.cat([x + visible_pos, mask_rows], dim=1)
    for block in model.decoder_blocks:
        x = block(x)
    pred = model.decoder_pred(model.decoder_norm(x)[:, -num_decoded:])
    pt, ph, pw = model.patch_size
    clips = imgs.reshape(batch, 3, frames, pt, side, ph, side, pw)
    target = clips.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(batch, frames * spatial, -1)
    target = torch.stack([target[b, decoded_ids[b]] for b in range(batch)])
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    return ((pred - target) ** 2).mean(dim=-1).mean(), pred, decoded


@pytest.mark.parametrize("fused", [True, False])
def test_dual_masking_matches_videomae_v2(fused):
    torch.manual_seed(0)
    model = _dual_tiny(norm_pix_loss=True, backend="torch", fused=fused).to(DEVICE,
                                                                            torch.float64)
    imgs, noise = _inputs(model, 3, seed=11, dtype=torch.float64)
    phase = torch.tensor([0, 1, 3], device=DEVICE)
    inputs = []
    hook = model.decoder_blocks[0].register_forward_pre_hook(
        lambda module, args: inputs.append(args[0].shape))
    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise, decoder_phase=phase)
    hook.remove()
    expected_loss, expected_pred, decoded = _videomae_v2_loss(model, imgs, noise, phase, 0.75)
    # 4 of 16 spatial patches kept in 4 slots; of the 48 removed the cell decodes 24
    assert inputs == [(3, 1 + 16 + 24, 32)]
    assert torch.equal(mask.bool(), decoded) and mask.sum(dim=1).tolist() == [24.0] * 3
    if not fused:
        pred = pred[mask.bool()].view(3, 24, -1)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pred, expected_pred, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    expected = torch.autograd.grad(expected_loss, list(model.parameters()), allow_unused=True)
    for (name, _), grad, want in zip(model.named_parameters(), grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12, msg=name)


def test_dual_masking_fused_matches_plain_triton_backend():
    for op in ("masked_patch_embed", "unshuffle_with_mask_token", "masked_pixel_loss",
               "gather_tokens", "attention"):
        require_backend(op, "triton")
    torch.manual_seed(0)
    model = _dual_tiny(norm_pix_loss=True, backend="triton").to(DEVICE)
    imgs, noise = _inputs(model, 2, seed=12, dtype=torch.float32)
    phase = torch.tensor([2, 1], device=DEVICE)
    rtol, atol = TOLERANCE[torch.float32]
    results = []
    for fused in (True, False):
        model.fused = fused
        loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise, decoder_phase=phase)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        results.append((loss, pred if fused else pred[mask.bool()].view(2, 24, -1), grads))
    (loss, pred, grads), (plain_loss, plain_pred, plain_grads) = results
    torch.testing.assert_close(loss, plain_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(pred, plain_pred, rtol=rtol, atol=atol)
    for grad, want in zip(grads, plain_grads):
        if want is not None:
            torch.testing.assert_close(grad, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_frames=8, tubelet_size=2, decoder_mask_ratio=0.3), ValueError,
     r"decoder_mask_ratio must be 0, 0.25, 0.5 or 0.75"),
    (dict(num_frames=8, tubelet_size=2, decoder_mask_ratio=True), TypeError,
     r"decoder_mask_ratio must be a float"),
    (dict(decoder_mask_ratio=0.5), ValueError, r"T' = 1 and a 4 x 4 grid"),
    (dict(num_frames=4, tubelet_size=2, decoder_mask_ratio=0.5), ValueError,
     r"multiple of 4 .* got T' = 2"),
    (dict(num_frames=8, tubelet_size=2, img_size=24, decoder_mask_ratio=0.5), ValueError,
     r"even patch grid .* 3 x 3 grid"),
])
def test_dual_masking_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        mae_vit_tiny(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_fused_matches_plain_vit_b16_gpu(autocast_dtype):
    """ViT-B/16 at 224 px on the GPU kernels: float32 to float32 roundoff; under bfloat16
    autocast, loss within bf16 roundoff of the plain path's under the same autocast."""
    torch.manual_seed(0)
    model = mae_vit_base_patch16(norm_pix_loss=True).to(DEVICE)
    imgs, noise = _inputs(model, 8, seed=5, dtype=torch.float32)
    if autocast_dtype is None:
        _assert_fused_matches_plain(model, imgs, noise, 0.75, torch.float32)
        return
    losses = []
    for fused in (True, False):
        model.fused = fused
        with torch.autocast("cuda", dtype=autocast_dtype):
            losses.append(model(imgs, mask_ratio=0.75, noise=noise)[0].float())
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=2e-2)
