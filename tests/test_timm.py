"""convert() on real timm models: timm's CbamModule on the fused mixed-attention op and
CondConv2d on per_sample_conv2d, against timm's own modules (outputs, input and parameter
gradients, BatchNorm running statistics), train and eval, NCHW and channels_last; what is
skipped and why; checkpoints; torch.compile; create("timm:<name>").

fp32 comparisons run the converted model, timm's model and a float64 copy of timm's on
the same weights and input: the converted model's error against float64 must be at most
twice timm's own fp32 error plus 1e-6 of the quantity's scale (tests/test_models.py's
rule: fp32 conditioning varies by orders of magnitude between quantities, so a fixed
tolerance would be either loose or flaky). Whole models in training mode are compared in
float64 (within 1e-10 of the scale): at 32x32 their last stages end on 1x1 maps, where a
training-mode BatchNorm normalises 2 values per channel and amplifies rounding by orders
of magnitude (timm's own fp32 error reached 2% of the output there, measured), and at
8x3x64x64 an fp32 run flipped a near-tie of a spatial max (top two values 2.4e-7 apart,
upstream rounding differing by 1e-5) between the two models, sending that gradient to
another position (measured, resnet18, layer3.1): a max's gradient is discontinuous, so a
whole-model fp32 training comparison tests near-ties, not the kernels. The modules
themselves are compared in fp32 in training mode. Every comparison covers the output, the
input's gradient, every parameter's gradient and every buffer (BatchNorm running
statistics, num_batches_tracked). Inputs are tiny (2x3x32x32); BatchNorm parameters and
statistics are randomised so that no block starts as an identity (timm zero-initialises
the last BN of each residual block, which would feed CBAM zeros).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manet_kernels
from manet_kernels import models as M

timm = pytest.importorskip("timm")
from timm.layers import cbam as timm_cbam  # noqa: E402
from timm.layers import cond_conv2d as timm_condconv  # noqa: E402

from manet_kernels.models import from_timm  # noqa: E402

requires_ext = pytest.mark.skipif(not manet_kernels._ext.HAS_EXT,
                                  reason="the fused CPU kernels need the C++ extension")
HAS_GPU = torch.cuda.is_available()
CBAM = dict(block_args=dict(attn_layer="cbam"))
K = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def _timm_pair(name: str, **kwargs):
    """(converted, timm's) on the same weights."""
    ref = _randomize_bn(timm.create_model(name, num_classes=K, **kwargs))
    conv = copy.deepcopy(ref)
    M.convert(conv)
    return conv, ref


def _leaves(inputs, dtype=None, channels_last=False):
    out = []
    for t in inputs:
        t = t.to(dtype) if dtype is not None else t.clone()
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t.detach().requires_grad_())
    return out


def _fwd_bwd(model, inputs, target):
    out = model(*inputs)
    if target is None:
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    else:
        F.cross_entropy(out, target).backward()
    return out


def _errors(model, exact, out, out_exact, inputs, inputs_exact):
    errs = {"output": ((out.double() - out_exact).abs().max().item(),
                       out_exact.abs().max().item())}
    for i, (a, b) in enumerate(zip(inputs, inputs_exact)):
        errs[f"grad of input {i}"] = ((a.grad.double() - b.grad).abs().max().item(),
                                      b.grad.abs().max().item())
    grads = dict(exact.named_parameters())
    gscale = max(p.grad.abs().max().item() for p in grads.values())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        errs[f"grad of {name}"] = ((p.grad.double() - grads[name].grad).abs().max().item(),
                                   gscale)
    bufs = dict(exact.named_buffers())
    for name, b in model.named_buffers():
        if b.is_floating_point():
            errs[f"buffer {name}"] = ((b.double() - bufs[name]).abs().max().item(),
                                      bufs[name].abs().max().item())
        else:
            assert torch.equal(b, bufs[name]), name  # num_batches_tracked
    return errs


def _compare(conv, ref, inputs, *, train: bool, channels_last: bool = False,
             target=None, floor: float = 1e-6):
    """Converted vs timm's, each against a float64 copy of timm's (see the docstring)."""
    exact = copy.deepcopy(ref).double()
    for m in (conv, ref, exact):
        m.train(train)
    if channels_last:
        conv.to(memory_format=torch.channels_last)
        ref.to(memory_format=torch.channels_last)
    in_e, in_c, in_r = (_leaves(inputs, torch.float64), _leaves(inputs, None, channels_last),
                        _leaves(inputs, None, channels_last))
    out_e = _fwd_bwd(exact, in_e, target)
    out_c = _fwd_bwd(conv, in_c, target)
    out_r = _fwd_bwd(ref, in_r, target)
    err_c = _errors(conv, exact, out_c, out_e, in_c, in_e)
    err_r = _errors(ref, exact, out_r, out_e, in_r, in_e)
    for key, (e, scale) in err_c.items():
        own = err_r[key][0]
        assert e <= 2 * own + floor * max(1.0, scale), \
            f"{key}: error {e:.3g} against float64, timm's own {own:.3g} (scale {scale:.3g})"
    return out_c


