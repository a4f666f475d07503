"""iLLaMA training steps (op ``illama``): :class:`fastvl.models.ILLaMAViT` under the soft mask.

A step is ``zero_grad``, forward, cross-entropy, backward and ``AdamW.step`` at
``causal_strength`` 0.5 (mid-schedule, where SDPA cannot express the mask), on two copies of
the same weights: ``plain PyTorch`` (``fused=False``: explicit logits, additive soft mask,
softmax; the baseline) and ``fastvl`` (``fused=True``: :func:`fastvl.ops.attention` with
``causal_strength``, ``backend="auto"``). GPUs run bfloat16 autocast over float32 weights,
CPUs float32. The learning rate is 0, so every call computes the same loss and gradients;
each call returns ``(loss, grad of the patch embedding, grad of the head)``.
"""

from __future__ import annotations

import copy

import torch

from fastvl.bench.cases import Built, Scale, register_case

BASELINE = "plain PyTorch"
IMPLS = (BASELINE, "fastvl")
MODE = "train-step"
STRENGTH = 0.5
TOLERANCES = {torch.float32: (1e-3, 1e-4), torch.bfloat16: (5e-2, 5e-2)}
QUICK = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _build(device, dtype, scale: Scale, size: dict, gpu_batch: int) -> Built:
    from fastvl.models import ILLaMAViT

    kwargs = QUICK if scale.name == "quick" else size
    torch.manual_seed(0)
    plain = ILLaMAViT(**kwargs, causal_strength=STRENGTH, fused=False).to(device)
    fused = copy.deepcopy(plain)
    fused.fused = True
    batch = {"full": gpu_batch, "cpu": 8}.get(scale.name, 2)
    generator = torch.Generator(device=device).manual_seed(0)
    imgs = torch.randn(batch, 3, plain.img_size, plain.img_size, generator=generator,
                       device=device)
    labels = torch.randint(0, plain.head.out_features, (batch,), generator=generator,
                           device=device)
    autocast_dtype = None if dtype == torch.float32 else dtype
    rtol, atol = TOLERANCES[dtype]
    built = Built(
        shapes={"imgs": list(imgs.shape), "tokens": plain.num_patches + 1,
                "width": plain.pos_embed.shape[-1], "depth": len(plain.blocks),
                "causal_strength": STRENGTH,
                "autocast": str(autocast_dtype).removeprefix("torch.")},
        items=batch, track_memory=True, rtol=rtol, atol=atol,
    )
    for name, model in ((BASELINE, plain), ("fastvl", fused)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(imgs).float(), labels)
            loss.backward()
            optimizer.step()
            return (loss.detach(), model.patch_embed.weight.grad.clone(),
                    model.head.weight.grad.clone())

        built.add(name, step)
    return built


def _dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    return (torch.bfloat16,) if device.type == "cuda" else (torch.float32,)


def _gpu_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    return (torch.bfloat16,) if device.type == "cuda" else ()


def _case(name, description, size, gpu_batch, dtypes):
    @register_case(op="illama", name=name, description=description, impls=IMPLS,
                   baseline=BASELINE, modes=(MODE,), dtypes=dtypes)
    def build(device, dtype, scale, mode):
        return _build(device, dtype, scale, size, gpu_batch)

    return build


_STEP = (f" One training step (forward, cross-entropy, backward, AdamW) at causal_strength "
         f"{STRENGTH}, fastvl attention vs the plain-PyTorch soft mask; bfloat16 autocast on GPUs, "
         "float32 on CPUs (8 images).")
_case("illama-t-224", "iLLaMA-T (dim 192, depth 12, 3 heads), 224 px, B 256." + _STEP,
      dict(embed_dim=192, depth=12, num_heads=3), 256, _dtypes)
_case("illama-b-224", "iLLaMA-B (dim 768, depth 12, 12 heads), 224 px, B 64; GPU only." + _STEP,
      dict(embed_dim=768, depth=12, num_heads=12), 64, _gpu_dtypes)
