"""``MaskedAutoencoderViT``: MAE pretraining (He et al., 2021) built from timm blocks, with a
switch between fastvl's fused ops and the plain-PyTorch formulation of the same math.

Architecture (the paper's): a conv patch embedding (timm ``PatchEmbed``; ``Conv3d`` tubelets
for video), fixed sin-cos positions with a zero row for the class token, a ViT encoder over
the class token and the visible patches only, then a light decoder: ``decoder_embed``, the
mask token at the removed patches, decoder positions, ``decoder_blocks``, ``decoder_norm`` and
``decoder_pred`` to the pixels of each patch. The loss is the mean squared error over the
removed patches, optionally on per-patch normalised pixels (``norm_pix_loss``). State-dict
keys follow MAE's (``patch_embed.proj.weight``, ``cls_token``, ``pos_embed``, ``blocks.*``,
``norm``, ``decoder_*``, ``mask_token``), so MAE checkpoints load with ``strict=True``.

``fused=True`` (the default) computes:

* masking: :func:`fastvl.ops.random_masking` (both paths; it is MAE's argsort masking);
* embedding: :func:`fastvl.ops.masked_patch_embed` projects only the kept patches (plain:
  conv over every patch, + positions, ``torch.gather`` of the kept rows, cat the class token);
* attention: :class:`fastvl.nn.Attention` in every block (via :func:`fastvl.patch.timm.apply`,
  sharing the parameters; plain: timm's ``Attention``);
* decoder input: :func:`fastvl.ops.unshuffle_with_mask_token` (plain: cat mask tokens, gather
  with an expanded index, add positions);
* head and loss: ``decoder_pred`` runs on the removed patches only (the loss ignores the
  others; a per-row Linear, so those rows are exactly the plain path's) and
  :func:`fastvl.ops.masked_pixel_loss` reads the targets from the image (plain: ``decoder_pred``
  on every patch, patchify, normalise, masked mean).

Both paths compute the same function of the same parameters, up to floating-point rounding;
only the shape of ``pred`` differs (see :meth:`MaskedAutoencoderViT.forward`).

Video (VideoMAE / MAE-ST style): ``num_frames > 1`` cuts (B, C, T, H, W) clips into
``tubelet_size`` x p x p tubelets, uses 1D sin-cos positions over the T' * h * w tubelets
(VideoMAE's table) and tube masking (one spatial mask shared by every time slot).

Dual masking (VideoMAE V2): with ``decoder_mask_ratio`` the decoder also drops patches, by
running cell masking (:func:`fastvl.ops.running_cell_masking`): it runs on the class token,
the visible patches and the removed patches the cell keeps (``decoded``), and the loss covers
``decoded`` only. Its rows keep ascending patch order; the fused path picks them from the
unshuffled decoder input with :func:`fastvl.ops.gather_tokens` (plain: ``torch.gather``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

import fastvl.patch.timm as fastvl_timm
from fastvl.ops.registry import check_op_backend
from fastvl.ops import (
    gather_tokens,
    masked_patch_embed,
    masked_pixel_loss,
    random_masking,
    running_cell_masking,
    unshuffle_with_mask_token,
)
from fastvl.reference import masking as plain_masking

__all__ = [
    "MaskedAutoencoderViT",
    "TubeletEmbed",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
    "mae_vit_tiny",
    "mae_vit_base_patch16",
    "mae_vit_large_patch16",
]


def sincos_pos_embed_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """positions (N,) float64 -> (N, dim) float64: ``[sin(pos * w_i), cos(pos * w_i)]`` with
    ``w_i = 10000 ** (-i / (dim / 2))``, i < dim / 2 (the Transformer's table)."""
    if dim % 2:
        raise ValueError(f"sincos_pos_embed_1d: dim must be even, got {dim}")
    freqs = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """(h * w, dim) float64 positions of an (h, w) patch grid, row-major: the first half of
    the channels encodes the column, the second half the row (MAE's layout)."""
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: dim must be divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64),
        torch.arange(grid[1], dtype=torch.float64),
        indexing="ij",
    )
    return torch.cat(
        [sincos_pos_embed_1d(dim // 2, cols.flatten()),
         sincos_pos_embed_1d(dim // 2, rows.flatten())],
        dim=1,
    )


class TubeletEmbed(nn.Module):
    """Video patch embedding: ``proj`` is a Conv3d with kernel = stride = (pt, p, p).

    forward: (B, C, T, H, W) -> (B, T' * h * w, D), tubelets ordered (t, i, j) row-major.
    """

    def __init__(self, img_size: int, patch_size: int, num_frames: int, tubelet_size: int,
                 in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = (tubelet_size, patch_size, patch_size)
        side = img_size // patch_size
        self.grid_size = (num_frames // tubelet_size, side, side)
        self.num_patches = math.prod(self.grid_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder and decoder of timm ``Block``s (see the module docstring).

    Args:
        img_size, patch_size, in_chans: square images of ``img_size`` pixels cut into
            ``patch_size`` squares (``img_size`` must be a multiple of it).
        embed_dim, depth, num_heads: the encoder. decoder_embed_dim, decoder_depth,
            decoder_num_heads: the decoder. mlp_ratio: both.
        norm_pix_loss: regress per-patch normalised pixels (MAE's ``(x - mean) /
            sqrt(var + 1e-6)`` over the patch).
        num_frames, tubelet_size: video when ``num_frames > 1``: clips of ``num_frames``
            frames, tubelets of ``tubelet_size`` frames (``num_frames`` must be a multiple).
        fused: fastvl's fused ops (True) or the plain-PyTorch path (False); an attribute that
            may be changed at any time (parameters and state dict stay the same).
        decoder_mask_ratio: VideoMAE V2's dual masking: the share of patches the decoder
            drops by running cell masking, 0.25, 0.5 (the paper's) or 0.75; 0 (default): the
            decoder sees every patch. Needs a video model whose T' = num_frames /
            tubelet_size is a multiple of 4 and whose patch grid is even, so that every
            sample decodes the same number of patches.
        backend: "auto", "triton" or "torch": the backend of every fused op and of the
            fused attention.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        num_frames: int = 1,
        tubelet_size: int = 1,
        *,
        fused: bool = True,
        backend: str = "auto",
        decoder_mask_ratio: float = 0.0,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(
                f"MaskedAutoencoderViT: img_size ({img_size}) must be a multiple of patch_size "
                f"({patch_size})"
            )
        if num_frames < 1 or tubelet_size < 1 or num_frames % tubelet_size:
            raise ValueError(
                f"MaskedAutoencoderViT: num_frames ({num_frames}) must be a positive multiple of "
                f"tubelet_size ({tubelet_size})"
            )
        self.backend = check_op_backend(
            "MaskedAutoencoderViT", backend, "attention", "masked_patch_embed",
            "unshuffle_with_mask_token", "masked_pixel_loss",
        )
        self.img_size, self.in_chans = img_size, in_chans
        self.num_frames = num_frames
        self.norm_pix_loss = norm_pix_loss
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        if num_frames > 1:
            self.patch_embed = TubeletEmbed(
                img_size, patch_size, num_frames, tubelet_size, in_chans, embed_dim
            )
            self.patch_size = self.patch_embed.patch_size
            self.frames = self.patch_embed.grid_size[0]
        else:
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
            self.patch_size = tuple(self.patch_embed.patch_size)
            self.frames = 1
        self.num_patches = self.patch_embed.num_patches
        self.decoder_mask_ratio = self._check_decoder_mask_ratio(decoder_mask_ratio)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", self._fixed_pos_embed(embed_dim))
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)
        ])
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", self._fixed_pos_embed(decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                  norm_layer=norm_layer)
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, math.prod(self.patch_size) * in_chans)
        self._init_weights()
        self._fused = False
        self.fused = fused

    def _check_decoder_mask_ratio(self, ratio) -> float:
        name = "MaskedAutoencoderViT"
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(f"{name}: decoder_mask_ratio must be a float, got "
                            f"{type(ratio).__name__}")
        if ratio == 0:
            return 0.0
        if ratio not in (0.25, 0.5, 0.75):
            raise ValueError(
                f"{name}: decoder_mask_ratio must be 0, 0.25, 0.5 or 0.75 (running cells of 4 "
                f"patches), got {ratio}"
            )
        height, width = self.patch_embed.grid_size[-2:]
        if self.frames % 4 or height % 2 or width % 2:
            raise ValueError(
                f"{name}: decoder_mask_ratio needs a video model with T' = num_frames / "
                f"tubelet_size a multiple of 4 and an even patch grid (every sample then "
                f"decodes the same number of patches), got T' = {self.frames} and a "
                f"{height} x {width} grid"
            )
        return float(ratio)

    def _fixed_pos_embed(self, dim: int) -> torch.Tensor:
        """(1, 1 + L, dim) float32: a zero row for the class token, then the patches'."""
        if self.frames > 1:
            patches = sincos_pos_embed_1d(dim, torch.arange(self.num_patches))
        else:
            patches = sincos_pos_embed_2d(dim, tuple(self.patch_embed.grid_size))
        table = torch.cat([patches.new_zeros(1, dim), patches], dim=0)
        return table.to(torch.float32).unsqueeze(0)

    def _init_weights(self) -> None:
        """MAE's: Xavier-uniform projections (the patch conv as a (D, C*p*p) matrix), zero
        biases, unit LayerNorms, N(0, 0.02) class and mask tokens."""
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def fused(self) -> bool:
        """True: fastvl's fused ops and attention; False: the plain-PyTorch path."""
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(
                f"MaskedAutoencoderViT: fused must be a bool, got {type(value).__name__}"
            )
        if value and not self._fused:
            fastvl_timm.apply(self, backend=self.backend)
        elif not value and self._fused:
            fastvl_timm.remove(self)
        self._fused = value

    def extra_repr(self) -> str:
        return (f"fused={self.fused}, backend={self.backend!r}, "
                f"norm_pix_loss={self.norm_pix_loss}, "
                f"decoder_mask_ratio={self.decoder_mask_ratio}")

    # ---- forward -------------------------------------------------------------------------

    def _check_inputs(self, imgs, mask_ratio) -> None:
        name = "MaskedAutoencoderViT"
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
            raise TypeError(
                f"{name}: mask_ratio must be a float in [0, 1), got {type(mask_ratio).__name__}"
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"{name}: mask_ratio must lie in [0, 1), got {mask_ratio}")
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"{name}: imgs must be a torch.Tensor, got {type(imgs).__name__}")
        if not imgs.is_floating_point():
            raise TypeError(f"{name}: imgs must be a floating-point tensor, got {imgs.dtype}")
        video = self.num_frames > 1
        layout = "(B, C, T, H, W)" if video else "(B, C, H, W)"
        if imgs.dim() != (5 if video else 4):
            raise ValueError(
                f"{name}: imgs must be {layout} for this {'video' if video else 'image'} model, "
                f"got shape {tuple(imgs.shape)}"
            )
        if imgs.shape[1] != self.in_chans:
            raise ValueError(
                f"{name}: imgs has {imgs.shape[1]} channels, the model {self.in_chans}"
            )
        expected = ((self.num_frames,) if video else ()) + (self.img_size, self.img_size)
        size = tuple(imgs.shape[2:])
        for n, p in zip(size, self.patch_size):
            if n % p:
                raise ValueError(
                    f"{name}: image size {size} is not divisible by the patch size "
                    f"{self.patch_size}"
                )
        if size != expected:
            raise ValueError(
                f"{name}: imgs of size {size} do not match the model's {expected} (its "
                "position table is fixed)"
            )

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75,
                noise: Optional[torch.Tensor] = None,
                decoder_phase: Optional[torch.Tensor] = None):
        """imgs: (B, C, H, W), or (B, C, T, H, W) for a video model.

        Args:
            mask_ratio: in [0, 1); ``int(S * (1 - mask_ratio))`` of the S spatial patches are
                kept per sample (per time slot for video).
            noise: optional (B, S) float scores, the smallest kept (S = L for images, h * w
                for video); default uniform random.
            decoder_phase: with ``decoder_mask_ratio``, optional (B,) int64 running cell
                phases (see :func:`fastvl.ops.running_cell_masking`); default random.

        Returns:
            ``(loss, pred, mask)``: loss 0-dim float32; mask (B, L) float32, 1 = a patch the
            loss covers: removed by the encoder (and, with ``decoder_mask_ratio``, decoded),
            in patch order; pred pixel predictions flattened (pt, ph, pw, C), channel last:
            plain path (B, L, N) for every patch (MAE's; zeros at patches the decoder
            dropped), fused path (B, M, N) for the M patches of ``mask`` only, in ascending
            patch order (``pred_plain[mask.bool()].view(B, M, N)`` in the plain path's terms).
        """
        self._check_inputs(imgs, mask_ratio)
        batch = imgs.shape[0]
        ids_keep, ids_restore, mask = random_masking(
            batch, self.num_patches, mask_ratio, noise=noise, device=imgs.device,
            frames=self.frames,
        )
        num_kept = ids_keep.shape[1]
        num_decoded = self.num_patches - num_kept
        decoded = mask  # the patches the loss covers
        if self.decoder_mask_ratio:
            skipped = running_cell_masking(
                batch, self.frames, *self.patch_embed.grid_size[-2:], self.decoder_mask_ratio,
                phase=decoder_phase, device=imgs.device,
            )
            decoded = mask * (1 - skipped)
            num_decoded = round(num_decoded * (1 - self.decoder_mask_ratio))
        if self.fused:
            x = self._embed_fused(imgs, ids_keep)
        else:
            x = self._embed_plain(imgs, ids_keep)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_embed(self.norm(x))
        if self.fused:
            x = unshuffle_with_mask_token(
                x, ids_restore, self.mask_token, num_prefix_tokens=1,
                pos_embed=self.decoder_pos_embed, backend=self.backend,
            )
        else:
            x = plain_masking.unshuffle_with_mask_token(
                x, ids_restore, self.mask_token, 1, self.decoder_pos_embed
            )
        # the patches the decoder runs on, ascending (all of them without dual masking)
        positions = None
        if self.decoder_mask_ratio:
            positions = plain_masking.masked_patch_index((1 - mask) + decoded,
                                                         num_kept + num_decoded)
            rows = torch.cat([positions.new_zeros(batch, 1), positions + 1], dim=1)
            if self.fused:
                x = gather_tokens(x, rows, backend=self.backend, check_bounds=False)
            else:
                x = torch.gather(x, 1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        for block in self.decoder_blocks:
            x = block(x)
        patches = self.decoder_norm(x)[:, 1:]
        targets = imgs.detach()
        if self.fused:
            decoded_rows = decoded if positions is None else decoded.gather(1, positions)
            rows = plain_masking.masked_patch_index(decoded_rows, num_decoded)
            pred = self.decoder_pred(
                gather_tokens(patches, rows, backend=self.backend, check_bounds=False)
            )
            loss = masked_pixel_loss(
                pred, targets, decoded, self.patch_size, norm_pix=self.norm_pix_loss,
                backend=self.backend,
            )
        else:
            pred = self.decoder_pred(patches)
            if positions is not None:
                pred = pred.new_zeros(batch, self.num_patches, pred.shape[-1]).scatter(
                    1, positions.unsqueeze(-1).expand(-1, -1, pred.shape[-1]), pred)
            loss = plain_masking.masked_pixel_loss(
                pred, targets, decoded, self.patch_size, self.norm_pix_loss
            )
        return loss, pred, decoded

    def _embed_fused(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """(B, 1 + K, D): class token and the kept patches, projected from the image."""
        tensors = (imgs, self.patch_embed.proj.weight, self.patch_embed.proj.bias,
                   self.pos_embed, self.cls_token)
        device_type = imgs.device.type
        if torch.is_autocast_enabled(device_type):  # cast like autocast casts the plain conv
            dtype = torch.get_autocast_dtype(device_type)
            tensors = tuple(t.to(dtype) for t in tensors)
        imgs, weight, bias, pos_embed, cls_token = tensors
        return masked_patch_embed(
            imgs, weight, bias, pos_embed, ids_keep, self.patch_size, cls_token=cls_token,
            backend=self.backend, check_bounds=False,
        )

    def _embed_plain(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """MAE's: embed every patch, add positions, keep ``ids_keep``, prepend the class token."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls.to(x.dtype), x], dim=1)


def mae_vit_tiny(**kwargs) -> MaskedAutoencoderViT:
    """For tests: 32 px images, patch 8 (16 patches), dim 64, depth 2, 2 heads; decoder dim 32,
    depth 1, 2 heads."""
    config = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    return MaskedAutoencoderViT(**{**config, **kwargs})


def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT:
    """MAE ViT-B/16: dim 768, depth 12, 12 heads; decoder 512, depth 8, 16 heads."""
    config = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                  decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    return MaskedAutoencoderViT(**{**config, **kwargs})


def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT:
    """MAE ViT-L/16: dim 1024, depth 24, 16 heads; decoder 512, depth 8, 16 heads."""
    config = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                  decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    return MaskedAutoencoderViT(**{**config, **kwargs})
