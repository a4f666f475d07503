"""Drop-in ``torch.nn`` modules whose hot paths run on fastvl ops.

:class:`Attention` replaces ``timm.layers.Attention`` (same arguments and state-dict keys).
:class:`LoRALinear` / :class:`RoutedLoRALinear` wrap an ``nn.Linear`` with one / several (per
token routed, see :func:`lora_route`) LoRA adapters; state dicts read like peft's.
"""

from fastvl.nn.attention import Attention
from fastvl.nn.lora import LoRALinear, RoutedLoRALinear, lora_route

__all__ = ["Attention", "LoRALinear", "RoutedLoRALinear", "lora_route"]
