"""CUDA pass kernels (csrc/cuda/mixed_attention.cu) against the pass contract,
``manet_kernels.reference.passes``, evaluated on the same CUDA inputs.

Sums are compared with a bound proportional to the sum of absolute terms (the
reference evaluated on absolute values), maxima and indices exactly, elementwise
outputs to one unit in the last place of the output dtype.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from manet_kernels import _ext
from manet_kernels.reference import passes as ref

if not torch.cuda.is_available() or not _ext.HAS_CUDA_KERNELS:
    pytest.skip("needs a CUDA device and manet_kernels built with its CUDA kernels",
                allow_module_level=True)

ops = torch.ops.manet_kernels
DEV = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("nchw", "channels_last")
SHAPES = [(n, c, h, w) for n, c, (h, w) in itertools.product(
    (1, 3), (1, 3, 7, 64, 257), ((1, 1), (1, 7), (5, 3), (7, 7), (13, 11), (56, 56)))]
# ResNet-50 stage shapes: the tile plans the kernels are tuned for (partials included).
RESNET = [(8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14), (8, 2048, 7, 7)]
# Sums: error <= SUM_ULPS * eps(acc) * sum|terms|; generous for fp32 reductions of
# a few thousand terms, still ~30x below the effect of one missing term.
SUM_ULPS = 128


def shape_id(s):
    return "x".join(map(str, s))


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def fmt(t, layout):
    return t.contiguous(memory_format=torch.channels_last if layout == "channels_last"
                        else torch.contiguous_format)


def act(shape, dtype, layout):
    return fmt(torch.randn(shape, device=DEV).to(dtype), layout)


def distinct_along(shape, dims, dtype, layout):
    """Random activation whose values are pairwise distinct along ``dims`` (the reduced
    axes), exactly representable in fp16, bf16 and fp32: no ties for max to break."""
    m = torch.arange(128, 256, dtype=torch.float64)  # 8 significant bits
    e = torch.arange(-6, 8, dtype=torch.float64)
    pool = (m[None] * torch.pow(2.0, e)[:, None]).flatten()
    pool = torch.cat([-pool.flip(0), pool]).to(DEV)  # sorted, 3584 values
    n, c, h, w = shape
    perm = [0] + [d for d in (1, 2, 3) if d not in dims] + list(dims)
    lshape = [shape[d] for d in perm]
    k = 1
    for d in dims:
        k *= shape[d]
    lines = torch.rand(n * c * h * w // k, k, device=DEV).argsort(1)
    lines = lines + torch.randint(0, pool.numel() - k + 1, (lines.shape[0], 1), device=DEV)
    x = pool[lines].reshape(lshape).permute(*[perm.index(i) for i in range(4)])
    return fmt(x.to(dtype), layout)


def small(*shape, dtype=torch.float32, positive=False):
    t = torch.randn(*shape, device=DEV, dtype=dtype)
    return t.abs() + 0.5 if positive else t


def assert_sum_close(out, expect, abs_sum, what):
    assert out.dtype == expect.dtype and out.shape == expect.shape, what
    assert out.is_contiguous(), what
    fi = torch.finfo(out.dtype)
    tol = SUM_ULPS * fi.eps * abs_sum + fi.tiny
    err = (out - expect).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {out.numel()} beyond tolerance, "
                           f"max error {err.max().item():.3e}, "
                           f"first at {bad.nonzero()[0].tolist()}")


def assert_equal(out, expect, what):
    assert out.dtype == expect.dtype and out.shape == expect.shape, what
    assert out.is_contiguous(), what
    assert torch.equal(out, expect), (
        f"{what}: {int((out != expect).sum())} of {out.numel()} differ, "
        f"first at {(out != expect).nonzero()[0].tolist()}")


def assert_ulp_close(out, expect, what):
    """Elementwise outputs: same dtype, shape and strides, within one ulp."""
    assert out.dtype == expect.dtype and out.shape == expect.shape, what
    assert out.stride() == expect.stride(), f"{what}: memory format differs"
    fi = torch.finfo(out.dtype)
    torch.testing.assert_close(out, expect, rtol=fi.eps, atol=fi.tiny, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- checks


def check_channel_pool(x):
    avg, mx, im = ops.mixed_attention_channel_pool(x)
    r_avg, r_mx, r_im = ref.mixed_attention_channel_pool(x)
    abs_avg = ref.mixed_attention_channel_pool(x.abs())[0]
    assert_sum_close(avg, r_avg, abs_avg, "avg")
    assert_equal(mx, r_mx, "mx")
    assert_equal(im, r_im, "im")


def check_spatial_pool(x, mc):
    sa, sm, ic = ops.mixed_attention_spatial_pool(x, mc)
    r_sa, r_sm, r_ic = ref.mixed_attention_spatial_pool(x, mc)
    abs_sa = ref.mixed_attention_spatial_pool(x.abs(), mc.abs())[0]
    assert_sum_close(sa, r_sa, abs_sa, "sa")
    assert_equal(sm, r_sm, "sm")
    assert_equal(ic, r_ic, "ic")


def check_apply(x, mc, ms):
    assert_ulp_close(ops.mixed_attention_apply(x, mc, ms),
                     ref.mixed_attention_apply(x, mc, ms), "y")


def check_bwd_reduce(g, x, mc, ms):
    dms, dmc = ops.mixed_attention_bwd_reduce(g, x, mc, ms)
    r_dms, r_dmc = ref.mixed_attention_bwd_reduce(g, x, mc, ms)
    a_dms, a_dmc = ref.mixed_attention_bwd_reduce(g.abs(), x.abs(), mc.abs(), ms.abs())
    assert_sum_close(dms, r_dms, a_dms, "dms")
    assert_sum_close(dmc, r_dmc, a_dmc, "dmc")


def check_bwd_channel(x, da_s, dm_s, ic):
    dmc = ops.mixed_attention_bwd_channel(x, da_s, dm_s, ic)
    r_dmc = ref.mixed_attention_bwd_channel(x, da_s, dm_s, ic)
    a_dmc = ref.mixed_attention_bwd_channel(x.abs(), da_s.abs(), dm_s.abs(), ic)
    assert_sum_close(dmc, r_dmc, a_dmc, "dmc")


def bwd_dx_args(shape, dtype, layout):
    n, c, h, w = shape
    a = acc(dtype)
    return (act(shape, dtype, layout), small(n, c, dtype=a, positive=True),
            small(n, h, w, dtype=a, positive=True), small(n, h, w, dtype=a),
            small(n, h, w, dtype=a),
            torch.randint(0, c, (n, h, w), device=DEV, dtype=torch.int32),
            small(n, c, dtype=a), small(n, c, dtype=a),
            torch.randint(0, h * w, (n, c), device=DEV, dtype=torch.int32))


def check_bwd_dx(*args):
    assert_ulp_close(ops.mixed_attention_bwd_dx(*args), ref.mixed_attention_bwd_dx(*args), "dx")


def run_all(shape, dtype, layout):
    n, c, h, w = shape
    a = acc(dtype)
    check_channel_pool(distinct_along(shape, (2, 3), dtype, layout))
    mc = small(n, c, dtype=a, positive=True)
    check_spatial_pool(distinct_along(shape, (1,), dtype, layout), mc)
    x = act(shape, dtype, layout)
    ms = small(n, h, w, dtype=a, positive=True)
    check_apply(x, mc, ms)
    check_bwd_reduce(act(shape, dtype, layout), x, mc, ms)
    ic = torch.randint(0, c, (n, h, w), device=DEV, dtype=torch.int32)
    check_bwd_channel(x, small(n, h, w, dtype=a), small(n, h, w, dtype=a), ic)
    check_bwd_dx(*bwd_dx_args(shape, dtype, layout))


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channel_pool(shape, layout, dtype):
    check_channel_pool(distinct_along(shape, (2, 3), dtype, layout))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spatial_pool(shape, layout, dtype):
    n, c, h, w = shape
    check_spatial_pool(distinct_along(shape, (1,), dtype, layout),
                       small(n, c, dtype=acc(dtype), positive=True))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply(shape, layout, dtype):
    n, c, h, w = shape
    check_apply(act(shape, dtype, layout), small(n, c, dtype=acc(dtype), positive=True),
                small(n, h, w, dtype=acc(dtype), positive=True))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_reduce(shape, layout, dtype):
    n, c, h, w = shape
    check_bwd_reduce(act(shape, dtype, layout), act(shape, dtype, layout),
                     small(n, c, dtype=acc(dtype), positive=True),
                     small(n, h, w, dtype=acc(dtype), positive=True))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_channel(shape, layout, dtype):
    n, c, h, w = shape
    a = acc(dtype)
    check_bwd_channel(act(shape, dtype, layout), small(n, h, w, dtype=a), small(n, h, w, dtype=a),
                      torch.randint(0, c, (n, h, w), device=DEV, dtype=torch.int32))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_dx(shape, layout, dtype):
    check_bwd_dx(*bwd_dx_args(shape, dtype, layout))


@pytest.mark.parametrize("shape", RESNET + [(64, 256, 56, 56), (64, 2048, 7, 7)], ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_resnet_shapes(shape, layout, dtype):
    run_all(shape, dtype, layout)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 7, 5, 3), (2, 64, 13, 11), (2, 257, 7, 7)],
                         ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64(shape, layout):
    run_all(shape, torch.float64, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_activation_uses_scalar_path(layout, dtype):
    """A view starting one element into its storage cannot take vector loads."""
    shape = (2, 64, 14, 14)
    n, c, h, w = shape
    base = act(shape, dtype, layout)
    store = torch.empty(base.numel() + 1, device=DEV, dtype=dtype)
    x = store.as_strided(shape, base.stride(), storage_offset=1)
    x.copy_(base)
    assert (x.data_ptr() % 16) != 0 and x.is_contiguous(memory_format=(
        torch.channels_last if layout == "channels_last" else torch.contiguous_format))
    run_all_on(x, dtype, layout)


def run_all_on(x, dtype, layout):
    n, c, h, w = x.shape
    a = acc(dtype)
    mc = small(n, c, dtype=a, positive=True)
    ms = small(n, h, w, dtype=a, positive=True)
    check_channel_pool(x)
    check_spatial_pool(x, mc)
    check_apply(x, mc, ms)
    check_bwd_reduce(x, x, mc, ms)
    ic = torch.randint(0, c, (n, h, w), device=DEV, dtype=torch.int32)
    check_bwd_channel(x, small(n, h, w, dtype=a), small(n, h, w, dtype=a), ic)
    args = list(bwd_dx_args(x.shape, dtype, layout))
    args[0] = x
    check_bwd_dx(*args)


def first_max_index(v, dim):
    """Lowest index of the maximum along ``dim`` (NaN counts as the maximum)."""
    nan = v.isnan()
    top = torch.where(nan.any(dim, keepdim=True), nan,
                      v == v.nan_to_num(nan=-float("inf")).amax(dim, keepdim=True))
    size = v.shape[dim]
    shape = [1] * v.dim()
    shape[dim] = size
    pos = torch.arange(size, device=v.device).reshape(shape)
    return torch.where(top, pos, size).amin(dim).to(torch.int32)


TIE_SHAPES = [(1, 1, 1, 1), (3, 7, 5, 3), (2, 257, 7, 7), (3, 257, 56, 56), (4, 2048, 7, 7),
              (2, 64, 56, 56)]


@pytest.mark.parametrize("shape", TIE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_equal_ties_pick_index_0(shape, layout, dtype):
    n, c, h, w = shape
    x = fmt(torch.full(shape, 0.75, device=DEV, dtype=dtype), layout)
    _, mx, im = ops.mixed_attention_channel_pool(x)
    assert torch.equal(im, torch.zeros_like(im)) and torch.all(mx == 0.75)
    mc = torch.ones(n, c, device=DEV, dtype=acc(dtype))
    _, sm, ic = ops.mixed_attention_spatial_pool(x, mc)
    assert torch.equal(ic, torch.zeros_like(ic)) and torch.all(sm == 0.75)
    # every value -inf: the first still wins
    x = fmt(torch.full(shape, -float("inf"), device=DEV, dtype=dtype), layout)
    assert torch.equal(ops.mixed_attention_channel_pool(x)[2], torch.zeros_like(im))
    assert torch.equal(ops.mixed_attention_spatial_pool(x, mc)[2], torch.zeros_like(ic))


@pytest.mark.parametrize("shape", TIE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_ties_pick_first(shape, layout, dtype):
    """Three distinct values: ties across lanes, warps and tiles all resolve to the lowest
    index."""
    n, c, h, w = shape
    x = fmt(torch.randint(0, 3, shape, device=DEV).to(dtype), layout)
    _, mx, im = ops.mixed_attention_channel_pool(x)
    xa = x.float().reshape(n, c, h * w)
    assert torch.equal(mx, xa.amax(2))
    assert torch.equal(im, first_max_index(xa, 2))
    mc = torch.ones(n, c, device=DEV)
    _, sm, ic = ops.mixed_attention_spatial_pool(x, mc)
    assert torch.equal(sm, x.float().amax(1))
    assert torch.equal(ic, first_max_index(x.float(), 1))


@pytest.mark.parametrize("shape", [(2, 7, 5, 3), (3, 257, 56, 56), (4, 2048, 7, 7)],
                         ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_is_the_max_first_nan_wins(shape, layout, dtype):
    n, c, h, w = shape
    p = h * w
    x = act(shape, dtype, layout)
    # channel pool: NaNs at two positions of (0, c-1); the lower one is the index
    xn = x.clone()
    p1, p2 = p // 3, (2 * p) // 3 + (1 if p > 2 else 0)
    for q in (p2, p1):
        xn[0, c - 1, q // w, q % w] = float("nan")
    _, mx, im = ops.mixed_attention_channel_pool(xn)
    assert mx[0, c - 1].isnan() and im[0, c - 1].item() == min(p1, p2)
    assert not mx[1:].isnan().any() and not mx[0, : c - 1].isnan().any()
    # spatial pool: NaNs at two channels of (n-1, last position)
    xn = x.clone()
    c1, c2 = c // 3, (2 * c) // 3
    for q in (c2, c1):
        xn[n - 1, q, h - 1, w - 1] = float("nan")
    _, sm, ic = ops.mixed_attention_spatial_pool(xn, small(n, c, positive=True, dtype=acc(dtype)))
    assert sm[n - 1, h - 1, w - 1].isnan() and ic[n - 1, h - 1, w - 1].item() == min(c1, c2)
    assert sm.isnan().sum().item() == 1


@pytest.mark.parametrize("shape", [(3, 257, 56, 56), (4, 2048, 7, 7), (8, 512, 28, 28),
                                   (1, 3, 300, 301)], ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_deterministic(shape, layout, dtype):
    n, c, h, w = shape
    a = acc(dtype)
    x, g = act(shape, dtype, layout), act(shape, dtype, layout)
    mc, ms = small(n, c, dtype=a, positive=True), small(n, h, w, dtype=a, positive=True)
    ic = torch.randint(0, c, (n, h, w), device=DEV, dtype=torch.int32)
    da_s, dm_s = small(n, h, w, dtype=a), small(n, h, w, dtype=a)
    dx_args = bwd_dx_args(shape, dtype, layout)
    calls = [
        lambda: ops.mixed_attention_channel_pool(x),
        lambda: ops.mixed_attention_spatial_pool(x, mc),
        lambda: (ops.mixed_attention_apply(x, mc, ms),),
        lambda: ops.mixed_attention_bwd_reduce(g, x, mc, ms),
        lambda: (ops.mixed_attention_bwd_channel(x, da_s, dm_s, ic),),
        lambda: (ops.mixed_attention_bwd_dx(*dx_args),),
    ]
    for call in calls:
        first = [t.clone() for t in call()]
        for _ in range(2):
            again = call()
            assert all(torch.equal(u, v) for u, v in zip(first, again))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_empty_batch(layout, dtype):
    shape = (0, 5, 7, 3)
    x = act(shape, dtype, layout)
    a = acc(dtype)
    mc, ms = torch.ones(0, 5, device=DEV, dtype=a), torch.ones(0, 7, 3, device=DEV, dtype=a)
    s = torch.ones(0, 7, 3, device=DEV, dtype=a)
    ic = torch.zeros(0, 7, 3, device=DEV, dtype=torch.int32)
    im = torch.zeros(0, 5, device=DEV, dtype=torch.int32)
    pairs = [
        (ops.mixed_attention_channel_pool(x), ref.mixed_attention_channel_pool(x)),
        (ops.mixed_attention_spatial_pool(x, mc), ref.mixed_attention_spatial_pool(x, mc)),
        ((ops.mixed_attention_apply(x, mc, ms),), (ref.mixed_attention_apply(x, mc, ms),)),
        (ops.mixed_attention_bwd_reduce(x, x, mc, ms), ref.mixed_attention_bwd_reduce(x, x, mc, ms)),
        ((ops.mixed_attention_bwd_channel(x, s, s, ic),),
         (ref.mixed_attention_bwd_channel(x, s, s, ic),)),
        ((ops.mixed_attention_bwd_dx(x, mc, ms, s, s, ic, mc, mc, im),),
         (ref.mixed_attention_bwd_dx(x, mc, ms, s, s, ic, mc, mc, im),)),
    ]
    for got, want in pairs:
        for u, v in zip(got, want):
            assert u.shape == v.shape and u.dtype == v.dtype and u.device == v.device


# --------------------------------------------------------------------------- bad arguments


def _raises(name, fn, *args):
    with pytest.raises(RuntimeError, match=rf"expected {name}\b"):
        fn(*args)


def test_bad_arguments_name_the_argument():
    n, c, h, w = 2, 8, 5, 3
    x = torch.randn(n, c, h, w, device=DEV)
    g = torch.randn(n, c, h, w, device=DEV)
    mc, ms = small(n, c, positive=True), small(n, h, w, positive=True)
    s = small(n, h, w)
    ic = torch.randint(0, c, (n, h, w), device=DEV, dtype=torch.int32)
    im = torch.randint(0, h * w, (n, c), device=DEV, dtype=torch.int32)
    cp, sp = ops.mixed_attention_channel_pool, ops.mixed_attention_spatial_pool
    ap, br = ops.mixed_attention_apply, ops.mixed_attention_bwd_reduce
    bc, bd = ops.mixed_attention_bwd_channel, ops.mixed_attention_bwd_dx

    # activation: rank, dtype, layout, device
    _raises("x", cp, x[0])
    _raises("x", cp, x.to(torch.int32))
    _raises("x", cp, x[..., ::2])
    _raises("x", cp, x.permute(0, 1, 3, 2))
    _raises("x", sp, x.cpu(), mc)
    _raises("g", bd, g.transpose(2, 3), mc, ms, s, s, ic, mc, mc, im)
    # a CPU tensor mixed with CUDA ones
    _raises("mc", sp, x, mc.cpu())
    _raises("ms", ap, x, mc, ms.cpu())
    _raises("g", br, g.cpu(), x, mc, ms)
    _raises("ic", bc, x, s, s, ic.cpu())
    _raises("im", bd, g, mc, ms, s, s, ic, mc, mc, im.cpu())
    # shapes
    _raises("mc", sp, x, small(n, c + 1))
    _raises("mc", ap, x, small(n + 1, c), ms)
    _raises("ms", ap, x, mc, small(n, h * w))
    _raises("ms", br, g, x, mc, small(n, w, h))
    _raises("g", br, g[:, :-1], x, mc, ms)
    _raises("da_s", bc, x, small(n, h, w + 1), s, ic)
    _raises("dm_s", bc, x, s, small(n, 1, h, w), ic)
    _raises("d_avg", bd, g, mc, ms, s, s, ic, small(n, c, 1), mc, im)
    _raises("d_mx", bd, g, mc, ms, s, s, ic, mc, small(c), im)
    # dtypes: small tensors in the accumulation dtype, indices int32
    _raises("mc", sp, x, mc.double())
    _raises("mc", sp, x.half(), mc.half())
    _raises("ic", bc, x, s, s, ic.long())
    _raises("im", bd, g, mc, ms, s, s, ic, mc, mc, im.long())
    _raises("g", br, g.double(), x, mc, ms)
    # layouts: g must share x's; small tensors contiguous
    _raises("g", br, g.contiguous(memory_format=torch.channels_last), x, mc, ms)
    _raises("mc", sp, x, small(c, n).t())


@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    """64-bit offsets: a bf16 activation of 2^31 + 65536 elements (4.3 GB)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    n, c, h, w = 1, 2, 32768, 32769
    x = torch.empty(n, c, h, w, device=DEV, dtype=torch.bfloat16).uniform_(-1, 1)
    x[0, 1, -1, -2] = 3.0  # the max of channel 1, past element 2^31
    avg, mx, im = ops.mixed_attention_channel_pool(x)
    assert mx[0, 1].item() == 3.0 and im[0, 1].item() == h * w - 2
    torch.testing.assert_close(avg[0, 1], x[0, 1].float().mean(), rtol=1e-3, atol=1e-5)
    mc = torch.full((n, c), 0.5, device=DEV)
    ms = torch.full((n, h, w), 2.0, device=DEV)
    y = ops.mixed_attention_apply(x, mc, ms)
    assert torch.equal(y[0, 1, -4:], x[0, 1, -4:])  # 0.5 * 2 is exact
    del y
    sa, sm, ic = ops.mixed_attention_spatial_pool(x, mc)
    assert ic[0, -1, -2].item() == 1 and sm[0, -1, -2].item() == 1.5


