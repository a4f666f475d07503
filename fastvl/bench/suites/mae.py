"""MAE pretraining cases (op ``mae``): a training step of
:class:`fastvl.models.MaskedAutoencoderViT`.

A step is ``zero_grad``, forward (masking, encoder, decoder, loss), backward and
``AdamW.step``, on two copies of the same weights:

* ``plain PyTorch`` (the baseline): ``fused=False``: conv embedding of every patch, gather
  with an expanded index, timm attention, cat + gather unshuffle, decoder head on every
  patch, patchified and normalised targets;
* ``fastvl``: ``fused=True`` (``backend="auto"``): the fastvl ops and attention.

GPUs run bfloat16 autocast over float32 weights (mixed precision, as MAE trains); CPUs
float32. The masking noise is fixed, and the optimizer's learning rate is 0, so the weights do
not move and every call computes the same loss and gradients (the optimizer still does all its
work); each call returns ``(loss, grad of patch_embed.proj.weight, grad of
decoder_pred.weight)``. Peak memory on CUDA (each call's allocations beyond weights, optimizer
state and inputs).

Op ``unshuffle_with_mask_token``: the decoder input alone (visible tokens back in place, the
mask token elsewhere, positions added), every fastvl backend against MAE's plain code
(repeat + cat + gather with an expanded index + cat + add), forward and forward+backward
(gradients of x, the mask token and the positions).

The ``-embed-loss`` case is the same model with no transformer blocks (encoder and decoder
depth 0): masking, patch embedding, decoder input and head, loss and their backward, the part
of the step the fused ops replace, so its time and peak memory isolate their share.
"""

from __future__ import annotations

import copy

import torch

from fastvl.bench.cases import (
    BACKWARD,
    FASTVL_IMPLS,
    Built,
    Scale,
    fastvl_impls,
    register_case,
    with_backward,
)

BASELINE = "plain PyTorch"
IMPLS = (BASELINE, "fastvl")
MODE = "train-step"
# check tolerances (rtol, atol) of fastvl vs plain by dtype: the autocast dtype on GPUs
TOLERANCES = {torch.float32: (1e-3, 1e-4), torch.bfloat16: (5e-2, 5e-2)}
# model keyword arguments per scale; the smallest shapes for the smoke tests
IMAGE = {
    "full": dict(img_size=224, patch_size=16),
    "quick": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
}
VIDEO = {
    "full": dict(img_size=224, patch_size=16, num_frames=16, tubelet_size=2,
                 decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=6),
    "quick": dict(img_size=32, patch_size=8, num_frames=4, tubelet_size=2, embed_dim=64,
                  depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                  decoder_num_heads=2),
}
# VideoMAE V2: the same video model, its decoder dropping half of the patches by running cell
# masking (the quick one with 4 time slots, the fewest dual masking takes)
VIDEO_DUAL = {
    "full": dict(VIDEO["full"], decoder_mask_ratio=0.5),
    "quick": dict(VIDEO["quick"], num_frames=8, decoder_mask_ratio=0.5),
}


def _train_step(model, optimizer, imgs, noise, phase, mask_ratio, autocast_dtype):
    """A zero-argument training step returning (loss, two parameter gradients)."""
    device_type = imgs.device.type

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(imgs, mask_ratio=mask_ratio, noise=noise, decoder_phase=phase)[0]
        loss.backward()
        optimizer.step()
        return (loss.detach(), model.patch_embed.proj.weight.grad.clone(),
                model.decoder_pred.weight.grad.clone())

    return step


