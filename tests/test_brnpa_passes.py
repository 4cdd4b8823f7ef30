"""BR-NPA pass kernels against their contract, ``manet_kernels.reference.passes``, on the
same inputs, one tester for every backend: ``cpu`` (csrc/cpu/brnpa.cpp), ``cuda``
(csrc/cuda/brnpa.cu) and ``triton`` (manet_kernels/triton/brnpa.py, under the interpreter
without a GPU).

Each backend keeps the tolerance rule its kernels were written against (``RULES``):

* cpu: rtol and an atol that is a fraction of the largest reference magnitude, by x's
  dtype (``ACC_TOL``; ``OUT_TOL`` for ``df``, which is rounded to x's dtype);
* cuda: within ``SUM_ULPS`` ulps (of the accumulation dtype) of the sum of the absolute
  terms, the contract evaluated on absolute values; ``df`` one ulp of x's dtype more;
* triton: within 4 ulps per summed term of the same bound; ``df`` one ulp of x's dtype more.

Case lists are per backend (``PLANS`` and the tables beside each test): the C++ CPU
kernels run every small shape in one test per dtype and layout, the interpreter runs
tiny shapes and no bf16 (its bf16 arithmetic is wrong), a GPU the ResNet-sized shapes
the kernels are tuned for.
"""

from __future__ import annotations

import functools
import importlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import passes_common as pc
import pytest
import torch

from manet_kernels.reference import passes as ref

OP, KERNEL = "brnpa", "brnpa_step"
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
TRITON = pc.Backend("triton", OP, KERNEL)
TRITON_GPU = pc.HAS_GPU and not TRITON.interpreting
triton_gpu_only = pytest.mark.skipif(not TRITON_GPU, reason="bf16 and big shapes are GPU-only")

# The passes, each with its arguments (names as in the schemas) and outputs.
SIGS = {"norms": ("x",), "step": ("x", "inv_nrm", "idx"),
        "bwd_reduce": ("x", "inv_nrm", "dv", "dmap"), "bwd_dx": ("x", "a", "m", "c")}
OUTPUTS = {"norms": ("nrm",), "step": ("s", "sv"), "bwd_reduce": ("dw", "u", "t"),
           "bwd_dx": ("df",)}


def on(*names):
    return pc.backends(OP, KERNEL, *names)


def cases(table):
    """``table``: backend name -> its cases. A backend this machine cannot run keeps one
    (skipped) case a test: thousands of skipped CUDA cases cost seconds on a CPU."""
    return pc.backend_params(OP, KERNEL, {
        name: rows[:1] if pc.Backend(name, OP, KERNEL).skip_reason() else rows
        for name, rows in table.items()})


def grid(dtypes, *more):
    """(dtype, layout, *more) for every combination."""
    return list(itertools.product(dtypes, pc.LAYOUTS, *more))


def gpu_cases(rows):
    return [pytest.param(*r, marks=triton_gpu_only) for r in rows]


# --------------------------------------------------------------------------- shapes

# C++ CPU: C = 1 or H*W = 1 looks the same in both layouts, the other shapes run
# channels_last for real. BLOCKED splits each sample's positions into several blocks
# (partial sums reduced across blocks) in both layouts, with remainders everywhere.
CPU_SHAPES = [(b, c, h, w) for b, c, (h, w) in itertools.product(
    (1, 2, 3), (1, 3, 7, 64), ((1, 1), (1, 7), (5, 3), (13, 11)))]
CPU_BLOCKED = [(1, 64, 40, 40), (2, 37, 23, 29), (5, 3, 17, 19)]
# CUDA: odd sizes up to ResNet-50's; LARGE: multi-block samples (partials + finalize),
# the shapes the kernels are tuned for.
CUDA_SHAPES = [(n, c, h, w) for n, c, (h, w) in itertools.product(
    (1, 3), (1, 3, 7, 64, 257, 2048), ((1, 1), (1, 7), (5, 3), (13, 11), (56, 56)))]
CUDA_LARGE = [(8, 2048, 56, 56), (64, 2048, 14, 14), (4, 256, 56, 56), (16, 1024, 14, 14)]
CUDA_F64 = [(1, 1, 1, 1), (3, 7, 5, 3), (2, 64, 13, 11), (2, 257, 7, 7), (2, 2048, 14, 14)]
# Triton: every C meets every (H, W) once; (C=33, P=35) spans three interpreter tiles of
# 16 along each axis, the last one partial. fp32 runs every shape, the other dtypes a
# subset: the interpreter is slow.
_TC, _THW = (1, 3, 7, 33), ((1, 1), (1, 5), (3, 3), (5, 7))
TRITON_SHAPES = [(1 + (i + j) % 2, c, h, w) for i, c in enumerate(_TC)
                 for j, (h, w) in enumerate(_THW)]
TRITON_SMALL = [(2, 33, 5, 7), (1, 7, 3, 3), (2, 3, 1, 5), (1, 1, 1, 1)]
TRITON_BIG = [(2, 257, 13, 11), (2, 2048, 14, 14)]
TRITON_DTYPES = (F32, F16, F64) + ((BF16,) if TRITON_GPU else ())


