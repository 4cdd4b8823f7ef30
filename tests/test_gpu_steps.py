"""Whole training steps of the fused modules on a GPU (issue 16): kernels per
forward+backward from the profiler's kernel list, and capture in a CUDA graph.

Skipped without a GPU. The launch counts on CPU (tests/test_launch_counts.py) count
the op boundaries; here each GPU kernel counts, for the CUDA and Triton backends.
A CUDA graph replays the captured kernels without the host: a host sync or a
host-side decision on a tensor's value inside a step fails the capture or replays
stale results, which the comparison with eager catches.
"""

from __future__ import annotations

import pytest
import torch
from test_launch_counts import TARGETS

import manet_kernels as mk
from manet_kernels import _ext
from manet_kernels import nn as mknn
from manet_kernels.ops import _common
from manet_kernels.ops._common import triton_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BACKENDS = [pytest.param("cuda", marks=pytest.mark.skipif(
                not _ext.has_kernel("mixed_attention_apply", "cuda"),
                reason="the extension has no CUDA kernels")),
            pytest.param("triton", marks=pytest.mark.skipif(
                not triton_available(), reason="needs triton"))]


class _AWConv(torch.nn.Module):
    """The AW op alone (its attention branch is plain PyTorch), 3x3, 64 channels."""

    def __init__(self, backend: str, n: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(64, 64, 3, 3) * 0.05)
        self.attn = torch.nn.Parameter(torch.rand(n, 64, 1, 3, 3))
        self.backend = backend

    def forward(self, x):
        return mk.aw_conv2d(x, self.weight, self.attn, None, 1, 1, backend=self.backend)


def _module(case: str, backend: str):
    torch.manual_seed(0)
    if case == "aw_conv2d":
        if backend == "cuda":  # the CUDA AW kernels are issue 17's other half
            pytest.skip("AW-conv: the Triton kernels only")
        return _AWConv(backend, 4).cuda(), (4, 64, 14, 14)
    if case == "brnpa":
        return mknn.BRNPA(3, backend=backend).cuda(), (4, 64, 14, 14)
    m = mknn.MixedAttention(64, spatial_norm=case.endswith("bn_train"), backend=backend)
    return m.cuda().train(), (4, 64, 14, 14)


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _step(m, x, grads):
    outs = _outputs(m(x))
    return outs + list(torch.autograd.grad(outs, [x, *m.parameters()], grads,
                                           allow_unused=True))


def _setup(case, backend):
    m, shape = _module(case, backend)
    x = (torch.randn(shape, device="cuda").abs() + 0.1).requires_grad_()
    with torch.no_grad():
        grads = [torch.randn_like(o) for o in _outputs(m(x))]
    return m, x, grads


CASES = ["mixed_attention", "mixed_attention_bn_train", "brnpa", "aw_conv2d"]
PATHS = ["stages", "composed"]  # the stage kernels (as if verified), or today's default


@pytest.fixture
def path(request):
    if request.param == "stages":
        with _common.unverified_stages():
            yield request.param
    else:
        yield request.param


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_gpu_kernels_per_step(case, backend, path):
    m, x, grads = _setup(case, backend)
    for _ in range(2):  # autotuning and first-call work happen before the counted step
        _step(m, x, grads)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _step(m, x, grads)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"\n{case} ({backend}, {path}): {len(kernels)} GPU kernels: {kernels}")
    verified = {"cuda": _common.CUDA_STAGES_VERIFIED, "triton": _common.TRITON_STAGES_VERIFIED}
    if case == "aw_conv2d":
        verified["triton"] = _common.TRITON_AW_V2_VERIFIED
    if not verified[backend]:
        pytest.xfail(f"{len(kernels)} kernels: the {backend} stage kernels have not passed on "
                     f"a GPU yet, so the {backend} backend composes the stages from its passes")
    assert len(kernels) <= TARGETS[case], kernels


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_cuda_graph_replay_matches_eager(case, backend, path):
    """Capture forward+backward once, replay on new inputs, compare with eager on the
    same inputs (and the BatchNorm's running statistics with eager's)."""
    m, x, grads = _setup(case, backend)
    static_x = x.detach().clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (autotuning) off the capture
        for _ in range(3):
            _step(m, static_x, grads)
    torch.cuda.current_stream().wait_stream(stream)
    buffers = {k: v.clone() for k, v in m.named_buffers()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _step(m, static_x, grads)
    for seed in (1, 2):
        torch.manual_seed(seed)
        new_x = torch.randn(x.shape, device="cuda").abs() + 0.1
        with torch.no_grad():
            static_x.copy_(new_x)
        before = {k: v.clone() for k, v in m.named_buffers()}
        graph.replay()
        replayed = {k: v.clone() for k, v in m.named_buffers()}
        for k, v in before.items():  # eager from the same running statistics
            m.get_buffer(k).copy_(v)
        want = _step(m, new_x.requires_grad_(), grads)
        for got, exp in zip(static_out, want):
            if exp is not None:
                torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
        for k, v in m.named_buffers():
            torch.testing.assert_close(replayed[k], v)
    assert buffers.keys() == dict(m.named_buffers()).keys()
