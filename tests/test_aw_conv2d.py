"""AW-convolution and per-sample convolution against a per-sample loop of F.conv2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_GPU, backends_for, requires_ext, requires_gpu
from helpers import LOW_PRECISION, OP_LAYOUTS, assert_matches, layouts_differ, make_x
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import manet_kernels as mk
from manet_kernels import reference
from manet_kernels.ops import _common
from manet_kernels.reference import aw_conv2d as ref_ops

# The references' fp32 convolutions in IEEE fp32 on a GPU (conftest.no_tf32): the Triton
# and CUDA kernels compute in fp32, cuDNN takes TF32 by default.
pytestmark = pytest.mark.usefixtures("no_tf32")

# (C1, C2, k, stride, padding, dilation, groups, H, W)
CONFIGS = [
    (4, 6, 1, 1, 0, 1, 1, 5, 7),
    (5, 7, 3, 1, 1, 1, 1, 7, 6),
    (4, 6, 3, 2, 1, 1, 2, 9, 7),
    (6, 6, 3, 1, (1, 2), (1, 2), 6, 8, 8),   # depthwise, uneven padding and dilation
    (3, 4, 5, 2, 2, 1, 1, 7, 5),
    (2, 3, 7, 1, 3, 1, 1, 9, 9),
    (3, 5, 3, 1, 1, 1, 1, 1, 1),             # 1x1 map
    (8, 8, 3, (2, 1), 0, 2, 4, 11, 9),
]


def ids(cfg):
    return "c{}-{}_k{}_s{}_p{}_d{}_g{}_{}x{}".format(*cfg)


def make_case(cfg, n, dtype, device, layout, full_attn=False, bias=True):
    c1, c2, k, stride, padding, dilation, groups, h, w = cfg
    x = make_x((n, c1, h, w), dtype, device, layout)
    weight = (torch.randn(c2, c1 // groups, k, k, dtype=torch.float64, device=device)
              / (c1 // groups * k * k) ** 0.5).to(dtype)
    attn = torch.rand(n, c2, c1 // groups if full_attn else 1, k, k, dtype=torch.float64,
                      device=device).to(dtype)
    b = torch.randn(c2, dtype=torch.float64, device=device).to(dtype) if bias else None
    return x, weight, attn, b, dict(stride=stride, padding=padding, dilation=dilation,
                                    groups=groups)


def run(fn, tensors, upstream):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*leaves)
    need = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((y.double() * upstream).sum(), need)
    names = ["x", "weight", "attn", "bias"][: len(leaves)]
    out = {"y": y}
    it = iter(grads)
    for name, t in zip(names, leaves):
        if t is not None:
            out[f"grad_{name}"] = next(it)
    return out


def check_against(fused, oracle, tensors, dtype, layout):
    """``fused(*tensors)`` against ``oracle`` (the per-sample F.conv2d loop): output and
    every gradient; low precision against the oracle in fp64 and in that dtype."""
    x = tensors[0]
    up = torch.randn(oracle(*[t.double() if t is not None else None for t in tensors]).shape,
                     dtype=torch.float64, device=x.device)
    out = run(fused, tensors, up)
    ref_dtype = torch.float64 if dtype in LOW_PRECISION else dtype
    ref = run(oracle, [t.to(ref_dtype) if t is not None else None for t in tensors], up)
    low = run(oracle, tensors, up) if dtype in LOW_PRECISION else None
    assert out["y"].dtype == dtype
    if layout == "channels_last" and layouts_differ(x.shape) and layouts_differ(out["y"].shape):
        # the kernels ran their channels_last path (the ops give y x's layout)
        assert out["y"].is_contiguous(memory_format=torch.channels_last)
        assert not out["y"].is_contiguous()
    assert_matches(out, ref, low, dtype)


def check_aw(backend, device, dtype, layout, cfg, n=3, full_attn=False, bias=True):
    x, weight, attn, b, conf = make_case(cfg, n, dtype, device, layout, full_attn, bias)
    check_against(lambda *t: mk.aw_conv2d(*t, **conf, backend=backend),
                  lambda *t: ref_ops.aw_conv2d(*t, **conf), (x, weight, attn, b), dtype, layout)


@requires_ext
@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
@pytest.mark.parametrize("layout", OP_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_aw_matches_reference(cfg, layout, dtype):
    check_aw("cpu", "cpu", dtype, layout, cfg)


@requires_ext
@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=ids)
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_aw_full_attn_matches_reference(cfg, bias):
    check_aw("cpu", "cpu", torch.float64, "contiguous", cfg, full_attn=True, bias=bias)


@requires_ext
@pytest.mark.parametrize("n", [1, 2])
def test_cpu_aw_batch_sizes(n):
    check_aw("cpu", "cpu", torch.float32, "channels_last", CONFIGS[2], n=n)


@requires_ext
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), g=st.sampled_from([1, 2]), c1g=st.integers(1, 4),
       c2g=st.integers(1, 4), k=st.sampled_from([1, 3, 5]), s=st.integers(1, 2),
       p=st.integers(0, 2), d=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9),
       full=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_cpu_random_configs(n, g, c1g, c2g, k, s, p, d, h, w, full, seed):
    # an empty output is rejected by the argument checks (tested below)
    assume(h + 2 * p >= d * (k - 1) + 1 and w + 2 * p >= d * (k - 1) + 1)
    torch.manual_seed(seed)
    cfg = (c1g * g, c2g * g, k, s, p, d, g, h, w)
    check_aw("cpu", "cpu", torch.float64, "contiguous", cfg, n=n, full_attn=full)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in backends_for("cpu") or HAS_GPU,
                    reason="Triton interpreter tests run on CPU-only machines")
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2], CONFIGS[3], CONFIGS[6]], ids=ids)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_interpreter_aw(cfg, layout, dtype):
    check_aw("triton", "cpu", dtype, layout, cfg, n=2)


GPU_CONFIGS = CONFIGS + [(64, 64, 3, 1, 1, 1, 1, 56, 56), (256, 256, 3, 2, 1, 1, 1, 14, 14),
                         (64, 64, 3, 1, 1, 1, 64, 28, 28)]
# "triton_aw_v2": the triton backend with the second AW kernels, which it runs on a GPU
# only once verified (TRITON_AW_V2_VERIFIED): these cases are that verification
# (benchmarks/run_device.sh, step tests-triton-aw_v2).
GPU_BACKENDS = ["cuda", "triton", "triton_aw_v2"]


@pytest.fixture
def gpu_backend(request):
    backend = request.param
    if backend.removesuffix("_aw_v2") not in backends_for("cuda"):
        pytest.skip(f"backend {backend} not available")
    if backend == "triton_aw_v2":
        with _common.unverified_stages():
            yield "triton"
    else:
        yield backend


@pytest.mark.triton
@pytest.mark.skipif("triton" not in backends_for("cpu"), reason="needs triton")
def test_triton_gate_keeps_the_verified_kernels_on_cuda():
    # Module choice only: nothing runs, so no GPU is needed.
    from manet_kernels.ops.aw_conv2d import _passes
    new, v1 = "manet_kernels.triton.aw_conv2d", "manet_kernels.triton.aw_conv2d_v1"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not _common.TRITON_AW_V2_VERIFIED
    assert (_passes("triton", cuda).__name__, _passes("triton", cpu).__name__) == (v1, new)
    with _common.unverified_stages():
        assert _passes("triton", cuda).__name__ == new
    assert _passes("triton", cuda).__name__ == v1


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=ids)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_aw_matches_reference(gpu_backend, cfg, layout, dtype):
    check_aw(gpu_backend, "cuda", dtype, layout, cfg, n=2)


# --------------------------------------------------------------------------- per-sample conv

BIAS_KINDS = ("none", "shared", "per_sample")


def check_per_sample(backend, device, dtype, layout, cfg, bias_kind, n=3):
    c1, c2, k, stride, padding, dilation, groups, h, w = cfg
    x = make_x((n, c1, h, w), dtype, device, layout)
    weights = (torch.randn(n, c2, c1 // groups, k, k, dtype=torch.float64, device=device)
               / (c1 // groups * k * k) ** 0.5).to(dtype)
    bias = {"none": None, "shared": (c2,), "per_sample": (n, c2)}[bias_kind]
    if bias is not None:
        bias = torch.randn(bias, dtype=torch.float64, device=device).to(dtype)
    conf = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    check_against(lambda *t: mk.per_sample_conv2d(*t, **conf, backend=backend),
                  lambda *t: ref_ops.per_sample_conv2d(*t, **conf), (x, weights, bias), dtype,
                  layout)


# Every config (groups, strides, a 1x1 map), each bias kind and layout in turn.
PER_SAMPLE_CASES = [pytest.param(cfg, BIAS_KINDS[i % 3], OP_LAYOUTS[j], id=f"{ids(cfg)}-"
                                 f"{BIAS_KINDS[i % 3]}-{OP_LAYOUTS[j]}")
                    for i, cfg in enumerate(CONFIGS) for j in ((i % 3), (i + 1) % 3)]


@requires_ext
@pytest.mark.parametrize("cfg,bias_kind,layout", PER_SAMPLE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_per_sample_matches_reference(cfg, bias_kind, layout, dtype):
    check_per_sample("cpu", "cpu", dtype, layout, cfg, bias_kind)


@requires_ext
@pytest.mark.parametrize("bias_kind", BIAS_KINDS)
def test_grouped_conv_trick_matches_the_per_sample_loop(bias_kind):
    c1, c2, k, stride, padding, dilation, groups, h, w = CONFIGS[2]
    x = torch.randn(3, c1, h, w, dtype=torch.float64)
    weights = torch.randn(3, c2, c1 // groups, k, k, dtype=torch.float64)
    bias = {"none": None, "shared": torch.randn(c2, dtype=torch.float64),
            "per_sample": torch.randn(3, c2, dtype=torch.float64)}[bias_kind]
    conf = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    torch.testing.assert_close(ref_ops.grouped_conv_trick(x, weights, bias, **conf),
                               ref_ops.per_sample_conv2d(x, weights, bias, **conf))


@pytest.mark.triton
@pytest.mark.skipif("triton" not in backends_for("cpu") or HAS_GPU,
                    reason="Triton interpreter tests run on CPU-only machines")
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2]], ids=ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_interpreter_per_sample(cfg, dtype):
    check_per_sample("triton", "cpu", dtype, "channels_last", cfg, "per_sample", n=2)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_per_sample_matches_reference(gpu_backend, cfg, layout, dtype):
    check_per_sample(gpu_backend, "cuda", dtype, layout, cfg, "shared", n=2)


@requires_ext
def test_gradcheck_cpu():
    x, weight, attn, b, conf = make_case((4, 4, 3, 2, 1, 1, 2, 5, 4), 2, torch.float64, "cpu",
                                         "contiguous")
    args = [t.requires_grad_() for t in (x, weight, attn, b)]
    assert torch.autograd.gradcheck(lambda *t: mk.aw_conv2d(*t, **conf, backend="cpu"), args)
    ws = torch.randn(2, 4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    xs = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: mk.per_sample_conv2d(a, b, padding=1, groups=2, backend="cpu"), (xs, ws))


@requires_ext
def test_opcheck_cpu():
    x, weight, attn, b, conf = make_case((4, 6, 3, 2, 1, 1, 2, 6, 5), 2, torch.float32, "cpu",
                                         "contiguous")
    scale = (1 + attn).squeeze(2)
    for rg in (False, True):
        t = [v.clone().requires_grad_(rg) for v in (x, weight, scale, b)]
        torch.library.opcheck(torch.ops.manet_kernels.aw_conv2d.default,
                              (*t, [2, 2], [1, 1], [1, 1], 2, "cpu"))
        ws = (weight[None] * (1 + attn)).clone().requires_grad_(rg)
        torch.library.opcheck(torch.ops.manet_kernels.per_sample_conv2d.default,
                              (x.clone().requires_grad_(rg), ws, None, [1, 1], [0, 0], [1, 1], 2,
                               "cpu"))


@requires_ext
def test_compile_fullgraph_module():
    torch._dynamo.reset()
    ref = reference.AWConv2d(8, 12, 3, padding=1, bias=True, reduction=4)
    fused = mk.nn.AWConv2d(8, 12, 3, padding=1, bias=True, reduction=4, backend="cpu")
    fused.load_state_dict(ref.state_dict())
    assert list(ref.state_dict()) == list(fused.state_dict())
    compiled = torch.compile(fused, fullgraph=True)  # Inductor, around the opaque op
    x = torch.randn(3, 8, 7, 6, requires_grad=True)
    y, y_ref = compiled(x), ref(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    g = torch.autograd.grad(y.square().sum(), [x] + list(fused.parameters()))
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x] + list(ref.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@requires_ext
def test_module_from_conv_starts_close_to_the_conv():
    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True)
    layer = mk.nn.AWConv2d.from_conv(conv, reduction=4, backend="cpu")
    x = torch.randn(2, 8, 9, 9)
    y, y_conv = layer(x), conv(x)
    assert (y - y_conv).abs().max() <= 1e-3 * y_conv.abs().max()
    torch.testing.assert_close(layer.weight, conv.weight)


@requires_ext
def test_autograd_functions_dropin():
    x, weight, attn, b, conf = make_case(CONFIGS[2], 2, torch.float64, "cpu", "contiguous")
    args = [t.requires_grad_() for t in (x, weight, attn, b)]
    y = mk.AWConv2dFunction.apply(*args, conf["stride"], conf["padding"], conf["dilation"],
                                  conf["groups"])
    y_ref = ref_ops.aw_conv2d(*args, **conf)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    for a, b_ in zip(torch.autograd.grad(y, args, g), torch.autograd.grad(y_ref, args, g)):
        torch.testing.assert_close(a, b_)
    ws = (weight[None] * (1 + attn)).detach().requires_grad_()
    args = [x, ws, b]
    y2 = mk.PerSampleConv2dFunction.apply(*args, 2, 1, 1, 2)
    y2_ref = ref_ops.per_sample_conv2d(*args, 2, 1, 1, 2)
    torch.testing.assert_close(y2, y2_ref)
    g = torch.randn_like(y2)
    for a, b_ in zip(torch.autograd.grad(y2, args, g), torch.autograd.grad(y2_ref, args, g)):
        torch.testing.assert_close(a, b_)


@requires_ext
def test_empty_batch():
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    a = torch.rand(0, 6, 1, 3, 3, requires_grad=True)
    y = mk.aw_conv2d(x, w, a, padding=1, backend="cpu")
    assert y.shape == (0, 6, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(6, 4, 3, 3)
    a = torch.rand(2, 6, 1, 3, 3)
    with pytest.raises(ValueError, match="x must be 4-D"):
        mk.aw_conv2d(x[0], w, a)
    with pytest.raises(ValueError, match="attn must be"):
        mk.aw_conv2d(x, w, torch.rand(2, 6, 2, 3, 3))
    with pytest.raises(ValueError, match="attn must be"):
        mk.aw_conv2d(x, w, torch.rand(3, 6, 1, 3, 3))
    with pytest.raises(ValueError, match="groups=3 must divide"):
        mk.aw_conv2d(x, torch.randn(6, 1, 3, 3), a, groups=3)
    with pytest.raises(ValueError, match="weight expects"):
        mk.aw_conv2d(x, torch.randn(6, 3, 3, 3), a)
    with pytest.raises(ValueError, match="bias must be"):
        mk.aw_conv2d(x, w, a, torch.randn(5))
    with pytest.raises(ValueError, match="output would be empty"):
        mk.aw_conv2d(x, torch.randn(6, 4, 7, 7), torch.rand(2, 6, 1, 7, 7))
    with pytest.raises(TypeError, match="stride must be an int or a pair"):
        mk.aw_conv2d(x, w, a, stride=(1, 2, 3))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        mk.aw_conv2d(x, w, a, padding=-1)
    with pytest.raises(ValueError, match="attn is on meta"):
        mk.aw_conv2d(x, w, a.to("meta"), backend="reference")
    with pytest.raises(ValueError, match="weights must have one kernel per sample"):
        mk.per_sample_conv2d(x, torch.randn(3, 6, 4, 3, 3))
    with pytest.raises(ValueError, match="weights must be 5-D"):
        mk.per_sample_conv2d(x, w)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        mk.aw_conv2d(x, w, a, backend="cuda")


@requires_gpu
def test_mixed_devices_rejected():
    x = torch.randn(2, 4, 5, 5, device="cuda")
    with pytest.raises(ValueError, match="weight is on cpu"):
        mk.aw_conv2d(x, torch.randn(6, 4, 3, 3), torch.rand(2, 6, 1, 3, 3, device="cuda"))


def test_reference_matches_plain_conv_when_attn_is_zero():
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(5, 4, 3, 3)
    y = ref_ops.aw_conv2d(x, w, torch.zeros(2, 5, 1, 3, 3), None, 1, 1)
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1))


@requires_ext
def test_cpu_autocast_bf16_computes_in_float32():
    """CPU AMP hands the layer a bfloat16 x: the C++ kernels compute it in float32 and
    return bfloat16, as close to the float64 result as bf16 rounding of the output."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, 9, 7).bfloat16()
    w = torch.randn(6, 8, 3, 3)
    attn = torch.rand(3, 6, 1, 3, 3)
    exact = ref_ops.aw_conv2d(x.double(), w.double(), attn.double(), None, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mk.aw_conv2d(x, w, attn, padding=1, backend="cpu")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), exact, rtol=2 ** -8, atol=1e-6)


