"""BR-NPA stage ops against their contract, ``manet_kernels.reference.stages``, on the
same inputs, one tester for every backend that has them: ``cpu`` (csrc/cpu/brnpa_stages.cpp,
``torch.ops.manet_kernels._<stage>`` on CPU tensors), ``cuda`` (the same ops on CUDA
tensors) and ``triton`` (``brnpa_prepare``, ``brnpa_part``, ``brnpa_bwd_finish`` in
manet_kernels/triton/brnpa_stages.py, under the interpreter without a GPU).

The stages:

* ``brnpa_prepare(x, paper, eps) -> (nrm, inv, score)``;
* ``brnpa_part(x, inv, score, j, paper, idx, s, total, vectors, maps)``: part ``j`` in place;
* ``brnpa_bwd_finish(x, dw, u, t, inv, nrm, idx, s, total, gv) -> (a, m, c)``.

Tolerance (``close``): both sides evaluate the same formulas in the accumulation dtype,
the sums in different orders, so ``|out - exp| <= 4 * eps(acc) * n_terms * bound``
(as the Triton pass tests), ``bound`` being the output's formula on absolute values
(what a rounding error in any term can move it by); one ulp of x's dtype more for the
outputs rounded to it (vectors, maps). Indices are compared exactly (the argmax sees
the same score on both sides), as are the outputs that involve no arithmetic (one-hot
rows, the gathered representatives, ``gv``) and, on the CPU, those that are the same
single operation on the same inputs (``w = s / S``). Non-finite values must match
exactly (``S = +inf`` for an all-zero part, NaN from a NaN in x).

Features are non-negative (as after a ReLU) in the contract tests, so that the
similarity sums S stay away from 0; the all-zero and NaN cases have tests of their own.
"""

from __future__ import annotations

import itertools

import passes_common as pc
import pytest
import torch

from manet_kernels.reference import stages as ref
from manet_kernels.reference.brnpa import NORM_EPS

OP, KERNEL = "brnpa", "brnpa_part"
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
TRITON = pc.Backend("triton", OP, KERNEL)
TRITON_GPU = pc.HAS_GPU and not TRITON.interpreting
VARIANTS = {"paper": True, "official": False}
BACKENDS = ("cpu", "cuda", "triton")


def stage(bk, name):
    """The backend's stage ``name``; a Triton case without it is skipped."""
    if bk.name == "triton":
        fn = getattr(bk, name, None)
        if fn is None:
            pytest.skip("no Triton stage yet")
        return fn
    return getattr(torch.ops.manet_kernels, "_" + name)


def cases(table):
    """``table``: backend name -> its cases (one skipped case where it cannot run)."""
    return pc.backend_params(OP, KERNEL, {
        name: rows[:1] if pc.Backend(name, OP, KERNEL).skip_reason() else rows
        for name, rows in table.items()})


def on(*names):
    return pc.backends(OP, KERNEL, *(names or BACKENDS))


def grid(*axes):
    return list(itertools.product(*axes))


# --------------------------------------------------------------------------- shapes

# Odd sizes everywhere: C = 5, H = 3, W = 7 and friends; (3, 64, 8, 8) is the benchmark
# shape; CPU_BLOCKED splits a sample's positions into several blocks of the step pass
# (partial sums reduced in order), in NCHW with more than one block per sample.
CPU_SHAPES = [(2, 5, 3, 7), (1, 1, 1, 1), (3, 1, 2, 3), (2, 64, 8, 8), (1, 7, 13, 11),
              (2, 3, 1, 5)]
CPU_BLOCKED = [(2, 37, 23, 29)]
CUDA_SHAPES = CPU_SHAPES + [(2, 257, 14, 14), (4, 2048, 7, 7)]
TRITON_SHAPES = [(2, 5, 3, 7), (1, 1, 1, 1), (1, 7, 3, 3)] + (
    [(2, 257, 14, 14)] if TRITON_GPU else [])
