"""Masked (gather-first) patch embedding in plain PyTorch: the test oracle and the ``torch``
backend of :func:`fastvl.ops.masked_patch_embed`.

Layouts (images; video adds a frame axis, see below):

* ``imgs`` (B, C, H, W); ``patch_size`` (ph, pw); the patch grid is (h, w) = (H / ph, W / pw)
  and patch ``l = i * w + j`` (row-major, as ``conv2d(...).flatten(2)``), ``L = h * w``.
* ``weight`` (D, C, ph, pw), the conv layout of timm / MAE ``PatchEmbed.proj``; a patch is
  flattened channel-major, (C, ph, pw), to meet ``weight.reshape(D, -1)``.
* ``pos_embed`` (1, N, D) or (N, D) with N = L (patches only) or N = 1 + L (row 0 belongs to
  the class token, MAE's layout; only with ``cls_token``). With ``cls_token`` and N = L the
  class token gets no position (timm's ``no_embed_class``).
* ``ids_keep`` (B, K) int64 patch indices in [0, L).
* output (B, K, D), or (B, 1 + K, D) with ``cls_token`` (1, 1, D) (+ its position) first:
  ``out[b, 1 + k] = weight . patch(b, ids_keep[b, k]) + bias + pos[ids_keep[b, k]]``.

Video (VideoMAE tubelets): ``imgs`` (B, C, T, H, W), ``patch_size`` (pt, ph, pw), ``weight``
(D, C, pt, ph, pw); patches ordered (t, i, j) row-major like ``conv3d(...).flatten(2)``, and
flattened (C, pt, ph, pw). An image is the video case with T = pt = 1.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastvl.reference.gather import gather_tokens
from fastvl.reference.masking import patchify

__all__ = ["masked_patch_embed", "masked_patch_embed_gather_first"]


def _patch_pos(pos_embed: Optional[torch.Tensor], num_patches: int):
    """(N, D) positions -> (positions of the L patches, position of the class token or None)."""
    if pos_embed is None:
        return None, None
    pos = pos_embed.reshape(-1, pos_embed.shape[-1])
    cls_pos = pos[:1] if pos.shape[0] == num_patches + 1 else None
    return pos[pos.shape[0] - num_patches:], cls_pos


def _prepend_cls(x, cls_token, cls_pos):
    """x (B, K, D) -> (B, 1 + K, D) with cls_token (+ cls_pos) first; x itself without one."""
    if cls_token is None:
        return x
    cls = cls_token.reshape(1, 1, -1)
    if cls_pos is not None:
        cls = cls + cls_pos
    return torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)


def masked_patch_embed(
    imgs: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos_embed: Optional[torch.Tensor],
    ids_keep: torch.Tensor,
    patch_size: tuple,
    cls_token: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The plain path: conv patch embed of every patch, + pos, gather the kept, prepend CLS.

    imgs (B, C, [T,] H, W), weight (D, C, [pt,] ph, pw), patch_size ([pt,] ph, pw)
    -> (B, [1 +] K, D).
    """
    conv = F.conv2d if imgs.dim() == 4 else F.conv3d
    x = conv(imgs, weight, bias, stride=tuple(patch_size)).flatten(2).transpose(1, 2)
    patch_pos, cls_pos = _patch_pos(pos_embed, x.shape[1])
    if patch_pos is not None:
        x = x + patch_pos
    return _prepend_cls(gather_tokens(x, ids_keep), cls_token, cls_pos)


def masked_patch_embed_gather_first(
    imgs: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos_embed: Optional[torch.Tensor],
    ids_keep: torch.Tensor,
    patch_size: tuple,
    cls_token: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The same result projecting only the kept patches (the torch backend): patchify, gather
    the K kept patches, one matmul, + bias + their positions, prepend CLS. Same arguments."""
    patches = patchify(imgs, patch_size, channel_last=False)
    x = F.linear(gather_tokens(patches, ids_keep), weight.reshape(weight.shape[0], -1), bias)
    patch_pos, cls_pos = _patch_pos(pos_embed, patches.shape[1])
    if patch_pos is not None:
        x = x + patch_pos[ids_keep]
    return _prepend_cls(x, cls_token, cls_pos)
