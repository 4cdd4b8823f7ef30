"""Launch counts as a tested number (issue 14).

Each fused op's forward+backward on the CPU backend dispatches a number of device-level
operations (``launch_count``: a proxy for GPU kernel launches, since every backend
keeps the same op boundaries). ``BOUNDS`` holds today's counts: a change that adds an
operation fails here, and one that removes some prints the lower number to put in the
table. Run with ``-s`` to see each count and what was dispatched.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import requires_ext
from launch_count import count_events, count_launches, format_counts, fwd_bwd_step

import manet_kernels as mk
from manet_kernels import nn as mknn
from manet_kernels import reference

# Today's count per forward+backward on the CPU backend (torch 2.14.1; unused output
# gradients no longer materialised as zeros, issue 15). The launch-lean issues lower
# them: issue 16 for mixed attention (to <= 10, <= 12 with BatchNorm in training mode)
# and BR-NPA (to 2 * parts + 4), issue 17 for AW-conv (to <= 6).
BOUNDS = {
    "mixed_attention": 31,
    "mixed_attention_bn_train": 61,
    "brnpa": 74,
    "aw_conv2d": 3,
}

# The compiled passes (manet_kernels::_<op>_<pass>) each fused step must dispatch (so
# that no count passes by counting nothing, or by falling back to the reference).
KERNELS = {
    "mixed_attention": {"channel_pool", "spatial_pool", "apply", "bwd_reduce",
                        "bwd_channel", "bwd_dx", "spatial_conv", "spatial_conv_bwd"},
    "brnpa": {"norms", "step", "bwd_reduce", "bwd_dx"},
    "aw_conv2d": {"fwd", "bwd"},
}

# The eager references' counts under torch 2.14.1, for comparison. They depend on how
# torch decomposes its ops, so the test holds them only to a band (see test_reference).
REFERENCE = {
    "mixed_attention": 54,
    "mixed_attention_bn_train": 57,
    "brnpa": 168,
}


def _mixed(module_cls, spatial_norm: bool, **kw):
    m = module_cls(32, spatial_norm=spatial_norm, **kw).train()
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    return fwd_bwd_step(lambda: m(x), [x, *m.parameters()])


def _brnpa(fn):
    x = (torch.randn(2, 64, 8, 8).abs() + 0.1).requires_grad_()
    return fwd_bwd_step(lambda: fn(x), [x])


def _aw(backend: str):
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    weight = (torch.randn(32, 32, 3, 3) * 0.05).requires_grad_()
    attn = torch.rand(2, 32, 1, 3, 3, requires_grad=True)
    return fwd_bwd_step(lambda: mk.aw_conv2d(x, weight, attn, None, 1, 1, backend=backend),
                        [x, weight, attn])


FUSED = {
    "mixed_attention": lambda: _mixed(mknn.MixedAttention, False, backend="cpu"),
    "mixed_attention_bn_train": lambda: _mixed(mknn.MixedAttention, True, backend="cpu"),
    "brnpa": lambda: _brnpa(lambda x: mk.brnpa(x, 3, backend="cpu")),
    "aw_conv2d": lambda: _aw("cpu"),
}
REFERENCE_STEPS = {
    "mixed_attention": lambda: _mixed(reference.MixedAttention, False),
    "mixed_attention_bn_train": lambda: _mixed(reference.MixedAttention, True),
    "brnpa": lambda: _brnpa(lambda x: reference.brnpa.brnpa(x, 3)),
}


@requires_ext
@pytest.mark.parametrize("case", sorted(BOUNDS))
def test_fused_launch_count(case):
    counts = count_launches(FUSED[case]())
    n = sum(counts.values())
    print(f"\n{case} (CPU backend): {format_counts(counts)}")
    op = "mixed_attention" if case.startswith("mixed_attention") else case
    missing = {f"manet_kernels::_{op}_{k}" for k in KERNELS[op]} - set(counts)
    assert not missing, f"{case}: compiled kernels not dispatched: {sorted(missing)}"
    assert n <= BOUNDS[case], (f"{case}: {n} operations per forward+backward, more than "
                               f"the bound {BOUNDS[case]}: {format_counts(counts)}")
    if n < BOUNDS[case]:
        print(f"{case}: {n} < bound {BOUNDS[case]}: lower BOUNDS[{case!r}] to {n}")


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_reference_launch_count(case):
    """The eager reference's count, printed beside the fused one; held to a band of
    half to twice the recorded number, which catches a counting rule that stops
    seeing the backward or counts views, but not a torch upgrade's changes."""
    counts = count_launches(REFERENCE_STEPS[case]())
    n = sum(counts.values())
    print(f"\n{case} (eager reference): {format_counts(counts)}")
    assert REFERENCE[case] / 2 <= n <= 2 * REFERENCE[case], format_counts(counts)


