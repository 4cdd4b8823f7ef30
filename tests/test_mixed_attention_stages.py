"""Mixed-attention stage ops (issue 16) against their contract,
``manet_kernels.reference.stages``, evaluated on the same inputs, for every backend that
has them: ``cpu`` (the C++ ops ``manet_kernels::_mixed_attention_<stage>`` on CPU
tensors), ``cuda`` (the same ops on CUDA tensors) and ``triton``
(``manet_kernels.triton.mixed_attention_stages.mixed_attention_<stage>``; a case is skipped
while that module has no such function).

How an output is judged (``check_bounded``): a stage is sums and products, then perhaps a
sigmoid, so its error is bounded by ``SUM_ULPS`` ulps of the accumulation dtype times the
same computation on the terms' absolute values (``bound``, the rule of
``passes_common.assert_sum_close``), times the Lipschitz constant of what follows (1/4
for a sigmoid), plus a few ulps of the value itself. Maxima and indices match exactly;
running statistics stored in a narrower dtype may differ by one ulp of it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import passes_common as pc
import pytest
import torch
import torch.nn.functional as F

from manet_kernels import _ext
from manet_kernels.reference import passes as ref_passes
from manet_kernels.reference import stages as ref

OP, KERNEL = "mixed_attention", "mixed_attention_channel_attn"
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
TRITON_GPU = pc.HAS_GPU and not pc.Backend("triton", OP, KERNEL).interpreting
triton_gpu_only = pytest.mark.skipif(not TRITON_GPU, reason="bf16 is GPU-only under Triton")
pytestmark = pytest.mark.usefixtures("no_tf32")

# The stages, each with its arguments (names as in the schemas).
SIGS = {
    "channel_attn": ("x", "w1", "b1", "w2", "b2"),
    "spatial_attn": ("x", "mc", "conv_w", "conv_b", "bn_weight", "bn_bias", "bn_mean", "bn_var",
                     "eps", "batch_norm"),
    "spatial_norm": ("z", "bn_weight", "bn_bias", "running_mean", "running_var",
                     "num_batches_tracked", "momentum", "eps"),
    "spatial_norm_bwd": ("dms", "gms", "ms", "z", "stats", "bn_weight", "has_bias", "eps"),
    "spatial_attn_bwd": ("d", "gms", "ms", "z", "sa", "sm", "conv_w", "has_conv_bias",
                         "bn_weight", "has_bn_bias", "bn_mean", "bn_var", "eps"),
    "channel_attn_bwd": ("x", "da_s", "dm_s", "ic", "dmc", "gmc", "mc", "avg", "mx", "w1", "b1",
                         "w2", "has_b2"),
}


@dataclass(frozen=True)
class Case:
    """x's shape, the MLP's hidden width C_r and the conv's k."""
    shape: tuple
    cr: int
    k: int

    def __iter__(self):
        return iter((self.shape, self.cr, self.k))

    def __str__(self):  # the test id
        return f"{pc.shape_id(self.shape)}-cr{self.cr}-k{self.k}"


# odd sizes, C_r = 1 and 3, k = 1, 3, 7 (k > H too)
SHAPES = [Case((2, 5, 3, 7), 1, 3), Case((2, 5, 3, 7), 3, 7), Case((1, 3, 1, 1), 2, 1),
          Case((3, 32, 8, 8), 4, 7)]
TRITON_SHAPES = SHAPES[:3]


def grid(dtypes, shapes, layouts=pc.LAYOUTS):
    return list(itertools.product(dtypes, layouts, shapes))


