"""AW-convolution and per-sample convolution pass kernels (C++ CPU, CUDA, Triton)
against their contract, ``manet_kernels.reference.passes``; the ``torch`` backend (the
contract itself) runs the empty-batch test, which states facts rather than compares.

Each op's passes give ``y`` and ``dx`` in x's dtype and memory format, and the weight
(and scale) gradients in the accumulation dtype. How each backend is judged:

* cpu (``check_cpu``): the contract on the same inputs to ``CPU_TOL``, absolute (scaled
  by the largest value) and relative: the kernels differ from it only by the
  convolution's summation order. fp16/bf16 compute in fp32 like the contract, so their
  outputs in x's dtype may differ by one rounding of it.
* cuda (``check_cuda``) and triton (``check_triton``): against ``bound``, the contract
  on absolute values. Every output is a sum of products: a correct kernel's rounding
  error is a small multiple of the unit roundoff times the sum of the terms' magnitudes
  whatever order it adds them in, a wrong tap, channel or sample errs by the order of
  the bound itself. cuda: the error against the float64 contract, and fp16/bf16 ``y``
  and ``dx`` by tests/helpers.py's low-precision rule against eager PyTorch in the same
  dtype; triton: the error against the contract on the same inputs, floored for entries
  whose terms cancel. Triton's GPU-sized shapes reduce over too many terms for the bound
  to be sharp: they are judged by the low-precision rule (``check_no_worse``).

Case lists are per backend: the interpreter runs tiny shapes and no bf16 (wrong there),
the GPU ResNet-50 shapes, the CPU its Winograd path with each instruction set.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, fields, replace

import passes_common as pc
import pytest
import torch
from helpers import LOW_PRECISION, assert_low_precision, assert_matches, use_cpu_isa
from passes_common import backends

from manet_kernels.reference import passes as ref

OP, KERNEL = "aw_conv2d", "aw_conv2d_fwd"
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
AW, PS = "aw_conv2d", "per_sample_conv2d"
OPS = (AW, PS)
OUTPUTS = {AW: ("y", "dx", "dweight", "dscale"), PS: ("y", "dx", "dweights")}
ACT = ("y", "dx")  # in x's dtype; the other outputs in the accumulation dtype
OTHER = {"nchw": "channels_last", "channels_last": "nchw"}

INTERPRETING = pc.Backend("triton", OP, KERNEL).interpreting
TRITON_GPU = pc.HAS_GPU and not INTERPRETING
triton_gpu_only = pytest.mark.skipif(
    not TRITON_GPU, reason="needs a CUDA device (bf16 and big shapes are GPU-only)")
interp_only = pytest.mark.skipif(not INTERPRETING, reason="interpreter-only check")

# The contract's fp32 convolutions in IEEE fp32 on a GPU (cuDNN takes TF32 by default).
pytestmark = pytest.mark.usefixtures("no_tf32")

# --------------------------------------------------------------------------- cases


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@dataclass(frozen=True)
class Conv:
    """x ``(n, c1, *hw)``, weight ``(c2, c1 / groups, *k)``; ``bias``: whether the
    forward gets one (the cpu check runs with and without)."""

    n: int
    c1: int
    c2: int
    hw: tuple
    k: tuple | int
    stride: tuple | int = 1
    padding: tuple | int = 0
    dilation: tuple | int = 1
    groups: int = 1
    bias: bool = True

    def __post_init__(self):
        for name in ("k", "stride", "padding", "dilation"):
            object.__setattr__(self, name, _pair(getattr(self, name)))

    @property
    def args(self) -> list:
        """stride, padding, dilation, groups as the passes take them."""
        return [list(self.stride), list(self.padding), list(self.dilation), self.groups]

    @property
    def out_hw(self) -> tuple:
        return tuple((self.hw[i] + 2 * self.padding[i] - self.dilation[i] * (self.k[i] - 1)
                      - 1) // self.stride[i] + 1 for i in range(2))

    def __str__(self):
        def one(v):
            return str(v[0]) if v[0] == v[1] else f"{v[0]}.{v[1]}"
        return (f"n{self.n}-c{self.c1}to{self.c2}-{self.hw[0]}x{self.hw[1]}-k{one(self.k)}"
                f"-s{one(self.stride)}p{one(self.padding)}d{one(self.dilation)}g{self.groups}"
                + ("" if self.bias else "-nobias"))


# The C++ CPU and CUDA kernels' cases (without a bias at N = 1 on cuda).
SHARED = [
    Conv(1, 4, 6, (5, 7), 1),
    Conv(3, 4, 6, (5, 7), 3, padding=1),
    Conv(3, 6, 4, (14, 14), 3, stride=2, padding=1, groups=2),
    Conv(1, 4, 4, (5, 7), 3, padding=(1, 2), dilation=2, groups=4),       # depthwise
    Conv(3, 6, 6, (5, 7), 3, stride=2, padding=1, dilation=2, groups=6),  # strided, dilated
    Conv(3, 3, 5, (14, 14), 5, stride=2, padding=(1, 2)),
    Conv(1, 3, 2, (5, 7), 5),                                             # output 1 x 3
    Conv(1, 4, 8, (14, 14), 7, groups=2),
    Conv(3, 4, 4, (14, 14), 7, stride=2, padding=(1, 2), dilation=2),
    Conv(3, 4, 6, (14, 14), 1, stride=2, groups=2),                       # dx has holes
    Conv(3, 4, 4, (5, 7), (1, 3), stride=(1, 2), padding=(0, 1), dilation=(1, 2)),
    Conv(3, 2, 3, (1, 1), 1),                                             # 1 x 1 map
    Conv(1, 2, 2, (1, 1), 3, padding=1, groups=2),                        # ... 3 x 3 kernel
]
# Channel counts oneDNN runs through its blocked JIT kernels.
CPU_CASES = SHARED + [Conv(3, 16, 32, (14, 14), 3, padding=1),
                      Conv(3, 32, 16, (14, 14), 3, stride=2, padding=(1, 2), dilation=(1, 2),
                           groups=2)]
CPU_LOW = Conv(3, 16, 8, (5, 7), 3, padding=1, groups=2)
# More than one 64-wide tile along every GEMM axis, ragged at the edges; first-layer-like
# (C1 = 3); depthwise with many groups.
CUDA_TILES = [Conv(5, 72, 80, (13, 11), 3, padding=1),
              Conv(3, 3, 67, (23, 19), 7, stride=2, padding=3),
              Conv(2, 96, 96, (9, 9), 3, padding=1, groups=96)]
CUDA_CASES = [replace(c, bias=c.n != 1) for c in SHARED + CUDA_TILES]
CUDA_LOW = [CUDA_CASES[i] for i in (1, 2, 4, 9, 13, 14)]
# ResNet-50 convolutions at batch 8 (bottleneck 1x1 / 3x3, stride-2 3x3, downsample).
RESNET = [
    Conv(8, 64, 64, (56, 56), 3, padding=1),
    Conv(8, 256, 64, (56, 56), 1),
    Conv(8, 128, 128, (56, 56), 3, stride=2, padding=1),
    Conv(8, 256, 512, (56, 56), 1, stride=2),
    Conv(8, 256, 256, (14, 14), 3, padding=1),
    Conv(8, 512, 512, (7, 7), 3, padding=1),
    Conv(8, 512, 2048, (7, 7), 1),
]
# Triton: every stride/padding/dilation/groups value, C in {1, 3, 8} and maps 1x1, 5x4,
# 7x7 appear; 7x7 outputs span two interpreter position tiles, C = 20 two channel tiles.
TRITON_CASES = [
    Conv(2, 3, 8, (7, 7), 3, padding=1),                                  # C1 = 3
    Conv(1, 8, 8, (5, 4), 3, stride=2, padding=1, groups=2, bias=False),
    Conv(2, 3, 3, (7, 7), 3, padding=1, dilation=2, groups=3),            # depthwise, dilated
    Conv(1, 1, 3, (1, 1), 1, bias=False),                                 # C1 = 1, 1x1 map
    Conv(2, 8, 3, (5, 4), 1, stride=2),                                   # dx has holes
    Conv(1, 3, 8, (7, 7), 5, stride=2, padding=2, bias=False),            # 5x5
    Conv(2, 8, 8, (1, 1), 3, padding=1),                                  # only the centre tap
    Conv(1, 20, 20, (5, 4), 3, padding=1, bias=False),                    # two K / channel tiles
    Conv(2, 8, 8, (7, 7), 3, stride=2, dilation=2),                       # no padding
    Conv(1, 4, 6, (7, 5), 3, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
]
TRITON_F16 = [TRITON_CASES[i] for i in (0, 1, 2, 4)]
TRITON_GPU_CASES = [
    Conv(2, 64, 64, (56, 56), 3, padding=1),
    Conv(2, 256, 256, (14, 14), 3, padding=1, bias=False),
    Conv(2, 64, 128, (56, 56), 3, stride=2, padding=1),
    Conv(4, 128, 128, (28, 28), 3, padding=1, groups=128),               # depthwise
]


def grid(*axes):
    return list(itertools.product(*axes))


def alternating(ops, dtype, cases, marks=()):
    """One layout per case, taking turns (per-sample the other one): the interpreter is
    slow, and autotuning on a GPU costs per shape."""
    return [pytest.param(op, dtype, pc.LAYOUTS[(i + (op == PS)) % 2], case, marks=marks)
            for op in ops for i, case in enumerate(cases)]


MATCH_CASES = {
    "cpu": grid(OPS, (F32, F64), pc.LAYOUTS, CPU_CASES)
    + grid(OPS, (BF16, F16), ("channels_last",), [CPU_LOW]),
    "cuda": grid(OPS, (F32, F64), pc.LAYOUTS, CUDA_CASES)
    + grid(OPS, (F16, BF16), pc.LAYOUTS, CUDA_LOW)
    # the training setting (bf16) runs channels_last, fp32 NCHW
    + grid(OPS, (F32,), ("nchw",), RESNET) + grid(OPS, (BF16,), ("channels_last",), RESNET),
    "triton": grid(OPS, (F32,), pc.LAYOUTS, TRITON_CASES)
    + [(op, F64, pc.LAYOUTS[i % 2], c) for op in OPS for i, c in enumerate(TRITON_CASES)]
    + [(op, F16, pc.LAYOUTS[i % 2], c) for op in OPS for i, c in enumerate(TRITON_F16)]
    + alternating(OPS, BF16, TRITON_CASES, triton_gpu_only),
}

# --------------------------------------------------------------------------- inputs and passes


@dataclass
class Inputs:
    x: torch.Tensor
    weight: torch.Tensor   # (C2, C1/g, kh, kw), aw_conv2d's
    weights: torch.Tensor  # (N, C2, C1/g, kh, kw), per_sample_conv2d's
    scale: torch.Tensor    # (N, C2, kh, kw): 1 + attention, positive
    bias: torch.Tensor     # (N, C2)
    g: torch.Tensor
    args: list

    def map(self, fn):
        """The tensors through ``fn`` (e.g. to float64, or their absolute values)."""
        return Inputs(*(fn(getattr(self, f.name)) for f in fields(self)[:-1]), self.args)


def make_inputs(case, dtype, layout, device, seed=0, g_layout=None) -> Inputs:
    """float64 draws from one seeded CPU generator, cast and moved; scale and bias in the
    accumulation dtype."""
    src, acc = pc.Seeded(seed, device), pc.acc_dtype(dtype)
    wshape = (case.c2, case.c1 // case.groups, *case.k)
    x = src.act((case.n, case.c1, *case.hw), dtype, layout)
    weight, weights = src.normal(wshape, dtype), src.normal((case.n, *wshape), dtype)
    scale = 1 + src.scale((case.n, case.c2, *case.k), acc)
    bias = src.normal((case.n, case.c2), acc)
    g = src.act((case.n, case.c2, *case.out_hw), dtype, g_layout or layout)
    return Inputs(x, weight, weights, scale, bias, g, case.args)


def forward(ns, op, t, bias):
    """``op``'s forward pass from ``ns`` (a backend or the contract), with a bias or not."""
    b = t.bias if bias else None
    if op == AW:
        return ns.aw_conv2d_fwd(t.x, t.weight, t.scale, b, *t.args)
    return ns.per_sample_conv2d_fwd(t.x, t.weights, b, *t.args)


