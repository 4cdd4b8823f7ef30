"""Fused mixed attention against the reference module: outputs, maps and every gradient."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_GPU, backends_for, requires_ext, requires_gpu
from helpers import (
    LOW_PRECISION,
    OP_LAYOUTS,
    STRIDED_COPIED,
    assert_matches,
    gpu_backend_test,
    layouts_differ,
    make_x,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import manet_kernels as mk
from manet_kernels import _ext, reference
from manet_kernels import nn as mknn
from manet_kernels.ops._common import triton_available, triton_interpreted

TRITON_INTERPRETED = triton_available() and triton_interpreted()

# The fp32 references' convolutions and matmuls in IEEE fp32 on a GPU (conftest.no_tf32).
pytestmark = pytest.mark.usefixtures("no_tf32")


def make_pair(channels, dtype, device, backend, *, reduction=4, kernel_size=7, mlp_bias=True,
              pool_order="avg_max", spatial_norm=False, train=True):
    """A reference and a fused module holding the same (random) weights."""
    ref = reference.MixedAttention(channels, reduction, kernel_size, mlp_bias, pool_order,
                                   spatial_norm)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-1, 1)  # larger than the default init, so every term matters
        if spatial_norm:
            ref.bn.running_mean.fill_(0.3)
            ref.bn.running_var.fill_(1.7)
    fused = mknn.MixedAttention(channels, reduction, kernel_size, mlp_bias, pool_order,
                                spatial_norm, backend=backend)
    fused.load_state_dict(ref.state_dict())
    ref.train(train)
    fused.train(train)
    return ref.to(device, dtype), fused.to(device, dtype)


def run(module, x, upstream):
    """Output, maps and gradients of x and every parameter under a loss using all outputs."""
    x = x.detach().requires_grad_()
    y, mc, ms = module(x, return_maps=True)
    gy, gmc, gms = upstream
    loss = (y.double() * gy).sum() + (mc.double() * gmc).sum() + (ms.double() * gms).sum()
    grads = torch.autograd.grad(loss, [x] + list(module.parameters()))
    names = ["x"] + [n.removeprefix("_orig_mod.") for n, _ in module.named_parameters()]
    return {"y": y, "mc": mc, "ms": ms, **{f"grad_{n}": g for n, g in zip(names, grads)}}


def upstream_for(shape, device):
    n, c, h, w = shape
    return (torch.randn(shape, dtype=torch.float64, device=device),
            torch.randn(n, c, dtype=torch.float64, device=device),
            torch.randn(n, 1, h, w, dtype=torch.float64, device=device))


def check_against_reference(backend, device, dtype, layout, shape, x=None, **opts):
    """``x``: the input (else a random one of ``shape`` in ``layout``)."""
    ref, fused = make_pair(shape[1], dtype, device, backend, **opts)
    x = make_x(shape, dtype, device, layout) if x is None else x
    up = upstream_for(shape, device)
    out = run(fused, x, up)
    # fp32 and fp64 compare with the reference in the same dtype; low precision with
    # an fp64 reference, and the reference's own error in that dtype sets the bar.
    ref_dtype = torch.float64 if dtype in LOW_PRECISION else dtype
    ref_hi = reference.MixedAttention(shape[1], opts.get("reduction", 4),
                                      opts.get("kernel_size", 7), opts.get("mlp_bias", True),
                                      opts.get("pool_order", "avg_max"),
                                      opts.get("spatial_norm", False))
    ref_hi.load_state_dict(ref.state_dict())
    ref_hi.train(ref.training).to(device, ref_dtype)
    r = run(ref_hi, x.to(ref_dtype), up)
    r_low = run(ref, x, up) if dtype in LOW_PRECISION else None
    assert out["y"].dtype == dtype and out["grad_x"].dtype == dtype
    if layout == "channels_last":
        assert out["y"].is_contiguous(memory_format=torch.channels_last)
        # only where the layouts differ did the kernels run their channels_last path
        assert out["y"].is_contiguous() == (not layouts_differ(shape))
    assert_matches(out, r, r_low, dtype)
    if opts.get("spatial_norm") and opts.get("train", True):
        torch.testing.assert_close(fused.bn.running_mean, ref_hi.bn.running_mean.to(dtype))
        torch.testing.assert_close(fused.bn.running_var, ref_hi.bn.running_var.to(dtype))
        assert int(fused.bn.num_batches_tracked) == 1


CPU_SHAPES = [(1, 1, 1, 1), (2, 3, 1, 7), (3, 7, 5, 3), (2, 64, 7, 7), (1, 33, 13, 11)]
CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@requires_ext
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
@pytest.mark.parametrize("layout", OP_LAYOUTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_cpu_matches_reference(shape, layout, dtype):
    check_against_reference("cpu", "cpu", dtype, layout, shape)


FLAVOURS = [
    dict(pool_order="max_avg", spatial_norm=True, train=True),   # CBAM's official flavour
    dict(pool_order="max_avg", spatial_norm=True, train=False),
    dict(pool_order="avg_max", spatial_norm=False, mlp_bias=False, kernel_size=3),
    dict(spatial_norm=True, kernel_size=1, reduction=16, train=True),
]


@requires_ext
@pytest.mark.parametrize("opts", FLAVOURS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_module_flavours(opts, dtype):
    check_against_reference("cpu", "cpu", dtype, "channels_last", (3, 20, 9, 6), **opts)


TRITON_SHAPES = [(1, 1, 1, 1), (2, 3, 3, 5), (2, 9, 4, 4)]


@pytest.mark.triton
@pytest.mark.skipif("triton" not in backends_for("cpu") or HAS_GPU,
                    reason="Triton interpreter tests run on CPU-only machines")
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_interpreter_matches_reference(shape, layout, dtype):
    check_against_reference("triton", "cpu", dtype, layout, shape)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in backends_for("cpu") or HAS_GPU,
                    reason="Triton interpreter tests run on CPU-only machines")
@pytest.mark.parametrize("opts", FLAVOURS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_triton_interpreter_module_flavours(opts):
    check_against_reference("triton", "cpu", torch.float32, "channels_last", (2, 8, 3, 4), **opts)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in backends_for("cpu") or HAS_GPU,
                    reason="Triton interpreter tests run on CPU-only machines")
def test_triton_interpreter_strided_copied_cbam_flavour():
    check_against_reference("triton", "cpu", torch.float32, STRIDED_COPIED, (2, 6, 3, 4),
                            pool_order="max_avg", spatial_norm=True, train=True)


# --------------------------------------------------------------------------- avg / max routing
# The shared MLP's avg and max rows get different gradients only when avg != max and the
# MLP has several hidden units: with C // reduction = 1 (C < 8) and a bias both rows
# share one hidden unit's gradient up to the ReLU mask, so a swap of the two rows'
# gradients hides. Here 16 // 4 = 4 hidden units, max - avg > 0.5 in every channel.
ROUTING_SHAPE = (2, 16, 5, 6)
# (backend, device); the interpreter runs on CPU-only machines.
ROUTING_BACKENDS = [("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]


def skip_unless_available(backend, device, dtype=None):
    if device == "cuda" and not HAS_GPU:
        pytest.skip("needs a CUDA device")
    if device == "cpu" and backend == "triton" and HAS_GPU:
        pytest.skip("Triton interpreter tests run on CPU-only machines")
    if backend not in backends_for(device):
        pytest.skip(f"backend {backend} not available on {device}")
    if dtype == torch.bfloat16 and backend == "triton" and device == "cpu":
        pytest.skip("bf16 arithmetic is wrong under the Triton interpreter")


def distinct_avg_max(shape, dtype, device):
    """A channels_last x whose max exceeds its mean by at least 1 - 1/P >= 0.5 in every
    (n, c) (before rounding to dtype): one random position of each is raised to max + 1."""
    n, c, h, w = shape
    x = torch.randn(n, c, h * w, dtype=torch.float64, device=device)
    x.scatter_(2, torch.randint(0, h * w, (n, c, 1), device=device), x.amax(2, keepdim=True) + 1)
    x = x.reshape(shape).contiguous(memory_format=torch.channels_last).to(dtype)
    assert (x.double().amax((2, 3)) - x.double().mean((2, 3))).min() > 0.4
    return x


@pytest.mark.parametrize("backend,device", ROUTING_BACKENDS,
                         ids=[f"{b}-{d}" for b, d in ROUTING_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
def test_mlp_routes_avg_and_max_gradients(backend, device, dtype):
    skip_unless_available(backend, device, dtype)
    x = distinct_avg_max(ROUTING_SHAPE, dtype, device)
    check_against_reference(backend, device, dtype, "channels_last", ROUTING_SHAPE, x=x)


GPU_SHAPES = [(1, 1, 1, 1), (3, 7, 5, 3), (2, 64, 7, 7), (3, 257, 13, 11), (2, 256, 56, 56)]


@gpu_backend_test
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("layout", OP_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_matches_reference(backend, shape, layout, dtype):
    check_against_reference(backend, "cuda", dtype, layout, shape)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("opts", FLAVOURS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_gpu_module_flavours(backend, opts):
    if backend not in backends_for("cuda"):
        pytest.skip(f"backend {backend} not available")
    check_against_reference(backend, "cuda", torch.float32, "channels_last", (3, 40, 9, 6), **opts)


@requires_ext
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 4), c=st.integers(1, 40), h=st.integers(1, 12), w=st.integers(1, 12),
       layout=st.sampled_from(OP_LAYOUTS), reduction=st.sampled_from([1, 2, 16]),
       k=st.sampled_from([1, 3, 5, 7]), seed=st.integers(0, 2**31 - 1))
def test_cpu_random_shapes(n, c, h, w, layout, reduction, k, seed):
    torch.manual_seed(seed)
    check_against_reference("cpu", "cpu", torch.float64, layout, (n, c, h, w),
                            reduction=reduction, kernel_size=k)


# --------------------------------------------------------------------------- functional API

def functional_args(shape, dtype=torch.float64, device="cpu", k=7, bias=True):
    n, c, h, w = shape
    cr = max(1, c // 4)
    mk_t = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    return (make_x(shape, dtype, device, "contiguous"), mk_t(cr, c), mk_t(cr) if bias else None,
            mk_t(c, cr), mk_t(c) if bias else None, mk_t(1, 2, k, k), mk_t(1) if bias else None)


@requires_ext
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_cpu(bias):
    args = [a.requires_grad_() if a is not None else None
            for a in functional_args((2, 5, 3, 4), k=3, bias=bias)]
    assert torch.autograd.gradcheck(
        lambda *a: mk.mixed_attention(*a, backend="cpu", return_maps=True), args)


@pytest.mark.parametrize("backend,device", ROUTING_BACKENDS,
                         ids=[f"{b}-{d}" for b, d in ROUTING_BACKENDS])
def test_gradcheck_several_hidden_units(backend, device):
    """fp64, 2 hidden units, distinct avg and max. The interpreter is too slow for the
    full Jacobian (docs/design.md): there fast mode (random projections of it)."""
    skip_unless_available(backend, device)
    shape = (2, 8, 2, 3)
    args = list(functional_args(shape, device=device, k=3))
    args[0] = distinct_avg_max(shape, torch.float64, device)
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(
        lambda *a: mk.mixed_attention(*a, backend=backend, return_maps=True), args,
        fast_mode=backend == "triton" and device == "cpu")


@requires_ext
def test_functional_matches_reference_and_maps():
    args = functional_args((3, 12, 5, 7))
    y, mc, ms = mk.mixed_attention(*args, backend="cpu", return_maps=True)
    yr, mcr, msr = mk.mixed_attention(*args, backend="reference", return_maps=True)
    assert mc.shape == (3, 12) and ms.shape == (3, 1, 5, 7)
    for a, b in ((y, yr), (mc, mcr), (ms, msr)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@requires_ext
def test_autograd_function_dropin():
    args = [a.requires_grad_() for a in functional_args((2, 8, 5, 3))]
    y = mk.MixedAttentionFunction.apply(*args)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, args, g)
    ref_args = [a.detach().requires_grad_() for a in args]
    yr = mk.mixed_attention(*ref_args, backend="reference")
    grads_r = torch.autograd.grad(yr, ref_args, g)
    torch.testing.assert_close(y, yr)
    for a, b in zip(grads, grads_r):
        torch.testing.assert_close(a, b)


@requires_ext
def test_opcheck_cpu():
    x, w1, b1, w2, b2, cw, cb = functional_args((2, 6, 5, 3), dtype=torch.float32, k=3)
    for requires_grad in (False, True):
        tensors = [t.clone().requires_grad_(requires_grad) for t in (x, w1, b1, w2, b2, cw, cb)]
        torch.library.opcheck(
            torch.ops.manet_kernels.mixed_attention.default,
            (*tensors, None, None, None, None, None, False, False, 0.0, None, "cpu"))
    bn = (torch.rand(1) + 0.5, torch.randn(1), torch.zeros(1), torch.ones(1))
    torch.library.opcheck(
        torch.ops.manet_kernels.mixed_attention.default,
        (x.contiguous(memory_format=torch.channels_last), w1, b1, w2, b2, cw, None, *bn,
         None, True, True, 1e-5, 0.1, "cpu"))


@requires_ext
@pytest.mark.parametrize("opts", [{}, dict(pool_order="max_avg", spatial_norm=True),
                                  dict(pool_order="max_avg", spatial_norm=True, train=False)],
                         ids=["plain", "max_avg_bn_train", "max_avg_bn_eval"])
def test_compile_fullgraph_module(opts):
    """Inductor (the default backend), fullgraph: the fused op is one opaque node each way
    and the tiny parts around it (the flipped conv weight, the running-stat update) compile."""
    torch._dynamo.reset()
    ref, fused = make_pair(16, torch.float32, "cpu", "cpu", **opts)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 16, 6, 5)
    up = upstream_for(x.shape, "cpu")
    out = run(compiled, x, up)
    expect = run(ref, x, up)
    for k in expect:
        torch.testing.assert_close(out[k], expect[k], atol=1e-5, rtol=1e-4)
    if opts.get("spatial_norm"):
        torch.testing.assert_close(fused.bn.running_mean, ref.bn.running_mean)
        torch.testing.assert_close(fused.bn.running_var, ref.bn.running_var)


@requires_ext
def test_saves_only_x_and_small_tensors():
    """Memory plan: the backward keeps x itself plus O(N*C + N*H*W) tensors."""
    n, c, h, w = 4, 32, 9, 9
    ref, fused = make_pair(c, torch.float32, "cpu", "cpu", spatial_norm=True)
    x = torch.randn(n, c, h, w, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused(x).sum().backward()
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    n_params = sum(p.numel() for p in fused.parameters()) + 2
    small = sum(t.numel() for t in saved if t.data_ptr() != x.data_ptr())
    assert small <= 4 * n * c + 6 * n * h * w + n_params


# --------------------------------------------------------------------------- edge cases

@requires_ext
def test_empty_batch():
    ref, fused = make_pair(5, torch.float32, "cpu", "cpu", train=False)
    x = torch.randn(0, 5, 4, 3, requires_grad=True)
    y, mc, ms = fused(x, return_maps=True)
    assert y.shape == x.shape and mc.shape == (0, 5) and ms.shape == (0, 1, 4, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape


@requires_ext
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_propagates_like_reference(bad):
    ref, fused = make_pair(6, torch.float32, "cpu", "cpu", train=False)
    x = torch.randn(3, 6, 4, 5)
    x[1, 2, 3, 1] = bad
    y, yr = fused(x), ref(x)
    assert torch.equal(torch.isnan(y), torch.isnan(yr))
    assert torch.equal(torch.isinf(y), torch.isinf(yr))
    finite = torch.isfinite(yr)
    torch.testing.assert_close(y[finite], yr[finite])
    # the other samples are untouched by the bad value
    torch.testing.assert_close(y[0], yr[0])


@requires_ext
def test_max_ties_send_gradient_to_one_element():
    ref, fused = make_pair(3, torch.float64, "cpu", "cpu", train=False)
    x = torch.ones(2, 3, 4, 4, dtype=torch.float64)
    up = upstream_for(x.shape, "cpu")
    out, expect = run(fused, x, up), run(ref, x, up)
    for k in expect:
        torch.testing.assert_close(out[k], expect[k])


def test_bad_inputs_name_the_argument():
    x, w1, b1, w2, b2, cw, cb = functional_args((2, 8, 5, 5), dtype=torch.float32)
    cases = [
        ((x[0], w1, b1, w2, b2, cw, cb), "x must be 4-D"),
        ((x, w1[:, :3], b1, w2, b2, cw, cb), "w1"),
        ((x, w1, b1[:1], w2, b2, cw, cb), "b1"),
        ((x, w1, b1, w2.t(), b2, cw, cb), "w2"),
        ((x, w1, b1, w2, b2[:3], cw, cb), "b2"),
        ((x, w1, b1, w2, b2, torch.randn(1, 2, 4, 4), cb), "odd kernel size"),
        ((x, w1, b1, w2, b2, torch.randn(1, 3, 3, 3), cb), "conv_w"),
        ((x, w1, b1, w2, b2, cw, torch.randn(2)), "conv_b"),
        ((x[:, :, :0], w1, b1, w2, b2, cw, cb), "C, H, W >= 1"),
        ((x, w1.tolist(), b1, w2, b2, cw, cb), "w1 must be a 2-D tensor"),
        ((x, w1, b1, w2, b2, torch.tensor(1.0), cb), "conv_w"),
        ((x, w1, b1, w2, b2, cw[0], cb), "conv_w"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            mk.mixed_attention(*args)
    with pytest.raises(TypeError, match="b2 must be a floating-point tensor"):
        mk.mixed_attention(x, w1, b1, w2, b2.to(torch.int64), cw, cb)
    with pytest.raises(TypeError, match="x must have dtype"):
        mk.mixed_attention(x.to(torch.int32), w1, b1, w2, b2, cw, cb, backend="triton")
    with pytest.raises(TypeError, match="x must be a floating-point"):
        mk.mixed_attention(x.to(torch.int64), w1, b1, w2, b2, cw, cb, backend="reference")
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.mixed_attention(x, w1, b1, w2, b2, cw, cb, backend="tpu")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        mk.mixed_attention(x, w1, b1, w2, b2, cw, cb, backend="cuda")
    with pytest.raises(ValueError, match=r"x must be \(N, 8, H, W\)"):
        mknn.MixedAttention(8)(torch.randn(2, 7, 3, 3))
    with pytest.raises(ValueError, match="kernel_size"):
        mknn.MixedAttention(8, kernel_size=4)
    with pytest.raises(ValueError, match="pool_order"):
        mknn.MixedAttention(8, pool_order="avg")


@requires_gpu
def test_mixed_devices_rejected():
    x, w1, b1, w2, b2, cw, cb = functional_args((2, 8, 5, 5), dtype=torch.float32)
    with pytest.raises(ValueError, match="w1 is on cpu"):
        mk.mixed_attention(x.cuda(), w1, b1.cuda(), w2.cuda(), b2.cuda(), cw.cuda(), cb.cuda())


def test_mixed_devices_rejected_meta():
    x, w1, b1, w2, b2, cw, cb = functional_args((2, 8, 5, 5), dtype=torch.float32)
    with pytest.raises(ValueError, match="w2 is on meta"):
        mk.mixed_attention(x, w1, b1, w2.to("meta"), b2, cw, cb, backend="reference")


@requires_ext
def test_spatial_norm_training_needs_more_than_one_value():
    _, fused = make_pair(4, torch.float32, "cpu", "cpu", spatial_norm=True, train=True)
    with pytest.raises(ValueError, match="more than one value"):
        fused(torch.randn(1, 4, 1, 1))


@requires_ext
def test_env_backend(monkeypatch):
    args = functional_args((2, 8, 3, 3), dtype=torch.float32)
    monkeypatch.setenv("MANET_KERNELS_BACKEND", "reference")
    backend = mk.ops._common.resolve_backend("auto", torch.device("cpu"), "mixed_attention_apply")
    assert backend == "reference"
    monkeypatch.setenv("MANET_KERNELS_BACKEND", "cpu")
    torch.testing.assert_close(mk.mixed_attention(*args),
                               mk.mixed_attention(*args, backend="reference"))
    monkeypatch.setenv("MANET_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MANET_KERNELS_BACKEND"):
        mk.mixed_attention(*args)


def test_state_dict_keys_identical():
    for kw in (dict(), dict(spatial_norm=True, pool_order="max_avg", mlp_bias=False)):
        ref = reference.MixedAttention(32, **kw)
        fused = mknn.MixedAttention(32, **kw)
        assert list(ref.state_dict()) == list(fused.state_dict())
        fused.load_state_dict(ref.state_dict())
        ref.load_state_dict(fused.state_dict())


@requires_ext
@pytest.mark.parametrize("flavour", [{}, dict(pool_order="max_avg", spatial_norm=True)])
def test_cpu_autocast_bf16(flavour):
    """Under AMP the tiny parts between the passes stay in float32 (the kernels check
    it) while x is bfloat16: the result is within twice the reference's own bf16 error."""
    torch.manual_seed(0)
    ref = reference.MixedAttention(24, reduction=4, **flavour)
    fused = mknn.MixedAttention(24, reduction=4, backend="cpu", **flavour)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 24, 9, 7)
    exact = ref.double()(x.double()).float()
    ref.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x.bfloat16())
        y_ref = ref(x.bfloat16())
    assert y.dtype == torch.bfloat16
    own = (y_ref.float() - exact).abs().max().item()
    assert (y.float() - exact).abs().max().item() <= 2 * own + 1e-6


@pytest.mark.parametrize("momentum", [0.25, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("how", ["cpu", "triton", "compile"])
def test_running_stats_follow_batchnorm(how, momentum):
    """Training steps update the spatial BatchNorm's running statistics and
    num_batches_tracked exactly as nn.BatchNorm2d does (momentum=None: the cumulative
    average), inside the fused op (cpu, triton) or after the functional registered op
    (compile); then eval mode uses them."""
    if how == "triton" and not TRITON_INTERPRETED:
        pytest.skip("Triton on CPU tensors needs the interpreter")
    if how != "triton" and not _ext.HAS_EXT:
        pytest.skip("needs the compiled extension")
    torch._dynamo.reset()
    ref, fused = make_pair(6, torch.float32, "cpu", "triton" if how == "triton" else "cpu",
                           spatial_norm=True)
    ref.bn.momentum = fused.bn.momentum = momentum
    step = torch.compile(fused, fullgraph=True) if how == "compile" else fused
    torch.manual_seed(3)
    for _ in range(3):
        x = torch.randn(2, 6, 5, 4)
        ref(x)
        step(x)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused.bn, name), getattr(ref.bn, name))
    ref.eval()
    fused.eval()
    x = torch.randn(2, 6, 5, 4)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-4)