def _compare64(conv, ref, inputs, *, train: bool, channels_last: bool = False, target=None):
    """Converted vs timm's, both in float64: within 1e-10 of each quantity's scale."""
    conv.double().train(train), ref.double().train(train)
    if channels_last:
        conv.to(memory_format=torch.channels_last)
        ref.to(memory_format=torch.channels_last)
    in_c = _leaves(inputs, torch.float64, channels_last)
    in_r = _leaves(inputs, torch.float64, channels_last)
    out_c, out_r = _fwd_bwd(conv, in_c, target), _fwd_bwd(ref, in_r, target)
    for key, (e, scale) in _errors(conv, ref, out_c, out_r, in_c, in_r).items():
        assert e <= 1e-10 * max(1.0, scale), f"{key}: error {e:.3g} (scale {scale:.3g})"


def _count(model, cls):
    return sum(type(m) is cls for m in model.modules())


# ------------------------------------------------------------------------ CBAM ResNets

@requires_ext
def test_resnet18_cbam_every_module_converted_outputs_and_gradients_match_timm():
    ref = _randomize_bn(timm.create_model("resnet18", num_classes=K, **CBAM))
    conv = copy.deepcopy(ref)
    params = {n: p for n, p in conv.named_parameters()}
    keys = list(conv.state_dict())
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)  # made before the conversion
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing warned
        report = M.convert(conv, summary=True)
    assert report.model is conv and report.skipped == []
    assert len(report.converted) == 8
    assert _count(conv, timm_cbam.CbamModule) == 0
    assert _count(conv, from_timm.CbamModule) == 8 == _count(ref, timm_cbam.CbamModule)
    assert all(p is params[n] for n, p in conv.named_parameters())  # the very same tensors
    assert list(conv.state_dict()) == keys
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    _compare(conv, ref, [x], train=False, target=target)
    conv.zero_grad(), ref.zero_grad()
    _compare64(conv, ref, [x], train=True, target=target)
    # the optimizer made before the conversion steps the converted module's weights
    w = conv.layer1[0].se.channel.fc1.weight
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(w, before)


@requires_ext
@pytest.mark.parametrize("train", [True, False], ids=["train_fp64", "eval_fp32"])
def test_resnet10t_cbam_channels_last_matches_timm(train):
    conv, ref = _timm_pair("resnet10t", **CBAM)
    assert _count(conv, from_timm.CbamModule) == 4
    compare = _compare64 if train else _compare
    compare(conv, ref, [torch.randn(2, 3, 32, 32)], train=train, channels_last=True,
            target=torch.tensor([0, 4]))


@requires_ext
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cbam_module_configs_match_timm(channels_last):
    """fp32, train mode: the default module, mlp_bias with another kernel size,
    rd_channels with another, cumulative BN momentum, a BN without running statistics."""
    cases = [dict(), dict(mlp_bias=True, spatial_kernel_size=3),
             dict(rd_channels=3, spatial_kernel_size=5)]
    for kw in cases:
        ref = _randomize_bn(timm_cbam.CbamModule(12, **kw))
        conv = M.convert(copy.deepcopy(ref))
        assert type(conv) is from_timm.CbamModule
        _compare(conv, ref, [torch.randn(2, 12, 7, 5)], train=True,
                 channels_last=channels_last)
    ref = _randomize_bn(timm_cbam.CbamModule(12))
    ref.spatial.conv.bn.momentum = None
    conv = M.convert(copy.deepcopy(ref))
    for _ in range(2):  # the cumulative average counts batches
        conv.load_state_dict(ref.state_dict())
        conv.zero_grad(), ref.zero_grad()
        _compare(conv, ref, [torch.randn(2, 12, 6, 6)], train=True)
    ref = timm_cbam.CbamModule(12)
    ref.spatial.conv.bn = nn.BatchNorm2d(1, track_running_stats=False)
    conv = M.convert(copy.deepcopy(ref))
    _compare(conv, ref, [torch.randn(2, 12, 6, 6)], train=False)


