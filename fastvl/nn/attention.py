"""``Attention``: a drop-in for ``timm.layers.Attention`` computed by :func:`fastvl.ops.attention`.

Same constructor arguments, submodules (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``,
``gate``, ``proj``, ``proj_drop``), parameter initialisation order and state-dict keys as timm
1.0's class, so checkpoints load both ways with ``strict=True``; the forward takes timm's
arguments (``x``, ``attn_mask``, ``is_causal``) plus ``key_bias`` for ToMe proportional
attention; :meth:`Attention.forward_with_internals` also returns q, k and the lse (the ToMe
merge metric, EViT's class-token attention through :func:`fastvl.ops.attention_key_mass`).

Every call is one :func:`fastvl.ops.attention` call on ``backend``; an ``attn_mask`` that is the
same for every query (shape ``(..., 1, N)`` after broadcasting to (B, H, N, N)) is folded into
``key_bias`` so the kernels can serve it; a general per-query ``attn_mask`` and attention
dropout (training with ``attn_drop.p > 0``) go to the op as ``attn_mask`` / ``dropout_p``, and
the op registry picks the implementation that serves them (``auto``), or raises
:class:`~fastvl.ops.BackendNotSupportedError` with the reasons when a backend named here
cannot. The choice depends on the module's state and the arguments' shapes, never on values.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Type

import torch
from torch import nn

from fastvl.ops.attention import attention
from fastvl.ops.registry import check_op_backend
from fastvl.reference.attention import mask_as_bias

__all__ = ["Attention", "AttentionInternals", "check_backend"]

# timm's submodules of Attention, in its registration (and state-dict) order; gate may be None.
TIMM_SUBMODULES = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop")


def check_backend(backend) -> str:
    """``backend`` if ``"auto"`` or an implementation of ``attention``, else ValueError."""
    return check_op_backend("fastvl.nn.Attention", backend, "attention")


def _check_attn_mask(attn_mask, batch: int, heads: int, num_tokens: int) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(
            f"Attention: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}"
        )
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(
            "Attention: attn_mask must be bool (True = attend) or floating point (added to the "
            f"logits), got {attn_mask.dtype}"
        )
    full = (batch, heads, num_tokens, num_tokens)
    try:
        broadcast = torch.broadcast_shapes(attn_mask.shape, full)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(full):
        raise ValueError(
            f"Attention: attn_mask must broadcast to (B, H, N, N) = {full}, "
            f"got shape {tuple(attn_mask.shape)}"
        )


def _check_key_bias(key_bias, batch: int, heads: int, num_tokens: int) -> None:
    if not isinstance(key_bias, torch.Tensor):
        raise TypeError(
            f"Attention: key_bias must be a torch.Tensor or None, got {type(key_bias).__name__}"
        )
    if not key_bias.is_floating_point():
        raise TypeError(f"Attention: key_bias must be floating point, got {key_bias.dtype}")
    if tuple(key_bias.shape) not in ((batch, num_tokens), (batch, heads, num_tokens)):
        raise ValueError(
            f"Attention: key_bias must be (B, N) = ({batch}, {num_tokens}) or (B, H, N) = "
            f"({batch}, {heads}, {num_tokens}), got shape {tuple(key_bias.shape)}"
        )


def _is_per_key(attn_mask: torch.Tensor) -> bool:
    """True when the mask is the same for every query (its query dim broadcasts from 1)."""
    return attn_mask.dim() < 2 or attn_mask.shape[-2] == 1


def _per_key_mask_as_key_bias(attn_mask: torch.Tensor, batch: int, heads: int,
                              num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-key attn_mask as key_bias: (B, N) when it is shared by the heads, else (B, H, N)."""
    bias = mask_as_bias(attn_mask, dtype)
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))[:, :, 0, :]  # (b, h, n)
    if bias.shape[1] == 1:
        return bias[:, 0].expand(batch, num_tokens)
    return bias.expand(batch, heads, num_tokens)


