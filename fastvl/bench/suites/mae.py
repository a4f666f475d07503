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

The ``-embed-loss`` case is the same model with no transformer blocks (encoder and decoder
depth 0): masking, patch embedding, decoder input and head, loss and their backward, the part
of the step the fused ops replace, so its time and peak memory isolate their share.
"""

from __future__ import annotations

import copy

import torch

from fastvl.bench.cases import Built, Scale, register_case

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


def _train_step(model, optimizer, imgs, noise, mask_ratio, autocast_dtype):
    """A zero-argument training step returning (loss, two parameter gradients)."""
    device_type = imgs.device.type

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(imgs, mask_ratio=mask_ratio, noise=noise)[0]
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
    autocast_dtype = None if dtype == torch.float32 else dtype
    rtol, atol = TOLERANCES[dtype]
    built = Built(
        shapes={"imgs": list(imgs.shape), "patches": plain.num_patches,
                "kept": plain.num_patches - int(plain.num_patches * mask_ratio),
                "mask_ratio": mask_ratio, "encoder": [plain.cls_token.shape[-1],
                                                      len(plain.blocks)],
                "decoder": [plain.mask_token.shape[-1], len(plain.decoder_blocks)],
                "autocast": str(autocast_dtype).removeprefix("torch.")},
        items=batch,
        track_memory=True,
        rtol=rtol,
        atol=atol,
    )
    for name, model in ((BASELINE, plain), ("fastvl", fused)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: see the module
        built.add(name, _train_step(model, optimizer, imgs, noise, mask_ratio, autocast_dtype))
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