@requires_ext
def test_reference_restores_timm_and_backend_reference_runs_timm():
    ref = _randomize_bn(timm.create_model("resnet10t", num_classes=K, **CBAM)).eval()
    conv = copy.deepcopy(ref)
    M.convert(conv, backend="reference")  # fused classes, timm's forward
    assert _count(conv, from_timm.CbamModule) == 4
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(conv(x), ref(x))
    M.convert(conv, kernels="reference")
    assert _count(conv, timm_cbam.CbamModule) == 4 and _count(conv, from_timm.CbamModule) == 0
    assert all("backend" not in m.__dict__ for m in conv.modules())
    assert torch.equal(conv(x), ref(x))


def test_checkpoints_round_trip_through_timm(tmp_path):
    """A converted model's state_dict is a timm checkpoint (timm's own loader reads it)
    and a timm checkpoint loads into a converted model, before or after conversion."""
    ref = _randomize_bn(timm.create_model("resnet10t", num_classes=K, **CBAM)).eval()
    path = tmp_path / "timm.pth"
    torch.save(ref.state_dict(), path)
    conv = M.convert(timm.create_model("resnet10t", num_classes=K, **CBAM))
    conv.load_state_dict(torch.load(path, weights_only=True))  # strict: same keys
    conv.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = ref(x)
    torch.testing.assert_close(conv(x), expected)
    path2 = tmp_path / "converted.pth"
    torch.save(conv.state_dict(), path2)
    back = timm.create_model("resnet10t", num_classes=K, checkpoint_path=str(path2), **CBAM)
    assert torch.equal(back.eval()(x), expected)
    buf = io.BytesIO()  # a whole converted model pickles and unpickles
    torch.save(conv, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert _count(again, from_timm.CbamModule) == 4
    torch.testing.assert_close(again(x), expected)


def _step_results(model, x, target):
    x = x.clone().requires_grad_()
    out = model(x)
    F.cross_entropy(out, target).backward()
    return [out, x.grad] + [p.grad for p in model.parameters()] + list(model.buffers())


@requires_ext
def test_compile_converted_model():
    """A converted CBAM ResNet traces whole (fullgraph: no graph break around the fused
    ops, BN running-statistics update included) through AOTAutograd and matches eager
    (training step: output, every gradient, every buffer); Inductor compiles a converted
    CbamModule and CondConv2d (a whole ResNet under Inductor takes minutes on 2 cores)."""
    conv, _ = _timm_pair("resnet10t", **CBAM)
    twin = copy.deepcopy(conv)
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for got, want in zip(_step_results(compiled, x, target), _step_results(conv, x, target)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    cbam = _randomize_bn(M.convert(timm_cbam.CbamModule(16)))
    cc = M.convert(timm_condconv.CondConv2d(16, 8, 3, num_experts=2, padding="same"))
    for mod, inputs in ((cbam, [torch.randn(2, 16, 6, 5)]),
                        (cc, [torch.randn(2, 16, 6, 5), _routing(2, 2)])):
        twin = copy.deepcopy(mod)
        res = []
        for m in (torch.compile(twin, fullgraph=True), mod):
            ins = _leaves(inputs)
            _fwd_bwd(m, ins, None)
            res.append([t.grad for t in ins] + [p.grad for p in m.parameters()]
                       + list(m.buffers()))
        for got, want in zip(*res):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- CondConv

def _routing(n, experts):
    return torch.sigmoid(torch.randn(n, experts))


@requires_ext
@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, padding=""),                                  # static k//2
    dict(kernel_size=3, stride=2, padding="same", bias=True),         # dynamic 'same'
    dict(kernel_size=5, groups=6, padding="", bias=True),             # depthwise
], ids=["static", "same_stride2_bias", "depthwise_bias"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_condconv2d_matches_timm(kw, channels_last, monkeypatch):
    # these check the wiring: a direct conv, as timm's (the CPU Winograd path, a lower
    # precision class, is held to its own bound in tests/test_models.py)
    monkeypatch.setenv("MANET_KERNELS_AW_CPU_ALGO", "aten")
    ref = timm_condconv.CondConv2d(6, 6, num_experts=3, **kw)
    assert ref.dynamic_padding == (kw["padding"] == "same")
    conv = M.convert(copy.deepcopy(ref))
    assert type(conv) is from_timm.CondConv2d
    x = torch.randn(2, 6, 9, 8)
    _compare(conv, ref, [x, _routing(2, 3)], train=True, channels_last=channels_last)


@requires_ext
@pytest.mark.parametrize("train", [True, False], ids=["train_fp64", "eval_fp32"])
def test_efficientnet_condconv_matches_timm(train):
    conv, ref = _timm_pair("efficientnet_cc_b0_4e")
    n = _count(ref, timm_condconv.CondConv2d)
    assert n == 24 and _count(conv, from_timm.CondConv2d) == n
    compare = _compare64 if train else _compare
    compare(conv, ref, [torch.randn(2, 3, 32, 32)], train=train, channels_last=not train,
            target=torch.tensor([2, 0]))


# ------------------------------------------------------------------------------ skipped

def test_unsupported_timm_modules_are_skipped_with_reasons():
    model = nn.Sequential(
        timm_cbam.CbamModule(16),
        timm_cbam.LightCbamModule(16),
        timm_cbam.CbamModule(16, gate_layer="hard_sigmoid"),
        timm_cbam.CbamModule(16, act_layer=nn.SiLU),
        timm_cbam.CbamModule(16),
    )
    model[4].channel.fc1.register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match="4 timm module") as rec:
        report = M.convert(model, summary=True)
    assert [n for n, _ in report.converted] == ["0"]
    skipped = {n: (c, why) for n, c, why in report.skipped}
    assert set(skipped) == {"1", "2", "3", "4"}
    assert skipped["1"][0] == "LightCbamModule" and "pools avg+max" in skipped["1"][1]
    assert "gate" in skipped["2"][1] and "Hardsigmoid" in skipped["2"][1]
    assert "SiLU" in skipped["3"][1]
    assert "hooks" in skipped["4"][1]
    text = str(rec[0].message)
    assert all(f"  {n} (" in text for n in skipped)
    assert type(model[0]) is from_timm.CbamModule
    assert [type(m) for m in model[1:]] == [timm_cbam.LightCbamModule] + \
        [timm_cbam.CbamModule] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # back to timm's: nothing to report
        assert M.convert(model, kernels="reference") is model
    assert type(model[0]) is timm_cbam.CbamModule