def _build(device, dtype, scale: Scale, configs, batch: int, mask_ratio: float,
           blocks: bool) -> Built:
    from fastvl.models import mae_vit_base_patch16

    kwargs = dict(configs["quick" if scale.name == "quick" else "full"])
    if not blocks:
        kwargs.update(depth=0, decoder_depth=0)
    torch.manual_seed(0)
    plain = mae_vit_base_patch16(norm_pix_loss=True, fused=False, **kwargs).to(device)
    fused = copy.deepcopy(plain)
    fused.fused = True
    batch = scale.batch(batch)
    generator = torch.Generator(device=device).manual_seed(0)
    frames = (plain.num_frames,) if plain.num_frames > 1 else ()
    imgs = torch.randn(batch, plain.in_chans, *frames, plain.img_size, plain.img_size,
                       generator=generator, device=device)
    noise = torch.rand(batch, plain.num_patches // plain.frames, generator=generator,
                       device=device)
    phase = None
    if plain.decoder_mask_ratio:  # the running cell phases, fixed like the noise
        phase = torch.randint(0, 4, (batch,), generator=generator, device=device)
    autocast_dtype = None if dtype == torch.float32 else dtype
    rtol, atol = TOLERANCES[dtype]
    built = Built(
        shapes={"imgs": list(imgs.shape), "patches": plain.num_patches,
                "kept": plain.num_patches - int(plain.num_patches * mask_ratio),
                "mask_ratio": mask_ratio, "encoder": [plain.cls_token.shape[-1],
                                                      len(plain.blocks)],
                "decoder": [plain.mask_token.shape[-1], len(plain.decoder_blocks)],
                "decoder_mask_ratio": plain.decoder_mask_ratio,
                "autocast": str(autocast_dtype).removeprefix("torch.")},
        items=batch,
        track_memory=True,
        rtol=rtol,
        atol=atol,
    )
    for name, model in ((BASELINE, plain), ("fastvl", fused)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: see the module
        built.add(name, _train_step(model, optimizer, imgs, noise, phase, mask_ratio,
                                    autocast_dtype))
    return built


def _dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    return (torch.bfloat16,) if device.type == "cuda" else (torch.float32,)


def _case(name, description, configs, batch, mask_ratio, blocks=True):
    @register_case(
        op="mae", name=name, description=description, impls=IMPLS, baseline=BASELINE,
        modes=(MODE,), dtypes=_dtypes,
    )
    def build(device, dtype, scale, mode):
        return _build(device, dtype, scale, configs, batch, mask_ratio, blocks)

    return build


_STEP = (
    " One training step (forward + backward + AdamW) with norm_pix_loss, fused=True vs the "
    "plain-PyTorch path; bfloat16 autocast on GPUs, float32 on CPUs (batch / 8). Peak memory "
    "on CUDA."
)
_case(
    "vit-b16-224-mask75",
    "MAE ViT-B/16 at 224 px (decoder 512 x 8), B 64, 75% of the 196 patches masked." + _STEP,
    IMAGE, 64, 0.75,
)
_case(
    "vit-b16-224-mask75-embed-loss",
    "MAE ViT-B/16 at 224 px with no transformer blocks (depth 0, decoder depth 0): masking, "
    "embedding, decoder input, head and loss only, B 64, 75% masked." + _STEP,
    IMAGE, 64, 0.75, blocks=False,
)
_case(
    "videomae-b16-16x224-mask90",
    "VideoMAE-style ViT-B/16 on 16 x 224 px clips, 2 x 16 x 16 tubelets (1568), tube "
    "masking 90%, decoder 384 x 4, B 32." + _STEP,
    VIDEO, 32, 0.9,
)
_case(
    "videomae-v2-b16-16x224-mask90-dec50",
    "VideoMAE V2 dual masking: the VideoMAE case with the decoder dropping 50% of the patches "
    "by running cell masking (it decodes 1 + 152 visible + 708 of the 1416 removed tubelets), "
    "B 32." + _STEP,
    VIDEO_DUAL, 32, 0.9,
)


# ---- unshuffle_with_mask_token -----------------------------------------------------------

UNSHUFFLE_BASELINE = "MAE (cat + gather)"


def _mae_decoder_input(x, ids_restore, mask_token, pos, prefix):
    """MAE's forward_decoder input, as models_mae.py writes it (any prefix count)."""
    batch, _, dim = x.shape
    fill = mask_token.reshape(1, 1, dim).repeat(batch, ids_restore.shape[1] + prefix - x.shape[1],
                                                1)
    patches = torch.cat([x[:, prefix:, :], fill], dim=1)
    patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).repeat(1, 1, dim))
    return torch.cat([x[:, :prefix, :], patches], dim=1) + pos


def _build_unshuffle(device, dtype, scale: Scale, mode, batch, patches, mask_ratio, prefix,
                     dim) -> Built:
    from fastvl.ops import random_masking, unshuffle_with_mask_token

    B, D = scale.batch(batch), scale.size(dim, minimum=8)
    generator = torch.Generator(device=device).manual_seed(0)
    _, ids_restore, _ = random_masking(B, patches, mask_ratio, generator=generator,
                                       device=device)
    kept = patches - int(patches * mask_ratio)
    backward = mode == BACKWARD
    x = torch.randn(B, prefix + kept, D, generator=generator, device=device, dtype=dtype)
    token = torch.randn(D, generator=generator, device=device, dtype=dtype)
    pos = torch.randn(prefix + patches, D, generator=generator, device=device, dtype=dtype)
    for t in (x, token, pos):
        t.requires_grad_(backward)
    rows = prefix + patches
    element = x.element_size()
    moved = (x.numel() + token.numel() + pos.numel() + B * rows * D) * element
    moved += ids_restore.numel() * ids_restore.element_size()
    if backward:  # read the output gradient and the index; write the three gradients
        moved += (B * rows * D + x.numel() + token.numel() + pos.numel()) * element
        moved += ids_restore.numel() * ids_restore.element_size()
    half = dtype in (torch.float16, torch.bfloat16)
    built = Built(
        shapes={"x": list(x.shape), "ids_restore": list(ids_restore.shape), "out": [B, rows, D]},
        bytes=moved,
        # the sums of the token / position gradients run over B * (masked) rows
        rtol=2e-2 if half else 1e-5, atol=2e-2 if half else 1e-4,
    )
    weights = torch.randn(B, rows, D, generator=generator, device=device, dtype=dtype)

    def finish(forward):
        return with_backward(forward, (x, token, pos), weights) if backward else forward

    fastvl_impls(built, "unshuffle_with_mask_token", device, (x, ids_restore, token, pos, prefix),
                 lambda backend: finish(lambda: unshuffle_with_mask_token(
                     x, ids_restore, token, num_prefix_tokens=prefix, pos_embed=pos,
                     backend=backend)))
    built.add(UNSHUFFLE_BASELINE,
              finish(lambda: _mae_decoder_input(x, ids_restore, token, pos, prefix)))
    return built


def _unshuffle_case(name, description, batch, patches, mask_ratio, prefix, dim):
    shape = (f" (B {batch}, L {patches}, mask {mask_ratio:.0%}, P {prefix}, D {dim}; "
             "batch / 8 on CPU).")

    @register_case(op="unshuffle_with_mask_token", name=name, description=description + shape,
                   impls=(*FASTVL_IMPLS, UNSHUFFLE_BASELINE), baseline=UNSHUFFLE_BASELINE)
    def build(device, dtype, scale, mode):
        return _build_unshuffle(device, dtype, scale, mode, batch, patches, mask_ratio, prefix,
                                dim)

    return build


_unshuffle_case("mae-b16-decoder", "MAE ViT-B/16 decoder input at 224 px", 256, 196, 0.75, 1,
                512)
_unshuffle_case("videomae-b16-decoder", "VideoMAE ViT-B/16 decoder input, 16 x 224 px clips",
                32, 1568, 0.9, 0, 384)
