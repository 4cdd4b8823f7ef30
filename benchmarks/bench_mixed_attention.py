"""Benchmark mixed attention: reference eager, reference under torch.compile, and
each fused backend, in forward / backward / full (forward + backward) mode.

    python benchmarks/bench_mixed_attention.py --device cpu --quick
    python benchmarks/bench_mixed_attention.py --device cuda --out /tmp/bench

GB/s counts the traffic the fused design needs (DESIGN.md section 1: 4 passes
forward, 5 backward, 9 both), whatever a provider really moves, so it reads as
"how fast against the ideal": a provider doing 20 passes shows a low number.
Rows are appended to benchmarks/results/mixed_attention.csv.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

try:
    import manet_kernels  # noqa: E402
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(1, bu.ROOT)
    import manet_kernels  # noqa: E402
from manet_kernels import _ext  # noqa: E402
from manet_kernels.ops._common import triton_available, triton_interpreted  # noqa: E402
from manet_kernels.reference import MixedAttention  # noqa: E402

OP = "mixed_attention"
PROVIDERS = ("reference", "reference_compile", "cpu", "cuda", "triton")
PASSES = {"forward": 4, "backward": 5, "full": 9}
REDUCTION, KERNEL = 16, 7

GPU_SHAPES = [(64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7)]
GPU_DTYPES = (torch.bfloat16, torch.float32)
CPU_SHAPES = [(8, 256, 28, 28), (4, 1024, 14, 14)]
CPU_DTYPES = (torch.float32,)
QUICK_SHAPES = {"cpu": [(2, 64, 14, 14)], "cuda": [(8, 256, 28, 28)]}

COLUMNS = ("op", "provider", "mode", "shape", "dtype", "layout", "ms", "gbps", "copy_gbps",
           "frac_copy_bw", "peak_mem_mb", "speedup_vs_ref", "max_abs_err", "passes",
           "params") + bu.META_COLUMNS
TABLE = (("provider", "provider", ""), ("mode", "mode", ""), ("shape", "shape", ""),
         ("dtype", "dtype", ""), ("layout", "layout", ""), ("ms", "ms", ".4f"), ("gbps", "GB/s", ".1f"),
         ("frac_copy_bw", "of copy", ".1%"), ("peak_mem_mb", "peak MB", ".1f"),
         ("speedup_vs_ref", "vs ref", ".2f"), ("max_abs_err", "max err", ".1e"))


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run on ``device`` here, or None if it can."""
    if provider in ("reference", "reference_compile"):
        return None
    if provider == "cpu":
        if device.type != "cpu":
            return "the cpu backend runs on CPU tensors only"
        if not _ext.HAS_EXT:
            return f"compiled extension not loaded ({_ext.EXT_ERROR})"
        return None
    if provider == "cuda":
        if device.type != "cuda":
            return "the cuda backend runs on CUDA tensors only"
        if not _ext.HAS_CUDA_KERNELS:
            return "extension built without CUDA kernels" if _ext.HAS_EXT \
                else f"compiled extension not loaded ({_ext.EXT_ERROR})"
        return None
    if provider == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreted():
            return "Triton on CPU needs TRITON_INTERPRET=1 (the interpreter: too slow to time)"
        return None
    return f"unknown provider (one of {PROVIDERS})"


