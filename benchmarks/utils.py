"""Shared benchmark harness: timing, peak memory, hardware probes, metadata, CSV.

Every ``benchmarks/bench_<op>.py`` builds its rows with these helpers so that the
CSVs of all ops have the same metadata columns and the same timing method:

* GPU: median of ``triton.testing.do_bench`` (L2 flushed before each call), or of
  CUDA events when triton is missing.
* CPU: median block of ``torch.utils.benchmark.Timer.blocked_autorange``; a benchmark
  with ``--rounds R`` times its providers in R interleaved rounds and reports each
  one's median round, so that a machine whose speed drifts (shared VMs) slows every
  provider alike instead of whichever ran during the slow spell.

Throughput is reported against a device-to-device copy measured in the same run,
so a number from an unknown machine still says how close to the hardware it is.
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
if importlib.util.find_spec("manet_kernels") is None:  # run from a checkout not installed
    sys.path.insert(1, ROOT)

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
    """Short commit of the repo, ``-dirty`` when tracked files differ from it
    (the result files this harness appends to do not count).

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
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=ROOT,
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
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# ---------------------------------------------------------------------------
# Timing and memory.

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, quick: bool = False,
            cpu_share: float = 1.0) -> float:
    """Median milliseconds of one call of ``fn``; on CPU over about ``cpu_share`` of
    the usual 1 s of calls (0.1 s with ``quick``)."""
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
    seconds = (0.1 if quick else 1.0) * cpu_share
    return timer.blocked_autorange(min_run_time=seconds).median * 1e3


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


def make_mode_fn(forward: Callable[[], object], inputs: Sequence[torch.Tensor],
                 mode: str, seed: int = 0) -> Callable[[], object]:
    """The callable to time for ``mode``.

    ``forward`` runs with autograd recording (the training forward). ``backward``
    times only the backward of one recorded graph (``retain_graph``), ``full``
    both. ``torch.autograd.grad`` returns the gradients of ``inputs`` instead of
    accumulating into ``.grad``, so no accumulation add is timed.

    ``forward`` may return a tuple of tensors: each gets its own fixed random
    upstream gradient ``g_i``, i.e. the gradient of ``sum_i (y_i * g_i).sum()``
    without timing that loss.
    """
    if mode == "forward":
        return forward
    y = forward()
    outs = list(y) if isinstance(y, (tuple, list)) else [y]
    gen = torch.Generator(device=outs[0].device).manual_seed(seed)
    dys = [torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype) for o in outs]
    inputs = list(inputs)
    if mode == "backward":
        return lambda: torch.autograd.grad(outs, inputs, dys, retain_graph=True)
    if mode == "full":
        del y, outs
        return lambda: torch.autograd.grad(forward(), inputs, dys)
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


# ---------------------------------------------------------------------------
# Pieces the bench scripts share (flags, provider checks, compile, output).

def make_parser(doc: str) -> argparse.ArgumentParser:
    """A bench script's parser, its whole docstring as the ``--help`` description
    (its first line alone stops mid-sentence)."""
    return argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


QUICK_HELP = ("tiny smoke run: one small shape, one dtype, short timings; never appends to "
              "benchmarks/results (--out DIR keeps its rows)")


def add_output_args(ap: argparse.ArgumentParser, op: str, budget_help: str) -> None:
    """``--quick --out --no-save --time-budget``: every bench script's output flags."""
    ap.add_argument("--quick", action="store_true", help=QUICK_HELP)
    ap.add_argument("--out", metavar="DIR", help="also write CSV rows and a JSON summary here")
    ap.add_argument("--no-save", action="store_true",
                    help=f"do not append to benchmarks/results/{op}.csv")
    ap.add_argument("--time-budget", type=float, default=0, metavar="S",
                    help=f"stop starting new {budget_help} after S seconds (0: no limit)")


