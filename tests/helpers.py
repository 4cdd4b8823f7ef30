"""Comparison helpers shared by the op tests."""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
# Absolute (scaled by the largest reference value) and relative tolerances for
# same-dtype comparisons.
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 2e-4)}
# "strided_copied": a non-contiguous view, which the ops copy to NCHW before any kernel
# runs, so such a case tests that copy, not a kernel's own layout path.
STRIDED_COPIED = "strided_copied"
OP_LAYOUTS = ("contiguous", "channels_last", STRIDED_COPIED)
# The BR-NPA tests' older name for the same cases ("strided").
LAYOUTS = ("contiguous", "channels_last", "strided")


def layouts_differ(shape) -> bool:
    """Whether NCHW and channels_last strides differ for ``shape`` (N, C, H, W): with
    C = 1 or H = W = 1 a channels_last tensor is also NCHW-contiguous and the ops run
    their NCHW path (``ops._common.activation_format``)."""
    return shape[1] > 1 and shape[2] * shape[3] > 1


def make_x(shape, dtype, device, layout, positive=False):
    """Random ``x`` of ``shape`` in ``layout`` (one of ``OP_LAYOUTS``, or "strided", the
    BR-NPA tests' name for "strided_copied"). ``positive``: post-ReLU-like features kept
    away from zero vectors (whose norm gradients are ~1e5 and overflow half precision)."""
    n, c, h, w = shape
    if layout in (STRIDED_COPIED, "strided"):
        x = torch.randn(n, c, h, 2 * w, dtype=torch.float64, device=device)[..., ::2]
    else:
        x = torch.randn(shape, dtype=torch.float64, device=device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    if positive:
        x = x.abs() + 0.1
    return x.to(dtype)


def assert_matches(out, ref_hi, ref_lowp, dtype):
    """fp32/fp64: the same-dtype tolerance table. fp16/bf16: see ``assert_low_precision``."""
    for k in ref_hi:
        o, r = out[k].double(), ref_hi[k].double()
        assert o.shape == r.shape, k
        if dtype in LOW_PRECISION:
            assert_low_precision(k, o, r, ref_lowp[k].double(), dtype)
        else:
            atol, rtol = TOL[dtype]
            scale = max(1.0, r.abs().max().item())
            torch.testing.assert_close(o, r, atol=atol * scale, rtol=rtol,
                                       msg=lambda m, k=k: f"{k}: {m}")


# How many ulps (see ``assert_low_precision``) an element may be off where the
# low-precision reference is within one: a correct kernel's error there comes from
# rounding its inputs (x, the upstream gradient) and its result to the dtype; the worst
# over the CPU and Triton-interpreter cases of the mixed-attention and BR-NPA tests
# was 1.84 (bf16 grad_x), a swap of the avg / max gradient rows over 300.
ELEMENT_ULPS = 4


def assert_low_precision(name, out, ref_hi, ref_lowp, dtype):
    """``out`` (computed in ``dtype``) against a float64 ``ref_hi``, two bounds.

    1. The worst error is at most twice the low-precision reference's own worst error
       plus one ulp of the largest value.
    2. Per element, where that reference is within ``ulp = eps * (|ref| + rms(ref))``
       (one ulp of the element plus one of the tensor's typical size, for elements
       that cancel), ``out`` is within ``ELEMENT_ULPS`` of them. Bound 1 alone is set
       by the reference's few worst elements (a max tie that rounding breaks the other
       way sends a gradient elsewhere): a bug that moves many elements by less, e.g.
       swapped avg / max rows of a gradient, hid under it.
    """
    if not ref_hi.numel():
        return
    eps = torch.finfo(dtype).eps
    base = (ref_lowp - ref_hi).abs().max().item()
    floor = eps * max(1.0, ref_hi.abs().max().item())
    err = (out - ref_hi).abs().max().item()
    assert err <= 2 * base + floor, f"{name}: error {err:.3g}, reference's own {base:.3g}"
    ulp = eps * (ref_hi.abs() + ref_hi.square().mean().sqrt())
    trusted = (ref_lowp - ref_hi).abs() <= ulp
    bad = trusted & ((out - ref_hi).abs() > ELEMENT_ULPS * ulp)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        e = (out - ref_hi).abs()[tuple(i)].item()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {int(trusted.sum())} elements where the "
            f"{dtype} reference is within one ulp are off by more than {ELEMENT_ULPS} ulps, "
            f"e.g. {i}: error {e:.3g}, ulp {ulp[tuple(i)].item():.3g}")


CPU_ISAS = ("generic", "avx2", "avx512")


def use_cpu_isa(isa, monkeypatch):
    """Select the C++ CPU kernels' instruction-set copy (``MANET_KERNELS_CPU_ISA``),
    skipping the test where this CPU cannot run it."""
    import pytest

    monkeypatch.setenv("MANET_KERNELS_CPU_ISA", isa)
    x = torch.ones(1, 2, 1, 1)
    try:
        torch.ops.manet_kernels._mixed_attention_channel_pool(x)
    except RuntimeError as e:
        if "not supported by this CPU" in str(e):
            pytest.skip(f"{isa}: {e}")
        raise


def gpu_backend_test(test):
    """Decorates a test of each fused GPU backend: it needs a GPU, is marked ``gpu``, is
    parametrised over ``backend`` (the outermost parameter) and skips a backend that this
    build lacks."""
    import functools

    import pytest
    from conftest import backends_for, requires_gpu

    @functools.wraps(test)  # pytest reads the test's own parameters through __wrapped__
    def run(backend, **params):
        if backend not in backends_for("cuda"):
            pytest.skip(f"backend {backend} not available")
        return test(backend, **params)
    run = pytest.mark.parametrize("backend", ["cuda", "triton"])(run)
    return requires_gpu(pytest.mark.gpu(run))
