"""manet_kernels.models: every variant built on the fused kernels against the same
weights on the reference modules (outputs, every gradient, running statistics), output
types and wiring, training, state_dict, convert, layouts, autocast, parameter counts
and bad input. Small on purpose: CIFAR nets at 16x16, ImageNet nets at 64x64."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import manet_kernels
from manet_kernels import models as M
from manet_kernels.models import ABNOutput, BRNPAOutput

requires_ext = pytest.mark.skipif(not manet_kernels._ext.HAS_EXT,
                                  reason="the fused CPU kernels need the C++ extension")

PREFIXES = ("", "se_", "cbam_", "abn_", "manet_", "aw_", "aw_se_", "aw_cbam_")
# Every variant (prefix x head) on the smallest depth.
CIFAR_VARIANTS = [n for n in M.list_models() if n.endswith(("resnet20", "resnet20_brnpa"))]
# The Bottleneck / ImageNet-stem code paths of every kind of block, head and branch.
IMAGENET_VARIANTS = ["aw_cbam_resnet50", "manet_resnet50", "se_resnet50_brnpa",
                     "aw_se_resnet18_brnpa"]
K = 5
ATTENTION = ("MixedAttention", "AWConv2d", "BRNPA", "BRNPAHead")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _aw_direct_conv(monkeypatch):
    """These tests check the models' wiring, so fused and reference must be in the same
    precision class: the C++ CPU AW kernels run ATen's direct conv here. Their Winograd
    paths (a lower precision class) are checked end to end in
    test_aw_winograd_precision_end_to_end."""
    monkeypatch.setenv("MANET_KERNELS_AW_CPU_ALGO", "aten")


def _tensors(out):
    return tuple(out) if isinstance(out, tuple) else (out,)


def _pair(name, dtype=torch.float32, **options):
    """A fused model and a reference model with the fused one's weights."""
    fused = M.create(name, K, **options).to(dtype)
    ref = M.create(name, K, kernels="reference", **options).to(dtype)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def _input(name, n=2, dtype=torch.float32):
    size = 64 if any(f"resnet{d}" in name for d in (18, 34, 50, 101, 152)) else 16
    return torch.randn(n, 3, size, size, dtype=dtype)


def _run_and_backward(model, x, target):
    out = model(x)
    M.classification_loss(out, target).backward()
    return out


def _errors(model, exact, out, out_exact):
    """Max-abs error of each output, parameter gradient and buffer against the float64
    run of the same weights on the same input."""
    errs = {}
    for i, (a, b) in enumerate(zip(_tensors(out), _tensors(out_exact))):
        errs[f"output {i}"] = ((a.double() - b).abs().max().item(), b.abs().max().item())
    grads = dict(exact.named_parameters())
    gscale = max(g.grad.abs().max().item() for g in grads.values())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        errs[f"grad of {name}"] = ((p.grad.double() - grads[name].grad).abs().max().item(),
                                   gscale)
    bufs = dict(exact.named_buffers())
    for name, b in model.named_buffers():
        if b.is_floating_point():
            errs[f"buffer {name}"] = ((b.double() - bufs[name]).abs().max().item(),
                                      bufs[name].abs().max().item())
    return errs


def _compare(fused, ref, x, *, floor, factor=2.0):
    """Outputs, every parameter's gradient and every buffer after one forward+backward.

    Both models are compared with a float64 run of the same weights: the fused model's
    error must be at most twice the reference model's own error in the same dtype, plus
    ``floor`` times the quantity's scale (``factor`` replaces the 2 for algorithms of a
    known lower precision class) (the model's largest gradient for gradients:
    some are zero in exact arithmetic and pure rounding noise on both sides). The
    own-error rule and not a fixed tolerance, because fp32 conditioning varies by orders
    of magnitude between models: in eval mode with fresh BN statistics (no scaling down
    of activations) a 20-layer net's fp32 reference is itself off by ~2e-4 of the
    largest gradient, and any other summation order (the fused kernels', the CPU AW
    Winograd path's) differs from it by as much."""
    target = torch.arange(x.shape[0]) % K
    exact = copy.deepcopy(ref).double()
    out_e = _run_and_backward(exact, x.double(), target)
    out_f = _run_and_backward(fused, x, target)
    out_r = _run_and_backward(ref, x, target)
    assert type(out_f) is type(out_r)
    err_f = _errors(fused, exact, out_f, out_e)
    err_r = _errors(ref, exact, out_r, out_e)
    for key, (e, scale) in err_f.items():
        own = err_r[key][0]
        assert e <= factor * own + floor * max(1.0, scale), \
            f"{key}: error {e:.3g} against float64, reference's own {own:.3g} (scale {scale:.3g})"
    return out_f


