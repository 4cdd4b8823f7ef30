"""The direct ("eager") path of each op against its registered torch.library op.

Outside torch.compile and dispatch modes the public functions call the registered
ops' forward/backward bodies through a plain autograd.Function (``eager_ok``), to
save the custom-op machinery's host time. Both paths run the same kernels in the
same order, so results must be bitwise equal; the registered op is what opcheck and
torch.compile see (tested in the per-op files).
"""

import importlib

import pytest
import torch

import manet_kernels as mk
from conftest import HAS_GPU, backends_for
from manet_kernels import nn as mknn
from manet_kernels.ops import _common

# the package re-exports functions under the modules' names: fetch the modules
aw_ops = importlib.import_module("manet_kernels.ops.aw_conv2d")
brnpa_ops = importlib.import_module("manet_kernels.ops.brnpa")
ma_ops = importlib.import_module("manet_kernels.ops.mixed_attention")

DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


def _cases():
    for dev in DEVICES:
        for be in backends_for(dev):
            if dev == "cpu" and be == "triton":
                continue  # the interpreter: covered by the per-op files
            yield dev, be


kinds: list[str] = []


def _grads(fn, inputs):
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator(device=outs[0].device).manual_seed(1)
    kinds.append(type(outs[0].grad_fn).__name__)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen, device=o.device)).sum()
               for o in outs)
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, inputs))


def _both_paths(monkeypatch, modules, fn, inputs):
    kinds.clear()
    eager = _grads(fn, inputs)
    for m in modules:
        monkeypatch.setattr(m, "eager_ok", lambda *a: False)
    registered = _grads(fn, inputs)
    monkeypatch.undo()
    assert kinds[0] != kinds[1], kinds  # the two paths really differ
    assert len(eager) == len(registered)
    for a, b in zip(eager, registered):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dev,backend", list(_cases()))
@pytest.mark.parametrize("spatial_norm", [False, True])
def test_mixed_attention_eager_equals_op(monkeypatch, dev, backend, spatial_norm):
    torch.manual_seed(0)
    m = mknn.MixedAttention(24, reduction=4, spatial_norm=spatial_norm,
                            pool_order="max_avg" if spatial_norm else "avg_max",
                            backend=backend).to(dev)
    x = torch.randn(3, 24, 7, 5, device=dev, requires_grad=True)
    params = [x, *m.parameters()]
    _both_paths(monkeypatch, [ma_ops], lambda: m(x, return_maps=True), params)


@pytest.mark.parametrize("dev,backend", list(_cases()))
def test_brnpa_eager_equals_op(monkeypatch, dev, backend):
    x = (torch.rand(2, 16, 5, 6, device=dev) + 0.1).requires_grad_()
    _both_paths(monkeypatch, [brnpa_ops], lambda: mk.brnpa(x, 3, backend=backend), [x])


@pytest.mark.parametrize("dev,backend", list(_cases()))
def test_aw_conv2d_eager_equals_op(monkeypatch, dev, backend):
    x = torch.randn(3, 8, 7, 6, device=dev, requires_grad=True)
    w = torch.randn(6, 8, 3, 3, device=dev, requires_grad=True)
    a = torch.rand(3, 6, 1, 3, 3, device=dev, requires_grad=True)
    b = torch.randn(6, device=dev, requires_grad=True)
    _both_paths(monkeypatch, [aw_ops],
                lambda: mk.aw_conv2d(x, w, a, b, 1, 1, backend=backend), [x, w, a, b])


def test_eager_ok_declines_modes_and_subclasses():
    x = torch.randn(2, 3)
    assert _common.eager_ok(x, None, torch.nn.Parameter(x))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        assert not _common.eager_ok(x)

    class Sub(torch.Tensor):
        pass

    assert not _common.eager_ok(x.as_subclass(Sub))

    seen = []

    def f(t):
        seen.append(_common.eager_ok(t))
        return t.sum()

    torch.func.grad(f)(x)
    assert seen == [False]


@pytest.mark.skipif("cpu" not in backends_for("cpu"), reason="needs the C++ extension")
def test_double_backward_raises_on_the_direct_path():
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    w = torch.randn(4, 8, 3, 3, requires_grad=True)
    a = torch.rand(2, 4, 1, 3, 3, requires_grad=True)
    y = mk.aw_conv2d(x, w, a, None, 1, 1, backend="cpu")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        gx.sum().backward()


def test_aw_auto_prefers_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("MANET_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(_common, "triton_available", lambda: True)
    cuda = torch.device("cuda")
    assert _common.resolve_backend("auto", cuda, "aw_conv2d_fwd", cuda_auto="triton") == "triton"
    monkeypatch.setattr(_common, "triton_available", lambda: False)
    expect = "cuda" if _common._ext.has_kernel("aw_conv2d_fwd", "cuda") else "reference"
    assert _common.resolve_backend("auto", cuda, "aw_conv2d_fwd", cuda_auto="triton") == expect
