"""Pure-PyTorch implementations: the ``torch`` backend of every op and the test oracle."""

from fastvl.reference.gather import gather_tokens, scatter_add_tokens
from fastvl.reference.pruning import keep_topk_tokens, topk_candidate_index, topk_token_index

__all__ = [
    "gather_tokens",
    "scatter_add_tokens",
    "keep_topk_tokens",
    "topk_candidate_index",
    "topk_token_index",
]