def _check_structure(model, name, x):
    """Output types and shapes, and that cam_layer / fc are what the head reads."""
    seen = {}
    hooks = [model.cam_layer.register_forward_hook(lambda m, i, o: seen.update(cam=o, cam_in=i[0]))]
    if name.startswith(("abn_", "manet_")):
        hooks.append(model.stages[-2].register_forward_hook(lambda m, i, o: seen.update(f=o)))
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    n, cam = x.shape[0], seen["cam"]
    assert cam.dim() == 4 and cam.shape[:2] == (n, model.num_features)
    if name.endswith("_brnpa"):
        assert isinstance(out, BRNPAOutput) and not hasattr(model, "fc")
        assert out.logits.shape == (n, K)
        assert out.part_maps.shape == (n, 3) + cam.shape[2:]
        assert out.features is cam
        # BR-NPA's maps are similarity weights normalised to sum 1 over positions.
        torch.testing.assert_close(out.part_maps.sum((2, 3)), torch.ones(n, 3), rtol=0, atol=1e-5)
        assert M.attention_maps(out) is out.part_maps
        return out
    expected = model.fc(cam.mean((2, 3)))
    if name.startswith(("abn_", "manet_")):
        assert isinstance(out, ABNOutput)
        m = out.attention_map
        assert m.shape == (n, 1) + seen["f"].shape[2:]
        assert bool(((m >= 0) & (m <= 1)).all())
        assert out.attention_logits.shape == (n, K)
        # The perception branch reads (1 + M) * F.
        torch.testing.assert_close(seen["cam_in"], seen["f"] * (1 + m), rtol=0, atol=0)
        assert M.attention_maps(out) is m
        logits = out.logits
    else:
        assert isinstance(out, torch.Tensor)
        assert M.attention_maps(out) is None
        logits = out
    assert logits.shape == (n, K)
    # CAM's premise: the logits are fc(GAP(cam_layer output)).
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert M.logits_of(out) is logits
    return out


def test_list_models():
    names = M.list_models()
    assert names == sorted(names) and len(names) == len(set(names))
    depths = (20, 32, 44, 56, 110, 18, 34, 50, 101, 152)
    expected = {f"{p}resnet{d}" for p in PREFIXES for d in depths}
    expected |= {f"{p}resnet{d}_brnpa" for p in PREFIXES if p not in ("abn_", "manet_")
                 for d in depths}
    assert set(names) == expected
    assert len(CIFAR_VARIANTS) == 14 and all("resnet20" in n for n in CIFAR_VARIANTS)


# fp32: fused and reference compute the same math with different summation orders
# (fp32 accumulation in both), so each is held to twice the other's error against
# float64, plus a floor of 1e-6 of the scale for quantities both get (almost) exact;
# a wrong or missing term shows up at O(1).
@requires_ext
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", CIFAR_VARIANTS)
def test_cifar_fused_matches_reference(name, train):
    fused, ref = _pair(name)
    fused.train(train), ref.train(train)
    x = _input(name)
    _compare(fused, ref, x, floor=1e-6)
    fused.eval()
    _check_structure(fused, name, x)


# ImageNet nets at 64x64 end on 2x2 maps, where a training-mode BatchNorm normalises
# 8 values and amplifies rounding differences by orders of magnitude: compare the
# training mode in float64 (measured within 3e-14; tolerance 1e-10) and the eval mode
# in fp32.
@requires_ext
@pytest.mark.parametrize("name", IMAGENET_VARIANTS)
def test_imagenet_fused_matches_reference(name):
    fused, ref = _pair(name, torch.float64)
    _compare(fused, ref, _input(name, dtype=torch.float64), floor=1e-12)
    fused, ref = fused.float().eval(), ref.float().eval()
    for model in (fused, ref):
        model.zero_grad()
    x = _input(name)
    _compare(fused, ref, x, floor=1e-6)
    _check_structure(fused, name, x)


@requires_ext
@pytest.mark.parametrize("name", CIFAR_VARIANTS)
def test_sgd_reduces_loss(name):
    model = M.create(name, K)
    x, target = _input(name, n=4), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = M.classification_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)), losses
    assert losses[-1] < 0.8 * losses[0], losses


