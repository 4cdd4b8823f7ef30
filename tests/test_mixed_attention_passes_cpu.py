"""C++ CPU mixed-attention passes (csrc/cpu/mixed_attention.cpp) vs. the pass
contract, ``manet_kernels.reference.passes``, evaluated on the same inputs.

Low-precision inputs are compared with the reference run on the same fp16 / bf16
tensors: both sides upcast before computing, so reductions agree to the
accumulation dtype's accuracy, and outputs in the activation dtype to one ulp of
that dtype. Maxima and indices must match exactly.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from manet_kernels import _ext
from manet_kernels.reference import passes as ref

if not _ext.HAS_EXT:
    pytest.skip(f"C++ extension not built: {_ext.EXT_ERROR}", allow_module_level=True)

ops = torch.ops.manet_kernels
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LAYOUTS = ("nchw", "channels_last")

# Every C meets every (H, W) once, with N cycling through 1..3.
_C = (1, 3, 7, 64)
_HW = ((1, 1), (1, 7), (5, 3), (7, 7), (13, 11))
SHAPES = [(1 + (i + j) % 3, c, h, w) for i, c in enumerate(_C) for j, (h, w) in enumerate(_HW)]
# Shapes whose work is split into several blocks per sample (the cross-block
# partial sums), with partial blocks, lane tails and row-group remainders.
BLOCKED = [(1, 40, 29, 31), (2, 130, 17, 19), (1, 64, 32, 32)]

# Per input dtype: (rtol, atol per sqrt(term) relative to the largest term) for
# reductions, which both sides accumulate in the acc dtype in different orders;
# (rtol, atol) for outputs in the activation dtype, one ulp of it.
TOL = {
    torch.float32: dict(red=(1e-5, 4e-7), act=(2 ** -23, 1e-30)),
    torch.float64: dict(red=(1e-12, 1e-15), act=(2 ** -52, 1e-300)),
    torch.bfloat16: dict(red=(1e-5, 4e-7), act=(2 ** -7, 1e-30)),
    torch.float16: dict(red=(1e-5, 4e-7), act=(2 ** -10, 1e-7)),
}


def _id(v):
    if isinstance(v, torch.dtype):
        return str(v)[6:]
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v)


def _cases(shapes, dtypes):
    return [pytest.param(d, lay, s, id=f"{_id(d)}-{lay}-{_id(s)}")
            for d, lay, s in itertools.product(dtypes, LAYOUTS, shapes)]


# float32 runs every shape; the other dtypes every C and every (H, W) once.
CASES = (_cases(SHAPES, (torch.float32,))
         + _cases(SHAPES[::3], (torch.float64, torch.bfloat16, torch.float16))
         + _cases(BLOCKED, (torch.float32, torch.float64, torch.bfloat16)))


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _fmt(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _act(t, dtype, layout):
    return t.to(dtype).contiguous(memory_format=_fmt(layout))


def _randn(shape, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _distinct(shape, gen):
    """A random permutation of distinct values, so that maxima are unique in fp32
    and fp64. fp16 / bf16 round some of them together: the indices must still
    match exactly (first maximum wins on both sides)."""
    numel = 1
    for s in shape:
        numel *= s
    return ((torch.randperm(numel, generator=gen).to(torch.float64) - numel / 2) / 64).reshape(shape)


def _small(shape, gen, acc, unit=False):
    t = torch.rand(shape, generator=gen, dtype=torch.float64) if unit else _randn(shape, gen)
    return t.to(acc)


def _check_reduced(out, exp, dtype, k, scale):
    """``out``, ``exp``: sums of ``k`` terms of magnitude up to ``scale``."""
    assert out.dtype == exp.dtype == ref.acc_dtype(dtype) and out.shape == exp.shape
    assert out.is_contiguous()
    rtol, atol = TOL[dtype]["red"]
    torch.testing.assert_close(out.double(), exp.double(), rtol=rtol,
                               atol=atol * max(k, 1) ** 0.5 * max(scale, 1e-30), equal_nan=True)


def _check_act(out, exp, x):
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.is_contiguous() == x.is_contiguous()
    assert (out.is_contiguous(memory_format=torch.channels_last)
            == x.is_contiguous(memory_format=torch.channels_last))
    assert out.stride() == exp.stride()
    rtol, atol = TOL[x.dtype]["act"]
    torch.testing.assert_close(out.double(), exp.double(), rtol=rtol, atol=atol, equal_nan=True)


def _check_exact(out, exp):
    assert out.dtype == exp.dtype and out.shape == exp.shape and out.is_contiguous()
    if out.dtype == torch.int32:
        assert torch.equal(out, exp), (out != exp).nonzero()[:8]
    else:
        torch.testing.assert_close(out, exp, rtol=0, atol=0, equal_nan=True)


def _amax(t):
    return t.abs().max().item() if t.numel() else 0.0


# --------------------------------------------------------------------------- #
# each pass vs. the contract
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_channel_pool(dtype, layout, shape):
    x = _act(_distinct(shape, _gen(1)), dtype, layout)
    avg, mx, im = ops.mixed_attention_channel_pool(x)
    e_avg, e_mx, e_im = ref.mixed_attention_channel_pool(x)
    _check_reduced(avg, e_avg, dtype, shape[2] * shape[3], _amax(x.double()))
    _check_exact(mx, e_mx)
    _check_exact(im, e_im)


@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_spatial_pool(dtype, layout, shape):
    gen = _gen(2)
    acc = ref.acc_dtype(dtype)
    x = _act(_distinct(shape, gen), dtype, layout)
    mc = _small(shape[:2], gen, acc, unit=True)
    sa, sm, ic = ops.mixed_attention_spatial_pool(x, mc)
    e_sa, e_sm, e_ic = ref.mixed_attention_spatial_pool(x, mc)
    _check_reduced(sa, e_sa, dtype, shape[1], _amax(x.double()))
    _check_exact(sm, e_sm)
    _check_exact(ic, e_ic)


@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_apply(dtype, layout, shape):
    gen = _gen(3)
    acc = ref.acc_dtype(dtype)
    n, c, h, w = shape
    x = _act(_randn(shape, gen), dtype, layout)
    mc, ms = _small((n, c), gen, acc, unit=True), _small((n, h, w), gen, acc, unit=True)
    _check_act(ops.mixed_attention_apply(x, mc, ms), ref.mixed_attention_apply(x, mc, ms), x)


@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_bwd_reduce(dtype, layout, shape):
    gen = _gen(4)
    acc = ref.acc_dtype(dtype)
    n, c, h, w = shape
    x, g = _act(_randn(shape, gen), dtype, layout), _act(_randn(shape, gen), dtype, layout)
    mc, ms = _small((n, c), gen, acc, unit=True), _small((n, h, w), gen, acc, unit=True)
    dms, dmc = ops.mixed_attention_bwd_reduce(g, x, mc, ms)
    e_dms, e_dmc = ref.mixed_attention_bwd_reduce(g, x, mc, ms)
    term = _amax(g.double()) * _amax(x.double())
    _check_reduced(dms, e_dms, dtype, c, term)
    _check_reduced(dmc, e_dmc, dtype, h * w, term)


@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_bwd_channel(dtype, layout, shape):
    gen = _gen(5)
    acc = ref.acc_dtype(dtype)
    n, c, h, w = shape
    x = _act(_randn(shape, gen), dtype, layout)
    da, dm = _small((n, h, w), gen, acc), _small((n, h, w), gen, acc)
    ic = torch.randint(0, c, (n, h, w), generator=gen, dtype=torch.int32)
    out = ops.mixed_attention_bwd_channel(x, da, dm, ic)
    term = _amax(x.double()) * (_amax(da) + _amax(dm))
    _check_reduced(out, ref.mixed_attention_bwd_channel(x, da, dm, ic), dtype, h * w, term)


@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_bwd_dx(dtype, layout, shape):
    gen = _gen(6)
    acc = ref.acc_dtype(dtype)
    n, c, h, w = shape
    g = _act(_randn(shape, gen), dtype, layout)
    mc, ms = _small((n, c), gen, acc, unit=True), _small((n, h, w), gen, acc, unit=True)
    da, dm = _small((n, h, w), gen, acc), _small((n, h, w), gen, acc)
    d_avg, d_mx = _small((n, c), gen, acc), _small((n, c), gen, acc)
    ic = torch.randint(0, c, (n, h, w), generator=gen, dtype=torch.int32)
    im = torch.randint(0, h * w, (n, c), generator=gen, dtype=torch.int32)
    args = (g, mc, ms, da, dm, ic, d_avg, d_mx, im)
    _check_act(ops.mixed_attention_bwd_dx(*args), ref.mixed_attention_bwd_dx(*args), g)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bwd_dx_picked_positions_collide(layout):
    # Every channel's argmax position is also a picked position of that channel,
    # so both one-hot terms land on the same elements.
    gen = _gen(7)
    n, c, h, w = shape = (2, 5, 3, 4)
    g = _act(_randn(shape, gen), torch.float32, layout)
    mc, ms = _small((n, c), gen, torch.float32, True), _small((n, h, w), gen, torch.float32, True)
    da, dm = _small((n, h, w), gen, torch.float32), _small((n, h, w), gen, torch.float32)
    d_avg, d_mx = _small((n, c), gen, torch.float32), _small((n, c), gen, torch.float32)
    ic = (torch.arange(h * w, dtype=torch.int32) % c).reshape(1, h, w).repeat(n, 1, 1)
    im = torch.arange(c, dtype=torch.int32).repeat(n, 1)  # position p = c picks channel c
    args = (g, mc, ms, da, dm, ic, d_avg, d_mx, im)
    _check_act(ops.mixed_attention_bwd_dx(*args), ref.mixed_attention_bwd_dx(*args), g)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_is_independent_of_thread_count(layout):
    # Work is split by shape only, so the cross-block sums are bitwise identical
    # whatever the number of threads.
    gen = _gen(8)
    n, c, h, w = shape = (1, 64, 32, 32)
    x, g = _act(_randn(shape, gen), torch.float32, layout), _act(_randn(shape, gen), torch.float32, layout)
    mc, ms = _small((n, c), gen, torch.float32, True), _small((n, h, w), gen, torch.float32, True)
    da, dm = _small((n, h, w), gen, torch.float32), _small((n, h, w), gen, torch.float32)
    ic = torch.randint(0, c, (n, h, w), generator=gen, dtype=torch.int32)

    def run():
        return (*ops.mixed_attention_bwd_reduce(g, x, mc, ms),
                ops.mixed_attention_bwd_channel(x, da, dm, ic),
                *ops.mixed_attention_channel_pool(x), *ops.mixed_attention_spatial_pool(x, mc))

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


# --------------------------------------------------------------------------- #
# max / argmax semantics
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("value", [0.5, 0.0, float("-inf")])
def test_all_equal_picks_index_zero(dtype, layout, value):
    n, c, h, w = shape = (2, 37, 5, 7)
    acc = ref.acc_dtype(dtype)
    x = _act(torch.full(shape, value), dtype, layout)
    mc = torch.full((n, c), 0.75, dtype=acc)
    _, mx, im = ops.mixed_attention_channel_pool(x)
    _, sm, ic = ops.mixed_attention_spatial_pool(x, mc)
    assert torch.equal(im, torch.zeros(n, c, dtype=torch.int32))
    assert torch.equal(ic, torch.zeros(n, h, w, dtype=torch.int32))
    assert torch.equal(mx, torch.full((n, c), value, dtype=acc))
    assert torch.equal(sm, torch.full((n, h, w), value * 0.75, dtype=acc))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 37, 5, 7), (1, 64, 29, 31)])
def test_many_ties_first_max(dtype, layout, shape):
    # Three distinct values: rows and columns tie at their max many times, also
    # in later lanes / row groups than the first occurrence.
    gen = _gen(9)
    x = _act(torch.randint(0, 3, shape, generator=gen).double(), dtype, layout)
    mc = torch.ones(shape[:2])
    _check_exact(ops.mixed_attention_channel_pool(x)[2], ref.mixed_attention_channel_pool(x)[2])
    _check_exact(ops.mixed_attention_spatial_pool(x, mc)[2],
                 ref.mixed_attention_spatial_pool(x, mc)[2])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tie_at_a_later_index_loses(layout):
    n, c, h, w = shape = (1, 20, 6, 7)
    base = torch.zeros(shape, dtype=torch.float64)
    base[0, 4, 1, 2] = base[0, 4, 5, 6] = 3.0  # channel 4: maximum at positions 9 and 41
    base[0, :, 0, 3] = -1.0
    base[0, 6, 0, 3] = base[0, 17, 0, 3] = 2.0  # position 3: maximum at channels 6 and 17
    x = _act(base, torch.float32, layout)
    assert ops.mixed_attention_channel_pool(x)[2][0, 4].item() == 1 * w + 2
    assert ops.mixed_attention_spatial_pool(x, torch.ones(n, c))[2][0, 0, 3].item() == 6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_propagates_first_nan_wins(dtype, layout):
    gen = _gen(10)
    n, c, h, w = shape = (2, 37, 5, 7)
    base = _randn(shape, gen)
    base[0, 5, 2, 3] = base[0, 5, 4, 6] = float("nan")    # two NaNs in one channel
    base[0, 6, 4, 6] = float("nan")                       # a NaN in the last position
    base[1, :, 0, 0] = float("-inf")                      # a -inf position
    base[1, 20, 1, 1] = base[1, 31, 1, 1] = float("nan")  # two NaNs at one position
    base[1, 2, 3, 3] = float("inf")                       # inf and -inf: a NaN sum, no NaN
    base[1, 2, 0, 0] = float("-inf")
    x = _act(base, dtype, layout)
    acc = ref.acc_dtype(dtype)
    mc = _small((n, c), gen, acc, unit=True)
    avg, mx, im = ops.mixed_attention_channel_pool(x)
    e_avg, e_mx, e_im = ref.mixed_attention_channel_pool(x)
    _check_exact(mx, e_mx)
    _check_exact(im, e_im)
    assert im[0, 5].item() == 2 * w + 3 and im[0, 6].item() == h * w - 1
    assert im[1, 2].item() == 3 * w + 3 and mx[1, 2].item() == float("inf")
    assert torch.equal(avg.isnan(), e_avg.isnan())
    sa, sm, ic = ops.mixed_attention_spatial_pool(x, mc)
    e_sa, e_sm, e_ic = ref.mixed_attention_spatial_pool(x, mc)
    _check_exact(sm, e_sm)
    _check_exact(ic, e_ic)
    assert ic[1, 1, 1].item() == 20
    assert torch.equal(sa.isnan(), e_sa.isnan())


# --------------------------------------------------------------------------- #
# empty batch and argument checks
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch(dtype, layout):
    shape = (0, 3, 2, 5)
    acc = ref.acc_dtype(dtype)
    x = _act(torch.zeros(shape), dtype, layout)
    nc, nhw = (0, 3), (0, 2, 5)
    mc, ms = torch.zeros(nc, dtype=acc), torch.zeros(nhw, dtype=acc)
    ic, im = torch.zeros(nhw, dtype=torch.int32), torch.zeros(nc, dtype=torch.int32)
    calls = [
        ("mixed_attention_channel_pool", (x,)),
        ("mixed_attention_spatial_pool", (x, mc)),
        ("mixed_attention_apply", (x, mc, ms)),
        ("mixed_attention_bwd_reduce", (x, x, mc, ms)),
        ("mixed_attention_bwd_channel", (x, ms, ms, ic)),
        ("mixed_attention_bwd_dx", (x, mc, ms, ms, ms, ic, mc, mc, im)),
    ]
    for name, args in calls:
        out, exp = getattr(ops, name)(*args), getattr(ref, name)(*args)
        out = out if isinstance(out, tuple) else (out,)
        exp = exp if isinstance(exp, tuple) else (exp,)
        # (an empty tensor is contiguous in every format: its strides mean nothing)
        assert [(o.shape, o.dtype) for o in out] == [(e.shape, e.dtype) for e in exp], name


def _good_args():
    n, c, h, w = 2, 3, 4, 5
    gen = _gen(11)
    x = _randn((n, c, h, w), gen).float()
    return dict(x=x, g=_randn((n, c, h, w), gen).float(), mc=torch.rand(n, c), ms=torch.rand(n, h, w),
                da_s=torch.randn(n, h, w), dm_s=torch.randn(n, h, w),
                ic=torch.zeros(n, h, w, dtype=torch.int32), d_avg=torch.randn(n, c),
                d_mx=torch.randn(n, c), im=torch.zeros(n, c, dtype=torch.int32))


_SIGS = {
    "mixed_attention_channel_pool": ("x",),
    "mixed_attention_spatial_pool": ("x", "mc"),
    "mixed_attention_apply": ("x", "mc", "ms"),
    "mixed_attention_bwd_reduce": ("g", "x", "mc", "ms"),
    "mixed_attention_bwd_channel": ("x", "da_s", "dm_s", "ic"),
    "mixed_attention_bwd_dx": ("g", "mc", "ms", "da_s", "dm_s", "ic", "d_avg", "d_mx", "im"),
}

_BAD = [  # (argument, how to spoil it, expected error, what the message must say)
    ("x", lambda t: t[0], ValueError, "rank-4"),
    ("x", lambda t: t.to(torch.int32), TypeError, "dtype"),
    ("x", lambda t: t.transpose(2, 3), ValueError, "contiguous"),              # neither layout
    ("x", lambda t: t.repeat(1, 1, 1, 2)[..., ::2], ValueError, "contiguous"),  # odd strides
    ("g", lambda t: t[..., :4], ValueError, "contiguous"),
    ("g", lambda t: t[..., :4].contiguous(), ValueError, "shape"),          # bwd_reduce only
    ("mc", lambda t: t.double(), TypeError, "float32"),
    ("mc", lambda t: t[:, :2], ValueError, "shape"),
    ("mc", lambda t: t.t().contiguous().t(), ValueError, "contiguous"),
    ("ms", lambda t: t[:, None], ValueError, "shape"),   # (N, 1, H, W) is not the contract
    ("da_s", lambda t: t.double(), TypeError, "float32"),
    ("dm_s", lambda t: t.reshape(2, 20), ValueError, "shape"),
    ("ic", lambda t: t.long(), TypeError, "int32"),
    ("ic", lambda t: t[:, :2], ValueError, "shape"),
    ("d_avg", lambda t: t[:1], ValueError, "shape"),
    ("d_mx", lambda t: t.half(), TypeError, "float32"),
    ("im", lambda t: t.float(), TypeError, "int32"),
    ("im", lambda t: t.reshape(3, 2), ValueError, "shape"),
]


@pytest.mark.parametrize("name", list(_SIGS))
def test_bad_arguments(name):
    names = _SIGS[name]
    checked = 0
    for arg, spoil, err, words in _BAD:
        if arg not in names:
            continue
        if words == "shape" and arg == "g" and "x" not in names:
            continue  # g has no shape to agree with outside bwd_reduce
        args = _good_args()
        args[arg] = spoil(args[arg])
        with pytest.raises(err, match=rf"^{arg}: expected .*{words}"):
            getattr(ops, name)(*[args[a] for a in names])
        checked += 1
    assert checked


def test_bad_argument_relations():
    a = _good_args()
    cl = a["g"].contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"^g: expected the memory format of x"):
        ops.mixed_attention_bwd_reduce(cl, a["x"], a["mc"], a["ms"])
    with pytest.raises(TypeError, match=r"^g: expected the dtype of x"):
        ops.mixed_attention_bwd_reduce(a["g"].double(), a["x"], a["mc"], a["ms"])
    with pytest.raises(TypeError, match=r"^mc: expected dtype float64"):  # acc dtype of fp64 x
        ops.mixed_attention_spatial_pool(a["x"].double(), a["mc"])
    with pytest.raises(ValueError, match=r"^ic: expected channel indices in \[0, C=3\)"):
        ops.mixed_attention_bwd_channel(a["x"], a["da_s"], a["dm_s"], a["ic"] + 3)
    with pytest.raises(ValueError, match=r"^ic: expected channel indices"):
        ops.mixed_attention_bwd_channel(a["x"], a["da_s"], a["dm_s"], a["ic"] - 1)
    with pytest.raises(ValueError, match=r"^x: expected H\*W >= 1"):
        ops.mixed_attention_channel_pool(torch.zeros(1, 2, 0, 3))
    with pytest.raises(ValueError, match=r"^x: expected C >= 1"):
        ops.mixed_attention_spatial_pool(torch.zeros(1, 0, 2, 3), torch.zeros(1, 0))


# --------------------------------------------------------------------------- #
# the k x k conv on the [mean, max] map (between F2 and F3)
# --------------------------------------------------------------------------- #

CONV_CASES = [(2, 28, 28, 7, True), (3, 5, 7, 7, False), (1, 1, 1, 3, True), (2, 3, 2, 7, True),
              (4, 9, 13, 1, False), (1, 6, 17, 5, True), (0, 4, 4, 3, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,h,w,k,bias", CONV_CASES)
def test_spatial_conv(dtype, n, h, w, k, bias):
    gen = _gen(11)
    sa, sm, dz = (torch.randn(n, h, w, generator=gen, dtype=dtype) for _ in range(3))
    weight = torch.randn(1, 2, k, k, generator=gen, dtype=dtype)
    b = torch.randn(1, generator=gen, dtype=dtype) if bias else None
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    z = ops.mixed_attention_spatial_conv(sa, sm, weight, b)
    # |z| is a sum of 2*k*k products of unit-scale terms.
    torch.testing.assert_close(z, ref.mixed_attention_spatial_conv(sa, sm, weight, b),
                               rtol=rtol, atol=rtol * k)
    out = ops.mixed_attention_spatial_conv_bwd(dz, sa, sm, weight, bias)
    exp = ref.mixed_attention_spatial_conv_bwd(dz, sa, sm, weight, bias)
    for name, o, e in zip(("dsa", "dsm", "dweight", "dbias"), out, exp):
        assert o.shape == e.shape and o.dtype == dtype, name
        # dweight / dbias sum N*H*W terms
        atol = rtol * (k if name in ("dsa", "dsm") else max(1, n * h * w) ** 0.5)
        torch.testing.assert_close(o, e, rtol=rtol, atol=atol, msg=name)


def test_spatial_conv_deterministic_and_noncontiguous():
    gen = _gen(12)
    sa, sm, dz = (torch.randn(5, 19, 23, generator=gen) for _ in range(3))
    weight = torch.randn(1, 2, 7, 7, generator=gen)
    first = ops.mixed_attention_spatial_conv_bwd(dz, sa, sm, weight, True)
    again = ops.mixed_attention_spatial_conv_bwd(dz, sa, sm, weight, True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # a transposed view gives the same result as its contiguous copy
    sa_t = sa.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(ops.mixed_attention_spatial_conv(sa_t, sm, weight, None),
                       ops.mixed_attention_spatial_conv(sa, sm, weight, None))


def test_spatial_conv_bad_arguments():
    sa = torch.randn(2, 5, 5)
    w = torch.randn(1, 2, 3, 3)
    with pytest.raises(TypeError, match="sa: expected dtype float32 or float64"):
        ops.mixed_attention_spatial_conv(sa.half(), sa.half(), w.half(), None)
    with pytest.raises(ValueError, match="sm: expected shape"):
        ops.mixed_attention_spatial_conv(sa, sa[:, :4], w, None)
    with pytest.raises(TypeError, match="sm: expected dtype"):
        ops.mixed_attention_spatial_conv(sa, sa.double(), w, None)
    with pytest.raises(ValueError, match="weight: expected shape"):
        ops.mixed_attention_spatial_conv(sa, sa, torch.randn(1, 2, 4, 4), None)
    with pytest.raises(ValueError, match="bias: expected shape"):
        ops.mixed_attention_spatial_conv(sa, sa, w, torch.randn(2))
    with pytest.raises(ValueError, match="sa: expected a rank-3"):
        ops.mixed_attention_spatial_conv(sa[0], sa[0], w, None)
    with pytest.raises(ValueError, match="dz: expected shape"):
        ops.mixed_attention_spatial_conv_bwd(sa[:1], sa, sa, w, False)
