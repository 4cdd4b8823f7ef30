"""Mixed-attention pass kernels (C++ CPU, CUDA, Triton) against their contract,
``manet_kernels.reference.passes``, evaluated on the same inputs; the ``torch`` backend
(the contract itself) runs the tests that state a semantic fact (ties, NaN).

How each backend is judged (``check_sum``, ``check_act``; maxima and indices exactly):

* cpu, triton: a sum of k terms within (rtol, atol * sqrt(k) * its largest term) of the
  contract's, by accumulation dtype (``SUM_TOL``); Triton's backward sums are held to
  unit terms. Outputs in the activation dtype to one ulp of it (``ACT_TOL``).
* cuda: a sum within ``SUM_ULPS`` ulps of the sum of its absolute terms (the contract
  evaluated on absolute values); outputs in the activation dtype to one ulp.

Case lists are per backend: the interpreter runs tiny shapes and no bf16 (wrong there),
the GPU ResNet-50 stage shapes.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from passes_common import (
    HAS_GPU,
    LAYOUTS,
    SUM_ULPS,
    Backend,
    OnDevice,
    Seeded,
    acc_dtype,
    act,
    amax,
    as_tuple,
    assert_all_within,
    assert_exact,
    assert_same_format,
    assert_sum_close,
    backend_params,
    backends,
    gen,
    param_id,
    randn,
    small,
    source,
    to_layout,
)

from manet_kernels.reference import passes as ref

OP, KERNEL = "mixed_attention", "mixed_attention_apply"
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
TRITON_GPU = HAS_GPU and not Backend("triton", OP, KERNEL).interpreting
triton_gpu_only = pytest.mark.skipif(not TRITON_GPU, reason="bf16 and big shapes are GPU-only")


def grid(dtypes, *more):
    """(dtype, layout, *more) for every combination."""
    return list(itertools.product(dtypes, LAYOUTS, *more))


def gpu_cases(cases):
    return [pytest.param(*c, marks=triton_gpu_only) for c in cases]


# C++ CPU: every C meets every (H, W) once, N cycling through 1..3; BLOCKED splits a
# sample's work into several blocks (cross-block partial sums, partial blocks, lane tails).
_C, _HW = (1, 3, 7, 64), ((1, 1), (1, 7), (5, 3), (7, 7), (13, 11))
CPU_SHAPES = [(1 + (i + j) % 3, c, h, w) for i, c in enumerate(_C) for j, (h, w) in enumerate(_HW)]
BLOCKED = [(1, 40, 29, 31), (2, 130, 17, 19), (1, 64, 32, 32)]
# Triton: every C meets every (H, W) once; (C=33, P=35) spans three interpreter tiles of
# 16 along each axis. fp32 runs every shape, the other dtypes a subset.
_TC, _THW = (1, 3, 7, 33), ((1, 1), (1, 5), (3, 3), (5, 7))
TRITON_SHAPES = [(1 + (i + j) % 2, c, h, w) for i, c in enumerate(_TC)
                 for j, (h, w) in enumerate(_THW)]
TRITON_SMALL = [(2, 33, 5, 7), (1, 7, 3, 3), (2, 3, 1, 5), (1, 1, 1, 1)]
TRITON_BIG = [(3, 257, 13, 11), (2, 64, 56, 56)]
# CUDA: odd sizes, then the ResNet-50 stage shapes the tile plans are tuned for.
CUDA_SHAPES = [(n, c, h, w) for n, c, (h, w) in itertools.product(
    (1, 3), (1, 3, 7, 64, 257), ((1, 1), (1, 7), (5, 3), (7, 7), (13, 11), (56, 56)))]
RESNET = [(8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14), (8, 2048, 7, 7),
          (64, 256, 56, 56), (64, 2048, 7, 7)]
CUDA_F64 = [(1, 1, 1, 1), (3, 7, 5, 3), (2, 64, 13, 11), (2, 257, 7, 7)]
TIE_SHAPES = [(1, 1, 1, 1), (3, 7, 5, 3), (2, 257, 7, 7), (3, 257, 56, 56), (4, 2048, 7, 7),
              (2, 64, 56, 56)]

# The passes, each with its arguments (names as in the schemas).
SIGS = {
    "mixed_attention_channel_pool": ("x",),
    "mixed_attention_spatial_pool": ("x", "mc"),
    "mixed_attention_apply": ("x", "mc", "ms"),
    "mixed_attention_bwd_reduce": ("g", "x", "mc", "ms"),
    "mixed_attention_bwd_channel": ("x", "da_s", "dm_s", "ic"),
    "mixed_attention_bwd_dx": ("g", "mc", "ms", "da_s", "dm_s", "ic", "d_avg", "d_mx", "im"),
}
PASSES = [name.removeprefix("mixed_attention_") for name in SIGS]

# --------------------------------------------------------------------------- inputs


def pass_inputs(src, shape, dtype, layout, tie_dims=()):
    """Every pass argument; ``x`` without ties along ``tie_dims`` when given."""
    n, c, h, w = shape
    a = acc_dtype(dtype)
    x = src.tie_free(shape, tie_dims, dtype, layout) if tie_dims else src.act(shape, dtype, layout)
    return dict(x=x, g=src.act(shape, dtype, layout), mc=src.scale((n, c), a),
                ms=src.scale((n, h, w), a), da_s=src.normal((n, h, w), a),
                dm_s=src.normal((n, h, w), a), ic=src.index(c, (n, h, w)),
                d_avg=src.normal((n, c), a), d_mx=src.normal((n, c), a),
                im=src.index(h * w, (n, c)))


def call(fns, name, args):
    return as_tuple(getattr(fns, name)(*[args[a] for a in SIGS[name]]))


# --------------------------------------------------------------------------- judges

# (rtol, atol per sqrt(term) relative to the largest term) of a sum, by accumulation dtype
SUM_TOL = {"cpu": {F64: (1e-12, 1e-15), F32: (1e-5, 4e-7)},
           "triton": {F64: (1e-12, 1e-14), F32: (1e-5, 3e-6)}}
# (rtol, atol) of an output rounded to the activation dtype: one ulp of it
ACT_TOL = {"cpu": {F32: (2 ** -23, 1e-30), F64: (2 ** -52, 1e-300), BF16: (2 ** -7, 1e-30),
                   F16: (2 ** -10, 1e-7)},
           "cuda": {d: (torch.finfo(d).eps, torch.finfo(d).tiny) for d in (F32, F64, BF16, F16)},
           "triton": {F64: (1e-12, 1e-12), F32: (1e-5, 1e-5), F16: (1e-3, 1e-3),
                      BF16: (8e-3, 8e-3)}}


def check_sum(b, what, out, exp, *, terms, scale, bound, backward=False):
    """A sum of ``terms`` terms of magnitude up to ``scale``; ``bound()`` is the
    contract on the terms' absolute values."""
    assert out.dtype == exp.dtype and out.shape == exp.shape and out.is_contiguous(), what
    if b.name == "cuda":
        return assert_sum_close(out, exp, bound(), what)
    rtol, atol = SUM_TOL[b.name][exp.dtype]
    scale = 1.0 if b.name == "triton" and backward else max(scale, 1e-30)
    torch.testing.assert_close(out.double(), exp.double(), rtol=rtol, equal_nan=True,
                               atol=atol * max(terms, 1) ** 0.5 * scale,
                               msg=lambda m: f"{what}: {m}")


