"""Public functional ops. Each validates its inputs, picks a backend and carries autograd.

``backend="auto"`` takes the fastest backend that supports the call; naming one that
cannot serve it raises :class:`BackendNotSupportedError` listing the reasons.
"""

from fastvl.ops.attention import attention, varlen_attention
from fastvl.ops.attention_key_mass import (
    attention_graph_rank,
    attention_key_mass,
    graph_rank_reads_lse,
)
from fastvl.ops.gather import gather_tokens
from fastvl.ops.lora import lora_linear, routed_lora_linear
from fastvl.ops.masking import (
    masked_pixel_loss,
    random_masking,
    running_cell_masking,
    unshuffle_with_mask_token,
)
from fastvl.ops.patch_embed import masked_patch_embed
from fastvl.ops.pitome import pitome_energy, pitome_margins, pitome_match
from fastvl.ops.pruning import (
    keep_topk_tokens,
    similarity_prune_scores,
    topk_candidate_index,
    topk_token_index,
)
from fastvl.ops.registry import BACKENDS, OPS, BackendNotSupportedError, availability
from fastvl.ops.tome import TomePlan, tome_match, tome_merge, tome_merge_source, tome_unmerge

__all__ = [
    "attention",
    "attention_graph_rank",
    "attention_key_mass",
    "gather_tokens",
    "graph_rank_reads_lse",
    "keep_topk_tokens",
    "lora_linear",
    "masked_patch_embed",
    "masked_pixel_loss",
    "pitome_energy",
    "pitome_margins",
    "pitome_match",
    "random_masking",
    "routed_lora_linear",
    "similarity_prune_scores",
    "running_cell_masking",
    "topk_candidate_index",
    "topk_token_index",
    "tome_match",
    "tome_merge",
    "tome_merge_source",
    "tome_unmerge",
    "TomePlan",
    "unshuffle_with_mask_token",
    "varlen_attention",
    "BACKENDS",
    "OPS",
    "BackendNotSupportedError",
    "availability",
]
