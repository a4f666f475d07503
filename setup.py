"""Build script for fastvl (metadata lives in pyproject.toml).

Installs the Python packages under fastvl/ plus the top-level kernels/ directory as
``fastvl.kernels``, and optionally the CUDA extension ``fastvl._C`` built from csrc/.

Environment:
  FASTVL_BUILD_CUDA=1     build fastvl._C; any failure stops the install.
  FASTVL_BUILD_CUDA=0     pure-Python install; torch is never imported.
  (unset)                 build only when torch is a CUDA build and a CUDA toolkit (nvcc) is
                          found; a failed build prints a warning and the install continues
                          pure-Python.
  TORCH_CUDA_ARCH_LIST    archs to compile for, e.g. "8.0;9.0+PTX" (default "8.0;9.0").
  MAX_JOBS                parallel compile jobs (ninja).
  NVCC_THREADS            nvcc threads per compile job (its archs in parallel).
  FASTVL_CUDA_WERROR=1    a kernel that spills registers or uses local memory fails the
                          build (ptxas warnings as errors; CI sets it).
  CUDA_HOME / CUDA_PATH   the toolkit; otherwise found from nvcc on PATH or /usr/local/cuda.

Use ``pip install --no-build-isolation`` so the build sees the installed torch.

Version and torch requirement: a build with FASTVL_BUILD_CUDA=1 is tied to the torch it
compiled against, so its version carries it as a local label (``0.1.0+torch2.14cu130``) and
it requires that torch release (``torch>=2.14,<2.15``); every other build is ``0.1.0`` with
``torch>=2.6``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSION_NAME = "fastvl._C"
# Written next to the built extension: the torch / CUDA versions and archs it was built with.
BUILD_RECORD = "_C_build.json"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
# "8.0", "9.0a", "8.6+PTX": the numeric forms torch.utils.cpp_extension understands.
_ARCH_RE = re.compile(r"\d+\.\d+[a-z]?(\+PTX)?")


class CudaBuildSkipped(Exception):
    """The CUDA extension cannot be built here; the message says why."""


def _log(message: str) -> None:
    # pip shows this with -v (and always when the install fails).
    print(f"fastvl setup: {message}", file=sys.stderr, flush=True)


def _warn_banner(lines: list[str]) -> None:
    bar = "=" * 78
    body = "\n".join(f"fastvl setup: {line}" for line in lines)
    print(f"\n{bar}\n{body}\n{bar}\n", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- packages


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = find_packages(where=ROOT, include=["fastvl", "fastvl.*"])
    package_dir: dict[str, str] = {}
    kernels_dir = os.path.join(ROOT, "kernels")
    if os.path.isfile(os.path.join(kernels_dir, "__init__.py")):
        # A top-level package named `kernels` would clash with the PyPI package of that
        # name, so the directory is installed as fastvl.kernels (subpackages follow).
        package_dir["fastvl.kernels"] = "kernels"
        packages.append("fastvl.kernels")
        packages += ["fastvl.kernels." + sub for sub in find_packages(where=kernels_dir)]
    else:
        _log("kernels/__init__.py not found; fastvl.kernels will not be installed")
    return packages, package_dir


# --------------------------------------------------------------------------- build decision


def _build_mode() -> str:
    raw = os.environ.get("FASTVL_BUILD_CUDA")
    value = (raw or "").strip().lower()
    if value == "":
        return "auto"
    if value in ("1", "true", "yes", "on"):
        return "force"
    if value in ("0", "false", "no", "off"):
        return "off"
    raise SystemExit(
        f"fastvl setup: FASTVL_BUILD_CUDA must be 1 (build the CUDA extension) or 0 "
        f"(pure Python), got {raw!r}"
    )


def _nvcc_install_dir(nvcc: str) -> str | None:
    """Where nvcc really lives (nvcc on PATH may be a wrapper script): ask nvcc itself."""
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-c", "fastvl_probe.cu"],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    return os.path.dirname(match.group(1).strip()) if match else None


def _find_cuda_home() -> str:
    """The CUDA toolkit root; raises CudaBuildSkipped when there is none."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        explicit = os.environ.get(var)
        if explicit:
            # An explicit setting wins (torch.utils.cpp_extension would use it too).
            if not os.path.isfile(os.path.join(explicit, "bin", "nvcc")):
                raise CudaBuildSkipped(f"{var}={explicit} has no bin/nvcc")
            return explicit
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            home = _nvcc_install_dir(nvcc) or home
        if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
            raise CudaBuildSkipped(f"cannot locate the toolkit of nvcc at {nvcc}; set CUDA_HOME")
        return home
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    raise CudaBuildSkipped("no CUDA toolkit found (no CUDA_HOME, no nvcc on PATH, no /usr/local/cuda)")