def _triton_shapes(dtype):
    return (TRITON_SHAPES if dtype == F32 else TRITON_SMALL) + (TRITON_BIG if TRITON_GPU else [])


def _cpu_parts(shape):  # K = 16 where there are 16 positions to hold them
    return (1, 3, 16) if shape[2] * shape[3] >= 16 else (1, 3)


def _cpu_terms(shape):  # J = 2K in the backward; 1, 5 and 9 leave partial groups of four
    return (1, 2, 5, 6) + ((9, 32) if shape[2] * shape[3] >= 16 else ())


@dataclass(frozen=True)
class Plan:
    """The cases of test_matches_contract one backend runs."""

    dtypes: tuple
    shapes: Callable  # dtype -> shapes
    parts: Callable  # shape -> K values of bwd_reduce
    terms: Callable  # shape -> J values of bwd_dx
    # one test per pass, dtype and layout over every shape and count: thousands of tiny
    # cases cost more in pytest than in the C++ kernels
    grouped: bool = False

    def counts(self, op, shape):
        """K values of bwd_reduce, J of bwd_dx; (None,) for the passes with neither."""
        return {"bwd_reduce": self.parts, "bwd_dx": self.terms}.get(op, lambda s: (None,))(shape)


PLANS = {
    "cpu": Plan((F32, F64, BF16, F16), lambda d: CPU_SHAPES, _cpu_parts, _cpu_terms, True),
    "cuda": Plan((F32, F16, BF16), lambda d: CUDA_SHAPES, lambda s: (1, 3, 16),
                 lambda s: (2, 6, 32)),
    "triton": Plan(TRITON_DTYPES, _triton_shapes, lambda s: (1, 3), lambda s: (2, 6)),
}


@dataclass(frozen=True)
class Sizes:
    """What one contract test loops over: (shape, counts) pairs, the counts being K or J
    values (None for norms and step). Its name is its part of the test id."""

    name: str
    pairs: list = field(compare=False)

    def __iter__(self):
        return iter(self.pairs)

    def __str__(self):
        return self.name


def contract_params() -> list:
    """(backend, pass, dtype, layout, sizes) for every plan; ungrouped plans get one test
    per shape and count."""
    table = {}
    for name, plan in PLANS.items():
        table[name] = rows = []
        for op, dtype, layout in itertools.product(SIGS, plan.dtypes, pc.LAYOUTS):
            pairs = [(s, plan.counts(op, s)) for s in plan.shapes(dtype)]
            if plan.grouped:
                rows.append((op, dtype, layout, Sizes("all_shapes", pairs)))
                continue
            rows += [(op, dtype, layout, Sizes(pc.case_id(s) if n is None else pc.case_id(s, n),
                                               [(s, (n,))])) for s, ns in pairs for n in ns]
    return cases(table)


# --------------------------------------------------------------------------- inputs


class Draw:
    """The passes' arguments, from the backend's input source (``passes_common.source``)."""

    def __init__(self, bk: pc.Backend, seed: int):
        self.src = pc.source(bk, seed)

    def normal(self, shape, dtype=F32):
        return self.src.normal(shape, dtype)

    def act(self, shape, dtype, layout):
        return self.src.act(shape, dtype, layout)

    def idx(self, x):
        """Random representatives, the first sample's at the last position."""
        b, _, h, w = x.shape
        idx = self.src.index(h * w, (b,)).long()
        idx[:1] = h * w - 1
        return idx

    def step_args(self, x):
        return x, inv_norms(x), self.idx(x)

    def bwd_reduce_args(self, x, k):
        b, c, h, w = x.shape
        acc = pc.acc_dtype(x.dtype)
        return x, inv_norms(x), self.normal((b, k, c), acc), self.normal((b, k, h, w), acc)

    def bwd_dx_args(self, x, j):
        b, c, h, w = x.shape
        acc = pc.acc_dtype(x.dtype)
        return (x, self.normal((b, j, h, w), acc), self.normal((b, j, c), acc),
                self.normal((b, h, w), acc))

    def args(self, op, x, n=None):
        """Arguments of pass ``op`` for ``x``: K = n parts (bwd_reduce), J = n terms (bwd_dx)."""
        if op == "norms":
            return (x,)
        if op == "step":
            return self.step_args(x)
        return getattr(self, op + "_args")(x, n)

    def every_pass(self, x, k):
        """(pass, arguments) for the four passes; K parts, J = 2K terms."""
        return [(op, self.args(op, x, n)) for op, n in zip(SIGS, (None, None, k, 2 * k))]


def inv_norms(x):
    """The forward's inv_nrm, from the contract's norms."""
    return (1.0 / (ref.brnpa_norms(x) + 1e-5)).contiguous()


def offset_copy(t, offset):
    """``t``'s values and strides in a tensor starting ``offset`` elements into its storage."""
    store = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    out = store.as_strided(t.shape, t.stride(), storage_offset=offset)
    return out.copy_(t)


def run(bk, name, args):
    return pc.as_tuple(getattr(bk, "brnpa_" + name)(*args))


# --------------------------------------------------------------------------- tolerance rules