X_CASES = {  # stages on x: (dtype, layout, (shape, C_r, k))
    "cpu": grid((F32, F64, BF16), SHAPES) + grid((F16,), SHAPES[:1]),
    "cuda": grid((F32, F64, BF16, F16), SHAPES + [Case((4, 64, 14, 14), 16, 7)]),
    "triton": grid((F32, F64), TRITON_SHAPES)
    + [pytest.param(*c, marks=triton_gpu_only) for c in grid((BF16,), TRITON_SHAPES)],
}
MAP_CASES = {  # stages on (N, H, W) maps: (acc dtype, (shape, C_r, k))
    "cpu": list(itertools.product((F32, F64), SHAPES)),
    "cuda": list(itertools.product((F32, F64), SHAPES + [Case((4, 64, 14, 14), 16, 7)])),
    "triton": list(itertools.product((F32, F64), TRITON_SHAPES)),
}
# spatial_norm needs N*H*W > 1 (test_spatial_norm_needs_two_values)
NORM_CASES = {b: [(d, c) for d, c in cases if c.shape[0] * c.shape[2] * c.shape[3] > 1]
              for b, cases in MAP_CASES.items()}

# --------------------------------------------------------------------------- inputs


def stage_inputs(src, shape, cr, k, dtype, layout="nchw"):
    """Every stage argument for x of ``shape`` in ``dtype``: parameters scaled so that
    logits are O(1), maps in (0, 1), BatchNorm variances positive."""
    n, c, h, w = shape
    a = pc.acc_dtype(dtype)

    def nrm(*s, scale=1.0):
        return src.normal(s, a) * scale

    z = nrm(n, h, w, scale=2.0) + 0.5
    stats = torch.stack([z.mean(), z.var(unbiased=False)]) if n else z.new_zeros(2)
    return dict(
        x=src.act(shape, dtype, layout), w1=nrm(cr, c, scale=c ** -0.5), b1=nrm(cr),
        w2=nrm(c, cr, scale=cr ** -0.5), b2=nrm(c), mc=torch.sigmoid(nrm(n, c)),
        conv_w=nrm(1, 2, k, k, scale=(2 * k * k) ** -0.5), conv_b=nrm(1), bn_weight=nrm(1),
        bn_bias=nrm(1), bn_mean=nrm(1), bn_var=src.scale((1,), a) + 0.5, eps=1e-5,
        batch_norm=False, z=z, stats=stats,
        running_mean=nrm(1), running_var=src.scale((1,), a) + 0.5,
        num_batches_tracked=torch.tensor(3, device=src.device), momentum=0.1,
        dms=nrm(n, h, w), d=nrm(n, h, w), gms=nrm(n, h, w), ms=torch.sigmoid(nrm(n, h, w)),
        sa=nrm(n, h, w), sm=nrm(n, h, w), has_conv_bias=True, has_bn_bias=True, has_bias=True,
        da_s=nrm(n, h, w), dm_s=nrm(n, h, w), ic=src.index(c, (n, h, w)), dmc=nrm(n, c),
        gmc=nrm(n, c), avg=nrm(n, c), mx=nrm(n, c), has_b2=True)


def stage_fn(fns, stage):
    """The backend's stage, or a skip while the backend has none."""
    name, backend = f"mixed_attention_{stage}", getattr(fns, "name", None)
    if backend in ("cpu", "cuda") and not _ext.has_kernel(name, backend):
        pytest.skip(f"no C++ {backend} kernel {name}")
    try:
        return getattr(fns, name)
    except AttributeError:
        if backend == "triton":
            pytest.skip("no Triton stage yet")
        raise


def call(fns, stage, args):
    return pc.as_tuple(stage_fn(fns, stage)(*[args[a] for a in SIGS[stage]]))


def absolute(args):
    return {k: v.abs() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in args.items()}


# --------------------------------------------------------------------------- judges


def check_bounded(what, out, exp, bound, lip=1.0):
    """``|out - exp| <= lip * SUM_ULPS * eps * bound + 4 * eps * |exp|`` (eps of the
    accumulation dtype), with ``out`` contiguous in ``exp``'s dtype, shape and device."""
    assert (out.dtype, out.shape, out.device) == (exp.dtype, exp.shape, exp.device), what
    assert out.is_contiguous(), what
    fi = torch.finfo(exp.dtype)
    tol = lip * pc.SUM_ULPS * fi.eps * bound + 4 * fi.eps * exp.abs() + fi.tiny
    pc.assert_all_within((out - exp).abs(), tol, out.numel(), what)