def backward(ns, op, t):
    if op == AW:
        return ns.aw_conv2d_bwd(t.g, t.x, t.weight, t.scale, *t.args)
    return ns.per_sample_conv2d_bwd(t.g, t.x, t.weights, *t.args)


def passes(ns, op, t, bias):
    """{output name: tensor} of ``op``'s forward and backward passes."""
    return dict(zip(OUTPUTS[op], (forward(ns, op, t, bias), *backward(ns, op, t))))


def effective_weights(op, t):
    """The per-sample weights in x's dtype, as the kernels round them."""
    if op == PS:
        return t.weights
    return (t.weight.to(t.scale.dtype)[None] * t.scale[:, :, None]).to(t.x.dtype)


def eager_low_precision(op, t, bias):
    """``(y, dx)`` from torch's own convolution in x's dtype, one sample at a time."""
    s, p, d, groups = t.args
    w, ys, dxs = effective_weights(op, t), [], []
    for i in range(t.x.shape[0]):
        xi, gi, b = t.x[i:i + 1], t.g[i:i + 1], t.bias[i].to(t.x.dtype) if bias else None
        ys.append(torch.nn.functional.conv2d(xi, w[i], b, s, p, d, groups))
        dxs.append(torch.ops.aten.convolution_backward(
            gi, xi, w[i], None, s, p, d, False, [0, 0], groups, [True, False, False])[0])
    return torch.cat(ys), torch.cat(dxs)


