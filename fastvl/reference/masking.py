"""MAE masking, decoder-input unshuffling and the masked pixel loss in plain PyTorch: the test
oracle and the ``torch`` backend of :mod:`fastvl.ops.masking`.

Layouts:

* Patches of ``imgs`` (B, C, H, W) with ``patch_size`` (ph, pw) are numbered row-major over
  the (H / ph, W / pw) grid; video ``imgs`` (B, C, T, H, W) with tubelets (pt, ph, pw) over the
  (T / pt, H / ph, W / pw) grid, frame-major. An image is the video case with T = pt = 1.
* :func:`patchify` flattens a patch as (pt, ph, pw, C), **channel last** (MAE's
  ``nchpwq->nhwpqc``, VideoMAE's ``(p0 p1 p2) c``), so pixel-space predictions are
  (B, L, pt * ph * pw * C). (The patch embedding's conv weight uses the channel-major order
  instead; see :mod:`fastvl.reference.patch_embed`.)
* ``mask`` (B, L): 1 = removed (masked), 0 = kept, in the original patch order.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "random_masking",
    "running_cell_mask",
    "unshuffle_with_mask_token",
    "patchify",
    "pixel_targets",
    "masked_patch_index",
    "loss_rows",
    "weighted_mean",
    "masked_pixel_loss",
]


def random_masking(noise: torch.Tensor, mask_ratio: float, frames: int = 1):
    """MAE's per-sample random masking driven by ``noise``; tube masking when ``frames > 1``.

    noise: (B, S) float, S = L / frames spatial positions; the smallest ``len_keep`` values
    of each row are kept, ``len_keep = int(S * (1 - mask_ratio))`` per frame.

    Returns ``(ids_keep (B, frames * len_keep), ids_restore (B, L), mask (B, L) float32)``
    with ``ids_shuffle = argsort(noise)`` (the kept positions first), ``ids_keep =
    ids_shuffle[:, :len_keep]`` and ``ids_restore = argsort(ids_shuffle)``, so
    ``mask[b, l] = ids_restore[b, l] >= len_keep``. With ``frames > 1`` the spatial shuffle
    is applied to every frame (patch ``l = t * S + s``): ``ids_shuffle`` lists the kept
    patches of frame 0, 1, ..., then the removed ones frame by frame, each frame in noise
    order; the mask of every frame is the same.
    """
    batch, spatial = noise.shape
    len_keep = int(spatial * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    if frames > 1:
        frame_offsets = torch.arange(frames, device=noise.device).view(1, frames, 1) * spatial
        per_frame = ids_shuffle.unsqueeze(1) + frame_offsets  # (B, frames, S)
        ids_shuffle = torch.cat(
            [per_frame[:, :, :len_keep].flatten(1), per_frame[:, :, len_keep:].flatten(1)], dim=1
        )
        len_keep *= frames
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = (ids_restore >= len_keep).to(torch.float32)
    return ids_shuffle[:, :len_keep], ids_restore, mask


def running_cell_mask(phase: torch.Tensor, frames: int, height: int, width: int,
                      masked_per_cell: int) -> torch.Tensor:
    """VideoMAE V2's running cell decoder mask: phase (B,) int64 in [0, 4) -> (B, frames *
    height * width) float32, 1 = not decoded, patch ``l = (t * height + y) * width + x``.

    Every 2 x 2 cell of the (height, width) grid reads the queue ``[1] * masked_per_cell +
    [0] * (4 - masked_per_cell)`` from a pointer that starts at ``phase`` and advances one
    step per time slot: at slot t, cell position ``c = 2 * (y % 2) + x % 2`` holds
    ``queue[(c + phase + t + 1) % 4]`` (the masks of VideoMAE V2's running cell generator,
    its pointer set to ``phase``).
    """
    device = phase.device
    t = torch.arange(frames, device=device).view(frames, 1, 1)
    y = torch.arange(height, device=device).view(1, height, 1)
    x = torch.arange(width, device=device).view(1, 1, width)
    step = 2 * (y % 2) + x % 2 + t + 1  # (frames, height, width)
    slot = (step.unsqueeze(0) + phase.view(-1, 1, 1, 1)) % 4
    return (slot < masked_per_cell).to(torch.float32).flatten(1)


def unshuffle_with_mask_token(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    num_prefix_tokens: int = 1,
    pos_embed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MAE's decoder input: x (B, P + K, D) encoder tokens (P prefix tokens first, then the K
    kept patches in ``ids_keep`` order), ids_restore (B, L), mask_token (D,) or (1, 1, D),
    pos_embed None, (P + L, D) or (1, P + L, D) -> (B, P + L, D): the prefix tokens, then patch
    l = ``x[:, P + ids_restore[:, l]]`` if ``ids_restore[:, l] < K`` else the mask token, plus
    pos_embed. The dtype is the promotion of the inputs' (like ``torch.cat`` and ``+``).
    """
    batch, _, dim = x.shape
    num_patches = ids_restore.shape[1]
    prefix, kept = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    mask_tokens = mask_token.reshape(1, 1, dim).expand(batch, num_patches - kept.shape[1], dim)
    patches = torch.cat([kept, mask_tokens], dim=1)
    patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
    out = torch.cat([prefix.to(patches.dtype), patches], dim=1)
    if pos_embed is not None:
        out = out + pos_embed.reshape(1, -1, dim)
    return out


