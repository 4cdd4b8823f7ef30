"""Host-side pieces every Triton launcher shares: interpreter detection, the
interpreter's single tile config, device context, argument checks, the launch with
its test hook and deterministic tile, the per-sample counters. (Device-side shared
pieces: ``_tiles.py``.)"""

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


def activation(name: str, t, dtypes: tuple[torch.dtype, ...], batch: str = "N",
               sizes: str = "any") -> bool:
    """Check a 4-D ``(batch, C, H, W)`` activation of one of ``dtypes``; return whether it
    is read as channels_last (NCHW wins where both hold, the reference's rule). ``sizes``:
    ``"any"``, ``"nonempty"`` (C, H, W >= 1) or ``"nonempty_if_batch"`` (C, H, W >= 1
    unless the batch is empty)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(
            f"{name}: expected a 4-D ({batch}, C, H, W) tensor, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected float16/bfloat16/float32/float64, got {t.dtype}")
    if sizes != "any" and min(t.shape[1:]) < 1 and (sizes == "nonempty" or t.shape[0] > 0):
        raise ValueError(f"{name}: expected C, H, W >= 1, got shape {tuple(t.shape)}")
    # The layout from contiguity, not t.stride(): a dim of size 1 may carry any stride.
    if t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    raise ValueError(f"{name}: expected an NCHW-contiguous or channels_last-contiguous tensor, "
                     f"got strides {t.stride()} for shape {tuple(t.shape)}")


def ncp_strides(name: str, t, dtypes: tuple[torch.dtype, ...], batch: str = "N",
                sizes: str = "any") -> tuple[int, int, int, bool]:
    """``activation``'s check; return the strides of ``t`` seen as ``(batch, C, P)`` and
    whether it is channels_last."""
    cl = activation(name, t, dtypes, batch, sizes)
    _, c, h, w = t.shape
    p = h * w
    return (p * c, 1, c, True) if cl else (c * p, p, 1, False)


def launch(forced: dict, kernel, grid, *args, pick=None, **kwargs) -> None:
    """Launch ``kernel`` on ``grid``: the test hook's config ``forced[kernel]`` if there
    is one, else under deterministic algorithms ``pick(kernel, kwargs)`` (default
    ``layout_pick``; a fixed tile: it sets the summation order, and autotune may pick
    another in another process), else whatever autotune picks. A config is launched
    on the raw jit function."""
    cfg = forced.get(kernel)
    if cfg is None and torch.are_deterministic_algorithms_enabled():
        cfg = (pick or layout_pick)(kernel, kwargs)
    if cfg is None:
        kernel[grid](*args, **kwargs)
    else:
        kernel.fn[grid](*args, **kwargs, **cfg.kwargs,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def layout_pick(kernel, kwargs: dict):
    """The deterministic tile of an autotuned kernel keyed by layout: its first config
    (P-long tiles) for NCHW, its last (C-long) for channels_last; None for a plain jit
    kernel, whose tile the launcher fixes."""
    if not hasattr(kernel, "configs"):
        return None
    channels_last = kwargs.get("CHANNELS_LAST", kwargs.get("X_CHANNELS_LAST"))
    return kernel.configs[-1 if channels_last else 0]


def block_grid(n: int, length: int, block: str):
    """The grid of a kernel that takes ``_tiles.sample_block``: one program per sample
    and block of ``meta[block]`` indices along an axis of ``length``."""
    return lambda meta: (n * triton.cdiv(length, meta[block]),)


def tile_grid(n: int, c: int, p: int):
    """The grid of a kernel that takes ``_tiles.cp_tile``: one program per
    ``(BLOCK_C, BLOCK_P)`` tile of each of ``n`` samples."""
    return lambda meta: (n * triton.cdiv(c, meta["BLOCK_C"]) * triton.cdiv(p, meta["BLOCK_P"]),)


# Per device: the int32 counters of the last-program finishes (mixed attention's
# channel_attn_bwd and bwd_reduce, BR-NPA's bwd_reduce, AW-conv's weight gradient),
# zero-filled once; every launch leaves them at zero again. Launches that use them run
# in stream order (two streams running these kernels at once would share them).
_COUNTERS: dict[torch.device, Tensor] = {}


def sample_counters(n: int, device: torch.device) -> Tensor:
    """At least ``n`` int32 counters on ``device``, all zero (one buffer per device)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        size = max(n, 256, 2 * buf.numel() if buf is not None else 0)
        buf = torch.zeros(size, dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf
