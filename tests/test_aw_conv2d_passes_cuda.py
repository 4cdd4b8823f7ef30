"""CUDA AW-convolution / per-sample convolution passes (csrc/cuda/aw_conv2d.cu) against
the pure-PyTorch contract (manet_kernels/reference/passes.py) on the same CUDA inputs.

Errors are judged two ways:

* against ``bound``, the same pass in float64 on absolute values: every output is a sum
  of products, and a correct kernel's rounding error is a small multiple of the unit
  roundoff times the sum of the terms' magnitudes whatever order it adds them in,
  while a wrong tap, channel or sample errs by the order of the bound itself;
* for fp16/bf16 ``y`` and ``dx``, with the rule of tests/helpers.py: the error against
  the float64 truth is at most twice that of eager PyTorch in the same dtype (the
  scaled weight rounded to the dtype, cuDNN in the dtype) plus one ulp of the largest
  value.

Dtypes, shapes and strides (memory format) must be those of the contract.
"""

from __future__ import annotations

import pytest
import torch

from manet_kernels import _ext
from manet_kernels.reference import passes as ref

if not torch.cuda.is_available() or not _ext.has_kernel("aw_conv2d_fwd", "cuda"):
    pytest.skip("needs a CUDA device and manet_kernels built with its aw_conv2d CUDA kernels",
                allow_module_level=True)

from helpers import assert_matches  # noqa: E402

ops = torch.ops.manet_kernels
DEV = "cuda"
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}

# Relative to the bound. Activation-dtype outputs (y, dx) carry one rounding of a scaled
# operand on tensor cores plus one of the result; weight/scale gradients are sums of
# exact products accumulated in fp32/fp64.
TOL_ACT = {torch.float64: 1e-12, torch.float32: 3e-5, torch.float16: 2e-3,
           torch.bfloat16: 1.6e-2}
TOL_ACC = {torch.float64: 1e-12, torch.float32: 3e-5, torch.float16: 1e-4,
           torch.bfloat16: 1e-4}

