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

import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402  (it puts an uninstalled checkout on the path)

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
         ("dtype", "dtype", ""), ("layout", "layout", ""), ("ms", "ms", ".4f"),
         ("gbps", "GB/s", ".1f"), ("frac_copy_bw", "of copy", ".1%"),
         ("peak_mem_mb", "peak MB", ".1f"), ("speedup_vs_ref", "vs ref", ".2f"),
         ("max_abs_err", "max err", ".1e"))


# Why a provider cannot run on a device here, or None if it can.
unavailable = bu.unavailable_for(OP, PROVIDERS, "mixed_attention_apply")


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


def run(args) -> int:
    device, shapes, dtypes = bu.pick_configs(args, GPU_SHAPES, GPU_DTYPES, CPU_SHAPES,
                                             CPU_DTYPES, QUICK_SHAPES)
    if device is None:
        return 2
    bench = bu.Run(OP, args, device, COLUMNS, bu.copy_probe, unavailable)

    def bench_config(providers, dtype, shape, layout):
        case = make_case(shape, dtype, device, layout)
        with torch.no_grad():
            ref_y = case.module(case.x).float()
        for provider in bench.within_budget(
                providers, f"{bu.shape_name(shape)} {bu.dtype_name(dtype)}"):
            _bench_provider(bench, provider, (dtype, shape, layout), case, ref_y)

    bench.sweep(dtypes, shapes, ["reference"], bench_config)
    return bench.finish(PROVIDERS, TABLE)


def _bench_provider(bench: bu.Run, provider: str, config: tuple, case: Case, ref_y: torch.Tensor
                    ) -> None:
    tag = f"{provider} {bu.config_name(config)}"
    first = bench.first_call(
        provider, tag,
        lambda: functools.partial(make_forward(provider, case.module, bench.compile_mode), case.x),
        lambda y: (y.detach().float() - ref_y).abs().max().item())
    if first is None:
        return
    fwd, err = first
    nbytes_pass = case.x.element_size() * case.x.numel()
    for mode, ms, mem in bench.time_modes(fwd, case.inputs, tag):
        bench.emit_bandwidth(provider, config, mode, ms, mem, nbytes_pass * PASSES[mode],
                             {"max_abs_err": err, "passes": PASSES[mode]},
                             f"reduction={REDUCTION};kernel={KERNEL}")


def main(argv=None) -> int:
    ap = bu.make_parser(__doc__)
    bu.add_common_args(ap, OP, PROVIDERS, "default: bfloat16 float32 on cuda, float32 on cpu")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