def check_all(what, outs, exps, bounds, names):
    assert len(outs) == len(exps), what
    for name, o, e, b in zip(names, outs, exps, bounds):
        if e.numel() == 0:
            assert (o.shape, o.dtype, o.device) == (e.shape, e.dtype, e.device), name
        else:
            check_bounded(f"{what} {name}", o, e, b)


def abs_mlp(v, a):
    """mlp on absolute values: a bound of the logit's terms."""
    b1 = None if a["b1"] is None else a["b1"].abs()
    b2 = None if a["b2"] is None else a["b2"].abs()
    return F.linear(F.linear(v, a["w1"].abs(), b1), a["w2"].abs(), b2)


def bn_bound(zb, mean, rstd, weight, bias):
    """A bound of ``(z - mean) * rstd * weight + bias``'s terms, from ``zb >= |z|``."""
    a = (zb + mean.abs()) * rstd
    a = a * weight.abs() if weight is not None else a
    return a + bias.abs() if bias is not None else a


# --------------------------------------------------------------------------- forward stages

CHANNEL_VARIANTS = {"b1_b2": (), "no_biases": ("b1", "b2"), "b1_only": ("b2",)}


@pytest.mark.parametrize("variant", list(CHANNEL_VARIANTS))
@pytest.mark.parametrize("backend,dtype,layout,case", pc.backend_params(OP, KERNEL, X_CASES))
def test_channel_attn(backend, dtype, layout, case, variant):
    shape, cr, k = case
    args = stage_inputs(pc.source(backend, 1), shape, cr, k, dtype, layout)
    args.update(dict.fromkeys(CHANNEL_VARIANTS[variant]))
    mc, avg, mx, im = call(backend, "channel_attn", args)
    e_mc, e_avg, e_mx, e_im = call(ref, "channel_attn", args)
    b_avg, b_mx, _ = ref_passes.mixed_attention_channel_pool(args["x"].abs())
    check_bounded("avg", avg, e_avg, b_avg)
    pc.assert_exact(mx, e_mx, "mx")
    pc.assert_exact(im, e_im, "im")
    check_bounded("mc", mc, e_mc, abs_mlp(b_avg, args) + abs_mlp(b_mx, args), lip=0.25)


SPATIAL_VARIANTS = {  # arguments set to None, and batch_norm
    "conv_b": (("bn_mean", "bn_var"), False),
    "no_conv_b": (("conv_b", "bn_mean", "bn_var"), False),
    "bn_affine": ((), False),
    "bn_no_affine": (("bn_weight", "bn_bias", "conv_b"), False),
    "bn_weight_only": (("bn_bias",), False),
    "batch_norm": ((), True),
}


@pytest.mark.parametrize("variant", list(SPATIAL_VARIANTS))
@pytest.mark.parametrize("backend,dtype,layout,case", pc.backend_params(OP, KERNEL, X_CASES))
def test_spatial_attn(backend, dtype, layout, case, variant):
    shape, cr, k = case
    args = stage_inputs(pc.source(backend, 2), shape, cr, k, dtype, layout)
    nones, batch_norm = SPATIAL_VARIANTS[variant]
    args.update(dict.fromkeys(nones), batch_norm=batch_norm)
    out = call(backend, "spatial_attn", args)
    exp = call(ref, "spatial_attn", args)
    a = absolute(args)
    b_sa, b_sm, _ = ref_passes.mixed_attention_spatial_pool(a["x"], a["mc"])
    b_z = ref_passes.mixed_attention_spatial_conv(b_sa, b_sm, a["conv_w"], a["conv_b"])
    check_bounded("sa", out[2], exp[2], b_sa)
    pc.assert_exact(out[3], exp[3], "sm")
    pc.assert_exact(out[4], exp[4], "ic")
    check_bounded("z", out[1], exp[1], b_z)
    if batch_norm:
        assert out[0].shape == (0,) and out[0].dtype == exp[1].dtype
        return
    b_a = b_z
    if args["bn_mean"] is not None:
        rstd = torch.rsqrt(args["bn_var"] + args["eps"])
        b_a = bn_bound(b_z, args["bn_mean"], rstd, args["bn_weight"], args["bn_bias"])
    check_bounded("ms", out[0], exp[0], b_a, lip=0.25)


