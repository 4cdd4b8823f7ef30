"""The build produced what was asked of it."""

import os

import pytest
import torch

from manet_kernels import _ext


def test_extension_loaded_when_built():
    if os.environ.get("MANET_KERNELS_NO_EXT") == "1":
        pytest.skip("built without the extension on purpose")
    assert _ext.HAS_EXT, _ext.EXT_ERROR


def test_cuda_kernels_registered_when_required():
    """CI sets MANET_KERNELS_CUDA=1: the CUDA kernels must then be compiled and
    registered, even on a machine with no GPU to run them."""
    if os.environ.get("MANET_KERNELS_CUDA") != "1":
        pytest.skip("CUDA build not required here")
    assert _ext.HAS_CUDA_KERNELS
    for stage in ("channel_pool", "spatial_pool", "apply", "bwd_reduce", "bwd_channel",
                  "bwd_dx"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"manet_kernels::mixed_attention_{stage}", "CUDA"), stage
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"manet_kernels::mixed_attention_{stage}", "CPU"), stage
    for op in ("aw_conv2d_fwd", "aw_conv2d_bwd", "per_sample_conv2d_fwd",
               "per_sample_conv2d_bwd"):
        for key in ("CUDA", "CPU"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"manet_kernels::{op}", key), \
                (op, key)
        assert _ext.has_kernel(op, "cuda"), op
