"""Comparison helpers shared by the op tests."""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
# Absolute (scaled by the largest reference value) and relative tolerances for
# same-dtype comparisons.
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 2e-4)}
LAYOUTS = ("contiguous", "channels_last", "strided")


def make_x(shape, dtype, device, layout, positive=False):
    """Random ``x`` of ``shape`` in ``layout``; "strided" is a non-contiguous view.
    ``positive``: post-ReLU-like features kept away from zero vectors (whose norm
    gradients are ~1e5 and overflow half precision)."""
    n, c, h, w = shape
    if layout == "strided":
        x = torch.randn(n, c, h, 2 * w, dtype=torch.float64, device=device)[..., ::2]
    else:
        x = torch.randn(shape, dtype=torch.float64, device=device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    if positive:
        x = x.abs() + 0.1
    return x.to(dtype)


def assert_matches(out, ref_hi, ref_lowp, dtype):
    """fp32/fp64: the same-dtype tolerance table. fp16/bf16: the error against a
    high-precision reference is at most twice the reference's own error in that
    dtype, plus one ulp of the largest value."""
    for k in ref_hi:
        o, r = out[k].double(), ref_hi[k].double()
        assert o.shape == r.shape, k
        if dtype in LOW_PRECISION:
            base = (ref_lowp[k].double() - r).abs().max().item()
            floor = torch.finfo(dtype).eps * max(1.0, r.abs().max().item())
            err = (o - r).abs().max().item()
            assert err <= 2 * base + floor, f"{k}: error {err:.3g}, reference's own {base:.3g}"
        else:
            atol, rtol = TOL[dtype]
            scale = max(1.0, r.abs().max().item())
            torch.testing.assert_close(o, r, atol=atol * scale, rtol=rtol,
                                       msg=lambda m, k=k: f"{k}: {m}")


CPU_ISAS = ("generic", "avx2", "avx512")


def use_cpu_isa(isa, monkeypatch):
    """Select the C++ CPU kernels' instruction-set copy (``MANET_KERNELS_CPU_ISA``),
    skipping the test where this CPU cannot run it."""
    import pytest

    monkeypatch.setenv("MANET_KERNELS_CPU_ISA", isa)
    x = torch.ones(1, 2, 1, 1)
    try:
        torch.ops.manet_kernels.mixed_attention_channel_pool(x)
    except RuntimeError as e:
        if "not supported by this CPU" in str(e):
            pytest.skip(f"{isa}: {e}")
        raise
