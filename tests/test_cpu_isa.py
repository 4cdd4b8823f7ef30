"""The per-instruction-set copies of the C++ CPU kernels (csrc/cpu/cpu_isa.h).

The mixed-attention passes are compiled three times (baseline, AVX2 + FMA, AVX-512)
with FMA contraction off, so every copy must give bit-identical outputs and
gradients; ``MANET_KERNELS_CPU_ISA`` selects one per call. Copies this CPU cannot
run are skipped (asking for them must raise a clear error instead).
"""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_ISAS, use_cpu_isa

import manet_kernels
from manet_kernels import _ext

if not _ext.HAS_EXT:
    pytest.skip(f"C++ extension not built: {_ext.EXT_ERROR}", allow_module_level=True)

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Odd sizes, H*W = 1, and shapes split into several blocks per sample.
SHAPES = ((1, 1, 1, 1), (2, 7, 5, 3), (3, 37, 9, 11), (1, 130, 17, 19), (2, 64, 32, 32))


def _case(shape, dtype, channels_last, nonfinite=False):
    gen = torch.Generator().manual_seed(sum(shape))
    n, c, h, w = shape
    cr = max(1, c // 4)

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(dtype)

    x = rnd(n, c, h, w)
    if nonfinite:
        x.view(-1)[:: 7] = float("nan")
        x.view(-1)[3:: 11] = float("inf")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    params = [rnd(cr, c), rnd(cr), rnd(c, cr), rnd(c), rnd(1, 2, 7, 7), rnd(1)]
    gy = rnd(n, c, h, w)
    return x, params, gy


def _run(isa, monkeypatch, x, params, gy):
    monkeypatch.setenv("MANET_KERNELS_CPU_ISA", isa)
    x = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in params]
    y, mc, ms = manet_kernels.mixed_attention(x, *params, backend="cpu", return_maps=True)
    grads = torch.autograd.grad(y, [x, *params], gy)
    return [y, mc, ms, *grads]


@pytest.mark.parametrize("isa", CPU_ISAS[1:])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_mixed_attention_copies_bit_identical(isa, dtype, channels_last, monkeypatch):
    use_cpu_isa(isa, monkeypatch)
    for shape in SHAPES:
        case = _case(shape, dtype, channels_last)
        want = _run("generic", monkeypatch, *case)
        got = _run(isa, monkeypatch, *case)
        names = ("y", "mc", "ms", "dx", "dw1", "db1", "dw2", "db2", "dconv_w", "dconv_b")
        for name, a, b in zip(names, want, got):
            assert a.dtype == b.dtype and a.shape == b.shape, (shape, name)
            assert torch.equal(a, b), f"{isa} {shape} {name}: max |diff| {(a - b).abs().max()}"


@pytest.mark.parametrize("isa", CPU_ISAS[1:])
def test_mixed_attention_copies_agree_on_nonfinite(isa, monkeypatch):
    use_cpu_isa(isa, monkeypatch)
    case = _case((2, 37, 9, 11), torch.float32, False, nonfinite=True)
    want = _run("generic", monkeypatch, *case)
    got = _run(isa, monkeypatch, *case)
    for a, b in zip(want, got):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_every_copy_matches_the_reference(monkeypatch):
    """The default choice (auto) and the baseline both agree with the reference."""
    from manet_kernels.reference.mixed_attention import mixed_attention as ref_op

    x, params, gy = _case((3, 37, 9, 11), torch.float64, False)
    xr = x.clone().requires_grad_()
    pr = [p.clone().requires_grad_() for p in params]
    yr = ref_op(xr, *pr)
    want = [yr, *torch.autograd.grad(yr, [xr, *pr], gy)]
    for isa in ("auto", "generic"):
        got = _run(isa, monkeypatch, x, params, gy)
        got = [got[0], *got[3:]]
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("value", ("bogus", "AVX2", "sse"))
def test_bad_isa_value_names_the_variable(value, monkeypatch):
    monkeypatch.setenv("MANET_KERNELS_CPU_ISA", value)
    x = torch.ones(1, 2, 1, 1)
    with pytest.raises(RuntimeError, match="MANET_KERNELS_CPU_ISA: expected auto, generic"):
        manet_kernels.mixed_attention(x, torch.ones(1, 2), None, torch.ones(2, 1), None,
                                      torch.ones(1, 2, 3, 3), backend="cpu")