SHAPES = {"cpu": CPU_SHAPES + CPU_BLOCKED, "cuda": CUDA_SHAPES, "triton": TRITON_SHAPES}
# the interpreter's bf16 arithmetic is wrong: no bf16 there
DTYPES = {"cpu": (F64, F32, BF16, F16), "cuda": (F64, F32, BF16, F16),
          "triton": (F32, F64, F16) + ((BF16,) if TRITON_GPU else ())}


def table(*more):
    """(dtype, layout, variant, *more) for every backend."""
    return {name: grid(DTYPES[name], pc.LAYOUTS, VARIANTS, *more) for name in BACKENDS}


def parts_for(shape):
    """K = 1..4, as many as there are positions."""
    return range(1, min(4, shape[2] * shape[3]) + 1)


# --------------------------------------------------------------------------- inputs


def features(bk, seed, shape, dtype, layout):
    """Non-negative features (as after a ReLU), the same values on every backend."""
    return pc.act(pc.randn(shape, pc.gen(seed)).abs(), dtype, layout, bk.device)


def empty_state(x, k):
    """idx, s, total, vectors, maps for K parts, filled with sentinels: a part must
    leave the other parts' columns alone."""
    b, c, h, w = x.shape
    acc = pc.acc_dtype(x.dtype)
    kw = dict(device=x.device)
    return (torch.full((b, k), -1, dtype=torch.int64, **kw),
            torch.full((b, k, h, w), -3.0, dtype=acc, **kw),
            torch.full((b, k), -5.0, dtype=acc, **kw),
            torch.full((b, k, c), -7.0, dtype=x.dtype, **kw),
            torch.full((b, k, h, w), -9.0, dtype=x.dtype, **kw))


def state_before(x, paper, k, j):
    """The contract's (inv, score, state) before part ``j`` of ``k``."""
    _, inv, score = ref.brnpa_prepare(x, paper, NORM_EPS)
    state = empty_state(x, k)
    for i in range(j):
        ref.brnpa_part(x, inv, score, i, paper, *state)
    return inv, score, state


def clones(ts):
    return [t.clone() for t in ts]


# --------------------------------------------------------------------------- tolerance