# --------------------------------------------------------------------------- spatial conv
# The k x k conv (padding k//2) on the [mean, max] map: sa, sm, dz (N, H, W) in the acc
# dtype. The reference runs in float64 on the same inputs (cuDNN in float32 may use TF32);
# every output is a sum, compared with assert_f64_close's bound on sum|terms|.

CONV_SHAPES = [(1, 1, 1), (3, 5, 1), (2, 1, 7), (5, 13, 11), (4, 56, 56)]
CONV_DTYPES = (torch.float32, torch.float64)
CONV_KS = (1, 3, 5, 7)


def conv_inputs(shape, k, bias, dtype):
    sa, sm, dz = (torch.randn(shape, device=DEV, dtype=dtype) for _ in range(3))
    w = torch.randn(1, 2, k, k, device=DEV, dtype=dtype)
    b = torch.randn(1, device=DEV, dtype=dtype) if bias else None
    return sa, sm, dz, w, b


def f64(t):
    return None if t is None else t.double()


def f64_abs(t):
    return None if t is None else t.double().abs()


def assert_f64_close(out, expect64, abs_sum64, dtype, what):
    """out in ``dtype`` vs the float64 reference: error <= SUM_ULPS * eps(dtype) * sum|terms|."""
    assert out.dtype == dtype and out.shape == expect64.shape, what
    assert out.device == expect64.device and out.is_contiguous(), what
    fi = torch.finfo(dtype)
    tol = SUM_ULPS * fi.eps * abs_sum64 + fi.tiny
    err = (out.double() - expect64).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {out.numel()} beyond tolerance, "
                           f"max error {err.max().item():.3e}, "
                           f"first at {bad.nonzero()[0].tolist()}")


