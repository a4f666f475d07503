"""``masked_patch_embed``: MAE's patch embedding of the visible patches only (gather first).

``conv patch embed of every patch + pos_embed, then gather the kept tokens, then prepend CLS``
(MAE / VideoMAE encoders) computes 1 / (1 - mask_ratio) times too many patch projections and
stores a (B, L, D) activation. This op reads only the kept patches from the image and returns
the same (B, [1 +] K, D) tokens, with gradients for imgs, weight, bias, pos_embed and cls_token.
Layouts are defined in :mod:`fastvl.reference.patch_embed`.

Backends:

* ``torch`` (:func:`fastvl.reference.patch_embed.masked_patch_embed_gather_first`): patchify
  (one copy of the image), gather the kept patches, one matmul; autograd by PyTorch. Float64
  capable. At MAE shapes (B 8, 224², p 16, D 768, 25% kept) on one CPU thread it costs
  6.3 ms forward / 11.5 ms forward + backward (weights' grads), against 13.6 / 27.1 ms for
  conv + pos + gather (:func:`fastvl.reference.patch_embed.masked_patch_embed`).
* ``triton`` (``fastvl::masked_patch_embed_fwd_triton`` / ``..._bwd_triton``,
  :mod:`fastvl.kernels.patch_embed`): one GEMM over the B·K kept patches reading them straight
  from the image, bias and positions added in its epilogue; backward GEMMs re-read the patches
  (the im2col matrix is never stored). Deterministic except for the image gradient when an
  index repeats within a sample (float32 atomics; distinct indices, as from
  ``random_masking``, are exact). float16 / bfloat16 / float32. No double backward. Eager
  mode launches the kernels directly (:class:`fastvl.ops._eager.EagerOp`); torch.compile
  sees the registered ops.

The checks of a call (and the implementation chosen) are memoized by the shapes, dtypes,
devices and arguments they read; the optional range check of ``ids_keep`` runs every call.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from fastvl.ops._checks import check_tensor, check_token_index, check_value_range, is_int
from fastvl.ops._eager import EagerOp, call_key, memoized
from fastvl.ops.registry import KERNEL_DTYPES, TRITON_IMPORT_ERROR, Supports, register_op
from fastvl.reference.patch_embed import masked_patch_embed_gather_first

__all__ = ["masked_patch_embed", "MASKED_PATCH_EMBED"]

OP = "masked_patch_embed"
MASKED_PATCH_EMBED = register_op(OP)

# Every implementation is called as
#   fn(imgs, weight, bias, pos_embed, ids_keep, patch_size, cls_token)
# with validated arguments and patch_size a tuple ((ph, pw) or (pt, ph, pw)).
MASKED_PATCH_EMBED.implement("torch", masked_patch_embed_gather_first, Supports(dtype_of="imgs"))


def _fwd_fake(imgs, weight, bias, pos_embed, ids_keep, cls_token):
    rows = ids_keep.shape[1] + (0 if cls_token is None else 1)
    return imgs.new_empty(ids_keep.shape[0], rows, weight.shape[0])


def _bwd_fake(grad_out, imgs, weight, ids_keep, num_pos_rows, compute_dimgs, compute_dweight):
    dimgs = imgs.new_empty(imgs.shape) if compute_dimgs else imgs.new_empty(0)
    dweight = weight.new_empty(weight.shape) if compute_dweight else imgs.new_empty(0)
    dpos = imgs.new_empty(num_pos_rows, weight.shape[0]) if num_pos_rows else imgs.new_empty(0)
    return dimgs, dweight, dpos


if TRITON_IMPORT_ERROR is None:
    from fastvl.kernels import patch_embed as _kernels

    @torch.library.triton_op("fastvl::masked_patch_embed_fwd_triton", mutates_args=())
    def masked_patch_embed_fwd_triton(
        imgs: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        pos_embed: Optional[torch.Tensor],
        ids_keep: torch.Tensor,
        cls_token: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """imgs (B, C, T, H, W), weight (D, C, pt, ph, pw), bias (D,) | None, pos_embed (N, D)
        | None, ids_keep (B, K), cls_token (1, 1, D) | None -> (B, [1 +] K, D) contiguous."""
        return _kernels.masked_patch_embed_forward(
            imgs, weight, bias, pos_embed, ids_keep, cls_token
        )

    @torch.library.triton_op("fastvl::masked_patch_embed_bwd_triton", mutates_args=())
    def masked_patch_embed_bwd_triton(
        grad_out: torch.Tensor,
        imgs: torch.Tensor,
        weight: torch.Tensor,
        ids_keep: torch.Tensor,
        num_pos_rows: int,
        compute_dimgs: bool,
        compute_dweight: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (dimgs, dweight, dpos (num_pos_rows, D)); each empty (shape (0,)) when not
        asked for (num_pos_rows = 0: no dpos)."""
        return _kernels.masked_patch_embed_backward(
            grad_out, imgs, weight, ids_keep, num_pos_rows, compute_dimgs, compute_dweight
        )

    def _setup_context(ctx, inputs, output):
        imgs, weight, bias, pos_embed, ids_keep, cls_token = inputs
        ctx.save_for_backward(imgs, weight, ids_keep)
        ctx.num_pos_rows = 0 if pos_embed is None else pos_embed.shape[0]
        ctx.has_cls = cls_token is not None

    def _backward(ctx, grad_out):
        imgs, weight, ids_keep = ctx.saved_tensors
        needs_imgs, needs_weight, needs_bias, needs_pos, _, needs_cls = ctx.needs_input_grad
        dimgs, dweight, dpos = _backward_kernels(
            grad_out, imgs, weight, ids_keep, ctx.num_pos_rows if needs_pos else 0,
            needs_imgs, needs_weight,
        )
        patch_rows = grad_out[:, 1:] if ctx.has_cls else grad_out
        dbias = (
            patch_rows.sum((0, 1), dtype=torch.float32).to(grad_out.dtype) if needs_bias else None
        )
        dcls = None
        if ctx.has_cls and needs_cls:
            dcls = grad_out[:, :1].sum(0, keepdim=True, dtype=torch.float32).to(grad_out.dtype)
        return (
            dimgs if needs_imgs else None,
            dweight if needs_weight else None,
            dbias,
            dpos if needs_pos else None,
            None,
            dcls,
        )

    torch.library.register_fake(masked_patch_embed_fwd_triton, _fwd_fake)
    torch.library.register_fake(masked_patch_embed_bwd_triton, _bwd_fake)
    _forward = EagerOp(masked_patch_embed_fwd_triton, _kernels.masked_patch_embed_forward,
                       _setup_context, _backward, grad_inputs=(0, 1, 2, 3, 5))
    _backward_kernels = EagerOp(masked_patch_embed_bwd_triton,
                                _kernels.masked_patch_embed_backward)

    def _triton_impl(imgs, weight, bias, pos_embed, ids_keep, patch_size, cls_token):
        if imgs.dim() == 4:  # an image is a one-frame video with tubelet size 1
            imgs, weight = imgs.unsqueeze(2), weight.unsqueeze(2)
        if pos_embed is not None:
            pos_embed = pos_embed.reshape(-1, pos_embed.shape[-1])
        return _forward(imgs, weight, bias, pos_embed, ids_keep, cls_token)

    MASKED_PATCH_EMBED.implement(
        "triton", _triton_impl, Supports(dtypes=KERNEL_DTYPES, dtype_of="imgs")
    )


