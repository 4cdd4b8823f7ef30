"""Benchmark AW-convolution: the grouped-conv trick (eager and under torch.compile),
a plain conv with the shared weight (the floor), and each fused backend, in
forward / backward / full (forward + backward) mode.

    python benchmarks/bench_aw_conv2d.py --device cpu --quick
    python benchmarks/bench_aw_conv2d.py --device cuda --out /tmp/bench

The reference builds the per-sample weights ``weight * (1 + attn[n])`` inside the
timed graph, as CondConv/ODConv-style code does, then runs one conv with
``groups = N * groups``. ``plain_conv`` is ``F.conv2d`` with the shared weight:
the same FLOPs with no attention, the speed a fused kernel can at best match.
TFLOP/s counts 2 * N * C2 * Ho * Wo * C1/groups * kh * kw per forward, twice that
per backward, against an n x n matmul measured in the same run. On CPU the
providers of a case are timed in interleaved rounds (--rounds, default 5) and
each row is a provider's median round, so ratios are side by side in time too.
Rows are appended to benchmarks/results/aw_conv2d.csv, except by smoke runs
(--quick) and --no-save runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402  (it puts an uninstalled checkout on the path)

import manet_kernels  # noqa: E402
from manet_kernels.reference.aw_conv2d import grouped_conv_trick  # noqa: E402

OP = "aw_conv2d"
PROVIDERS = ("reference", "reference_compile", "plain_conv", "cpu", "cuda", "triton")
WORK = {"forward": 1, "backward": 2, "full": 3}  # in forward FLOPs

# ResNet-50's 3x3 convs (stride 1, pad 1), batch 64.
GPU_SHAPES = [(64, 64, 56, 56), (64, 128, 28, 28), (64, 256, 14, 14), (64, 512, 7, 7)]
GPU_DTYPES = (torch.bfloat16,)
CPU_SHAPES = [(8, 64, 28, 28), (8, 256, 14, 14)]
CPU_DTYPES = (torch.float32,)
QUICK_SHAPES = {"cpu": [(2, 32, 14, 14)], "cuda": [(64, 64, 56, 56)]}

COLUMNS = ("op", "provider", "mode", "shape", "dtype", "layout", "ms", "tflops",
           "matmul_tflops", "frac_matmul", "peak_mem_mb", "speedup_vs_ref", "speedup_vs_plain",
           "max_abs_err", "gflop", "params") + bu.META_COLUMNS
TABLE = (("provider", "provider", ""), ("mode", "mode", ""), ("shape", "shape", ""),
         ("dtype", "dtype", ""), ("layout", "layout", ""), ("ms", "ms", ".4f"),
         ("tflops", "TFLOP/s", ".3f"), ("frac_matmul", "of mm", ".1%"),
         ("peak_mem_mb", "peak MB", ".1f"), ("speedup_vs_ref", "vs ref", ".2f"),
         ("speedup_vs_plain", "vs plain", ".2f"), ("max_abs_err", "max err", ".1e"))


@dataclass(frozen=True)
class Conv:
    out_channels: int  # 0: as many as input channels
    kernel: int
    stride: int
    padding: int | None  # None: dilation * (kernel // 2), "same" at stride 1
    dilation: int
    groups: int
    bias: bool

    def resolved(self, c1: int) -> tuple[int, int]:
        c2 = self.out_channels or c1
        pad = self.dilation * (self.kernel // 2) if self.padding is None else self.padding
        return c2, pad

    def out_hw(self, h: int, w: int, pad: int) -> tuple[int, int]:
        span = self.dilation * (self.kernel - 1) + 1
        return ((h + 2 * pad - span) // self.stride + 1, (w + 2 * pad - span) // self.stride + 1)

    def params(self, c1: int) -> str:
        c2, pad = self.resolved(c1)
        return (f"c2={c2};kernel={self.kernel}x{self.kernel};stride={self.stride};"
                f"padding={pad};dilation={self.dilation};groups={self.groups};"
                f"bias={int(self.bias)}")


@dataclass
class Case:
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    layout: str
    x: torch.Tensor
    weight: torch.Tensor
    attn: torch.Tensor
    bias: torch.Tensor | None
    stride: int
    padding: int
    dilation: int
    groups: int
    flops: float  # of one forward

    def inputs(self, provider: str) -> list[torch.Tensor]:
        ts = [self.x, self.weight] + ([] if provider == "plain_conv" else [self.attn])
        return ts + ([] if self.bias is None else [self.bias])


def make_case(shape, dtype: torch.dtype, device: torch.device, conv: Conv,
              layout: str = "contiguous", seed: int = 0) -> Case:
    n, c1, h, w = shape
    c2, pad = conv.resolved(c1)
    k, g = conv.kernel, conv.groups
    if c1 % g or c2 % g:
        raise ValueError(f"groups={g} must divide C1={c1} and C2={c2}")
    ho, wo = conv.out_hw(h, w, pad)
    if ho < 1 or wo < 1:
        raise ValueError(f"shape {bu.shape_name(shape)} gives an empty output with {conv}")
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(size, generator=gen, device=device) * scale).to(dtype)

    x = randn(n, c1, h, w)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    # Weights at the init's scale keep bf16 outputs O(1); attn in (0, 1) as the
    # sigmoid that makes it.
    weight = randn(c2, c1 // g, k, k, scale=(c1 // g * k * k) ** -0.5)
    attn = torch.rand((n, c2, 1, k, k), generator=gen, device=device).to(dtype)
    bias = randn(c2, scale=0.1) if conv.bias else None
    flops = 2.0 * n * c2 * ho * wo * (c1 // g) * k * k
    for t in (x, weight, attn, bias):
        if t is not None:
            t.requires_grad_()
    return Case(tuple(shape), dtype, layout, x, weight, attn, bias, conv.stride, pad,
                conv.dilation, g, flops)


def reference(x, weight, attn, bias, stride, padding, dilation, groups):
    return grouped_conv_trick(x, weight[None] * (1 + attn), bias, stride, padding, dilation,
                              groups)


def make_forward(provider: str, case: Case, compile_mode: str | None
                 ) -> Callable[[], torch.Tensor]:
    c = case
    conf = (c.stride, c.padding, c.dilation, c.groups)
    if provider == "reference":
        return lambda: reference(c.x, c.weight, c.attn, c.bias, *conf)
    if provider == "reference_compile":
        compiled = bu.compile_fresh(reference, compile_mode)
        return lambda: compiled(c.x, c.weight, c.attn, c.bias, *conf)
    if provider == "plain_conv":
        return lambda: F.conv2d(c.x, c.weight, c.bias, *conf)
    return lambda: manet_kernels.aw_conv2d(c.x, c.weight, c.attn, c.bias, *conf,
                                           backend=provider)


# Why a provider cannot run on a device here, or None if it can.
unavailable = bu.unavailable_for(OP, PROVIDERS, "aw_conv2d_fwd",
                                 eager=("reference", "reference_compile", "plain_conv"))


@contextlib.contextmanager
def _tf32(conv: bool | None = None, matmul: bool | None = None):
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        if conv is not None:
            torch.backends.cudnn.allow_tf32 = conv
        if matmul is not None:
            torch.backends.cuda.matmul.allow_tf32 = matmul
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def oracle(case: Case) -> torch.Tensor:
    """The reference in fp32 on the same values, without TF32 (cuDNN's fp32 convs
    use it by default), so the error column measures every provider alike."""
    c = case
    with torch.no_grad(), _tf32(conv=False):
        up = [None if t is None else t.detach().float() for t in (c.x, c.weight, c.attn, c.bias)]
        return reference(*up, c.stride, c.padding, c.dilation, c.groups)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    # fp32 convs run TF32 under cuDNN's default, fp32 matmuls do not: the ceiling
    # gets the conv's setting, else plain_conv would beat "the hardware".
    with _tf32(matmul=torch.backends.cudnn.allow_tf32):
        return bu.matmul_tflops(device, dtype, quick=quick)


@dataclass
class Measured:
    """One provider's measurements on one case, over the rounds so far."""
    err: float = math.nan
    ms: dict = None  # mode -> [ms per round]
    mem: dict = None  # mode -> MB

    def __post_init__(self):
        self.ms, self.mem = {}, {}