def _nvcc_version(cuda_home: str) -> str:
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        text = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise CudaBuildSkipped(f"{nvcc} --version failed: {exc}") from exc
    match = re.search(r"\bV(\d+\.\d+(?:\.\d+)*)", text) or re.search(r"release (\d+\.\d+)", text)
    if match is None:
        raise CudaBuildSkipped(f"cannot read the CUDA version from `{nvcc} --version`")
    return match.group(1)


def _cuda_arch_list(torch) -> str:
    """TORCH_CUDA_ARCH_LIST normalised to "X.Y[;X.Y+PTX...]" (default DEFAULT_CUDA_ARCH_LIST)."""
    raw = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not raw:
        return DEFAULT_CUDA_ARCH_LIST
    if raw == "native":
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        if not caps:
            raise CudaBuildSkipped("TORCH_CUDA_ARCH_LIST=native but no CUDA device is visible")
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    archs: list[str] = []
    for entry in re.split(r"[\s;,]+", raw):
        if not entry:
            continue
        if not _ARCH_RE.fullmatch(entry):
            raise CudaBuildSkipped(
                f"TORCH_CUDA_ARCH_LIST={raw!r}: cannot use {entry!r}; fastvl expects numeric "
                "compute capabilities such as '8.0;9.0' or '8.0;9.0+PTX'"
            )
        if entry not in archs:
            archs.append(entry)
    if not archs:
        return DEFAULT_CUDA_ARCH_LIST
    return ";".join(archs)


def _nvcc_threads() -> list[str]:
    """nvcc --threads N (compile the archs of one file in parallel) from NVCC_THREADS."""
    threads = os.environ.get("NVCC_THREADS", "").strip()
    if not threads:
        return []
    if not threads.isdigit():
        raise SystemExit(f"fastvl setup: NVCC_THREADS must be a number, got {threads!r}")
    return ["--threads", threads]


def _char_codes(text: str) -> str:
    # See csrc/registration.cpp: the string travels as "56,46,48" to avoid shell quoting.
    return ",".join(str(ord(ch)) for ch in text)


def _ptxas_checks() -> list:
    """ptxas warns about spills and local memory in fastvl's kernels; FASTVL_CUDA_WERROR=1
    (set by CI) makes those warnings errors, so a kernel that spills fails the build."""
    flags = "-warn-spills,-warn-lmem-usage"
    if os.environ.get("FASTVL_CUDA_WERROR") == "1":
        flags += ",-Werror"
    return [f"-Xptxas={flags}"]


