"""Host-side pieces every Triton launcher shares: interpreter detection, the
interpreter's single tile config, device context, argument checks."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
from torch import Tensor


def interpret_env() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 reads the env through knobs
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Decided once, as triton.jit decides at decoration time whether to interpret.
INTERPRET = interpret_env()


def configs(gpu: list[tuple[dict, int]], interp: dict) -> list[triton.Config]:
    """Autotune configs: the GPU list, or under the interpreter the one ``interp``
    tile (the interpreter cannot time configs, and autotune over several fails)."""
    if INTERPRET:
        return [triton.Config(interp, num_warps=1)]
    return [triton.Config(kw, num_warps=w) for kw, w in gpu]


def interpreting(kernel) -> bool:
    """Whether ``kernel`` (an autotuned jit function) runs under the interpreter."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return INTERPRET
    return isinstance(kernel.fn, InterpretedFunction)


def device_ctx(t: Tensor, is_interpreting, module: str, name: str = "x"):
    """The context to launch on ``t``'s device in (triton launches on the current device
    and stream); CPU tensors only when ``is_interpreting()``."""
    if t.device.type == "cpu":
        if not is_interpreting():
            raise RuntimeError(
                f"manet_kernels.triton.{module}: got CPU tensors, but Triton runs on CPU only "
                "under its interpreter; set TRITON_INTERPRET=1 before triton is first imported, "
                "or use the reference / C++ CPU backend")
        return contextlib.nullcontext()
    if t.device.type == "cuda":
        if t.device.index is None or t.device.index == torch.cuda.current_device():
            return contextlib.nullcontext()  # the common case: no device switch to pay for
        return torch.cuda.device(t.device)
    raise ValueError(f"{name}: expected a CUDA or CPU tensor, got one on {t.device}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def small(name: str, t, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
          device_of: str | None = "x") -> Tensor:
    """Check a small operand (type, dtype, shape, device); return it contiguous."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        where = f" ({device_of}'s device)" if device_of else ""
        raise ValueError(f"{name}: expected a tensor on {device}{where}, got one on {t.device}")
    return t.contiguous()


def needs_i64(*ts: Tensor) -> bool:
    # int32 offsets are exact while every element offset fits in int32.
    return any(t.numel() >= 2**31 for t in ts)
