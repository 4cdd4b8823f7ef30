"""C++ CPU AW-convolution / per-sample convolution passes vs. the pure-PyTorch
contract (manet_kernels/reference/passes.py): outputs, dtypes, memory formats,
empty batches and argument checks."""

from __future__ import annotations

import pytest
import torch

from manet_kernels import _ext

if not (_ext.HAS_EXT and torch._C._dispatch_has_kernel_for_dispatch_key(
        "manet_kernels::aw_conv2d_fwd", "CPU")):
    pytest.skip(f"C++ extension without the aw_conv2d CPU kernels ({_ext.EXT_ERROR})",
                allow_module_level=True)

from helpers import use_cpu_isa  # noqa: E402
from manet_kernels.reference import passes as ref  # noqa: E402

ops = torch.ops.manet_kernels

# Absolute (scaled by the largest reference value) and relative tolerances. The
# kernels run each sample's convolution single- or multi-threaded, so float32
# differs from the reference by the convolution's own summation order.
TOL = {torch.float64: (1e-11, 1e-9), torch.float32: (2e-5, 2e-4)}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}

# (N, C1, C2, (H, W), (kh, kw), stride, padding, dilation, groups)
CONFIGS = [
    (1, 4, 6, (5, 7), (1, 1), (1, 1), (0, 0), (1, 1), 1),
    (3, 4, 6, (5, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (3, 6, 4, (14, 14), (3, 3), (2, 2), (1, 1), (1, 1), 2),
    (1, 4, 4, (5, 7), (3, 3), (1, 1), (1, 2), (2, 2), 4),     # depthwise
    (3, 6, 6, (5, 7), (3, 3), (2, 2), (1, 1), (2, 2), 6),     # depthwise, strided, dilated
    (3, 3, 5, (14, 14), (5, 5), (2, 2), (1, 2), (1, 1), 1),
    (1, 3, 2, (5, 7), (5, 5), (1, 1), (0, 0), (1, 1), 1),     # output 1 x 3
    (1, 4, 8, (14, 14), (7, 7), (1, 1), (0, 0), (1, 1), 2),
    (3, 4, 4, (14, 14), (7, 7), (2, 2), (1, 2), (2, 2), 1),
    (3, 4, 6, (14, 14), (1, 1), (2, 2), (0, 0), (1, 1), 2),
    (3, 4, 4, (5, 7), (1, 3), (1, 2), (0, 1), (1, 2), 1),     # kh != kw, mixed stride
    (3, 2, 3, (1, 1), (1, 1), (1, 1), (0, 0), (1, 1), 1),     # 1 x 1 map
    (1, 2, 2, (1, 1), (3, 3), (1, 1), (1, 1), (1, 1), 2),     # 1 x 1 map, 3 x 3 kernel
    # Channel counts oneDNN runs through its blocked JIT kernels.
    (3, 16, 32, (14, 14), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (3, 32, 16, (14, 14), (3, 3), (2, 2), (1, 2), (1, 2), 2),
]


def _cfg_id(c):
    n, c1, c2, (h, w), (kh, kw), s, p, d, g = c
    return f"n{n}-{c1}to{c2}-{h}x{w}-k{kh}x{kw}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}-g{g}"


def _act(shape, dtype, layout, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).contiguous(
        memory_format=FORMATS[layout])


def _out_hw(hw, k, s, p, d):
    return tuple((hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


def _inputs(cfg, dtype, layout, seed=0):
    n, c1, c2, hw, k, s, p, d, g = cfg
    gen = torch.Generator().manual_seed(seed)
    acc = ref.acc_dtype(dtype)
    x = _act((n, c1, *hw), dtype, layout, gen)
    weight = torch.randn(c2, c1 // g, *k, generator=gen, dtype=torch.float64).to(dtype)
    weights = torch.randn(n, c2, c1 // g, *k, generator=gen, dtype=torch.float64).to(dtype)
    scale = (1 + torch.rand(n, c2, *k, generator=gen, dtype=torch.float64)).to(acc)
    bias = torch.randn(n, c2, generator=gen, dtype=torch.float64).to(acc)
    gy = _act((n, c2, *_out_hw(hw, k, s, p, d)), dtype, layout, gen)
    return x, weight, weights, scale, bias, gy, [list(s), list(p), list(d), g]


def _close(out, expected, name):
    assert out.shape == expected.shape, name
    assert out.dtype == expected.dtype, f"{name}: dtype {out.dtype}, expected {expected.dtype}"
    if out.dim() == 4:
        assert out.stride() == expected.stride(), \
            f"{name}: strides {out.stride()}, expected {expected.stride()}"
    else:  # the reference may stack channels_last per-sample gradients
        assert out.is_contiguous(), name
    atol, rtol = TOL[torch.float64 if expected.dtype == torch.float64 else torch.float32]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(out, expected, atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[_cfg_id(c) for c in CONFIGS])
def test_matches_reference(cfg, dtype, layout):
    x, weight, weights, scale, bias, gy, conv = _inputs(cfg, dtype, layout)
    for b in (None, bias):
        _close(ops.per_sample_conv2d_fwd(x, weights, b, *conv),
               ref.per_sample_conv2d_fwd(x, weights, b, *conv), "per_sample y")
        _close(ops.aw_conv2d_fwd(x, weight, scale, b, *conv),
               ref.aw_conv2d_fwd(x, weight, scale, b, *conv), "aw y")
    for name, out, expected in zip(
            ("dx", "dweights"), ops.per_sample_conv2d_bwd(gy, x, weights, *conv),
            ref.per_sample_conv2d_bwd(gy, x, weights, *conv)):
        _close(out, expected, f"per_sample {name}")
    for name, out, expected in zip(
            ("dx", "dweight", "dscale"), ops.aw_conv2d_bwd(gy, x, weight, scale, *conv),
            ref.aw_conv2d_bwd(gy, x, weight, scale, *conv)):
        _close(out, expected, f"aw {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision_computes_in_float32(dtype):
    # The contract widens to float32; outputs round once to x's dtype, so they may
    # differ from the reference by one rounding of that dtype.
    cfg = (3, 16, 8, (5, 7), (3, 3), (1, 1), (1, 1), (1, 1), 2)
    x, weight, weights, scale, bias, gy, conv = _inputs(cfg, dtype, "channels_last")
    eps = torch.finfo(dtype).eps

    def close(out, expected):
        assert out.dtype == expected.dtype
        assert out.stride() == expected.stride() if out.dim() == 4 else out.is_contiguous()
        tol = (eps if out.dtype == dtype else 2e-5) * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(out.double(), expected.double(), atol=tol, rtol=0)

    close(ops.aw_conv2d_fwd(x, weight, scale, bias, *conv),
          ref.aw_conv2d_fwd(x, weight, scale, bias, *conv))
    close(ops.per_sample_conv2d_fwd(x, weights, bias, *conv),
          ref.per_sample_conv2d_fwd(x, weights, bias, *conv))
    for o, r in zip(ops.aw_conv2d_bwd(gy, x, weight, scale, *conv),
                    ref.aw_conv2d_bwd(gy, x, weight, scale, *conv)):
        close(o, r)
    for o, r in zip(ops.per_sample_conv2d_bwd(gy, x, weights, *conv),
                    ref.per_sample_conv2d_bwd(gy, x, weights, *conv)):
        close(o, r)


@pytest.mark.parametrize("x_layout", list(FORMATS))
def test_grad_in_other_layout(x_layout):
    cfg = (3, 16, 16, (14, 14), (3, 3), (1, 1), (1, 1), (1, 1), 1)
    x, weight, weights, scale, _, gy, conv = _inputs(cfg, torch.float32, x_layout)
    other = torch.contiguous_format if x_layout == "channels_last" else torch.channels_last
    gy = gy.contiguous(memory_format=other)
    for o, r in zip(ops.aw_conv2d_bwd(gy, x, weight, scale, *conv),
                    ref.aw_conv2d_bwd(gy, x, weight, scale, *conv)):
        _close(o, r, "aw")
    for o, r in zip(ops.per_sample_conv2d_bwd(gy, x, weights, *conv),
                    ref.per_sample_conv2d_bwd(gy, x, weights, *conv)):
        _close(o, r, "per_sample")


@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_deterministic_and_thread_count(threads, layout, cfg=None):
    # 5 samples: waves of 1, 2 or 3 samples with a partial last wave.
    cfg = cfg or (5, 16, 16, (14, 14), (3, 3), (1, 1), (1, 1), (1, 1), 1)
    x, weight, _, scale, _, gy, conv = _inputs(cfg, torch.float32, layout)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = ops.aw_conv2d_bwd(gy, x, weight, scale, *conv)
        again = ops.aw_conv2d_bwd(gy, x, weight, scale, *conv)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    for name, o, r in zip(("dx", "dweight", "dscale"), first,
                          ref.aw_conv2d_bwd(gy, x, weight, scale, *conv)):
        _close(o, r, name)


@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_empty_batch(dtype, layout):
    cfg = (0, 4, 6, (5, 7), (3, 3), (2, 1), (1, 0), (1, 2), 2)
    x, weight, weights, scale, bias, gy, conv = _inputs(cfg, dtype, layout)
    acc = ref.acc_dtype(dtype)
    for b in (None, bias):
        for y in (ops.per_sample_conv2d_fwd(x, weights, b, *conv),
                  ops.aw_conv2d_fwd(x, weight, scale, b, *conv)):
            assert y.shape == (0, 6, 3, 3) and y.dtype == dtype
    dx, dws = ops.per_sample_conv2d_bwd(gy, x, weights, *conv)
    assert dx.shape == x.shape and dx.dtype == dtype
    assert dws.shape == weights.shape and dws.dtype == acc
    dx, dw, ds = ops.aw_conv2d_bwd(gy, x, weight, scale, *conv)
    assert dx.shape == x.shape and dx.dtype == dtype
    assert dw.shape == weight.shape and dw.dtype == acc and not dw.any()
    assert ds.shape == scale.shape and ds.dtype == acc


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
    strided = torch.randn(2, 4, 5, 14)[..., ::2]
    return [
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
        ("bias-dtype", lambda: aw_f(bias=bias.double()), "bias: expected dtype"),
        ("groups-c1", lambda: aw_f(g=3), "groups: must divide x's channel count"),
        ("groups-c2", lambda: aw_f(weight=weight[:5], scale=scale[:, :5], bias=bias[:, :5]),
         "groups: must divide weight's output channel count"),
        ("groups-zero", lambda: aw_f(g=0), "groups: expected a positive"),
        ("stride", lambda: aw_f(s=[0, 1]), "stride: expected values >= 1"),
        ("stride-len", lambda: aw_f(s=[1]), "stride: expected two values"),
        ("padding", lambda: aw_f(p=[-1, 0]), "padding: expected values >= 0"),
        ("dilation", lambda: aw_f(d=[1, 0]), "dilation: expected values >= 1"),
        ("g-shape", lambda: aw_b(gy=gy[:, :, :2].contiguous()), "g: expected the output's shape"),
        ("g-dtype", lambda: aw_b(gy=gy.double()), "g: expected x's dtype"),
        ("g-strides", lambda: aw_b(gy=gy.transpose(2, 3).contiguous().transpose(2, 3)),
         "g: expected NCHW-contiguous"),
        ("bwd-scale", lambda: aw_b(scale=scale[:, :, :1]), "scale: expected shape"),
        ("bwd-x-rank", lambda: aw_b(x=x[None]), "x: expected a rank-4"),
        ("weights-rank", lambda: ps_f(weights=weights[0]), "weights: expected a rank-5"),
        ("weights-batch", lambda: ps_f(weights=weights[:1]),
         "weights: expected one kernel per sample"),
        ("weights-dtype", lambda: ps_f(weights=weights.double()), "weights: expected x's dtype"),
        ("weights-channels", lambda: ps_f(weights=weights[:, :, :1]),
         "weights: expected C1/groups"),
        ("weights-noncontig", lambda: ps_f(weights=weights.transpose(3, 4)),
         "weights: expected a contiguous"),
        ("ps-bias", lambda: ps_f(bias=bias.t()), "bias: expected shape (N, C2)"),
        ("ps-g", lambda: ps_b(gy=gy[:1]), "g: expected the output's shape"),
        ("ps-bwd-weights", lambda: ps_b(weights=weights.double()), "weights: expected x's dtype"),
    ]


_BAD = _bad_cases()


@pytest.mark.parametrize("case", _BAD, ids=[c[0] for c in _BAD])
def test_bad_arguments(case):
    _, call, message = case
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


# Winograd F(2x2, 3x3) / F(4x4, 3x3) path (3x3, stride 1, dilation 1, groups 1), forced
# through MANET_KERNELS_AW_CPU_ALGO: odd maps (1, 2, 3 rows or columns, partial last
# tiles), padding 0 / 1 / 2, N = 1 and odd N, C1 != C2, channel counts off the vector
# width. It runs only on AVX2 + FMA CPUs and silently falls back to ATen elsewhere, so
# these cases check the contract either way; each runs with the AVX2 and the AVX-512
# copy of the kernels (skipped where the CPU lacks it).
WINO_CONFIGS = [
    (1, 3, 5, (1, 1), (3, 3), (1, 1), (1, 1), (1, 1), 1),     # 1 x 1 map
    (3, 4, 6, (5, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 5, 3, (2, 3), (3, 3), (1, 1), (2, 2), (1, 1), 1),     # padding 2
    (1, 2, 3, (3, 9), (3, 3), (1, 1), (0, 0), (1, 1), 1),     # padding 0, 1-row output
    (3, 17, 9, (11, 6), (3, 3), (1, 1), (1, 0), (1, 1), 1),   # mixed padding
    (2, 24, 40, (9, 10), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    # Enough work per sample that the batch runs in chunks (4 + 1 samples).
    (5, 64, 64, (20, 20), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    # Transformed weights over 3 MB per sample: blocked mode (one sample at a time, U
    # and dU block by block), channel counts off the block width.
    (2, 250, 300, (5, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1),
]
BLOCKED_CFG = (3, 256, 200, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1)


@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("algo", ["winograd2", "winograd4"])
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("cfg", WINO_CONFIGS, ids=[_cfg_id(c) for c in WINO_CONFIGS])
def test_winograd_matches_reference(cfg, isa, algo, dtype, layout, monkeypatch):
    use_cpu_isa(isa, monkeypatch)  # the AVX2 and the AVX-512 copy of the kernels
    monkeypatch.setenv("MANET_KERNELS_AW_CPU_ALGO", algo)
    test_matches_reference(cfg, dtype, layout)


@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("algo", ["winograd2", "winograd4"])
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_winograd_low_precision(isa, algo, dtype, layout, monkeypatch):
    use_cpu_isa(isa, monkeypatch)
    monkeypatch.setenv("MANET_KERNELS_AW_CPU_ALGO", algo)
    cfg = (3, 16, 8, (5, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1)
    x, weight, weights, scale, bias, gy, conv = _inputs(cfg, dtype, layout)
    eps = torch.finfo(dtype).eps
    for o, r in [(ops.aw_conv2d_fwd(x, weight, scale, bias, *conv),
                  ref.aw_conv2d_fwd(x, weight, scale, bias, *conv)),
                 *zip(ops.aw_conv2d_bwd(gy, x, weight, scale, *conv),
                      ref.aw_conv2d_bwd(gy, x, weight, scale, *conv))]:
        assert o.dtype == r.dtype and o.shape == r.shape
        tol = (eps if o.dtype == dtype else 2e-5) * max(1.0, r.abs().max().item())
        torch.testing.assert_close(o.double(), r.double(), atol=tol, rtol=0)


@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize("algo", ["winograd2", "winograd4"])
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("blocked", [False, True], ids=["chunks", "blocked"])
def test_winograd_deterministic_and_thread_count(algo, isa, threads, layout, blocked,
                                                 monkeypatch):
    use_cpu_isa(isa, monkeypatch)
    monkeypatch.setenv("MANET_KERNELS_AW_CPU_ALGO", algo)
    test_deterministic_and_thread_count(threads, layout, BLOCKED_CFG if blocked else None)


@pytest.mark.parametrize("x_layout", list(FORMATS))
@pytest.mark.parametrize("algo", ["winograd2", "winograd4"])
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_winograd_grad_in_other_layout(isa, algo, x_layout, monkeypatch):
    # x and g in different layouts: each is read per sample in its own.
    use_cpu_isa(isa, monkeypatch)
    monkeypatch.setenv("MANET_KERNELS_AW_CPU_ALGO", algo)
    test_grad_in_other_layout(x_layout)


def test_winograd_auto_and_bad_setting(monkeypatch):
    # The default choice at the benchmark's shape must agree with the reference too.
    cfg = (2, 64, 64, (28, 28), (3, 3), (1, 1), (1, 1), (1, 1), 1)
    x, weight, _, scale, _, gy, conv = _inputs(cfg, torch.float32, "nchw")
    monkeypatch.delenv("MANET_KERNELS_AW_CPU_ALGO", raising=False)
    for name, o, r in zip(("dx", "dweight", "dscale"),
                          ops.aw_conv2d_bwd(gy, x, weight, scale, *conv),
                          ref.aw_conv2d_bwd(gy, x, weight, scale, *conv)):
        _close(o, r, name)
    monkeypatch.setenv("MANET_KERNELS_AW_CPU_ALGO", "fast")
    with pytest.raises(RuntimeError, match="MANET_KERNELS_AW_CPU_ALGO: expected auto"):
        ops.aw_conv2d_fwd(x, weight, scale, None, *conv)