@requires_ext
@pytest.mark.parametrize("name", CIFAR_VARIANTS)
def test_state_dict_round_trip(name):
    model = M.create(name, K)
    x = _input(name)
    model(x)  # moves the running statistics off their initial values
    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    torch.manual_seed(1)
    other = M.create(name, K)
    other.load_state_dict(state)
    other.eval()
    with torch.no_grad():
        for a, b in zip(_tensors(model(x)), _tensors(other(x))):
            assert torch.equal(a, b)


@requires_ext
@pytest.mark.parametrize("name", ["cbam_resnet20", "manet_resnet20", "aw_resnet20",
                                  "aw_cbam_resnet20_brnpa"])
def test_convert(name):
    model = M.create(name, K).eval()
    x = _input(name)
    params = {n: p for n, p in model.named_parameters()}
    with torch.no_grad():
        before = _tensors(model(x))
        assert M.convert(model, kernels="reference") is model
        swapped = [type(m).__module__ for m in model.modules() if type(m).__name__ in ATTENTION]
        assert swapped and all(c.startswith("manet_kernels.reference.") for c in swapped)
        assert model.kernels == "reference"
        # the same tensors: an optimizer holding them keeps working
        assert all(p is params[n] for n, p in model.named_parameters())
        as_reference = _tensors(model(x))
        M.convert(model, kernels="fused", backend="cpu")
        swapped = [type(m).__module__ for m in model.modules() if type(m).__name__ in ATTENTION]
        assert swapped and all(c.startswith("manet_kernels.nn.") for c in swapped)
        assert all(m.backend == "cpu" for m in model.modules() if hasattr(m, "backend"))
        after = _tensors(model(x))
    for a, b, c in zip(before, as_reference, after):
        # scaled by the reference's output (b), not by the fused model's own
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))
        assert torch.equal(a, c)  # the fused kernels are deterministic


@requires_ext
@pytest.mark.parametrize("name", ["cbam_resnet20", "manet_resnet20", "aw_se_resnet20",
                                  "aw_cbam_resnet20_brnpa", "cbam_resnet18"])
def test_channels_last(name):
    fused, ref = _pair(name)
    x = _input(name)
    fused_cl = fused.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    _compare(fused_cl, ref, x_cl, floor=1e-6)