def make_forward(provider: str, module: MixedAttention, compile_mode: str | None
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> y`` for ``provider``, sharing ``module``'s parameters."""
    if provider == "reference":
        return module
    if provider == "reference_compile":
        # A fresh compile per configuration, static shapes: automatic dynamic
        # shapes would kick in at the second shape and time a slower generic kernel.
        torch._dynamo.reset()
        compiled = torch.compile(module, mode=compile_mode, dynamic=False)
        if compile_mode is not None and "max-autotune" in compile_mode \
                and "no-cudagraphs" not in compile_mode:
            # CUDA graphs reuse output memory; each timed call is a new step.
            def run(x):
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(x)
            return run
        return compiled
    m = module

    def fused(x):
        return manet_kernels.mixed_attention(x, m.fc1.weight, m.fc1.bias, m.fc2.weight,
                                             m.fc2.bias, m.conv.weight, m.conv.bias,
                                             backend=provider)
    return fused


@dataclass
class Case:
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    layout: str
    module: MixedAttention
    x: torch.Tensor

    @property
    def inputs(self):
        return [self.x, *self.module.parameters()]


def make_case(shape, dtype: torch.dtype, device: torch.device, layout: str = "contiguous",
              seed: int = 0) -> Case:
    torch.manual_seed(seed)
    module = MixedAttention(shape[1], reduction=REDUCTION, kernel_size=KERNEL)
    module = module.to(device=device, dtype=dtype)
    x = torch.randn(shape, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return Case(tuple(shape), dtype, layout, module, x.requires_grad_())


def default_compile_mode(device: torch.device) -> str | None:
    return "max-autotune" if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def run(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    quick = args.quick
    if args.shapes:
        shapes = [bu.parse_shape(s, 4) for s in args.shapes]
    elif quick:
        shapes = QUICK_SHAPES[device.type]
    else:
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.dtype:
        dtypes = [bu.parse_dtype(d) for d in args.dtype]
    else:
        dtypes = list(GPU_DTYPES if device.type == "cuda" else CPU_DTYPES)
        if quick:
            dtypes = dtypes[:1]
    compile_mode = args.compile_mode if args.compile_mode != "auto" \
        else default_compile_mode(device)
    if compile_mode == "default":
        compile_mode = None

    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        print(f"note: {text}")

    providers = []
    for p in args.providers:
        why = unavailable(p, device)
        if why:
            notes.append(f"skip {p}: {why}")
            print(f"note: skip provider {p}: {why}")
        else:
            providers.append(p)

    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > 0.5 * cores:
            notes.append(f"machine busy (load average {load:.1f} on {cores} cores): "
                         "CPU timings may be unreliable (--threads 1 suffers least)")
            print(f"note: {notes[-1]}")
    env = bu.environment(device)
    print(f"{OP} on {env['device_name']} | torch {env['torch']} | triton {env['triton'] or '-'}"
          f" | commit {env['commit']} | {env['date_utc']}")
    copy = bu.copy_bandwidth_gbps(device, quick=quick)
    print(f"copy bandwidth (same run): {copy:.1f} GB/s")

    csv_paths = [] if args.no_save else [os.path.join(bu.RESULTS_DIR, f"{OP}.csv")]
    json_path = None
    if args.out:
        csv_paths.append(os.path.join(args.out, f"{OP}.csv"))
        json_path = os.path.join(args.out, f"{OP}.json")
    rows: list[dict] = []
    started = time.monotonic()
    summary = {"op": OP, "env": env, "copy_gbps": copy, "compile_mode": compile_mode or "default",
               "args": vars(args), "rows": rows, "notes": notes}

    def emit(row):
        rows.append(row)
        for path in csv_paths:
            bu.append_csv(path, [row], COLUMNS)  # row by row: a timed-out run keeps its rows
        if json_path:
            bu.write_json(json_path, summary)
        print(f"  {row['provider']:>17} {row['mode']:>8} {row['shape']:>14} {row['dtype']:>8} "
              f"{row['layout']:>13}"
              f"  {row['ms']:10.4f} ms  {row['gbps']:8.1f} GB/s", flush=True)

    # Two sweeps: reference and our backends over every configuration first, then
    # torch.compile (tens of seconds of compiling per configuration under
    # max-autotune), so a time budget cuts the compile rows, not ours.
    first = [p for p in providers if p != "reference_compile"]
    first.sort(key=lambda p: p != "reference")  # speedups need the reference row first
    sweeps = [first, [p for p in providers if p == "reference_compile"]]
    configs = [(d, s, lay) for d in dtypes for s in shapes for lay in args.layouts]
    ref_ms: dict[tuple, float] = {}
    out_of_time = False
    for sweep in sweeps:
        for dtype, shape, layout in configs:
            if not sweep or out_of_time:
                break
            case = make_case(shape, dtype, device, layout)
            with torch.no_grad():
                ref_y = case.module(case.x).float()
            for provider in sweep:
                out_of_time = bu.budget_spent(
                    args.time_budget, started, note,
                    f"{provider} {bu.shape_name(shape)} {bu.dtype_name(dtype)}")
                if out_of_time:
                    break
                _bench_provider(provider, case, device, compile_mode, args.modes, quick,
                                ref_y, ref_ms, copy, env, notes, emit)
            del case, ref_y
            _free(device)

    if rows:
        def order(r):
            config = (bu.parse_dtype(r["dtype"]), bu.parse_shape(r["shape"]), r["layout"])
            return (configs.index(config), bu.MODES.index(r["mode"]),
                    PROVIDERS.index(r["provider"]))
        print(f"\n{OP}: {len(rows)} rows")
        print(bu.format_table(sorted(rows, key=order), TABLE))
    for path in csv_paths:
        print(f"appended to {path}")
    if json_path:
        bu.write_json(json_path, summary)
        print(f"wrote {json_path}")
    if notes:
        print("notes:\n  " + "\n  ".join(notes))
    return 0


def _bench_provider(provider, case, device, compile_mode, modes, quick, ref_y, ref_ms, copy,
                    env, notes, emit):
    tag = f"{provider} {bu.shape_name(case.shape)} {bu.dtype_name(case.dtype)} {case.layout}"
    try:
        fwd = make_forward(provider, case.module, compile_mode)
        x = case.x
        t0 = time.monotonic()
        y = fwd(x)  # first call: compiles, and checks the provider runs at all
        setup_s = time.monotonic() - t0
        err = (y.detach().float() - ref_y).abs().max().item()
        del y
    except Exception as e:  # noqa: BLE001 (a provider that cannot run is reported, not fatal)
        notes.append(f"skip {tag}: {_short(e)}")
        print(f"note: skip {tag}: {_short(e)}")
        return
    if provider == "reference_compile" and setup_s > 5:
        print(f"note: {tag}: first call (compile) took {setup_s:.0f}s")
    nbytes_pass = case.x.element_size() * case.x.numel()
    for mode in modes:
        try:
            fn = bu.make_mode_fn(lambda: fwd(x), case.inputs, mode)
            fn()  # warm: the backward graph compiles on its first call
            ms = bu.time_ms(fn, device, quick=quick)
            mem = bu.peak_memory_mb(fn, device)
        except Exception as e:  # noqa: BLE001
            notes.append(f"skip {tag} {mode}: {_short(e)}")
            print(f"note: skip {tag} {mode}: {_short(e)}")
            continue
        finally:
            fn = None
            _free(device)
        key = (case.shape, case.dtype, case.layout, mode)
        if provider == "reference":
            ref_ms[key] = ms
        rate = bu.gbps(nbytes_pass * PASSES[mode], ms)
        emit({
            "op": OP, "provider": provider, "mode": mode, "shape": bu.shape_name(case.shape),
            "dtype": bu.dtype_name(case.dtype), "layout": case.layout, "ms": ms,
            "gbps": rate, "copy_gbps": copy, "frac_copy_bw": rate / copy,
            "peak_mem_mb": mem,
            "speedup_vs_ref": ref_ms[key] / ms if key in ref_ms else math.nan,
            "max_abs_err": err, "passes": PASSES[mode],
            "params": f"reduction={REDUCTION};kernel={KERNEL}"
                      + (f";compile_mode={compile_mode or 'default'}"
                         if provider == "reference_compile" else ""),
            **env,
        })


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda"
                    if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", nargs="+", metavar="DTYPE",
                    help="default: bfloat16 float32 on cuda, float32 on cpu")
    ap.add_argument("--shapes", nargs="+", metavar="NxCxHxW",
                    help="override the default shapes, e.g. 8x256x28x28")
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    ap.add_argument("--modes", nargs="+", choices=bu.MODES, default=list(bu.MODES))
    ap.add_argument("--layouts", nargs="+", choices=("contiguous", "channels_last"),
                    default=["contiguous"])
    ap.add_argument("--compile-mode", default="auto",
                    help="torch.compile mode for reference_compile: 'auto' (max-autotune on "
                         "cuda, default on cpu), 'default', 'max-autotune', "
                         "'max-autotune-no-cudagraphs', ...")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads for CPU runs (0: torch's default)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke run: one small shape, one dtype, short timings")
    ap.add_argument("--out", metavar="DIR", help="also write CSV rows and a JSON summary here")
    ap.add_argument("--no-save", action="store_true",
                    help="do not append to benchmarks/results/mixed_attention.csv")
    ap.add_argument("--time-budget", type=float, default=0, metavar="S",
                    help="stop starting new providers after S seconds (0: no limit)")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
