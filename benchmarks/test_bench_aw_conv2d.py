"""pytest-benchmark entry points for AW-convolution (small shape, every provider
available here). Outside ``tests/``, so the normal test run never collects it:

    pytest benchmarks/test_bench_aw_conv2d.py --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_aw_conv2d as bac  # noqa: E402
import utils as bu  # noqa: E402

SHAPE = (2, 32, 14, 14)
CONV = bac.Conv(out_channels=0, kernel=3, stride=1, padding=None, dilation=1, groups=1,
                bias=False)


def _device(provider: str) -> torch.device:
    return torch.device("cuda" if provider in ("cuda", "triton") else "cpu")


@pytest.mark.parametrize("mode", bu.MODES)
@pytest.mark.parametrize("provider", bac.PROVIDERS)
def test_aw_conv2d(benchmark, provider, mode):
    device = _device(provider)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    why = bac.unavailable(provider, device)
    if why:
        pytest.skip(why)
    case = bac.make_case(SHAPE, torch.float32, device, CONV)
    fwd = bac.make_forward(provider, case, bu.compile_mode_for("auto", device))
    fn = bu.make_mode_fn(fwd, case.inputs(provider), mode)
    fn()  # compile / first-call costs stay out of the rounds
    if device.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()  # time the kernels, not their launch
    else:
        timed = fn
    benchmark.extra_info.update(shape=bu.shape_name(SHAPE), dtype="float32", device=device.type,
                                params=CONV.params(SHAPE[1]),
                                gflop=case.flops * bac.WORK[mode] / 1e9)
    benchmark(timed)
