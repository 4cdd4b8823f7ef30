"""CUDA BR-NPA pass kernels (csrc/cuda/brnpa.cu) against the pass contract,
``manet_kernels.reference.passes``, evaluated on the same CUDA inputs.

Sums are compared with a bound proportional to the sum of absolute terms (the
reference evaluated on absolute values); ``brnpa_bwd_dx``, returned in x's dtype, gets
one unit in the last place of that dtype on top.
"""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

from manet_kernels import _ext
from manet_kernels.reference import passes as ref


def _brnpa_cuda_registered() -> bool:
    # A development build (MANET_KERNELS_LIB) may hold the BR-NPA kernels alone, so ask
    # for them directly as well as for the full build's flag.
    if not _ext.HAS_EXT:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("manet_kernels::brnpa_step", "CUDA")
    except RuntimeError:
        return False


if not torch.cuda.is_available() or not (_ext.HAS_CUDA_KERNELS or _brnpa_cuda_registered()):
    pytest.skip("needs a CUDA device and manet_kernels built with its CUDA kernels",
                allow_module_level=True)

ops = torch.ops.manet_kernels
DEV = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("nchw", "channels_last")
SHAPES = [(n, c, h, w) for n, c, (h, w) in itertools.product(
    (1, 3), (1, 3, 7, 64, 257, 2048), ((1, 1), (1, 7), (5, 3), (13, 11), (56, 56)))]
PARTS = (1, 3, 16)
# Multi-block samples (partials + finalize), the shapes the kernels are tuned for.
LARGE = [(8, 2048, 56, 56), (64, 2048, 14, 14), (4, 256, 56, 56), (16, 1024, 14, 14)]
# error <= SUM_ULPS * eps(acc) * sum|terms|: generous for fp32 sums of a few thousand
# terms, still far below the effect of one missing or doubled term.
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


def small(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV, dtype=dtype)


def inv_norms(x):
    """The forward's inv_nrm, from the reference norms."""
    return 1.0 / (ref.brnpa_norms(x) + 1e-5)


def rand_idx(n, p):
    return torch.randint(0, p, (n,), device=DEV, dtype=torch.int64)


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


def assert_rounded_sum_close(out, expect, abs_sum, what):
    """Outputs in x's dtype: the sum's bound, plus one rounding of that dtype."""
    assert out.dtype == expect.dtype and out.shape == expect.shape, what
    assert out.stride() == expect.stride(), f"{what}: memory format differs"
    a = abs_sum.dtype
    fx, fa = torch.finfo(out.dtype), torch.finfo(a)
    o, e = out.to(a), expect.to(a)
    tol = fx.eps * torch.maximum(o.abs(), e.abs()) + SUM_ULPS * fa.eps * abs_sum + fx.tiny
    err = (o - e).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {out.numel()} beyond tolerance, "
                           f"max error {err.max().item():.3e}, "
                           f"first at {bad.nonzero()[0].tolist()}")


# --------------------------------------------------------------------------- checks


def check_norms(x):
    nrm = ops.brnpa_norms(x)
    r = ref.brnpa_norms(x)
    assert_sum_close(nrm, r, r, "nrm")


def check_step(x, inv, idx):
    s, sv = ops.brnpa_step(x, inv, idx)
    r_s, r_sv = ref.brnpa_step(x, inv, idx)
    a_s, a_sv = ref.brnpa_step(x.abs(), inv.abs(), idx)
    assert_sum_close(s, r_s, a_s, "s")
    assert_sum_close(sv, r_sv, a_sv, "sv")


def check_bwd_reduce(x, inv, dv, dmap):
    dw, u, t = ops.brnpa_bwd_reduce(x, inv, dv, dmap)
    r_dw, r_u, r_t = ref.brnpa_bwd_reduce(x, inv, dv, dmap)
    a_dw, a_u, a_t = ref.brnpa_bwd_reduce(x.abs(), inv.abs(), dv.abs(), dmap.abs())
    assert_sum_close(dw, r_dw, a_dw, "dw")
    assert_sum_close(u, r_u, a_u, "u")
    assert_sum_close(t, r_t, a_t, "t")


