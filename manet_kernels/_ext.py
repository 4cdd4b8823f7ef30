"""Loads the compiled extension (``manet_kernels._C``) if it was built.

Importing it registers the C++ CPU and (when built) CUDA pass kernels under
``torch.ops.manet_kernels``. ``MANET_KERNELS_LIB=/path/to/lib.so`` loads a
separately built library instead (kernel development without reinstalling).
"""

from __future__ import annotations

import os

import torch

HAS_EXT = False
HAS_CUDA_KERNELS = False
EXT_ERROR: str | None = None

_dev_lib = os.environ.get("MANET_KERNELS_LIB")
try:
    if _dev_lib:
        torch.ops.load_library(_dev_lib)
    else:
        from manet_kernels import _C  # noqa: F401
    HAS_EXT = True
except (ImportError, OSError) as e:  # pure-Python install: reference + Triton only
    EXT_ERROR = f"{type(e).__name__}: {e}"



def has_kernel(op: str, device_type: str) -> bool:
    """Whether the compiled library has a kernel of ``manet_kernels::<op>`` for
    ``device_type`` ("cpu" or "cuda")."""
    if not HAS_EXT:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"manet_kernels::{op}",
                                                               device_type.upper())
    except RuntimeError:  # no such op in this build
        return False


HAS_CUDA_KERNELS = has_kernel("mixed_attention_apply", "cuda")
