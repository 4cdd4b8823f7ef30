"""Backend choice and argument checks shared by every op."""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from manet_kernels import _ext

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
ENV_BACKEND = "MANET_KERNELS_BACKEND"

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device, kernel: str,
                    cuda_auto: str = "cuda") -> str:
    """The concrete backend for tensors on ``device``; ``kernel`` names one of the op's
    compiled passes (``manet_kernels::_<kernel>``), to learn whether it was built.

    ``"auto"`` honours ``$MANET_KERNELS_BACKEND``, then picks the C++ kernels on CPU
    and the CUDA kernels (Triton if the extension has no CUDA kernel for the op) on GPU,
    falling back to the reference where nothing compiled is available.
    ``cuda_auto="triton"``: an op whose Triton kernels measured faster on GPU than
    its CUDA ones makes ``"auto"`` pick Triton there (CUDA if triton is missing).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "auto")
        if env not in BACKENDS:
            raise ValueError(f"${ENV_BACKEND} must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        if device.type == "cuda":
            if cuda_auto == "triton" and triton_available():
                return "triton"
            if _ext.has_kernel(kernel, "cuda"):
                return "cuda"
            return "triton" if triton_available() else "reference"
        return "cpu" if _ext.has_kernel(kernel, device.type) else "reference"
    if backend in ("cpu", "cuda"):
        _check_compiled(backend, device, kernel)
    elif backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package")
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                             "(set before triton is imported)")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' does not support device {device}")
    return backend


def _check_compiled(backend: str, device: torch.device, kernel: str) -> None:
    """``backend`` "cpu" or "cuda": tensors on that device and a kernel built for it."""
    if device.type != backend:
        raise ValueError(f"backend={backend!r} needs {backend.upper()} tensors, got tensors "
                         f"on {device}")
    if not _ext.HAS_EXT:
        raise RuntimeError(_ext.missing_message(f"backend={backend!r}"))
    if not _ext.has_kernel(kernel, backend):
        hint = " (reinstall with nvcc available, MANET_KERNELS_CUDA=1)" if backend == "cuda" else ""
        raise RuntimeError(f"backend={backend!r}: this build has no {backend.upper()} kernel "
                           f"for {kernel}{hint}")


def check_dtype(name: str, t: Tensor, backend: str) -> None:
    allowed = _CPU_DTYPES if backend == "cpu" else _GPU_DTYPES
    if backend != "reference" and t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in allowed]} for "
                        f"backend={backend!r}, got {t.dtype}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_same_device(device: torch.device, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}: "
                             "all tensors must be on one device")


def check_shape(name: str, t: Tensor | None, shape: tuple[int, ...],
                optional: bool = False) -> None:
    if t is None:
        if optional:
            return
        raise ValueError(f"{name} must be a tensor of shape {shape}, got None")
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def activation_format(x: Tensor) -> torch.memory_format:
    """The layout kernels run in: channels_last when ``x`` is channels_last (and
    not also plain-contiguous), else contiguous (other strides are copied)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class CppPasses:
    """The compiled pass kernels by pass name: ``.mixed_attention_apply`` is the private
    op ``torch.ops.manet_kernels._mixed_attention_apply``; the dispatcher picks the CPU or
    CUDA kernel from the tensors' device."""

    def __getattr__(self, name: str):
        # Looked up once per pass: the attribute set here answers every later call
        # without __getattr__ (this sits on every op's hot path).
        op = getattr(torch.ops.manet_kernels, _ext.pass_op(name))
        setattr(self, name, op)
        return op


CPP_PASSES = CppPasses()


def pass_kernels(backend: str, op: str):
    """The pass kernels of ``op`` for a backend, as a namespace; ``"torch"`` is the
    pure-PyTorch pass contract (it tests the composition alone)."""
    if backend in ("cpu", "cuda"):
        return CPP_PASSES
    if backend == "triton":
        return importlib.import_module(f"manet_kernels.triton.{op}")
    if backend == "torch":
        from manet_kernels.reference import passes
        return passes
    raise ValueError(f"no pass kernels for backend {backend!r}")


_INFRA_MODES = tuple(torch._C._TorchDispatchModeKey.__members__.values())


def eager_ok(*tensors: Tensor | None) -> bool:
    """True when an op may call its registered forward/backward bodies directly (a plain
    ``torch.autograd.Function``) instead of going through ``torch.ops.manet_kernels``:
    no torch.compile tracing, no function or dispatch mode (fake tensors,
    functionalization, ...), plain tensors only. The custom-op machinery (schema
    handling, default filling, alias checks, its Python autograd wrapper) costs host
    time per call that a GPU step of a few hundred microseconds of kernels cannot hide;
    the results are the same either way. Under torch.func transforms the registered
    op is used (its wrapped tensors pass ``type(t) is Tensor``)."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._are_functorch_transforms_active():  # torch.func wrappers look like Tensor
        return False
    if torch._C._len_torch_dispatch_stack() > 0 or any(
            torch._C._get_dispatch_mode(k) is not None for k in _INFRA_MODES):
        return False
    return all(t is None or type(t) is Tensor or type(t) is torch.nn.Parameter
               for t in tensors)