@requires_ext
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
def test_cpu_autocast_bf16_gradients_on_threads(layout, monkeypatch):
    """bf16 x through the Winograd path with samples side by side on two threads (each
    sample widened on a worker thread): outputs and every gradient as the float64
    reference gives them, to bf16 rounding."""
    monkeypatch.setenv("MANET_KERNELS_AW_CPU_ALGO", "winograd2")
    torch.manual_seed(0)
    x0 = torch.randn(4, 16, 9, 7).bfloat16().contiguous(memory_format=layout)
    w0 = torch.randn(16, 16, 3, 3) / 12
    a0 = torch.rand(4, 16, 1, 3, 3)
    xd, wd, ad = (t.double().requires_grad_() for t in (x0, w0, a0))
    exact = ref_ops.aw_conv2d(xd, wd, ad, None, 1, 1)
    gy = torch.randn(exact.shape, dtype=torch.float64)
    exact.backward(gy)
    x, w, a = (t.clone().requires_grad_() for t in (x0, w0, a0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mk.aw_conv2d(x, w, a, padding=1, backend="cpu")
        y.backward(gy.to(y.dtype))
    finally:
        torch.set_num_threads(threads)
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    for name, got, want in (("y", y, exact), ("dx", x.grad, xd.grad), ("dw", w.grad, wd.grad),
                            ("dattn", a.grad, ad.grad)):
        tol = 2 ** -7 * want.abs().max().item()
        torch.testing.assert_close(got.double(), want.detach(), rtol=0, atol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")