def patchify(imgs: torch.Tensor, patch_size: tuple, *, channel_last: bool = True) -> torch.Tensor:
    """imgs (B, C, H, W) / (B, C, T, H, W), patch_size (ph, pw) / (pt, ph, pw) -> (B, L, N),
    N = prod(patch_size) * C, patches in row-major grid order, each flattened ([pt,] ph, pw, C)
    with the channel last (MAE's pixel targets) or, with ``channel_last=False``,
    (C, [pt,] ph, pw) like a conv weight."""
    batch, channels, *size = imgs.shape
    grid = [n // p for n, p in zip(size, patch_size)]
    split = [d for g, p in zip(grid, patch_size) for d in (g, p)]  # (g0, p0, g1, p1, ...)
    grid_dims = [2 + 2 * i for i in range(len(size))]
    patch_dims = [3 + 2 * i for i in range(len(size))]
    order = [*patch_dims, 1] if channel_last else [1, *patch_dims]
    patches = imgs.reshape(batch, channels, *split).permute(0, *grid_dims, *order)
    return patches.reshape(batch, math.prod(grid), math.prod(patch_size) * channels)


def pixel_targets(
    imgs: torch.Tensor, patch_size: tuple, norm_pix: bool, eps: float, eps_style: str
) -> torch.Tensor:
    """The regression targets (B, L, N) in imgs' dtype: :func:`patchify`, then with
    ``norm_pix`` each patch normalised by its own mean and unbiased variance.

    ``eps_style="mae"``: statistics over the whole patch (all N values),
    ``(x - mean) / sqrt(var + eps)`` (MAE). ``"videomae"``: statistics per channel over the
    patch's pixels, ``(x - mean) / (sqrt(var) + eps)`` (VideoMAE).
    """
    target = patchify(imgs, patch_size)
    if not norm_pix:
        return target
    if eps_style == "mae":
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        return (target - mean) / (var + eps) ** 0.5
    per_channel = target.unflatten(-1, (-1, imgs.shape[1]))  # (B, L, pixels, C)
    mean = per_channel.mean(dim=-2, keepdim=True)
    std = per_channel.var(dim=-2, keepdim=True).sqrt()
    return ((per_channel - mean) / (std + eps)).flatten(-2)


def masked_patch_index(mask: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(B, L) mask -> (B, num_rows) int64: the first ``num_rows`` masked (nonzero) patches of
    each sample in ascending order; if a sample has fewer, unmasked patches fill the rest."""
    return torch.argsort((mask == 0).to(torch.uint8), dim=1, stable=True)[:, :num_rows]


def loss_rows(mask: torch.Tensor, num_rows: int, dtype: torch.dtype):
    """The patches behind pred's rows and their weights: ``(None, mask)`` when pred holds
    all L patches, else ``(masked_patch_index, mask at those patches)``; weights in
    ``dtype``, never requiring grad."""
    weight = mask.detach().to(dtype)
    if num_rows == mask.shape[1]:
        return None, weight
    index = masked_patch_index(mask, num_rows)
    return index, torch.gather(weight, 1, index)


def weighted_mean(row_error: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(row_error * weight) / sum(weight); 0 (with zero gradient) when the weights sum to 0."""
    total = weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)
    return (row_error * weight).sum() / total


def masked_pixel_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: tuple,
    norm_pix: bool = True,
    eps: float = 1e-6,
    eps_style: str = "mae",
) -> torch.Tensor:
    """MAE's loss: sum over rows of ``mask * mean((pred - target) ** 2, -1)`` / sum of mask.

    pred: (B, L, N), or (B, M, N) (M != L) holding only the masked patches in ascending
    order. The target is a constant (imgs gets no gradient). Rows of weight 0 do not take
    part: their values (NaN included) change neither the loss nor the gradient (as the
    kernels, which skip them). Returns a 0-dim tensor in the promotion of pred's dtype and
    float32; 0 when no patch is masked.
    """
    target = pixel_targets(imgs.detach(), patch_size, norm_pix, eps, eps_style)
    index, weight = loss_rows(mask, pred.shape[1], torch.promote_types(pred.dtype, torch.float32))
    if index is not None:
        target = torch.gather(target, 1, index.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    diff = torch.where((weight != 0).unsqueeze(-1), pred - target, 0)
    return weighted_mean((diff ** 2).mean(dim=-1), weight)
