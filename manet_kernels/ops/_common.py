"""Backend choice and argument checks shared by every op."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
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
    if t.shape != shape:  # (torch.Size is a tuple)
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


def triton_stage_module(op: str):
    """``manet_kernels.triton.<op>_stages``, the Triton kernels of ``op``'s fused stages
    (built on the passes of ``manet_kernels.triton.<op>``), or None where the op has no
    such module (its Triton stages, if any, are in the pass module)."""
    name = f"manet_kernels.triton.{op}_stages"
    return importlib.import_module(name) if importlib.util.find_spec(name) else None


# Whether the CUDA kernels of the fused stages (csrc/cuda, issue 16) have passed their
# GPU tests (tests/test_<op>_stages.py -k cuda): until then the "cuda" backend composes
# each stage from its verified pass kernels and PyTorch (reference/stages.py over the
# CUDA passes), which is correct but launches the tiny parts one op at a time.
CUDA_STAGES_VERIFIED = False
# The same for the Triton stages on a GPU (tested under the interpreter only): until
# tests/test_<op>_stages.py -k triton and tests/test_gpu_steps.py pass on a GPU, the
# "triton" backend on CUDA tensors composes its stages from the Triton passes.
TRITON_STAGES_VERIFIED = False
# Whether the second Triton AW-conv kernels (manet_kernels/triton/aw_conv2d.py, issue 17:
# flattened pipelined K loops, split-K weight gradient) have passed their GPU tests
# (tests/test_aw_conv2d*.py -k triton, run with the gate open by benchmarks/run_device.sh).
# Until then the "triton" backend on CUDA tensors runs the first kernels
# (triton/aw_conv2d_v1.py), which passed theirs on the H100; CPU tensors (the
# interpreter) always run the new ones.
TRITON_AW_V2_VERIFIED = False
# The same for the second CUDA AW-conv kernels (``_aw_conv2d_fwd_v2`` / ``_bwd_v2``:
# cp.async ring, split-K weight gradient; docs/design.md §2.4; tests/test_aw_conv2d_v2.py):
# until then backend="cuda" runs the first kernels, which passed on the H100.
CUDA_AW_V2_VERIFIED = False
_GATES = ("CUDA_STAGES_VERIFIED", "TRITON_STAGES_VERIFIED", "TRITON_AW_V2_VERIFIED",
          "CUDA_AW_V2_VERIFIED")


class ComposedStages:
    """The stage contract (``reference/stages.py``) composed over a namespace of pass
    kernels: a stage's pass runs there, its tiny part in PyTorch. Names that are not
    stages (the passes that are stages of their own) go to the pass namespace."""

    def __init__(self, passes):
        self._passes = passes

    def __getattr__(self, name: str):
        from manet_kernels.reference import stages
        fn = getattr(stages, name, None)
        if fn is None:
            fn = getattr(self._passes, name)
        elif "passes" in inspect.signature(fn).parameters:
            fn = functools.partial(fn, passes=self._passes)
        setattr(self, name, fn)
        return fn


class CppStages:
    """The compiled stages for one device type: a stage op with a kernel for it (and, on
    CUDA, ``CUDA_STAGES_VERIFIED``), else the stage composed over the compiled passes."""

    def __init__(self, device_type: str):
        self._device = device_type
        self._composed = ComposedStages(CPP_PASSES)

    def __getattr__(self, name: str):
        usable = _ext.has_kernel(name, self._device) and (
            self._device != "cuda" or CUDA_STAGES_VERIFIED)
        fn = getattr(CPP_PASSES if usable else self._composed, name)
        setattr(self, name, fn)
        return fn


_CPP_STAGES = {"cpu": CppStages("cpu"), "cuda": CppStages("cuda")}


def stage_kernels(backend: str, op: str, device_type: str):
    """The fused stages of ``op`` (and its passes) for a backend, as a namespace: the
    C++ stage ops on CPU (CUDA once verified), the Triton stage module's, or the
    contract composed over the backend's passes where a stage has no kernel yet."""
    if backend in ("cpu", "cuda"):
        return _CPP_STAGES[device_type]
    if backend == "triton" and device_type == "cuda" and not TRITON_STAGES_VERIFIED:
        return _composed("triton_passes", op)
    return _composed(backend, op)


class _Chain:
    """Names from the first namespace that has them."""

    def __init__(self, *spaces):
        self._spaces = spaces

    def __getattr__(self, name: str):
        for space in self._spaces:
            fn = getattr(space, name, None)
            if fn is not None:
                return fn
        raise AttributeError(name)


@functools.cache
def _composed(backend: str, op: str):
    """Triton: the stage module's stages (``triton_stage_module``) and the pass module's
    passes, the contract for the rest (a stage composed over the Triton passes; the
    spatial conv, which has no Triton kernel)."""
    from manet_kernels.reference import passes as torch_passes
    if backend == "triton_passes":  # the stage contract over the Triton passes only
        return ComposedStages(_Chain(pass_kernels("triton", op), torch_passes))
    passes = pass_kernels(backend, op)
    if backend == "torch":
        return ComposedStages(passes)
    stages = triton_stage_module(op) if backend == "triton" else None
    own = (passes,) if stages is None else (stages, passes)
    return _Chain(*own, ComposedStages(_Chain(passes, torch_passes)))


def _clear_stage_caches() -> None:
    """Forget the looked-up stages (each namespace caches its lookups)."""
    for device_type in _CPP_STAGES:
        _CPP_STAGES[device_type] = CppStages(device_type)
    _composed.cache_clear()


@contextlib.contextmanager
def unverified_stages():
    """Within: every gated GPU kernel (the ``*_VERIFIED`` flags above: the CUDA and
    Triton stages, the second Triton and CUDA AW-conv kernels) is used on a GPU as if
    verified, for the GPU tests that verify them (tests/test_gpu_steps.py, the
    ``triton_aw_v2`` cases of tests/test_aw_conv2d.py, tests/test_aw_conv2d_v2.py)."""
    module = globals()
    saved = {name: module[name] for name in _GATES}
    module.update(dict.fromkeys(_GATES, True))
    _clear_stage_caches()
    try:
        yield
    finally:
        module.update(saved)
        _clear_stage_caches()


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
            map(torch._C._get_dispatch_mode, _INFRA_MODES)):
        return False
    return _PLAIN.issuperset(map(type, tensors))


_PLAIN = frozenset((type(None), Tensor, torch.nn.Parameter))
