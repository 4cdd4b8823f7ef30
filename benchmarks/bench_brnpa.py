"""Benchmark BR-NPA grouping: reference eager, reference under torch.compile, and
each fused backend, in forward / backward / full (forward + backward) mode.

    python benchmarks/bench_brnpa.py --device cpu --quick
    python benchmarks/bench_brnpa.py --device cuda --out /tmp/bench

Backward and full differentiate ``(v * gv).sum() + (m * gm).sum()`` with fixed
random ``gv``, ``gm``: both outputs carry gradient, as in training with a loss on
the part maps; the time is that of the gradient of ``x``.
GB/s counts the traffic the fused design needs (docs/design.md §3: 1 + n_parts
passes forward, 3 backward, their sum both), whatever a provider really moves.
Rows are appended to benchmarks/results/brnpa.csv, except by smoke runs
(--quick) and --no-save runs.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402

try:
    import manet_kernels  # noqa: E402
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(1, bu.ROOT)
    import manet_kernels  # noqa: E402
from manet_kernels.reference.brnpa import VARIANTS  # noqa: E402
from manet_kernels.reference.brnpa import brnpa as reference_brnpa  # noqa: E402

OP = "brnpa"
PROVIDERS = ("reference", "reference_compile", "cpu", "cuda", "triton")
N_PARTS = 3

GPU_SHAPES = [(32, 2048, 56, 56), (64, 2048, 14, 14)]
GPU_DTYPES = (torch.bfloat16, torch.float32)
CPU_SHAPES = [(4, 512, 28, 28)]
CPU_DTYPES = (torch.float32,)
QUICK_SHAPES = {"cpu": [(2, 64, 14, 14)], "cuda": [(8, 2048, 14, 14)]}

COLUMNS = ("op", "provider", "mode", "shape", "dtype", "layout", "ms", "gbps", "copy_gbps",
           "frac_copy_bw", "peak_mem_mb", "speedup_vs_ref", "max_abs_err", "max_abs_err_maps",
           "passes", "params") + bu.META_COLUMNS
TABLE = (("provider", "provider", ""), ("mode", "mode", ""), ("shape", "shape", ""),
         ("dtype", "dtype", ""), ("layout", "layout", ""), ("ms", "ms", ".4f"),
         ("gbps", "GB/s", ".1f"), ("frac_copy_bw", "of copy", ".1%"),
         ("peak_mem_mb", "peak MB", ".1f"), ("speedup_vs_ref", "vs ref", ".2f"),
         ("max_abs_err", "err v", ".1e"), ("max_abs_err_maps", "err maps", ".1e"))


def passes(mode: str, n_parts: int) -> int:
    """Reads + writes of ``x``-sized tensors in the fused design."""
    fwd, bwd = 1 + n_parts, 3
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run on ``device`` here, or None if it can."""
    if provider in ("reference", "reference_compile"):
        return None
    if provider in PROVIDERS:
        return bu.backend_unavailable(provider, device, "brnpa_norms",
                                      "manet_kernels.triton.brnpa")
    return f"unknown provider (one of {PROVIDERS})"


