"""fastvl: Triton and CUDA kernels that make vision-language models fast.

Every op lives in :mod:`fastvl.ops` and runs on one of three backends: ``torch`` (pure
PyTorch, always available), ``triton`` (:mod:`fastvl.kernels`) and ``cuda`` (the optional
compiled extension ``fastvl._C``). ``python -m fastvl info`` shows what this machine offers.
"""

__version__ = "0.1.0"

from fastvl import _shadowing  # noqa: E402

_shadowing.import_installed_kernels()  # before anything imports transformers

from fastvl import ops  # noqa: E402  (registers the torch.library ops)

__all__ = ["ops", "__version__"]