def check_act(b, what, out, exp, x):
    assert_same_format(out, x)
    assert out.stride() == exp.stride(), f"{what}: memory format differs"
    rtol, atol = ACT_TOL[b.name][x.dtype]
    torch.testing.assert_close(out, exp, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def check_pass(b, name, args):
    """One pass of backend ``b`` against the contract on ``args``."""
    out, exp = call(b, name, args), call(ref, name, args)
    a = {k: v.abs() if v.is_floating_point() else v for k, v in args.items()}
    x, (c, h, w) = args["x"], args["x"].shape[1:]
    if name in ("mixed_attention_apply", "mixed_attention_bwd_dx"):
        return check_act(b, name, out[0], exp[0], args["g" if "g" in SIGS[name] else "x"])
    if name.endswith("pool"):
        k = h * w if name.endswith("channel_pool") else c
        check_sum(b, f"{name} mean", out[0], exp[0], terms=k, scale=amax(x.double()),
                  bound=lambda: call(ref, name, a)[0])
        assert_exact(out[1], exp[1], f"{name} max")
        return assert_exact(out[2], exp[2], f"{name} index")
    if name.endswith("bwd_reduce"):
        term = amax(args["g"].double()) * amax(x.double())
        bounds = call(ref, name, a)
        for what, o, e, bnd, k in zip(("dms", "dmc"), out, exp, bounds, (c, h * w)):
            check_sum(b, what, o, e, terms=k, scale=term, bound=lambda bnd=bnd: bnd,
                      backward=True)
        return None
    term = amax(x.double()) * (amax(args["da_s"]) + amax(args["dm_s"]))  # bwd_channel
    return check_sum(b, "dmc", out[0], exp[0], terms=h * w, scale=term, backward=True,
                     bound=lambda: call(ref, name, a)[0])


def check_all(b, args):
    for name in SIGS:
        check_pass(b, name, args)


# --------------------------------------------------------------------------- each pass

PASS_CASES = {
    "cpu": grid((F32,), CPU_SHAPES) + grid((F64, BF16, F16), CPU_SHAPES[::3])
    + grid((F32, F64, BF16), BLOCKED),
    "cuda": grid((F32, F16, BF16), CUDA_SHAPES) + grid((BF16, F32), RESNET)
    + grid((F64,), CUDA_F64),
    "triton": grid((F32,), TRITON_SHAPES) + grid((F16, F64), TRITON_SMALL)
    + gpu_cases(grid((BF16,), TRITON_SMALL) + grid((F32, F16, F64, BF16), TRITON_BIG)),
}
# x without ties along the reduced axes, where a pass takes a maximum
TIE_DIMS = {"channel_pool": (2, 3), "spatial_pool": (1,)}


@pytest.mark.parametrize("name", PASSES)
@pytest.mark.parametrize("backend,dtype,layout,shape", backend_params(OP, KERNEL, PASS_CASES))
def test_pass(backend, dtype, layout, shape, name):
    src = source(backend, 1 + PASSES.index(name))
    args = pass_inputs(src, shape, dtype, layout, TIE_DIMS.get(name, ()))
    check_pass(backend, f"mixed_attention_{name}", args)


@pytest.mark.parametrize("backend,layout", backend_params(OP, KERNEL, {
    b: [(lay,) for lay in LAYOUTS] for b in ("cpu", "cuda", "triton")}))
def test_bwd_dx_picked_positions_collide(backend, layout):
    # Every channel's argmax position is also a picked position of that channel,
    # so both one-hot terms land on the same elements.
    n, c, h, w = shape = (2, 5, 3, 4)
    args = pass_inputs(Seeded(7, backend.device), shape, F32, layout)
    ic = (torch.arange(h * w, dtype=torch.int32) % c).reshape(1, h, w).repeat(n, 1, 1)
    args.update(ic=ic.to(backend.device),  # position p = c picks channel c
                im=torch.arange(c, dtype=torch.int32).repeat(n, 1).to(backend.device))
    check_pass(backend, "mixed_attention_bwd_dx", args)


@pytest.mark.parametrize("g_layout,x_layout", [("nchw", "channels_last"),
                                               ("channels_last", "nchw")])
@pytest.mark.parametrize("backend", backends(OP, KERNEL, "triton"))
def test_bwd_reduce_mixed_layouts(backend, g_layout, x_layout):
    src = Seeded(7, backend.device)
    args = pass_inputs(src, (2, 33, 5, 7), F32, x_layout)
    args["g"] = to_layout(args["g"], g_layout)
    check_pass(backend, "mixed_attention_bwd_reduce", args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", backends(OP, KERNEL, "cpu"))
def test_split_is_independent_of_thread_count(backend, layout):
    # Work is split by shape only, so the cross-block sums are bitwise identical
    # whatever the number of threads.
    args = pass_inputs(Seeded(8, "cpu"), (1, 64, 32, 32), F32, layout)
    names = [n for n in SIGS if "pool" in n or "bwd_reduce" in n or "bwd_channel" in n]

    def run():
        return [t for name in names for t in call(backend, name, args)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(threads, 2))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,dtype,layout,shape", backend_params(OP, KERNEL, {
    "cuda": grid((F32, BF16), [(3, 257, 56, 56), (4, 2048, 7, 7), (8, 512, 28, 28),
                               (1, 3, 300, 301)]),
    "triton": gpu_cases(grid((F32, BF16), [(2, 64, 56, 56)]))}))
