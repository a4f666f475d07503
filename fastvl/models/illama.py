"""``ILLaMAViT``: iLLaMA (Wang et al., "Adapting LLaMA Decoder to Vision Transformer", 2024),
a vision transformer built from LLaMA decoder blocks, on fastvl's attention.

Architecture (the paper's): a conv patch embedding; the class token appended *after* the
patches (post-sequence class token: under causal attention it is the one token that sees the
whole image) and a learned position table; blocks of RMSNorm, attention with rotary position
embedding (RoPE over the sequence index, LLaMA's interleaved pairs, theta 10000) and a
bias-free SwiGLU MLP (hidden ``2/3 * mlp_ratio * dim`` rounded up to a multiple of 256);
a final RMSNorm and a linear head on the class token.

Attention is causal, softened during training: ``causal_strength`` goes from 0
(bidirectional) to 1 (causal) over the first steps (:func:`causal_strength_schedule`; set
``model.causal_strength`` before each step). fastvl's soft mask adds ``log(1 -
causal_strength)`` to the logits of future keys (:func:`fastvl.ops.attention`'s
``causal_strength``, one fused kernel with its backward); the paper's code instead
multiplies the probabilities of future keys by ``1 - causal_strength`` after the softmax,
without renormalising the rows. Both are bidirectional at 0 and causal at 1; in between
fastvl's rows still sum to 1. This is the choice made here.

``fused=True`` runs :func:`fastvl.ops.attention` (``backend`` picks the implementation);
``fused=False`` the plain-PyTorch formulation (explicit logits, additive mask, softmax):
same parameters, same function, for comparison and as the test's second path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastvl.ops import attention
from fastvl.ops.registry import check_op_backend

__all__ = [
    "ILLaMAViT",
    "RMSNorm",
    "causal_strength_schedule",
    "illama_base",
    "illama_small",
    "illama_tiny",
    "rope_frequencies",
]


def causal_strength_schedule(step: int, steps: int) -> float:
    """iLLaMA's soft mask schedule: ``min(1, step / steps)``, linear from bidirectional
    (0 at step 0) to causal (1 from ``steps`` on); ``steps = 0`` is causal from the start."""
    if steps <= 0:
        return 1.0
    return min(1.0, max(0.0, step / steps))


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        normed = x.to(acc) * torch.rsqrt(x.to(acc).pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rope_frequencies(head_dim: int, num_positions: int, theta: float = 10000.0) -> torch.Tensor:
    """(num_positions, head_dim / 2, 2) float64: cos and sin of the angle ``n * theta^(-2i /
    head_dim)`` of position n and pair i."""
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE on x (B, H, N, D): each interleaved pair (x[2i], x[2i + 1]) rotated by its angle,
    in float32 (float64 for float64 x)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pairs = x.to(acc).unflatten(-1, (-1, 2))
    cos, sin = freqs[..., 0].to(acc), freqs[..., 1].to(acc)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class ILLaMAAttention(nn.Module):
    """Multi-head attention with RoPE and the soft causal mask; x (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(
                f"ILLaMAViT: embed_dim ({dim}) must split into num_heads ({num_heads}) heads of "
                "an even size (RoPE rotates pairs)"
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, causal_strength: float,
                fused: bool, backend: str) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        q, k = _rotate(q, freqs), _rotate(k, freqs)
        if fused:
            out = attention(q, k, v, causal=True, causal_strength=causal_strength,
                            scale=self.scale, backend=backend)
        else:
            out = _plain_soft_causal_attention(q, k, v, self.scale, causal_strength)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


def _plain_soft_causal_attention(q, k, v, scale: float, causal_strength: float):
    """softmax(scale q k^T + log(1 - causal_strength) on future keys) v, explicitly."""
    logits = (q @ k.transpose(-1, -2)) * scale
    tokens = q.shape[2]
    future = torch.ones(tokens, tokens, dtype=torch.bool, device=q.device).triu(1)
    if causal_strength >= 1.0:
        logits = logits.masked_fill(future, float("-inf"))
    elif causal_strength > 0.0:
        logits = logits + future.to(logits.dtype) * math.log1p(-causal_strength)
    return logits.softmax(dim=-1) @ v


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, bias-free; hidden = 2/3 of ``hidden`` rounded up to a
    multiple of ``multiple_of`` (LLaMA's sizing)."""

    def __init__(self, dim: int, hidden: int, multiple_of: int = 256):
        super().__init__()
        hidden = int(2 * hidden / 3)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ILLaMABlock(nn.Module):
    """Pre-norm LLaMA block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps)
        self.attn = ILLaMAAttention(dim, num_heads, qkv_bias)
        self.norm2 = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio))

    def forward(self, x, freqs, causal_strength: float, fused: bool, backend: str):
        x = x + self.attn(self.norm1(x), freqs, causal_strength, fused, backend)
        return x + self.mlp(self.norm2(x))


class ILLaMAViT(nn.Module):
    """iLLaMA image classifier (see the module docstring). imgs (B, C, H, W) -> (B, classes).

    Args:
        img_size, patch_size, in_chans: square images cut into ``patch_size`` squares.
        num_classes: the head's outputs (0: no head, forward returns the class token).
        embed_dim, depth, num_heads, mlp_ratio: the blocks (head dim even, for RoPE).
        qkv_bias: biases in the q, k, v projection (the paper's models have them).
        causal_strength: the soft mask, 0 (bidirectional) to 1 (causal, the default for
            inference); a plain attribute, set it per step in training
            (:func:`causal_strength_schedule`).
        fused: :func:`fastvl.ops.attention` (True) or the plain-PyTorch formulation (False).
        backend: the attention backend when fused ("auto" or an implementation name).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 192, depth: int = 12,
                 num_heads: int = 3, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-6, *, causal_strength: float = 1.0, fused: bool = True,
                 backend: str = "auto"):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"ILLaMAViT: img_size ({img_size}) must be a multiple of "
                             f"patch_size ({patch_size})")
        self.backend = check_op_backend("ILLaMAViT", backend, "attention")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList([
            ILLaMABlock(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_eps)
            for _ in range(depth)
        ])
        self.norm = RMSNorm(embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.register_buffer("rope", rope_frequencies(embed_dim // num_heads,
                                                      self.num_patches + 1),
                             persistent=False)
        self.causal_strength = causal_strength
        self.fused = fused
        self._init_weights()

    def _init_weights(self) -> None:
        """Truncated normal (std 0.02) linear weights, positions and class token; zero
        biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def extra_repr(self) -> str:
        return (f"fused={self.fused}, backend={self.backend!r}, "
                f"causal_strength={self.causal_strength}")

    def _check(self, imgs) -> float:
        name = "ILLaMAViT"
        if not isinstance(imgs, torch.Tensor) or not imgs.is_floating_point():
            raise TypeError(f"{name}: imgs must be a floating-point tensor, got "
                            f"{getattr(imgs, 'dtype', type(imgs).__name__)}")
        expected = (self.in_chans, self.img_size, self.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"{name}: imgs must be (B, {', '.join(map(str, expected))}), got "
                             f"shape {tuple(imgs.shape)}")
        strength = self.causal_strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise TypeError(f"{name}: causal_strength must be a float in [0, 1], got "
                            f"{type(strength).__name__}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"{name}: causal_strength must lie in [0, 1], got {strength}")
        return float(strength)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs (B, C, H, W) -> (B, L + 1, D) normed tokens, the class token last."""
        strength = self._check(imgs)
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2)
        x = torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x, self.rope, strength, self.fused, self.backend)
        return self.norm(x)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(imgs)[:, -1])


def illama_tiny(**kwargs) -> ILLaMAViT:
    """iLLaMA-T: dim 192, depth 12, 3 heads (5.7M parameters at 1000 classes)."""
    return ILLaMAViT(**{**dict(embed_dim=192, depth=12, num_heads=3), **kwargs})


def illama_small(**kwargs) -> ILLaMAViT:
    """iLLaMA-S: dim 384, depth 12, 6 heads."""
    return ILLaMAViT(**{**dict(embed_dim=384, depth=12, num_heads=6), **kwargs})


def illama_base(**kwargs) -> ILLaMAViT:
    """iLLaMA-B: dim 768, depth 12, 12 heads."""
    return ILLaMAViT(**{**dict(embed_dim=768, depth=12, num_heads=12), **kwargs})