# cpu: (rtol, atol as a fraction of the largest reference magnitude) by x's dtype. Sums in
# the accumulation dtype differ from the contract only by summation order (x is the same
# low-precision tensor on both sides); df, in x's dtype, may round one ulp the other way.
ACC_TOL = {F64: (1e-11, 1e-12), F32: (2e-5, 2e-6), BF16: (2e-5, 2e-6), F16: (2e-5, 2e-6)}
OUT_TOL = {F64: (1e-11, 1e-12), F32: (2e-5, 2e-6), BF16: (2 ** -7, 2e-6), F16: (2 ** -10, 2e-6)}


def close_cpu(out, exp, bound, n_terms, x, rounded, what):
    assert out.dtype == exp.dtype, (what, out.dtype, exp.dtype)
    assert out.shape == exp.shape, (what, out.shape, exp.shape)
    if rounded:
        assert out.stride() == exp.stride(), (what, out.stride(), exp.stride())
    rtol, atol_frac = (OUT_TOL if rounded else ACC_TOL)[x.dtype]
    torch.testing.assert_close(out.double(), exp.double(), rtol=rtol,
                               atol=atol_frac * max(pc.amax(exp), 1e-30),
                               msg=lambda m: f"{what}: {m}")


def close_cuda(out, exp, bound, n_terms, x, rounded, what):
    if not rounded:
        return pc.assert_sum_close(out, exp, bound(), what)
    assert out.dtype == exp.dtype and out.shape == exp.shape, what
    assert out.stride() == exp.stride(), f"{what}: memory format differs"
    bnd = bound()
    fx, fa = torch.finfo(out.dtype), torch.finfo(bnd.dtype)
    o, e = out.to(bnd.dtype), exp.to(bnd.dtype)
    tol = fx.eps * torch.maximum(o.abs(), e.abs()) + pc.SUM_ULPS * fa.eps * bnd + fx.tiny
    pc.assert_all_within((o - e).abs(), tol, out.numel(), what)


def close_triton(out, exp, bound, n_terms, x, rounded, what):
    """``|out - exp| <= 4 * eps(acc) * n_terms * bound``: both sides sum the same terms
    in the accumulation dtype in different orders."""
    if rounded:
        pc.assert_same_format(out, x)
    assert out.dtype == exp.dtype and out.shape == exp.shape and out.device == exp.device, what
    o, e, bnd = out.double().cpu(), exp.double().cpu(), bound().double().cpu().abs()
    acc = torch.finfo(pc.acc_dtype(exp.dtype))
    tol = 4 * acc.eps * n_terms * bnd + acc.tiny
    if rounded:
        tol = tol + torch.finfo(x.dtype).eps * e.abs()
    err = (o - e).abs()
    assert bool((err <= tol).all()), (
        f"{what}: max err {err.max().item():.3g}, worst err/tol {(err / tol).max().item():.3g}")


RULES = {"cpu": close_cpu, "cuda": close_cuda, "triton": close_triton}


def abs_bound(name, x, *rest):
    """The contract on absolute values: each output's sum of |terms|, in acc dtype."""
    if name == "norms":
        return ref.brnpa_norms(x)
    if name == "bwd_dx":
        a, m, c = rest
        return (torch.einsum("bjhw,bjc->bchw", a.abs(), m.abs())
                + c.abs()[:, None] * x.to(m.dtype).abs())
    return getattr(ref, "brnpa_" + name)(x.abs(), *(t.abs() if t.is_floating_point() else t
                                                    for t in rest))


def n_terms(name, x, *rest):
    """About how many terms an output element sums."""
    if name == "norms":
        return x.shape[1] + 2
    if name == "bwd_dx":
        return rest[0].shape[1] + 2
    return x.shape[1] + x.shape[2] * x.shape[3] + 4


def check_pass(bk, name, args, what=""):
    """One pass of ``bk`` against the contract, output by output, by the backend's rule;
    returns the backend's outputs."""
    out, exp = run(bk, name, args), pc.as_tuple(getattr(ref, "brnpa_" + name)(*args))
    assert len(out) == len(exp), name
    # the bounds cost a second evaluation of the contract: only for the rules that use them
    bounds = functools.cache(lambda: pc.as_tuple(abs_bound(name, *args)))
    n = n_terms(name, *args)
    for i, (o, e, label) in enumerate(zip(out, exp, OUTPUTS[name])):
        RULES[bk.name](o, e, lambda i=i: bounds()[i], n, args[0], name == "bwd_dx",
                       f"{name} {label}{what}")
    return out


def check_every_pass(bk, draw, x, k):
    for name, args in draw.every_pass(x, k):
        check_pass(bk, name, args)


# --------------------------------------------------------------------------- each pass


@pytest.mark.parametrize("bk,op,dtype,layout,sizes", contract_params())
def test_matches_contract(bk, op, dtype, layout, sizes):
    draw = Draw(bk, 1)
    for shape, counts in sizes:
        x = draw.act(shape, dtype, layout)
        for n in counts:
            check_pass(bk, op, draw.args(op, x, n))