def make_forward(provider: str, n_parts: int, variant: str, compile_mode: str | None
                 ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``x -> (vectors, maps)`` for ``provider``."""
    def reference(x):
        return reference_brnpa(x, n_parts, variant=variant)

    if provider == "reference":
        return reference
    if provider == "reference_compile":
        return bu.compile_fresh(reference, compile_mode)

    def fused(x):
        return manet_kernels.brnpa(x, n_parts, variant=variant, backend=provider)
    return fused


def make_input(shape, dtype: torch.dtype, device: torch.device, layout: str = "contiguous",
               seed: int = 0) -> torch.Tensor:
    # Positive like post-ReLU features, but never exactly 0: every similarity stays
    # > 0, so no map's sum comes near 0 and no norm sits at its kink.
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).abs_().add_(0.1)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def oracle(x: torch.Tensor, n_parts: int, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 reference on the same values. Not the reference in ``x``'s dtype: in
    bf16 its norms round to 8 bits and tie, so its argmax picks other positions
    than a kernel that accumulates in fp32."""
    with torch.no_grad():
        v, m = reference_brnpa(x.detach().float(), n_parts, variant=variant)
    return v, m


def _bench_provider(provider, x, layout, n_parts, variant, device, compile_mode, modes, quick, ref,
                    ref_ms, copy, env, sink, tag):
    try:
        fwd = make_forward(provider, n_parts, variant, compile_mode)
        t0 = time.monotonic()
        v, m = fwd(x)  # first call: compiles, and checks the provider runs at all
        setup_s = time.monotonic() - t0
        err_v = (v.detach().float() - ref[0]).abs().max().item()
        err_m = (m.detach().float() - ref[1]).abs().max().item()
        del v, m
    except Exception as e:  # noqa: BLE001 (a provider that cannot run is reported, not fatal)
        sink.note(f"skip {provider} {tag}: {bu.short_error(e)}")
        return
    if provider == "reference_compile" and setup_s > 5:
        print(f"note: {provider} {tag}: first call (compile) took {setup_s:.0f}s")
    shape = tuple(x.shape)
    nbytes_pass = x.element_size() * x.numel()
    for mode in modes:
        fn = None
        try:
            fn = bu.make_mode_fn(lambda: fwd(x), [x], mode)
            fn()  # warm: the backward graph compiles on its first call
            ms = bu.time_ms(fn, device, quick=quick)
            mem = bu.peak_memory_mb(fn, device)
        except Exception as e:  # noqa: BLE001
            sink.note(f"skip {provider} {tag} {mode}: {bu.short_error(e)}")
            continue
        finally:
            fn = None
            bu.free_memory(device)
        key = (shape, x.dtype, layout, mode)
        if provider == "reference":
            ref_ms[key] = ms
        n_pass = passes(mode, n_parts)
        rate = bu.gbps(nbytes_pass * n_pass, ms)
        row = {
            "op": OP, "provider": provider, "mode": mode, "shape": bu.shape_name(shape),
            "dtype": bu.dtype_name(x.dtype), "layout": layout, "ms": ms, "gbps": rate,
            "copy_gbps": copy, "frac_copy_bw": rate / copy, "peak_mem_mb": mem,
            "speedup_vs_ref": ref_ms[key] / ms if key in ref_ms else math.nan,
            "max_abs_err": err_v, "max_abs_err_maps": err_m, "passes": n_pass,
            "params": f"n_parts={n_parts};variant={variant}"
                      + (f";compile_mode={compile_mode or 'default'}"
                         if provider == "reference_compile" else ""),
            **env,
        }
        sink.emit(row, f"  {provider:>17} {mode:>8} {row['shape']:>14} {row['dtype']:>8} "
                       f"{layout:>13}  {ms:10.4f} ms  {rate:8.1f} GB/s")


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
    for s in shapes:
        if not 1 <= args.n_parts <= s[2] * s[3]:
            print(f"error: --n-parts {args.n_parts} needs 1 <= n_parts <= H*W for shape "
                  f"{bu.shape_name(s)}", file=sys.stderr)
            return 2
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
    # torch.compile, so a time budget cuts the compile rows, not ours.
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
            x = make_input(shape, dtype, device, layout)
            ref = oracle(x, args.n_parts, args.variant)
            tag = f"{bu.shape_name(shape)} {bu.dtype_name(dtype)} {layout}"
            for provider in sweep:
                out_of_time = bu.budget_spent(args.time_budget, started, sink.note,
                                              f"{provider} {tag}")
                if out_of_time:
                    break
                _bench_provider(provider, x, layout, args.n_parts, args.variant, device,
                                compile_mode, args.modes, quick, ref, ref_ms, copy, env, sink,
                                tag)
            del x, ref
            bu.free_memory(device)

    def order(r):
        config = (bu.parse_dtype(r["dtype"]), bu.parse_shape(r["shape"]), r["layout"])
        return (configs.index(config), bu.MODES.index(r["mode"]),
                PROVIDERS.index(r["provider"]))
    sink.finish(OP, sorted(sink.rows, key=order), TABLE)
    return 0


def main(argv=None) -> int:
    ap = bu.make_parser(__doc__)
    bu.add_common_args(ap, OP, PROVIDERS, "default: bfloat16 float32 on cuda, float32 on cpu")
    ap.add_argument("--n-parts", type=int, default=N_PARTS, help="parts per sample (default 3)")
    ap.add_argument("--variant", choices=VARIANTS, default="official")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
