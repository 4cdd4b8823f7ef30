"""pytest-benchmark entry points for mixed attention (small shape, every provider
available here). Outside ``tests/``, so the normal test run never collects it:

    pytest benchmarks/test_bench_mixed_attention.py --benchmark-columns=median,iqr,rounds
"""

import bench_mixed_attention as bma
import utils as bu


def case(provider, mode, device, shape, dtype):
    """Mixed attention with the bench script's module (reduction 16, 7x7 kernel)."""
    c = bma.make_case(shape, dtype, device)
    fwd = bma.make_forward(provider, c.module, bu.compile_mode_for("auto", device))
    return bu.make_mode_fn(lambda: fwd(c.x), c.inputs, mode), {"passes": bma.PASSES[mode]}


test_mixed_attention = bu.benchmark_test(bma, case)
