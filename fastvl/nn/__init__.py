"""Drop-in ``torch.nn`` modules whose hot paths run on fastvl ops.

:class:`Attention` replaces ``timm.layers.Attention`` (same arguments and state-dict keys).
"""

from fastvl.nn.attention import Attention

__all__ = ["Attention"]
