"""Shared benchmark harness: timing, peak memory, hardware probes, metadata, CSV.

Every ``benchmarks/bench_<op>.py`` builds its rows with these helpers so that the
CSVs of all ops have the same metadata columns and the same timing method:

* GPU: median of ``triton.testing.do_bench`` (L2 flushed before each call), or of
  CUDA events when triton is missing.
* CPU: median block of ``torch.utils.benchmark.Timer.blocked_autorange``.

Throughput is reported against a device-to-device copy measured in the same run,
so a number from an unknown machine still says how close to the hardware it is.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import subprocess
from datetime import datetime, timezone
from typing import Callable, Iterable, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")

MODES = ("forward", "backward", "full")
META_COLUMNS = ("device", "device_name", "threads", "torch", "triton", "python", "cuda",
                "commit", "date_utc")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


# ---------------------------------------------------------------------------
# Arguments.

def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; one of {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_shape(text: str, ndim: int | None = None) -> tuple[int, ...]:
    """``"8x256x28x28"`` -> ``(8, 256, 28, 28)``."""
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape must look like 8x256x28x28, got {text!r}") from None
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"shape must have {ndim} dimensions, got {text!r}")
    if any(s < 1 for s in shape):
        raise ValueError(f"shape dimensions must be >= 1, got {text!r}")
    return shape


def shape_name(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


# ---------------------------------------------------------------------------
# Environment metadata.

def git_commit() -> str:
    """Short commit of the repo, ``-dirty`` when tracked files differ from it.

    ``$MANET_KERNELS_COMMIT`` wins: a copied working tree (e.g. on a GPU box)
    may have no ``.git`` to ask."""
    env = os.environ.get("MANET_KERNELS_COMMIT")
    if env:
        return env
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT,
                               capture_output=True, timeout=10).returncode == 1
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Metadata columns (``META_COLUMNS``) shared by every row of one run."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} cores)"
    return {
        "device": device.type,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "",
        "commit": git_commit(),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# ---------------------------------------------------------------------------
# Timing and memory.

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, quick: bool = False) -> float:
    """Median milliseconds of one call of ``fn``."""
    if device.type == "cuda":
        warmup, rep = (5, 20) if quick else (25, 100)
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_event_ms(fn, warmup, rep)
        try:
            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        except TypeError:  # a triton without return_mode
            return float(do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])[0])
    from torch.utils.benchmark import Timer
    fn()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.1 if quick else 1.0).median * 1e3


def _cuda_event_ms(fn, warmup_ms: float, rep_ms: float) -> float:
    # Same protocol as do_bench: L2 flushed before every timed call, median of
    # per-call event pairs, call counts chosen from a first estimate.
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    pairs = []
    for _ in range(max(1, int(rep_ms / est))):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        s.record()
        fn()
        e.record()
        pairs.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Extra device memory at the peak of one call (NaN on CPU: no allocator stats)."""
    if device.type != "cuda":
        return math.nan
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def make_mode_fn(forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor],
                 mode: str, seed: int = 0) -> Callable[[], object]:
    """The callable to time for ``mode``.

    ``forward`` runs with autograd recording (the training forward). ``backward``
    times only the backward of one recorded graph (``retain_graph``), ``full``
    both. ``torch.autograd.grad`` returns the gradients of ``inputs`` instead of
    accumulating into ``.grad``, so no accumulation add is timed.
    """
    if mode == "forward":
        return forward
    y = forward()
    gen = torch.Generator(device=y.device).manual_seed(seed)
    dy = torch.randn(y.shape, generator=gen, device=y.device, dtype=y.dtype)
    inputs = list(inputs)
    if mode == "backward":
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)
    if mode == "full":
        del y
        return lambda: torch.autograd.grad(forward(), inputs, dy)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# ---------------------------------------------------------------------------
# Hardware probes (measured in the same run as the rows they normalise).

def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None,
                        quick: bool = False) -> float:
    """GB/s of ``y.copy_(x)``, counting the read and the write (2 passes)."""
    if nbytes is None:
        if device.type == "cuda":
            nbytes = 2**28 if quick else 2**30  # far beyond L2 (50 MB on H100)
        else:
            nbytes = 2**26 if quick else 2**28
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device, quick=quick)
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None,
                  quick: bool = False) -> float:
    """TFLOP/s of an ``n x n`` matmul: the ceiling for compute-bound ops."""
    if n is None:
        n = (4096 if quick else 8192) if device.type == "cuda" else (512 if quick else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, quick=quick)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------
# Output.

def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def append_csv(path: str, rows: Iterable[dict], columns: Sequence[str]) -> None:
    """Append ``rows`` to ``path`` (created with a header if absent).

    A file whose header differs (columns added since it was written) is
    rewritten with the union of the columns, old rows keeping empty cells."""
    rows = list(rows)
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    columns = list(columns)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            if header != columns:
                old = list(reader)
        if header == columns:
            with open(path, "a", newline="") as f:
                csv.writer(f).writerows([[_cell(r.get(c)) for c in columns] for r in rows])
            return
        merged = header + [c for c in columns if c not in header]
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(merged)
            w.writerows([[r.get(c, "") for c in merged] for r in old])
            w.writerows([[_cell(r.get(c)) for c in merged] for r in rows])
        return
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows([[_cell(r.get(c)) for c in columns] for r in rows])


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_json_safe(obj), f, indent=2)
    os.replace(tmp, path)  # a run killed mid-write leaves the previous summary whole


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns``: ``(key, header, format spec)``; missing / NaN cells print ``-``."""
    def fmt(v, spec):
        if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return format(v, spec) if spec else str(v)

    cells = [[fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    heads = [h for _, h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
