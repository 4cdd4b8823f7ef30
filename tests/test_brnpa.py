"""Fused BR-NPA against the reference port: both outputs and the gradient of x."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_GPU, backends_for, requires_ext, requires_gpu
from helpers import LAYOUTS, LOW_PRECISION, assert_matches, gpu_backend_test, make_x
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import manet_kernels as mk
from manet_kernels import explain, reference
from manet_kernels.reference.brnpa import brnpa as brnpa_ref


def run(fn, x, upstream):
    x = x.detach().requires_grad_()
    v, m = fn(x)
    gv, gm = upstream
    loss = (v.double() * gv).sum() + (m.double() * gm).sum()
    (gx,) = torch.autograd.grad(loss, [x])
    return {"vectors": v, "maps": m, "grad_x": gx}


def check_against_reference(backend, device, dtype, layout, shape, k, variant="official",
                            positive=True):
    x = make_x(shape, dtype, device, layout, positive=positive)
    b, c, h, w = shape
    up = (torch.randn(b, k, c, dtype=torch.float64, device=device),
          torch.randn(b, k, h, w, dtype=torch.float64, device=device))
    out = run(lambda t: mk.brnpa(t, k, variant=variant, backend=backend), x, up)
    ref_dtype = torch.float64 if dtype in LOW_PRECISION else dtype
    ref = run(lambda t: brnpa_ref(t, k, variant=variant), x.to(ref_dtype), up)
    ref_low = (run(lambda t: brnpa_ref(t, k, variant=variant), x, up)
               if dtype in LOW_PRECISION else None)
    assert out["vectors"].dtype == dtype and out["maps"].dtype == dtype
    assert out["grad_x"].dtype == dtype and out["grad_x"].stride() == (
        x.contiguous().stride() if layout == "strided" else x.stride())
    assert_matches(out, ref, ref_low, dtype)


# ops copies a "strided" x to NCHW before any kernel runs: those cases test that copy.
LAYOUT_PARAMS = [pytest.param(lay, id="strided_copied" if lay == "strided" else lay)
                 for lay in LAYOUTS]

# Every shape but (1, 1, 1, 1) has C > 1 and H*W > 1, so channels_last differs from NCHW.
CPU_CASES = [((1, 1, 1, 1), 1), ((2, 3, 1, 7), 3), ((3, 7, 5, 3), 3), ((2, 64, 7, 7), 5),
             ((1, 33, 13, 11), 16)]


@requires_ext
@pytest.mark.parametrize("case", CPU_CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_cpu_matches_reference(case, layout, dtype, variant):
    shape, k = case
    check_against_reference("cpu", "cpu", dtype, layout, shape, k, variant)


@requires_ext
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 4), c=st.integers(1, 40), h=st.integers(1, 10), w=st.integers(1, 10),
       layout=st.sampled_from(LAYOUTS), variant=st.sampled_from(["official", "paper"]),
       data=st.data())
def test_cpu_random_shapes(b, c, h, w, layout, variant, data):
    k = data.draw(st.integers(1, min(h * w, 16)))
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    check_against_reference("cpu", "cpu", torch.float64, layout, (b, c, h, w), k, variant)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in backends_for("cpu") or HAS_GPU,
                    reason="Triton interpreter tests run on CPU-only machines")
@pytest.mark.parametrize("case", [((1, 1, 1, 1), 1), ((2, 3, 3, 5), 3), ((2, 9, 4, 4), 3)],
                         ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_interpreter_matches_reference(case, layout, dtype):
    shape, k = case
    check_against_reference("triton", "cpu", dtype, layout, shape, k)


GPU_CASES = [((1, 1, 1, 1), 1), ((3, 7, 5, 3), 3), ((3, 257, 13, 11), 3), ((2, 2048, 14, 14), 3),
             ((2, 64, 56, 56), 16)]


@gpu_backend_test
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_matches_reference(backend, case, layout, dtype):
    shape, k = case
    check_against_reference(backend, "cuda", dtype, layout, shape, k)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_gpu)])
def test_deterministic(device):
    x = make_x((3, 37, 11, 9), torch.float32, device, "channels_last", positive=True)
    for backend in backends_for(device):
        if backend == "triton" and device == "cpu":
            continue  # covered by the interpreter test below
        outs = [run(lambda t, backend=backend: mk.brnpa(t, 3, backend=backend), x,
                    (torch.ones(3, 3, 37, device=device), torch.ones(3, 3, 11, 9, device=device)))
                for _ in range(2)]
        for key in outs[0]:
            assert torch.equal(outs[0][key], outs[1][key]), (backend, key)


@requires_ext
@pytest.mark.parametrize("signed", [False, True], ids=["positive", "signed"])
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_gradcheck_cpu(variant, signed):
    """Signed features too: the backward leaves out docs/design.md's
    -(sum_i ds_i s_i) r / (nrm_r ||r||), which is identically 0 (ops/brnpa.py)."""
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    x = (x if signed else x.abs().add(0.1)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: mk.brnpa(t, 3, variant=variant, backend="cpu"), (x,))


@requires_ext
def test_opcheck_cpu():
    x = torch.randn(2, 6, 5, 3).abs() + 0.1
    for t in (x, x.contiguous(memory_format=torch.channels_last), x.clone().requires_grad_()):
        for paper in (False, True):
            torch.library.opcheck(torch.ops.manet_kernels.brnpa.default, (t, 3, paper, "cpu"))


@requires_ext
@pytest.mark.parametrize("head", [False, True], ids=["BRNPA", "BRNPAHead"])
def test_compile_fullgraph_module(head):
    """Inductor (the default backend), fullgraph, against the reference module."""
    torch._dynamo.reset()
    if head:
        fused, ref = mk.nn.BRNPAHead(8, 5, n_parts=3, backend="cpu"), reference.BRNPAHead(8, 5)
    else:
        fused, ref = mk.nn.BRNPA(3, backend="cpu"), reference.BRNPA(3)
    ref.load_state_dict(fused.state_dict())
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 8, 6, 5).abs().add(0.1).requires_grad_()
    kw = dict(return_maps=True) if head else {}
    out, maps = compiled(x, **kw)
    out_r, maps_r = ref(x, **kw)
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(maps, maps_r)
    params, params_r = [x, *fused.parameters()], [x, *ref.parameters()]
    grads = torch.autograd.grad(out.sum() + maps.square().sum(), params)
    grads_r = torch.autograd.grad(out_r.sum() + maps_r.square().sum(), params_r)
    for g, g_r in zip(grads, grads_r):
        torch.testing.assert_close(g, g_r)


@requires_ext
def test_autograd_function_dropin():
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64).abs().add(0.1).requires_grad_()
    v, m = mk.BRNPAFunction.apply(x, 3, "official")
    v_r, m_r = brnpa_ref(x, 3)
    torch.testing.assert_close(v, v_r)
    torch.testing.assert_close(m, m_r)
    g = torch.autograd.grad(v.sum() + m.square().sum(), x)[0]
    g_r = torch.autograd.grad(v_r.sum() + m_r.square().sum(), x)[0]
    torch.testing.assert_close(g, g_r)


@requires_ext
def test_module_and_head_match_reference():
    head = mk.nn.BRNPAHead(16, 7, n_parts=4, variant="paper", backend="cpu")
    ref = reference.BRNPAHead(16, 7, n_parts=4, variant="paper")
    assert list(head.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(head.state_dict())
    x = torch.randn(3, 16, 6, 6).abs() + 0.1
    torch.testing.assert_close(head(x), ref(x))
    v, m = mk.nn.BRNPA(2, backend="cpu")(x)
    assert v.shape == (3, 2, 16) and m.shape == (3, 2, 6, 6)


@requires_ext
def test_zero_vectors_and_equal_scores_follow_reference():
    """All-equal scores pick the first position; an all-zero feature vector gets a
    finite gradient (the norm's derivative is taken as 0 there, in the reference too)."""
    x = torch.ones(1, 5, 3, 3, dtype=torch.float64)
    x[0, :, 1, 1] = 0.0
    up = (torch.randn(1, 2, 5, dtype=torch.float64), torch.randn(1, 2, 3, 3, dtype=torch.float64))
    out = run(lambda t: mk.brnpa(t, 2, backend="cpu"), x, up)
    ref = run(lambda t: brnpa_ref(t, 2), x, up)
    for key in out:
        torch.testing.assert_close(out[key], ref[key])
        assert torch.isfinite(out[key]).all(), key


# --------------------------------------------------------------------------- #
# Parts whose similarities sum to exactly 0 get weights 0 (issue 12.5).

def zero_sum_features(case, dtype=torch.float64, device="cpu"):
    """``(x, mask)``: ``x = t * mask`` with ``t`` positive, so the masked-out feature
    vectors are exactly 0 whatever ``t`` is (gradcheck perturbs only ``t``).
    "later_part": sample 0 has one non-zero position, so after it a part's
    representative is an all-zero vector (official: part 3, paper: parts 2 and 3);
    sample 1 is ordinary. "zero_sample": sample 1 is all zeros. "opposite": sample 0
    holds f and -f (integers: every dot product exact), so S = s - s = 0 with s != 0
    in every part."""
    t = torch.rand(2, 4, 3, 3, dtype=torch.float64) + 0.5
    mask = torch.ones_like(t)
    if case == "later_part":
        mask[0] = 0
        mask[0, :, 1, 2] = 1
    elif case == "zero_sample":
        mask[1] = 0
    else:
        t[0] = 0
        t[0, :, 0, 1] = torch.tensor([1.0, 2.0, 0.0, 3.0])
        t[0, :, 2, 0] = -t[0, :, 0, 1]
    return t.to(device=device, dtype=dtype), mask.to(device=device, dtype=dtype)


# (case, variant) -> [sample][part]: does that part's similarities sum to 0?
ZERO_SUM_PARTS = {
    ("later_part", "official"): [[0, 0, 1], [0, 0, 0]],
    ("later_part", "paper"): [[0, 1, 1], [0, 0, 0]],
    ("zero_sample", "official"): [[0, 0, 0], [1, 1, 1]],
    ("zero_sample", "paper"): [[0, 0, 0], [1, 1, 1]],
    ("opposite", "official"): [[1, 1, 1], [0, 0, 0]],
    ("opposite", "paper"): [[1, 1, 1], [0, 0, 0]],
}


def authors_brnpa(x, k, variant):
    """The reference as it was before issue 12.5 (the authors' w = s / sum(s), 0/0
    included, s / 0 too): the bits that every part with a non-zero sum must keep."""
    b, c, h, w = x.shape
    f = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    norm = torch.linalg.vector_norm(f, dim=-1) + 1e-5
    score = norm.clone() if variant == "official" else f.pow(2).sum(-1)
    rows, maps, vectors = torch.arange(b), [], []
    for _ in range(k):
        ind = score.argmax(1)
        sim = (f * f[rows, ind][:, None]).sum(-1) / (norm * norm[rows, ind][:, None])
        wgt = sim / sim.sum(1, keepdim=True)
        vectors.append((f * wgt[..., None]).sum(1))
        score = score * (1 - (sim if variant == "official" else wgt))
        maps.append(wgt.reshape(b, h, w))
    return torch.stack(vectors, 1), torch.stack(maps, 1)


def zero_sum_backends():
    out = [("cpu", b) for b in backends_for("cpu")]
    return out + [pytest.param("cuda", b, marks=requires_gpu) for b in ("cuda", "triton")]


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("case", ["later_part", "zero_sample", "opposite"])
def test_reference_zero_sum_part_has_zero_weights_and_keeps_other_bits(case, variant):
    x, mask = zero_sum_features(case)
    x = (x * mask).requires_grad_()
    v, m = brnpa_ref(x, 3, variant=variant)
    v_a, m_a = authors_brnpa(x.detach(), 3, variant)
    zero = torch.tensor(ZERO_SUM_PARTS[case, variant], dtype=torch.bool)
    assert torch.equal(m[zero], torch.zeros_like(m[zero]))
    assert torch.equal(v[zero], torch.zeros_like(v[zero]))
    assert not torch.isfinite(m_a[zero]).any()  # 0/0, or +-s/0 for "opposite"
    assert torch.equal(m[~zero], m_a[~zero]) and torch.equal(v[~zero], v_a[~zero])
    (g,) = torch.autograd.grad((v * torch.randn_like(v)).sum() + (m * torch.randn_like(m)).sum(), x)
    assert torch.isfinite(g).all()
    if case == "zero_sample":
        assert torch.equal(g[1], torch.zeros_like(g[1]))


@pytest.mark.parametrize("device,backend", zero_sum_backends())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("case", ["later_part", "zero_sample", "opposite"])
def test_zero_sum_part_matches_reference(case, variant, dtype, layout, device, backend):
    if device == "cuda" and backend not in backends_for("cuda"):
        pytest.skip(f"backend {backend} not available")
    x, mask = zero_sum_features(case, dtype, device)
    x = x * mask
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    up = (torch.randn(2, 3, 4, dtype=torch.float64, device=device),
          torch.randn(2, 3, 3, 3, dtype=torch.float64, device=device))
    out = run(lambda t: mk.brnpa(t, 3, variant=variant, backend=backend), x, up)
    ref = run(lambda t: brnpa_ref(t, 3, variant=variant), x, up)
    zero = torch.tensor(ZERO_SUM_PARTS[case, variant], dtype=torch.bool, device=device)
    for key in out:
        assert torch.isfinite(out[key]).all(), key
    assert torch.equal(out["maps"][zero], torch.zeros_like(out["maps"][zero]))
    assert torch.equal(out["vectors"][zero], torch.zeros_like(out["vectors"][zero]))
    assert_matches(out, ref, None, dtype)


@requires_ext
@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("case", ["later_part", "zero_sample"])
def test_gradcheck_cpu_zero_sum_part(case, variant):
    """Exact gradients through the other parts and samples, and the zero gradient of a
    part with weights 0 (its similarities stay exactly 0 under the perturbation)."""
    t, mask = zero_sum_features(case)
    t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda u: mk.brnpa(u * mask, 3, variant=variant, backend="cpu"), (t,))