# (dtype, layout, shape, K): every pass on shapes that split a sample into many blocks
# (partials + finalize), and CUDA's float64 kernels
EVERY_PASS = {
    "cpu": grid((F32, F64, BF16), CPU_BLOCKED, (5,)),
    "cuda": grid((BF16, F32), CUDA_LARGE, (3,)) + grid((F64,), CUDA_F64, (1, 3, 16)),
}


@pytest.mark.parametrize("bk,dtype,layout,shape,k", cases(EVERY_PASS))
def test_every_pass(bk, dtype, layout, shape, k):
    draw = Draw(bk, 5)
    check_every_pass(bk, draw, draw.act(shape, dtype, layout), k)


# (dtype, layout, shape, K): more parts than one launch (CUDA) or one tile of 16 rows
# (Triton: K > 8 pads to 16 rows, the tl.dot path; K > 16 takes several programs along
# grid axis 1, of which only the first writes t) holds
MANY_PARTS = {
    "cuda": grid((F32,), [(2, 64, 13, 11), (3, 257, 7, 7)], (17, 20, 37)),
    "triton": grid((F32, F64), [(2, 33, 5, 7)], (12, 16, 20, 40))
    + gpu_cases(grid((F32,), [(2, 2048, 14, 14)], (20,))),
}


@pytest.mark.parametrize("bk,dtype,layout,shape,k", cases(MANY_PARTS))
def test_bwd_reduce_many_parts(bk, dtype, layout, shape, k):
    draw = Draw(bk, 6)
    check_pass(bk, "bwd_reduce", draw.bwd_reduce_args(draw.act(shape, dtype, layout), k))


# (dtype, layout, shape, J): bwd_dx in several stages (CUDA), many terms (Triton)
MANY_TERMS = {
    "cuda": grid((F32,), [(2, 64, 13, 11), (3, 257, 7, 7)], (34, 40, 74)),
    "triton": grid((F32,), [(2, 33, 5, 7)], (33,)),
}


@pytest.mark.parametrize("bk,dtype,layout,shape,j", cases(MANY_TERMS))
def test_bwd_dx_many_terms(bk, dtype, layout, shape, j):
    draw = Draw(bk, 7)
    check_pass(bk, "bwd_dx", draw.bwd_dx_args(draw.act(shape, dtype, layout), j))


# (dtype, layout, shape): K = 0 gives empty part outputs and still t; J = 0 gives -c * f
NO_PARTS = {
    "cpu": grid((F32,), [(2, 6, 3, 5)]),
    "cuda": grid((F32, F16, BF16), [(2, 64, 5, 3)]),
    "triton": grid((F32,), [(2, 33, 5, 7)]),
}


@pytest.mark.parametrize("bk,dtype,layout,shape", cases(NO_PARTS))
def test_no_parts(bk, dtype, layout, shape):
    draw = Draw(bk, 8)
    x = draw.act(shape, dtype, layout)
    check_pass(bk, "bwd_reduce", draw.bwd_reduce_args(x, 0))
    check_pass(bk, "bwd_dx", draw.bwd_dx_args(x, 0))


@pytest.mark.parametrize("bk", on("cpu"))
@pytest.mark.parametrize("layout", pc.LAYOUTS)
def test_zero_features(bk, layout):
    """An all-zero position has norm 0; its similarities come out 0 (inv finite)."""
    draw = Draw(bk, 9)
    x = draw.normal((2, 8, 4, 5))
    x[:, :, 1, 2] = 0
    x = pc.to_layout(x, layout)
    check_pass(bk, "norms", (x,))
    check_pass(bk, "step", draw.step_args(x))
    check_pass(bk, "bwd_reduce", draw.bwd_reduce_args(x, 3))


@pytest.mark.parametrize("bk", on("cpu"))
@pytest.mark.parametrize("layout", pc.LAYOUTS)
def test_zero_channels(bk, layout):
    draw = Draw(bk, 10)
    x = draw.act((2, 0, 3, 4), F32, layout)
    check_pass(bk, "norms", (x,))
    check_pass(bk, "step", draw.step_args(x))
    check_pass(bk, "bwd_reduce", draw.bwd_reduce_args(x, 3))
    check_pass(bk, "bwd_dx", draw.bwd_dx_args(x, 4))


@pytest.mark.parametrize("bk", on("triton"))
@pytest.mark.parametrize("layout", pc.LAYOUTS)
def test_step_every_representative(bk, layout):
    """The representative is read from any P-block, another program's and the partial
    last one included."""
    draw = Draw(bk, 11)
    x = draw.act((2, 33, 5, 7), F32, layout)
    inv = inv_norms(x)
    for i in (0, 15, 16, 34):
        s, _ = check_pass(bk, "step", (x, inv, torch.tensor([i, 34 - i], device=x.device)),
                          f" at {i}")
        # f_r . f_r * inv_r^2 = (||f_r|| / (||f_r|| + eps))^2
        assert abs(s[0].flatten()[i].item() - 1) < 1e-4


# --------------------------------------------------------------------------- idx out of range


