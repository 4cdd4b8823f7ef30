"""pytest-benchmark entry points for AW-convolution (small shape, every provider
available here). Outside ``tests/``, so the normal test run never collects it:

    pytest benchmarks/test_bench_aw_conv2d.py --benchmark-columns=median,iqr,rounds
"""

import bench_aw_conv2d as bac
import utils as bu

# A 3x3 "same" convolution, as many output channels as input ones.
CONV = bac.Conv(out_channels=0, kernel=3, stride=1, padding=None, dilation=1, groups=1,
                bias=False)


def case(provider, mode, device, shape, dtype):
    c = bac.make_case(shape, dtype, device, CONV)
    fwd = bac.make_forward(provider, c, bu.compile_mode_for("auto", device))
    info = {"params": CONV.params(shape[1]), "gflop": c.flops * bac.WORK[mode] / 1e9}
    return bu.make_mode_fn(fwd, c.inputs(provider), mode), info


test_aw_conv2d = bu.benchmark_test(bac, case)