# (N, C1, C2, (H, W), (kh, kw), stride, padding, dilation, groups)
CONFIGS = [
    (1, 4, 6, (5, 7), (1, 1), (1, 1), (0, 0), (1, 1), 1),
    (3, 4, 6, (5, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (3, 6, 4, (14, 14), (3, 3), (2, 2), (1, 1), (1, 1), 2),
    (1, 4, 4, (5, 7), (3, 3), (1, 1), (1, 2), (2, 2), 4),       # depthwise
    (3, 6, 6, (5, 7), (3, 3), (2, 2), (1, 1), (2, 2), 6),       # depthwise, strided, dilated
    (3, 3, 5, (14, 14), (5, 5), (2, 2), (1, 2), (1, 1), 1),
    (1, 3, 2, (5, 7), (5, 5), (1, 1), (0, 0), (1, 1), 1),       # output 1 x 3
    (1, 4, 8, (14, 14), (7, 7), (1, 1), (0, 0), (1, 1), 2),
    (3, 4, 4, (14, 14), (7, 7), (2, 2), (1, 2), (2, 2), 1),
    (3, 4, 6, (14, 14), (1, 1), (2, 2), (0, 0), (1, 1), 2),     # 1x1 stride 2: dx has holes
    (3, 4, 4, (5, 7), (1, 3), (1, 2), (0, 1), (1, 2), 1),       # kh != kw, mixed stride
    (3, 2, 3, (1, 1), (1, 1), (1, 1), (0, 0), (1, 1), 1),       # 1 x 1 map
    (1, 2, 2, (1, 1), (3, 3), (1, 1), (1, 1), (1, 1), 2),       # 1 x 1 map, 3 x 3 kernel
    # More than one 64-wide tile along every GEMM axis, ragged at the edges.
    (5, 72, 80, (13, 11), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (3, 3, 67, (23, 19), (7, 7), (2, 2), (3, 3), (1, 1), 1),    # first-layer-like, C1 = 3
    (2, 96, 96, (9, 9), (3, 3), (1, 1), (1, 1), (1, 1), 96),    # depthwise, many groups
]
LOW_CONFIGS = [CONFIGS[i] for i in (1, 2, 4, 9, 13, 14)]

# ResNet-50 convolutions at batch 8 (bottleneck 1x1 / 3x3, stride-2 3x3, downsample).
RESNET = [
    (8, 64, 64, (56, 56), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (8, 256, 64, (56, 56), (1, 1), (1, 1), (0, 0), (1, 1), 1),
    (8, 128, 128, (56, 56), (3, 3), (2, 2), (1, 1), (1, 1), 1),
    (8, 256, 512, (56, 56), (1, 1), (2, 2), (0, 0), (1, 1), 1),
    (8, 256, 256, (14, 14), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (8, 512, 512, (7, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (8, 512, 2048, (7, 7), (1, 1), (1, 1), (0, 0), (1, 1), 1),
]


def _cfg_id(c):
    n, c1, c2, (h, w), (kh, kw), s, p, d, g = c
    return f"n{n}-{c1}to{c2}-{h}x{w}-k{kh}x{kw}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}-g{g}"


def _out_hw(hw, k, s, p, d):
    return tuple((hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


# The reference's fp32 convolutions in IEEE fp32 (cuDNN takes TF32 by default).
pytestmark = pytest.mark.usefixtures("no_tf32")


def _inputs(cfg, dtype, layout, seed=0, g_layout=None):
    n, c1, c2, hw, k, s, p, d, g = cfg
    gen = torch.Generator().manual_seed(seed)
    acc = ref.acc_dtype(dtype)

    def rnd(*shape, fmt=None):
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEV, dtype)
        return t.contiguous(memory_format=FORMATS[fmt]) if fmt else t

    x = rnd(n, c1, *hw, fmt=layout)
    weight = rnd(c2, c1 // g, *k)
    weights = rnd(n, c2, c1 // g, *k)
    scale = (1 + torch.rand(n, c2, *k, generator=gen, dtype=torch.float64)).to(DEV, acc)
    bias = torch.randn(n, c2, generator=gen, dtype=torch.float64).to(DEV, acc)
    gy = rnd(n, c2, *_out_hw(hw, k, s, p, d), fmt=g_layout or layout)
    return x, weight, weights, scale, bias, gy, [list(s), list(p), list(d), g]


def _f64(t):
    return None if t is None else t.double()


def _abs64(t):
    return None if t is None else t.double().abs()


def _check(name, out, expected, truth, bound, dtype, kind):
    """``expected``: the contract on the same inputs (dtype, shape, strides);
    ``truth`` / ``bound``: the contract in float64 on the inputs / their magnitudes."""
    assert out.shape == expected.shape, name
    assert out.dtype == expected.dtype, f"{name}: dtype {out.dtype}, expected {expected.dtype}"
    if out.dim() == 4:
        assert out.stride() == expected.stride(), \
            f"{name}: strides {out.stride()}, expected {expected.stride()}"
    else:
        assert out.is_contiguous(), name
    tol = (TOL_ACT if kind == "act" else TOL_ACC)[dtype]
    err = (out.double() - truth).abs()
    lim = tol * bound + torch.finfo(out.dtype).tiny
    bad = ~(err <= lim)
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {out.numel()} beyond tolerance, "
                           f"max error {err.max().item():.3e}, max bound "
                           f"{bound.max().item():.3e}, first at {bad.nonzero()[0].tolist()}")


def _eager_lowp(x, w, b, gy, conv):
    """Eager PyTorch in x's dtype, sample by sample: (y, dx) with the per-sample weights
    ``w (N, C2, C1/g, kh, kw)`` already in x's dtype."""
    s, p, d, g = conv
    ys, dxs = [], []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].detach().requires_grad_()
        yi = torch.nn.functional.conv2d(xi, w[i], None if b is None else b[i].to(x.dtype),
                                        s, p, d, g)
        yi.backward(gy[i:i + 1])
        ys.append(yi.detach())
        dxs.append(xi.grad)
    return torch.cat(ys), torch.cat(dxs)


def _check_all(cfg, dtype, layout, g_layout=None, with_bias=True):
    x, weight, weights, scale, bias, gy, conv = _inputs(cfg, dtype, layout, g_layout=g_layout)
    acc = ref.acc_dtype(dtype)
    b = bias if with_bias else None

    # aw forward / backward
    y = ops.aw_conv2d_fwd(x, weight, scale, b, *conv)
    _check("aw y", y, ref.aw_conv2d_fwd(x, weight, scale, b, *conv),
           ref.aw_conv2d_fwd(_f64(x), _f64(weight), _f64(scale), _f64(b), *conv),
           ref.aw_conv2d_fwd(_abs64(x), _abs64(weight), _abs64(scale), _abs64(b), *conv),
           dtype, "act")
    dx, dw, ds = ops.aw_conv2d_bwd(gy, x, weight, scale, *conv)
    expected = ref.aw_conv2d_bwd(gy, x, weight, scale, *conv)
    truth = ref.aw_conv2d_bwd(_f64(gy), _f64(x), _f64(weight), _f64(scale), *conv)
    bound = ref.aw_conv2d_bwd(_abs64(gy), _abs64(x), _abs64(weight), _abs64(scale), *conv)
    for name, o, e, t, bd, kind in zip(("aw dx", "aw dweight", "aw dscale"), (dx, dw, ds),
                                       expected, truth, bound, ("act", "acc", "acc")):
        _check(name, o, e, t, bd, dtype, kind)
    if dtype in (torch.float16, torch.bfloat16):
        wn = (weight.to(acc)[None] * scale[:, :, None]).to(dtype)
        y_lp, dx_lp = _eager_lowp(x, wn, b, gy, conv)
        assert_matches({"y": y, "dx": dx}, {"y": ref.aw_conv2d_fwd(
            _f64(x), _f64(weight), _f64(scale), _f64(b), *conv), "dx": truth[0]},
            {"y": y_lp, "dx": dx_lp}, dtype)

    # per-sample forward / backward
    y = ops.per_sample_conv2d_fwd(x, weights, b, *conv)
    _check("per_sample y", y, ref.per_sample_conv2d_fwd(x, weights, b, *conv),
           ref.per_sample_conv2d_fwd(_f64(x), _f64(weights), _f64(b), *conv),
           ref.per_sample_conv2d_fwd(_abs64(x), _abs64(weights), _abs64(b), *conv),
           dtype, "act")
    dx, dws = ops.per_sample_conv2d_bwd(gy, x, weights, *conv)
    expected = ref.per_sample_conv2d_bwd(gy, x, weights, *conv)
    truth = ref.per_sample_conv2d_bwd(_f64(gy), _f64(x), _f64(weights), *conv)
    bound = ref.per_sample_conv2d_bwd(_abs64(gy), _abs64(x), _abs64(weights), *conv)
    for name, o, e, t, bd, kind in zip(("per_sample dx", "per_sample dweights"), (dx, dws),
                                       expected, truth, bound, ("act", "acc")):
        _check(name, o, e, t, bd, dtype, kind)
    if dtype in (torch.float16, torch.bfloat16):
        y_lp, dx_lp = _eager_lowp(x, weights, b, gy, conv)
        assert_matches({"y": y, "dx": dx}, {"y": ref.per_sample_conv2d_fwd(
            _f64(x), _f64(weights), _f64(b), *conv), "dx": truth[0]},
            {"y": y_lp, "dx": dx_lp}, dtype)


@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[_cfg_id(c) for c in CONFIGS])
def test_matches_reference(cfg, dtype, layout):
    _check_all(cfg, dtype, layout, with_bias=cfg[0] != 1)


@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cfg", LOW_CONFIGS, ids=[_cfg_id(c) for c in LOW_CONFIGS])
def test_low_precision(cfg, dtype, layout):
    _check_all(cfg, dtype, layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("cfg", RESNET, ids=[_cfg_id(c) for c in RESNET])
def test_resnet50_shapes(cfg, dtype):
    # The training setting (bf16) runs channels_last; fp32 NCHW.
    _check_all(cfg, dtype, "channels_last" if dtype == torch.bfloat16 else "nchw")


def test_grad_in_other_layout():
    cfg = CONFIGS[13]
    _check_all(cfg, torch.float32, "nchw", g_layout="channels_last")
    _check_all(cfg, torch.float32, "channels_last", g_layout="nchw")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_deterministic(dtype):
    # 5 samples of a 9x9 map: the weight-grad work splits over samples and positions.
    cfg = (5, 16, 16, (9, 9), (3, 3), (1, 1), (1, 1), (1, 1), 1)
    x, weight, weights, scale, _, gy, conv = _inputs(cfg, dtype, "channels_last")
    first = ops.aw_conv2d_bwd(gy, x, weight, scale, *conv)
    again = ops.aw_conv2d_bwd(gy, x, weight, scale, *conv)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    for a, b in zip(ops.per_sample_conv2d_bwd(gy, x, weights, *conv),
                    ops.per_sample_conv2d_bwd(gy, x, weights, *conv)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", list(FORMATS))
def test_empty_batch(layout):
    cfg = (0, 4, 6, (5, 7), (3, 3), (2, 1), (1, 0), (1, 2), 2)
    x, weight, weights, scale, bias, gy, conv = _inputs(cfg, torch.float32, layout)
    for b in (None, bias):
        for y in (ops.per_sample_conv2d_fwd(x, weights, b, *conv),
                  ops.aw_conv2d_fwd(x, weight, scale, b, *conv)):
            assert y.shape == (0, 6, 3, 3) and y.dtype == torch.float32 and y.device == x.device
    dx, dws = ops.per_sample_conv2d_bwd(gy, x, weights, *conv)
    assert dx.shape == x.shape and dws.shape == weights.shape and dws.dtype == torch.float32
    dx, dw, ds = ops.aw_conv2d_bwd(gy, x, weight, scale, *conv)
    assert dx.shape == x.shape and dw.shape == weight.shape and not dw.any()
    assert ds.shape == scale.shape and ds.dtype == torch.float32


def _bad_cases():
    cfg = (2, 4, 6, (5, 7), (3, 3), (1, 1), (1, 1), (1, 1), 2)
    x, weight, weights, scale, bias, gy, conv = _inputs(cfg, torch.float32, "nchw")
    s, p, d, g = conv
    aw_f = lambda **kw: ops.aw_conv2d_fwd(  # noqa: E731
        kw.get("x", x), kw.get("weight", weight), kw.get("scale", scale),
        kw.get("bias", bias), kw.get("s", s), kw.get("p", p), kw.get("d", d), kw.get("g", g))
    aw_b = lambda **kw: ops.aw_conv2d_bwd(  # noqa: E731
        kw.get("gy", gy), kw.get("x", x), kw.get("weight", weight), kw.get("scale", scale),
        s, p, d, kw.get("g", g))
    ps_f = lambda **kw: ops.per_sample_conv2d_fwd(  # noqa: E731
        kw.get("x", x), kw.get("weights", weights), kw.get("bias", bias), s, p, d, g)
    ps_b = lambda **kw: ops.per_sample_conv2d_bwd(  # noqa: E731
        kw.get("gy", gy), kw.get("x", x), kw.get("weights", weights), s, p, d, g)
    strided = torch.randn(2, 4, 5, 14, device=DEV)[..., ::2]
    return [
        # A CPU tensor among CUDA ones reaches the CUDA kernel, which names it.
        ("x-cpu", lambda: aw_f(x=x.cpu()), "x: expected a CUDA tensor"),
        ("weight-cpu", lambda: aw_f(weight=weight.cpu()), "weight: expected a tensor on x's device"),
        ("scale-cpu", lambda: aw_f(scale=scale.cpu()), "scale: expected a tensor on x's device"),
        ("bias-cpu", lambda: aw_f(bias=bias.cpu()), "bias: expected a tensor on x's device"),
        ("g-cpu", lambda: aw_b(gy=gy.cpu()), "g: expected a tensor on x's device"),
        ("bwd-x-cpu", lambda: aw_b(x=x.cpu()), "x: expected a CUDA tensor"),
        ("weights-cpu", lambda: ps_f(weights=weights.cpu()),
         "weights: expected a tensor on x's device"),
        ("ps-bwd-g-cpu", lambda: ps_b(gy=gy.cpu()), "g: expected a tensor on x's device"),
        ("x-rank", lambda: aw_f(x=x[0]), "x: expected a rank-4"),
        ("x-dtype", lambda: aw_f(x=x.to(torch.int32)), "x: expected dtype float32"),
        ("x-strides", lambda: aw_f(x=strided), "x: expected NCHW-contiguous or channels_last"),
        ("x-too-small", lambda: aw_f(x=x[:, :, :1, :1].contiguous(), p=[0, 0]), "x: spatial size"),
        ("weight-rank", lambda: aw_f(weight=weight[0]), "weight: expected a rank-4"),
        ("weight-channels", lambda: aw_f(weight=weight.repeat(1, 2, 1, 1)),
         "weight: expected C1/groups"),
        ("weight-dtype", lambda: aw_f(weight=weight.double()), "weight: expected x's dtype"),
        ("weight-noncontig", lambda: aw_f(weight=weight.transpose(2, 3)),
         "weight: expected a contiguous"),
        ("scale-shape", lambda: aw_f(scale=scale[:1]), "scale: expected shape (N, C2, kh, kw)"),
        ("scale-dtype", lambda: aw_f(scale=scale.double()), "scale: expected dtype"),
        ("bias-shape", lambda: aw_f(bias=bias[0]), "bias: expected shape (N, C2)"),
        ("groups-c1", lambda: aw_f(g=3), "groups: must divide x's channel count"),
        ("groups-zero", lambda: aw_f(g=0), "groups: expected a positive"),
        ("stride", lambda: aw_f(s=[0, 1]), "stride: expected values >= 1"),
        ("padding", lambda: aw_f(p=[-1, 0]), "padding: expected values >= 0"),
        ("dilation-len", lambda: aw_f(d=[1]), "dilation: expected two values"),
        ("g-shape", lambda: aw_b(gy=gy[:, :, :2].contiguous()), "g: expected the output's shape"),
        ("g-dtype", lambda: aw_b(gy=gy.double()), "g: expected x's dtype"),
        ("g-rank", lambda: aw_b(gy=gy[0]), "g: expected a rank-4"),
        ("weights-rank", lambda: ps_f(weights=weights[0]), "weights: expected a rank-5"),
        ("weights-batch", lambda: ps_f(weights=weights[:1]),
         "weights: expected one kernel per sample"),
        ("weights-dtype", lambda: ps_f(weights=weights.double()), "weights: expected x's dtype"),
        ("ps-g", lambda: ps_b(gy=gy[:1]), "g: expected the output's shape"),
    ]


_BAD = _bad_cases() if torch.cuda.is_available() else []


@pytest.mark.parametrize("case", _BAD, ids=[c[0] for c in _BAD])
def test_bad_arguments(case):
    _, call, message = case
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()