NORM_VARIANTS = {  # arguments set to None
    "affine": (), "no_affine": ("bn_weight", "bn_bias"), "weight_only": ("bn_bias",),
    "no_running": ("running_mean", "running_var"),
    "no_counter": ("num_batches_tracked",), "nothing_tracked": (
        "running_mean", "running_var", "num_batches_tracked", "bn_bias"),
}
RUNNING_DTYPES = {"cpu": (F32, F64, BF16, F16), "cuda": (F32, F64, BF16, F16),
                  "triton": (F32, F64, F16)}


def check_norm(backend, args, running_dtype):
    """spatial_norm of ``backend`` and of the contract, each on its own clones of the
    running statistics: outputs and in-place updates."""
    def fresh():
        out = dict(args)
        for name in ("running_mean", "running_var"):
            if args[name] is not None:
                out[name] = args[name].to(running_dtype)
        if args["num_batches_tracked"] is not None:
            out["num_batches_tracked"] = args["num_batches_tracked"].clone()
        return out

    mine, theirs = fresh(), fresh()
    ms, stats = call(backend, "spatial_norm", mine)
    e_ms, e_stats = call(ref, "spatial_norm", theirs)
    z, eps = args["z"], args["eps"]
    n = z.numel()
    mean, var = e_stats[0], e_stats[1]
    b_mean = z.abs().mean()
    b_var = ((z.abs() + mean.abs()) ** 2).mean()
    check_bounded("stats", stats, e_stats, torch.stack([b_mean, b_var]))
    rstd = torch.rsqrt(var + eps)
    # z - mean and rstd carry the statistics' errors too
    b_a = bn_bound(z.abs() + b_mean, mean, rstd * (1 + b_var / (var + eps)), args["bn_weight"],
                   args["bn_bias"])
    check_bounded("ms", ms, e_ms, b_a, lip=0.25)
    if args["num_batches_tracked"] is not None:
        assert torch.equal(mine["num_batches_tracked"], theirs["num_batches_tracked"])
        assert mine["num_batches_tracked"].item() == args["num_batches_tracked"].item() + 1
    if args["running_mean"] is None:
        return
    m = args["momentum"]
    m = 1.0 / theirs["num_batches_tracked"].item() if m is None else m
    for name, new in (("running_mean", b_mean), ("running_var", b_var * n / (n - 1))):
        got, want = mine[name], theirs[name]
        assert got.dtype == running_dtype and got.shape == want.shape, name
        # the update in the accumulation dtype, then one rounding to the running dtype
        bound = abs(1 - m) * args[name].abs() + m * new
        eps_r = max(torch.finfo(running_dtype).eps, torch.finfo(z.dtype).eps)
        tol = pc.SUM_ULPS * torch.finfo(z.dtype).eps * bound + eps_r * want.double().abs()
        pc.assert_all_within((got.double() - want.double()).abs(), tol.double(), 1, name)


@pytest.mark.parametrize("variant,momentum", [  # a cumulative average needs the counter
    pytest.param(v, m, id=f"{v}-{'cumulative' if m is None else 'momentum'}")
    for v, m in itertools.product(NORM_VARIANTS, (0.1, None))
    if m is not None or "num_batches_tracked" not in NORM_VARIANTS[v]])
