"""The second-generation CUDA kernels of AW-conv (``_aw_conv2d_fwd_v2_kernel`` and
``_aw_conv2d_wgrad_v2_kernel`` in csrc/cuda/aw_conv2d_v2.cuh, reached through
``_aw_conv2d_fwd_v2`` / ``_aw_conv2d_bwd_v2`` behind ``CUDA_AW_V2_VERIFIED``;
docs/design.md §2.4).

CPU: the kernels' index math replayed thread by thread by ``_aw_conv2d_*_v2_emulate`` (the
kernels' own index functions and launch plans, float64) against the pass contract on odd
shapes, and their launch plans at the report's shapes. GPU (skipped without one; run by
benchmarks/run_device.sh's first step): the v2 ops against the verified first-generation
ops and the float64 contract, and the public function with the gate open and closed.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import manet_kernels  # noqa: F401  (loads the extension)
from manet_kernels import _ext
from manet_kernels.reference import passes

# the module (manet_kernels.ops re-exports a function of the same name)
aw_ops = importlib.import_module("manet_kernels.ops.aw_conv2d")
_common = importlib.import_module("manet_kernels.ops._common")

_OPS = torch.ops.manet_kernels
needs_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason="the extension is not built")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_kernel("aw_conv2d_bwd_v2", "cuda")),
    reason="needs a CUDA device and the extension's CUDA kernels")

H100 = dict(sms=132, cc_major=9, smem_optin=227 * 1024)
ELEM = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4, torch.float64: 8}


def _out_hw(hw, k, stride, padding, dilation):
    return tuple((hw[i] + 2 * padding[i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


def _inputs(n, c1, c2, hw, k, stride, padding, dilation, groups, dtype, device="cpu",
            seed=0):
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(n, c1, *hw, generator=gen, dtype=torch.float64)
    w = torch.randn(c2, c1 // groups, *k, generator=gen, dtype=torch.float64)
    s = 0.5 + torch.rand(n, c2, *k, generator=gen, dtype=torch.float64)
    g = torch.randn(n, c2, *_out_hw(hw, k, stride, padding, dilation), generator=gen,
                    dtype=torch.float64)
    cl = torch.channels_last
    return (x.to(device, dtype).contiguous(memory_format=cl), w.to(device, dtype),
            s.to(device, acc), g.to(device, dtype).contiguous(memory_format=cl))


# (N, C1, C2, (H, W), k, stride, padding, dilation, groups): channel counts that 16-byte
# chunks tile (multiples of 8) but not 64-wide tiles; maps smaller than, equal to and
# larger than a K step; strides, dilation, asymmetric padding, groups; sample splits
# that do not divide N (the `sms` column shrinks or grows the split).
EMU_CASES = [
    ((3, 16, 8, (5, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1), 2, 2),
    ((5, 24, 40, (6, 5), (3, 3), (2, 1), (1, 0), (1, 2), 1), 4, 3),
    ((2, 72, 80, (4, 3), (2, 2), (1, 1), (0, 1), (1, 1), 1), 8, 1),
    ((7, 16, 16, (3, 3), (3, 3), (1, 1), (1, 1), (1, 1), 2), 2, 1),
    ((4, 8, 8, (9, 11), (1, 1), (2, 2), (0, 0), (1, 1), 1), 2, 5),
    ((2, 136, 72, (3, 4), (3, 3), (1, 1), (1, 1), (1, 1), 1), 2, 1),
    ((5, 16, 24, (7, 7), (1, 3), (1, 2), (0, 1), (1, 1), 1), 4, 7),
    ((3, 32, 16, (1, 1), (3, 3), (1, 1), (1, 1), (1, 1), 4), 8, 2),
    ((6, 8, 16, (13, 5), (3, 3), (2, 2), (1, 1), (2, 1), 1), 2, 3),
]


@needs_ext
@pytest.mark.parametrize("case,elem_bytes,sms", EMU_CASES,
                         ids=[f"{c[0]}x{c[1]}to{c[2]}-{c[3][0]}x{c[3][1]}-k{c[4][0]}{c[4][1]}"
                              f"-s{c[5][0]}{c[5][1]}-e{e}-sm{m}" for c, e, m in EMU_CASES])
def test_aw_v2_emulated_index_math(case, elem_bytes, sms):
    n, c1, c2, hw, k, stride, padding, dilation, groups = case
    x, w, s, g = _inputs(n, c1, c2, hw, k, stride, padding, dilation, groups, torch.float64)
    conv = [list(stride), list(padding), list(dilation), groups]
    dw, ds, plan = _OPS._aw_conv2d_wgrad_v2_emulate(g, x, w, s, *conv, elem_bytes, sms)
    _, dw_ref, ds_ref = passes.aw_conv2d_bwd(g, x, w, s, *conv)
    blocks, s_n, n_chunk = plan.tolist()[:3]
    assert s_n == -(-n // n_chunk) and blocks % s_n == 0
    torch.testing.assert_close(dw, dw_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ds, ds_ref, rtol=1e-12, atol=1e-12)


# (N, C1, C2, (H, W), k, stride, padding, dilation, groups, bias): several position and
# channel tiles, ragged; taps whose channel blocks end mid-step (C1/g = 8, 24, 72, 136).
FWD_EMU_CASES = [
    (3, 16, 8, (5, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1, True),
    (5, 24, 40, (6, 5), (3, 3), (2, 1), (1, 0), (1, 2), 1, False),
    (2, 72, 80, (4, 3), (2, 2), (1, 1), (0, 1), (1, 1), 1, True),
    (7, 16, 16, (3, 3), (3, 3), (1, 1), (1, 1), (1, 1), 2, True),
    (2, 136, 72, (9, 10), (3, 3), (1, 1), (1, 1), (1, 1), 1, True),
    (3, 32, 32, (1, 1), (3, 3), (1, 1), (1, 1), (1, 1), 4, False),
    (2, 8, 16, (13, 5), (1, 3), (2, 2), (1, 1), (2, 1), 1, True),
    (3, 12, 20, (5, 6), (3, 3), (2, 1), (1, 1), (1, 1), 1, True),  # fp32 only
]


def _with_elems(cases):
    """(case, element size) for the fp16/bf16 (2) and fp32 (4) tiles whose 16-byte chunks
    tile the case's channel counts per group."""
    return [pytest.param(c, e, id=f"{c[0]}x{c[1]}to{c[2]}-{c[3][0]}x{c[3][1]}-k{c[4][0]}"
                         f"{c[4][1]}-g{c[8]}-e{e}")
            for c in cases for e in (2, 4)
            if (c[1] // c[8]) % (16 // e) == 0 and (c[2] // c[8]) % (16 // e) == 0]


@needs_ext
@pytest.mark.parametrize("case,elem_bytes", _with_elems(FWD_EMU_CASES))
def test_aw_v2_emulated_forward_index_math(case, elem_bytes):
    n, c1, c2, hw, k, stride, padding, dilation, groups, has_bias = case
    x, w, s, _ = _inputs(n, c1, c2, hw, k, stride, padding, dilation, groups, torch.float64)
    b = torch.randn(n, c2, dtype=torch.float64) if has_bias else None
    conv = [list(stride), list(padding), list(dilation), groups]
    y, plan = _OPS._aw_conv2d_fwd_v2_emulate(x, w, s, b, *conv, elem_bytes)
    assert plan.tolist()[1] == -(-(c1 // groups) // (64 // elem_bytes))  # K steps per tap
    torch.testing.assert_close(y, passes.aw_conv2d_fwd(x, w, s, b, *conv), rtol=1e-12,
                               atol=1e-12)


DX_EMU_CASES = [c[:9] for c in FWD_EMU_CASES if c[5] == (1, 1)] + [
    (2, 8, 16, (13, 5), (1, 3), (1, 1), (2, 1), (2, 1), 1),
    (2, 24, 8, (6, 9), (3, 3), (1, 1), (0, 2), (1, 1), 1),
    (3, 12, 20, (5, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1),  # fp32 only: 4-channel chunks
]


@needs_ext
@pytest.mark.parametrize("case,elem_bytes", _with_elems(DX_EMU_CASES))
def test_aw_v2_emulated_dx_index_math(case, elem_bytes):
    n, c1, c2, hw, k, stride, padding, dilation, groups = case
    x, w, s, g = _inputs(n, c1, c2, hw, k, stride, padding, dilation, groups, torch.float64)
    conv = [list(stride), list(padding), list(dilation), groups]
    dx, _ = _OPS._aw_conv2d_dx_v2_emulate(g, w, s, list(hw), *conv, elem_bytes)
    torch.testing.assert_close(dx, passes.aw_conv2d_bwd(g, x, w, s, *conv)[0], rtol=1e-12,
                               atol=1e-12)


# ResNet-50's 3x3 stages at batch 64 (the kernel report's shapes): (N, C, H, W) -> C.
STAGES = [(64, 64, 56, 56), (64, 128, 28, 28), (64, 256, 14, 14), (64, 512, 7, 7)]


def _plan(op, shape, dtype, channels_last, c2, k=3):
    names, nums = _OPS._cuda_launch_plan(op, list(shape), dtype, channels_last,
                                         [c2, k, k, 1, 1, k // 2, k // 2, 1, 1, 1],
                                         H100["sms"], H100["cc_major"], H100["smem_optin"],
                                         [], [])
    return [(name, nums[6 * i], nums[6 * i + 4]) for i, name in enumerate(names)]


@needs_ext
@pytest.mark.parametrize("dtype", list(ELEM), ids=str)
@pytest.mark.parametrize("shape", STAGES, ids=lambda s: "x".join(map(str, s)))
def test_aw_v2_plan_fills_two_waves(shape, dtype):
    """Two CTAs per SM fit (shared memory; registers are the kernel report's) and the
    grid is at least two waves of them on an H100."""
    launches = _plan("aw_conv2d_bwd_v2", shape, dtype, True, shape[1])
    v2 = [la for la in launches if la[0].startswith("_aw_conv2d_wgrad_v2_kernel")]
    assert len(v2) == 1, launches
    dx = "_aw_conv2d_dx_v2_kernel" if ELEM[dtype] <= 4 else "_aw_conv2d_dx_kernel"
    assert launches[0][0].startswith(dx + "<") and len(launches) == 2, launches
    _, blocks, smem = v2[0]
    assert 2 * (smem + 1024) <= 228 * 1024  # an H100 SM's shared memory, 1 KB per CTA reserved
    assert blocks >= 2 * 2 * H100["sms"]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", STAGES, ids=lambda s: "x".join(map(str, s)))
def test_aw_v2_plan_forward(shape, dtype):
    launches = _plan("aw_conv2d_fwd_v2", shape, dtype, True, shape[1])
    assert [la[0].split("<")[0] for la in launches] == ["_aw_conv2d_fwd_v2_kernel"]
    assert 2 * (launches[0][2] + 1024) <= 228 * 1024


@needs_ext
@pytest.mark.parametrize("channels_last,c1,dtype", [(False, 64, torch.bfloat16),
                                                    (True, 3, torch.bfloat16),
                                                    (True, 12, torch.bfloat16),
                                                    (True, 64, torch.float64)])
def test_aw_v2_plan_falls_back(channels_last, c1, dtype):
    """NCHW, or channel counts that 16-byte chunks do not tile, keep the first kernels
    (and fp64 the first forward and dx)."""
    fwd = [la[0] for la in _plan("aw_conv2d_fwd_v2", (4, c1, 14, 14), dtype, channels_last, 16)]
    assert fwd and all(name.startswith("_aw_conv2d_fwd_kernel") for name in fwd)
    if dtype == torch.float64:
        return
    names = [la[0] for la in _plan("aw_conv2d_bwd_v2", (4, c1, 14, 14), dtype, channels_last, 16)]
    assert not any("_v2_kernel" in name for name in names)
    assert any(name.startswith("_aw_conv2d_wgrad_kernel") for name in names)


def test_aw_v2_gate_is_closed_by_default():
    assert _common.CUDA_AW_V2_VERIFIED is False
    with _common.unverified_stages():
        assert _common.CUDA_AW_V2_VERIFIED is True
    assert _common.CUDA_AW_V2_VERIFIED is False


# --------------------------------------------------------------------------- GPU

# Channel counts per group that 16-byte chunks tile (every v2 kernel takes them; stride
# > 1 keeps the first dx kernel).
GPU_CASES = [
    (2, 64, 64, (56, 56), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (4, 128, 128, (28, 28), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 512, 512, (7, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (5, 72, 80, (13, 11), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (3, 16, 32, (9, 7), (3, 3), (2, 1), (1, 0), (1, 2), 2),
    (3, 64, 128, (14, 14), (1, 1), (2, 2), (0, 0), (1, 1), 1),
]
# v2 against the verified first kernels: the same products, summed in another order.
V2_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, [e.name for e in prof.events()]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32,
                                   torch.float64], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}x{c[1]}to{c[2]}-{c[3][0]}")
def test_aw_v2_cuda_matches_verified(case, dtype):
    """v2's (dx, dweight, dscale) against the verified first-generation op, and the v2
    kernels did run (dx: fp16/bf16 at stride 1)."""
    n, c1, c2, hw, k, stride, padding, dilation, groups = case
    x, w, s, g = _inputs(n, c1, c2, hw, k, stride, padding, dilation, groups, dtype, "cuda")
    conv = [list(stride), list(padding), list(dilation), groups]
    new, names = _kernel_names(lambda: _OPS._aw_conv2d_bwd_v2(g, x, w, s, *conv))
    assert any("wgrad_v2" in name for name in names), names
    dx_v2 = ELEM[dtype] <= 4 and stride == (1, 1)
    assert any("dx_v2" in name for name in names) == dx_v2, names
    assert new[0].is_contiguous(memory_format=torch.channels_last)
    old = _OPS._aw_conv2d_bwd(g, x, w, s, *conv)
    for name, a, b in zip(("dx", "dweight", "dscale"), new, old):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _rel(a, b) <= V2_TOL[dtype], (name, _rel(a, b))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}x{c[1]}to{c[2]}-{c[3][0]}")
def test_aw_v2_cuda_forward_matches_verified(case, dtype):
    n, c1, c2, hw, k, stride, padding, dilation, groups = case
    x, w, s, _ = _inputs(n, c1, c2, hw, k, stride, padding, dilation, groups, dtype, "cuda")
    b = torch.randn(n, c2, device="cuda")
    conv = [list(stride), list(padding), list(dilation), groups]
    new, names = _kernel_names(lambda: _OPS._aw_conv2d_fwd_v2(x, w, s, b, *conv))
    assert any("fwd_v2" in name for name in names), names
    assert new.is_contiguous(memory_format=torch.channels_last)
    assert _rel(new, _OPS._aw_conv2d_fwd(x, w, s, b, *conv)) <= V2_TOL[dtype]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_aw_v2_cuda_matches_contract(dtype):
    """Small ragged case against the float64 contract on the same (rounded) inputs: no
    worse than twice the verified op's error."""
    case = (3, 24, 40, (9, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1)
    x, w, s, g = _inputs(*case, dtype, "cuda")
    b = torch.randn(3, 40, device="cuda", dtype=s.dtype)
    conv = [[1, 1], [1, 1], [1, 1], 1]
    ref = passes.aw_conv2d_bwd(*(t.double().cpu() for t in (g, x, w, s)), *conv)
    ref_y = passes.aw_conv2d_fwd(*(t.double().cpu() for t in (x, w, s, b)), *conv)
    new = (_OPS._aw_conv2d_fwd_v2(x, w, s, b, *conv), *_OPS._aw_conv2d_bwd_v2(g, x, w, s, *conv))
    old = (_OPS._aw_conv2d_fwd(x, w, s, b, *conv), *_OPS._aw_conv2d_bwd(g, x, w, s, *conv))
    floor = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-3)
    for name, a, o, r in zip(("y", "dx", "dweight", "dscale"), new, old, (ref_y, *ref)):
        assert _rel(a.cpu(), r) <= 2 * _rel(o.cpu(), r) + floor, name


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_aw_v2_cuda_public_gate(dtype):
    """aw_conv2d(backend="cuda"): the first kernels while the gate is closed, v2 within
    unverified_stages(); both match the reference's gradients."""
    x, w, s, g = _inputs(4, 64, 64, (14, 14), (3, 3), (1, 1), (1, 1), (1, 1), 1, dtype, "cuda")
    attn = (s - 1).to(dtype)[:, :, None]

    def grads(backend):
        xs, ws, a = (t.detach().clone().requires_grad_() for t in (x, w, attn))
        y = manet_kernels.aw_conv2d(xs, ws, a, padding=1, backend=backend)
        y.backward(g)
        return xs.grad, ws.grad, a.grad

    closed, names_closed = _kernel_names(lambda: grads("cuda"))
    with _common.unverified_stages():
        opened, names_open = _kernel_names(lambda: grads("cuda"))
    assert not any("_v2_kernel" in name for name in names_closed)
    assert any("wgrad_v2" in name for name in names_open)
    assert any("fwd_v2" in name for name in names_open)
    assert any("dx_v2" in name for name in names_open)
    for a, b in zip(opened, closed):
        assert _rel(a, b) <= (1e-2 if dtype == torch.bfloat16 else 1e-5)
