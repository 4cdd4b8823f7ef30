"""C++ CPU BR-NPA pass kernels (csrc/cpu/brnpa.cpp) against their contract,
manet_kernels/reference/passes.py: every dtype and layout, odd shapes, determinism,
empty batches and argument errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from manet_kernels import _ext
from manet_kernels.reference import passes as ref

if not _ext.HAS_EXT:
    pytest.skip(f"C++ extension not built: {_ext.EXT_ERROR}", allow_module_level=True)
if not torch._C._dispatch_has_kernel_for_dispatch_key("manet_kernels::brnpa_step", "CPU"):
    pytest.skip("the loaded extension has no CPU BR-NPA kernels", allow_module_level=True)

ops = torch.ops.manet_kernels

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "channels_last")

# Outputs in the accumulation dtype differ from the reference only by summation
# order: (rtol, atol as a fraction of the largest reference magnitude). x is the
# same low-precision tensor for both sides, so bf16/fp16 inputs accumulate in fp32
# like fp32 inputs do.
ACC_TOL = {torch.float64: (1e-11, 1e-12), torch.float32: (2e-5, 2e-6),
           torch.bfloat16: (2e-5, 2e-6), torch.float16: (2e-5, 2e-6)}
# brnpa_bwd_dx returns x's dtype: a value lying near a rounding boundary may round
# the other way, one unit in the last place (eps) of that dtype.
OUT_TOL = {torch.float64: (1e-11, 1e-12), torch.float32: (2e-5, 2e-6),
           torch.bfloat16: (2 ** -7, 2e-6), torch.float16: (2 ** -10, 2e-6)}

# C = 1 or H*W = 1 looks the same in both layouts; the other shapes run channels_last
# for real.
SHAPES = [(b, c, h, w) for b, c, (h, w) in itertools.product(
    (1, 2, 3), (1, 3, 7, 64), ((1, 1), (1, 7), (5, 3), (13, 11)))]


def parts_for(p: int) -> tuple[int, ...]:
    return (1, 3, 16) if p >= 16 else (1, 3)


def make_x(shape, dtype, layout, gen):
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def small(shape, acc, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(acc)


def inv_norms(x):
    return (1.0 / (ref.brnpa_norms(x) + 1e-5)).contiguous()


def assert_close(out, expected, tol, what):
    assert out.dtype == expected.dtype, (what, out.dtype, expected.dtype)
    assert out.shape == expected.shape, (what, out.shape, expected.shape)
    rtol, atol_frac = tol
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(out.double(), expected.double(), rtol=rtol,
                               atol=atol_frac * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


def check_norms(x):
    assert_close(ops.brnpa_norms(x), ref.brnpa_norms(x), ACC_TOL[x.dtype], "norms")


def check_step(x, gen):
    b, c, h, w = x.shape
    inv = inv_norms(x)
    idx = torch.randint(0, h * w, (b,), generator=gen)
    idx[0] = h * w - 1  # the last position is always one of the representatives
    s, sv = ops.brnpa_step(x, inv, idx)
    rs, rsv = ref.brnpa_step(x, inv, idx)
    assert_close(s, rs, ACC_TOL[x.dtype], "step s")
    assert_close(sv, rsv, ACC_TOL[x.dtype], "step sv")


def check_bwd_reduce(x, k, gen):
    b, c, h, w = x.shape
    acc = ref.acc_dtype(x.dtype)
    inv = inv_norms(x)
    dv, dmap = small((b, k, c), acc, gen), small((b, k, h, w), acc, gen)
    out = ops.brnpa_bwd_reduce(x, inv, dv, dmap)
    expected = ref.brnpa_bwd_reduce(x, inv, dv, dmap)
    for name, o, e in zip(("dw", "u", "t"), out, expected):
        assert_close(o, e, ACC_TOL[x.dtype], f"bwd_reduce {name}")


def check_bwd_dx(x, j, gen):
    b, c, h, w = x.shape
    acc = ref.acc_dtype(x.dtype)
    a, m, cc = small((b, j, h, w), acc, gen), small((b, j, c), acc, gen), small((b, h, w), acc, gen)
    df = ops.brnpa_bwd_dx(x, a, m, cc)
    expected = ref.brnpa_bwd_dx(x, a, m, cc)
    assert df.stride() == expected.stride(), (df.stride(), expected.stride())
    assert_close(df, expected, OUT_TOL[x.dtype], "bwd_dx")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms_and_step(dtype, layout):
    gen = torch.Generator().manual_seed(1)
    for shape in SHAPES:
        x = make_x(shape, dtype, layout, gen)
        check_norms(x)
        check_step(x, gen)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_reduce(dtype, layout):
    gen = torch.Generator().manual_seed(2)
    for shape in SHAPES:
        x = make_x(shape, dtype, layout, gen)
        for k in parts_for(shape[2] * shape[3]):
            check_bwd_reduce(x, k, gen)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_dx(dtype, layout):
    gen = torch.Generator().manual_seed(3)
    for shape in SHAPES:
        x = make_x(shape, dtype, layout, gen)
        # J = 2K in the backward; 1, 5 and 9 leave partial groups of four terms
        for j in (1, 2, 5, 6) + ((9, 32) if shape[2] * shape[3] >= 16 else ()):
            check_bwd_dx(x, j, gen)


# Shapes that split each sample's positions into several blocks (partial sums
# reduced across blocks) in both layouts, with remainders everywhere.
BIG = [(1, 64, 40, 40), (2, 37, 23, 29), (5, 3, 17, 19)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", BIG, ids=str)
def test_many_blocks(shape, dtype, layout):
    gen = torch.Generator().manual_seed(4)
    x = make_x(shape, dtype, layout, gen)
    check_norms(x)
    check_step(x, gen)
    check_bwd_reduce(x, 5, gen)
    check_bwd_dx(x, 10, gen)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_features(layout):
    """An all-zero position has norm 0; its similarities come out 0 (inv finite)."""
    x = torch.randn(2, 8, 4, 5)
    x[:, :, 1, 2] = 0
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    check_norms(x)
    gen = torch.Generator().manual_seed(5)
    check_step(x, gen)
    check_bwd_reduce(x, 3, gen)


def run_all(x, gen_seed=6, k=5):
    gen = torch.Generator().manual_seed(gen_seed)
    b, c, h, w = x.shape
    acc = ref.acc_dtype(x.dtype)
    inv = inv_norms(x)
    idx = torch.randint(0, h * w, (b,), generator=gen)
    dv, dmap = small((b, k, c), acc, gen), small((b, k, h, w), acc, gen)
    a, m = small((b, 2 * k, h, w), acc, gen), small((b, 2 * k, c), acc, gen)
    cc = small((b, h, w), acc, gen)
    return [ops.brnpa_norms(x), *ops.brnpa_step(x, inv, idx),
            *ops.brnpa_bwd_reduce(x, inv, dv, dmap), ops.brnpa_bwd_dx(x, a, m, cc)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(dtype, layout):
    """Bitwise equal on repeat, and whatever the thread count (blocks depend on the
    shape only)."""
    x = make_x((3, 48, 37, 41), dtype, layout, torch.Generator().manual_seed(7))
    first = run_all(x)
    for o, p in zip(first, run_all(x)):
        assert torch.equal(o, p)
    threads = torch.get_num_threads()
    try:
        for n in {1, 3}:
            torch.set_num_threads(n)
            for o, p in zip(first, run_all(x)):
                assert torch.equal(o, p), n
    finally:
        torch.set_num_threads(threads)
    # ... and wherever x lies in memory (vectorised loops must not peel by alignment)
    for off in (1, 3):
        buf = torch.empty(x.numel() + off, dtype=dtype)
        if layout == "channels_last":
            moved = buf[off:].view(x.permute(0, 2, 3, 1).shape).permute(0, 3, 1, 2)
        else:
            moved = buf[off:].view(x.shape)
        moved.copy_(x)
        assert moved.stride() == x.stride()
        for o, p in zip(first, run_all(moved)):
            assert torch.equal(o, p), off


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_batch(dtype, layout):
    acc = ref.acc_dtype(dtype)
    x = torch.empty(0, 5, 3, 4, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    inv = torch.empty(0, 3, 4, dtype=acc)
    assert ops.brnpa_norms(x).shape == (0, 3, 4)
    s, sv = ops.brnpa_step(x, inv, torch.empty(0, dtype=torch.int64))
    assert s.shape == (0, 3, 4) and sv.shape == (0, 5) and s.dtype == acc and sv.dtype == acc
    dw, u, t = ops.brnpa_bwd_reduce(x, inv, torch.empty(0, 2, 5, dtype=acc),
                                    torch.empty(0, 2, 3, 4, dtype=acc))
    assert dw.shape == (0, 2, 3, 4) and u.shape == (0, 2, 5) and t.shape == (0, 5)
    df = ops.brnpa_bwd_dx(x, torch.empty(0, 4, 3, 4, dtype=acc), torch.empty(0, 4, 5, dtype=acc),
                          torch.empty(0, 3, 4, dtype=acc))
    assert df.shape == x.shape and df.dtype == dtype


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_channels(layout):
    gen = torch.Generator().manual_seed(9)
    x = make_x((2, 0, 3, 4), torch.float32, layout, gen)
    check_norms(x)
    check_step(x, gen)
    check_bwd_reduce(x, 3, gen)
    check_bwd_dx(x, 4, gen)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_parts(layout):
    """K = 0 (and J = 0): empty part outputs; t and df still computed."""
    gen = torch.Generator().manual_seed(8)
    x = make_x((2, 6, 3, 5), torch.float32, layout, gen)
    check_bwd_reduce(x, 0, gen)
    check_bwd_dx(x, 0, gen)


# ---------------------------------------------------------------------------
# Argument errors: each names the offending argument.

B, C, H, W = 2, 6, 3, 5


def good():
    x = torch.randn(B, C, H, W)
    return dict(x=x, inv=torch.rand(B, H, W) + 0.5, idx=torch.tensor([0, H * W - 1]),
                dv=torch.randn(B, 3, C), dmap=torch.randn(B, 3, H, W), a=torch.randn(B, 4, H, W),
                m=torch.randn(B, 4, C), c=torch.randn(B, H, W))


def call(op, args):
    if op == "norms":
        return ops.brnpa_norms(args["x"])
    if op == "step":
        return ops.brnpa_step(args["x"], args["inv"], args["idx"])
    if op == "bwd_reduce":
        return ops.brnpa_bwd_reduce(args["x"], args["inv"], args["dv"], args["dmap"])
    return ops.brnpa_bwd_dx(args["x"], args["a"], args["m"], args["c"])


X_BAD = {
    "rank 3": torch.randn(C, H, W),
    "int dtype": torch.ones(B, C, H, W, dtype=torch.int32),
    "strided": torch.randn(B, C, H, 2 * W)[..., ::2],
    "transposed": torch.randn(B, C, W, H).transpose(2, 3),
}


@pytest.mark.parametrize("op", ("norms", "step", "bwd_reduce", "bwd_dx"))
@pytest.mark.parametrize("case", list(X_BAD))
def test_bad_x(op, case):
    args = good()
    args["x"] = X_BAD[case]
    with pytest.raises(RuntimeError, match=r"\bx: expected"):
        call(op, args)


BAD = [
    ("step", "inv", "inv_nrm", torch.rand(B, H * W)),
    ("step", "inv", "inv_nrm", torch.rand(B, H, W, dtype=torch.float64)),
    ("step", "inv", "inv_nrm", torch.rand(B, W, H).transpose(1, 2)),
    ("step", "idx", "idx", torch.tensor([0, 1], dtype=torch.int32)),
    ("step", "idx", "idx", torch.tensor([0, 1, 2])),
    ("step", "idx", "idx", torch.tensor([[0, 1]])),
    ("step", "idx", "idx", torch.tensor([0, H * W])),
    ("step", "idx", "idx", torch.tensor([-1, 0])),
    ("bwd_reduce", "inv", "inv_nrm", torch.rand(B + 1, H, W)),
    ("bwd_reduce", "dv", "dv", torch.randn(B, C)),
    ("bwd_reduce", "dv", "dv", torch.randn(B, 3, C + 1)),
    ("bwd_reduce", "dv", "dv", torch.randn(B, 3, C, dtype=torch.float64)),
    ("bwd_reduce", "dmap", "dmap", torch.randn(B, 2, H, W)),
    ("bwd_reduce", "dmap", "dmap", torch.randn(B, 3, W, H).transpose(2, 3)),
    ("bwd_dx", "a", "a", torch.randn(B, 4, H * W)),
    ("bwd_dx", "a", "a", torch.randn(B, 4, H, W, dtype=torch.float16)),
    ("bwd_dx", "m", "m", torch.randn(B, 5, C)),
    ("bwd_dx", "m", "m", torch.randn(B, C, 4).transpose(1, 2)),
    ("bwd_dx", "c", "c", torch.randn(B, H, W + 1)),
    ("bwd_dx", "c", "c", torch.randn(B, H, W).to(torch.bfloat16)),
]


@pytest.mark.parametrize("op,key,name,value", BAD,
                         ids=[f"{op}-{name}-{i}" for i, (op, _, name, _) in enumerate(BAD)])
def test_bad_small_argument(op, key, name, value):
    args = good()
    args[key] = value
    with pytest.raises(RuntimeError, match=rf"(^|\s){name}: expected"):
        call(op, args)


def test_low_precision_x_takes_float32_small_tensors():
    args = good()
    args["x"] = args["x"].to(torch.bfloat16)
    call("step", args)  # float32 inv_nrm is right for bfloat16 x
    args["inv"] = args["inv"].to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"inv_nrm: expected dtype Float"):
        call("step", args)
