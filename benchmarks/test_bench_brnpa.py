"""pytest-benchmark entry points for BR-NPA (small shape, every provider available
here). Outside ``tests/``, so the normal test run never collects it:

    pytest benchmarks/test_bench_brnpa.py --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_brnpa as bb  # noqa: E402
import utils as bu  # noqa: E402

SHAPE = (2, 64, 14, 14)


def _device(provider: str) -> torch.device:
    return torch.device("cuda" if provider in ("cuda", "triton") else "cpu")


@pytest.mark.parametrize("mode", bu.MODES)
@pytest.mark.parametrize("provider", bb.PROVIDERS)
def test_brnpa(benchmark, provider, mode):
    device = _device(provider)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    why = bb.unavailable(provider, device)
    if why:
        pytest.skip(why)
    x = bb.make_input(SHAPE, torch.float32, device)
    fwd = bb.make_forward(provider, bb.N_PARTS, "official",
                          bu.compile_mode_for("auto", device))
    fn = bu.make_mode_fn(lambda: fwd(x), [x], mode)
    fn()  # compile / first-call costs stay out of the rounds
    if device.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()  # time the kernels, not their launch
    else:
        timed = fn
    benchmark.extra_info.update(shape=bu.shape_name(SHAPE), dtype="float32", device=device.type,
                                n_parts=bb.N_PARTS, passes=bb.passes(mode, bb.N_PARTS))
    benchmark(timed)
