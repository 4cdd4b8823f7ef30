"""Triton mixed-attention passes vs. the pure-PyTorch contract (reference/passes.py).

Without a GPU the kernels run under the Triton interpreter, which is chosen when
triton is *first imported* in the process. This module sets TRITON_INTERPRET=1
(when there is no GPU) before importing triton, but something may import triton
earlier in the same pytest process; so on a machine without a GPU run the suite
with ``TRITON_INTERPRET=1`` in the environment. If triton was imported without
it and there is no GPU, this module skips with that advice.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from manet_kernels.reference import passes as ref  # noqa: E402
from manet_kernels.triton import mixed_attention as tri  # noqa: E402

INTERPRETING = tri._interpreting()
HAS_GPU = torch.cuda.is_available() and not INTERPRETING
if not (INTERPRETING or HAS_GPU):
    pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU: "
                "run pytest with TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if HAS_GPU else "cpu"
pytestmark = [pytest.mark.triton] + ([pytest.mark.gpu] if HAS_GPU else [])
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device (bf16 and big shapes are GPU-only)")

# bf16 arithmetic is wrong under the interpreter, so bf16 runs on a GPU only.
DTYPES = [torch.float32, torch.float16, torch.float64] + ([torch.bfloat16] if HAS_GPU else [])
LAYOUTS = ["nchw", "channels_last"]

# Every C meets every (H, W) once: odd sizes, partial blocks, and (C=33, P=35)
# more than two interpreter tiles of 16 along each axis.
_C = [1, 3, 7, 33]
_HW = [(1, 1), (1, 5), (3, 3), (5, 7)]
SHAPES = [(1 + (i + j) % 2, c, h, w) for i, c in enumerate(_C) for j, (h, w) in enumerate(_HW)]
# fp32 runs every shape; the other dtypes a subset, to keep the interpreter run short.
SMALL_SET = [(2, 33, 5, 7), (1, 7, 3, 3), (2, 3, 1, 5), (1, 1, 1, 1)]
BIG_SHAPES = [(3, 257, 13, 11), (2, 64, 56, 56)]


def _cases():
    out = []
    for dtype in DTYPES:
        shapes = SHAPES if dtype == torch.float32 else SMALL_SET
        if HAS_GPU:
            shapes = shapes + BIG_SHAPES
        for layout in LAYOUTS:
            for shape in shapes:
                name = f"{str(dtype)[6:]}-{layout}-{'x'.join(map(str, shape))}"
                out.append(pytest.param(dtype, layout, shape, id=name))
    return out


CASES = _cases()


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #

def _fmt(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _act(t, dtype, layout):
    return t.to(device=DEVICE, dtype=dtype).contiguous(memory_format=_fmt(layout))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, gen, dtype=torch.float32):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _tie_free(shape, gen):
    # Distinct multiples of 1/64, exact in fp16 while numel <= 4096 (the CPU
    # shapes), so the max is unique in every row and column. Bigger shapes and
    # bf16 round some together; the indices must still match (first max wins).
    numel = 1
    for s in shape:
        numel *= s
    vals = torch.randperm(numel, generator=gen).to(torch.float64) - numel // 2
    return (vals / 64).reshape(shape)


def _small(shape, gen, acc, low=None):
    t = torch.rand(shape, generator=gen, dtype=torch.float64) if low == "unit" else _randn(shape, gen, torch.float64)
    return t.to(device=DEVICE, dtype=acc)


def _same_format(out, x):
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    assert out.is_contiguous() == x.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)


def _close_reduced(out, exp, k, scale=1.0):
    """Reductions of k terms of size up to ``scale``, accumulated in acc dtype
    by both sides in different orders."""
    assert out.dtype == exp.dtype and out.shape == exp.shape
    if exp.dtype == torch.float64:
        rtol, atol = 1e-12, 1e-14 * k ** 0.5 * scale
    else:
        rtol, atol = 1e-5, 3e-6 * k ** 0.5 * scale
    torch.testing.assert_close(out, exp, rtol=rtol, atol=atol, equal_nan=True)


_ACT_TOL = {  # output rounded to the activation dtype; one ulp of slack there
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}


def _close_act(out, exp):
    rtol, atol = _ACT_TOL[exp.dtype]
    torch.testing.assert_close(out, exp, rtol=rtol, atol=atol, equal_nan=True)


def _idx_equal(out, exp):
    assert out.dtype == torch.int32 and exp.dtype == torch.int32
    assert torch.equal(out.cpu(), exp.cpu()), (out != exp).nonzero()[:8]


# --------------------------------------------------------------------------- #
# each pass vs. the contract
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_channel_pool(dtype, layout, shape):
    x = _act(_tie_free(shape, _gen(1)), dtype, layout)
    avg, mx, im = tri.mixed_attention_channel_pool(x)
    e_avg, e_mx, e_im = ref.mixed_attention_channel_pool(x)
    _close_reduced(avg, e_avg, shape[2] * shape[3], x.abs().max().item())
    torch.testing.assert_close(mx, e_mx, rtol=0, atol=0)  # a max is exact
    _idx_equal(im, e_im)


@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_spatial_pool(dtype, layout, shape):
    gen = _gen(2)
    acc = ref.acc_dtype(dtype)
    x = _act(_tie_free(shape, gen), dtype, layout)
    mc = _small(shape[:2], gen, acc, "unit")
    sa, sm, ic = tri.mixed_attention_spatial_pool(x, mc)
    e_sa, e_sm, e_ic = ref.mixed_attention_spatial_pool(x, mc)
    _close_reduced(sa, e_sa, shape[1], x.abs().max().item())
    torch.testing.assert_close(sm, e_sm, rtol=0, atol=0)
    _idx_equal(ic, e_ic)


@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_apply(dtype, layout, shape):
    gen = _gen(3)
    acc = ref.acc_dtype(dtype)
    n, c, h, w = shape
    x = _act(_randn(shape, gen), dtype, layout)
    mc, ms = _small((n, c), gen, acc, "unit"), _small((n, h, w), gen, acc, "unit")
    y = tri.mixed_attention_apply(x, mc, ms)
    _same_format(y, x)
    _close_act(y, ref.mixed_attention_apply(x, mc, ms))


@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_bwd_reduce(dtype, layout, shape):
    gen = _gen(4)
    acc = ref.acc_dtype(dtype)
    n, c, h, w = shape
    x, g = _act(_randn(shape, gen), dtype, layout), _act(_randn(shape, gen), dtype, layout)
    mc, ms = _small((n, c), gen, acc, "unit"), _small((n, h, w), gen, acc, "unit")
    dms, dmc = tri.mixed_attention_bwd_reduce(g, x, mc, ms)
    e_dms, e_dmc = ref.mixed_attention_bwd_reduce(g, x, mc, ms)
    _close_reduced(dms, e_dms, c)
    _close_reduced(dmc, e_dmc, h * w)


@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_bwd_channel(dtype, layout, shape):
    gen = _gen(5)
    acc = ref.acc_dtype(dtype)
    n, c, h, w = shape
    x = _act(_randn(shape, gen), dtype, layout)
    da, dm = _small((n, h, w), gen, acc), _small((n, h, w), gen, acc)
    ic = torch.randint(0, c, (n, h, w), generator=gen, dtype=torch.int32).to(DEVICE)
    out = tri.mixed_attention_bwd_channel(x, da, dm, ic)
    _close_reduced(out, ref.mixed_attention_bwd_channel(x, da, dm, ic), h * w)


@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_bwd_dx(dtype, layout, shape):
    gen = _gen(6)
    acc = ref.acc_dtype(dtype)
    n, c, h, w = shape
    g = _act(_randn(shape, gen), dtype, layout)
    mc, ms = _small((n, c), gen, acc, "unit"), _small((n, h, w), gen, acc, "unit")
    da, dm = _small((n, h, w), gen, acc), _small((n, h, w), gen, acc)
    d_avg, d_mx = _small((n, c), gen, acc), _small((n, c), gen, acc)
    ic = torch.randint(0, c, (n, h, w), generator=gen, dtype=torch.int32).to(DEVICE)
    im = torch.randint(0, h * w, (n, c), generator=gen, dtype=torch.int32).to(DEVICE)
    args = (g, mc, ms, da, dm, ic, d_avg, d_mx, im)
    dx = tri.mixed_attention_bwd_dx(*args)
    _same_format(dx, g)
    _close_act(dx, ref.mixed_attention_bwd_dx(*args))


@pytest.mark.parametrize("g_layout,x_layout", [("nchw", "channels_last"), ("channels_last", "nchw")])
def test_bwd_reduce_mixed_layouts(g_layout, x_layout):
    gen = _gen(7)
    n, c, h, w = shape = (2, 33, 5, 7)
    x, g = _act(_randn(shape, gen), torch.float32, x_layout), _act(_randn(shape, gen), torch.float32, g_layout)
    mc, ms = _small((n, c), gen, torch.float32, "unit"), _small((n, h, w), gen, torch.float32, "unit")
    dms, dmc = tri.mixed_attention_bwd_reduce(g, x, mc, ms)
    e_dms, e_dmc = ref.mixed_attention_bwd_reduce(g, x, mc, ms)
    _close_reduced(dms, e_dms, c)
    _close_reduced(dmc, e_dmc, h * w)


# --------------------------------------------------------------------------- #
# max / argmax semantics
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("value", [0.5, 0.0, float("-inf")])
def test_all_equal_picks_index_zero(layout, value):
    n, c, h, w = shape = (2, 33, 5, 7)
    x = _act(torch.full(shape, value), torch.float32, layout)
    mc = torch.full((n, c), 0.75, device=DEVICE)
    _, mx, im = tri.mixed_attention_channel_pool(x)
    _, sm, ic = tri.mixed_attention_spatial_pool(x, mc)
    assert torch.equal(im.cpu(), torch.zeros(n, c, dtype=torch.int32))
    assert torch.equal(ic.cpu(), torch.zeros(n, h, w, dtype=torch.int32))
    assert torch.equal(mx.cpu(), torch.full((n, c), value))
    assert torch.equal(sm.cpu(), torch.full((n, h, w), value * 0.75))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_ties_first_max(dtype, layout):
    # Three distinct values: most rows and columns tie at their max somewhere
    # after the first block, so the lowest index has to survive the block loop.
    gen = _gen(8)
    n, c, h, w = shape = (2, 33, 5, 7)
    x = _act(torch.randint(0, 3, shape, generator=gen).float(), dtype, layout)
    mc = torch.ones((n, c), device=DEVICE)
    _idx_equal(tri.mixed_attention_channel_pool(x)[2], ref.mixed_attention_channel_pool(x)[2])
    _idx_equal(tri.mixed_attention_spatial_pool(x, mc)[2], ref.mixed_attention_spatial_pool(x, mc)[2])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_propagates_first_nan_wins(layout):
    gen = _gen(9)
    n, c, h, w = shape = (2, 33, 5, 7)
    base = _randn(shape, gen)
    base[0, 5, 2, 3] = base[0, 5, 4, 6] = float("nan")  # two NaNs in one channel row
    base[1, :, 0, 0] = float("-inf")                    # a -inf column
    base[1, 20, 1, 1] = base[1, 31, 1, 1] = float("nan")  # two NaNs in one position column
    base[1, 2, 3, 3] = float("inf")
    x = _act(base, torch.float32, layout)
    mc = _small((n, c), gen, torch.float32, "unit")
    avg, mx, im = tri.mixed_attention_channel_pool(x)
    e_avg, e_mx, e_im = ref.mixed_attention_channel_pool(x)
    torch.testing.assert_close(mx, e_mx, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(avg, e_avg, equal_nan=True)
    _idx_equal(im, e_im)
    assert im[0, 5].item() == 2 * w + 3
    sa, sm, ic = tri.mixed_attention_spatial_pool(x, mc)
    e_sa, e_sm, e_ic = ref.mixed_attention_spatial_pool(x, mc)
    torch.testing.assert_close(sm, e_sm, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(sa, e_sa, equal_nan=True)
    _idx_equal(ic, e_ic)
    assert ic[1, 1, 1].item() == 20


# --------------------------------------------------------------------------- #
# empty batch, argument checks, device rule
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch(layout):
    shape = (0, 3, 2, 5)
    x = _act(torch.zeros(shape), torch.float32, layout)
    f32 = dict(dtype=torch.float32, device=DEVICE)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    nc, nhw = (0, 3), (0, 2, 5)
    mc, ms, da, dm = torch.zeros(nc, **f32), torch.zeros(nhw, **f32), torch.zeros(nhw, **f32), torch.zeros(nhw, **f32)
    ic, im = torch.zeros(nhw, **i32), torch.zeros(nc, **i32)
    calls = [
        ("mixed_attention_channel_pool", (x,)),
        ("mixed_attention_spatial_pool", (x, mc)),
        ("mixed_attention_apply", (x, mc, ms)),
        ("mixed_attention_bwd_reduce", (x, x, mc, ms)),
        ("mixed_attention_bwd_channel", (x, da, dm, ic)),
        ("mixed_attention_bwd_dx", (x, mc, ms, da, dm, ic, mc, mc, im)),
    ]
    for name, args in calls:
        out, exp = getattr(tri, name)(*args), getattr(ref, name)(*args)
        out = out if isinstance(out, tuple) else (out,)
        exp = exp if isinstance(exp, tuple) else (exp,)
        assert [(o.shape, o.dtype, o.device) for o in out] == [(e.shape, e.dtype, e.device) for e in exp], name


def _good_args():
    n, c, h, w = 2, 3, 2, 5
    x = torch.randn(n, c, h, w, device=DEVICE)
    f = dict(dtype=torch.float32, device=DEVICE)
    return dict(x=x, g=torch.randn_like(x), mc=torch.rand(n, c, **f), ms=torch.rand(n, h, w, **f),
                da_s=torch.randn(n, h, w, **f), dm_s=torch.randn(n, h, w, **f),
                ic=torch.zeros(n, h, w, dtype=torch.int32, device=DEVICE),
                d_avg=torch.randn(n, c, **f), d_mx=torch.randn(n, c, **f),
                im=torch.zeros(n, c, dtype=torch.int32, device=DEVICE))


_SIGS = {
    "mixed_attention_channel_pool": ("x",),
    "mixed_attention_spatial_pool": ("x", "mc"),
    "mixed_attention_apply": ("x", "mc", "ms"),
    "mixed_attention_bwd_reduce": ("g", "x", "mc", "ms"),
    "mixed_attention_bwd_channel": ("x", "da_s", "dm_s", "ic"),
    "mixed_attention_bwd_dx": ("g", "mc", "ms", "da_s", "dm_s", "ic", "d_avg", "d_mx", "im"),
}

_BAD = [  # (argument, how to spoil it, expected error)
    ("x", lambda t: t[0], ValueError),                          # 3-D
    ("x", lambda t: t.to(torch.int32), TypeError),
    ("x", lambda t: t.transpose(2, 3), ValueError),             # neither layout
    ("x", lambda t: t.tolist(), TypeError),
    ("g", lambda t: t[:, :, :, :4], ValueError),                # strided slice, and wrong shape
    ("g", lambda t: t.double(), TypeError),                     # unlike x (bwd_reduce only, below)
    ("mc", lambda t: t.half(), TypeError),
    ("mc", lambda t: t[:, :2], ValueError),
    ("ms", lambda t: t[:, None], ValueError),                   # (N,1,H,W) is not the contract
    ("da_s", lambda t: t.double(), TypeError),
    ("dm_s", lambda t: t.reshape(2, 10), ValueError),
    ("ic", lambda t: t.long(), TypeError),
    ("d_avg", lambda t: t[:1], ValueError),
    ("d_mx", lambda t: t.half(), TypeError),
    ("im", lambda t: t.float(), TypeError),
]


@pytest.mark.parametrize("name", list(_SIGS))
def test_bad_arguments(name):
    names = _SIGS[name]
    checked = 0
    for arg, spoil, err in _BAD:
        if arg not in names or (arg == "g" and err is TypeError and names[0] == "g" and "x" not in names):
            continue  # g sets the acc dtype in bwd_dx; a float64 g is legal there
        args = _good_args()
        args[arg] = spoil(args[arg])
        with pytest.raises(err, match=rf"^{arg}\b"):
            getattr(tri, name)(*[args[a] for a in names])
        checked += 1
    assert checked


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(tri, "_interpreting", lambda: False)
    a = _good_args()
    x = a["x"].cpu()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tri.mixed_attention_channel_pool(x)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tri.mixed_attention_apply(x, a["mc"].cpu(), a["ms"].cpu())


# --------------------------------------------------------------------------- #
# the GPU tile shapes, checked under the interpreter
# --------------------------------------------------------------------------- #

def _gpu_configs(lst):
    return [triton.Config(kw, num_warps=w) for kw, w in lst]


@pytest.mark.skipif(not INTERPRETING, reason="GPU autotune covers these on a GPU")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_gpu_config_under_interpreter(layout, monkeypatch):
    # Only the interpreter's single tile runs in the other tests; here every
    # block shape that autotune may pick on a GPU runs once, on a shape with
    # partial blocks in both axes.
    gen = _gen(10)
    n, c, h, w = shape = (1, 19, 3, 7)
    x = _act(_tie_free(shape, gen), torch.float32, layout)
    g = _act(_randn(shape, gen), torch.float32, layout)
    mc, ms = _small((n, c), gen, torch.float32, "unit"), _small((n, h, w), gen, torch.float32, "unit")
    da, dm = _small((n, h, w), gen, torch.float32), _small((n, h, w), gen, torch.float32)
    ic = torch.randint(0, c, (n, h, w), generator=gen, dtype=torch.int32)
    im = torch.randint(0, h * w, (n, c), generator=gen, dtype=torch.int32)
    d_avg, d_mx = _small((n, c), gen, torch.float32), _small((n, c), gen, torch.float32)
    runs = [
        (tri._mixed_attention_channel_pool_kernel, tri._POOL_C_CONFIGS, "mixed_attention_channel_pool", (x,)),
        (tri._mixed_attention_spatial_pool_kernel, tri._POOL_P_CONFIGS, "mixed_attention_spatial_pool", (x, mc)),
        (tri._mixed_attention_apply_kernel, tri._ELEMENTWISE_CONFIGS, "mixed_attention_apply", (x, mc, ms)),
        (tri._mixed_attention_bwd_reduce_kernel, tri._BWD_REDUCE_CONFIGS, "mixed_attention_bwd_reduce",
         (g, x, mc, ms)),
        (tri._mixed_attention_bwd_channel_kernel, tri._BWD_CHANNEL_CONFIGS, "mixed_attention_bwd_channel",
         (x, da, dm, ic)),
        (tri._mixed_attention_bwd_dx_kernel, tri._ELEMENTWISE_CONFIGS, "mixed_attention_bwd_dx",
         (g, mc, ms, da, dm, ic, d_avg, d_mx, im)),
    ]
    for kernel, configs, name, args in runs:
        exp = getattr(ref, name)(*args)
        exp = exp if isinstance(exp, tuple) else (exp,)
        block_ps = [32, 64] if kernel is tri._mixed_attention_bwd_reduce_kernel else [None]
        for cfg in _gpu_configs(configs):
            for bp in block_ps:
                monkeypatch.setitem(tri._FORCED_CONFIGS, kernel, cfg)
                if bp is not None:
                    monkeypatch.setattr(tri, "_bwd_reduce_block_p", lambda p, cl, bp=bp: bp)
                out = getattr(tri, name)(*args)
                out = out if isinstance(out, tuple) else (out,)
                for o, e in zip(out, exp):
                    if e.dtype == torch.int32:
                        _idx_equal(o, e)
                    else:
                        torch.testing.assert_close(o, e, rtol=1e-5, atol=2e-5, msg=lambda m: f"{name} {cfg}: {m}")
        monkeypatch.delitem(tri._FORCED_CONFIGS, kernel)


def _all_passes_vs_reference(shape, layout, seed):
    gen = _gen(seed)
    n, c, h, w = shape
    x = _act(_tie_free(shape, gen), torch.float32, layout)
    g = _act(_randn(shape, gen), torch.float32, layout)
    mc, ms = _small((n, c), gen, torch.float32, "unit"), _small((n, h, w), gen, torch.float32, "unit")
    da, dm = _small((n, h, w), gen, torch.float32), _small((n, h, w), gen, torch.float32)
    d_avg, d_mx = _small((n, c), gen, torch.float32), _small((n, c), gen, torch.float32)
    ic = torch.randint(0, c, (n, h, w), generator=gen, dtype=torch.int32).to(DEVICE)
    im = torch.randint(0, h * w, (n, c), generator=gen, dtype=torch.int32).to(DEVICE)
    for name, args in [
        ("mixed_attention_channel_pool", (x,)),
        ("mixed_attention_spatial_pool", (x, mc)),
        ("mixed_attention_apply", (x, mc, ms)),
        ("mixed_attention_bwd_reduce", (g, x, mc, ms)),
        ("mixed_attention_bwd_channel", (x, da, dm, ic)),
        ("mixed_attention_bwd_dx", (g, mc, ms, da, dm, ic, d_avg, d_mx, im)),
    ]:
        out, exp = getattr(tri, name)(*args), getattr(ref, name)(*args)
        out = out if isinstance(out, tuple) else (out,)
        exp = exp if isinstance(exp, tuple) else (exp,)
        for o, e in zip(out, exp):
            if e.dtype == torch.int32:
                _idx_equal(o, e)
            else:
                torch.testing.assert_close(o, e, rtol=1e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_int64_offsets_path(layout, monkeypatch):
    # Tensors of 2**31 elements do not fit a test; force the int64 offset
    # code on a small one instead.
    monkeypatch.setattr(tri, "_needs_i64", lambda *ts: True)
    _all_passes_vs_reference((2, 19, 3, 7), layout, 12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic_algorithms_fixed_config(layout):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _all_passes_vs_reference((2, 19, 3, 7), layout, 13)
    finally:
        torch.use_deterministic_algorithms(before)


# --------------------------------------------------------------------------- #
# GPU only
# --------------------------------------------------------------------------- #

@gpu_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(dtype, layout):
    gen = _gen(11)
    n, c, h, w = shape = (2, 64, 56, 56)
    x, g = _act(_randn(shape, gen), dtype, layout), _act(_randn(shape, gen), dtype, layout)
    mc, ms = _small((n, c), gen, torch.float32, "unit"), _small((n, h, w), gen, torch.float32, "unit")
    da, dm = _small((n, h, w), gen, torch.float32), _small((n, h, w), gen, torch.float32)
    ic = torch.randint(0, c, (n, h, w), generator=gen, dtype=torch.int32).to(DEVICE)
    im = torch.randint(0, h * w, (n, c), generator=gen, dtype=torch.int32).to(DEVICE)
    calls = [
        (tri.mixed_attention_channel_pool, (x,)),
        (tri.mixed_attention_spatial_pool, (x, mc)),
        (tri.mixed_attention_apply, (x, mc, ms)),
        (tri.mixed_attention_bwd_reduce, (g, x, mc, ms)),
        (tri.mixed_attention_bwd_channel, (x, da, dm, ic)),
        (tri.mixed_attention_bwd_dx, (g, mc, ms, da, dm, ic, mc, mc, im)),
    ]
    for fn, args in calls:
        first = fn(*args)
        first = first if isinstance(first, tuple) else (first,)
        for _ in range(3):
            again = fn(*args)
            again = again if isinstance(again, tuple) else (again,)
            for a, b in zip(first, again):
                assert torch.equal(a, b), fn.__name__