def check_bwd_dx(x, a, m, c):
    df = ops.brnpa_bwd_dx(x, a, m, c)
    r_df = ref.brnpa_bwd_dx(x, a, m, c)
    # sum_j |a||m| + |c||f|, in the accumulation dtype
    xa = x.to(m.dtype).abs()
    abs_df = torch.einsum("bjhw,bjc->bchw", a.abs(), m.abs()) + c.abs()[:, None] * xa
    assert_rounded_sum_close(df, r_df, abs_df, "df")


def step_args(shape, dtype, layout):
    n, c, h, w = shape
    x = act(shape, dtype, layout)
    return x, inv_norms(x), rand_idx(n, h * w)


def bwd_reduce_args(shape, dtype, layout, k):
    n, c, h, w = shape
    a = acc(dtype)
    x = act(shape, dtype, layout)
    return x, inv_norms(x), small(n, k, c, dtype=a), small(n, k, h, w, dtype=a)


def bwd_dx_args(shape, dtype, layout, j):
    n, c, h, w = shape
    a = acc(dtype)
    return (act(shape, dtype, layout), small(n, j, h, w, dtype=a), small(n, j, c, dtype=a),
            small(n, h, w, dtype=a))


def run_all(shape, dtype, layout, k=3):
    check_norms(act(shape, dtype, layout))
    check_step(*step_args(shape, dtype, layout))
    check_bwd_reduce(*bwd_reduce_args(shape, dtype, layout, k))
    check_bwd_dx(*bwd_dx_args(shape, dtype, layout, 2 * k))


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms(shape, layout, dtype):
    check_norms(act(shape, dtype, layout))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step(shape, layout, dtype):
    check_step(*step_args(shape, dtype, layout))