@pytest.mark.parametrize("backend,dtype,case", pc.backend_params(OP, KERNEL, NORM_CASES))
def test_spatial_norm(backend, dtype, case, variant, momentum):
    shape, cr, k = case
    args = stage_inputs(pc.source(backend, 3), shape, cr, k, dtype)
    args.update(dict.fromkeys(NORM_VARIANTS[variant]), momentum=momentum)
    check_norm(backend, args, dtype)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("backend,dtype,running_dtype", pc.backend_params(OP, KERNEL, {
    b: list(itertools.product((F32, F64), dts)) for b, dts in RUNNING_DTYPES.items()}))
def test_spatial_norm_running_dtypes(backend, dtype, running_dtype, momentum):
    args = stage_inputs(pc.source(backend, 4), (2, 5, 3, 7), 1, 3, dtype)
    args.update(momentum=momentum)
    check_norm(backend, args, running_dtype)


# --------------------------------------------------------------------------- backward stages

NORM_BWD_VARIANTS = {  # arguments set to None, has_bias
    "affine_gms": ((), True), "affine": (("gms",), True), "no_affine": (("bn_weight",), False),
    "bias_only_gms": (("bn_weight",), True), "weight_only": (("gms",), False),
}


@pytest.mark.parametrize("variant", list(NORM_BWD_VARIANTS))
@pytest.mark.parametrize("backend,dtype,case", pc.backend_params(OP, KERNEL, MAP_CASES))
def test_spatial_norm_bwd(backend, dtype, case, variant):
    shape, cr, k = case
    args = stage_inputs(pc.source(backend, 5), shape, cr, k, dtype)
    nones, has_bias = NORM_BWD_VARIANTS[variant]
    args.update(dict.fromkeys(nones), has_bias=has_bias)
    out = call(backend, "spatial_norm_bwd", args)
    exp = call(ref, "spatial_norm_bwd", args)
    # bounds: the backward's terms on absolute values
    z, ms, stats, w = args["z"], args["ms"], args["stats"], args["bn_weight"]
    d = args["dms"].abs() + (0 if args["gms"] is None else args["gms"].abs())
    da = d * ms * (1 - ms)
    rstd = torch.rsqrt(stats[1] + args["eps"])
    zh = (z.abs() + stats[0].abs()) * rstd
    dzh = da * w.abs() if w is not None else da
    b_dz = rstd * (dzh + dzh.mean() + zh * (dzh * zh).mean())
    check_all("spatial_norm_bwd", out, exp, (b_dz, (da * zh).sum(), da.sum()),
              ("dz", "dbn_weight", "dbn_bias"))


ATTN_BWD_VARIANTS = {  # arguments set to None, has_conv_bias, has_bn_bias
    "map_gms": (("bn_mean", "bn_var"), True, True),
    "map": (("gms", "bn_mean", "bn_var", "bn_weight"), False, False),
    "bn_affine": (("gms",), True, True),
    "bn_affine_gms": ((), False, True),
    "bn_no_affine": (("bn_weight",), True, False),
    "z_grad": (("ms", "gms", "bn_mean", "bn_var"), True, True),  # after spatial_norm_bwd
}


@pytest.mark.parametrize("variant", list(ATTN_BWD_VARIANTS))
@pytest.mark.parametrize("backend,dtype,case", pc.backend_params(OP, KERNEL, MAP_CASES))
def test_spatial_attn_bwd(backend, dtype, case, variant):
    shape, cr, k = case
    args = stage_inputs(pc.source(backend, 6), shape, cr, k, dtype)
    nones, has_conv_bias, has_bn_bias = ATTN_BWD_VARIANTS[variant]
    args.update(dict.fromkeys(nones), has_conv_bias=has_conv_bias, has_bn_bias=has_bn_bias)
    out = call(backend, "spatial_attn_bwd", args)
    exp = call(ref, "spatial_attn_bwd", args)
    a = absolute(args)
    if a["bn_mean"] is not None:  # z - mean on absolute values: |z| + |mean|
        a["bn_mean"] = -a["bn_mean"]
    check_all("spatial_attn_bwd", out, exp, call(ref, "spatial_attn_bwd", a),
              ("da_s", "dm_s", "dconv_w", "dconv_b", "dbn_weight", "dbn_bias"))