def to_f64(t):
    return t.double()


def abs_f64(t):
    return t.double().abs()


# --------------------------------------------------------------------------- the rules

# Absolute (scaled by the largest contract value) and relative: the kernels run each
# sample's convolution single- or multi-threaded, so fp32 differs from the contract by
# the convolution's own summation order.
CPU_TOL = {F64: (1e-11, 1e-9), F32: (2e-5, 2e-4)}
# Relative to the bound. Outputs in x's dtype (y, dx) carry one rounding of a scaled
# operand (on tensor cores) plus one of the result; weight/scale gradients are sums of
# exact products accumulated in fp32/fp64 (fp16/bf16 leave room for tensor-core
# accumulation).
TOL_ACT = {F64: 1e-12, F32: 3e-5, F16: 2e-3, BF16: 1.6e-2}
TOL_ACC = {F64: 1e-12, F32: 3e-5, F16: 1e-4, BF16: 1e-4}


def bound_tol(name, dtype):
    return (TOL_ACT if name in ACT else TOL_ACC)[dtype]


def assert_layout_of(name, out, expect):
    """The contract's shape, dtype and strides (its stacked per-sample gradients: contiguous)."""
    assert out.shape == expect.shape, name
    assert out.dtype == expect.dtype, f"{name}: dtype {out.dtype}, expected {expect.dtype}"
    if out.dim() == 4:
        assert out.stride() == expect.stride(), \
            f"{name}: strides {out.stride()}, expected {expect.stride()}"
    else:
        assert out.is_contiguous(), name