@pytest.mark.parametrize("bk", on("cuda"))
@pytest.mark.parametrize("layout", pc.LAYOUTS)
@pytest.mark.parametrize("dtype", (F32, F16, BF16), ids=str)
def test_out_of_range_idx_is_clamped(bk, layout, dtype):
    """idx is not range-checked (that would sync): out-of-range values read the nearest
    valid position instead of faulting."""
    draw = Draw(bk, 12)
    x, inv, _ = draw.step_args(draw.act((2, 64, 5, 3), dtype, layout))
    p = x.shape[2] * x.shape[3]
    got = run(bk, "step", (x, inv, torch.tensor([-7, p + 3], device=x.device)))
    want = run(bk, "step", (x, inv, torch.tensor([0, p - 1], device=x.device)))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("bk", on("triton"))
@pytest.mark.parametrize("layout", pc.LAYOUTS)
def test_step_index_out_of_range_reads_nothing(bk, layout):
    x = Draw(bk, 13).act((2, 7, 3, 3), F32, layout)
    s, sv = run(bk, "step", (x, inv_norms(x), torch.tensor([-1, 9], device=x.device)))
    assert torch.equal(s.cpu(), torch.zeros(2, 3, 3)) and torch.equal(sv.cpu(), torch.zeros(2, 7))


# --------------------------------------------------------------------------- strides and alignment


@pytest.mark.parametrize("bk", on("cuda"))
@pytest.mark.parametrize("layout", pc.LAYOUTS)
def test_wide_channels_fewer_parts_per_launch(bk, layout):
    """u's accumulators for C = 16384 and 5 parts do not fit in shared memory at once."""
    draw = Draw(bk, 14)
    x = draw.act((2, 16384, 3, 5), F32, layout)
    check_pass(bk, "step", draw.step_args(x))
    check_pass(bk, "bwd_reduce", draw.bwd_reduce_args(x, 5))


@pytest.mark.parametrize("bk", on("cuda"))
@pytest.mark.parametrize("layout", pc.LAYOUTS)
@pytest.mark.parametrize("dtype", (F32, F16, BF16), ids=str)
def test_misaligned_activation_uses_scalar_path(bk, layout, dtype):
    """A view starting one element into its storage cannot take vector loads."""
    draw = Draw(bk, 15)
    x = offset_copy(draw.act((2, 64, 14, 14), dtype, layout), 1)
    assert x.data_ptr() % 16 != 0
    check_every_pass(bk, draw, x, 3)


@pytest.mark.parametrize("bk", on("cuda"))
@pytest.mark.parametrize("layout", pc.LAYOUTS)
def test_misaligned_dv(bk, layout):
    """dv starting one float into its storage (channels_last reads it in vectors)."""
    draw = Draw(bk, 16)
    x, inv, dv, dmap = draw.bwd_reduce_args(draw.act((2, 64, 7, 7), F32, layout), 3)
    dv = offset_copy(dv, 1)
    assert dv.data_ptr() % 16 != 0
    check_pass(bk, "bwd_reduce", (x, inv, dv, dmap))


@pytest.mark.parametrize("bk", on("triton"))
def test_small_tensors_need_not_be_contiguous(bk):
    draw = Draw(bk, 17)
    b, c, h, w = shape = (2, 7, 3, 5)
    x = draw.act(shape, F32, "channels_last")
    inv = inv_norms(x).transpose(1, 2).contiguous().transpose(1, 2)
    dv = draw.normal((b, c, 3)).transpose(1, 2)
    dmap = draw.normal((b, 3, h, w))
    assert not (inv.is_contiguous() or dv.is_contiguous())
    args = (x, inv, dv, dmap)
    for o, e in zip(run(bk, "bwd_reduce", args), ref.brnpa_bwd_reduce(*args)):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- determinism


def outputs(bk, calls):
    return [run(bk, name, args) for name, args in calls]


def assert_same_outputs(bk, calls, want, what):
    for (name, args), w in zip(calls, want):
        assert all(torch.equal(a, b) for a, b in zip(run(bk, name, args), w)), (name, what)


# (dtype, layout, shape, K)
DETERMINISTIC = {
    "cpu": grid((F32, F64, BF16, F16), [(3, 48, 37, 41)], (5,)),
    "cuda": grid((F32, BF16), [(2, 257, 56, 56), (3, 2048, 14, 14), (1, 64, 300, 301),
                               (8, 2048, 7, 7)], (3,)),
    "triton": grid((F32,), [(2, 33, 5, 7)], (3,))
    + gpu_cases(grid((F32, BF16), [(2, 2048, 14, 14)], (3,))),
}


@pytest.mark.parametrize("bk,dtype,layout,shape,k", cases(DETERMINISTIC))
def test_deterministic(bk, dtype, layout, shape, k):
    """Bitwise equal on repeat."""
    draw = Draw(bk, 18)
    calls = draw.every_pass(draw.act(shape, dtype, layout), k)
    first = outputs(bk, calls)
    for time in (2, 3):
        assert_same_outputs(bk, calls, first, f"run {time}")