CHANNEL_BWD_VARIANTS = {  # arguments set to None, has_b2
    "gmc_b1_b2": ((), True), "none": (("gmc", "b1"), False), "b1_only": (("gmc",), False),
    "gmc_b2_only": (("b1",), True),
}


@pytest.mark.parametrize("variant", list(CHANNEL_BWD_VARIANTS))
@pytest.mark.parametrize("backend,dtype,layout,case", pc.backend_params(OP, KERNEL, X_CASES))
def test_channel_attn_bwd(backend, dtype, layout, case, variant):
    shape, cr, k = case
    args = stage_inputs(pc.source(backend, 7), shape, cr, k, dtype, layout)
    nones, has_b2 = CHANNEL_BWD_VARIANTS[variant]
    args.update(dict.fromkeys(nones), has_b2=has_b2)
    out = call(backend, "channel_attn_bwd", args)
    exp = call(ref, "channel_attn_bwd", args)
    # on absolute values every hidden unit is active: a bound of every term
    check_all("channel_attn_bwd", out, exp, call(ref, "channel_attn_bwd", absolute(args)),
              ("d_avg", "d_mx", "dw1", "db1", "dw2", "db2"))


# --------------------------------------------------------------------------- empty batch, errors

EMPTY_CASES = {"cpu": [(F32,), (F64,)], "cuda": [(F32,), (F64,)], "triton": [(F32,)]}


@pytest.mark.parametrize("stage", [s for s in SIGS if s != "spatial_norm"])
@pytest.mark.parametrize("backend,dtype", pc.backend_params(OP, KERNEL, EMPTY_CASES))
def test_empty_batch(backend, dtype, stage):
    args = stage_inputs(pc.source(backend, 8), (0, 5, 3, 7), 3, 3, dtype)
    out, exp = call(backend, stage, args), call(ref, stage, args)
    assert [(o.shape, o.dtype, o.device) for o in out] == \
        [(e.shape, e.dtype, e.device) for e in exp]
    for o, e in zip(out, exp):  # weight gradients: sums of nothing
        if o.numel():
            assert torch.equal(o, e)


@pytest.mark.parametrize("backend", pc.backends(OP, KERNEL, "cpu", "cuda", "triton"))
def test_spatial_norm_needs_two_values(backend):
    args = stage_inputs(pc.source(backend, 9), (1, 5, 1, 1), 1, 1, F32)
    for z in (args["z"][:0], args["z"]):  # 0 and 1 values
        args["z"] = z
        with pytest.raises(ValueError, match=r"^z: expected more than one value"):
            call(backend, "spatial_norm", args)


def good(backend):
    return stage_inputs(pc.Seeded(10, backend.device), (2, 5, 3, 7), 3, 3, F32)