def close(out, exp, bound, n_terms, what, x_dtype=None):
    """``|out - exp| <= 4 eps(acc) n_terms bound`` (+ one ulp of ``x_dtype`` for an output
    rounded to it) where ``exp`` is finite; the same non-finite values elsewhere."""
    assert out.dtype == exp.dtype, (what, out.dtype, exp.dtype)
    assert out.shape == exp.shape, (what, out.shape, exp.shape)
    assert out.device == exp.device, what
    assert out.is_contiguous(), what
    o, e = out.double().cpu(), exp.double().cpu()
    fin = torch.isfinite(e)
    torch.testing.assert_close(o[~fin], e[~fin], rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{what} (non-finite values): {m}")
    acc = torch.finfo(pc.acc_dtype(exp.dtype) if x_dtype is None else pc.acc_dtype(x_dtype))
    bnd = torch.nan_to_num(bound.double().cpu().abs(), nan=0.0, posinf=0.0)
    tol = 4 * acc.eps * n_terms * bnd + acc.tiny
    if x_dtype is not None:
        tol = tol + torch.finfo(x_dtype).eps * e.abs()
    pc.assert_all_within((o - e).abs()[fin], tol[fin], int(fin.sum()), what)


def same(bk, out, exp, what, n_terms=1):
    """One operation on the same inputs: bit for bit on the CPU; a GPU's division may be
    approximate (fast math), so there within a few ulps."""
    if bk.name == "cpu":
        return pc.assert_exact(out, exp, what)
    close(out, exp, exp, n_terms, what)


# --------------------------------------------------------------------------- prepare


def check_prepare(bk, x, paper, what=""):
    got = stage(bk, "brnpa_prepare")(x, paper, NORM_EPS)
    want = ref.brnpa_prepare(x, paper, NORM_EPS)
    assert len(got) == 3
    n = x.shape[1] + 2
    for g, w, name in zip(got, want, ("nrm", "inv", "score")):
        close(g, w, w, n, f"prepare {name}{what}")
    return got


@pytest.mark.parametrize("bk,dtype,layout,variant", cases(table()))
def test_prepare_matches_contract(bk, dtype, layout, variant):
    for i, shape in enumerate(SHAPES[bk.name]):
        x = pc.act(pc.randn(shape, pc.gen(100 + i)), dtype, layout, bk.device)  # signed
        check_prepare(bk, x, VARIANTS[variant], f" {pc.shape_id(shape)}")


# --------------------------------------------------------------------------- part


def part_bounds(x, inv, score0, i, paper, total_j, w_exp, v_exp):
    """The part's formulas on absolute values (float64): s_j, S, vectors, maps, score."""
    b, c, h, w = x.shape
    f = x.double().abs().flatten(2).cpu()  # (B, C, P)
    invd = inv.double().flatten(1).cpu()
    i = i.cpu()
    r = f.gather(2, i.view(b, 1, 1).expand(b, c, 1))
    s_abs = (f * r).sum(1) * invd * invd.gather(1, i.view(b, 1))  # (B, P)
    sv_abs = (f * s_abs[:, None]).sum(2)  # (B, C)
    big_s = s_abs.sum(1, keepdim=True)
    tot = total_j.double().cpu().abs()[:, None]
    w_abs = (s_abs + w_exp.double().cpu().abs().flatten(1) * big_s) / tot
    v_abs = (sv_abs + v_exp.double().cpu().abs() * big_s) / tot
    sc_abs = score0.double().cpu().abs().flatten(1) * (1 + (w_abs if paper else s_abs))
    return s_abs, big_s[:, 0], v_abs, w_abs, sc_abs


def check_part(bk, x, inv, score, j, paper, state, what=""):
    """Part ``j`` of the backend on clones of (score, state) against the contract on
    other clones; returns the backend's (score, state)."""
    got_sc, want_sc = score.clone(), score.clone()
    got, want = clones(state), clones(state)
    assert stage(bk, "brnpa_part")(x, inv, got_sc, j, paper, *got) is None
    ref.brnpa_part(x, inv, want_sc, j, paper, *want)
    compare_state(bk, x, inv, score, j, paper, (got_sc, *got), (want_sc, *want), what)
    return got_sc, got


def other_parts(state, j):
    """Every column of (idx, s, total, vectors, maps) but part ``j``'s."""
    others = [k for k in range(state[0].shape[1]) if k != j]
    return [t[:, others].contiguous() for t in state]


def assert_others_kept(got, want, j, what=""):
    for g, w, name in zip(other_parts(got, j), other_parts(want, j), STATE):
        pc.assert_exact(g, w, f"part {j} {name}, other parts{what}")


STATE = ("idx", "s", "total", "vectors", "maps")


def compare_state(bk, x, inv, score0, j, paper, got, want, what="", others=True):
    """Part ``j``'s outputs (score, idx, s, total, vectors, maps) against the contract's;
    with ``others``, the other parts' columns must be as the contract left them.
    ``score0``: the score before the part, or the bound on it (the contract on absolute
    values, where the score carries earlier parts' rounding); returns the score's bound
    after the part."""
    g_sc, g_idx, g_s, g_tot, g_vec, g_map = got
    w_sc, w_idx, w_s, w_tot, w_vec, w_map = want
    pc.assert_exact(g_idx[:, j].contiguous(), w_idx[:, j].contiguous(), f"part {j} idx{what}")
    if others:
        assert_others_kept(got[1:], want[1:], j, what)
    s_abs, big_s, v_abs, w_abs, sc_abs = part_bounds(
        x, inv, score0, w_idx[:, j], paper, w_tot[:, j], w_map[:, j], w_vec[:, j])
    b, c, h, wd = x.shape
    n = c + h * wd + 4
    close(g_s[:, j].contiguous(), w_s[:, j].contiguous(), s_abs.view(b, h, wd), n,
          f"part {j} s{what}")
    close(g_tot[:, j].contiguous(), w_tot[:, j].contiguous(), big_s, n, f"part {j} total{what}")
    close(g_vec[:, j].contiguous(), w_vec[:, j].contiguous(), v_abs, n,
          f"part {j} vectors{what}", x.dtype)
    close(g_map[:, j].contiguous(), w_map[:, j].contiguous(), w_abs.view(b, h, wd), n,
          f"part {j} maps{what}", x.dtype)
    close(g_sc, w_sc, sc_abs.view(b, h, wd), n, f"part {j} score{what}")
    return sc_abs.view(b, h, wd)


@pytest.mark.parametrize("bk,dtype,layout,variant", cases(table()))
def test_part_matches_contract(bk, dtype, layout, variant):
    """Each part j < K of K = 1..4 on the contract's state before it."""
    paper = VARIANTS[variant]
    for i, shape in enumerate(SHAPES[bk.name]):
        x = features(bk, 200 + i, shape, dtype, layout)
        for k in parts_for(shape):
            for j in range(k):
                inv, score, state = state_before(x, paper, k, j)
                check_part(bk, x, inv, score, j, paper, state,
                           f" {pc.shape_id(shape)} K={k}")


SEQUENCE = {"cpu": grid((F64, F32, BF16), pc.LAYOUTS, VARIANTS, [(2, 5, 3, 7), (2, 64, 8, 8),
                                                                  (2, 37, 23, 29)]),
            "cuda": grid((F64, F32, BF16), pc.LAYOUTS, VARIANTS, [(2, 5, 3, 7), (2, 64, 8, 8)]),
            "triton": grid((F32,), pc.LAYOUTS, VARIANTS, [(2, 5, 3, 7)])}


@pytest.mark.parametrize("bk,dtype,layout,variant,shape", cases(SEQUENCE))
def test_parts_in_sequence(bk, dtype, layout, variant, shape):
    """prepare, then parts 0..K-1 in order on the backend's own state, against the
    contract run on clones of the same inputs."""
    paper, k = VARIANTS[variant], 4
    x = features(bk, 300, shape, dtype, layout)
    nrm, inv, score = stage(bk, "brnpa_prepare")(x, paper, NORM_EPS)
    w_nrm, w_inv, w_score = ref.brnpa_prepare(x, paper, NORM_EPS)
    state, want = empty_state(x, k), empty_state(x, k)
    # the score carries each part's rounding into the next: its bound is the score's
    # formula on absolute values, score_0 * prod_j (1 + |w_j| or |s_j|)
    sc_abs = w_score.abs()
    for j in range(k):
        before = clones(state)
        stage(bk, "brnpa_part")(x, inv, score, j, paper, *state)
        ref.brnpa_part(x, w_inv, w_score, j, paper, *want)
        assert_others_kept(state, before, j, f" after {j + 1} parts")
        sc_abs = compare_state(bk, x, w_inv, sc_abs, j, paper, (score, *state),
                               (w_score, *want), f" after {j + 1} parts", others=False)


# --------------------------------------------------------------------------- part: ties, NaN, zeros

SPECIAL = {"cpu": grid((F32, F64, BF16), pc.LAYOUTS), "cuda": grid((F32, BF16), pc.LAYOUTS),
           "triton": grid((F32,), pc.LAYOUTS)}


@pytest.mark.parametrize("bk,dtype,layout", cases(SPECIAL))
def test_part_ties_first_maximum(bk, dtype, layout):
    """Equal maxima in the score: the first one wins; a NaN counts as the maximum (the
    first NaN), as torch.argmax."""
    b, c, h, w = shape = (4, 5, 3, 7)
    x = features(bk, 400, shape, dtype, layout)
    for paper in (False, True):
        inv, score, state = state_before(x, paper, 3, 1)
        flat = score.view(b, h * w)
        top = flat.max().item() + 1
        flat[0, [4, 9, 17]] = top  # three equal maxima
        flat[1] = top  # all equal
        flat[2, [6, 13]] = float("nan")  # NaN beats everything
        flat[2, 2] = float("inf")
        flat[3, [20, 3]] = top  # the later index written first
        got_sc, got = check_part(bk, x, inv, score, 1, paper, state)
        assert got[0][:, 1].tolist() == [4, 0, 6, 3]


@pytest.mark.parametrize("bk,dtype,layout", cases(SPECIAL))
def test_nan_in_x(bk, dtype, layout):
    """A NaN feature: its norm and score are NaN, so it is the first part's representative
    and sample 0's part is NaN throughout; sample 1 is untouched by it."""
    shape = (2, 5, 3, 7)
    x = features(bk, 401, shape, F64, "nchw")
    x[0, 2, 1, 4] = float("nan")
    x[0, 3, 2, 5] = float("nan")
    x = pc.act(x, dtype, layout, bk.device)
    for paper in (False, True):
        nrm, inv, score = check_prepare(bk, x, paper)
        assert torch.isnan(nrm[0]).sum() == 2
        state = empty_state(x, 2)
        for j in range(2):
            score, state = check_part(bk, x, inv, score, j, paper, state, f" paper={paper}")
        assert state[0][0, 0].item() == 1 * 7 + 4
        assert torch.isnan(state[1][0, 0]).all() and torch.isfinite(state[1][1]).all()


@pytest.mark.parametrize("bk,dtype,layout", cases(SPECIAL))
def test_all_zero_sample(bk, dtype, layout):
    """An all-zero sample: S = 0, so total = +inf and its maps and vectors are 0 (and
    its score unchanged); the backward gives it zero rows and c = 0."""
    b, c, h, w = shape = (3, 5, 3, 7)
    x = features(bk, 402, shape, F64, "nchw")
    x[1] = 0
    x[2, :, 0, 0] = 0  # one zero position, chosen by nothing
    x = pc.act(x, dtype, layout, bk.device)
    for paper in (False, True):
        nrm, inv, score = check_prepare(bk, x, paper)
        state = empty_state(x, 3)
        for j in range(3):
            before = score.clone()
            score, state = check_part(bk, x, inv, score, j, paper, state, f" paper={paper}")
            assert torch.equal(score[1], before[1])
        idx, s, total, vectors, maps = state
        assert torch.isinf(total[1]).all() and (total[1] > 0).all()
        assert (s[1] == 0).all() and (vectors[1] == 0).all() and (maps[1] == 0).all()
        check_bwd_finish(bk, x, inv, nrm, idx, s, total, seed=403, gv=True)


# --------------------------------------------------------------------------- backward finish


def bwd_inputs(x, k, paper, seed, gv):
    """A forward's (inv, nrm, idx, s, total) from the contract, with random dw, u, t (and
    gv) in the accumulation dtype."""
    b, c, h, w = x.shape
    nrm, inv, score = ref.brnpa_prepare(x, paper, NORM_EPS)
    state = empty_state(x, k)
    for j in range(k):
        ref.brnpa_part(x, inv, score, j, paper, *state)
    idx, s, total = state[:3]
    return (inv, nrm, idx, s, total) + grads(x, k, seed, gv)


def grads(x, k, seed, gv):
    b, c, h, w = x.shape
    acc = pc.acc_dtype(x.dtype)
    g = pc.gen(seed)

    def normal(*shape):
        return pc.small(shape, g, acc, x.device)
    return normal(b, k, h, w), normal(b, k, c), normal(b, c), normal(b, k, c) if gv else None


def check_bwd_finish(bk, x, inv, nrm, idx, s, total, seed, gv, what="", given=None):
    """The backward finish against the contract, row group by row group."""
    b, c, h, w = x.shape
    k = idx.shape[1]
    dw, u, t, g = given or grads(x, k, seed, gv)
    args = (x, dw, u, t, inv, nrm, idx, s, total, g)
    got = stage(bk, "brnpa_bwd_finish")(*args)
    want = ref.brnpa_bwd_finish(*args)
    assert len(got) == 3
    a, m, cc = got
    ea, em, ec = want
    assert a.shape == (b, 3 * k, h, w) and m.shape == (b, 3 * k, c) and cc.shape == (b, h, w)
    # bounds: the formulas on absolute values (float64)
    p = h * w
    d = {n: v.double().cpu() for n, v in dict(dw=dw, u=u, t=t, inv=inv, nrm=nrm, s=s,
                                                total=total).items()}
    tot = d["total"].abs()[..., None]
    wgt = (d["s"].reshape(b, k, p) / tot).abs()
    ck_abs = (d["dw"].reshape(b, k, p).abs() * wgt).sum(2)
    ds_abs = (d["dw"].reshape(b, k, p).abs() + ck_abs[..., None]) / tot
    inv_p = d["inv"].reshape(b, p)
    inv_r = inv_p.gather(1, idx.cpu())
    a_ds = ds_abs * inv_p[:, None] * inv_r[..., None]
    dr = (d["u"].abs() + ck_abs[..., None] * d["t"].abs()[:, None]) / tot * inv_r[..., None]
    nrm_p = d["nrm"].reshape(b, p)
    safe = torch.where(nrm_p > 0, inv_p / nrm_p.clamp_min(1e-300), torch.zeros_like(inv_p))
    c_abs = (ds_abs * d["s"].reshape(b, k, p).abs()).sum(1) * safe
    n = p + k + 4

    def rows(t, i):
        return t[:, i * k:(i + 1) * k].contiguous()
    same(bk, rows(a, 0), rows(ea, 0), f"bwd_finish a: w rows{what}")
    close(rows(a, 1), rows(ea, 1), a_ds.view(b, k, h, w), n, f"bwd_finish a: ds rows{what}")
    pc.assert_exact(rows(a, 2), rows(ea, 2), f"bwd_finish a: one-hot rows{what}")
    pc.assert_exact(rows(m, 0), rows(em, 0), f"bwd_finish m: gv rows{what}")
    pc.assert_exact(rows(m, 1), rows(em, 1), f"bwd_finish m: representatives{what}")
    close(rows(m, 2), rows(em, 2), dr, n, f"bwd_finish m: dr rows{what}")
    close(cc, ec, c_abs.view(b, h, w), n, f"bwd_finish c{what}")


BWD = {name: grid(DTYPES[name], pc.LAYOUTS, ("gv", "no_gv")) for name in BACKENDS}


@pytest.mark.parametrize("bk,dtype,layout,gv", cases(BWD))
def test_bwd_finish_matches_contract(bk, dtype, layout, gv):
    for i, shape in enumerate(SHAPES[bk.name]):
        x = features(bk, 500 + i, shape, dtype, layout)
        for k, paper in itertools.product(parts_for(shape), (False, True)):
            inv, nrm, idx, s, total, *given = bwd_inputs(x, k, paper, 600 + i, gv == "gv")
            check_bwd_finish(bk, x, inv, nrm, idx, s, total, None, None,
                             f" {pc.shape_id(shape)} K={k} paper={paper}", given)


@pytest.mark.parametrize("bk,dtype,layout", cases(SPECIAL))
def test_bwd_finish_repeated_representative(bk, dtype, layout):
    """A position chosen by two parts: each part's one-hot row has its 1 there."""
    shape = (2, 5, 3, 7)
    x = features(bk, 501, shape, dtype, layout)
    inv, nrm, idx, s, total, *given = bwd_inputs(x, 3, False, 601, True)
    idx = idx.clone()
    idx[:, 2] = idx[:, 0]
    check_bwd_finish(bk, x, inv, nrm, idx, s, total, None, None, given=given)
    a = stage(bk, "brnpa_bwd_finish")(x, *given[:3], inv, nrm, idx, s, total, given[3])[0]
    onehot = a[:, 6:].flatten(2)
    assert torch.equal(onehot.sum(2).cpu(), torch.ones(2, 3, dtype=onehot.dtype))
    assert torch.equal(onehot.argmax(2).cpu(), idx.cpu())


# --------------------------------------------------------------------------- empty batch


@pytest.mark.parametrize("bk,dtype,layout", cases(
    {name: grid(DTYPES[name][:2], pc.LAYOUTS) for name in BACKENDS}))
def test_empty_batch(bk, dtype, layout):
    b, c, h, w, k = 0, 5, 3, 7, 2
    x = pc.act(torch.zeros(b, c, h, w), dtype, layout, bk.device)
    acc = pc.acc_dtype(dtype)
    outs = stage(bk, "brnpa_prepare")(x, True, NORM_EPS)
    assert [(tuple(t.shape), t.dtype) for t in outs] == [((b, h, w), acc)] * 3
    inv, score = outs[1], outs[2]
    state = empty_state(x, k)
    stage(bk, "brnpa_part")(x, inv, score, 1, False, *state)
    dw, u, t, gv = grads(x, k, 0, True)
    a, m, cc = stage(bk, "brnpa_bwd_finish")(x, dw, u, t, inv, outs[0], *state[:3], gv)
    assert (tuple(a.shape), a.dtype) == ((b, 3 * k, h, w), acc)
    assert (tuple(m.shape), m.dtype) == ((b, 3 * k, c), acc)
    assert (tuple(cc.shape), cc.dtype) == ((b, h, w), acc)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("bk,dtype,layout", cases({"cpu": grid((F32, BF16), pc.LAYOUTS)}))
def test_deterministic_whatever_the_threads(bk, dtype, layout):
    """Bitwise equal on repeat and with 1 or 3 threads, at a shape whose loops split."""
    shape, k = (6, 48, 37, 41), 3
    x = features(bk, 700, shape, dtype, layout)

    def run_all():
        nrm, inv, score = stage(bk, "brnpa_prepare")(x, True, NORM_EPS)
        state = empty_state(x, k)
        for j in range(k):
            stage(bk, "brnpa_part")(x, inv, score, j, True, *state)
        dw, u, t, gv = grads(x, k, 701, True)
        fin = stage(bk, "brnpa_bwd_finish")(x, dw, u, t, inv, nrm, *state[:3], gv)
        return [nrm, inv, score, *state, *fin]

    first = run_all()
    threads = torch.get_num_threads()
    try:
        for n in (1, 3, threads):
            torch.set_num_threads(n)
            assert all(torch.equal(a, b) for a, b in zip(run_all(), first)), f"{n} threads"
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- bad arguments

B, C, H, W, K = 2, 6, 3, 5, 3


def good_args(device):
    g = pc.gen(800)
    x = pc.act(pc.randn((B, C, H, W), g).abs(), F32, "nchw", device)
    nrm, inv, score = ref.brnpa_prepare(x, False, NORM_EPS)
    idx, s, total, vectors, maps = empty_state(x, K)
    idx[:] = torch.tensor([0, H * W - 1, 4])
    dw, u, t, gv = grads(x, K, 801, True)
    return dict(x=x, paper=False, eps=NORM_EPS, inv=inv, score=score, j=1, idx=idx, s=s,
                total=total, vectors=vectors, maps=maps, nrm=nrm, dw=dw, u=u, t=t, gv=gv)


SIGS = {"prepare": ("x", "paper", "eps"),
        "part": ("x", "inv", "score", "j", "paper", "idx", "s", "total", "vectors", "maps"),
        "bwd_finish": ("x", "dw", "u", "t", "inv", "nrm", "idx", "s", "total", "gv")}


def more(dim):  # one more along ``dim``
    return lambda t: torch.cat([t, t.narrow(dim, 0, 1)], dim)


def fewer(dim):  # one fewer along ``dim``
    return lambda t: t.narrow(dim, 0, t.shape[dim] - 1).contiguous()


def to(where):
    return lambda t: t.to(where)


def transposed(t):  # same shape, the last two dims' strides swapped
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def bad(op, arg, fn, **more_spoils):
    return pytest.param(op, arg, {arg: fn, **more_spoils}, id=f"{op}-{arg}")


# Wrong shapes, every backend: the error names the argument.
SHAPE_BAD = [
    *[bad(op, "x", lambda t: t[0]) for op in SIGS],
    bad("part", "inv", lambda t: t.flatten(1)),
    bad("part", "score", more(2)),
    bad("part", "idx", lambda t: t[:, 0].contiguous()),
    bad("part", "idx", more(0)),
    bad("part", "s", fewer(1)),
    bad("part", "s", more(3)),
    bad("part", "total", more(1)),
    bad("part", "vectors", more(2)),
    bad("part", "vectors", fewer(1)),
    bad("part", "maps", lambda t: t.flatten(2)),
    bad("bwd_finish", "dw", fewer(1)),
    bad("bwd_finish", "u", more(2)),
    bad("bwd_finish", "t", lambda t: t[:, None]),
    bad("bwd_finish", "inv", more(1)),
    bad("bwd_finish", "nrm", lambda t: t.flatten(1)),
    bad("bwd_finish", "idx", more(0)),
    bad("bwd_finish", "s", more(1)),
    bad("bwd_finish", "total", fewer(1)),
    bad("bwd_finish", "gv", fewer(2)),
]
# The C++ kernels' other checks: dtypes, layouts, contiguity, ranges.
CPU_BAD = [
    *[bad(op, "x", fn) for op in SIGS for fn in (to(torch.int32), lambda t: t.transpose(2, 3))],
    bad("part", "inv", to(F64)),
    bad("part", "score", transposed),
    bad("part", "j", lambda j: K),
    bad("part", "j", lambda j: -1),
    bad("part", "idx", to(torch.int32)),
    bad("part", "idx", lambda t: t.t().contiguous().t()),
    bad("part", "s", to(F64)),
    bad("part", "total", transposed),
    bad("part", "vectors", to(F64)),
    bad("part", "vectors", to(BF16)),
    bad("part", "maps", to(F16)),
    bad("part", "maps", transposed),
    bad("bwd_finish", "dw", to(F64)),
    bad("bwd_finish", "idx", lambda t: torch.full_like(t, H * W)),
    bad("bwd_finish", "idx", lambda t: torch.full_like(t, -1)),
    bad("bwd_finish", "idx", to(torch.int32)),
    bad("bwd_finish", "gv", transposed),
    bad("bwd_finish", "gv", to(BF16)),
    bad("bwd_finish", "total", to(F64)),
    bad("prepare", "x", lambda t: t.to(F64)[..., ::2]),
]
# the C++ kernels' messages start with the name; other backends must name it
NAMING = {"cpu": r"(^|\s){}: expected", "cuda": r"\b{}\b", "triton": r"\b{}\b"}


def run_bad(bk, op, arg, spoil):
    args = good_args(bk.device)
    for name, fn in spoil.items():
        args[name] = fn(args[name])
    with pytest.raises((RuntimeError, ValueError, TypeError, IndexError),
                       match=NAMING[bk.name].format(arg)):
        stage(bk, "brnpa_" + op)(*[args[a] for a in SIGS[op]])


@pytest.mark.parametrize("bk", on())
@pytest.mark.parametrize("op,arg,spoil", SHAPE_BAD)
def test_wrong_shapes_name_the_argument(bk, op, arg, spoil):
    run_bad(bk, op, arg, spoil)


@pytest.mark.parametrize("bk", on("cpu"))
@pytest.mark.parametrize("op,arg,spoil", CPU_BAD)
def test_bad_arguments_name_the_argument(bk, op, arg, spoil):
    run_bad(bk, op, arg, spoil)


@pytest.mark.parametrize("bk", on("cpu"))
def test_low_precision_x_writes_its_own_dtype(bk):
    """vectors and maps in x's dtype, s and total in float32, for a bfloat16 x."""
    args = good_args("cpu")
    x = args["x"].to(BF16)
    _, inv, score = ref.brnpa_prepare(x, False, NORM_EPS)
    state = empty_state(x, K)
    assert state[3].dtype == BF16 and state[1].dtype == F32
    stage(bk, "brnpa_part")(x, inv, score, 0, False, *state)
    with pytest.raises(RuntimeError, match=r"vectors: expected dtype BFloat16"):
        stage(bk, "brnpa_part")(x, inv, score, 1, False, *state[:3], state[3].float(),
                                state[4])