@pytest.mark.parametrize("k", PARTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_reduce(shape, layout, dtype, k):
    check_bwd_reduce(*bwd_reduce_args(shape, dtype, layout, k))


@pytest.mark.parametrize("k", PARTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_dx(shape, layout, dtype, k):
    check_bwd_dx(*bwd_dx_args(shape, dtype, layout, 2 * k))


@pytest.mark.parametrize("shape", LARGE, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_large_shapes(shape, layout, dtype):
    run_all(shape, dtype, layout)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 7, 5, 3), (2, 64, 13, 11), (2, 257, 7, 7),
                                   (2, 2048, 14, 14)], ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", PARTS)
def test_float64(shape, layout, k):
    run_all(shape, torch.float64, layout, k)


@pytest.mark.parametrize("k", (17, 20, 37))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_parts_chunked(k, layout):
    """More than 16 parts: bwd_reduce runs several launches; bwd_dx several stages."""
    for shape in [(2, 64, 13, 11), (3, 257, 7, 7)]:
        check_bwd_reduce(*bwd_reduce_args(shape, torch.float32, layout, k))
        check_bwd_dx(*bwd_dx_args(shape, torch.float32, layout, 2 * k))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_wide_channels_fewer_parts_per_launch(layout):
    """u's accumulators for C = 16384 and 5 parts do not fit in shared memory at once."""
    shape = (2, 16384, 3, 5)
    check_step(*step_args(shape, torch.float32, layout))
    check_bwd_reduce(*bwd_reduce_args(shape, torch.float32, layout, 5))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_parts(layout, dtype):
    """K = 0 still gives t; J = 0 gives df = -c * f."""
    shape = (2, 64, 5, 3)
    n, c, h, w = shape
    x, inv, dv, dmap = bwd_reduce_args(shape, dtype, layout, 0)
    dw, u, t = ops.brnpa_bwd_reduce(x, inv, dv, dmap)
    assert dw.shape == (n, 0, h, w) and u.shape == (n, 0, c)
    _, _, r_t = ref.brnpa_bwd_reduce(x, inv, small(n, 1, c, dtype=acc(dtype)),
                                     small(n, 1, h, w, dtype=acc(dtype)))
    a_t = ref.brnpa_bwd_reduce(x.abs(), inv, small(n, 1, c, dtype=acc(dtype)),
                               small(n, 1, h, w, dtype=acc(dtype)))[2]
    assert_sum_close(t, r_t, a_t, "t")
    check_bwd_dx(*bwd_dx_args(shape, dtype, layout, 0))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_of_range_idx_is_clamped(layout, dtype):
    """idx is not range-checked (that would sync): out-of-range values read the nearest
    valid position instead of faulting."""
    shape = (2, 64, 5, 3)
    x, inv, _ = step_args(shape, dtype, layout)
    p = shape[2] * shape[3]
    got = ops.brnpa_step(x, inv, torch.tensor([-7, p + 3], device=DEV))
    want = ops.brnpa_step(x, inv, torch.tensor([0, p - 1], device=DEV))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_activation_uses_scalar_path(layout, dtype):
    """A view starting one element into its storage cannot take vector loads."""
    shape = (2, 64, 14, 14)
    base = act(shape, dtype, layout)
    store = torch.empty(base.numel() + 1, device=DEV, dtype=dtype)
    x = store.as_strided(shape, base.stride(), storage_offset=1)
    x.copy_(base)
    assert x.data_ptr() % 16 != 0
    n, c, h, w = shape
    a = acc(dtype)
    check_norms(x)
    check_step(x, inv_norms(x), rand_idx(n, h * w))
    check_bwd_reduce(x, inv_norms(x), small(n, 3, c, dtype=a), small(n, 3, h, w, dtype=a))
    check_bwd_dx(x, small(n, 6, h, w, dtype=a), small(n, 6, c, dtype=a), small(n, h, w, dtype=a))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_misaligned_dv(layout):
    """dv starting one float into its storage (channels_last reads it in vectors)."""
    shape = (2, 64, 7, 7)
    n, c, h, w = shape
    x, inv, dv, dmap = bwd_reduce_args(shape, torch.float32, layout, 3)
    store = torch.empty(dv.numel() + 1, device=DEV)
    dv_odd = store[1:].view(dv.shape)
    dv_odd.copy_(dv)
    assert dv_odd.data_ptr() % 16 != 0
    check_bwd_reduce(x, inv, dv_odd, dmap)


@pytest.mark.parametrize("shape", [(2, 257, 56, 56), (3, 2048, 14, 14), (1, 64, 300, 301),
                                   (8, 2048, 7, 7)], ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_deterministic(shape, layout, dtype):
    x, inv, idx = step_args(shape, dtype, layout)
    _, _, dv, dmap = bwd_reduce_args(shape, dtype, layout, 3)
    dx_args = bwd_dx_args(shape, dtype, layout, 6)
    calls = [
        lambda: (ops.brnpa_norms(x),),
        lambda: ops.brnpa_step(x, inv, idx),
        lambda: ops.brnpa_bwd_reduce(x, inv, dv, dmap),
        lambda: (ops.brnpa_bwd_dx(*dx_args),),
    ]
    for call in calls:
        first = [t.clone() for t in call()]
        for _ in range(2):
            again = call()
            assert all(torch.equal(u, v) for u, v in zip(first, again))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_empty_batch(layout, dtype):
    n, c, h, w, k = 0, 5, 7, 3, 2
    x = act((n, c, h, w), dtype, layout)
    a = acc(dtype)
    inv = torch.ones(n, h, w, device=DEV, dtype=a)
    idx = torch.zeros(n, device=DEV, dtype=torch.int64)
    expect = [
        (ops.brnpa_norms(x), [((n, h, w), a)]),
        (ops.brnpa_step(x, inv, idx), [((n, h, w), a), ((n, c), a)]),
        (ops.brnpa_bwd_reduce(x, inv, small(n, k, c, dtype=a), small(n, k, h, w, dtype=a)),
         [((n, k, h, w), a), ((n, k, c), a), ((n, c), a)]),
        (ops.brnpa_bwd_dx(x, small(n, k, h, w, dtype=a), small(n, k, c, dtype=a),
                          small(n, h, w, dtype=a)), [((n, c, h, w), dtype)]),
    ]
    for got, want in expect:
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(want)
        for t, (shape, dt) in zip(got, want):
            assert tuple(t.shape) == shape and t.dtype == dt and t.device == x.device


# --------------------------------------------------------------------------- composition


@pytest.mark.parametrize("variant_paper", (False, True))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_composed_forward_backward_match_torch_passes(variant_paper, layout, dtype):
    """The registered forward / backward compositions with the CUDA passes against the
    same compositions with the PyTorch passes."""
    # the module, not the function manet_kernels.ops re-exports under the same name
    brnpa_ops = importlib.import_module("manet_kernels.ops.brnpa")
    # non-negative features (as after a ReLU): the similarity sums stay away from 0
    x = act((3, 64, 13, 11), dtype, layout).abs()
    got = brnpa_ops._forward_impl(x, 4, variant_paper, "cuda")
    want = brnpa_ops._forward_impl(x, 4, variant_paper, "torch")
    assert torch.equal(got[4], want[4]), "argmax indices differ"
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
    gv = torch.randn_like(want[0])
    gmap = torch.randn_like(want[1])
    saved = want[2:]
    dx = brnpa_ops._backward_impl(gv, gmap, x, *saved, "cuda")
    dx_ref = brnpa_ops._backward_impl(gv, gmap, x, *saved, "torch")
    assert dx.stride() == dx_ref.stride()
    torch.testing.assert_close(dx, dx_ref, **tol)


# --------------------------------------------------------------------------- bad arguments


def _raises(name, fn, *args):
    with pytest.raises(RuntimeError, match=rf"expected {name}\b"):
        fn(*args)


def test_bad_arguments_name_the_argument():
    n, c, h, w, k = 2, 8, 5, 3, 3
    x = torch.randn(n, c, h, w, device=DEV)
    inv = torch.rand(n, h, w, device=DEV) + 0.5
    idx = rand_idx(n, h * w)
    dv, dmap = small(n, k, c), small(n, k, h, w)
    a, m, cc = small(n, 2 * k, h, w), small(n, 2 * k, c), small(n, h, w)
    nm, st = ops.brnpa_norms, ops.brnpa_step
    br, bd = ops.brnpa_bwd_reduce, ops.brnpa_bwd_dx

    # x: rank, dtype, layout, device
    _raises("x", nm, x[0])
    _raises("x", nm, x.to(torch.int32))
    _raises("x", nm, x[..., ::2])
    _raises("x", nm, x.permute(0, 1, 3, 2))
    _raises("x", st, x.cpu(), inv, idx)
    _raises("x", br, x[:, :, ::2], inv, dv, dmap)
    _raises("x", bd, x.transpose(2, 3), a, m, cc)
    # device
    _raises("inv_nrm", st, x, inv.cpu(), idx)
    _raises("idx", st, x, inv, idx.cpu())
    _raises("dv", br, x, inv, dv.cpu(), dmap)
    _raises("dmap", br, x, inv, dv, dmap.cpu())
    _raises("m", bd, x, a, m.cpu(), cc)
    _raises("c", bd, x, a, m, cc.cpu())
    # shapes
    _raises("inv_nrm", st, x, small(n, h * w), idx)
    _raises("inv_nrm", br, x, small(n, w, h), dv, dmap)
    _raises("idx", st, x, inv, rand_idx(n + 1, h * w))
    _raises("idx", st, x, inv, idx[:, None])
    _raises("dv", br, x, inv, small(n, k, c + 1), dmap)
    _raises("dv", br, x, inv, small(n, c), dmap)
    _raises("dmap", br, x, inv, dv, small(n, k + 1, h, w))
    _raises("a", bd, x, small(n, 2 * k, h * w), m, cc)
    _raises("a", bd, x, small(n + 1, 2 * k, h, w), m, cc)
    _raises("m", bd, x, a, small(n, 2 * k + 1, c), cc)
    _raises("c", bd, x, a, m, small(n, 1, h, w))
    # dtypes: small tensors in the accumulation dtype, idx int64
    _raises("inv_nrm", st, x, inv.double(), idx)
    _raises("inv_nrm", st, x.half(), inv.half(), idx)
    _raises("idx", st, x, inv, idx.int())
    _raises("dv", br, x, inv, dv.double(), dmap)
    _raises("dmap", br, x.bfloat16(), inv, dv, dmap.bfloat16())
    _raises("m", bd, x.double(), a.double(), m, cc.double())
    # small tensors must be contiguous
    _raises("dv", br, x, inv, small(n, c, k).transpose(1, 2), dmap)
    _raises("c", bd, x, a, m, small(n, w, h).transpose(1, 2))