# ---- validation --------------------------------------------------------------------------


def _patch_size_tuple(patch_size, spatial_dims: int) -> tuple:
    """int p -> (p, p) for images, (1, p, p) for video; a tuple must name every axis."""
    if is_int(patch_size):
        size = (patch_size,) * 2
        size = size if spatial_dims == 2 else (1,) + size
    elif isinstance(patch_size, (tuple, list)) and all(is_int(p) for p in patch_size):
        size = tuple(patch_size)
    else:
        raise TypeError(
            f"{OP}: patch_size must be an int or a tuple of ints, got {patch_size!r}"
        )
    layout = "(ph, pw)" if spatial_dims == 2 else "(pt, ph, pw)"
    if len(size) != spatial_dims:
        raise ValueError(
            f"{OP}: patch_size must be an int or {layout} for imgs with {spatial_dims} "
            f"spatial dims, got {patch_size!r}"
        )
    if min(size) < 1:
        raise ValueError(f"{OP}: patch_size values must be >= 1, got {patch_size!r}")
    return size


def _validate(imgs, weight, bias, pos_embed, ids_keep, patch_size, cls_token) -> tuple:
    """All checks that need no tensor values; returns (patch_size tuple, number of patches)."""
    check_tensor(OP, "imgs", imgs)
    check_tensor(OP, "weight", weight)
    check_tensor(OP, "ids_keep", ids_keep)
    optional = {"bias": bias, "pos_embed": pos_embed, "cls_token": cls_token}
    for name, t in optional.items():
        if t is not None:
            check_tensor(OP, name, t)
    if imgs.dim() not in (4, 5):
        raise ValueError(
            f"{OP}: imgs must be (B, C, H, W) or video (B, C, T, H, W), got shape "
            f"{tuple(imgs.shape)}"
        )
    if not imgs.is_floating_point():
        raise TypeError(f"{OP}: imgs must be a floating-point tensor, got {imgs.dtype}")
    spatial = imgs.dim() - 2
    patch = _patch_size_tuple(patch_size, spatial)
    axes = ("H", "W") if spatial == 2 else ("T", "H", "W")
    num_patches = 1
    for axis, n, p in zip(axes, imgs.shape[2:], patch):
        if n % p:
            raise ValueError(
                f"{OP}: image size {axis} = {n} is not divisible by the patch size {p} "
                f"(patch_size {patch} for imgs of shape {tuple(imgs.shape)})"
            )
        num_patches *= n // p
    channels = imgs.shape[1]
    layout = "(D, C, ph, pw)" if spatial == 2 else "(D, C, pt, ph, pw)"
    if weight.dim() != imgs.dim():
        raise ValueError(
            f"{OP}: weight must be the conv weight {layout}, got shape {tuple(weight.shape)}"
        )
    if weight.shape[1] != channels:
        raise ValueError(
            f"{OP}: weight has {weight.shape[1]} input channels but imgs has {channels}"
        )
    if tuple(weight.shape[2:]) != patch:
        raise ValueError(
            f"{OP}: weight's patch {tuple(weight.shape[2:])} does not match patch_size {patch}"
        )
    dim = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"{OP}: bias must be (D,) = ({dim},), got shape {tuple(bias.shape)}")
    if cls_token is not None and tuple(cls_token.shape) != (1, 1, dim):
        raise ValueError(
            f"{OP}: cls_token must be (1, 1, D) = (1, 1, {dim}), got shape "
            f"{tuple(cls_token.shape)}"
        )
    if pos_embed is not None:
        rows = (num_patches,) if cls_token is None else (num_patches, num_patches + 1)
        shape = tuple(pos_embed.shape)
        if shape not in [(1, n, dim) for n in rows] + [(n, dim) for n in rows]:
            if cls_token is None:
                rows_text = (
                    f"{num_patches} (without cls_token: only the patch rows, e.g. "
                    "pos_embed[:, 1:])"
                )
            else:
                rows_text = f"{num_patches} or 1 + L = {num_patches + 1} (row 0 for cls_token)"
            raise ValueError(
                f"{OP}: pos_embed must be (1, N, D) or (N, D) with D = {dim} and N = L = "
                f"{rows_text}, got shape {shape}"
            )
    check_token_index(OP, "ids_keep", ids_keep, imgs.shape[0], "imgs")
    for name, t in {"weight": weight, **optional}.items():
        if t is None:
            continue
        if t.dtype != imgs.dtype:
            raise TypeError(
                f"{OP}: imgs and {name} must share one dtype, got imgs {imgs.dtype} and "
                f"{name} {t.dtype}"
            )
    for name, t in {"weight": weight, "ids_keep": ids_keep, **optional}.items():
        if t is not None and t.device != imgs.device:
            raise ValueError(
                f"{OP}: imgs is on {imgs.device} but {name} is on {t.device}; "
                "put every tensor on the same device"
            )
    return patch, num_patches