def check_spatial_conv(sa, sm, dz, w, b):
    dtype = sa.dtype
    z = ops.mixed_attention_spatial_conv(sa, sm, w, b)
    r_z = ref.mixed_attention_spatial_conv(f64(sa), f64(sm), f64(w), f64(b))
    a_z = ref.mixed_attention_spatial_conv(f64_abs(sa), f64_abs(sm), f64_abs(w), f64_abs(b))
    assert_f64_close(z, r_z, a_z, dtype, "z")
    has_bias = b is not None
    out = ops.mixed_attention_spatial_conv_bwd(dz, sa, sm, w, has_bias)
    exp = ref.mixed_attention_spatial_conv_bwd(f64(dz), f64(sa), f64(sm), f64(w), has_bias)
    bound = ref.mixed_attention_spatial_conv_bwd(f64_abs(dz), f64_abs(sa), f64_abs(sm),
                                                 f64_abs(w), has_bias)
    for name, o, e, a in zip(("dsa", "dsm", "dweight", "dbias"), out, exp, bound):
        assert_f64_close(o, e, a, dtype, name)
    if not has_bias:
        assert out[3].shape == (0,)


@pytest.mark.parametrize("bias", (False, True), ids=("no_bias", "bias"))
@pytest.mark.parametrize("k", CONV_KS)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
def test_spatial_conv(dtype, shape, k, bias):
    check_spatial_conv(*conv_inputs(shape, k, bias, dtype))


