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


def _kernel_table() -> dict[str, frozenset[str]]:
    """op name -> device types ("cpu", "cuda") that have a compiled kernel. Read once
    at import so that torch.compile traces backend choice as plain Python."""
    table = {}
    if HAS_EXT:
        for name in torch._C._dispatch_get_all_op_names():
            if name.startswith("manet_kernels::"):
                table[name.split("::", 1)[1]] = frozenset(
                    dev for dev in ("cpu", "cuda")
                    if torch._C._dispatch_has_kernel_for_dispatch_key(name, dev.upper()))
    return table


KERNELS = _kernel_table()


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the compiled library has a kernel of ``manet_kernels::<op>`` for
    ``device_type`` ("cpu" or "cuda")."""
    return device_type in KERNELS.get(op, ())


HAS_CUDA_KERNELS = has_kernel("mixed_attention_apply", "cuda")
