"""The Triton half of the kernel report: every Triton kernel of the package, compiled
for sm_90 on a machine without a GPU, and what the compiler made of it.

How the kernels are reached: each op's public function runs forward and backward
with ``backend="triton"`` on uninitialised CPU tensors of the report shape, while the
launchers' kernel objects are replaced by recorders (nothing is launched). So every
argument, grid and constexpr comes from the launchers themselves, not from a copy of
their argument lists. Each recorded launch is then compiled, per autotune config the
autotuner would try there (after its ``early_config_prune``), with
``JITFunction.warmup`` under a stand-in driver whose target is ``cuda:90``.

What is read from the compile (``analyse``):

* registers and spills: ``ptxas -v`` run by triton's own ``make_cubin`` (the ptxas
  binary and flags triton uses for this target; triton 3.9 picks
  ``ptxas-blackwell`` for sm_90); shared memory: the launch's dynamic shared memory;
* ``mma``: ``wgmma`` or ``mma.sync`` in the PTX, with the largest N of its shapes;
* ``pipelined``: some loop of the TTGIR keeps global loads in flight while it
  computes: an asynchronous global->shared copy issued in one iteration is waited for
  in a later one (an ``!ttg.async.token`` among the loop-carried values), and the loop
  never drains to zero before issuing the next copy (an ``async_wait`` with num > 0,
  or a ``warp_group_dot_wait`` with pendings > 0, inside it); None without a loop;
* ``vec16_load_share``: of the global load instructions in the PTX (static count:
  ``ld.global*``, ``cp.async`` global->shared, ``cp.async.bulk`` TMA/bulk copies),
  the share that moves 16 bytes or more per thread (``.v4.b32``, ``.v2.b64``,
  ``cp.async`` of size 16, every bulk copy); None without global loads.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_report_common as krc  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)

TARGET_ARCH = 90
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


# --------------------------------------------------------------------------- #
# compiling for sm_90 without a GPU
# --------------------------------------------------------------------------- #

def _interpreter_on() -> bool:
    from manet_kernels.triton._common import interpret_env
    return interpret_env()


@contextlib.contextmanager
def sm90_target():
    """Make triton compile for ``cuda:90`` whatever the machine has; nothing launches."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver

    class _OfflineDriver(DriverBase):
        def __init__(self):
            pass

        @classmethod
        def is_active(cls):
            return True

        def get_current_target(self):
            return GPUTarget("cuda", TARGET_ARCH, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_benchmarker(self):
            raise RuntimeError("kernel report: the offline sm_90 target cannot time kernels")

    # Restored as it was: reset_active() would build the default driver, which raises
    # on a machine without a GPU.
    previous = getattr(driver, "_active", None)
    driver.set_active(_OfflineDriver())
    try:
        yield
    finally:
        if hasattr(driver, "_active"):
            driver._active = previous
        else:  # pragma: no cover - a triton without the attribute
            driver.reset_active()


# --------------------------------------------------------------------------- #
# recording the launchers' launches
# --------------------------------------------------------------------------- #

@dataclass
class Launch:
    name: str      # the @triton.jit function's name
    kernel: object  # the module-level object launched: an Autotuner or a JITFunction
    grid: object   # a tuple or a callable of the launch's meta-parameters
    args: tuple
    kwargs: dict

    def key(self) -> tuple:
        """Equal for launches that compile and run alike (BR-NPA's steps repeat)."""
        def one(v):
            if isinstance(v, torch.Tensor):
                return ("T", v.dtype, tuple(v.shape), v.stride())
            return v
        return (self.name, tuple(one(a) for a in self.args), tuple(sorted(self.kwargs.items())))


class _Recorder:
    """Stands in for a module-level kernel: ``kernel[grid](*args, **kwargs)`` records."""

    def __init__(self, name: str, kernel, sink: list):
        self._name, self._kernel, self._sink = name, kernel, sink

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self._sink.append(Launch(self._name, self._kernel, grid, args, kwargs))
        return record

    def __getattr__(self, attr):  # .configs, .fn, ... for the launchers' other uses
        return getattr(self._kernel, attr)


def _jit_fn(kernel):
    from triton.runtime.jit import JITFunction
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn  # Autotuner / Heuristics wrap the jit function
    return fn


def _launched_kernels(module) -> dict[str, object]:
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, Autotuner)
            or (isinstance(obj, JITFunction) and name.endswith("_kernel"))}


