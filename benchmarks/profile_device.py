"""Where the time of one forward+backward goes, per op and backend (GPU).

For each case: wall milliseconds per step (host clock around synchronised
steps), the GPU kernel time per step summed from ``torch.profiler``, and the
top kernels. Wall far above kernel time means the step is host-bound (launches,
Python, dispatch); kernel time far above the bytes/bandwidth floor means the
kernels are slow.

    python benchmarks/profile_device.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import manet_kernels as mk  # noqa: E402
from manet_kernels.reference import MixedAttention  # noqa: E402
from manet_kernels.reference.aw_conv2d import grouped_conv_trick  # noqa: E402
from manet_kernels.reference.brnpa import brnpa as reference_brnpa  # noqa: E402


def mixed_case(shape, dtype, backend):
    torch.manual_seed(0)
    m = MixedAttention(shape[1]).cuda().to(dtype)
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    params = [x, *m.parameters()]

    def fwd():
        if backend == "reference":
            return m(x)
        return mk.mixed_attention(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias,
                                  m.conv.weight, m.conv.bias, backend=backend)
    return fwd, params


def aw_case(shape, dtype, backend):
    torch.manual_seed(0)
    n, c, h, w = shape
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    wt = (torch.randn(c, c, 3, 3, device="cuda", dtype=dtype) * 0.05).requires_grad_()
    a = torch.rand(n, c, 1, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    params = [x, wt, a]

    def fwd():
        if backend == "reference":
            return grouped_conv_trick(x, wt[None] * (1 + a), None, 1, 1, 1, 1)
        if backend == "plain_conv":
            return torch.nn.functional.conv2d(x, wt, None, 1, 1)
        return mk.aw_conv2d(x, wt, a, None, 1, 1, backend=backend)
    return fwd, (params[:2] if backend == "plain_conv" else params)


def brnpa_case(shape, dtype, backend):
    x = torch.randn(shape, device="cuda", dtype=torch.float32).abs_().add_(0.1)
    x = x.to(dtype).requires_grad_()

    def fwd():
        if backend == "reference":
            return reference_brnpa(x, 3)
        return mk.brnpa(x, 3, backend=backend)
    return fwd, [x]


def step_fn(fwd, params):
    out = fwd()
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    dys = [torch.randn_like(o) for o in outs]

    def step():
        ys = fwd()
        ys = list(ys) if isinstance(ys, (tuple, list)) else [ys]
        return torch.autograd.grad(ys, params, dys)
    return step


def profile(name, step, iters=10, top=12, log=print):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / iters * 1e3
    # host-only time: steps launched back to back without waiting for the GPU
    # are bounded by the slower of host and device; with the profiler we get
    # the device side.
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof
    with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    dev_total = sum(e.self_device_time_total for e in events) / iters / 1e3
    launches = sum(e.count for e in events) / iters
    log(f"\n### {name}: wall {wall:.3f} ms/step, GPU kernels {dev_total:.3f} ms/step, "
        f"{launches:.0f} kernels/step")
    events.sort(key=lambda e: -e.self_device_time_total)
    for e in events[:top]:
        log(f"  {e.self_device_time_total / iters / 1e3:8.3f} ms  x{e.count / iters:4.1f}  "
            f"{e.key[:110]}")
    return wall, dev_total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--only", nargs="*", default=["mixed", "aw", "brnpa"])
    args = ap.parse_args()
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    import datetime

    import triton
    log(f"{torch.cuda.get_device_name(0)} | torch {torch.__version__} | triton "
        f"{triton.__version__} | commit {os.environ.get('MANET_KERNELS_COMMIT', '?')} | "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%M:%SZ}")
    cases = []
    if "mixed" in args.only:
        for shape in [(64, 256, 56, 56), (64, 2048, 7, 7)]:
            for be in ("reference", "cuda", "triton"):
                cases.append((f"mixed {shape} bf16 {be}", mixed_case, shape, be))
    if "aw" in args.only:
        for shape in [(64, 64, 56, 56), (64, 256, 14, 14)]:
            for be in ("plain_conv", "reference", "cuda", "triton"):
                cases.append((f"aw {shape} bf16 {be}", aw_case, shape, be))
    if "brnpa" in args.only:
        for shape in [(64, 2048, 14, 14)]:
            for be in ("reference", "cuda", "triton"):
                cases.append((f"brnpa {shape} bf16 {be}", brnpa_case, shape, be))
    summary = []
    for name, make, shape, be in cases:
        try:
            fwd, params = make(shape, torch.bfloat16, be)
            wall, dev = profile(name, step_fn(fwd, params), log=log)
            summary.append(f"{name:50s} wall {wall:8.3f}  gpu {dev:8.3f}")
        except Exception as e:  # noqa: BLE001
            log(f"### {name}: failed: {type(e).__name__}: {str(e)[:300]}")
        torch.cuda.empty_cache()
    log("\nsummary (ms per fwd+bwd step):")
    for s in summary:
        log(s)
    if args.out:
        with open(os.path.join(args.out, "profile.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
