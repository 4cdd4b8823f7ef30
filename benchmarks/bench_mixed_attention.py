"""Benchmark mixed attention: reference eager, reference under torch.compile, and
each fused backend, in forward / backward / full (forward + backward) mode.

    python benchmarks/bench_mixed_attention.py --device cpu --quick
    python benchmarks/bench_mixed_attention.py --device cuda --out /tmp/bench

GB/s counts the traffic the fused design needs (docs/design.md §1: 4 passes
forward, 5 backward, 9 both), whatever a provider really moves, so it reads as
"how fast against the ideal": a provider doing 20 passes shows a low number.
Rows are appended to benchmarks/results/mixed_attention.csv, except by smoke runs
(--quick) and --no-save runs.
"""

from __future__ import annotations

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
    if provider in PROVIDERS:
        return bu.backend_unavailable(provider, device, "mixed_attention_apply",
                                      "manet_kernels.triton.mixed_attention")
    return f"unknown provider (one of {PROVIDERS})"


def make_forward(provider: str, module: MixedAttention, compile_mode: str | None
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> y`` for ``provider``, sharing ``module``'s parameters."""
    if provider == "reference":
        return module
    if provider == "reference_compile":
        return bu.compile_fresh(module, compile_mode)
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
    return bu.compile_mode_for("auto", device)


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
    compile_mode = bu.compile_mode_for(args.compile_mode, device)

    if args.threads:
        torch.set_num_threads(args.threads)
    env = bu.environment(device)
    print(f"{OP} on {env['device_name']} | torch {env['torch']} | triton {env['triton'] or '-'}"
          f" | commit {env['commit']} | {env['date_utc']}")
    copy = bu.copy_bandwidth_gbps(device, quick=quick)
    print(f"copy bandwidth (same run): {copy:.1f} GB/s")
    sink = bu.Sink(OP, COLUMNS, args,
                   {"op": OP, "env": env, "copy_gbps": copy,
                    "compile_mode": compile_mode or "default", "args": vars(args)})

    providers = bu.usable_providers(args.providers, unavailable, device, sink)

    # Two sweeps: reference and our backends over every configuration first, then
    # torch.compile (tens of seconds of compiling per configuration under
    # max-autotune), so a time budget cuts the compile rows, not ours.
    first = [p for p in providers if p != "reference_compile"]
    first.sort(key=lambda p: p != "reference")  # speedups need the reference row first
    sweeps = [first, [p for p in providers if p == "reference_compile"]]
    configs = [(d, s, lay) for d in dtypes for s in shapes for lay in args.layouts]
    ref_ms: dict[tuple, float] = {}
    started = time.monotonic()
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
                    args.time_budget, started, sink.note,
                    f"{provider} {bu.shape_name(shape)} {bu.dtype_name(dtype)}")
                if out_of_time:
                    break
                _bench_provider(provider, case, device, compile_mode, args.modes, quick,
                                ref_y, ref_ms, copy, env, sink)
            del case, ref_y
            bu.free_memory(device)

    def order(r):
        config = (bu.parse_dtype(r["dtype"]), bu.parse_shape(r["shape"]), r["layout"])
        return (configs.index(config), bu.MODES.index(r["mode"]),
                PROVIDERS.index(r["provider"]))
    sink.finish(OP, sorted(sink.rows, key=order), TABLE)
    return 0


def _bench_provider(provider, case, device, compile_mode, modes, quick, ref_y, ref_ms, copy,
                    env, sink):
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
        sink.note(f"skip {tag}: {bu.short_error(e)}")
        return
    if provider == "reference_compile" and setup_s > 5:
        print(f"note: {tag}: first call (compile) took {setup_s:.0f}s", flush=True)
    nbytes_pass = case.x.element_size() * case.x.numel()
    for mode in modes:
        try:
            fn = bu.make_mode_fn(lambda: fwd(x), case.inputs, mode)
            fn()  # warm: the backward graph compiles on its first call
            ms = bu.time_ms(fn, device, quick=quick)
            mem = bu.peak_memory_mb(fn, device)
        except Exception as e:  # noqa: BLE001
            sink.note(f"skip {tag} {mode}: {bu.short_error(e)}")
            continue
        finally:
            fn = None
            bu.free_memory(device)
        key = (case.shape, case.dtype, case.layout, mode)
        if provider == "reference":
            ref_ms[key] = ms
        rate = bu.gbps(nbytes_pass * PASSES[mode], ms)
        row = {
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
        }
        sink.emit(row, f"  {provider:>17} {mode:>8} {row['shape']:>14} {row['dtype']:>8} "
                       f"{case.layout:>13}  {ms:10.4f} ms  {rate:8.1f} GB/s")


def main(argv=None) -> int:
    ap = bu.make_parser(__doc__)
    bu.add_common_args(ap, OP, PROVIDERS, "default: bfloat16 float32 on cuda, float32 on cpu")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
