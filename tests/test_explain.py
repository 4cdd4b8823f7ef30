"""Explanation tools: CAM / Grad-CAM against hand-computed maps, overlays and the
figure, stability IoU, the manet-explain command line. Tiny models, 16x16 images."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from manet_kernels import explain
from manet_kernels.checkpoint import save_checkpoint
from manet_kernels.cli.explain import main as explain_main
from manet_kernels.explain import overlay
from manet_kernels.models import create, logits_of

K = 5  # classes
KINDS = ["resnet20", "manet_resnet20", "resnet20_brnpa"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name, **kw):
    torch.manual_seed(0)
    m = create(name, K, in_channels=1, **kw)
    # Random BN statistics, so eval mode differs from train mode and maps are not flat.
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _images(n=3, size=16):
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(1))


def _features(model, x):
    """The final feature map and logits, computed without hooks (the oracle)."""
    with torch.no_grad():
        f = model.features(x) if not hasattr(model, "attention_branch") else None
        if f is None:  # ABN / MANet: the perception branch's last stage
            h = model.stem(x)
            for stage in model.stages[:-1]:
                h = stage(h)
            _, m = model.attention_branch(h)
            f = model.stages[-1](h * (1 + m))
    return f


# ----------------------------------------------------------------------------- CAM

@pytest.mark.parametrize("name", ["resnet20", "manet_resnet20"])
def test_cam_is_the_fc_weighted_feature_sum(name):
    model, x = _model(name), _images()
    f = _features(model, x)
    logits = F.linear(f.mean((2, 3)), model.fc.weight, model.fc.bias)
    with torch.no_grad():
        torch.testing.assert_close(logits, logits_of(model(x)))  # f is what fc reads
    pred = logits.argmax(1)
    terms = torch.stack([model.fc.weight[pred[n], :, None, None] * f[n] for n in range(len(x))])
    got = explain.cam(model, x, normalize=False)
    # A float32 sum over channels in another order: the error scales with the summands'
    # magnitude, not with the (cancelling, near-zero) sum, so bound it by a few ulps of it.
    bound = 4 * torch.finfo(torch.float32).eps * terms.abs().sum(1)
    want = terms.sum(1)
    assert ((got - want).abs() <= bound).all()
    # Explicit targets: one class for all, one per image.
    want2 = torch.einsum("c,nchw->nhw", model.fc.weight[2], f)
    torch.testing.assert_close(explain.cam(model, x, 2, normalize=False), want2,
                               rtol=1e-5, atol=1e-6)
    t = torch.tensor([4, 0, 1])
    want3 = torch.einsum("nc,nchw->nhw", model.fc.weight[t], f)
    torch.testing.assert_close(explain.cam(model, x, t, normalize=False), want3,
                               rtol=1e-5, atol=1e-6)
    # Normalised: min-max per image.
    lo = want.amin((1, 2), keepdim=True)
    hi = want.amax((1, 2), keepdim=True)
    torch.testing.assert_close(explain.cam(model, x), (want - lo) / (hi - lo), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("name", ["resnet20", "manet_resnet20", "aw_se_resnet20"])
def test_grad_cam_equals_relu_cam_over_hw_for_gap_linear(name):
    # GAP + linear: dy_t/dA[c, i, j] = W[t, c] / (h w), so Grad-CAM = relu(CAM) / (h w).
    model, x = _model(name), _images()
    negative = False
    for target in [None] + list(range(K)):
        c = explain.cam(model, x, target, normalize=False)
        hw = c.shape[1] * c.shape[2]
        g = explain.grad_cam(model, x, target, normalize=False)
        assert c.shape == g.shape == (3, 4, 4)
        negative |= bool((c < 0).any())
        torch.testing.assert_close(g, c.relu() / hw, rtol=1e-5, atol=1e-7)
    assert negative  # some CAM values are negative: the ReLU is exercised
    torch.testing.assert_close(explain.grad_cam(model, x, 3), explain.normalize_maps(
        explain.cam(model, x, 3, normalize=False).relu()), rtol=1e-5, atol=1e-6)


def test_grad_cam_brnpa_head_matches_autograd_through_the_head():
    model, x = _model("resnet20_brnpa"), _images()
    f = _features(model, x).requires_grad_(True)
    logits, _ = model.head(f, return_maps=True)
    t = logits.argmax(1)
    (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), f)
    want = F.relu((grad.mean((2, 3))[:, :, None, None] * f.detach()).sum(1))
    got = explain.grad_cam(model, x, normalize=False)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="CAM is not defined"):
        explain.cam(model, x)


@pytest.mark.parametrize("name", KINDS)
def test_maps_shapes_and_range(name):
    model, x = _model(name, reduced_strides=True) if name.endswith("brnpa") else _model(name), \
        _images(2, 20)
    fns = [explain.grad_cam] + ([explain.cam] if hasattr(model, "fc") else [])
    side = 10 if name.endswith("brnpa") else 5  # reduced_strides: last stage at stride 2
    for fn in fns:
        m = fn(model, x)
        assert m.shape == (2, side, side) and m.dtype == torch.float32
        assert m.min() >= 0 and m.max() <= 1
        for i in range(2):  # min-max: each map reaches 1, or is all zero (flat)
            assert m[i].max() == 1 or (m[i] == 0).all()
    up = explain.upsample(explain.grad_cam(model, x), 20)
    assert up.shape == (2, 20, 20) and up.min() >= 0 and up.max() <= 1


def test_model_state_is_restored(tmp_path):
    model = _model("manet_resnet20")
    model.train()
    model.layer1.eval()  # a mixed state must come back as it was
    model.layer2[0].conv1.weight.requires_grad_(False)
    flags = {n: m.training for n, m in model.named_modules()}
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    x = _images()
    explain.cam(model, x)
    explain.grad_cam(model, x)
    explain.save_attention_maps(model, x, tmp_path, mean=[0], std=[1])
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == req
    assert all(p.grad is None for p in model.parameters())
    for n, b in model.named_buffers():  # eval mode inside: BN statistics untouched
        torch.testing.assert_close(b, buffers[n], rtol=0, atol=0, msg=n)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_bad_inputs(tmp_path):
    model, x = _model("resnet20"), _images()
    with pytest.raises(ValueError, match="images must be a .N, C, H, W."):
        explain.cam(model, x[0])
    with pytest.raises(ValueError, match=r"target class indices must be in \[0, 5\)"):
        explain.grad_cam(model, x, 5)
    with pytest.raises(ValueError, match="target must be an int or 3"):
        explain.cam(model, x, [1, 2])
    with pytest.raises(ValueError, match="no `cam_layer`"):
        explain.grad_cam(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2)), x)
    with pytest.raises(ValueError, match="methods must be among"):
        explain.save_attention_maps(model, x, tmp_path, mean=[0], std=[1], methods=["saliency"])
    with pytest.raises(ValueError, match="mean must have 1 or 1 values"):
        explain.save_attention_maps(model, x, tmp_path, mean=[0, 0, 0], std=[1])


# ------------------------------------------------------------------------- overlays

def test_jet_and_display_and_blend():
    # The three tents at 0, 1/2 and 1: dark blue, pale green, dark red.
    np.testing.assert_array_equal(explain.jet(np.array([0.0, 0.5, 1.0, 2.0])),
                                  [[0, 0, 128], [128, 255, 128], [128, 0, 0], [128, 0, 0]])
    u = torch.rand(2, 3, 5, 7)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    x = (u - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    disp = explain.to_display(x, mean, std)
    assert disp.shape == (2, 5, 7, 3) and disp.dtype == np.uint8
    np.testing.assert_array_equal(disp, (u.permute(0, 2, 3, 1) * 255 + 0.5).to(torch.uint8))
    grey = explain.to_display(x[:, :1], [0.4], [0.2])
    assert (grey[..., 0] == grey[..., 2]).all()
    maps = torch.rand(2, 5, 7)
    np.testing.assert_array_equal(explain.heatmap_overlay(disp, maps, alpha=0.0), disp)
    np.testing.assert_array_equal(explain.heatmap_overlay(disp, maps, alpha=1.0),
                                  explain.jet(maps.numpy()))
    half = explain.heatmap_overlay(disp, torch.zeros(2, 1, 1), alpha=0.5)
    np.testing.assert_array_equal(half, (0.5 * disp + 0.5 * np.array([0, 0, 128]) + 0.5)
                                  .astype(np.uint8))


def test_parts_overlay_is_upsampled_brnpa_rgb():
    parts = torch.zeros(1, 3, 2, 2)
    parts[0, 0, 0, 0] = parts[0, 1, 0, 1] = parts[0, 2, 1, 0] = 1
    feats = torch.ones(1, 4, 2, 2)
    black = np.zeros((1, 4, 4, 3), np.uint8)
    out = explain.parts_overlay(parts, feats, black, alpha=1.0)
    assert out.shape == (1, 4, 4, 3)
    # Corners of the 2x -> 4x bilinear resize keep the pure colours.
    np.testing.assert_array_equal(out[0, 0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 0, 3], [0, 255, 0])
    np.testing.assert_array_equal(out[0, 3, 0], [0, 0, 255])
    np.testing.assert_array_equal(out[0, 3, 3], [0, 0, 0])


@pytest.mark.parametrize("name,methods,titles", [
    ("resnet20", overlay.METHODS, ["input", "CAM", "Grad-CAM"]),
    ("resnet20", ("attention",), ["input"]),
    ("manet_resnet20", overlay.METHODS, ["input", "attention", "CAM", "Grad-CAM"]),
    ("resnet20_brnpa", overlay.METHODS, ["input", "BR-NPA parts", "Grad-CAM"]),
])
def test_save_attention_maps_png_layout(tmp_path, name, methods, titles):
    model, x = _model(name), _images(3)
    paths = explain.save_attention_maps(model, x, tmp_path / "maps", mean=[0.5], std=[0.25],
                                        labels=[0, 1, 2], class_names=list("abcde"),
                                        methods=methods, prefix="ep1_")
    assert paths == [tmp_path / "maps" / "ep1_attention_maps.png"]
    img = np.asarray(Image.open(paths[0]).convert("RGB"))
    tile, pad, head, cap = 128, 4, 18, 16  # 16x16 inputs drawn 8x
    # Heat-map columns (attention, CAM, Grad-CAM) put a colour bar in a footer.
    foot = FOOT if {"attention", "CAM", "Grad-CAM"} & set(titles) else 0
    assert img.shape == (head + 3 * (tile + cap + pad) + foot + pad,
                         len(titles) * (tile + pad) + pad, 3)
    # Row 1's first tile is the (upscaled) input; the other tiles are overlays of it.
    disp = overlay._resize_rgb(explain.to_display(x, [0.5], [0.25]), (tile, tile))
    y0 = head + 1 * (tile + cap + pad)
    np.testing.assert_array_equal(img[y0:y0 + tile, pad:pad + tile], disp[1])
    for j in range(1, len(titles)):
        x0 = pad + j * (tile + pad)
        assert not np.array_equal(img[y0:y0 + tile, x0:x0 + tile], disp[1])


FOOT = overlay._BAR + 16 + 4  # the colour-bar footer: bar, tick labels, padding


def test_colour_bars_under_heat_map_columns(tmp_path):
    model, x = _model("manet_resnet20"), _images(2)
    [path] = explain.save_attention_maps(model, x, tmp_path, mean=[0.5], std=[0.25])
    img = np.asarray(Image.open(path).convert("RGB"))
    tile, pad, head, cap = 128, 4, 18, 16
    y = head + 2 * (tile + cap + pad)  # the footer starts under the last row
    bar = img[y:y + overlay._BAR]
    # input | attention | CAM | Grad-CAM: no bar under the input, jet 0..1 under the others.
    assert (bar[:, pad:pad + tile] == 255).all()
    expected = explain.jet(np.linspace(0.0, 1.0, tile))
    for j in (1, 2, 3):
        x0 = pad + j * (tile + pad)
        np.testing.assert_array_equal(bar[:, x0:x0 + tile],
                                      np.broadcast_to(expected, (overlay._BAR, tile, 3)))
    # The attention column is labelled on the sigmoid's own scale: ticks are drawn.
    labels = img[y + overlay._BAR + 1:y + FOOT - 4, pad + tile + pad:pad + 2 * tile + pad]
    assert (labels < 128).any()
    assert overlay.SIGMOID_TICKS[0] == "0" and overlay.SIGMOID_TICKS[-1] == "1"


def test_many_images_are_written_as_sheets(tmp_path):
    assert overlay.sheet_names(16, 16) == ["attention_maps.png"]
    assert overlay.sheet_names(17, 16, "p_") == ["p_attention_maps_01.png",
                                                 "p_attention_maps_02.png"]
    assert overlay.sheet_names(1000, 1)[-1] == "attention_maps_1000.png"
    model, x = _model("manet_resnet20"), _images(5)
    paths = explain.save_attention_maps(model, x, tmp_path, mean=[0.5], std=[0.25],
                                        labels=[0, 1, 2, 3, 4], rows_per_sheet=2)
    assert [p.name for p in paths] == ["attention_maps_01.png", "attention_maps_02.png",
                                       "attention_maps_03.png"]
    tile, pad, head, cap = 128, 4, 18, 16
    sheets = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    assert [s.shape[0] for s in sheets] == [head + r * (tile + cap + pad) + FOOT + pad
                                            for r in (2, 2, 1)]
    # The last sheet's one row is image 4 as in a figure of all five: input and attention
    # exact; CAM / Grad-CAM within one grey level (conv sums round differently at batch
    # 1 and 5, and each map is min-max scaled before the uint8 rounding).
    [whole] = explain.save_attention_maps(model, x, tmp_path / "one", mean=[0.5], std=[0.25],
                                          labels=[0, 1, 2, 3, 4])
    whole = np.asarray(Image.open(whole).convert("RGB")).astype(int)
    y4 = head + 4 * (tile + cap + pad)
    row, ref = sheets[2][head:head + tile + cap].astype(int), whole[y4:y4 + tile + cap]
    split = pad + 2 * (tile + pad)
    np.testing.assert_array_equal(row[:, :split], ref[:, :split])
    assert np.abs(row[:, split:] - ref[:, split:]).max() <= 1
    with pytest.raises(ValueError, match="rows_per_sheet must be a positive int"):
        explain.save_attention_maps(model, x, tmp_path, mean=[0.5], std=[0.25], rows_per_sheet=0)


# ------------------------------------------------------------------------ stability

def test_binarize_and_hand_computed_iou():
    assert explain.binarize(torch.tensor([[[127 / 255, 126.4 / 255, 1.0, 0.0]]])).tolist() == \
        [[[True, False, True, False]]]
    a = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], [[0.0] * 3] * 2])
    b = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], [[0.0] * 3] * 2])
    # Image 0: intersection 1, union 3. Image 1: both empty, agreement counted as 1.
    r = explain.stability_from_maps([a, b], reference=1, names=["a", "b"])
    np.testing.assert_allclose(r.iou, [[1 / 3, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(r.mean_iou, [2 / 3, 1.0])
    assert r.mean_iou_others == pytest.approx(2 / 3)
    # The threshold applies to the 0..255 scale: 0.4 -> 102 is out at 127, in at 100.
    c = b * 0.4
    assert explain.stability_from_maps([a, c], 0).iou[1, 0] == 0.0
    assert explain.stability_from_maps([a, c], 0, threshold=100).iou[1, 0] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="maps\\[1\\] must be"):
        explain.stability_from_maps([a, b[:1]], 0)


def test_stability_reference_and_identity(tmp_path):
    models = [_model("manet_resnet20") for _ in range(2)]
    torch.manual_seed(5)
    models.append(create("manet_resnet20", K, in_channels=1).eval())  # a different training
    x = _images(4)
    r = explain.stability_of_models(models, x, accuracies=[0.5, 0.9, 0.7])
    assert r.reference == 1 and r.method == "attention" and r.accuracy_source == "checkpoint"
    assert r.iou.shape == (3, 4)
    np.testing.assert_array_equal(r.iou[:2], 1.0)  # same weights as the reference
    assert r.iou[2].mean() < 1
    # No accuracies: the most accurate on the labels is the reference.
    with torch.no_grad():
        labels = logits_of(models[2](x)).argmax(1)
    r2 = explain.stability_of_models(models, x, labels)
    assert r2.reference == 2 and r2.accuracy_source == "images" and r2.accuracies[2] == 1.0
    with pytest.raises(ValueError, match="pass labels"):
        explain.stability_of_models(models, x)
    # Models with no map of their own fall back to Grad-CAM; asking for one is an error.
    plain = _model("resnet20")
    assert explain.stability_of_models([plain], x, accuracies=[1.0]).method == "gradcam"
    with pytest.raises(ValueError, match="no attention maps of its own"):
        explain.model_maps(plain, x, "attention")
    assert explain.plot_stability(r, tmp_path / "s.png").stat().st_size > 0


# ------------------------------------------------------------------------------ CLI

def _ckpt(path, arch, seed=0, test_acc=0.5, **extra):
    torch.manual_seed(seed)
    model = create(arch, 10, in_channels=1)
    obj = {"model": model.state_dict(), "arch": arch, "num_classes": 10, "in_channels": 1,
           "model_options": {}, "data": "digits", "image_size": 16, "epoch": 1,
           "test_acc": test_acc, **extra}
    return str(save_checkpoint(obj, path))


def _strict(text):
    """JSON as the standard defines it: NaN / Infinity are not JSON."""
    def refuse(const):
        raise ValueError(f"not JSON: {const}")
    return json.loads(text, parse_constant=refuse)


def _run_with_stderr(capsys, *argv):
    assert explain_main([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    return _strict(captured.out), captured.err


def _run(capsys, *argv):
    return _run_with_stderr(capsys, *argv)[0]


def test_cli_maps_stability_sparsity(tmp_path, capsys):
    a = _ckpt(tmp_path / "a" / "best.pt", "manet_resnet20", seed=0, test_acc=0.4)
    b = _ckpt(tmp_path / "b" / "best.pt", "manet_resnet20", seed=0, test_acc=0.8)
    c = _ckpt(tmp_path / "c" / "best.pt", "resnet20_brnpa", seed=1)

    out = _run(capsys, "maps", a, "--n", 3, "--device", "cpu")
    png = tmp_path / "a" / "explain" / "attention_maps.png"
    assert out["files"] == [str(png)]
    assert Image.open(png).size == (4 * 132 + 4, 18 + 3 * 148 + FOOT + 4)

    out = _run(capsys, "stability", a, b, "--n", 4, "--out", tmp_path / "st", "--device", "cpu")
    data = json.loads((tmp_path / "st" / "stability.json").read_text())
    assert (tmp_path / "st" / "stability.png").stat().st_size > 0
    assert data["reference"] == 1 and data["reference_name"] == b and out["reference"] == b
    assert data["iou"] == [[1.0] * 4, [1.0] * 4]  # same weights: identical maps
    assert data["method"] == "attention" and data["accuracies"] == [0.4, 0.8]

    out = _run(capsys, "sparsity", c, "--n", 5, "--out", tmp_path / "sp", "--device", "cpu")
    saved = json.loads((tmp_path / "sp" / "sparsity.json").read_text())
    assert len(saved["sparsity"]) == 5 and out["mean_sparsity"] == pytest.approx(
        np.mean(saved["sparsity"]))
    assert out["mean_sparsity"] > 1  # max / mean of a non-flat map


def test_cli_errors(tmp_path, capsys):
    plain = _ckpt(tmp_path / "plain.pt", "resnet20")
    brnpa = _ckpt(tmp_path / "brnpa.pt", "resnet20_brnpa")
    torch.save({"model": {}, "epoch": 3}, tmp_path / "bad.pt")
    wrong = torch.load(plain, weights_only=True)
    wrong["arch"] = "resnet32"  # resnet20 weights
    save_checkpoint(wrong, tmp_path / "wrong.pt")  # a fresh checksum: not a corrupt file
    cases = [
        (["maps", tmp_path / "missing.pt"], "checkpoint not found"),
        (["maps", tmp_path / "bad.pt"], r"lacks the key\(s\) \['arch', 'num_classes'\]"),
        (["maps", plain, "--methods", "attention"], r"resnet20 has no maps for method\(s\) "
                                                      r"\['attention'\]"),
        (["maps", brnpa, "--methods", "cam"], r"no maps for method\(s\) \['cam'\]"),
        (["maps", tmp_path / "wrong.pt"], "wrong.pt: the model could not be rebuilt"),
        (["stability", plain, tmp_path / "wrong.pt"], "could not be rebuilt"),
        (["sparsity", plain, "--n", "2"], "not a BR-NPA-head model"),
        (["stability", plain, brnpa, "--n", "2"], "share one architecture"),
        (["maps", plain, "--n", "0"], "--n must be at least 1"),
        (["maps", plain, "--per-sheet", "0"], "--per-sheet must be at least 1"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            explain_main([str(a) for a in argv] + ["--device", "cpu"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "manet-explain: error:" in err
        assert re.search(message, err), (argv, err)


def test_cli_maps_more_images_than_the_data_has(tmp_path, capsys):
    a = _ckpt(tmp_path / "a" / "best.pt", "resnet20")
    out, err = _run_with_stderr(capsys, "maps", a, "--n", 100000, "--per-sheet", 128,
                                "--methods", "cam", "--device", "cpu", "--out", tmp_path / "m")
    n = out["images"]  # every digits test image, on three sheets
    assert 256 < n <= 384
    assert out["files"] == [str(tmp_path / "m" / f"attention_maps_0{k}.png") for k in (1, 2, 3)]
    last_rows = n - 256
    assert Image.open(out["files"][2]).size[1] == 18 + last_rows * 148 + FOOT + 4
    assert f"note: --n 100000 asks for more than the {n} test images of 'digits': using all {n}" \
        in err


def test_cli_sparsity_of_a_nan_model_is_valid_json(tmp_path, capsys):
    torch.manual_seed(1)
    model = create("resnet20_brnpa", 10, in_channels=1)
    state = model.state_dict()
    state["conv1.weight"] = torch.full_like(state["conv1.weight"], float("nan"))  # diverged
    path = _ckpt(tmp_path / "nan.pt", "resnet20_brnpa", seed=1, model=state)
    out, err = _run_with_stderr(capsys, "sparsity", path, "--n", 3, "--out", tmp_path / "sp",
                                "--device", "cpu")
    assert out["mean_sparsity"] is None and out["std_sparsity"] is None
    assert "warning: sparsity is not finite for 3 of 3 images" in err
    saved = _strict((tmp_path / "sp" / "sparsity.json").read_text())
    assert saved["sparsity"] == [None, None, None] and saved["mean_sparsity"] is None


def test_json_text_writes_null_for_non_finite_numbers(capsys):
    from manet_kernels.cli.explain import json_text
    text = json_text({"a": 1.5, "b": [float("nan"), 2], "c": {"d": float("inf")}})
    assert _strict(text) == {"a": 1.5, "b": [None, 2], "c": {"d": None}}
    assert "non-finite values written as null: b[0], c.d" in capsys.readouterr().err


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "manet_kernels.explain", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "{maps,stability,sparsity}" in r.stdout