@requires_ext
@pytest.mark.parametrize("name", CIFAR_VARIANTS)
def test_autocast_bf16(name):
    """CPU autocast: the fused model's error against the fp32 reference is within twice
    the reference's own bf16 error (plus one bf16 ulp of the largest logit)."""
    fused, ref = _pair(name)
    fused.eval(), ref.eval()
    x = _input(name)
    with torch.no_grad():
        exact = M.logits_of(ref(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_f = M.logits_of(fused(x))
            out_r = M.logits_of(ref(x))
    assert out_f.dtype == torch.bfloat16
    base = (out_r.float() - exact).abs().max().item()
    err = (out_f.float() - exact).abs().max().item()
    floor = torch.finfo(torch.bfloat16).eps * exact.abs().max().item()
    assert err <= 2 * base + floor, (err, base)


@requires_ext
@pytest.mark.parametrize("name", ["aw_cbam_resnet20_brnpa", "manet_resnet20"])
def test_autocast_bf16_training_step(name):
    model = M.create(name, K).to(memory_format=torch.channels_last)
    x = _input(name).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = M.classification_loss(model(x), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and \
            bool(torch.isfinite(p.grad).all()), n


def test_parameter_counts():
    torchvision_counts = {"resnet18": 11_689_512, "resnet34": 21_797_672,
                          "resnet50": 25_557_032, "resnet101": 44_549_160,
                          "resnet152": 60_192_808}
    with torch.device("meta"):  # counts without allocating or initialising
        for name, count in torchvision_counts.items():
            assert sum(p.numel() for p in M.create(name).parameters()) == count, name
        # SE-ResNet-50: 28.1M in the SE paper; ResNet-50 + CBAM: 28.09M in the CBAM paper.
        for name in ("se_resnet50", "cbam_resnet50"):
            count = sum(p.numel() for p in M.create(name).parameters())
            assert round(count, -4) == 28_090_000, (name, count)
        for depth in (20, 32, 44, 56, 110):
            assert sum(p.numel() for p in M.create(f"resnet{depth}", 10).parameters()) == \
                _cifar_count(depth, 10), depth


def _cifar_count(depth: int, classes: int) -> int:
    """By hand: 3x3 stem + BN, BasicBlocks (two 3x3 convs + BNs), 1x1 conv + BN
    projections where the width changes, fc."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16
    c_in = 16
    for w in (16, 32, 64):
        for _ in range(n):
            total += 9 * c_in * w + 9 * w * w + 4 * w
            if c_in != w:
                total += c_in * w + 2 * w
            c_in = w
    return total + 64 * classes + classes


def test_options():
    m = M.create("resnet20_brnpa", K, reduced_strides=True, n_parts=2, brnpa_variant="paper")
    out = m(_input("resnet20"))
    assert out.part_maps.shape == (2, 2, 8, 8)  # stride 1 in the last stage: 8x8, not 4x4
    assert m.head.brnpa.variant == "paper"
    m = M.create("cbam_resnet50", K, zero_init_residual=True, in_channels=1)
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for s in m.stages for b in s)
    assert m.conv1.weight.shape[1] == 1
    assert M.create("resnet18", K, kernels="reference").kernels == "reference"


def test_loss_helpers():
    logits, att = torch.randn(3, K), torch.randn(3, K)
    target = torch.tensor([0, 4, 2])
    out = ABNOutput(logits, att, torch.rand(3, 1, 4, 4))
    torch.testing.assert_close(M.classification_loss(out, target),
                               F.cross_entropy(att, target) + F.cross_entropy(logits, target))
    out = BRNPAOutput(logits, torch.rand(3, 3, 4, 4), torch.randn(3, 8, 4, 4))
    torch.testing.assert_close(M.classification_loss(out, target), F.cross_entropy(logits, target))
    torch.testing.assert_close(M.classification_loss(logits, target),
                               F.cross_entropy(logits, target))
    with pytest.raises(TypeError, match="output"):
        M.logits_of([logits])


def test_bad_input():
    with pytest.raises(ValueError, match="cbam_resnet50"):
        M.create("cbam_resnet5")
    with pytest.raises(ValueError, match="unknown model name"):
        M.create("vgg16")
    with pytest.raises(ValueError, match="kernels"):
        M.create("resnet20", kernels="triton")
    with pytest.raises(ValueError, match="backend"):
        M.create("resnet20", backend="gpu")
    with pytest.raises(TypeError, match="n_parts"):
        M.create("cbam_resnet20", n_parts=3)
    with pytest.raises(TypeError, match="reduced_strides"):
        M.create("abn_resnet20", reduced_strides=True)
    with pytest.raises(ValueError, match="num_classes"):
        M.create("resnet20", 0)
    with pytest.raises(ValueError, match="in_channels"):
        M.create("resnet20", in_channels=0)
    with pytest.raises(ValueError, match="n_parts"):
        M.create("resnet20_brnpa", n_parts=0)
    with pytest.raises(ValueError, match="brnpa_variant"):
        M.create("resnet20_brnpa", brnpa_variant="fast")
    with pytest.raises(ValueError, match="kernels"):
        M.convert(M.create("resnet20"), kernels="cuda")
    with pytest.raises(TypeError, match="model"):
        M.convert("resnet20")


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_gpu
@pytest.mark.parametrize("name", ["aw_cbam_resnet20_brnpa", "manet_resnet20", "aw_se_resnet18"])
def test_gpu_fused_matches_reference(name, no_tf32):
    # (no_tf32: the reference convs must not use TF32 where the fused kernels compute in fp32.)
    fused, ref = _pair(name)
    fused, ref = fused.cuda().eval(), ref.cuda().eval()
    x = _input(name).cuda()
    _compare(fused, ref, x, floor=1e-6)
    fused.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = M.classification_loss(fused(x), torch.tensor([0, 1], device="cuda"))
    loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in fused.parameters())


# The CPU AW Winograd path is a lower precision class than a direct conv: its
# transforms' coefficients (F(2x2,3x3): sums of up to 4 terms with weights 1/2;
# F(4x4,3x3): entries up to 8 in A^T and 5 in B^T) scale the fp32 rounding error by a
# few times and by ~16x respectively (measured on this model: 1.2-3.4x and 7.7-16.2x of
# the direct conv's own error). Each is held to twice its class's factor.
WINOGRAD_ERROR_FACTOR = {"winograd2": 4, "winograd4": 16}


@requires_ext
@pytest.mark.parametrize("algo", ["winograd2", "winograd4"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_aw_winograd_precision_end_to_end(algo, train, monkeypatch):
    monkeypatch.setenv("MANET_KERNELS_AW_CPU_ALGO", algo)
    fused, ref = _pair("aw_resnet20")
    fused.train(train), ref.train(train)
    _compare(fused, ref, _input("aw_resnet20", n=3), floor=1e-6,
             factor=2.0 * WINOGRAD_ERROR_FACTOR[algo])