def add_common_args(ap: argparse.ArgumentParser, op: str, providers: Sequence[str],
                    dtype_help: str) -> None:
    """The flags every ``bench_<op>.py`` takes, so one command line works for all."""
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda"
                    if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", nargs="+", metavar="DTYPE", help=dtype_help)
    ap.add_argument("--shapes", nargs="+", metavar="NxCxHxW",
                    help="override the default input shapes, e.g. 8x256x28x28")
    ap.add_argument("--providers", nargs="+", choices=providers, default=list(providers))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--layouts", nargs="+", choices=("contiguous", "channels_last"),
                    default=["contiguous"])
    ap.add_argument("--compile-mode", default="auto",
                    help="torch.compile mode for reference_compile: 'auto' (max-autotune on "
                         "cuda, default on cpu), 'default', 'max-autotune', "
                         "'max-autotune-no-cudagraphs', ...")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads for CPU runs (0: torch's default)")
    add_output_args(ap, op, "providers")


def backend_unavailable(provider: str, device: torch.device, kernel: str,
                        triton_module: str) -> str | None:
    """Why the fused backend ``provider`` (cpu, cuda, triton) cannot run here, or None.

    ``kernel`` names one compiled pass kernel of the op (``manet_kernels::_<kernel>``):
    an extension built before the op's kernels existed loads but lacks it.
    ``triton_module`` is the op's Triton file, which may not be written yet."""
    from manet_kernels import _ext
    from manet_kernels.ops._common import triton_available, triton_interpreted
    if provider in ("cpu", "cuda"):
        if device.type != provider:
            return f"the {provider} backend runs on {provider.upper()} tensors only"
        if not _ext.HAS_EXT:
            return f"compiled extension not loaded ({_ext.EXT_ERROR})"
        if not _ext.has_kernel(kernel, provider):
            return f"the extension has no {provider} kernel manet_kernels::_{kernel}"
        return None
    if provider == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreted():
            return "Triton on CPU needs TRITON_INTERPRET=1 (the interpreter: too slow to time)"
        if importlib.util.find_spec(triton_module) is None:
            return f"no module {triton_module}"
        return None
    return f"{provider!r} is not a fused backend"


def compile_mode_for(arg: str, device: torch.device) -> str | None:
    """``--compile-mode`` to a ``torch.compile`` mode (None: the default mode)."""
    if arg == "auto":
        return "max-autotune" if device.type == "cuda" else None
    return None if arg == "default" else arg


def compile_fresh(fn: Callable, mode: str | None) -> Callable:
    """``torch.compile(fn)`` after a dynamo reset, static shapes.

    A fresh compile per configuration: automatic dynamic shapes would kick in at
    the second shape and time a slower generic kernel."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, mode=mode, dynamic=False)
    if mode == "reduce-overhead" or (mode and "max-autotune" in mode
                                     and "no-cudagraphs" not in mode):
        # CUDA graphs reuse their output memory; each timed call is a new step.
        def run(*args):
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*args)
        return run
    return compiled


def budget_spent(time_budget: float, started: float, note: Callable[[str], None],
                 what: str) -> bool:
    """Whether ``--time-budget`` seconds have passed since ``started`` (monotonic);
    if so, notes that the run stopped before ``what``."""
    if time_budget and time.monotonic() - started > time_budget:
        note(f"time budget {time_budget:.0f}s spent: stopped before {what}")
        return True
    return False


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def cpu_jiffies(stat: str, cpus: Iterable[int] | None = None) -> tuple[int, int]:
    """(busy, total) jiffies in ``/proc/stat`` text, summed over ``cpus`` (the
    aggregate ``cpu`` line when None or when a listed CPU has no line of its own).
    Busy is everything but idle and iowait; steal counts as busy (a neighbour's VM)."""
    lines = {}
    for line in stat.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu"):
            lines[name] = [int(v) for v in fields[:8]]  # guest time is inside user already
    names = [f"cpu{c}" for c in cpus] if cpus is not None else []
    if not names or any(n not in lines for n in names):
        names = ["cpu"]
    if "cpu" not in lines:
        raise ValueError("no cpu lines in /proc/stat")
    busy = total = 0
    for n in names:
        v = lines[n]
        total += sum(v)
        busy += sum(v) - v[3] - (v[4] if len(v) > 4 else 0)
    return busy, total


def _read_proc_stat() -> str:
    with open("/proc/stat") as f:
        return f.read()


# A quarter of the cores (half a core on the 2-vCPU VMs): others taking that much
# already stretch 2-thread CPU medians.
BUSY_FRACTION = 0.25


def busy_note(device: torch.device, *, window_s: float = 0.5,
              read_stat: Callable[[], str] = _read_proc_stat) -> str | None:
    """A warning when other processes keep this process's CPUs busy, measured from
    ``/proc/stat`` over ``window_s`` while this process sleeps (its own CPU time in
    the window subtracted). Not the load average: it counts this process too (it has
    just imported torch) and tasks waiting on I/O, so it fired on idle machines."""
    if device.type != "cpu":
        return None
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    try:
        own0, (busy0, total0) = time.process_time(), cpu_jiffies(read_stat(), cpus)
        time.sleep(window_s)
        own1, (busy1, total1) = time.process_time(), cpu_jiffies(read_stat(), cpus)
    except (OSError, ValueError):  # no /proc (macOS) or an unreadable one: no warning
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    capacity_s = (total1 - total0) / tick
    if capacity_s <= 0:
        return None
    others_s = max(0.0, (busy1 - busy0) / tick - (own1 - own0))
    frac = others_s / capacity_s
    if frac <= BUSY_FRACTION:
        return None
    n = len(cpus) if cpus else (os.cpu_count() or 1)
    return (f"machine busy (other processes used {frac:.0%} of {n} cores over "
            f"{window_s:g}s): CPU timings may be unreliable (--threads 1 suffers least)")


def saves_results(args) -> bool:
    """Whether a run appends to ``benchmarks/results/<op>.csv``: only deliberate runs.
    ``--quick`` is a smoke run (tiny shapes, short timings): it never does, nor
    does ``--no-save``; ``--out DIR`` still gets their rows."""
    return not (args.no_save or args.quick)


class Sink:
    """Where one run's rows go: ``results/<op>.csv`` (when :func:`saves_results`), and
    with ``args.out`` also ``out/<op>.csv`` and ``out/<op>.json``.

    Rows are written one at a time, so a run killed by its time limit keeps what
    it measured, and the JSON stays whole (``write_json`` replaces it atomically)."""

    def __init__(self, op: str, columns: Sequence[str], args, summary: dict):
        self.columns = columns
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.summary = {**summary, "rows": self.rows, "notes": self.notes}
        self.csv_paths = [os.path.join(RESULTS_DIR, f"{op}.csv")] if saves_results(args) else []
        self.json_path = None
        if args.out:
            self.csv_paths.append(os.path.join(args.out, f"{op}.csv"))
            self.json_path = os.path.join(args.out, f"{op}.json")
        if args.quick and not args.no_save:
            self.note(f"--quick: a smoke run, not appended to benchmarks/results/{op}.csv")

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def emit(self, row: dict, line: str) -> None:
        self.rows.append(row)
        for path in self.csv_paths:
            append_csv(path, [row], self.columns)
        if self.json_path:
            write_json(self.json_path, self.summary)
        print(line, flush=True)

    def finish(self, title: str, rows: Sequence[dict], table: Sequence[tuple[str, str, str]]
               ) -> None:
        if rows:
            print(f"\n{title}: {len(rows)} rows")
            print(format_table(rows, table))
        for path in self.csv_paths:
            print(f"appended to {path}")
        if self.json_path:
            write_json(self.json_path, self.summary)
            print(f"wrote {self.json_path}")
        if self.notes:
            print("notes:\n  " + "\n  ".join(self.notes))


def usable_providers(names, unavailable, device, sink) -> list[str]:
    """The providers of ``names`` that can run on ``device`` (``unavailable(p, device)``
    returns why not, or None); each skipped one and a busy machine noted in ``sink``."""
    providers = []
    for p in names:
        why = unavailable(p, device)
        if why:
            sink.note(f"skip provider {p}: {why}")
        else:
            providers.append(p)
    busy = busy_note(device)
    if busy:
        sink.note(busy)
    return providers


# ---------------------------------------------------------------------------
# One run of an op's bench script (mixed_attention, brnpa, aw_conv2d): configurations,
# the two sweeps over providers, the time budget, the rows.

def pick_configs(args, gpu_shapes: Sequence, gpu_dtypes: Sequence[torch.dtype],
                 cpu_shapes: Sequence, cpu_dtypes: Sequence[torch.dtype], quick_shapes: dict
                 ) -> tuple[torch.device | None, list[tuple[int, ...]], list[torch.dtype]]:
    """``(device, shapes, dtypes)`` of a run: ``--device``, ``--shapes`` (else the
    device's, or ``quick_shapes[device type]`` with ``--quick``), ``--dtype`` (else the
    device's, their first alone with ``--quick``). The device is None (an error
    printed) when it is CUDA and torch sees none."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return None, [], []
    gpu = device.type == "cuda"
    if args.shapes:
        shapes = [parse_shape(s, 4) for s in args.shapes]
    else:
        shapes = list(quick_shapes[device.type] if args.quick else
                      gpu_shapes if gpu else cpu_shapes)
    if args.dtype:
        return device, shapes, [parse_dtype(d) for d in args.dtype]
    dtypes = list(gpu_dtypes if gpu else cpu_dtypes)
    return device, shapes, dtypes[:1] if args.quick else dtypes


def unavailable_for(op: str, providers: Sequence[str], kernel: str,
                    eager: Sequence[str] = ("reference", "reference_compile")
                    ) -> Callable[[str, torch.device], str | None]:
    """A bench script's ``unavailable(provider, device)``: why ``provider`` cannot run on
    ``device`` here, or None. The ``eager`` providers always run; the fused backends of
    ``providers`` need what :func:`backend_unavailable` checks."""
    def unavailable(provider: str, device: torch.device) -> str | None:
        if provider in eager:
            return None
        if provider in providers:
            return backend_unavailable(provider, device, kernel, f"manet_kernels.triton.{op}")
        return f"unknown provider (one of {providers})"
    return unavailable


def config_name(config: tuple) -> str:
    """``(dtype, shape, layout)`` as "2x64x14x14 float32 contiguous"."""
    dtype, shape, layout = config
    return f"{shape_name(shape)} {dtype_name(dtype)} {layout}"


def copy_probe(device: torch.device, quick: bool) -> dict:
    """The copy bandwidth that GB/s columns are read against, printed; summary fields."""
    copy = copy_bandwidth_gbps(device, quick=quick)
    print(f"copy bandwidth (same run): {copy:.1f} GB/s")
    return {"copy_gbps": copy}


class Run:
    """What every measurement of one bench run shares: its flags, device, metadata,
    hardware probe, sink, usable providers, time budget and the baselines' times.

    Starting one sets ``--threads``, prints the header line, runs ``probe(device,
    quick)`` (which prints its numbers and returns the summary's probe fields) and
    notes the providers that cannot run here."""

    def __init__(self, op: str, args, device: torch.device, columns: Sequence[str],
                 probe: Callable[[torch.device, bool], dict],
                 unavailable: Callable[[str, torch.device], str | None],
                 baselines: Sequence[str] = ("reference",)):
        self.op, self.args, self.device = op, args, device
        self.compile_mode = compile_mode_for(args.compile_mode, device)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.env = env = environment(device)
        print(f"{op} on {env['device_name']} | torch {env['torch']} | triton "
              f"{env['triton'] or '-'} | commit {env['commit']} | {env['date_utc']}")
        self.probe = probe(device, args.quick)
        self.sink = Sink(op, columns, args, {"op": op, "env": env, **self.probe,
                                             "compile_mode": self.compile_mode or "default",
                                             "args": vars(args)})
        self.providers = usable_providers(args.providers, unavailable, device, self.sink)
        self.baseline_ms: dict[str, dict] = {b: {} for b in baselines}
        self.configs: list[tuple] = []
        self.started = time.monotonic()
        self.out_of_time = False

    def sweep(self, dtypes, shapes, first: Sequence[str],
              bench_config: Callable[[list[str], torch.dtype, tuple, str], None]) -> None:
        """``bench_config(providers, dtype, shape, layout)`` over every configuration in
        two sweeps: the providers of ``first`` (in that order: the later rows' ratios
        need them) and our backends, then torch.compile (tens of seconds to minutes of
        compiling per configuration), so a time budget cuts the compile rows, not ours."""
        self.configs = [(d, s, lay) for d in dtypes for s in shapes for lay in self.args.layouts]
        rank = {p: i for i, p in enumerate(first)}
        ours = [p for p in self.providers if p != "reference_compile"]
        ours.sort(key=lambda p: rank.get(p, len(rank)))
        compiled = [p for p in self.providers if p == "reference_compile"]
        self.started = time.monotonic()
        for providers in (ours, compiled):
            for dtype, shape, layout in self.configs:
                if not providers or self.out_of_time:
                    break
                bench_config(providers, dtype, shape, layout)
                free_memory(self.device)

    def within_budget(self, providers: Iterable[str], what: str) -> Iterator[str]:
        """``providers`` until ``--time-budget`` is spent (noted as "stopped before
        <provider> <what>")."""
        for p in providers:
            self.out_of_time = budget_spent(self.args.time_budget, self.started,
                                            self.sink.note, f"{p} {what}")
            if self.out_of_time:
                return
            yield p

    def first_call(self, provider: str, tag: str, make_forward: Callable[[], Callable],
                   error: Callable[[object], float]):
        """``(forward, error(its output))`` after a first call of ``make_forward()``
        (it compiles, and checks the provider runs at all), or None (noted)."""
        try:
            fwd = make_forward()
            t0 = time.monotonic()
            y = fwd()
            setup_s = time.monotonic() - t0
            err = error(y)
            del y
        except Exception as e:  # noqa: BLE001 (a provider that cannot run is reported, not fatal)
            self.sink.note(f"skip {tag}: {short_error(e)}")
            return None
        if provider == "reference_compile" and setup_s > 5:
            print(f"note: {tag}: first call (compile) took {setup_s:.0f}s", flush=True)
        return fwd, err

    def time_modes(self, fwd: Callable[[], object], inputs: Sequence[torch.Tensor], tag: str,
                   cpu_share: float = 1.0, memory_known: Iterable[str] = ()
                   ) -> Iterator[tuple[str, float, float | None]]:
        """``(mode, ms, peak MB)`` for each ``--modes`` mode that runs (one that fails
        is noted and skipped); the peak is None for the modes in ``memory_known``."""
        for mode in self.args.modes:
            fn = None
            try:
                fn = make_mode_fn(fwd, inputs, mode)
                fn()  # warm: the backward graph compiles on its first call
                ms = time_ms(fn, self.device, quick=self.args.quick, cpu_share=cpu_share)
                mem = None if mode in memory_known else peak_memory_mb(fn, self.device)
            except Exception as e:  # noqa: BLE001
                self.sink.note(f"skip {tag} {mode}: {short_error(e)}")
                continue
            finally:
                fn = None
                free_memory(self.device)
            yield mode, ms, mem

    def speedups(self, provider: str, config: tuple, mode: str, ms: float) -> dict:
        """Each baseline's time over ``ms`` in ``config`` and ``mode`` (NaN where that
        baseline has no row); ``ms`` is kept when ``provider`` is a baseline."""
        key = (*config, mode)
        if provider in self.baseline_ms:
            self.baseline_ms[provider][key] = ms
        return {b: t[key] / ms if key in t else math.nan for b, t in self.baseline_ms.items()}

    def emit(self, provider: str, config: tuple, mode: str, ms: float, fields: dict,
             params: str, rate: str) -> None:
        """One row: the configuration, the op's ``fields``, ``params`` (with the compile
        mode of reference_compile) and the metadata; printed with ``rate``."""
        dtype, shape, layout = config
        if provider == "reference_compile":
            params += f";compile_mode={self.compile_mode or 'default'}"
        row = {"op": self.op, "provider": provider, "mode": mode, "shape": shape_name(shape),
               "dtype": dtype_name(dtype), "layout": layout, "ms": ms, **fields,
               "params": params, **self.env}
        self.sink.emit(row, f"  {provider:>17} {mode:>8} {row['shape']:>14} {row['dtype']:>8} "
                            f"{layout:>13}  {ms:10.4f} ms  {rate}")

    def emit_bandwidth(self, provider: str, config: tuple, mode: str, ms: float,
                       mem: float | None, nbytes: float, fields: dict, params: str) -> None:
        """A row of a bandwidth-bound op: GB/s for ``nbytes`` of traffic, against the
        copy probe, the speedup over the reference, then the op's ``fields``."""
        rate = gbps(nbytes, ms)
        copy = self.probe["copy_gbps"]
        head = {"gbps": rate, "copy_gbps": copy, "frac_copy_bw": rate / copy,
                "peak_mem_mb": mem,
                "speedup_vs_ref": self.speedups(provider, config, mode, ms)["reference"]}
        self.emit(provider, config, mode, ms, {**head, **fields}, params, f"{rate:8.1f} GB/s")

    def finish(self, providers: Sequence[str], table: Sequence[tuple[str, str, str]]) -> int:
        """The summary table (rows by configuration, mode, then ``providers``' order),
        the files written and the notes; the exit status, 0."""
        def order(r):
            config = (parse_dtype(r["dtype"]), parse_shape(r["shape"]), r["layout"])
            return (self.configs.index(config), MODES.index(r["mode"]),
                    providers.index(r["provider"]))
        self.sink.finish(self.op, sorted(self.sink.rows, key=order), table)
        return 0


# ---------------------------------------------------------------------------
# pytest-benchmark entry points (benchmarks/test_bench_<op>.py).

def benchmark_test(bench, case: Callable) -> Callable:
    """The pytest-benchmark test of a ``bench_<op>`` module: every provider of
    ``bench.PROVIDERS`` in every mode, in float32 on the op's quick CPU shape, skipped
    where the provider cannot run. ``case(provider, mode, device, shape, dtype)`` returns
    the call to time and the test's extra_info (after its shape, dtype and device)."""
    import pytest
    pytest.importorskip("pytest_benchmark")  # without it the whole module skips
    shape = bench.QUICK_SHAPES["cpu"][0]

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("provider", bench.PROVIDERS)
    def test(benchmark, provider, mode):
        device = torch.device("cuda" if provider in ("cuda", "triton") else "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        why = bench.unavailable(provider, device)
        if why:
            pytest.skip(why)
        fn, info = case(provider, mode, device, shape, torch.float32)
        fn()  # compile / first-call costs stay out of the rounds
        benchmark.extra_info.update(shape=shape_name(shape), dtype="float32",
                                    device=device.type, **info)
        benchmark(fn if device.type == "cpu" else _synchronized(fn))
    return test


def _synchronized(fn: Callable[[], object]) -> Callable[[], None]:
    def timed():
        fn()
        torch.cuda.synchronize()  # time the kernels, not their launch
    return timed