def assert_cpu_close(name, out, expect, dtype):
    """fp32/fp64: ``CPU_TOL``. fp16/bf16: one rounding of the output's dtype (2e-5 for
    the fp32 weight/scale gradients), scaled by the largest value."""
    assert_layout_of(name, out, expect)
    scale = max(1.0, pc.amax(expect))
    if dtype in LOW_PRECISION:
        tol = (torch.finfo(dtype).eps if out.dtype == dtype else 2e-5) * scale
        torch.testing.assert_close(out.double(), expect.double(), atol=tol, rtol=0,
                                   msg=lambda m: f"{name}: {m}")
        return
    atol, rtol = CPU_TOL[F64 if expect.dtype == F64 else F32]
    torch.testing.assert_close(out, expect, atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def check_cpu(backend, op, case, dtype, layout, g_layout=None):
    t = make_inputs(case, dtype, layout, backend.device, g_layout=g_layout)
    for bias in (False, True):
        assert_cpu_close(f"{op} y", forward(backend, op, t, bias), forward(ref, op, t, bias),
                         dtype)
    for name, o, e in zip(OUTPUTS[op][1:], backward(backend, op, t), backward(ref, op, t)):
        assert_cpu_close(f"{op} {name}", o, e, dtype)


def check_cuda(backend, op, case, dtype, layout, g_layout=None):
    t = make_inputs(case, dtype, layout, backend.device, g_layout=g_layout)
    out, expect = passes(backend, op, t, case.bias), passes(ref, op, t, case.bias)
    truth = passes(ref, op, t.map(to_f64), case.bias)
    bound = passes(ref, op, t.map(abs_f64), case.bias)
    for name, o in out.items():
        assert_layout_of(f"{op} {name}", o, expect[name])
        lim = bound_tol(name, dtype) * bound[name] + torch.finfo(o.dtype).tiny
        pc.assert_all_within((o.double() - truth[name]).abs(), lim, o.numel(), f"{op} {name}")
    if dtype in LOW_PRECISION:
        y, dx = eager_low_precision(op, t, case.bias)
        assert_matches({k: out[k] for k in ACT}, {k: truth[k] for k in ACT},
                       {"y": y, "dx": dx}, dtype)


def check_triton(backend, op, case, dtype, layout, g_layout=None, seed=0):
    t = make_inputs(case, dtype, layout, backend.device, seed, g_layout)
    out, expect = passes(backend, op, t, case.bias), passes(ref, op, t, case.bias)
    bound = passes(ref, op, t.map(torch.abs), case.bias)
    for name, o in out.items():
        e, b, what = expect[name], bound[name].double(), f"{op} {name}"
        assert (o.shape, o.dtype, o.device) == (e.shape, e.dtype, e.device), what
        assert torch.isfinite(o).all(), f"{what}: non-finite values"
        tol = bound_tol(name, dtype)
        # The floor covers entries whose terms cancel to (nearly) nothing.
        lim = tol * b + tol * 1e-3 * pc.amax(b)
        pc.assert_all_within((o.double() - e.double()).abs(), lim, o.numel(), what)
        if name in ACT:
            pc.assert_same_format(o, e)


CHECKS = {"cpu": check_cpu, "cuda": check_cuda, "triton": check_triton}


def assert_no_worse(name, out, truth, lowp):
    """The flash-attention rule: the error against the float64 ``truth`` at most twice
    that of ``lowp`` (torch's own computation in the same precision) plus one ulp of the
    largest value; fp16/bf16 outputs by tests/helpers.py's ``assert_low_precision``,
    which adds its per-element bound. fp32 outputs here are sums of up to 2e5 terms,
    whose fp32 rounding errs by several ulps in torch's own result too, so they are held
    to the first bound only."""
    assert out.shape == truth.shape, name
    o, t, r = out.double(), truth.double(), lowp.double()
    if out.dtype in LOW_PRECISION:
        assert_low_precision(name, o, t, r, out.dtype)
        return
    base, err = pc.amax(r - t), pc.amax(o - t)
    assert err <= 2 * base + torch.finfo(out.dtype).eps * pc.amax(t), \
        f"{name}: error {err:.3g}, torch's own {base:.3g}"


def check_no_worse(backend, op, case, dtype, layout):
    t = make_inputs(case, dtype, layout, backend.device, seed=10)
    if op == PS:  # per-sample weights as the aw kernels round them
        t = replace(t, weights=effective_weights(AW, t))
    out, expect = passes(backend, op, t, case.bias), passes(ref, op, t, case.bias)
    truth = passes(ref, op, t.map(to_f64), case.bias)
    # the weight/scale gradients' own precision: the contract's fp32 sums of exact products
    lowp = dict(expect, **dict(zip(ACT, eager_low_precision(op, t, case.bias))))
    for name, o in out.items():
        assert_no_worse(f"{op} {name}", o, truth[name], lowp[name])
    for name in ACT:
        pc.assert_same_format(out[name], expect[name])


# --------------------------------------------------------------------------- every backend


@pytest.mark.parametrize("backend,op,dtype,layout,case", pc.backend_params(OP, KERNEL, MATCH_CASES))
def test_matches_reference(backend, op, dtype, layout, case):
    CHECKS[backend.name](backend, op, case, dtype, layout)


OTHER_LAYOUT_CASES = {
    "cpu": grid(OPS, pc.LAYOUTS, [Conv(3, 16, 16, (14, 14), 3, padding=1)]),
    "cuda": grid(OPS, pc.LAYOUTS, CUDA_TILES[:1]),
    "triton": grid(OPS, pc.LAYOUTS, [Conv(2, 8, 8, (5, 4), 3, stride=2, padding=1)]),
}


@pytest.mark.parametrize("backend,op,layout,case",
                         pc.backend_params(OP, KERNEL, OTHER_LAYOUT_CASES))
def test_grad_in_other_layout(backend, op, layout, case):
    # x and g in different layouts: each is read in its own.
    CHECKS[backend.name](backend, op, case, F32, layout, g_layout=OTHER[layout])


EMPTY = Conv(0, 4, 6, (5, 7), 3, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)


@pytest.mark.parametrize("backend,dtype,layout,case", pc.backend_params(OP, KERNEL, {
    "cpu": grid((F32, F64), pc.LAYOUTS, [EMPTY]),
    "cuda": grid((F32,), pc.LAYOUTS, [EMPTY]),
    "triton": grid((F32,), pc.LAYOUTS, [Conv(0, 3, 4, (5, 4), 3, stride=2, padding=1)]),
    "torch": grid((F32, F64), pc.LAYOUTS, [EMPTY]),
}))
def test_empty_batch(backend, dtype, layout, case):
    t = make_inputs(case, dtype, layout, backend.device)
    acc = pc.acc_dtype(dtype)
    like = {"dx": (t.x.shape, dtype), "dweight": (t.weight.shape, acc),
            "dscale": (t.scale.shape, acc), "dweights": (t.weights.shape, acc)}
    for op in OPS:
        for bias in (False, True):
            y = forward(backend, op, t, bias)
            assert (y.shape, y.dtype, y.device) == ((0, case.c2, *case.out_hw), dtype, t.x.device)
        out, expect = passes(backend, op, t, True), passes(ref, op, t, True)
        for name, o in out.items():
            assert (o.shape, o.dtype, o.device) == (expect[name].shape, expect[name].dtype,
                                                    t.x.device), name
            assert name == "y" or (o.shape, o.dtype) == like[name], name
            assert torch.equal(o, expect[name]), name  # dweight: a sum over no sample
    assert not backward(backend, AW, t)[1].any()


# --------------------------------------------------------------------------- argument checks

SIGS = {
    "aw_conv2d_fwd": ("x", "weight", "scale", "bias", "stride", "padding", "dilation", "groups"),
    "aw_conv2d_bwd": ("g", "x", "weight", "scale", "stride", "padding", "dilation", "groups"),
    "per_sample_conv2d_fwd": ("x", "weights", "bias", "stride", "padding", "dilation", "groups"),
    "per_sample_conv2d_bwd": ("g", "x", "weights", "stride", "padding", "dilation", "groups"),
}
AW_F, AW_B, PS_F, PS_B = SIGS


def good_args(case, device) -> dict:
    """Every argument of the passes, by name, valid for ``case`` in fp32 NCHW."""
    t = make_inputs(case, F32, "nchw", device)
    return dict(zip(("stride", "padding", "dilation", "groups"), t.args), x=t.x, g=t.g,
                weight=t.weight, weights=t.weights, scale=t.scale, bias=t.bias)


def call(backend, name, args):
    return getattr(backend, name)(*[args[a] for a in SIGS[name]])


@dataclass(eq=False)
class Bad:
    """Pass ``name`` called with ``spoil``'s arguments spoiled ({argument: how}); the C++
    kernels of ``backends`` raise an error that starts with ``message``."""

    id: str
    name: str
    message: str
    spoil: dict
    backends: tuple

    def __str__(self):
        return self.id


def bad(id, name, message, backends=("cpu", "cuda"), **spoil):
    return Bad(id, name, message, spoil, backends)


def host(t):
    return t.cpu()


CPU, CUDA = ("cpu",), ("cuda",)
CPP_GOOD = Conv(2, 4, 6, (5, 7), 3, padding=1, groups=2)
CPP_BAD = [
    # A host tensor among CUDA ones reaches the CUDA kernel, which names it.
    bad("x-on-host", AW_F, "x: expected a CUDA tensor", CUDA, x=host),
    bad("weight-on-host", AW_F, "weight: expected a tensor on x's device", CUDA, weight=host),
    bad("scale-on-host", AW_F, "scale: expected a tensor on x's device", CUDA, scale=host),
    bad("bias-on-host", AW_F, "bias: expected a tensor on x's device", CUDA, bias=host),
    bad("g-on-host", AW_B, "g: expected a tensor on x's device", CUDA, g=host),
    bad("bwd-x-on-host", AW_B, "x: expected a CUDA tensor", CUDA, x=host),
    bad("weights-on-host", PS_F, "weights: expected a tensor on x's device", CUDA,
        weights=host),
    bad("ps-bwd-g-on-host", PS_B, "g: expected a tensor on x's device", CUDA, g=host),
    bad("x-rank", AW_F, "x: expected a rank-4", x=lambda v: v[0]),
    bad("x-dtype", AW_F, "x: expected dtype float32", x=lambda v: v.to(torch.int32)),
    bad("x-strides", AW_F, "x: expected NCHW-contiguous or channels_last",
        x=lambda v: torch.randn(2, 4, 5, 14, device=v.device)[..., ::2]),
    bad("x-too-small", AW_F, "x: spatial size", x=lambda v: v[:, :, :1, :1].contiguous(),
        padding=lambda v: [0, 0]),
    bad("weight-rank", AW_F, "weight: expected a rank-4", weight=lambda v: v[0]),
    bad("weight-channels", AW_F, "weight: expected C1/groups",
        weight=lambda v: v.repeat(1, 2, 1, 1)),
    bad("weight-dtype", AW_F, "weight: expected x's dtype", weight=to_f64),
    bad("weight-noncontig", AW_F, "weight: expected a contiguous",
        weight=lambda v: v.transpose(2, 3)),
    bad("scale-shape", AW_F, "scale: expected shape (N, C2, kh, kw)", scale=lambda v: v[:1]),
    bad("scale-dtype", AW_F, "scale: expected dtype", scale=to_f64),
    bad("bias-shape", AW_F, "bias: expected shape (N, C2)", bias=lambda v: v[0]),
    bad("bias-dtype", AW_F, "bias: expected dtype", CPU, bias=to_f64),
    bad("groups-c1", AW_F, "groups: must divide x's channel count", groups=lambda v: 3),
    bad("groups-c2", AW_F, "groups: must divide weight's output channel count", CPU,
        weight=lambda v: v[:5], scale=lambda v: v[:, :5], bias=lambda v: v[:, :5]),
    bad("groups-zero", AW_F, "groups: expected a positive", groups=lambda v: 0),
    bad("stride", AW_F, "stride: expected values >= 1", stride=lambda v: [0, 1]),
    bad("stride-len", AW_F, "stride: expected two values", CPU, stride=lambda v: [1]),
    bad("padding", AW_F, "padding: expected values >= 0", padding=lambda v: [-1, 0]),
    bad("dilation", AW_F, "dilation: expected values >= 1", CPU, dilation=lambda v: [1, 0]),
    bad("dilation-len", AW_F, "dilation: expected two values", CUDA, dilation=lambda v: [1]),
    bad("g-shape", AW_B, "g: expected the output's shape", g=lambda v: v[:, :, :2].contiguous()),
    bad("g-dtype", AW_B, "g: expected x's dtype", g=to_f64),
    bad("g-strides", AW_B, "g: expected NCHW-contiguous", CPU,
        g=lambda v: v.transpose(2, 3).contiguous().transpose(2, 3)),
    bad("g-rank", AW_B, "g: expected a rank-4", CUDA, g=lambda v: v[0]),
    bad("bwd-scale", AW_B, "scale: expected shape", CPU, scale=lambda v: v[:, :, :1]),
    bad("bwd-x-rank", AW_B, "x: expected a rank-4", CPU, x=lambda v: v[None]),
    bad("weights-rank", PS_F, "weights: expected a rank-5", weights=lambda v: v[0]),
    bad("weights-batch", PS_F, "weights: expected one kernel per sample",
        weights=lambda v: v[:1]),
    bad("weights-dtype", PS_F, "weights: expected x's dtype", weights=to_f64),
    bad("weights-channels", PS_F, "weights: expected C1/groups", CPU,
        weights=lambda v: v[:, :, :1]),
    bad("weights-noncontig", PS_F, "weights: expected a contiguous", CPU,
        weights=lambda v: v.transpose(3, 4)),
    bad("ps-bias", PS_F, "bias: expected shape (N, C2)", CPU, bias=lambda v: v.t()),
    bad("ps-g", PS_B, "g: expected the output's shape", g=lambda v: v[:1]),
    bad("ps-bwd-weights", PS_B, "weights: expected x's dtype", CPU, weights=to_f64),
]


@pytest.mark.parametrize("backend,case", pc.backend_params(OP, KERNEL, {
    name: [(b,) for b in CPP_BAD if name in b.backends] for name in ("cpu", "cuda")}))
def test_bad_arguments(backend, case):
    args = good_args(CPP_GOOD, backend.device)  # built here: CUDA tensors need a GPU
    args.update({arg: spoil(args[arg]) for arg, spoil in case.spoil.items()})
    with pytest.raises(RuntimeError, match=re.escape(case.message)):
        call(backend, case.name, args)


TRITON_GOOD = Conv(2, 4, 6, (5, 4), 3, stride=2, padding=1, groups=2)
TRITON_BAD = [  # (argument, how to spoil it, expected error)
    ("x", lambda t: t[0], ValueError),                          # 3-D
    ("x", lambda t: t.to(torch.int32), TypeError),
    ("x", lambda t: t.transpose(2, 3), ValueError),             # neither layout
    ("x", lambda t: t.tolist(), TypeError),
    ("x", lambda t: t[:, :, :1, :1], ValueError),               # smaller than the kernel
    ("g", lambda t: t[:, :, :, :1], ValueError),                # not the conv output's shape
    ("g", lambda t: t.double(), TypeError),
    ("g", lambda t: t.transpose(2, 3), ValueError),
    ("weight", lambda t: t[0], ValueError),
    ("weight", lambda t: t.double(), TypeError),                # the caller casts to x's dtype
    ("weight", lambda t: torch.cat([t, t], 1), ValueError),     # C1/groups mismatch
    ("weights", lambda t: t[:1], ValueError),                   # not one per sample
    ("weights", lambda t: t.half(), TypeError),
    ("weights", lambda t: t[0], ValueError),                    # 4-D
    ("scale", lambda t: t.double(), TypeError),                 # acc dtype expected
    ("scale", lambda t: t[:, :, :1], ValueError),
    ("bias", lambda t: t.half(), TypeError),
    ("bias", lambda t: t[:, :1], ValueError),
    ("stride", lambda v: [0, 1], ValueError),
    ("stride", lambda v: [1.0, 1.0], TypeError),
    ("stride", lambda v: [1, 1, 1], TypeError),
    ("padding", lambda v: [-1, 0], ValueError),
    ("dilation", lambda v: 0, ValueError),
    ("groups", lambda v: 3, ValueError),                        # divides neither C1 nor C2
    ("groups", lambda v: 0, ValueError),
    ("groups", lambda v: 2.0, TypeError),
]


@pytest.mark.parametrize("name", list(SIGS))
@pytest.mark.parametrize("backend", backends(OP, KERNEL, "triton"))
def test_bad_arguments_per_signature(backend, name):
    # The Triton launchers check in Python: the error's type, and its first word names
    # the argument.
    checked = 0
    for arg, spoil, err in TRITON_BAD:
        if arg in SIGS[name]:
            args = good_args(TRITON_GOOD, backend.device)
            args[arg] = spoil(args[arg])
            with pytest.raises(err, match=rf"^{arg}\b"):
                call(backend, name, args)
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("backend", backends(OP, KERNEL, "triton"))
def test_input_smaller_than_the_dilated_kernel(backend):
    a = good_args(TRITON_GOOD, backend.device)
    with pytest.raises(ValueError, match=r"^x\b.*smaller than the dilated kernel"):
        backend.aw_conv2d_fwd(a["x"], a["weight"], a["scale"], None, 1, 0, 3, 2)


@pytest.mark.parametrize("backend", backends(OP, KERNEL, "triton"))
def test_ints_and_single_element_lists_are_pairs(backend):
    a = good_args(TRITON_GOOD, backend.device)
    y1 = backend.aw_conv2d_fwd(a["x"], a["weight"], a["scale"], None, 2, [1], (1, 1), 2)
    y2 = backend.aw_conv2d_fwd(a["x"], a["weight"], a["scale"], None, [2, 2], [1, 1], [1, 1], 2)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("backend", backends(OP, KERNEL, "triton"))
def test_cpu_tensors_need_the_interpreter(backend, monkeypatch):
    monkeypatch.setattr(backend.namespace, "_interpreting", lambda: False)
    args = good_args(TRITON_GOOD, "cpu")
    for name in (AW_F, PS_B):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            call(backend, name, args)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("backend,dtype,deterministic,case", pc.backend_params(OP, KERNEL, {
    # 5 samples of a 9x9 map: the weight-grad work splits over samples and positions
    "cuda": grid((F32, F16), (False,), [Conv(5, 16, 16, (9, 9), 3, padding=1)]),
    "triton": [pytest.param(F16, flag, Conv(8, 64, 64, (28, 28), 3, padding=1),
                            marks=triton_gpu_only) for flag in (False, True)],
}))
def test_run_to_run_bitwise(backend, dtype, deterministic, case):
    # No floating-point atomics: bitwise the same whether deterministic algorithms are
    # asked for or not.
    t = make_inputs(case, dtype, "channels_last", backend.device, seed=14)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        runs = [[o for op in OPS for o in passes(backend, op, t, case.bias).values()]
                for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# 5 samples: waves of 1, 2 or 3 samples with a partial last wave.
THREADS_CASE = Conv(5, 16, 16, (14, 14), 3, padding=1)


def check_threads(backend, threads, layout, case):
    t = make_inputs(case, F32, layout, backend.device)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first, again = backward(backend, AW, t), backward(backend, AW, t)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    for name, o, e in zip(OUTPUTS[AW][1:], first, backward(ref, AW, t)):
        assert_cpu_close(name, o, e, F32)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", pc.LAYOUTS)
@pytest.mark.parametrize("backend", backends(OP, KERNEL, "cpu"))
def test_deterministic_and_thread_count(backend, layout, threads):
    check_threads(backend, threads, layout, THREADS_CASE)


# --------------------------------------------------------------------------- Triton only


@pytest.mark.parametrize("backend,op,layout", pc.backend_params(OP, KERNEL, {
    "triton": [(AW, "nchw"), (PS, "channels_last")]}))
def test_weight_grad_splits(backend, op, layout, monkeypatch):
    # Split-K over samples (3 samples in chunks of 2: one ragged) and two input-channel
    # blocks (20 channels in tiles of 16): each program writes its partials, the last
    # to finish adds them (dweight over chunks, dscale over channel blocks).
    monkeypatch.setattr(backend.namespace, "_FORCED_SPLITS", 2)
    check_triton(backend, op, Conv(3, 20, 8, (5, 4), 3, padding=1), F64, layout, seed=3)


@pytest.mark.parametrize("backend,op,layout,case", pc.backend_params(OP, KERNEL, {"triton": [
    pytest.param(AW, "channels_last", Conv(2, 3, 4, (5, 4), 3, stride=2, padding=1),
                 marks=interp_only),
    pytest.param(PS, "nchw", Conv(1, 2, 2, (5, 4), 3, padding=1, groups=2), marks=interp_only),
]}))
def test_int32_indexing(backend, op, layout, case, monkeypatch):
    # The interpreter indexes in int64 for speed (see _INTERP_I64); the GPU takes int32
    # offsets whenever they fit, so run that path here too.
    monkeypatch.setattr(backend.namespace, "_INTERP_I64", False)
    check_triton(backend, op, case, F32, layout, seed=5)


@pytest.mark.parametrize("backend,dtype", pc.backend_params(OP, KERNEL, {
    "triton": [pytest.param(d, marks=interp_only) for d in (F16, F32)]}))
def test_every_gpu_config_under_interpreter(backend, dtype, monkeypatch):
    # Only the interpreter's tiles run in the other tests; here every tile that autotune
    # may pick on a GPU for this dtype runs once (the three kernels' lists side by side),
    # on a shape that leaves partial blocks.
    tri = backend.namespace
    case = Conv(2, 20, 36, (5, 4), 3, stride=2, padding=1, groups=2)
    kernels = (tri._aw_conv2d_fwd_kernel, tri._aw_conv2d_bwd_input_kernel,
               tri._aw_conv2d_bwd_weight_kernel)
    # Warps and stages do not change what the interpreter computes: one run per tile.
    lists = [list({tuple(sorted(c.kwargs.items())): c for c in tri._gpu_configs(k, dtype)}
                  .values()) for k in kernels]
    wgrad_tiles = [(32, 16), (16, 32), (64, 64)]  # the launcher's (C2, C1) weight-grad tile
    for i in range(max(map(len, lists))):
        for kernel, cfgs in zip(kernels, lists):
            monkeypatch.setitem(tri._FORCED_CONFIGS, kernel, cfgs[i % len(cfgs)])
        monkeypatch.setattr(tri, "_FORCED_WGRAD_MN", wgrad_tiles[i % len(wgrad_tiles)])
        check_triton(backend, AW, case, dtype, pc.LAYOUTS[i % 2], seed=8 + i)


def gpu_shape_cases():
    """Every dtype (fp32 channels_last only); per-sample weights on the 14x14 map only."""
    out = []
    for case in TRITON_GPU_CASES:
        for op in OPS if case.groups == 1 and case.hw[0] <= 14 else (AW,):
            out += [pytest.param(op, dtype, layout, case, marks=triton_gpu_only)
                    for dtype in (BF16, F16, F32)
                    for layout in (pc.LAYOUTS if dtype != F32 else ("channels_last",))]
    return out


@pytest.mark.parametrize("backend,op,dtype,layout,case",
                         pc.backend_params(OP, KERNEL, {"triton": gpu_shape_cases()}))
def test_gpu_shapes(backend, op, dtype, layout, case):
    # Reductions here run over up to 2e5 terms (dscale at 56x56), where a bound on the
    # worst case is too loose to catch a wrong tap: judged against a float64 truth.
    check_no_worse(backend, op, case, dtype, layout)


# --------------------------------------------------------------------------- C++ CPU only
# The Winograd F(2x2, 3x3) / F(4x4, 3x3) path (3x3, stride 1, dilation 1, groups 1), forced
# through MANET_KERNELS_AW_CPU_ALGO: odd maps (1, 2, 3 rows or columns, partial last
# tiles), padding 0 / 1 / 2, N = 1 and odd N, C1 != C2, channel counts off the vector
# width. It runs only on AVX2 + FMA CPUs and silently falls back to ATen elsewhere, so
# these cases check the contract either way; each runs with the AVX2 and the AVX-512
# copy of the kernels (skipped where the CPU lacks it).

WINO_CASES = [
    Conv(1, 3, 5, (1, 1), 3, padding=1),                   # 1 x 1 map
    Conv(3, 4, 6, (5, 7), 3, padding=1),
    Conv(2, 5, 3, (2, 3), 3, padding=2),                   # padding 2
    Conv(1, 2, 3, (3, 9), 3),                              # padding 0, 1-row output
    Conv(3, 17, 9, (11, 6), 3, padding=(1, 0)),            # mixed padding
    Conv(2, 24, 40, (9, 10), 3, padding=1),
    # Enough work per sample that the batch runs in chunks (4 + 1 samples).
    Conv(5, 64, 64, (20, 20), 3, padding=1),
    # Transformed weights over 3 MB per sample: blocked mode (one sample at a time, U
    # and dU block by block), channel counts off the block width.
    Conv(2, 250, 300, (5, 7), 3, padding=1),
]
WINO_LOW = Conv(3, 16, 8, (5, 7), 3, padding=1)
BLOCKED = Conv(3, 256, 200, (6, 6), 3, padding=1)


WINOGRAD = [f"{isa}-{algo}" for isa in ("avx2", "avx512") for algo in ("winograd2", "winograd4")]
with_winograd = pytest.mark.parametrize("winograd", WINOGRAD, indirect=True)


@pytest.fixture
def winograd(request, monkeypatch):
    """The Winograd path forced, in the AVX2 and the AVX-512 copy of the kernels."""
    isa, algo = request.param.split("-")
    use_cpu_isa(isa, monkeypatch)
    monkeypatch.setenv("MANET_KERNELS_AW_CPU_ALGO", algo)


@with_winograd
@pytest.mark.parametrize("backend,op,dtype,layout,case", pc.backend_params(OP, KERNEL, {
    "cpu": grid(OPS, (F32, F64), pc.LAYOUTS, WINO_CASES) + grid(OPS, (BF16, F16), pc.LAYOUTS,
                                                             [WINO_LOW])}))
def test_winograd_matches_reference(backend, op, dtype, layout, case, winograd):
    check_cpu(backend, op, case, dtype, layout)


@with_winograd
@pytest.mark.parametrize("case", [THREADS_CASE, BLOCKED], ids=["chunks", "blocked"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", pc.LAYOUTS)
@pytest.mark.parametrize("backend", backends(OP, KERNEL, "cpu"))
def test_winograd_deterministic_and_thread_count(backend, layout, threads, case, winograd):
    check_threads(backend, threads, layout, case)


@with_winograd
@pytest.mark.parametrize("backend,op,layout,case",
                         pc.backend_params(OP, KERNEL, OTHER_LAYOUT_CASES, names=CPU))
def test_winograd_grad_in_other_layout(backend, op, layout, case, winograd):
    check_cpu(backend, op, case, F32, layout, g_layout=OTHER[layout])


@pytest.mark.parametrize("backend", backends(OP, KERNEL, "cpu"))
def test_winograd_auto_and_bad_setting(backend, monkeypatch):
    # The default choice at the benchmark's shape must agree with the contract too.
    t = make_inputs(Conv(2, 64, 64, (28, 28), 3, padding=1), F32, "nchw", backend.device)
    monkeypatch.delenv("MANET_KERNELS_AW_CPU_ALGO", raising=False)
    for name, o, e in zip(OUTPUTS[AW][1:], backward(backend, AW, t), backward(ref, AW, t)):
        assert_cpu_close(name, o, e, F32)
    monkeypatch.setenv("MANET_KERNELS_AW_CPU_ALGO", "fast")
    with pytest.raises(RuntimeError, match="MANET_KERNELS_AW_CPU_ALGO: expected auto"):
        forward(backend, AW, t, False)