def _add_key_biases(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    """Sum of two key biases, each (B, N) or (B, H, N)."""
    if a is None:
        return b
    if a.dim() != b.dim():
        a, b = (a.unsqueeze(1), b) if a.dim() == 2 else (a, b.unsqueeze(1))
    return a + b


class AttentionInternals(NamedTuple):
    """What :meth:`Attention.forward_with_internals` returns besides the output.

    ``q``, ``k``: (B, H, N, D) after ``q_norm`` / ``k_norm`` (ToMe's merge metric is
    ``k.mean(1)``); ``lse``: (B, H, N) float32 softmax log-denominators when asked for (with
    q and k, what :func:`fastvl.ops.attention_key_mass` needs), else None.
    """

    q: torch.Tensor
    k: torch.Tensor
    lse: Optional[torch.Tensor]


class Attention(nn.Module):
    """Multi-head self-attention, drop-in for ``timm.layers.Attention`` (timm 1.0).

    Args: as timm's (``dim``, ``num_heads``, ``attn_head_dim``, ``dim_out``, ``qkv_bias``,
    ``qk_norm``, ``scale_norm``, ``proj_bias``, ``gated``, ``attn_drop``, ``proj_drop``,
    ``norm_layer``, ``device``, ``dtype``), plus ``backend``: "auto" or an implementation of it,
    the :func:`fastvl.ops.attention` backend, fixed here for the module's lifetime.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Type[nn.Module]] = None,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if attn_head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(
                    f"Attention: dim ({dim}) must be divisible by num_heads ({num_heads}) "
                    "unless attn_head_dim is given"
                )
            attn_head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("Attention: norm_layer is required with qk_norm or scale_norm")
        self._set_attributes(num_heads, attn_head_dim, backend)
        factory = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias, **factory)
        self.q_norm = norm_layer(attn_head_dim, **factory) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **factory) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **factory) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **factory) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)

    def _set_attributes(self, num_heads: int, head_dim: int, backend: str) -> None:
        self.backend = check_backend(backend)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5

    @classmethod
    def from_timm(cls, attn: nn.Module, backend: str = "auto") -> "Attention":
        """A fastvl Attention that shares ``attn``'s submodules (and so its parameters).

        ``attn`` must be exactly a ``timm.layers.Attention`` (a subclass may change forward).
        Nothing is copied: training one trains the other; the training flag is taken over.
        """
        from timm.layers import Attention as TimmAttention

        if type(attn) is not TimmAttention:
            raise TypeError(
                "Attention.from_timm: attn must be a timm.layers.Attention, got "
                f"{type(attn).__module__}.{type(attn).__qualname__}"
            )
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._set_attributes(attn.num_heads, attn.head_dim, backend)
        module.scale = attn.scale
        for name in TIMM_SUBMODULES:
            setattr(module, name, getattr(attn, name))
        module.training = attn.training
        return module

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        key_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, dim_out).

        Args:
            attn_mask: as SDPA's, broadcastable to (B, H, N, N): bool (True = attend) or float
                (added to the logits). A mask that is the same for every query (e.g. (B, 1, 1, N)
                padding) runs on the fastvl op as ``key_bias``; any other mask runs on SDPA (see
                the module docstring). A query that sees no key gets 0 from the fastvl op where
                SDPA (and timm) give NaN.
            is_causal: causal mask. Unlike timm (whose SDPA path raises and whose explicit path
                drops the mask), it combines with ``attn_mask``: both apply.
            key_bias: (B, N) or (B, H, N) additive per-key logit bias, e.g. ``log(size)`` for
                ToMe proportional attention; added to ``attn_mask`` when both are given.
        """
        return self._forward(x, attn_mask, is_causal, key_bias, return_lse=False)[0]

    def forward_with_internals(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        key_bias: Optional[torch.Tensor] = None,
        *,
        return_lse: bool = False,
    ) -> tuple[torch.Tensor, AttentionInternals]:
        """:meth:`forward`, also returning q, k and (with ``return_lse``) the lse.

        ``(out, AttentionInternals(q, k, lse))``: out (B, N, dim_out) as from :meth:`forward`.
        ``return_lse`` needs the fastvl op path: ValueError where the call would go to SDPA
        (attention dropout in training, a per-query ``attn_mask``).
        """
        if not isinstance(return_lse, bool):
            raise TypeError(
                f"Attention: return_lse must be a bool, got {type(return_lse).__name__}"
            )
        return self._forward(x, attn_mask, is_causal, key_bias, return_lse)

    def _forward(self, x, attn_mask, is_causal, key_bias, return_lse):
        """(out (B, N, dim_out), AttentionInternals)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(
                f"Attention: x must be a (B, N, C) tensor, got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        if not isinstance(is_causal, bool):
            raise TypeError(f"Attention: is_causal must be a bool, got {type(is_causal).__name__}")
        batch, num_tokens, _ = x.shape
        heads = self.num_heads
        if attn_mask is not None:
            _check_attn_mask(attn_mask, batch, heads, num_tokens)
        if key_bias is not None:
            _check_key_bias(key_bias, batch, heads, num_tokens)

        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        out, lse = self._attend(q, k, v, attn_mask, is_causal, key_bias, return_lse)

        out = out.transpose(1, 2).reshape(batch, num_tokens, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out)), AttentionInternals(q, k, lse)

    def _attend(self, q, k, v, attn_mask, is_causal, key_bias, return_lse):
        """(softmax(q k^T * scale + masks) v, lse or None), out (B, H, N, D): one
        :func:`fastvl.ops.attention` call; a per-key attn_mask is folded into key_bias, so
        the kernels can serve it, and the registry picks what serves the rest."""
        dropout_p = self.attn_drop.p if self.training else 0.0
        if attn_mask is not None and _is_per_key(attn_mask):
            batch, heads, num_tokens, _ = q.shape
            mask_bias = _per_key_mask_as_key_bias(attn_mask, batch, heads, num_tokens, q.dtype)
            key_bias, attn_mask = _add_key_biases(key_bias, mask_bias), None
        result = attention(
            q, k, v, causal=is_causal, key_bias=key_bias, scale=self.scale,
            return_lse=return_lse, attn_mask=attn_mask, dropout_p=dropout_p,
            backend=self.backend,
        )
        return result if return_lse else (result, None)
