"""pytest-benchmark entry points for mixed attention (small shape, every provider
available here). Outside ``tests/``, so the normal test run never collects it:

    pytest benchmarks/test_bench_mixed_attention.py --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_mixed_attention as bma  # noqa: E402
import utils as bu  # noqa: E402

SHAPE = (2, 64, 14, 14)


def _device(provider: str) -> torch.device:
    if provider in ("cuda", "triton"):
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.mark.parametrize("mode", bu.MODES)
@pytest.mark.parametrize("provider", bma.PROVIDERS)
def test_mixed_attention(benchmark, provider, mode):
    device = _device(provider)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    why = bma.unavailable(provider, device)
    if why:
        pytest.skip(why)
    case = bma.make_case(SHAPE, torch.float32, device)
    fwd = bma.make_forward(provider, case.module, bma.default_compile_mode(device))
    fn = bu.make_mode_fn(lambda: fwd(case.x), case.inputs, mode)
    fn()  # compile / first-call costs stay out of the rounds
    if device.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()  # time the kernels, not their launch
    else:
        timed = fn
    benchmark.extra_info.update(shape=bu.shape_name(SHAPE), dtype="float32", device=device.type,
                                passes=bma.PASSES[mode])
    benchmark(timed)
