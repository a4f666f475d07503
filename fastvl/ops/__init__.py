"""Public functional ops. Each validates its inputs, picks a backend and carries autograd.

``backend="auto"`` takes the fastest backend that supports the call; naming one that
cannot serve it raises :class:`BackendNotSupportedError` listing the reasons.
"""

from fastvl.ops.attention import attention
from fastvl.ops.gather import gather_tokens
from fastvl.ops.registry import BACKENDS, OPS, BackendNotSupportedError, availability

__all__ = [
    "attention",
    "gather_tokens",
    "BACKENDS",
    "OPS",
    "BackendNotSupportedError",
    "availability",
]