@pytest.mark.parametrize("bk,dtype,layout,shape,k", cases({"cpu": DETERMINISTIC["cpu"]}))
def test_deterministic_whatever_the_threads_and_alignment(bk, dtype, layout, shape, k):
    """Blocks depend on the shape only, and vectorised loops must not peel by alignment."""
    draw = Draw(bk, 19)
    x = draw.act(shape, dtype, layout)
    calls = draw.every_pass(x, k)
    first = outputs(bk, calls)
    threads = torch.get_num_threads()
    try:
        for n in {1, 3}:
            torch.set_num_threads(n)
            assert_same_outputs(bk, calls, first, f"{n} threads")
    finally:
        torch.set_num_threads(threads)
    for off in (1, 3):
        moved = offset_copy(x, off)
        assert moved.stride() == x.stride()
        assert_same_outputs(bk, [(name, (moved, *args[1:])) for name, args in calls], first,
                            f"offset {off}")


def assert_matches_contract(bk, shape, layout, seed, k=3, label="", only=None):
    """Every pass (or ``only`` one) in fp32 within rtol 1e-5, atol 2e-5."""
    draw = Draw(bk, seed)
    for name, args in draw.every_pass(draw.act(shape, F32, layout), k):
        if only in (None, name):
            for o, e in zip(run(bk, name, args), pc.as_tuple(getattr(ref, "brnpa_" + name)(*args))):
                torch.testing.assert_close(o, e, rtol=1e-5, atol=2e-5,
                                           msg=lambda m, name=name: f"{name} {label}: {m}")


@pytest.mark.parametrize("bk", on("triton"))
@pytest.mark.parametrize("layout", pc.LAYOUTS)
def test_deterministic_algorithms_fixed_config(bk, layout):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert_matches_contract(bk, (2, 19, 3, 7), layout, 20)
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("bk", on("triton"))
@pytest.mark.parametrize("layout", pc.LAYOUTS)
def test_int64_offsets_path(bk, layout, monkeypatch):
    # 2**31-element tensors do not fit a test; force the int64 offset code on a small one.
    monkeypatch.setattr(bk.namespace, "_i64", lambda *ts: True)
    assert_matches_contract(bk, (2, 19, 3, 7), layout, 21)
    assert_matches_contract(bk, (2, 19, 3, 7), layout, 21, k=20)


@pytest.mark.skipif(not TRITON.interpreting,
                    reason="GPU autotune covers these on a GPU")
@pytest.mark.parametrize("bk", on("triton"))
@pytest.mark.parametrize("layout", pc.LAYOUTS)
def test_every_gpu_config_under_interpreter(bk, layout, monkeypatch):
    """The other tests run the interpreter's single tile; here every tile that autotune
    may pick on a GPU, with the launcher's GPU choice of BLOCK_P."""
    import triton
    tri = bk.namespace
    monkeypatch.setattr(tri, "_INTERPRET", False)
    runs = [("norms", tri._brnpa_norms_kernel, tri._NORMS_CONFIGS, (3,)),
            ("step", tri._brnpa_step_kernel, tri._STEP_CONFIGS, (3,)),
            # K = 3 takes no tl.dot, K = 12 does
            ("bwd_reduce", tri._brnpa_bwd_reduce_kernel, tri._BWD_REDUCE_CONFIGS, (3, 12)),
            ("bwd_dx", tri._brnpa_bwd_dx_kernel, tri._BWD_DX_CONFIGS, (3,))]
    for name, kernel, configs, ks in runs:
        for kw, warps in configs:
            monkeypatch.setitem(tri._FORCED_CONFIGS, kernel, triton.Config(kw, num_warps=warps))
            for k in ks:
                assert_matches_contract(bk, (1, 37, 9, 11), layout, 22, k, f"{kw} k={k}", name)
        monkeypatch.delitem(tri._FORCED_CONFIGS, kernel)


# --------------------------------------------------------------------------- compositions


