"""pytest-benchmark entry points for BR-NPA (small shape, every provider
available here). Outside ``tests/``, so the normal test run never collects it:

    pytest benchmarks/test_bench_brnpa.py --benchmark-columns=median,iqr,rounds
"""

import bench_brnpa as bb
import utils as bu


def case(provider, mode, device, shape, dtype):
    """BR-NPA, the official variant with the bench script's number of parts."""
    x = bb.make_input(shape, dtype, device)
    fwd = bb.make_forward(provider, bb.N_PARTS, "official", bu.compile_mode_for("auto", device))
    info = {"n_parts": bb.N_PARTS, "passes": bb.passes(mode, bb.N_PARTS)}
    return bu.make_mode_fn(lambda: fwd(x), [x], mode), info


test_brnpa = bu.benchmark_test(bb, case)