def masked_patch_embed(
    imgs: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos_embed: Optional[torch.Tensor],
    ids_keep: torch.Tensor,
    patch_size: Union[int, Sequence[int]],
    *,
    cls_token: Optional[torch.Tensor] = None,
    backend: str = "auto",
    check_bounds: bool = True,
) -> torch.Tensor:
    """Embed only the kept patches: equal to conv patch embed + pos_embed + gather + CLS.

    Args:
        imgs: (B, C, H, W), or video (B, C, T, H, W) (VideoMAE tubelets). Each of H, W (and T)
            must be divisible by the patch size along it.
        weight: the patch projection in conv layout (timm / MAE ``PatchEmbed.proj.weight``):
            (D, C, ph, pw), or (D, C, pt, ph, pw) for video. A ``Linear`` weight (D, C·ph·pw)
            whose input is flattened channel-major is ``weight.view(D, C, ph, pw)``.
        bias: (D,) or None.
        pos_embed: (1, N, D) or (N, D), or None. N = L: positions of the patches only. With
            ``cls_token``, N = 1 + L puts the class token's position in row 0 (MAE's layout)
            and N = L gives the class token none (timm's ``no_embed_class``).
        ids_keep: (B, K) int64 indices of the kept patches in [0, L), patches numbered
            row-major over the grid ((t,) h, w), as ``conv(...).flatten(2)``; e.g. the
            ``ids_keep`` of :func:`fastvl.ops.random_masking`.
        patch_size: int p ((p, p); (1, p, p) for video), (ph, pw), or (pt, ph, pw) for video.
        cls_token: (1, 1, D) or None: prepended, plus its position if pos_embed has one.
        backend: "auto", "triton" or "torch" (see ``python -m fastvl info``).
        check_bounds: verify 0 <= ids_keep < L first (one host sync; skipped under
            torch.compile and CUDA-graph capture). Unchecked out-of-range rows read no pixels
            and no position on the triton backend; the torch backend raises inside indexing.

    Returns:
        (B, K, D), or (B, 1 + K, D) with the class token first, in imgs' dtype (every tensor
        argument must share it): ``out[:, [1 +] k] = weight · patch(ids_keep[:, k]) + bias
        + pos[ids_keep[:, k]]``. Differentiable in imgs, weight, bias, pos_embed, cls_token.
    """
    key = call_key((imgs, weight, bias, pos_embed, ids_keep, cls_token), patch_size, backend)
    patch, num_patches, fn = memoized(
        MASKED_PATCH_EMBED, key,
        lambda: _resolve(imgs, weight, bias, pos_embed, ids_keep, patch_size, cls_token, backend),
    )
    if check_bounds:
        check_value_range(OP, "ids_keep", ids_keep, 0, num_patches,
                          f"the L = {num_patches} patches of imgs")
    return fn(imgs, weight, bias, pos_embed, ids_keep, patch, cls_token)


def _resolve(imgs, weight, bias, pos_embed, ids_keep, patch_size, cls_token, backend):
    """(patch size tuple, number of patches, the implementation) of a checked call."""
    patch, num_patches = _validate(imgs, weight, bias, pos_embed, ids_keep, patch_size,
                                   cls_token)
    args = (imgs, weight, bias, pos_embed, ids_keep, patch, cls_token)
    return patch, num_patches, MASKED_PATCH_EMBED.select(backend, imgs.device, *args)