@contextlib.contextmanager
def recording(modules, extra_patches=()):
    """Inside, the launchers of the Triton ``modules`` (an op's pass module, whose launch
    and device hooks they share, then its stage module if any) record their launches
    into the yielded list instead of launching, and accept CPU tensors."""
    sink: list[Launch] = []
    module = modules[0]
    with contextlib.ExitStack() as stack:
        for mod in modules:
            for name, kernel in _launched_kernels(mod).items():
                stack.enter_context(mock.patch.object(
                    mod, name, _Recorder(_jit_fn(kernel).__name__, kernel, sink)))
        # CPU tensors pass the launchers' device checks, and the op layer's check that
        # backend="triton" on CPU means the interpreter.
        stack.enter_context(mock.patch.object(module, "_interpreting", lambda: True))
        stack.enter_context(
            mock.patch("manet_kernels.ops._common.triton_interpreted", lambda: True))
        # Autotuned launches, as on a GPU: no forced test config, no deterministic pick.
        stack.enter_context(mock.patch.dict(module._FORCED_CONFIGS, clear=True))
        stack.enter_context(_deterministic(False))
        for patch in extra_patches:
            stack.enter_context(patch)
        yield sink


@contextlib.contextmanager
def _deterministic(on: bool):
    before = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


def _on_h100(fn: Callable) -> Callable:
    """``fn`` with its device arguments seen as an H100: for host code that sizes a
    launch from the device's SM count (AW-conv's weight-gradient split)."""
    props = types.SimpleNamespace(multi_processor_count=krc.H100["sms"],
                                  name="H100 (kernel report)")

    def wrapped(*args, **kwargs):
        args = [torch.device("cuda") if isinstance(a, torch.device) else a for a in args]
        with mock.patch("torch.cuda.get_device_properties", lambda *a, **k: props):
            return fn(*args, **kwargs)
    return wrapped


# --------------------------------------------------------------------------- #
# one forward + backward of each op, on uninitialised CPU tensors
# --------------------------------------------------------------------------- #

def _activation(shape, dtype, layout) -> torch.Tensor:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, memory_format=fmt).requires_grad_()


def _backward(outputs) -> None:
    outputs = [o for o in outputs if o.requires_grad]
    torch.autograd.backward(outputs, [torch.empty_like(o) for o in outputs])