def test_deterministic(backend, dtype, layout, shape):
    args = pass_inputs(source(backend, 11), shape, dtype, layout)
    for name in SIGS:
        first = [t.clone() for t in call(backend, name, args)]
        for _ in range(3):
            assert all(torch.equal(u, v) for u, v in zip(first, call(backend, name, args))), name


@pytest.mark.parametrize("dtype", (F32, F16, BF16), ids=param_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", backends(OP, KERNEL, "cuda"))
def test_misaligned_activation_uses_scalar_path(backend, layout, dtype):
    """A view starting one element into its storage cannot take vector loads."""
    shape = (2, 64, 14, 14)
    args = pass_inputs(OnDevice(0, "cuda"), shape, dtype, layout)
    store = torch.empty(args["x"].numel() + 1, device="cuda", dtype=dtype)
    x = store.as_strided(shape, args["x"].stride(), storage_offset=1)
    x.copy_(args["x"])
    assert (x.data_ptr() % 16) != 0 and x.is_contiguous(memory_format=(
        torch.channels_last if layout == "channels_last" else torch.contiguous_format))
    args.update(x=x, g=x)
    check_all(backend, args)


# --------------------------------------------------------------------------- max / argmax


def first_max_index(v, dim):
    """Lowest index of the maximum along ``dim`` (NaN counts as the maximum)."""
    nan = v.isnan()
    top = torch.where(nan.any(dim, keepdim=True), nan,
                      v == v.nan_to_num(nan=-float("inf")).amax(dim, keepdim=True))
    shape = [1] * v.dim()
    shape[dim] = v.shape[dim]
    pos = torch.arange(v.shape[dim], device=v.device).reshape(shape)
    return torch.where(top, pos, v.shape[dim]).amin(dim).to(torch.int32)


VALUES = (0.5, 0.0, float("-inf"))


@pytest.mark.parametrize("backend,dtype,layout,shape,value", backend_params(OP, KERNEL, {
    "cpu": grid((F32, F64, BF16, F16), [(2, 37, 5, 7)], VALUES),
    "cuda": grid((F32, F16, BF16), TIE_SHAPES, (0.75, float("-inf"))),
    "triton": grid((F32,), [(2, 33, 5, 7)], VALUES),
    "torch": grid((F32,), [(2, 37, 5, 7)], VALUES)}))
def test_all_equal_picks_index_zero(backend, dtype, layout, shape, value):
    n, c, h, w = shape
    acc, dev = acc_dtype(dtype), backend.device
    x = to_layout(torch.full(shape, value, device=dev).to(dtype), layout)
    mc = torch.full((n, c), 0.75, dtype=acc, device=dev)
    _, mx, im = backend.mixed_attention_channel_pool(x)
    _, sm, ic = backend.mixed_attention_spatial_pool(x, mc)
    assert torch.equal(im, torch.zeros(n, c, dtype=torch.int32, device=dev))
    assert torch.equal(ic, torch.zeros(n, h, w, dtype=torch.int32, device=dev))
    assert torch.equal(mx, torch.full((n, c), value, dtype=acc, device=dev))
    assert torch.equal(sm, torch.full((n, h, w), value * 0.75, dtype=acc, device=dev))


@pytest.mark.parametrize("backend,dtype,layout,shape", backend_params(OP, KERNEL, {
    "cpu": grid((F32, F16), [(2, 37, 5, 7), (1, 64, 29, 31)]),
    "cuda": grid((F32, F16, BF16), TIE_SHAPES),
    "triton": grid((F32, F16), [(2, 33, 5, 7)]),
    "torch": grid((F32,), [(2, 37, 5, 7)])}))
def test_many_ties_first_max(backend, dtype, layout, shape):
    # Three distinct values: rows and columns tie at their max many times, also in
    # later lanes, warps, tiles and row groups than the first occurrence.
    n, c, h, w = shape
    x = to_layout(source(backend, 9).index(3, shape).to(dtype), layout)
    xa = x.to(acc_dtype(dtype))
    _, mx, im = backend.mixed_attention_channel_pool(x)
    assert_exact(mx, xa.reshape(n, c, h * w).amax(2), "mx")
    assert_exact(im, first_max_index(xa.reshape(n, c, h * w), 2), "im")
    _, sm, ic = backend.mixed_attention_spatial_pool(x, torch.ones_like(mx))
    assert_exact(sm, xa.amax(1), "sm")
    assert_exact(ic, first_max_index(xa, 1), "ic")


@pytest.mark.parametrize("backend,layout", backend_params(OP, KERNEL, {
    b: [(lay,) for lay in LAYOUTS] for b in ("cpu", "torch")}))
def test_tie_at_a_later_index_loses(backend, layout):
    n, c, h, w = shape = (1, 20, 6, 7)
    base = torch.zeros(shape, dtype=torch.float64)
    base[0, 4, 1, 2] = base[0, 4, 5, 6] = 3.0  # channel 4: maximum at positions 9 and 41
    base[0, :, 0, 3] = -1.0
    base[0, 6, 0, 3] = base[0, 17, 0, 3] = 2.0  # position 3: maximum at channels 6 and 17
    x = act(base, F32, layout, backend.device)
    assert backend.mixed_attention_channel_pool(x)[2][0, 4].item() == 1 * w + 2
    mc = torch.ones(n, c, device=backend.device)
    assert backend.mixed_attention_spatial_pool(x, mc)[2][0, 0, 3].item() == 6


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
@pytest.mark.parametrize("backend,dtype,layout,shape", backend_params(OP, KERNEL, {
    "cpu": grid((F32, F64, BF16, F16), [(2, 37, 5, 7)]),
    "triton": grid((F32,), [(2, 33, 5, 7)])}))
def test_nan_propagates_first_nan_wins(backend, dtype, layout, shape):
    g = gen(10)
    n, c, h, w = shape
    base = randn(shape, g)
    base[0, 5, 2, 3] = base[0, 5, 4, 6] = float("nan")    # two NaNs in one channel
    base[0, 6, 4, 6] = float("nan")                       # a NaN in the last position
    base[1, :, 0, 0] = float("-inf")                      # a -inf position
    base[1, 20, 1, 1] = base[1, 31, 1, 1] = float("nan")  # two NaNs at one position
    base[1, 2, 3, 3] = float("inf")                       # inf and -inf: a NaN sum, no NaN
    base[1, 2, 0, 0] = float("-inf")
    x = act(base, dtype, layout, backend.device)
    mc = small((n, c), g, acc_dtype(dtype), backend.device, unit=True)
    avg, mx, im = backend.mixed_attention_channel_pool(x)
    e_avg, e_mx, e_im = ref.mixed_attention_channel_pool(x)
    assert_exact(mx, e_mx, "mx")
    assert_exact(im, e_im, "im")
    assert im[0, 5].item() == 2 * w + 3 and im[0, 6].item() == h * w - 1
    assert im[1, 2].item() == 3 * w + 3 and mx[1, 2].item() == float("inf")
    torch.testing.assert_close(avg, e_avg, equal_nan=True)
    sa, sm, ic = backend.mixed_attention_spatial_pool(x, mc)
    e_sa, e_sm, e_ic = ref.mixed_attention_spatial_pool(x, mc)
    assert_exact(sm, e_sm, "sm")
    assert_exact(ic, e_ic, "ic")
    assert ic[1, 1, 1].item() == 20
    torch.testing.assert_close(sa, e_sa, equal_nan=True)


@pytest.mark.parametrize("backend,dtype,layout,shape", backend_params(OP, KERNEL, {
    "cuda": grid((F32, F16, BF16), [(2, 7, 5, 3), (3, 257, 56, 56), (4, 2048, 7, 7)]),
    "torch": grid((F32,), [(2, 7, 5, 3)])}))
def test_nan_is_the_max_first_nan_wins(backend, dtype, layout, shape):
    n, c, h, w = shape
    p = h * w
    src = source(backend, 10)
    x = src.act(shape, dtype, layout)
    # channel pool: NaNs at two positions of (0, c-1); the lower one is the index
    xn = x.clone()
    p1, p2 = p // 3, (2 * p) // 3 + (1 if p > 2 else 0)
    for q in (p2, p1):
        xn[0, c - 1, q // w, q % w] = float("nan")
    _, mx, im = backend.mixed_attention_channel_pool(xn)
    assert mx[0, c - 1].isnan() and im[0, c - 1].item() == min(p1, p2)
    assert not mx[1:].isnan().any() and not mx[0, : c - 1].isnan().any()
    # spatial pool: NaNs at two channels of (n-1, last position)
    xn = x.clone()
    c1, c2 = c // 3, (2 * c) // 3
    for q in (c2, c1):
        xn[n - 1, q, h - 1, w - 1] = float("nan")
    _, sm, ic = backend.mixed_attention_spatial_pool(xn, src.scale((n, c), acc_dtype(dtype)))
    assert sm[n - 1, h - 1, w - 1].isnan() and ic[n - 1, h - 1, w - 1].item() == min(c1, c2)
    assert sm.isnan().sum().item() == 1


# --------------------------------------------------------------------------- empty batch, errors


@pytest.mark.parametrize("backend,dtype,layout", backend_params(OP, KERNEL, {
    "cpu": grid((F32, F64)), "cuda": grid((F32, F16, BF16, F64)), "triton": grid((F32,))}))
def test_empty_batch(backend, dtype, layout):
    args = pass_inputs(source(backend, 0), (0, 3, 2, 5), dtype, layout)
    for name in SIGS:
        out, exp = call(backend, name, args), call(ref, name, args)
        # (an empty tensor is contiguous in every format: its strides mean nothing)
        assert [(o.shape, o.dtype, o.device) for o in out] == \
            [(e.shape, e.dtype, e.device) for e in exp], name


def good_args():
    n, c, h, w = 2, 3, 4, 5
    g = gen(11)
    return dict(x=randn((n, c, h, w), g).float(), g=randn((n, c, h, w), g).float(),
                mc=torch.rand(n, c), ms=torch.rand(n, h, w), da_s=torch.randn(n, h, w),
                dm_s=torch.randn(n, h, w), ic=torch.zeros(n, h, w, dtype=torch.int32),
                d_avg=torch.randn(n, c), d_mx=torch.randn(n, c),
                im=torch.zeros(n, c, dtype=torch.int32))


BAD = [  # (argument, how to spoil it, error, what the C++ message says, where it applies)
    ("x", lambda t: t[0], ValueError, "rank-4", None),
    ("x", lambda t: t.to(torch.int32), TypeError, "dtype", None),
    ("x", lambda t: t.transpose(2, 3), ValueError, "contiguous", None),  # neither layout
    ("x", lambda t: t.repeat(1, 1, 1, 2)[..., ::2], ValueError, "contiguous", None),  # odd strides
    ("x", lambda t: t.tolist(), TypeError, "tensor", "triton"),  # the dispatcher's error in C++
    ("g", lambda t: t[..., :4], ValueError, "contiguous", None),
    ("g", lambda t: t[..., :4].contiguous(), ValueError, "shape", "x"),  # g must match x
    ("g", lambda t: t.double(), TypeError, "dtype", "x"),  # (g sets the acc dtype in bwd_dx)
    ("mc", lambda t: t.double(), TypeError, "float32", None),
    ("mc", lambda t: t.half(), TypeError, "float32", None),
    ("mc", lambda t: t[:, :2], ValueError, "shape", None),
    ("mc", lambda t: t.t().contiguous().t(), ValueError, "contiguous", "cpu"),  # Triton: strides ok
    ("ms", lambda t: t[:, None], ValueError, "shape", None),   # (N, 1, H, W) is not the contract
    ("da_s", lambda t: t.double(), TypeError, "float32", None),
    ("dm_s", lambda t: t.reshape(2, 20), ValueError, "shape", None),
    ("ic", lambda t: t.long(), TypeError, "int32", None),
    ("ic", lambda t: t[:, :2], ValueError, "shape", None),
    ("d_avg", lambda t: t[:1], ValueError, "shape", None),
    ("d_mx", lambda t: t.half(), TypeError, "float32", None),
    ("im", lambda t: t.float(), TypeError, "int32", None),
    ("im", lambda t: t.reshape(3, 2), ValueError, "shape", None),
]


@pytest.mark.parametrize("name", list(SIGS))
@pytest.mark.parametrize("backend", backends(OP, KERNEL, "cpu", "triton"))
def test_bad_arguments(backend, name):
    names = SIGS[name]
    checked = 0
    for arg, spoil, err, words, where in BAD:
        if arg not in names or where not in (None, backend.name, *names):
            continue
        args = {k: v.to(backend.device) for k, v in good_args().items()}
        args[arg] = spoil(args[arg])
        pattern = rf"^{arg}: expected" + (f" .*{words}" if backend.name == "cpu" else "")
        with pytest.raises(err, match=pattern):
            call(backend, name, args)
        checked += 1
    assert checked


@pytest.mark.parametrize("backend", backends(OP, KERNEL, "cpu"))
def test_bad_argument_relations(backend):
    a = good_args()
    cl = a["g"].contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"^g: expected the memory format of x"):
        backend.mixed_attention_bwd_reduce(cl, a["x"], a["mc"], a["ms"])
    with pytest.raises(TypeError, match=r"^g: expected the dtype of x"):
        backend.mixed_attention_bwd_reduce(a["g"].double(), a["x"], a["mc"], a["ms"])
    with pytest.raises(TypeError, match=r"^mc: expected dtype float64"):  # acc dtype of fp64 x
        backend.mixed_attention_spatial_pool(a["x"].double(), a["mc"])
    with pytest.raises(ValueError, match=r"^ic: expected channel indices in \[0, C=3\)"):
        backend.mixed_attention_bwd_channel(a["x"], a["da_s"], a["dm_s"], a["ic"] + 3)
    with pytest.raises(ValueError, match=r"^ic: expected channel indices"):
        backend.mixed_attention_bwd_channel(a["x"], a["da_s"], a["dm_s"], a["ic"] - 1)
    with pytest.raises(ValueError, match=r"^x: expected H\*W >= 1"):
        backend.mixed_attention_channel_pool(torch.zeros(1, 2, 0, 3))
    with pytest.raises(ValueError, match=r"^x: expected C >= 1"):
        backend.mixed_attention_spatial_pool(torch.zeros(1, 0, 2, 3), torch.zeros(1, 0))


@pytest.mark.parametrize("backend", backends(OP, KERNEL, "cuda"))
def test_bad_arguments_name_the_argument(backend):
    n, c, h, w = 2, 8, 5, 3

    def rnd(*shape):
        return torch.randn(*shape, device="cuda")

    x, g, s = rnd(n, c, h, w), rnd(n, c, h, w), rnd(n, h, w)
    mc, ms = rnd(n, c).abs() + 0.5, rnd(n, h, w).abs() + 0.5
    ic = torch.randint(0, c, (n, h, w), device="cuda", dtype=torch.int32)
    im = torch.randint(0, h * w, (n, c), device="cuda", dtype=torch.int32)
    cp, sp = backend.mixed_attention_channel_pool, backend.mixed_attention_spatial_pool
    ap, br = backend.mixed_attention_apply, backend.mixed_attention_bwd_reduce
    bc, bd = backend.mixed_attention_bwd_channel, backend.mixed_attention_bwd_dx
    cases = [  # (argument, pass, spoilt arguments)
        # activation: rank, dtype, layout, device
        ("x", cp, x[0]), ("x", cp, x.to(torch.int32)), ("x", cp, x[..., ::2]),
        ("x", cp, x.permute(0, 1, 3, 2)), ("x", sp, x.cpu(), mc),
        ("g", bd, g.transpose(2, 3), mc, ms, s, s, ic, mc, mc, im),
        # a CPU tensor mixed with CUDA ones
        ("mc", sp, x, mc.cpu()), ("ms", ap, x, mc, ms.cpu()), ("g", br, g.cpu(), x, mc, ms),
        ("ic", bc, x, s, s, ic.cpu()), ("im", bd, g, mc, ms, s, s, ic, mc, mc, im.cpu()),
        # shapes
        ("mc", sp, x, rnd(n, c + 1)), ("mc", ap, x, rnd(n + 1, c), ms),
        ("ms", ap, x, mc, rnd(n, h * w)), ("ms", br, g, x, mc, rnd(n, w, h)),
        ("g", br, g[:, :-1], x, mc, ms), ("da_s", bc, x, rnd(n, h, w + 1), s, ic),
        ("dm_s", bc, x, s, rnd(n, 1, h, w), ic),
        ("d_avg", bd, g, mc, ms, s, s, ic, rnd(n, c, 1), mc, im),
        ("d_mx", bd, g, mc, ms, s, s, ic, mc, rnd(c), im),
        # dtypes: small tensors in the accumulation dtype, indices int32
        ("mc", sp, x, mc.double()), ("mc", sp, x.half(), mc.half()),
        ("ic", bc, x, s, s, ic.long()), ("im", bd, g, mc, ms, s, s, ic, mc, mc, im.long()),
        ("g", br, g.double(), x, mc, ms),
        # layouts: g must share x's; small tensors contiguous
        ("g", br, g.contiguous(memory_format=torch.channels_last), x, mc, ms),
        ("mc", sp, x, rnd(c, n).t()),
    ]
    for name, fn, *args in cases:
        with pytest.raises(RuntimeError, match=rf"expected {name}\b"):
            fn(*args)


@pytest.mark.slow
@pytest.mark.parametrize("backend", backends(OP, KERNEL, "cuda"))
def test_more_than_2_pow_31_elements(backend):
    """64-bit offsets: a bf16 activation of 2^31 + 65536 elements (4.3 GB)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    n, c, h, w = 1, 2, 32768, 32769
    x = torch.empty(n, c, h, w, device="cuda", dtype=torch.bfloat16).uniform_(-1, 1)
    x[0, 1, -1, -2] = 3.0  # the max of channel 1, past element 2^31
    avg, mx, im = backend.mixed_attention_channel_pool(x)
    assert mx[0, 1].item() == 3.0 and im[0, 1].item() == h * w - 2
    torch.testing.assert_close(avg[0, 1], x[0, 1].float().mean(), rtol=1e-3, atol=1e-5)
    mc = torch.full((n, c), 0.5, device="cuda")
    ms = torch.full((n, h, w), 2.0, device="cuda")
    y = backend.mixed_attention_apply(x, mc, ms)
    assert torch.equal(y[0, 1, -4:], x[0, 1, -4:])  # 0.5 * 2 is exact
    del y
    sa, sm, ic = backend.mixed_attention_spatial_pool(x, mc)
    assert ic[0, -1, -2].item() == 1 and sm[0, -1, -2].item() == 1.5


# --------------------------------------------------------------------------- Triton only


def assert_pass_close(fns, name, args, what=""):
    """Indices exactly, the rest within 2e-5 of the contract."""
    for o, e in zip(call(fns, name, args), call(ref, name, args)):
        if e.dtype == torch.int32:
            assert_exact(o, e, name)
        else:
            torch.testing.assert_close(o, e, rtol=1e-5, atol=2e-5,
                                       msg=lambda m: f"{name} {what}: {m}")


@pytest.mark.parametrize("backend", backends(OP, KERNEL, "triton"))
def test_cpu_tensors_need_the_interpreter(backend, monkeypatch):
    monkeypatch.setattr(backend.namespace, "_interpreting", lambda: False)
    a = good_args()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend.mixed_attention_channel_pool(a["x"])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend.mixed_attention_apply(a["x"], a["mc"], a["ms"])


# the autotune configs each pass's kernel may take on a GPU
GPU_CONFIGS = {"channel_pool": "_POOL_C_CONFIGS", "spatial_pool": "_POOL_P_CONFIGS",
               "apply": "_ELEMENTWISE_CONFIGS", "bwd_reduce": "_BWD_REDUCE_CONFIGS",
               "bwd_channel": "_BWD_CHANNEL_CONFIGS", "bwd_dx": "_ELEMENTWISE_CONFIGS"}


@pytest.mark.skipif(TRITON_GPU, reason="GPU autotune covers these on a GPU")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", backends(OP, KERNEL, "triton"))
def test_every_gpu_config_under_interpreter(backend, layout, monkeypatch):
    # Only the interpreter's single tile runs in the other tests; here every block
    # shape that autotune may pick on a GPU runs once, on a shape with partial blocks
    # in both axes (and bwd_reduce with both of its position blocks).
    import triton

    tri = backend.namespace
    args = pass_inputs(Seeded(10, "cpu"), (1, 19, 3, 7), F32, layout, tie_dims=(1, 2, 3))
    for p, configs in GPU_CONFIGS.items():
        kernel = getattr(tri, f"_mixed_attention_{p}_kernel")
        for kw, warps in getattr(tri, configs):
            for bp in [32, 64] if p == "bwd_reduce" else [None]:
                cfg = triton.Config(kw, num_warps=warps)
                monkeypatch.setitem(tri._FORCED_CONFIGS, kernel, cfg)
                if bp is not None:
                    monkeypatch.setattr(tri, "_bwd_reduce_block_p", lambda p, cl, bp=bp: bp)
                assert_pass_close(tri, f"mixed_attention_{p}", args, str(cfg))
        monkeypatch.delitem(tri._FORCED_CONFIGS, kernel)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", backends(OP, KERNEL, "triton"))
def test_int64_offsets_path(backend, layout, monkeypatch):
    # Tensors of 2**31 elements do not fit a test; force the int64 offset code on a
    # small one instead.
    monkeypatch.setattr(backend.namespace, "_needs_i64", lambda *ts: True)
    args = pass_inputs(Seeded(12, backend.device), (2, 19, 3, 7), F32, layout, (1, 2, 3))
    for name in SIGS:
        assert_pass_close(backend, name, args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", backends(OP, KERNEL, "triton"))
def test_deterministic_algorithms_fixed_config(backend, layout):
    args = pass_inputs(Seeded(13, backend.device), (2, 19, 3, 7), F32, layout, (1, 2, 3))
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for name in SIGS:
            assert_pass_close(backend, name, args)
    finally:
        torch.use_deterministic_algorithms(before)


# --------------------------------------------------------------------------- spatial conv
# The k x k conv (padding k//2) on the [mean, max] map: sa, sm, dz (N, H, W) in the acc
# dtype, float32 or float64. C++ CPU and CUDA only (Triton leaves it to cuDNN).

CONV_CASES = {  # (dtype, (N, H, W), k, bias)
    "cpu": [(d, (n, h, w), k, b) for d in (F32, F64) for n, h, w, k, b in [
        (2, 28, 28, 7, True), (3, 5, 7, 7, False), (1, 1, 1, 3, True), (2, 3, 2, 7, True),
        (4, 9, 13, 1, False), (1, 6, 17, 5, True), (0, 4, 4, 3, True)]],
    "cuda": list(itertools.product(
        (F32, F64), [(1, 1, 1), (3, 5, 1), (2, 1, 7), (5, 13, 11), (4, 56, 56)], (1, 3, 5, 7),
        (False, True)))
    # maps over many blocks, dweight split into several chunks per tap, and k > H
    + list(itertools.product((F32,), [(3, 300, 301), (64, 56, 56), (3, 7, 9)], (3, 7, 9),
                             (True,))),
}


def conv_inputs(b, dtype, shape, k, bias):
    g = gen(11)
    sa, sm, dz = (randn(shape, g).to(b.device, dtype) for _ in range(3))
    weight = randn((1, 2, k, k), g).to(b.device, dtype)
    return sa, sm, dz, weight, randn((1,), g).to(b.device, dtype) if bias else None


def conv_passes(fns, sa, sm, dz, w, b):
    return (fns.mixed_attention_spatial_conv(sa, sm, w, b),
            *fns.mixed_attention_spatial_conv_bwd(dz, sa, sm, w, b is not None))


def check_spatial_conv(backend, sa, sm, dz, w, b):
    dtype, k, (n, h, wd) = sa.dtype, w.shape[-1], sa.shape
    out = conv_passes(backend, sa, sm, dz, w, b)
    names = ("z", "dsa", "dsm", "dweight", "dbias")
    if backend.name == "cuda":
        # the contract in float64 (cuDNN in float32 may take TF32); every output a sum,
        # within SUM_ULPS ulps of the dtype of the sum of its absolute terms
        exp = conv_passes(ref, *(None if t is None else t.double() for t in (sa, sm, dz, w, b)))
        bound = conv_passes(ref, *(None if t is None else t.double().abs()
                                   for t in (sa, sm, dz, w, b)))
        fi = torch.finfo(dtype)
        for name, o, e, a in zip(names, out, exp, bound):
            assert o.dtype == dtype and o.shape == e.shape, name
            assert o.device == e.device and o.is_contiguous(), name
            assert_all_within((o.double() - e).abs(), SUM_ULPS * fi.eps * a + fi.tiny,
                              o.numel(), name)
        assert b is not None or out[4].shape == (0,)
        return
    rtol = 1e-5 if dtype == F32 else 1e-12
    for name, o, e in zip(names, out, conv_passes(ref, sa, sm, dz, w, b)):
        assert o.shape == e.shape and o.dtype == dtype, name
        # |z|, dsa, dsm: sums of 2*k*k unit-scale products; dweight / dbias of N*H*W
        atol = rtol * (k if name in ("z", "dsa", "dsm") else max(1, n * h * wd) ** 0.5)
        torch.testing.assert_close(o, e, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("backend,dtype,shape,k,bias", backend_params(OP, KERNEL, CONV_CASES))
def test_spatial_conv(backend, dtype, shape, k, bias):
    check_spatial_conv(backend, *conv_inputs(backend, dtype, shape, k, bias))


@pytest.mark.parametrize("backend,dtype,bias", backend_params(OP, KERNEL, {
    b: list(itertools.product((F32, F64), (False, True))) for b in ("cpu", "cuda")}))
def test_spatial_conv_empty_batch(backend, dtype, bias):
    sa, sm, dz, w, b = conv_inputs(backend, dtype, (0, 5, 7), 3, bias)
    z, dsa, dsm, dw, db = conv_passes(backend, sa, sm, dz, w, b)
    assert z.shape == (0, 5, 7) and z.dtype == dtype and z.device == sa.device
    assert dsa.shape == dsm.shape == (0, 5, 7) and dsa.dtype == dsm.dtype == dtype
    assert torch.equal(dw, torch.zeros(1, 2, 3, 3, device=sa.device, dtype=dtype))
    assert torch.equal(db, torch.zeros(1 if bias else 0, device=sa.device, dtype=dtype))


@pytest.mark.parametrize("backend,dtype", backend_params(OP, KERNEL, {
    "cpu": [(F32,)], "cuda": [(F32,), (F64,)]}))
def test_spatial_conv_noncontiguous(backend, dtype):
    sa, sm, dz, w, b = conv_inputs(backend, dtype, (3, 19, 23), 7, True)

    def transposed(t):  # same values, (N, W, H)-contiguous storage
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    def strided(t):  # same values, every other element of a larger buffer
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], device=t.device, dtype=dtype)
        buf[..., ::2] = t
        return buf[..., ::2]

    views = [transposed(sa), strided(sm), strided(dz), transposed(w)]
    assert not any(v.is_contiguous() for v in views)
    b_buf = torch.randn(3, device=b.device, dtype=dtype)
    b_buf[1:2] = b
    got = conv_passes(backend, views[0], views[1], views[2], views[3], b_buf[1:2])  # offset 1
    for name, u, v in zip(("z", "dsa", "dsm", "dweight", "dbias"), got,
                          conv_passes(backend, sa, sm, dz, w, b)):
        assert u.is_contiguous() and torch.equal(u, v), name


@pytest.mark.parametrize("backend,dtype,shape", backend_params(OP, KERNEL, {
    "cpu": [(F32, (5, 19, 23))],
    "cuda": list(itertools.product((F32, F64), [(4, 56, 56), (64, 56, 56), (2, 300, 301)]))}))
def test_spatial_conv_deterministic(backend, dtype, shape):
    inputs = conv_inputs(backend, dtype, shape, 7, True)
    first = [t.clone() for t in conv_passes(backend, *inputs)]
    for _ in range(2):
        for name, u, v in zip(("z", "dsa", "dsm", "dweight", "dbias"), first,
                              conv_passes(backend, *inputs)):
            assert torch.equal(u, v), name


@pytest.mark.parametrize("backend", backends(OP, KERNEL, "cpu", "cuda"))
def test_spatial_conv_bad_arguments_name_the_argument(backend):
    dev = backend.device
    sa = torch.randn(2, 5, 5, device=dev)
    w = torch.randn(1, 2, 3, 3, device=dev)
    b = torch.randn(1, device=dev)
    fwd, bwd = backend.mixed_attention_spatial_conv, backend.mixed_attention_spatial_conv_bwd
    cases = [  # (error, message, pass, arguments)
        # dtypes: float32 / float64 only, every tensor in sa's
        (TypeError, r"^sa: expected dtype float32 or float64", fwd, sa.half(), sa.half(),
         w.half(), None),
        (TypeError, r"^sm: expected dtype float32", fwd, sa, sa.double(), w, None),
        (TypeError, r"^weight: expected dtype float32", fwd, sa, sa, w.double(), None),
        (TypeError, r"^bias: expected dtype float32", fwd, sa, sa, w, b.double()),
        (TypeError, r"^dz: expected dtype float32", bwd, sa.double(), sa, sa, w, False),
        # shapes
        (ValueError, r"^sa: expected a rank-3", fwd, sa[0], sa[0], w, None),
        (ValueError, r"^sm: expected shape", fwd, sa, sa[:, :4], w, None),
        (ValueError, r"^weight: expected shape \(1, 2, k, k\) with k odd", fwd, sa, sa,
         torch.randn(1, 2, 4, 4, device=dev), None),
        (ValueError, r"^weight: expected shape", fwd, sa, sa,
         torch.randn(1, 1, 3, 3, device=dev), None),
        (ValueError, r"^weight: expected shape", bwd, sa, sa, sa,
         torch.randn(1, 2, 3, 5, device=dev), True),
        (ValueError, r"^bias: expected shape \(1,\)", fwd, sa, sa, w, torch.randn(2, device=dev)),
        (ValueError, r"^bias: expected shape \(1,\)", fwd, sa, sa, w,
         torch.randn((), device=dev)),
        (ValueError, r"^dz: expected shape", bwd, sa[:1], sa, sa, w, False),
    ]
    if backend.name == "cuda":  # a CPU tensor mixed with CUDA ones
        cases += [
            (RuntimeError, r"^sa: expected a CUDA tensor", fwd, sa.cpu(), sa, w, None),
            (RuntimeError, r"^sm: expected a CUDA tensor", fwd, sa, sa.cpu(), w, None),
            (RuntimeError, r"^weight: expected a CUDA tensor", fwd, sa, sa, w.cpu(), b),
            (RuntimeError, r"^bias: expected a CUDA tensor", fwd, sa, sa, w, b.cpu()),
            (RuntimeError, r"^dz: expected a CUDA tensor", bwd, sa.cpu(), sa, sa, w, True),
            (RuntimeError, r"^weight: expected a CUDA tensor", bwd, sa, sa, sa, w.cpu(), True)]
    for err, pattern, fn, *args in cases:
        with pytest.raises(err, match=pattern):
            fn(*args)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", backends(OP, KERNEL, "cuda"))
def test_spatial_conv_device_mismatch_names_the_argument(backend):
    sa = torch.randn(2, 5, 5, device="cuda:0")
    w = torch.randn(1, 2, 3, 3, device="cuda:0")
    fwd, bwd = backend.mixed_attention_spatial_conv, backend.mixed_attention_spatial_conv_bwd
    with pytest.raises(RuntimeError, match=r"^sm: expected a tensor on cuda:0"):
        fwd(sa, sa.to("cuda:1"), w, None)
    with pytest.raises(RuntimeError, match=r"^bias: expected a tensor on cuda:0"):
        fwd(sa, sa, w, torch.randn(1, device="cuda:1"))
    with pytest.raises(RuntimeError, match=r"^dz: expected a tensor on cuda:0"):
        bwd(sa.to("cuda:1"), sa, sa, w, False)
    # on a second device the outputs stay there
    s1, w1 = sa.to("cuda:1"), w.to("cuda:1")
    z = fwd(s1, s1, w1, None)
    assert z.device == s1.device
    torch.testing.assert_close(z.cpu(), fwd(sa, sa, w, None).cpu())


@pytest.mark.parametrize("dtype", [F32, BF16], ids=param_id)
@pytest.mark.parametrize("backend", backends(OP, KERNEL, "cuda"))
def test_fused_op_with_the_cuda_spatial_conv(backend, monkeypatch, dtype):
    """The whole fused op with the spatial-conv kernels switched on (what
    CUDA_SPATIAL_CONV_VERIFIED = True would do) against it with cuDNN's conv."""
    import importlib

    import manet_kernels as mk
    ma_ops = importlib.import_module("manet_kernels.ops.mixed_attention")
    torch.manual_seed(0)
    x = torch.randn(4, 40, 9, 13, device="cuda", dtype=dtype, requires_grad=True)
    params = [torch.randn(s, device="cuda", requires_grad=True)
              for s in ((10, 40), (10,), (40, 10), (40,), (1, 2, 7, 7), (1,))]
    dy = torch.randn_like(x)

    def run():
        y, mc, ms = mk.mixed_attention(x, *params, backend="cuda", return_maps=True)
        return [y, mc, ms, *torch.autograd.grad(y, [x, *params], dy)]

    monkeypatch.setattr(ma_ops, "CUDA_SPATIAL_CONV_VERIFIED", False)
    want = run()
    monkeypatch.setattr(ma_ops, "CUDA_SPATIAL_CONV_VERIFIED", True)
    got = run()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == F32 else dict(rtol=2e-2, atol=2e-2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), **tol)
