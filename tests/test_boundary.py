"""Every op's boundary (ops/_boundary.py), one parametrised test each way.

The registered ops pass ``torch.library.opcheck``; the public functions and the drop-in
``*Function``s compile with ``fullgraph=True``; and the direct path (the op bodies in a
plain autograd.Function when ``eager_ok``) equals the registered ops bit for bit:
outputs and every gradient. Both paths run the same kernels in the same order.
"""

import importlib

import pytest
import torch
from conftest import HAS_GPU, backends_for, requires_ext

import manet_kernels as mk
from manet_kernels import nn as mknn
from manet_kernels.ops import _boundary, _common

# the package re-exports functions under the modules' names: fetch the modules
aw_ops = importlib.import_module("manet_kernels.ops.aw_conv2d")
brnpa_ops = importlib.import_module("manet_kernels.ops.brnpa")
ma_ops = importlib.import_module("manet_kernels.ops.mixed_attention")

DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])
# "torch": the pass contract through the same ops, so the boundary is tested without
# the extension too
OP_BACKENDS = ["torch"] + (["cpu"] if "cpu" in backends_for("cpu") else [])


def _cases():
    for dev in DEVICES:
        for be in backends_for(dev):
            if dev == "cpu" and be == "triton":
                continue  # the interpreter: covered by the per-op files
            yield dev, be


# --------------------------------------------------------------------------- the op cases
# Each case makes (a call of the public function or module, its differentiable inputs)
# on a device and backend.

def _mixed(bn_train=None):
    """Plain (bn_train None), or max_avg with the spatial BatchNorm in train / eval mode."""
    def make(dev, backend):
        opts = {} if bn_train is None else dict(spatial_norm=True, pool_order="max_avg")
        m = mknn.MixedAttention(24, reduction=4, backend=backend, **opts).to(dev)
        m.train(bn_train is not False)
        x = torch.randn(3, 24, 7, 5, device=dev, requires_grad=True)
        return (lambda: m(x, return_maps=True)), [x, *m.parameters()]
    return make


def _brnpa(variant):
    def make(dev, backend):
        x = (torch.rand(2, 16, 5, 6, device=dev) + 0.1).requires_grad_()
        return (lambda: mk.brnpa(x, 3, variant=variant, backend=backend)), [x]
    return make


def _aw(attn_c1):
    def make(dev, backend):
        x = torch.randn(3, 8, 7, 6, device=dev, requires_grad=True)
        w = torch.randn(6, 8, 3, 3, device=dev, requires_grad=True)
        a = torch.rand(3, 6, attn_c1, 3, 3, device=dev, requires_grad=True)
        b = torch.randn(6, device=dev, requires_grad=True)
        return (lambda: mk.aw_conv2d(x, w, a, b, 1, 1, backend=backend)), [x, w, a, b]
    return make


def _per_sample(dev, backend):
    x = torch.randn(3, 4, 7, 6, device=dev, requires_grad=True)
    ws = torch.randn(3, 6, 2, 3, 3, device=dev, requires_grad=True)
    b = torch.randn(3, 6, device=dev, requires_grad=True)
    return (lambda: mk.per_sample_conv2d(x, ws, b, 2, 1, 1, 2, backend=backend)), [x, ws, b]


CASES = {
    "mixed_attention": _mixed(),
    "mixed_attention_max_avg_bn_train": _mixed(bn_train=True),
    "mixed_attention_max_avg_bn_eval": _mixed(bn_train=False),
    "brnpa_official": _brnpa("official"),
    "brnpa_paper": _brnpa("paper"),
    "aw_conv2d": _aw(1),
    "aw_conv2d_full_attn": _aw(8),  # the per-sample op
    "per_sample_conv2d": _per_sample,
}

kinds: list[str] = []


def _grads(fn, inputs, seed=1):
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator(device=outs[0].device).manual_seed(seed)
    kinds.append(type(outs[0].grad_fn).__name__)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen, device=o.device)).sum()
               for o in outs)
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, inputs))