@pytest.mark.parametrize("shape", [(3, 300, 301), (64, 56, 56), (3, 7, 9)], ids=shape_id)
@pytest.mark.parametrize("k", (3, 7, 9))
def test_spatial_conv_larger(shape, k):
    """Maps over many blocks, dweight split into several chunks per tap, and k > H."""
    check_spatial_conv(*conv_inputs(shape, k, True, torch.float32))


@pytest.mark.parametrize("bias", (False, True), ids=("no_bias", "bias"))
@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
def test_spatial_conv_empty_batch(dtype, bias):
    sa, sm, dz, w, b = conv_inputs((0, 5, 7), 3, bias, dtype)
    z = ops.mixed_attention_spatial_conv(sa, sm, w, b)
    assert z.shape == (0, 5, 7) and z.dtype == dtype and z.device == sa.device
    dsa, dsm, dw, db = ops.mixed_attention_spatial_conv_bwd(dz, sa, sm, w, bias)
    assert dsa.shape == dsm.shape == (0, 5, 7) and dsa.dtype == dsm.dtype == dtype
    assert torch.equal(dw, torch.zeros(1, 2, 3, 3, device=DEV, dtype=dtype))
    assert torch.equal(db, torch.zeros(1 if bias else 0, device=DEV, dtype=dtype))


