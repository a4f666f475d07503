"""Pure-PyTorch implementations: the ``torch`` backend of every op and the test oracle."""

from fastvl.reference.gather import gather_tokens, scatter_add_tokens

__all__ = ["gather_tokens", "scatter_add_tokens"]