def _run_mixed_attention(x: torch.Tensor) -> None:
    from manet_kernels.ops.mixed_attention import mixed_attention
    c = x.shape[1]
    cr = max(1, c // 16)  # CBAM's reduction 16 and 7x7 spatial kernel

    def param(*shape):
        return torch.empty(shape, dtype=torch.float32).requires_grad_()
    y = mixed_attention(x, param(cr, c), param(cr), param(c, cr), param(c), param(1, 2, 7, 7),
                        backend="triton")
    _backward([y])


def _run_aw_conv2d(x: torch.Tensor) -> None:
    from manet_kernels.ops.aw_conv2d import aw_conv2d
    n, c = x.shape[:2]
    k = krc.AW_KERNEL
    weight = torch.empty((c, c, k, k), dtype=x.dtype).requires_grad_()
    attn = torch.empty((n, c, 1, k, k), dtype=torch.float32).requires_grad_()
    _backward([aw_conv2d(x, weight, attn, None, 1, k // 2, backend="triton")])


def _run_brnpa(x: torch.Tensor) -> None:
    from manet_kernels.ops.brnpa import brnpa
    _backward(brnpa(x, krc.BRNPA_PARTS, backend="triton"))


def _aw_patches(module):
    return [mock.patch.object(module, "_wgrad_splits", _on_h100(module._wgrad_splits))]


# op -> (Triton modules: passes, then stages if apart; run one forward + backward; extra
# patches while recording, given the pass module)
OPS = {
    "mixed_attention": (("manet_kernels.triton.mixed_attention",
                         "manet_kernels.triton.mixed_attention_stages"),
                        _run_mixed_attention, lambda m: []),
    "aw_conv2d": (("manet_kernels.triton.aw_conv2d",), _run_aw_conv2d, _aw_patches),
    "brnpa": (("manet_kernels.triton.brnpa", "manet_kernels.triton.brnpa_stages"), _run_brnpa,
              lambda m: []),
}


def launches(op: str, shape, dtype: str, layout: str) -> list[Launch]:
    """The distinct launches of one forward + backward of ``op`` at this shape."""
    import importlib
    if op not in OPS:
        raise ValueError(f"op: expected one of {sorted(OPS)}, got {op!r}")
    mod_names, run, patches = OPS[op]
    modules = [importlib.import_module(name) for name in mod_names]
    x = _activation(shape, _DTYPES[dtype], layout)
    with recording(modules, patches(modules[0])) as sink:
        run(x)
    seen, out = set(), []
    for launch in sink:
        if launch.key() not in seen:
            seen.add(launch.key())
            out.append(launch)
    return out


# --------------------------------------------------------------------------- #
# configs and compiling
# --------------------------------------------------------------------------- #

def considered_configs(launch: Launch) -> list:
    """The autotune configs the launch would be tuned over (after early pruning), or
    ``[None]`` for a plain jit launch."""
    from triton.runtime.autotuner import Autotuner
    kernel = launch.kernel
    if not isinstance(kernel, Autotuner):
        return [None]
    kernel.nargs = dict(zip(kernel.arg_names, launch.args))  # prune_configs reads it
    try:
        return list(kernel.prune_configs(dict(launch.kwargs)))
    finally:
        kernel.nargs = None


def _config_kwargs(cfg) -> dict:
    return {} if cfg is None else cfg.all_kwargs()


def grid_of(launch: Launch, cfg) -> tuple[int, ...]:
    if not callable(launch.grid):
        return tuple(int(g) for g in launch.grid)
    meta = {**dict(zip(_jit_fn(launch.kernel).arg_names, launch.args)), **launch.kwargs,
            **_config_kwargs(cfg)}
    return tuple(int(g) for g in launch.grid(meta))


def config_str(launch: Launch, cfg) -> str:
    """The tile (launcher-chosen and autotuned BLOCK_* constexprs), warps and stages."""
    tiles = {k: v for k, v in launch.kwargs.items() if k.startswith("BLOCK_")}
    kw = _config_kwargs(cfg)
    tiles.update({k: v for k, v in kw.items() if k.startswith("BLOCK_")})
    parts = [f"{k[len('BLOCK_'):]}{v}" for k, v in sorted(tiles.items())]
    if cfg is not None:
        parts += [f"w{cfg.num_warps}", f"s{cfg.num_stages}"]
    return " ".join(parts)


def compile_launch(launch: Launch, cfg):
    """The launch compiled for sm_90 under ``cfg`` (a triton CompiledKernel)."""
    with sm90_target():
        return _jit_fn(launch.kernel).warmup(*launch.args, grid=(1,), **launch.kwargs,
                                             **_config_kwargs(cfg))


# --------------------------------------------------------------------------- #
# reading the compile
# --------------------------------------------------------------------------- #

def ptxas_verbose(compiled) -> str:
    """``ptxas -v``'s report for the compiled kernel's PTX, from triton's own ptxas
    command for the target (same binary, same flags as the real compile)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    backend = CUDABackend(GPUTarget("cuda", TARGET_ARCH, 32))
    out = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(out):
        knobs.nvidia.dump_ptxas_log = True  # make_cubin prints the -v log it otherwise drops
        backend.make_cubin(compiled.asm["ptx"], {}, compiled.metadata, TARGET_ARCH)
    return out.getvalue()


_WGMMA = re.compile(r"\bwgmma\.mma_async(?:\.sp)?\.sync\.aligned\.m(\d+)n(\d+)k(\d+)")
_MMA_SYNC = re.compile(r"\bmma\.sync\.aligned\.m(\d+)n(\d+)k(\d+)")


def mma_info(ptx: str) -> tuple[str | None, int | None]:
    """``("wgmma", N)``, ``("mma.sync", N)`` or ``(None, None)``: the matrix instruction
    of the PTX (wgmma wins where both appear) and the largest N of its shapes."""
    for kind, pattern in (("wgmma", _WGMMA), ("mma.sync", _MMA_SYNC)):
        ns = [int(m.group(2)) for m in pattern.finditer(ptx)]
        if ns:
            return kind, max(ns)
    return None, None


_SCF_FOR = re.compile(r"=\s*scf\.for\b")
_ASYNC_WAIT = re.compile(r"\bttg\.async_wait\b.*\{num = (\d+)")
_DOT_WAIT = re.compile(r"\bwarp_group_dot_wait\b.*\{pendings = (\d+)")


def loops(ttgir: str) -> list[tuple[str, list[str]]]:
    """Each ``scf.for`` of the TTGIR: its header line and its body's lines (nested
    loops included). MLIR prints one op per line, attribute braces balanced on it."""
    lines = ttgir.splitlines()
    out = []
    for i, header in enumerate(lines):
        if not _SCF_FOR.search(header):
            continue
        depth, body = header.count("{") - header.count("}"), []
        for line in lines[i + 1:]:
            depth += line.count("{") - line.count("}")
            if depth <= 0:
                break
            body.append(line)
        out.append((header, body))
    return out


def pipelined(ttgir: str) -> bool | None:
    """Whether some loop overlaps its global loads with its compute: it carries an
    ``!ttg.async.token`` (an asynchronous global->shared copy issued in one iteration is
    waited for in a later one), and inside it a wait leaves work in flight
    (``ttg.async_wait {num > 0}``: later copies still loading, or
    ``warp_group_dot_wait {pendings > 0}``: the MMA still running while the next copy
    is issued). A loop that waits every copy and every MMA to zero before issuing the
    next copy is not. None when the kernel has no loop."""
    found = loops(ttgir)
    if not found:
        return None

    def overlaps(body):
        return any(int(m.group(1)) > 0 for line in body
                   for m in (_ASYNC_WAIT.search(line), _DOT_WAIT.search(line)) if m)
    return any("!ttg.async.token" in header and overlaps(body) for header, body in found)


_LD_GLOBAL = re.compile(r"\bld\.global((?:\.[\w:]+)*)")
# cp.async.{ca,cg}.shared.global [dst], [src], cp-size: the size is the third operand.
_CP_ASYNC = re.compile(r"\bcp\.async\.(?:ca|cg)\.shared(?:::cta)?\.global\S*"
                       r"\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(\w+)")
_CP_BULK = re.compile(r"\bcp\.async\.bulk\.(?!prefetch)\S*global")
_VEC = re.compile(r"\.v(\d+)\b")
_BITS = re.compile(r"\.[bfsu](\d+)\b")


def _ld_bytes(modifiers: str) -> int:
    vec = _VEC.search(modifiers)
    bits = _BITS.findall(modifiers)
    return (int(vec.group(1)) if vec else 1) * (int(bits[-1]) if bits else 32) // 8


def global_load_bytes(ptx: str) -> list[int]:
    """Bytes per thread of each global load instruction of the PTX (static count; a
    TMA / bulk copy counts as 16)."""
    sizes = []
    for line in ptx.splitlines():
        line = line.split("//", 1)[0]
        sizes += [_ld_bytes(m.group(1)) for m in _LD_GLOBAL.finditer(line)]
        sizes += [int(m.group(1), 0) for m in _CP_ASYNC.finditer(line)]
        sizes += [16 for _ in _CP_BULK.finditer(line)]
    return sizes


def vec16_load_share(ptx: str) -> float | None:
    sizes = global_load_bytes(ptx)
    if not sizes:
        return None
    return sum(s >= 16 for s in sizes) / len(sizes)


_ANALYSIS_CACHE: dict[str, dict] = {}


def analyse(compiled) -> dict:
    """Resources and code features of one compiled kernel (cached by its hash)."""
    key = compiled.metadata.hash
    if key not in _ANALYSIS_CACHE:
        ptx = compiled.asm["ptx"]
        res = krc.parse_ptxas_verbose(ptxas_verbose(compiled))
        if len(res) != 1:
            raise RuntimeError(
                f"kernel report: expected one kernel in ptxas' report, got {sorted(res)}")
        (usage,) = res.values()
        mma, mma_n = mma_info(ptx)
        _ANALYSIS_CACHE[key] = dict(
            regs=usage["regs"], spill_bytes=usage["spill_stores"], stack_bytes=usage["stack"],
            smem_bytes=int(compiled.metadata.shared), threads=compiled.metadata.num_warps * 32,
            mma=mma, mma_n=mma_n, pipelined=pipelined(compiled.asm["ttgir"]),
            vec16_load_share=vec16_load_share(ptx))
    return dict(_ANALYSIS_CACHE[key])


# --------------------------------------------------------------------------- #
# records
# --------------------------------------------------------------------------- #

def _record(op, shape, dtype, layout, launch: Launch, cfg) -> dict:
    base = dict(kernel=launch.name, backend="triton", op=op, shape=krc.shape_str(shape),
                dtype=dtype, layout=layout, config=config_str(launch, cfg))
    grid = grid_of(launch, cfg)
    try:
        facts = analyse(compile_launch(launch, cfg))
    except Exception as e:  # a config that does not compile is a finding, not a crash
        note = f"compile failed: {type(e).__name__}: {e}"[:300]
        return krc.record(**base, grid=krc.grid_size(grid), note=note)
    ctas = krc.ctas_per_sm(facts["regs"], facts["threads"], facts["smem_bytes"])
    note = None
    if ctas == 0:
        note = (f"does not fit on an SM: {facts['smem_bytes']} B shared, {facts['regs']} regs x "
                f"{facts['threads']} threads")
    return krc.record(**base, **facts, ctas_per_sm=ctas, grid=krc.grid_size(grid),
                      waves=krc.waves(grid, ctas), note=note)


def records(ops=None, quick: bool = False, kernels=None, dtypes=None, layouts=None,
            log=sys.stderr) -> list[dict]:
    """Report rows for ``ops`` (default all); ``quick``: the first shape, bf16
    channels_last, the first config of each launch. ``kernels``: substrings of kernel
    names to keep."""
    if _interpreter_on():
        raise RuntimeError("kernel report: TRITON_INTERPRET is set, so triton would interpret "
                           "instead of compiling; run the report without it")
    ops = list(ops or krc.OPS)
    dtypes = list(dtypes or (["bfloat16"] if quick else krc.DTYPES))
    layouts = list(layouts or (["channels_last"] if quick else krc.LAYOUTS))
    rows = []
    for op in ops:
        for shape in (krc.QUICK_SHAPES if quick else krc.SHAPES)[op]:
            for dtype in dtypes:
                for layout in layouts:
                    start = time.perf_counter()
                    n_before = len(rows)
                    for launch in launches(op, shape, dtype, layout):
                        if kernels and not any(k in launch.name for k in kernels):
                            continue
                        configs = considered_configs(launch)
                        for cfg in configs[:1] if quick else configs:
                            rows.append(_record(op, shape, dtype, layout, launch, cfg))
                    if log is not None:
                        print(f"[kernel report] triton {op} {krc.shape_str(shape)} {dtype} "
                              f"{layout}: {len(rows) - n_before} rows, "
                              f"{time.perf_counter() - start:.1f} s",
                              file=log, flush=True)
    return rows
