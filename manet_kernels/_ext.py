"""Loads the compiled extension (``manet_kernels._C``) if it was built.

Importing it registers the C++ CPU and (when built) CUDA pass kernels under
``torch.ops.manet_kernels`` as private ops, ``_<pass>`` (``_mixed_attention_apply``), apart
from the public composite ops that ``ops/_boundary.py`` registers (``mixed_attention``).
Python names a pass without the underscore, as ``reference/passes.py`` and the Triton
modules do; ``pass_op`` and ``has_kernel`` take that name.
``MANET_KERNELS_LIB=/path/to/lib.so`` loads a separately built library instead (kernel
development without reinstalling).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

HAS_EXT = False
HAS_CUDA_KERNELS = False
EXT_ERROR: str | None = None

_dev_lib = os.environ.get("MANET_KERNELS_LIB")
_BUILT = bool(_dev_lib) or importlib.util.find_spec("manet_kernels._C") is not None
try:
    if _dev_lib:
        torch.ops.load_library(_dev_lib)
    elif _BUILT:
        importlib.import_module("manet_kernels._C")
    else:
        # A plain `from manet_kernels import _C` would blame a circular import (the
        # package is half-initialised while this runs): say what really happened.
        EXT_ERROR = f"no manet_kernels._C library in {os.path.dirname(__file__)}"
    HAS_EXT = EXT_ERROR is None
except (ImportError, OSError) as e:  # built, but does not load (e.g. built for another torch)
    EXT_ERROR = f"{type(e).__name__}: {e}"


def missing_message(what: str) -> str:
    """The one-line error for ``what`` (e.g. "backend='cpu'") when the library is absent."""
    state = ("its compiled kernels failed to load" if _BUILT
             else "manet_kernels was installed without its compiled kernels")
    return (f"{what}: {state} ({EXT_ERROR}); reinstall with "
            "`pip install --no-build-isolation .` in an environment with torch")


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


def pass_op(name: str) -> str:
    """The registered name of the compiled pass ``name`` ("mixed_attention_apply" ->
    "_mixed_attention_apply", ``torch.ops.manet_kernels._mixed_attention_apply``)."""
    return "_" + name


def has_kernel(name: str, device_type: str) -> bool:
    """Whether the compiled library has a kernel of the pass ``name``
    (``manet_kernels::_<name>``) for ``device_type`` ("cpu" or "cuda")."""
    return device_type in KERNELS.get(pass_op(name), ())


HAS_CUDA_KERNELS = has_kernel("mixed_attention_apply", "cuda")