@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
def test_spatial_conv_noncontiguous(dtype):
    sa, sm, dz, w, b = conv_inputs((3, 19, 23), 7, True, dtype)

    def transposed(t):  # same values, (N, W, H)-contiguous storage
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    def strided(t):  # same values, every other element of a larger buffer
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], device=DEV, dtype=dtype)
        buf[..., ::2] = t
        return buf[..., ::2]

    views = [transposed(sa), strided(sm), strided(dz), transposed(w)]
    assert not any(v.is_contiguous() for v in views)
    b_buf = torch.randn(3, device=DEV, dtype=dtype)
    b_buf[1:2] = b
    b_view = b_buf[1:2]  # a (1,) view at storage offset 1
    z = ops.mixed_attention_spatial_conv(sa, sm, w, b)
    assert torch.equal(ops.mixed_attention_spatial_conv(views[0], views[1], views[3], b_view), z)
    got = ops.mixed_attention_spatial_conv_bwd(views[2], views[0], views[1], views[3], True)
    want = ops.mixed_attention_spatial_conv_bwd(dz, sa, sm, w, True)
    for name, u, v in zip(("dsa", "dsm", "dweight", "dbias"), got, want):
        assert u.is_contiguous() and torch.equal(u, v), name


@pytest.mark.parametrize("shape", [(4, 56, 56), (64, 56, 56), (2, 300, 301)], ids=shape_id)
@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
def test_spatial_conv_deterministic(shape, dtype):
    sa, sm, dz, w, b = conv_inputs(shape, 7, True, dtype)
    first_z = ops.mixed_attention_spatial_conv(sa, sm, w, b)
    first = [t.clone() for t in ops.mixed_attention_spatial_conv_bwd(dz, sa, sm, w, True)]
    for _ in range(2):
        assert torch.equal(ops.mixed_attention_spatial_conv(sa, sm, w, b), first_z)
        again = ops.mixed_attention_spatial_conv_bwd(dz, sa, sm, w, True)
        for name, u, v in zip(("dsa", "dsm", "dweight", "dbias"), first, again):
            assert torch.equal(u, v), name


