"""Builds one extension, ``manet_kernels._C``, against the torch of the build
environment: install with ``pip install --no-build-isolation .`` (pip's default
isolated build has no torch, and the build then stops with a message saying so).

C++ CPU sources are always built. CUDA sources (``csrc/cuda/*.cu``) are built when
torch has CUDA and nvcc is found. Environment switches:

* ``MANET_KERNELS_CUDA=0`` never build CUDA; ``=1`` require it (fail if impossible);
  unset: build it when possible, otherwise warn and build the CPU package.
* ``TORCH_CUDA_ARCH_LIST``: GPU architectures; default ``8.0;9.0`` when no GPU is
  visible to pick one from.
* ``MANET_KERNELS_NO_EXT=1``: skip the extension (pure-Python package: reference
  and Triton backends only).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import warnings

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import SetupError

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _real_cuda_home() -> str | None:
    """The toolkit root. ``nvcc`` on PATH may be a wrapper script, from which torch
    would guess the root wrong: follow the wrapper to the real binary."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and _is_elf(os.path.join(home, "bin", "nvcc")):
            return home
    cands = []
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        nvcc = os.path.realpath(nvcc)
        if _is_elf(nvcc):
            cands.append(nvcc)
        else:
            with open(nvcc, errors="replace") as f:
                cands += re.findall(r"(/[^\s'\"]*/bin/nvcc)\b", f.read())
    cands += sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True)
    for cand in cands:
        if _is_elf(cand):
            return os.path.dirname(os.path.dirname(os.path.realpath(cand)))
    return None


def _pip_cuda_includes() -> list[str]:
    """Headers from the pip CUDA wheels (cuBLAS/cuSPARSE headers that
    ATen/cuda/CUDAContext.h includes may be missing from a slim toolkit)."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include"))
                  if os.path.isdir(d))


NO_TORCH = ("torch is not importable in the build environment ({}) - pip's default isolated "
            "build has none: run `pip install --no-build-isolation .` in an environment that "
            "has torch, or set MANET_KERNELS_NO_EXT=1 for a pure-Python install (reference "
            "+ Triton backends only)")


def _no_torch_build_ext(reason: str):
    class NoTorchBuildExt(build_ext):
        def run(self):
            raise SetupError(NO_TORCH.format(reason))
    return NoTorchBuildExt


def _extensions():
    if os.environ.get("MANET_KERNELS_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        # Fail in build_ext, not here: metadata and sdist need no torch, and pip shows
        # a failed build's output, where it hides a warning.
        return ([Extension("manet_kernels._C", [os.path.join("csrc", "manet_kernels.cpp")])],
                {"build_ext": _no_torch_build_ext(f"{type(e).__name__}: {e}")})

    want = os.environ.get("MANET_KERNELS_CUDA", "auto").lower()
    sources = [os.path.join("csrc", "manet_kernels.cpp")] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    # No -std: torch's build helper picks the standard its headers need (C++20 for 2.14).
    cxx = ["-O3", "-fopenmp"]

    use_cuda = False
    if want not in ("0", "false", "off"):
        reasons = []
        if torch.version.cuda is None:
            reasons.append("torch is a CPU-only build")
        home = _real_cuda_home()
        if home is None:
            reasons.append("nvcc was not found")
        if reasons:
            msg = "building without CUDA kernels: " + "; ".join(reasons)
            if want in ("1", "true", "on"):
                raise RuntimeError("MANET_KERNELS_CUDA=1 but " + msg)
            warnings.warn(msg, stacklevel=2)
        else:
            use_cuda = True
            os.environ["CUDA_HOME"] = home
            cpp_extension.CUDA_HOME = home
            if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    if use_cuda:
        # After the toolkit's own include dir (torch puts that first), so only headers
        # the toolkit lacks come from the pip wheels. nvcc has no -idirafter.
        inc = _pip_cuda_includes()
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        nvcc += [f for d in inc for f in ("-isystem", d)]
        ext = cpp_extension.CUDAExtension(
            "manet_kernels._C", sources + cu_sources,
            extra_compile_args={"cxx": cxx + [f for d in inc for f in ("-idirafter", d)],
                                "nvcc": nvcc},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "manet_kernels._C", sources, extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"])
    build = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None
                                                      or _has_ninja_module())
    return [ext], {"build_ext": build}


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    os.environ["PATH"] = os.path.join(sys.prefix, "bin") + os.pathsep + os.environ.get("PATH", "")
    return True


ext_modules, cmdclass = _extensions()

setup(
    name="manet_kernels",
    packages=find_packages(include=["manet_kernels", "manet_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