@requires_ext
def test_empty_batch():
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    v, m = mk.brnpa(x, 2, backend="cpu")
    assert v.shape == (0, 2, 4) and m.shape == (0, 2, 3, 3)
    (v.sum() + m.sum()).backward()
    assert x.grad.shape == x.shape


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="x must be 4-D"):
        mk.brnpa(x[0])
    with pytest.raises(ValueError, match=r"n_parts must be in \[1, H\*W=9\]"):
        mk.brnpa(x, 0)
    with pytest.raises(ValueError, match=r"n_parts must be in \[1, H\*W=9\]"):
        mk.brnpa(x, 10)
    with pytest.raises(TypeError, match="n_parts must be an int"):
        mk.brnpa(x, 2.5)
    with pytest.raises(ValueError, match="variant must be one of"):
        mk.brnpa(x, 2, variant="other")
    with pytest.raises(TypeError, match="x must be a floating-point"):
        mk.brnpa(x.long(), 2, backend="reference")
    with pytest.raises(ValueError, match="n_parts must be >= 1"):
        mk.nn.BRNPA(0)


def test_explain_rgb_and_sparsity():
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 0, 0, 0] = maps[0, 1, 0, 1] = maps[0, 2, 1, 0] = 1.0
    norms = torch.tensor([[[2.0, 1.0], [2.0, 0.0]]])
    img = explain.brnpa_rgb(maps, norms)
    assert img.shape == (1, 2, 2, 3) and img.dtype.name == "uint8"
    assert img[0, 0, 0].tolist() == [255, 0, 0]      # part 1 red, full brightness
    assert img[0, 0, 1].tolist() == [0, 128, 0]      # part 2 green, half the norm
    assert img[0, 1, 0].tolist() == [0, 0, 255]
    assert img[0, 1, 1].tolist() == [0, 0, 0]
    assert explain.brnpa_rgb(maps[0], norms[0]).shape == (2, 2, 3)
    # average map * norm = [2/3, 1/3, 2/3, 0]: max / mean = (2/3) / (5/12)
    torch.testing.assert_close(explain.sparsity(maps, norms), torch.tensor([1.6]))
    with pytest.raises(ValueError, match="norms must be"):
        explain.sparsity(maps, norms[:, :1])
