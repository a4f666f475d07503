"""Token gather / scatter-add in plain PyTorch (autograd through ``torch.gather``)."""

import torch


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, N, C), index: (B, K) int64 -> (B, K, C) with out[b, k] = x[b, index[b, k]]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_add_tokens(src: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """src: (B, K, C), index: (B, K) -> (B, num_tokens, C): zeros, then out[b, index[b, k]] += src[b, k]."""
    batch, _, channels = src.shape
    out = src.new_zeros(batch, num_tokens, channels)
    return out.scatter_add(1, index.unsqueeze(-1).expand(-1, -1, channels), src)
