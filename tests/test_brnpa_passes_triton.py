"""Triton BR-NPA passes vs. the pure-PyTorch contract (reference/passes.py).

Without a GPU the kernels run under the Triton interpreter, which is chosen when
triton is *first imported* in the process: this module sets TRITON_INTERPRET=1
before importing triton, but another module may import triton earlier in the same
run, so on a machine without a GPU run pytest with ``TRITON_INTERPRET=1`` in the
environment. If triton was imported without it and there is no GPU, this module
skips with that advice.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from manet_kernels.reference import passes as ref  # noqa: E402
from manet_kernels.triton import brnpa as tri  # noqa: E402

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

# Every C meets every (H, W) once; (C=33, P=35) spans three interpreter tiles of 16
# along each axis, the last one partial. C = 1 or H*W = 1 looks the same in both
# layouts; the other shapes (all of SMALL_SET but 1x1x1x1) run channels_last for real.
_C = [1, 3, 7, 33]
_HW = [(1, 1), (1, 5), (3, 3), (5, 7)]
SHAPES = [(1 + (i + j) % 2, c, h, w) for i, c in enumerate(_C) for j, (h, w) in enumerate(_HW)]
# fp32 runs every shape, the other dtypes a subset: the interpreter is slow.
SMALL_SET = [(2, 33, 5, 7), (1, 7, 3, 3), (2, 3, 1, 5), (1, 1, 1, 1)]
BIG_SHAPES = [(2, 257, 13, 11), (2, 2048, 14, 14)]


def _cases():
    out = []
    for dtype in DTYPES:
        shapes = SHAPES if dtype == torch.float32 else SMALL_SET
        if HAS_GPU:
            shapes = shapes + BIG_SHAPES
        for layout in LAYOUTS:
            for shape in shapes:
                out.append(pytest.param(dtype, layout, shape,
                                        id=f"{str(dtype)[6:]}-{layout}-{'x'.join(map(str, shape))}"))
    return out


CASES = _cases()


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _act(shape, gen, dtype, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    return t.to(device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)


def _small(shape, gen, acc, positive=False):
    t = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5 if positive else \
        torch.randn(shape, generator=gen, dtype=torch.float64)
    return t.to(device=DEVICE, dtype=acc)


def _inv_nrm(x):
    return 1.0 / (ref.brnpa_norms(x) + 1e-5)


def _close(out, exp, bound, n_terms, act_dtype=None):
    """``|out - exp| <= 4 * eps(acc) * n_terms * bound``, where ``bound`` is the
    contract evaluated on absolute values (a sum of |terms|): both sides sum the
    same terms in acc dtype in different orders. An output rounded to the
    activation dtype may further differ by one ulp of it."""
    assert out.dtype == exp.dtype and out.shape == exp.shape and out.device == exp.device
    o, e, bnd = out.double().cpu(), exp.double().cpu(), bound.double().cpu().abs()
    acc = torch.float64 if exp.dtype == torch.float64 else torch.float32
    tol = 4 * torch.finfo(acc).eps * n_terms * bnd + torch.finfo(acc).tiny
    if act_dtype is not None:
        tol = tol + torch.finfo(act_dtype).eps * e.abs()
    err = (o - e).abs()
    assert bool((err <= tol).all()), (
        f"max err {err.max().item():.3g}, worst err/tol {(err / tol).max().item():.3g}")


def _same_format(out, x):
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    assert out.is_contiguous() == x.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last) == \
        x.is_contiguous(memory_format=torch.channels_last)


def _idx(b, p, gen):
    return torch.randint(0, p, (b,), generator=gen, dtype=torch.int64).to(DEVICE)


# --------------------------------------------------------------------------- #
# each pass vs. the contract
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_norms(dtype, layout, shape):
    x = _act(shape, _gen(1), dtype, layout)
    out, exp = tri.brnpa_norms(x), ref.brnpa_norms(x)
    _close(out, exp, exp, shape[1] + 2)


@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_step(dtype, layout, shape):
    gen = _gen(2)
    b, c, h, w = shape
    x = _act(shape, gen, dtype, layout)
    inv, idx = _inv_nrm(x), _idx(b, h * w, gen)
    s, sv = tri.brnpa_step(x, inv, idx)
    e_s, e_sv = ref.brnpa_step(x, inv, idx)
    b_s, b_sv = ref.brnpa_step(x.abs(), inv, idx)
    n = c + h * w + 4
    _close(s, e_s, b_s, n)
    _close(sv, e_sv, b_sv, n)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_bwd_reduce(dtype, layout, shape, k):
    gen = _gen(3)
    b, c, h, w = shape
    acc = ref.acc_dtype(dtype)
    x = _act(shape, gen, dtype, layout)
    inv = _inv_nrm(x)
    dv, dmap = _small((b, k, c), gen, acc), _small((b, k, h, w), gen, acc)
    out = tri.brnpa_bwd_reduce(x, inv, dv, dmap)
    exp = ref.brnpa_bwd_reduce(x, inv, dv, dmap)
    bound = ref.brnpa_bwd_reduce(x.abs(), inv, dv.abs(), dmap.abs())
    for o, e, bnd in zip(out, exp, bound):
        _close(o, e, bnd, c + h * w + 4)


@pytest.mark.parametrize("j", [2, 6])
@pytest.mark.parametrize("dtype,layout,shape", CASES)
def test_bwd_dx(dtype, layout, shape, j):
    gen = _gen(4)
    b, c, h, w = shape
    acc = ref.acc_dtype(dtype)
    x = _act(shape, gen, dtype, layout)
    a, m, cc = _small((b, j, h, w), gen, acc), _small((b, j, c), gen, acc), _small((b, h, w), gen, acc)
    df = tri.brnpa_bwd_dx(x, a, m, cc)
    _same_format(df, x)
    exp = ref.brnpa_bwd_dx(x, a, m, cc)
    bound = ref.brnpa_bwd_dx(x.abs(), a.abs(), m.abs(), -cc.abs())
    _close(df.to(acc), exp.to(acc), bound.to(acc), j + 2, act_dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [12, 16, 20, 40])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bwd_reduce_many_parts(layout, k, dtype):
    # K > 8 pads to 16 rows: the tl.dot path in fp32; K > 16 takes several
    # programs along grid axis 1, of which only the first writes t.
    gen = _gen(5)
    b, c, h, w = shape = (2, 33, 5, 7)
    x = _act(shape, gen, dtype, layout)
    inv = _inv_nrm(x)
    dv, dmap = _small((b, k, c), gen, dtype), _small((b, k, h, w), gen, dtype)
    out = tri.brnpa_bwd_reduce(x, inv, dv, dmap)
    exp = ref.brnpa_bwd_reduce(x, inv, dv, dmap)
    bound = ref.brnpa_bwd_reduce(x.abs(), inv, dv.abs(), dmap.abs())
    for o, e, bnd in zip(out, exp, bound):
        _close(o, e, bnd, c + h * w + 4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bwd_dx_many_and_no_terms(layout):
    gen = _gen(6)
    b, c, h, w = shape = (2, 33, 5, 7)
    x = _act(shape, gen, torch.float32, layout)
    for j in (0, 33):
        a, m = _small((b, j, h, w), gen, torch.float32), _small((b, j, c), gen, torch.float32)
        cc = _small((b, h, w), gen, torch.float32)
        exp = ref.brnpa_bwd_dx(x, a, m, cc)
        bound = ref.brnpa_bwd_dx(x.abs(), a.abs(), m.abs(), -cc.abs())
        _close(tri.brnpa_bwd_dx(x, a, m, cc), exp, bound, j + 2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_every_representative(layout):
    # The representative is read from any P-block, including another program's
    # and the partial last one.
    gen = _gen(7)
    b, c, h, w = shape = (2, 33, 5, 7)
    x = _act(shape, gen, torch.float32, layout)
    inv = _inv_nrm(x)
    for i in (0, 15, 16, 34):
        idx = torch.tensor([i, 34 - i], device=DEVICE)
        s, sv = tri.brnpa_step(x, inv, idx)
        e_s, e_sv = ref.brnpa_step(x, inv, idx)
        b_s, b_sv = ref.brnpa_step(x.abs(), inv, idx)
        _close(s, e_s, b_s, c + h * w + 4)
        _close(sv, e_sv, b_sv, c + h * w + 4)
        # f_r . f_r * inv_r^2 = (||f_r|| / (||f_r|| + eps))^2
        assert abs(s[0].flatten()[i].item() - 1) < 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_index_out_of_range_reads_nothing(layout):
    gen = _gen(8)
    x = _act((2, 7, 3, 3), gen, torch.float32, layout)
    inv = _inv_nrm(x)
    s, sv = tri.brnpa_step(x, inv, torch.tensor([-1, 9], device=DEVICE))
    assert torch.equal(s.cpu(), torch.zeros(2, 3, 3)) and torch.equal(sv.cpu(), torch.zeros(2, 7))


def test_small_tensors_need_not_be_contiguous():
    gen = _gen(9)
    b, c, h, w = shape = (2, 7, 3, 5)
    x = _act(shape, gen, torch.float32, "channels_last")
    inv = _inv_nrm(x).transpose(1, 2).contiguous().transpose(1, 2)
    dv = _small((b, c, 3), gen, torch.float32).transpose(1, 2)
    dmap = _small((b, 3, h, w), gen, torch.float32)
    assert not (inv.is_contiguous() or dv.is_contiguous())
    out, exp = tri.brnpa_bwd_reduce(x, inv, dv, dmap), ref.brnpa_bwd_reduce(x, inv, dv, dmap)
    for o, e in zip(out, exp):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# determinism, int64 offsets, GPU tile configs
# --------------------------------------------------------------------------- #

def _all_calls(shape, layout, dtype, seed, k=3):
    gen = _gen(seed)
    b, c, h, w = shape
    acc = ref.acc_dtype(dtype)
    x = _act(shape, gen, dtype, layout)
    inv = _inv_nrm(x)
    return [
        ("brnpa_norms", (x,)),
        ("brnpa_step", (x, inv, _idx(b, h * w, gen))),
        ("brnpa_bwd_reduce", (x, inv, _small((b, k, c), gen, acc), _small((b, k, h, w), gen, acc))),
        ("brnpa_bwd_dx", (x, _small((b, 2 * k, h, w), gen, acc), _small((b, 2 * k, c), gen, acc),
                          _small((b, h, w), gen, acc))),
    ]


def _as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _check_all_vs_reference(shape, layout, seed, k=3, label="", only=None):
    for name, args in _all_calls(shape, layout, torch.float32, seed, k):
        if only is not None and name != only:
            continue
        out, exp = _as_tuple(getattr(tri, name)(*args)), _as_tuple(getattr(ref, name)(*args))
        for o, e in zip(out, exp):
            torch.testing.assert_close(o, e, rtol=1e-5, atol=2e-5, msg=lambda m: f"{name} {label}: {m}")


def _check_bitwise_repeatable(shape, layout, dtype, seed):
    for name, args in _all_calls(shape, layout, dtype, seed):
        first = _as_tuple(getattr(tri, name)(*args))
        for _ in range(2):
            again = _as_tuple(getattr(tri, name)(*args))
            for a, b in zip(first, again):
                assert torch.equal(a, b), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic(layout):
    _check_bitwise_repeatable((2, 33, 5, 7), layout, torch.float32, 10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic_algorithms_fixed_config(layout):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _check_all_vs_reference((2, 19, 3, 7), layout, 11)
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_int64_offsets_path(layout, monkeypatch):
    # 2**31-element tensors do not fit a test; force the int64 offset code on a
    # small one instead.
    monkeypatch.setattr(tri, "_i64", lambda *ts: True)
    _check_all_vs_reference((2, 19, 3, 7), layout, 12)
    _check_all_vs_reference((2, 19, 3, 7), layout, 12, k=20)


@pytest.mark.skipif(not INTERPRETING, reason="GPU autotune covers these on a GPU")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_gpu_config_under_interpreter(layout, monkeypatch):
    # The other tests run the interpreter's single tile; here every tile that
    # autotune may pick on a GPU, with the launcher's GPU choice of BLOCK_P.
    monkeypatch.setattr(tri, "_INTERPRET", False)
    runs = [("brnpa_norms", tri._brnpa_norms_kernel, tri._NORMS_CONFIGS, (3,)),
            ("brnpa_step", tri._brnpa_step_kernel, tri._STEP_CONFIGS, (3,)),
            ("brnpa_bwd_reduce", tri._brnpa_bwd_reduce_kernel, tri._BWD_REDUCE_CONFIGS, (3, 12)),  # no dot, dot
            ("brnpa_bwd_dx", tri._brnpa_bwd_dx_kernel, tri._BWD_DX_CONFIGS, (3,))]
    for name, kernel, configs, ks in runs:
        for kw, warps in configs:
            monkeypatch.setitem(tri._FORCED_CONFIGS, kernel, triton.Config(kw, num_warps=warps))
            for k in ks:
                _check_all_vs_reference((1, 37, 9, 11), layout, 13, k=k, label=f"{kw} k={k}", only=name)
        monkeypatch.delitem(tri._FORCED_CONFIGS, kernel)


# --------------------------------------------------------------------------- #
# empty batch, argument checks, device rule
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch(layout):
    x = torch.zeros((0, 3, 2, 5), device=DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    f32 = dict(dtype=torch.float32, device=DEVICE)
    inv = torch.zeros((0, 2, 5), **f32)
    assert tri.brnpa_norms(x).shape == (0, 2, 5)
    s, sv = tri.brnpa_step(x, inv, torch.zeros(0, dtype=torch.int64, device=DEVICE))
    assert (s.shape, sv.shape) == ((0, 2, 5), (0, 3))
    dw, u, t = tri.brnpa_bwd_reduce(x, inv, torch.zeros((0, 4, 3), **f32), torch.zeros((0, 4, 2, 5), **f32))
    assert (dw.shape, u.shape, t.shape) == ((0, 4, 2, 5), (0, 4, 3), (0, 3))
    assert all(o.dtype == torch.float32 for o in (s, sv, dw, u, t))
    df = tri.brnpa_bwd_dx(x, torch.zeros((0, 6, 2, 5), **f32), torch.zeros((0, 6, 3), **f32), inv)
    _same_format(df, x)


def _good_args():
    b, c, h, w, k = 2, 3, 2, 5, 3
    x = torch.randn(b, c, h, w, device=DEVICE)
    f = dict(dtype=torch.float32, device=DEVICE)
    return dict(x=x, inv_nrm=torch.rand(b, h, w, **f), idx=torch.zeros(b, dtype=torch.int64, device=DEVICE),
                dv=torch.randn(b, k, c, **f), dmap=torch.randn(b, k, h, w, **f),
                a=torch.randn(b, 2 * k, h, w, **f), m=torch.randn(b, 2 * k, c, **f), c=torch.randn(b, h, w, **f))


_SIGS = {
    "brnpa_norms": ("x",),
    "brnpa_step": ("x", "inv_nrm", "idx"),
    "brnpa_bwd_reduce": ("x", "inv_nrm", "dv", "dmap"),
    "brnpa_bwd_dx": ("x", "a", "m", "c"),
}

_BAD = [  # (argument, how to spoil it, expected error)
    ("x", lambda t: t[0], ValueError),                  # 3-D
    ("x", lambda t: t.to(torch.int32), TypeError),
    ("x", lambda t: t.transpose(2, 3), ValueError),     # neither layout
    ("x", lambda t: t[:, :, :, :4], ValueError),        # strided slice
    ("x", lambda t: t[:, :0], ValueError),              # C = 0 with B > 0
    ("x", lambda t: t.tolist(), TypeError),
    ("inv_nrm", lambda t: t.double(), TypeError),
    ("inv_nrm", lambda t: t[:, :1], ValueError),
    ("inv_nrm", lambda t: t.to("meta"), ValueError),    # another device
    ("inv_nrm", lambda t: t.tolist(), TypeError),
    ("idx", lambda t: t.int(), TypeError),
    ("idx", lambda t: t[:1], ValueError),
    ("dv", lambda t: t[0], ValueError),                 # 2-D
    ("dv", lambda t: t[:, :, :2], ValueError),          # C mismatch
    ("dv", lambda t: t.half(), TypeError),
    ("dmap", lambda t: t[:, :1], ValueError),           # K unlike dv's
    ("dmap", lambda t: t.double(), TypeError),
    ("a", lambda t: t[0], ValueError),
    ("a", lambda t: t.double(), TypeError),
    ("a", lambda t: None, TypeError),
    ("m", lambda t: t[:, :1], ValueError),              # J unlike a's
    ("m", lambda t: t.half(), TypeError),
    ("c", lambda t: t.reshape(2, 10), ValueError),
    ("c", lambda t: t.double(), TypeError),
]


@pytest.mark.parametrize("name", list(_SIGS))
def test_bad_arguments(name):
    names = _SIGS[name]
    checked = 0
    for arg, spoil, err in _BAD:
        if arg not in names:
            continue
        args = _good_args()
        args[arg] = spoil(args[arg])
        with pytest.raises(err, match=rf"^{arg}\b"):
            getattr(tri, name)(*[args[a] for a in names])
        checked += 1
    assert checked


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(tri, "_interpreting", lambda: False)
    a = {k: v.cpu() for k, v in _good_args().items()}
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tri.brnpa_norms(a["x"])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tri.brnpa_bwd_dx(a["x"], a["a"], a["m"], a["c"])


# --------------------------------------------------------------------------- #
# GPU only
# --------------------------------------------------------------------------- #

@gpu_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_big(dtype, layout):
    _check_bitwise_repeatable((2, 2048, 14, 14), layout, dtype, 14)


@gpu_only
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bwd_reduce_many_parts_big(layout):
    gen = _gen(15)
    b, c, h, w = shape = (2, 2048, 14, 14)
    k = 20
    x = _act(shape, gen, torch.float32, layout)
    inv = _inv_nrm(x)
    dv, dmap = _small((b, k, c), gen, torch.float32), _small((b, k, h, w), gen, torch.float32)
    out = tri.brnpa_bwd_reduce(x, inv, dv, dmap)
    exp = ref.brnpa_bwd_reduce(x, inv, dv, dmap)
    bound = ref.brnpa_bwd_reduce(x.abs(), inv, dv.abs(), dmap.abs())
    for o, e, bnd in zip(out, exp, bound):
        _close(o, e, bnd, c + h * w + 4)
