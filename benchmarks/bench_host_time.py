"""Host time per forward+backward at tiny shapes: the fused ops against the eager
reference, side by side in one run (issue 16's target: <= 0.3x the reference).

    python benchmarks/bench_host_time.py              # CPU backend, 1 thread
    python benchmarks/bench_host_time.py --device cuda --backend triton

At these shapes the kernels' work is negligible, so the time is what the host spends
dispatching: Python, the dispatcher, one call per op. On CPU the step runs with one
intra-op thread. On a GPU each step is launched without waiting and the device is
synchronised once per round, so a round's time is the host's unless the GPU is slower.
Fused and reference steps alternate round by round (a slow spell hits both); each
number is the median over rounds. Rows go to benchmarks/results/host_time.csv unless
--quick or --no-save.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils as bu  # noqa: E402  (it puts an uninstalled checkout on the path)

import manet_kernels as mk  # noqa: E402
from manet_kernels import nn as mknn  # noqa: E402
from manet_kernels import reference  # noqa: E402

OP = "host_time"
COLUMNS = ("op", "case", "shape", "provider", "backend", "ms", "us_per_step",
           "ratio_vs_ref") + bu.META_COLUMNS
TARGET_RATIO = 0.3


def _step(forward, inputs):
    """forward+backward to ``inputs`` with fixed upstream gradients (made once)."""
    with torch.no_grad():
        outs = forward()
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        grads = [torch.randn_like(o) for o in outs]

    def step():
        out = forward()
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        return torch.autograd.grad(out, inputs, grads)
    return step


def _mixed(spatial_norm: bool, backend: str | None, device):
    torch.manual_seed(0)
    cls = reference.MixedAttention if backend is None else mknn.MixedAttention
    kw = {} if backend is None else {"backend": backend}
    m = cls(32, spatial_norm=spatial_norm, **kw).to(device).train()
    x = torch.randn(2, 32, 8, 8, device=device, requires_grad=True)
    return _step(lambda: m(x), [x, *m.parameters()])


def _brnpa(backend: str | None, device):
    torch.manual_seed(0)
    x = (torch.randn(2, 64, 8, 8, device=device).abs() + 0.1).requires_grad_()
    if backend is None:
        return _step(lambda: reference.brnpa.brnpa(x, 3), [x])
    return _step(lambda: mk.brnpa(x, 3, backend=backend), [x])


CASES = {
    "mixed_attention": ((2, 32, 8, 8), lambda b, d: _mixed(False, b, d)),
    "mixed_attention_bn_train": ((2, 32, 8, 8), lambda b, d: _mixed(True, b, d)),
    "brnpa_3_parts": ((2, 64, 8, 8), _brnpa),
}


def _round_us(step, device, calls: int) -> float:
    bu.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    bu.synchronize(device)
    return (time.perf_counter() - t0) / calls * 1e6


def measure(fused, ref, device, rounds: int, calls: int) -> tuple[float, float]:
    """Median microseconds per step of ``fused`` and ``ref``, alternating rounds."""
    for _ in range(3):  # first calls: lazy initialisation, caches
        fused()
        ref()
    a, b = [], []
    for _ in range(rounds):
        a.append(_round_us(fused, device, calls))
        b.append(_round_us(ref, device, calls))
    return statistics.median(a), statistics.median(b)


def main(argv=None) -> int:
    ap = bu.make_parser(__doc__)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--backend", default=None,
                    help="fused backend (default: cpu on CPU, cuda on a GPU)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=40, help="steps per round")
    bu.add_output_args(ap, OP, "cases")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    backend = args.backend or ("cpu" if device.type == "cpu" else "cuda")
    if args.quick:
        args.rounds, args.calls = 3, 5
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        rows = _run(device, backend, args)
    finally:
        torch.set_num_threads(threads)
    print(bu.format_table(rows, (("case", "case", ""), ("shape", "shape", ""),
                                 ("provider", "provider", ""), ("us_per_step", "us", ".0f"),
                                 ("ratio_vs_ref", "vs ref", ".2f"))))
    if bu.saves_results(args):
        bu.append_csv(os.path.join(bu.RESULTS_DIR, f"{OP}.csv"), rows, COLUMNS)
    if args.out:
        bu.append_csv(os.path.join(args.out, f"{OP}.csv"), rows, COLUMNS)
    return 0


def _run(device, backend: str, args) -> list[dict]:
    env = bu.environment(device)
    rows = []
    for case, (shape, make) in CASES.items():
        fused_us, ref_us = measure(make(backend, device), make(None, device), device,
                                   args.rounds, args.calls)
        for provider, us in (("fused", fused_us), ("reference", ref_us)):
            rows.append({"op": OP, "case": case, "shape": bu.shape_name(shape),
                         "provider": provider,
                         "backend": backend if provider == "fused" else "eager",
                         "ms": us / 1e3, "us_per_step": us, "ratio_vs_ref": us / ref_us,
                         **env})
    return rows


if __name__ == "__main__":
    sys.exit(main())