@pytest.mark.parametrize("bk", on("cpu", "cuda"))
@pytest.mark.parametrize("variant_paper", (False, True))
@pytest.mark.parametrize("layout", pc.LAYOUTS)
@pytest.mark.parametrize("dtype", (F32, F64), ids=str)
def test_composed_forward_backward_match_torch_passes(bk, variant_paper, layout, dtype):
    """The registered forward / backward compositions with the backend's passes against
    the same compositions with the PyTorch passes."""
    # the module, not the function manet_kernels.ops re-exports under the same name
    brnpa_ops = importlib.import_module("manet_kernels.ops.brnpa")
    # non-negative features (as after a ReLU): the similarity sums stay away from 0
    x = Draw(bk, 23).act((3, 64, 13, 11), dtype, layout).abs()
    got = brnpa_ops._forward_impl(x, 4, variant_paper, bk.name)
    want = brnpa_ops._forward_impl(x, 4, variant_paper, "torch")
    assert torch.equal(got[4], want[4]), "argmax indices differ"
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == F32 else dict(rtol=1e-10, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
    gv, gmap = torch.randn_like(want[0]), torch.randn_like(want[1])
    dx = brnpa_ops._backward_impl(gv, gmap, x, *want[2:], bk.name)
    dx_ref = brnpa_ops._backward_impl(gv, gmap, x, *want[2:], "torch")
    assert dx.stride() == dx_ref.stride()
    torch.testing.assert_close(dx, dx_ref, **tol)


# --------------------------------------------------------------------------- empty batch


@pytest.mark.parametrize("bk,dtype,layout", cases({
    "cpu": grid((F32, F64, BF16, F16)), "cuda": grid((F32, F16, BF16, F64)),
    "triton": grid(TRITON_DTYPES), "torch": grid((F32, F64))}))
def test_empty_batch(bk, dtype, layout):
    n, c, h, w, k = 0, 5, 7, 3, 2
    draw = Draw(bk, 24)
    x = draw.act((n, c, h, w), dtype, layout)
    a = pc.acc_dtype(dtype)
    inv = torch.ones(n, h, w, device=x.device, dtype=a)
    idx = torch.zeros(n, device=x.device, dtype=torch.int64)
    expect = [
        (run(bk, "norms", (x,)), [((n, h, w), a)]),
        (run(bk, "step", (x, inv, idx)), [((n, h, w), a), ((n, c), a)]),
        (run(bk, "bwd_reduce", draw.bwd_reduce_args(x, k)),
         [((n, k, h, w), a), ((n, k, c), a), ((n, c), a)]),
        (run(bk, "bwd_dx", draw.bwd_dx_args(x, 2 * k)), [((n, c, h, w), dtype)]),
    ]
    for got, want in expect:
        assert len(got) == len(want)
        for t, (shape, dt) in zip(got, want):
            assert tuple(t.shape) == shape and t.dtype == dt and t.device == x.device
    if bk.name == "triton":  # its launchers keep x's format even with nothing in it
        pc.assert_same_format(expect[-1][0][0], x)


# --------------------------------------------------------------------------- bad arguments

B, C, H, W, K = 2, 6, 3, 5, 3


def good_args(device):
    def randn(*shape):
        return torch.randn(*shape, device=device)
    return dict(x=randn(B, C, H, W), inv_nrm=torch.rand(B, H, W, device=device) + 0.5,
                idx=torch.tensor([0, H * W - 1], device=device), dv=randn(B, K, C),
                dmap=randn(B, K, H, W), a=randn(B, 2 * K, H, W), m=randn(B, 2 * K, C),
                c=randn(B, H, W))


@dataclass(frozen=True)
class Bad:
    """A call of pass ``op`` whose error must name ``arg``: the good arguments with
    ``spoil[name](good)`` in place of each ``name``."""

    op: str
    arg: str
    spoil: dict = field(compare=False)
    err: type = RuntimeError

    def __str__(self):
        return f"{self.op}-{self.arg}"


def bad(op, arg, fn, err=RuntimeError, **more):
    return Bad(op, arg, {arg: fn, **more}, err)


def strided(t):  # same shape, every other element of a wider tensor
    return torch.cat([t, t], -1)[..., ::2]


def transposed(t):  # same shape, the last two dims' strides swapped
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def more(dim):  # one more along ``dim``
    return lambda t: torch.cat([t, t.narrow(dim, 0, 1)], dim)


def to(where):  # the same values in another dtype or on another device
    return lambda t: t.to(where)


# Each backend's own checks: the C++ kernels reject what the Triton launchers accept
# (strided small tensors), and each treats an out-of-range idx its own way.
X_BAD = [lambda t: t[0], to(torch.int32), strided, transposed]
CPU_BAD = [bad(op, "x", fn) for op in SIGS for fn in X_BAD] + [
    bad("step", "inv_nrm", lambda t: t.flatten(1)),
    bad("step", "inv_nrm", to(F64)),
    bad("step", "inv_nrm", transposed),
    bad("step", "idx", to(torch.int32)),
    bad("step", "idx", more(0)),
    bad("step", "idx", lambda t: t[None]),
    bad("step", "idx", lambda t: torch.tensor([0, H * W])),
    bad("step", "idx", lambda t: torch.tensor([-1, 0])),
    bad("bwd_reduce", "inv_nrm", more(0)),
    bad("bwd_reduce", "dv", lambda t: t[:, 0].contiguous()),
    bad("bwd_reduce", "dv", more(2)),
    bad("bwd_reduce", "dv", to(F64)),
    bad("bwd_reduce", "dmap", lambda t: t[:, :2].contiguous()),
    bad("bwd_reduce", "dmap", transposed),
    bad("bwd_dx", "a", lambda t: t.flatten(2)),
    bad("bwd_dx", "a", to(F16)),
    bad("bwd_dx", "m", lambda t: t[:, :5].contiguous()),
    bad("bwd_dx", "m", transposed),
    bad("bwd_dx", "c", more(2)),
    bad("bwd_dx", "c", to(BF16)),
]
CUDA_BAD = [
    # x: rank, dtype, layout, device
    bad("norms", "x", lambda t: t[0]),
    bad("norms", "x", to(torch.int32)),
    bad("norms", "x", lambda t: t[..., ::2]),
    bad("norms", "x", lambda t: t.permute(0, 1, 3, 2)),
    bad("step", "x", to("cpu")),
    bad("bwd_reduce", "x", lambda t: t[:, :, ::2]),
    bad("bwd_dx", "x", lambda t: t.transpose(2, 3)),
    # device
    bad("step", "inv_nrm", to("cpu")),
    bad("step", "idx", to("cpu")),
    bad("bwd_reduce", "dv", to("cpu")),
    bad("bwd_reduce", "dmap", to("cpu")),
    bad("bwd_dx", "m", to("cpu")),
    bad("bwd_dx", "c", to("cpu")),
    # shapes
    bad("step", "inv_nrm", lambda t: t.flatten(1)),
    bad("bwd_reduce", "inv_nrm", lambda t: t.reshape(B, W, H)),
    bad("step", "idx", more(0)),
    bad("step", "idx", lambda t: t[:, None]),
    bad("bwd_reduce", "dv", more(2)),
    bad("bwd_reduce", "dv", lambda t: t[:, 0].contiguous()),
    bad("bwd_reduce", "dmap", more(1)),
    bad("bwd_dx", "a", lambda t: t.flatten(2)),
    bad("bwd_dx", "a", more(0)),
    bad("bwd_dx", "m", more(1)),
    bad("bwd_dx", "c", lambda t: t[:, None]),
    # dtypes: small tensors in the accumulation dtype, idx int64
    bad("step", "inv_nrm", to(F64)),
    bad("step", "inv_nrm", to(F16), x=to(F16)),
    bad("step", "idx", to(torch.int32)),
    bad("bwd_reduce", "dv", to(F64)),
    bad("bwd_reduce", "dmap", to(BF16), x=to(BF16)),
    Bad("bwd_dx", "m", dict(x=to(F64), a=to(F64), c=to(F64))),  # float32 m beside float64
    # small tensors must be contiguous
    bad("bwd_reduce", "dv", transposed),
    bad("bwd_dx", "c", transposed),
]
# The Triton launchers raise ValueError / TypeError, the message starting with the name.
TRITON_BAD = [Bad(op, arg, {arg: fn}, err) for arg, fn, err in [
    ("x", lambda t: t[0], ValueError),  # 3-D
    ("x", to(torch.int32), TypeError),
    ("x", lambda t: t.transpose(2, 3), ValueError),  # neither layout
    ("x", lambda t: t[:, :, :, :4], ValueError),  # strided slice
    ("x", lambda t: t[:, :0], ValueError),  # C = 0 with B > 0
    ("x", lambda t: t.tolist(), TypeError),
    ("inv_nrm", to(F64), TypeError),
    ("inv_nrm", lambda t: t[:, :1], ValueError),
    ("inv_nrm", to("meta"), ValueError),  # another device
    ("inv_nrm", lambda t: t.tolist(), TypeError),
    ("idx", to(torch.int32), TypeError),
    ("idx", lambda t: t[:1], ValueError),
    ("dv", lambda t: t[0], ValueError),  # 2-D
    ("dv", lambda t: t[:, :, :2], ValueError),  # C mismatch
    ("dv", to(F16), TypeError),
    ("dmap", lambda t: t[:, :1], ValueError),  # K unlike dv's
    ("dmap", to(F64), TypeError),
    ("a", lambda t: t[0], ValueError),
    ("a", to(F64), TypeError),
    ("a", lambda t: None, TypeError),
    ("m", lambda t: t[:, :1], ValueError),  # J unlike a's
    ("m", to(F16), TypeError),
    ("c", lambda t: t.flatten(1), ValueError),
    ("c", to(F64), TypeError),
] for op in SIGS if arg in SIGS[op]]
# the message each backend's errors start or contain, naming the argument
NAMING = {"cpu": r"(^|\s){}: expected", "cuda": r"expected {}\b", "triton": r"^{}\b"}


@pytest.mark.parametrize("bk,case,i", cases({
    name: [(b, i) for i, b in enumerate(table)]
    for name, table in (("cpu", CPU_BAD), ("cuda", CUDA_BAD), ("triton", TRITON_BAD))}))
def test_bad_arguments_name_the_argument(bk, case, i):
    args = good_args(bk.device)
    for name, fn in case.spoil.items():
        args[name] = fn(args[name])
    with pytest.raises(case.err, match=NAMING[bk.name].format(case.arg)):
        run(bk, case.op, [args[a] for a in SIGS[case.op]])


@pytest.mark.parametrize("bk", on("cpu"))
def test_low_precision_x_takes_float32_small_tensors(bk):
    args = good_args("cpu")
    args["x"] = args["x"].to(BF16)
    run(bk, "step", (args["x"], args["inv_nrm"], args["idx"]))  # float32 inv_nrm is right
    with pytest.raises(RuntimeError, match=r"inv_nrm: expected dtype Float"):
        run(bk, "step", (args["x"], args["inv_nrm"].to(BF16), args["idx"]))


@pytest.mark.parametrize("bk", on("triton"))
def test_cpu_tensors_need_the_interpreter(bk, monkeypatch):
    monkeypatch.setattr(bk.namespace, "_interpreting", lambda: False)
    a = good_args("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        run(bk, "norms", (a["x"],))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        run(bk, "bwd_dx", (a["x"], a["a"], a["m"], a["c"]))
