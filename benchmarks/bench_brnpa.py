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

import functools
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402  (it puts an uninstalled checkout on the path)

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


# Why a provider cannot run on a device here, or None if it can.
unavailable = bu.unavailable_for(OP, PROVIDERS, "brnpa_norms")


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


def _bench_provider(bench: bu.Run, provider: str, config: tuple, x: torch.Tensor, ref) -> None:
    n_parts, variant = bench.args.n_parts, bench.args.variant
    tag = f"{provider} {bu.config_name(config)}"

    def errors(out):
        v, m = out
        return ((v.detach().float() - ref[0]).abs().max().item(),
                (m.detach().float() - ref[1]).abs().max().item())
    first = bench.first_call(
        provider, tag,
        lambda: functools.partial(make_forward(provider, n_parts, variant, bench.compile_mode), x),
        errors)
    if first is None:
        return
    fwd, (err_v, err_m) = first
    nbytes_pass = x.element_size() * x.numel()
    for mode, ms, mem in bench.time_modes(fwd, [x], tag):
        n_pass = passes(mode, n_parts)
        fields = {"max_abs_err": err_v, "max_abs_err_maps": err_m, "passes": n_pass}
        bench.emit_bandwidth(provider, config, mode, ms, mem, nbytes_pass * n_pass, fields,
                             f"n_parts={n_parts};variant={variant}")


def run(args) -> int:
    device, shapes, dtypes = bu.pick_configs(args, GPU_SHAPES, GPU_DTYPES, CPU_SHAPES,
                                             CPU_DTYPES, QUICK_SHAPES)
    if device is None:
        return 2
    for s in shapes:
        if not 1 <= args.n_parts <= s[2] * s[3]:
            print(f"error: --n-parts {args.n_parts} needs 1 <= n_parts <= H*W for shape "
                  f"{bu.shape_name(s)}", file=sys.stderr)
            return 2
    bench = bu.Run(OP, args, device, COLUMNS, bu.copy_probe, unavailable)

    def bench_config(providers, dtype, shape, layout):
        x = make_input(shape, dtype, device, layout)
        ref = oracle(x, args.n_parts, args.variant)
        config = (dtype, shape, layout)
        for provider in bench.within_budget(providers, bu.config_name(config)):
            _bench_provider(bench, provider, config, x, ref)

    bench.sweep(dtypes, shapes, ["reference"], bench_config)
    return bench.finish(PROVIDERS, TABLE)


def main(argv=None) -> int:
    ap = bu.make_parser(__doc__)
    bu.add_common_args(ap, OP, PROVIDERS, "default: bfloat16 float32 on cuda, float32 on cpu")
    ap.add_argument("--n-parts", type=int, default=N_PARTS, help="parts per sample (default 3)")
    ap.add_argument("--variant", choices=VARIANTS, default="official")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