# ---------------------------------------------------------------------------- create()

def test_create_timm_models_and_errors():
    model = M.create("timm:resnet10t", 7, in_channels=1, timm_args=CBAM)
    assert _count(model, from_timm.CbamModule) == 4
    assert model.cam_layer is model.layer4 and "cam_layer" not in dict(model.named_children())
    assert not any(k.startswith("cam_layer") for k in model.state_dict())
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    ref = M.create("timm:resnet10t", 7, kernels="reference", timm_args=CBAM)
    assert _count(ref, timm_cbam.CbamModule) == 4
    with pytest.raises(ValueError, match="unknown timm model 'resnet18x'.*resnet18"):
        M.create("timm:resnet18x", 3)
    with pytest.raises(ValueError, match="must not set.*num_classes"):
        M.create("timm:resnet10t", 3, timm_args={"num_classes": 4})
    with pytest.raises(TypeError, match="timm_args must be a dict"):
        M.create("timm:resnet10t", 3, timm_args="cbam")
    with pytest.raises(TypeError, match="timm models take \\['timm_args'\\]"):
        M.create("timm:resnet10t", 3, n_parts=2)
    with pytest.raises(TypeError, match="no_such_argument"):
        M.create("timm:resnet10t", 3, timm_args={"no_such_argument": 1})


# --------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("name, kwargs", [("resnet10t", CBAM), ("efficientnet_cc_b0_4e", {})],
                         ids=["cbam", "condconv"])
def test_gpu_bf16_autocast_matches_timm(name, kwargs, no_tf32):
    """bf16 autocast on a GPU: the converted model's error against float64 within twice
    timm's own bf16 error (plus 1e-2 of the scale: bf16 keeps 8 bits), train mode, at
    8x3x64x64 (the last stage's BatchNorm then normalises 32 values per channel, not 2)."""
    conv, ref = _timm_pair(name, **kwargs)
    conv.cuda(), ref.cuda()
    exact = copy.deepcopy(ref).double().train()
    x, target = torch.randn(8, 3, 64, 64, device="cuda"), torch.arange(8, device="cuda") % K
    out_e = _fwd_bwd(exact, [x.double()], target)
    outs = []
    for m in (conv, ref):
        m.train().to(memory_format=torch.channels_last)
        with torch.autocast("cuda", torch.bfloat16):
            outs.append(_fwd_bwd(m, [x.contiguous(memory_format=torch.channels_last)],
                                 target))
    err_c = _errors(conv, exact, outs[0].float(), out_e, [], [])
    err_r = _errors(ref, exact, outs[1].float(), out_e, [], [])
    for key, (e, scale) in err_c.items():
        assert e <= 2 * err_r[key][0] + 1e-2 * max(1.0, scale), (key, e, err_r[key][0])