BAD = [  # (stage, argument, how to spoil it, error, what the C++ message says)
    ("channel_attn", "w1", lambda t: t[:, :4], ValueError, r"shape \(C_r, C\)"),
    ("channel_attn", "w1", lambda t: t[0], ValueError, "rank-2"),
    ("channel_attn", "w2", lambda t: t.t(), ValueError, r"shape \(C, C_r\)"),
    ("channel_attn", "b1", lambda t: t[:2], ValueError, r"shape \(C_r,\)"),
    ("channel_attn", "b2", lambda t: t.double(), TypeError, "dtype float32"),
    ("spatial_attn", "mc", lambda t: t[:, :4], ValueError, "shape"),
    ("spatial_attn", "conv_w", lambda t: t[:, :1], ValueError, r"shape \(1, 2, k, k\)"),
    ("spatial_attn", "conv_b", lambda t: t.reshape(()), ValueError, r"shape \(1,\)"),
    ("spatial_attn", "bn_var", lambda t: t.repeat(2), ValueError, r"shape \(1,\)"),
    ("spatial_attn", "bn_var", lambda t: None, ValueError, "when bn_mean is given"),
    ("spatial_norm", "z", lambda t: t[0], ValueError, "rank-3"),
    ("spatial_norm", "bn_weight", lambda t: t.repeat(2), ValueError, r"shape \(1,\)"),
    ("spatial_norm", "running_mean", lambda t: t.repeat(2), ValueError, "one value"),
    ("spatial_norm", "running_var", lambda t: None, ValueError, "when running_mean is given"),
    ("spatial_norm", "num_batches_tracked", lambda t: t.int(), TypeError, "int64"),
    ("spatial_norm_bwd", "ms", lambda t: t[:, :2], ValueError, "shape"),
    ("spatial_norm_bwd", "stats", lambda t: t[:1], ValueError, r"shape \(2,\)"),
    ("spatial_norm_bwd", "dms", lambda t: t.double(), TypeError, "dtype float32"),
    ("spatial_attn_bwd", "sa", lambda t: t[:1], ValueError, "shape"),
    ("spatial_attn_bwd", "conv_w", lambda t: t[..., :2], ValueError, "k odd"),
    ("spatial_attn_bwd", "bn_mean", lambda t: t.double(), TypeError, "dtype float32"),
    ("channel_attn_bwd", "dmc", lambda t: t[:1], ValueError, r"shape \(N, C\)"),
    ("channel_attn_bwd", "avg", lambda t: t.double(), TypeError, "dtype float32"),
    ("channel_attn_bwd", "w2", lambda t: t[:, :1], ValueError, r"shape \(C, C_r\)"),
]


@pytest.mark.parametrize("stage", list(SIGS))
@pytest.mark.parametrize("backend", pc.backends(OP, KERNEL, "cpu", "cuda", "triton"))
def test_bad_arguments_name_the_argument(backend, stage):
    stage_fn(backend, stage)
    checked = 0
    for s, arg, spoil, err, words in BAD:
        if s != stage:
            continue
        args = good(backend)
        args[arg] = spoil(args[arg])
        pattern = rf"^{arg}: expected" + (f" .*{words}" if backend.name == "cpu" else "")
        with pytest.raises(err, match=pattern):
            call(backend, stage, args)
        checked += 1
    assert checked


@pytest.mark.parametrize("backend", pc.backends(OP, KERNEL, "cpu"))
def test_cumulative_average_needs_the_counter(backend):
    args = good(backend)
    args.update(num_batches_tracked=None, momentum=None)
    with pytest.raises(ValueError, match=r"^num_batches_tracked: expected a tensor when momentum"):
        call(backend, "spatial_norm", args)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("layout", pc.LAYOUTS)
@pytest.mark.parametrize("backend", pc.backends(OP, KERNEL, "cpu"))
def test_independent_of_thread_count(backend, layout):
    # Shapes where every stage splits its work over several tasks: the results are
    # bitwise the same with one thread.
    args = stage_inputs(pc.Seeded(11, "cpu"), (16, 256, 32, 32), 64, 7, F32, layout)

    def run():
        out = []
        for stage in SIGS:
            a = dict(args)
            if stage == "spatial_norm":
                a.update(running_mean=args["running_mean"].clone(),
                         running_var=args["running_var"].clone(),
                         num_batches_tracked=args["num_batches_tracked"].clone())
                out += [a["running_mean"], a["running_var"]]
            out += call(backend, stage, a)
        return out

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(threads, 2))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for i, (u, v) in enumerate(zip(one, many)):
        assert torch.equal(u, v), i