def _cuda_extension(mode: str):
    """(ext_modules, cmdclass) for the CUDA extension; raises CudaBuildSkipped."""
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken install
        raise CudaBuildSkipped(f"torch is not importable ({type(exc).__name__}: {exc})") from exc
    if not torch.version.cuda:
        raise CudaBuildSkipped(
            f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)"
        )
    cuda_home = _find_cuda_home()
    nvcc_version = _nvcc_version(cuda_home)
    arch_list = _cuda_arch_list(torch)

    # torch.utils.cpp_extension reads these when it is imported / when it compiles.
    # Exporting CUDA_HOME matters when nvcc on PATH is a wrapper script outside the toolkit.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))) + sorted(
        glob.glob(os.path.join(ROOT, "csrc", "*.cu"))
    )
    sources = [os.path.relpath(path, ROOT) for path in sources]
    if not any(path.endswith(".cu") for path in sources):
        raise CudaBuildSkipped("csrc/ has no .cu sources")

    library_dirs = []
    cuda_lib = os.path.join(cuda_home, "lib")
    if os.path.isdir(cuda_lib):
        library_dirs.append(cuda_lib)  # some toolkits ship lib/ and no lib64/

    # The C++ standard is left to BuildExtension, which picks the one the installed torch's
    # headers need (C++17 for older torch, C++20 for torch >= 2.10). No --use_fast_math.
    build_info = [
        f"-DFASTVL_CUDA_ARCHS_CHARS={_char_codes(arch_list)}",
        f"-DFASTVL_CUDA_VERSION_CHARS={_char_codes(nvcc_version)}",
    ]
    extension = CUDAExtension(
        name=EXTENSION_NAME,
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        library_dirs=library_dirs,
        extra_compile_args={
            "cxx": ["-O3", *build_info],
            "nvcc": ["-O3", "-lineinfo", *_ptxas_checks(), *_nvcc_threads()],
        },
    )

    _log(
        f"building {EXTENSION_NAME}: CUDA_HOME={cuda_home}, nvcc {nvcc_version}, "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"TORCH_CUDA_ARCH_LIST={arch_list}, MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}"
    )
    if nvcc_version.split(".")[:2] != torch.version.cuda.split(".")[:2]:
        _log(
            f"note: nvcc {nvcc_version} differs from torch's CUDA {torch.version.cuda}; "
            "a different major version fails, a different minor version is usually fine"
        )

    record = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
              "nvcc": nvcc_version, "cuda_archs": arch_list}

    class RecordingBuildExtension(BuildExtension):
        """Writes the build record (fastvl/_C_build.json) next to the built extension, for
        the loader's version check (fastvl/_extension.py)."""

        def run(self):
            super().run()
            for ext in self.extensions:
                path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)),
                                    BUILD_RECORD)
                with open(path, "w") as f:
                    json.dump(record, f, indent=1)
                _log(f"wrote {path}: {record}")

    if mode == "force":
        return [extension], {"build_ext": RecordingBuildExtension}

    class OptionalBuildExtension(RecordingBuildExtension):
        """Auto mode: a failed build warns and leaves a pure-Python install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler errors, ninja's RuntimeError, version checks
                removed = self._remove_outputs()
                self.extensions = []
                self.distribution.ext_modules = []
                lines = [
                    f"WARNING: building the CUDA extension {EXTENSION_NAME} failed; installing "
                    "fastvl without it (torch and triton backends still work).",
                    f"  error: {type(exc).__name__}: {exc}",
                    "  set FASTVL_BUILD_CUDA=1 to make this an error, or FASTVL_BUILD_CUDA=0 "
                    "to skip the attempt.",
                ]
                lines += [f"  removed the stale {path}" for path in removed]
                _warn_banner(lines)

        def _remove_outputs(self) -> list[str]:
            removed = []
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                filename = os.path.basename(self.get_ext_filename(ext.name))
                package = ext.name.rpartition(".")[0]
                candidates = {
                    self.get_ext_fullpath(ext.name),
                    os.path.join(build_py.get_package_dir(package), filename),
                }
                candidates |= {os.path.join(os.path.dirname(path), BUILD_RECORD)
                               for path in candidates}
                for path in candidates:
                    if os.path.isfile(path):
                        os.remove(path)
                        removed.append(path)
            return removed

    return [extension], {"build_ext": OptionalBuildExtension}


def _stale_extension_files() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "fastvl", "_C.*so"))) + sorted(
        glob.glob(os.path.join(ROOT, "fastvl", "_C.*pyd"))
    )


def _extension_config() -> tuple[list, dict]:
    mode = _build_mode()
    if mode == "off":
        _log("FASTVL_BUILD_CUDA=0: pure-Python install, not building fastvl._C")
    else:
        try:
            return _cuda_extension(mode)
        except CudaBuildSkipped as exc:
            if mode == "force":
                raise SystemExit(
                    f"fastvl setup: FASTVL_BUILD_CUDA=1 but fastvl._C cannot be built: {exc}"
                ) from exc
            _log(f"not building fastvl._C ({exc}); pure-Python install")
        except Exception as exc:
            if mode == "force":
                raise
            _warn_banner(
                [
                    "WARNING: could not configure the CUDA extension fastvl._C; "
                    "installing fastvl without it.",
                    f"  error: {type(exc).__name__}: {exc}",
                ]
            )
    for path in _stale_extension_files():
        _log(
            f"note: {path} from an earlier build is still there and is what `import fastvl._C` "
            "loads from a source checkout / editable install; delete it if it is stale"
        )
    return [], {}


def _base_version() -> str:
    with open(os.path.join(ROOT, "fastvl", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _version_and_requirements(pinned_torch: bool) -> tuple[str, list[str]]:
    """(version, install_requires): with ``pinned_torch`` (a forced CUDA build) the local
    version names the torch / CUDA it was built with, and that torch release is required."""
    version, torch_requirement = _base_version(), "torch>=2.6"
    if pinned_torch:
        import torch

        major, minor = (int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
        cuda = torch.version.cuda.replace(".", "")
        version += f"+torch{major}.{minor}cu{cuda}"
        torch_requirement = f"torch>={major}.{minor},<{major}.{minor + 1}"
    return version, [
        torch_requirement,
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
    ]


if __name__ == "__main__":
    PACKAGES, PACKAGE_DIR = _packages()
    EXT_MODULES, CMDCLASS = _extension_config()
    VERSION, INSTALL_REQUIRES = _version_and_requirements(
        bool(EXT_MODULES) and _build_mode() == "force")
    setup(
        version=VERSION,
        install_requires=INSTALL_REQUIRES,
        packages=PACKAGES,
        package_dir=PACKAGE_DIR,
        package_data={"fastvl": [BUILD_RECORD], "fastvl.ops": ["dispatch_table.json"]},
        ext_modules=EXT_MODULES,
        cmdclass=CMDCLASS,
        zip_safe=False,
    )