def _measure(bench: bu.Run, provider: str, config: tuple, case: Case, ref_y: torch.Tensor,
             cpu_share: float, into: Measured) -> None:
    """Times ``provider`` once in every mode, appending to ``into``."""
    tag = f"{provider} {bu.config_name(config)}"

    def error(y):
        # plain_conv computes another function: an error against the AW oracle means nothing
        if provider == "plain_conv":
            return math.nan
        return (y.detach().float() - ref_y).abs().max().item()
    first = bench.first_call(provider, tag,
                             lambda: make_forward(provider, case, bench.compile_mode), error)
    if first is None:
        return
    fwd, into.err = first
    for mode, ms, mem in bench.time_modes(fwd, case.inputs(provider), tag, cpu_share, into.mem):
        into.mem.setdefault(mode, mem)
        into.ms.setdefault(mode, []).append(ms)


def _emit(bench: bu.Run, provider: str, config: tuple, case: Case, measured: Measured,
          mm: float, params: str) -> None:
    for mode, times in measured.ms.items():
        ms = statistics.median(times)
        speedup = bench.speedups(provider, config, mode, ms)
        flops = case.flops * WORK[mode]
        tflops = flops / (ms * 1e-3) / 1e12
        fields = {"tflops": tflops, "matmul_tflops": mm, "frac_matmul": tflops / mm,
                  "peak_mem_mb": measured.mem.get(mode, math.nan),
                  "speedup_vs_ref": speedup["reference"],
                  "speedup_vs_plain": speedup["plain_conv"],
                  "max_abs_err": measured.err, "gflop": flops / 1e9}
        rounds = f";rounds={len(times)}" if len(times) > 1 else ""
        bench.emit(provider, config, mode, ms, fields, params + rounds, f"{tflops:8.3f} TFLOP/s")