def test_spatial_conv_bad_arguments_name_the_argument():
    sa = torch.randn(2, 5, 5, device=DEV)
    w = torch.randn(1, 2, 3, 3, device=DEV)
    b = torch.randn(1, device=DEV)
    fwd, bwd = ops.mixed_attention_spatial_conv, ops.mixed_attention_spatial_conv_bwd

    def raises(exc, pattern, fn, *args):
        with pytest.raises(exc, match=pattern):
            fn(*args)

    # dtypes: float32 / float64 only, every tensor in sa's
    raises(TypeError, r"^sa: expected dtype float32 or float64", fwd, sa.half(), sa.half(),
           w.half(), None)
    raises(TypeError, r"^sm: expected dtype float32", fwd, sa, sa.double(), w, None)
    raises(TypeError, r"^weight: expected dtype float32", fwd, sa, sa, w.double(), None)
    raises(TypeError, r"^bias: expected dtype float32", fwd, sa, sa, w, b.double())
    raises(TypeError, r"^dz: expected dtype float32", bwd, sa.double(), sa, sa, w, False)
    # shapes
    raises(ValueError, r"^sa: expected a rank-3", fwd, sa[0], sa[0], w, None)
    raises(ValueError, r"^sm: expected shape", fwd, sa, sa[:, :4], w, None)
    raises(ValueError, r"^weight: expected shape \(1, 2, k, k\) with k odd", fwd, sa, sa,
           torch.randn(1, 2, 4, 4, device=DEV), None)
    raises(ValueError, r"^weight: expected shape", fwd, sa, sa,
           torch.randn(1, 1, 3, 3, device=DEV), None)
    raises(ValueError, r"^weight: expected shape", bwd, sa, sa, sa,
           torch.randn(1, 2, 3, 5, device=DEV), True)
    raises(ValueError, r"^bias: expected shape \(1,\)", fwd, sa, sa, w,
           torch.randn(2, device=DEV))
    raises(ValueError, r"^bias: expected shape \(1,\)", fwd, sa, sa, w,
           torch.randn((), device=DEV))
    raises(ValueError, r"^dz: expected shape", bwd, sa[:1], sa, sa, w, False)
    # a CPU tensor mixed with CUDA ones
    raises(RuntimeError, r"^sa: expected a CUDA tensor", fwd, sa.cpu(), sa, w, None)
    raises(RuntimeError, r"^sm: expected a CUDA tensor", fwd, sa, sa.cpu(), w, None)
    raises(RuntimeError, r"^weight: expected a CUDA tensor", fwd, sa, sa, w.cpu(), b)
    raises(RuntimeError, r"^bias: expected a CUDA tensor", fwd, sa, sa, w, b.cpu())
    raises(RuntimeError, r"^dz: expected a CUDA tensor", bwd, sa.cpu(), sa, sa, w, True)
    raises(RuntimeError, r"^weight: expected a CUDA tensor", bwd, sa, sa, sa, w.cpu(), True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_spatial_conv_device_mismatch_names_the_argument():
    sa = torch.randn(2, 5, 5, device="cuda:0")
    w = torch.randn(1, 2, 3, 3, device="cuda:0")
    with pytest.raises(RuntimeError, match=r"^sm: expected a tensor on cuda:0"):
        ops.mixed_attention_spatial_conv(sa, sa.to("cuda:1"), w, None)
    with pytest.raises(RuntimeError, match=r"^bias: expected a tensor on cuda:0"):
        ops.mixed_attention_spatial_conv(sa, sa, w, torch.randn(1, device="cuda:1"))
    with pytest.raises(RuntimeError, match=r"^dz: expected a tensor on cuda:0"):
        ops.mixed_attention_spatial_conv_bwd(sa.to("cuda:1"), sa, sa, w, False)
    # on a second device the outputs stay there
    s1, w1 = sa.to("cuda:1"), w.to("cuda:1")
    z = ops.mixed_attention_spatial_conv(s1, s1, w1, None)
    assert z.device == s1.device
    torch.testing.assert_close(z.cpu(), ops.mixed_attention_spatial_conv(sa, sa, w, None).cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_op_with_the_cuda_spatial_conv(monkeypatch, dtype):
    """The whole fused op with the spatial-conv kernels switched on (what
    CUDA_SPATIAL_CONV_VERIFIED = True would do) against it with cuDNN's conv."""
    import importlib

    import manet_kernels as mk
    ma_ops = importlib.import_module("manet_kernels.ops.mixed_attention")
    torch.manual_seed(0)
    x = torch.randn(4, 40, 9, 13, device=DEV, dtype=dtype, requires_grad=True)
    params = [torch.randn(s, device=DEV, requires_grad=True)
              for s in ((10, 40), (10,), (40, 10), (40,), (1, 2, 7, 7), (1,))]
    dy = torch.randn_like(x)

    def run():
        y, mc, ms = mk.mixed_attention(x, *params, backend="cuda", return_maps=True)
        return [y, mc, ms, *torch.autograd.grad(y, [x, *params], dy)]

    monkeypatch.setattr(ma_ops, "CUDA_SPATIAL_CONV_VERIFIED", False)
    want = run()
    monkeypatch.setattr(ma_ops, "CUDA_SPATIAL_CONV_VERIFIED", True)
    got = run()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), **tol)