def _assert_equal(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dev,backend", list(_cases()))
@pytest.mark.parametrize("case", CASES)
def test_direct_path_equals_registered_op(monkeypatch, case, dev, backend):
    fn, inputs = CASES[case](dev, backend)
    kinds.clear()
    direct = _grads(fn, inputs)
    monkeypatch.setattr(_boundary, "eager_ok", lambda *a: False)
    registered = _grads(fn, inputs)
    monkeypatch.undo()
    assert kinds[0] != kinds[1], kinds  # the two paths really differ
    _assert_equal(direct, registered)


@requires_ext
@pytest.mark.parametrize("case", CASES)
def test_compile_fullgraph_matches_eager(case):
    torch._dynamo.reset()
    fn, inputs = CASES[case]("cpu", "cpu")
    want = _grads(fn, inputs)
    got = _grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- the registered ops

def _op_args(op, backend):
    """(boundary, arguments of its registered forward op)."""
    x = torch.randn(2, 6, 5, 3).abs() + 0.1
    if op == "mixed_attention":
        params = (torch.randn(2, 6), torch.randn(2), torch.randn(6, 2), torch.randn(6),
                  torch.randn(1, 2, 3, 3), torch.randn(1))
        bn = (torch.rand(1) + 0.5, torch.randn(1), torch.zeros(1), torch.ones(1))
        return ma_ops._MIXED_ATTENTION, [
            (x, *params, None, None, None, None, None, False, False, 0.0, None, backend),
            (x.contiguous(memory_format=torch.channels_last), *params[:5], None, *bn, None,
             True, True, 1e-5, 0.1, backend)]
    if op == "brnpa":
        return brnpa_ops._BRNPA, [(x, 3, paper, backend) for paper in (False, True)]
    conv = ([1, 1], [1, 1], [1, 1], 2)
    if op == "aw_conv2d":
        scale = torch.rand(2, 4, 3, 3) + 0.5
        return aw_ops._AW, [(x, torch.randn(4, 3, 3, 3), scale, b, *conv, backend)
                            for b in (torch.randn(4), None)]
    ws = torch.randn(2, 4, 3, 3, 3)
    return aw_ops._PS, [(x, ws, b, *conv, backend) for b in (torch.randn(2, 4), None)]


def _requiring_grad(args):
    return tuple(a.clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor)
                 else a for a in args)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("op", ["mixed_attention", "brnpa", "aw_conv2d", "per_sample_conv2d"])
def test_opcheck_forward_and_backward_ops(op, backend):
    boundary, cases = _op_args(op, backend)
    for args in cases:
        for a in (args, _requiring_grad(args)):
            torch.library.opcheck(boundary.op, a)
        out = boundary.forward_body(*args)
        outs = out if isinstance(out, tuple) else (out,)
        tensors, flags = boundary.save(args, outs)
        k = boundary.grad_outputs
        grads = tuple(torch.randn_like(o) for o in outs[:k])
        # the backward op with every output gradient, and with the unused ones None
        torch.library.opcheck(boundary.backward_op, (*grads, *tensors, *flags))
        if k > 1:
            torch.library.opcheck(boundary.backward_op,
                                  (grads[0], *(None,) * (k - 1), *tensors, *flags))


# ------------------------------------------------------------- gradients not materialised

@pytest.mark.parametrize("dev,backend", list(_cases()))
@pytest.mark.parametrize("case", ["mixed_attention_max_avg_bn_train", "brnpa_official"])
@pytest.mark.parametrize("used", [0, 1])
def test_unused_output_gradients_equal_zero_gradients(case, dev, backend, used):
    """An unused output's gradient arrives as None and the backward skips its terms:
    the gradients equal those with that output's gradient an explicit zero tensor."""
    fn, inputs = CASES[case](dev, backend)

    def grads(zeros):
        outs = fn()
        loss = outs[used].float().square().sum()
        if zeros:  # every other output joins the loss with a zero gradient
            loss = loss + sum((o * 0).sum() for i, o in enumerate(outs) if i != used)
        return torch.autograd.grad(loss, inputs)

    _assert_equal(grads(False), grads(True))


# --------------------------------------------------------------------------- drop-in Functions

def _function_cases(dev):
    x = torch.randn(2, 8, 5, 4, device=dev, dtype=torch.float64)
    ma = [x, torch.randn(2, 8), torch.randn(2), torch.randn(8, 2), torch.randn(8),
          torch.randn(1, 2, 3, 3)]
    aw = [x, torch.randn(6, 4, 3, 3), torch.rand(2, 6, 1, 3, 3), torch.randn(6)]
    return {
        "MixedAttentionFunction": (mk.MixedAttentionFunction, ma, ()),
        "BRNPAFunction": (mk.BRNPAFunction, [x.abs() + 0.1], (3, "paper")),
        "AWConv2dFunction": (mk.AWConv2dFunction, aw, (1, 1, 1, 2)),
        "AWConv2dFunction_full_attn": (mk.AWConv2dFunction,
                                       [*aw[:2], torch.rand(2, 6, 4, 3, 3), aw[3]], (1, 1, 1, 2)),
        "PerSampleConv2dFunction": (mk.PerSampleConv2dFunction,
                                    [x, torch.randn(2, 6, 4, 3, 3), torch.randn(6)],
                                    (1, 1, 1, 2)),
    }


@requires_ext
@pytest.mark.parametrize("name", list(_function_cases("cpu")))
def test_drop_in_function_paths_and_compile(monkeypatch, name):
    """Each drop-in takes the direct path in eager mode, the registered ops otherwise,
    and compiles with fullgraph=True; all three agree."""
    fn_cls, tensors, conf = _function_cases("cpu")[name]
    inputs = [t.to(torch.float64).requires_grad_() for t in tensors]

    def call():
        return fn_cls.apply(*inputs, *conf)

    direct = _grads(call, inputs)
    monkeypatch.setattr(_boundary, "eager_ok", lambda *a: False)
    registered = _grads(call, inputs)
    monkeypatch.undo()
    _assert_equal(direct, registered)
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    for a, b in zip(_grads(compiled, inputs), direct):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- eager_ok and dispatch

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


@requires_ext
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