def run(args) -> int:
    device, shapes, dtypes = bu.pick_configs(args, GPU_SHAPES, GPU_DTYPES, CPU_SHAPES,
                                             CPU_DTYPES, QUICK_SHAPES)
    if device is None:
        return 2
    conv = Conv(args.out_channels, args.kernel, args.stride, args.padding, args.dilation,
                args.groups, args.bias)
    for s in shapes:
        c2, pad = conv.resolved(s[1])
        if s[1] % conv.groups or c2 % conv.groups or min(conv.out_hw(s[2], s[3], pad)) < 1:
            print(f"error: shape {bu.shape_name(s)} does not fit {conv.params(s[1])}",
                  file=sys.stderr)
            return 2
    mm = {}

    def matmul_probe(device, quick):
        for d in dtypes:
            mm[d] = matmul_ceiling(device, d, quick)
            print(f"matmul {bu.dtype_name(d)} (same run): {mm[d]:.3f} TFLOP/s")
        return {"matmul_tflops": {bu.dtype_name(d): v for d, v in mm.items()}}
    bench = bu.Run(OP, args, device, COLUMNS, matmul_probe, unavailable,
                   baselines=("reference", "plain_conv"))

    def bench_config(providers, dtype, shape, layout):
        config = (dtype, shape, layout)
        case = make_case(shape, dtype, device, conv, layout)
        ref_y = oracle(case)
        # torch.compile rows would recompile every round: one round for them.
        rounds = 1 if "reference_compile" in providers else rounds_for(args, device)
        measured = {p: Measured() for p in providers}
        for _ in range(rounds):
            for provider in bench.within_budget(
                    providers, f"{bu.shape_name(shape)} {bu.dtype_name(dtype)}"):
                _measure(bench, provider, config, case, ref_y, 1.0 / rounds, measured[provider])
            if bench.out_of_time:
                break
        for provider in providers:
            _emit(bench, provider, config, case, measured[provider], mm[dtype],
                  conv.params(shape[1]))

    # The floor and the reference first: every later row's ratios need them.
    bench.sweep(dtypes, shapes, ["plain_conv", "reference"], bench_config)
    return bench.finish(PROVIDERS, TABLE)


def rounds_for(args, device: torch.device) -> int:
    """--rounds, or its default: 5 interleaved rounds on CPU, 1 on GPU."""
    if args.rounds:
        return args.rounds
    return 1 if device.type == "cuda" or args.quick else 5


def main(argv=None) -> int:
    ap = bu.make_parser(__doc__)
    bu.add_common_args(ap, OP, PROVIDERS,
                       "default: bfloat16 on cuda (float32 as an option), float32 on cpu")
    ap.add_argument("--out-channels", type=int, default=0, metavar="C2",
                    help="output channels (default: as many as input channels)")
    ap.add_argument("--kernel", type=int, default=3, help="square kernel size (default 3)")
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--padding", type=int, default=None,
                    help="default: dilation * (kernel // 2), 'same' at stride 1")
    ap.add_argument("--dilation", type=int, default=1)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--bias", action="store_true", help="add a bias (ResNet's convs have none)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="time the providers of each case in this many interleaved rounds and "
                         "report each one's median round (default: 5 on cpu, 1 on cuda and "
                         "with --quick); the timing time per case stays the same")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
