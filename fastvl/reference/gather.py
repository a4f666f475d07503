"""Token gather / scatter-add in plain PyTorch.

On CPU in eager mode both run on the tokens of the whole batch as one (B * N, C) table of
rows (a view of x, no copy, when x's batch stride allows it): ``index_select`` /
``index_add_`` with the row numbers ``b * N + index[b, k]``, several times faster there than
``torch.gather`` / ``scatter_add`` with an index expanded over the channels, in both
directions (the gradient of ``index_select`` is an ``index_add_``, and the gradient of that
an ``index_select`` again). Elsewhere (GPU, torch.compile) the gather is ``torch.gather``:
one launch. An index outside [0, N) raises (IndexError on CPU), as ``torch.gather`` does: it
is never read from another sample's rows.
"""

import torch

from fastvl.ops._checks import host_readable


def _rows(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, K) token indices -> (B * K,) rows of the (B * N) table. An index outside [0, N)
    raises IndexError: checked on the host for CPU tensors in eager mode (one min / max),
    elsewhere its row is -1, out of range of every table, so index_select / index_add_
    raise."""
    batch = index.shape[0]
    step = max(num_tokens, 1)  # (N = 0: there is no valid index)
    offsets = torch.arange(0, batch * step, step, device=index.device).unsqueeze(1)
    if host_readable(index):
        if index.numel():
            low, high = torch.aminmax(index)
            low, high = low.item(), high.item()
            if low < 0 or high >= num_tokens:
                bad = low if low < 0 else high
                raise IndexError(
                    f"index {bad} is out of bounds for the token dimension with size {num_tokens}"
                )
        return (index + offsets).reshape(-1)
    valid = index.clamp(0, num_tokens - 1) == index
    return torch.where(valid, index + offsets, -1).reshape(-1)


def _flat_view(x: torch.Tensor) -> bool:
    """Whether x (B, N, C) views as (B * N, C) without a copy."""
    return x.shape[0] <= 1 or x.shape[1] <= 1 or x.stride(0) == x.shape[1] * x.stride(1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, N, C), index: (B, K) int64 -> (B, K, C) with out[b, k] = x[b, index[b, k]].

    ``torch.gather`` (one launch, its own bounds assertion) except on CPU in eager mode
    (:func:`~fastvl.ops._checks.host_readable`), where the flat-table ``index_select`` is
    faster."""
    batch, num_tokens, channels = x.shape
    if not (host_readable(index) and _flat_view(x)):
        # (a strided x: reading the K rows beats copying x to a flat table)
        return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, channels))
    table = x.reshape(batch * num_tokens, channels)
    return table.index_select(0, _rows(index, num_tokens)).view(batch, index.shape[1], channels)


def scatter_add_tokens(src: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """src: (B, K, C), index: (B, K) -> (B, num_tokens, C): zeros, then out[b, index[b, k]] += src[b, k]."""
    batch, kept, channels = src.shape
    out = src.new_zeros(batch * num_tokens, channels)
    out.index_add_(0, _rows(index, num_tokens), src.reshape(batch * kept, channels))
    return out.view(batch, num_tokens, channels)