# ---------------------------------------------------------------------------
# The counting rule itself, on steps whose count is known.

def _count(fn) -> Counter:
    return count_launches(fn)


def test_elementwise_chain_counts_each_op():
    x = torch.randn(4, 8)
    # On CPU each op also converts the Python scalar with aten::to: not counted.
    assert _count(lambda: (x + 1) * 2) == Counter({"aten::add": 1, "aten::mul": 1})


def test_views_and_no_op_conversions_count_zero():
    x = torch.randn(4, 8)
    assert _count(lambda: x.view(32).reshape(8, 4).t().unsqueeze(0)[0].expand(2, 4, 8)) \
        == Counter()
    assert _count(lambda: x.to(torch.float32).contiguous().flatten()) == Counter()
    assert _count(lambda: torch.empty(3, 4)) == Counter()


def test_copies_and_fills_count_once():
    x = torch.randn(4, 8)
    assert _count(lambda: x.to(torch.float64)) == Counter({"aten::_to_copy": 1})
    assert _count(lambda: x.t().contiguous()) == Counter({"aten::clone": 1})
    assert _count(lambda: torch.zeros(3)) == Counter({"aten::zeros": 1})


def test_op_with_a_cpu_decomposition_counts_once():
    x = torch.randn(4, 8)
    # CPU mean is sum then div_, addmm copies its bias first: one op each on a GPU.
    assert _count(lambda: x.mean(1)) == Counter({"aten::mean": 1})
    assert _count(lambda: torch.nn.functional.linear(x, x, x[:, 0])) == \
        Counter({"aten::addmm": 1})


def test_backward_is_counted():
    x = torch.randn(4, 8, requires_grad=True)
    # sum's backward is an expand (a view); mul's is a mul.
    assert count_launches(fwd_bwd_step(lambda: x.sum(), [x])) == Counter({"aten::sum": 1})
    assert count_launches(fwd_bwd_step(lambda: (x * 2).sum(), [x])) == \
        Counter({"aten::mul": 2, "aten::sum": 1})
    # max's backward is a composite: zeros, then scatter_.
    assert count_launches(fwd_bwd_step(lambda: x.max(1).values, [x])) == \
        Counter({"aten::max": 1, "aten::zeros": 1, "aten::scatter_": 1})


def _event(name, *children):
    e = SimpleNamespace(name=name, cpu_children=list(children), cpu_parent=None)
    for c in children:
        c.cpu_parent = e
    return e


def test_kernel_op_counts_once_and_wrapper_is_looked_into():
    # A compiled op's own ATen calls (its output allocation, a copy) are not counted.
    kernel = _event("manet_kernels::k", _event("aten::empty"), _event("aten::copy_"))
    assert count_events([kernel]) == Counter({"manet_kernels::k": 1})
    # A custom op that calls compiled ops is a wrapper: what it runs is counted.
    wrapper = _event("manet_kernels::op", _event("manet_kernels::k1"), _event("aten::add"))
    assert count_events([wrapper]) == Counter({"manet_kernels::k1": 1, "aten::add": 1})
