"""Loader for the optional compiled extension ``fastvl._C`` (CUDA kernels in csrc/).

Importing this module never raises: if the extension is missing or broken, ``EXTENSION`` is
None and ``LOAD_ERROR`` says why. A loaded extension has registered the
``torch.ops.fastvl.*_cuda`` operators.

The build writes ``fastvl/_C_build.json`` next to the extension (``BUILD_RECORD``: the torch
and CUDA versions and archs it was built with). An extension built for another torch release
(major.minor) or CUDA major version is not loaded: one warning names both versions and how
to rebuild, and the ops fall back to their ``triton`` / ``torch`` backends.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import warnings
from typing import Optional, Sequence

NOT_BUILT = "not built (pip install with FASTVL_BUILD_CUDA=1 and a CUDA toolkit)"
REBUILD = ("rebuild it for this torch: FASTVL_BUILD_CUDA=1 pip install --no-build-isolation "
           "--no-deps --force-reinstall <fastvl sdist or source directory>")
_RECORD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_build.json")


def read_build_record(path: str = _RECORD_PATH) -> Optional[dict]:
    """The build record of the extension (torch, torch_cuda, nvcc, cuda_archs), or None if
    there is none (no build, or one from before records were written) or it is unreadable."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _release(version: Optional[str], parts: int) -> tuple:
    return tuple(re.findall(r"\d+", (version or "").split("+")[0])[:parts])


def build_mismatch(record: Optional[dict], torch_version: str,
                   torch_cuda: Optional[str]) -> Optional[str]:
    """Why an extension with build ``record`` cannot run with this torch (another release
    major.minor, or another CUDA major version), or None if it can (or nothing is recorded)."""
    if not record:
        return None
    built, built_cuda = record.get("torch"), record.get("torch_cuda")
    if (_release(built, 2) == _release(torch_version, 2)
            and _release(built_cuda, 1) == _release(torch_cuda, 1)):
        return None
    return (f"fastvl._C was built for torch {built} (CUDA {built_cuda}) but torch "
            f"{torch_version} (CUDA {torch_cuda}) is running; not loading it (the ops use "
            f"their triton / torch backends); {REBUILD}")

# "8.0", "9.0a", "10.0f", each optionally with "+PTX".
_ARCH_RE = re.compile(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?")


def _load(record: Optional[dict] = None):
    """(the extension or None, why not). ``record``: the build record (default: the file's)."""
    try:
        # The extension links against libtorch / libc10, which `import torch` loads.
        import torch
    except Exception as exc:  # noqa: BLE001  (a broken torch install must not break fastvl)
        return None, f"torch failed to import ({type(exc).__name__}: {exc})"
    mismatch = build_mismatch(record if record is not None else read_build_record(),
                              torch.__version__, torch.version.cuda)
    if mismatch is not None:
        warnings.warn(mismatch, RuntimeWarning, stacklevel=2)
        return None, mismatch
    try:
        # import_module, not `from fastvl import _C`: while fastvl/__init__.py is still
        # running, the latter turns "no such module" into a generic ImportError.
        _C = importlib.import_module("fastvl._C")
    except ModuleNotFoundError as exc:
        if exc.name == "fastvl._C":
            return None, NOT_BUILT
        return None, f"fastvl._C failed to import ({type(exc).__name__}: {exc})"
    except Exception as exc:  # noqa: BLE001  (undefined symbols after a torch upgrade, ...)
        message = f"fastvl._C failed to import ({type(exc).__name__}: {exc})"
        if "undefined symbol" in str(exc):
            message += (
                f"; it was probably built against a different torch: {REBUILD}"
            )
        return None, message
    return _C, None


try:
    EXTENSION, LOAD_ERROR = _load()
except BaseException as _exc:  # noqa: BLE001  (belt and braces: importing must never fail)
    if isinstance(_exc, (KeyboardInterrupt, SystemExit)):
        raise
    EXTENSION, LOAD_ERROR = None, f"fastvl._C failed to load ({type(_exc).__name__}: {_exc})"


def is_built() -> bool:
    """True if ``fastvl._C`` loaded (so ``torch.ops.fastvl.*_cuda`` exist)."""
    return EXTENSION is not None


def cuda_archs() -> list[str]:
    """TORCH_CUDA_ARCH_LIST entries the extension was compiled for, e.g. ["8.0", "9.0+PTX"].

    Empty if the extension is not built.
    """
    raw = getattr(EXTENSION, "cuda_archs", "") if EXTENSION is not None else ""
    return [entry for entry in re.split(r"[\s;,]+", str(raw)) if entry]


def cuda_version() -> Optional[str]:
    """Version of the nvcc that compiled the extension (e.g. "13.0.88"), or None."""
    return getattr(EXTENSION, "cuda_version", None) if EXTENSION is not None else None


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code compiled for ``arch`` (a TORCH_CUDA_ARCH_LIST entry) runs on a device of
    compute capability ``capability``.

    SASS for sm_XY runs on devices with the same major version and minor >= Y; "+PTX" adds
    PTX that the driver JIT-compiles for any device of capability >= X.Y. Arch-specific
    targets ("9.0a") run only on exactly X.Y; family targets ("10.0f") on the same major
    with minor >= Y. Unrecognised entries run nowhere.
    """
    match = _ARCH_RE.fullmatch(arch.strip())
    if match is None:
        return False
    major, minor = int(match.group(1)), int(match.group(2))
    suffix, ptx = match.group(3), match.group(4) is not None
    dev_major, dev_minor = int(capability[0]), int(capability[1])
    if suffix == "a":
        return (dev_major, dev_minor) == (major, minor)
    if suffix == "f" or not ptx:
        return dev_major == major and dev_minor >= minor
    return (dev_major, dev_minor) >= (major, minor)


def arch_unsupported_reason(
    device,
    capability: Optional[tuple[int, int]] = None,
    archs: Optional[Sequence[str]] = None,
) -> Optional[str]:
    """None if the extension's compiled archs can run on the CUDA ``device``, else why not.

    ``capability`` (the device's compute capability) and ``archs`` (the compiled
    TORCH_CUDA_ARCH_LIST entries) default to the real device's and the built extension's;
    pass them to evaluate the rule without a GPU or a build.
    """
    if archs is None:
        if not is_built():
            return f"fastvl._C is not available: {LOAD_ERROR}"
        archs = cuda_archs()
    archs = list(archs)
    device_text = str(device)
    if capability is None:
        import torch

        device = torch.device(device)
        if device.type != "cuda":
            return f"the fastvl._C kernels run on CUDA devices, not on {device}"
        try:
            capability = torch.cuda.get_device_capability(device)
        except Exception as exc:  # noqa: BLE001  (no driver, bad index, ...)
            return f"cannot query the compute capability of {device} ({type(exc).__name__}: {exc})"
        device_text = str(device)
    major, minor = int(capability[0]), int(capability[1])
    if any(arch_runs_on(arch, (major, minor)) for arch in archs):
        return None
    built = ";".join(archs) if archs else "(none recorded)"
    return (
        f"{device_text} has compute capability {major}.{minor}, but fastvl._C was compiled "
        f"for CUDA archs {built} (TORCH_CUDA_ARCH_LIST), none of which runs on it; "
        f'reinstall with TORCH_CUDA_ARCH_LIST="{major}.{minor}" (or an older arch with +PTX)'
    )
