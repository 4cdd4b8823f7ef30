import os

import pytest
import torch

# Triton runs on CPU only through its interpreter, which must be chosen before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from manet_kernels import _ext  # noqa: E402
from manet_kernels.ops._common import triton_available  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def backends_for(device: str) -> list[str]:
    """The compiled backends worth testing on ``device`` in this environment."""
    if device == "cpu":
        out = ["cpu"] if _ext.HAS_EXT else []
        return out + (["triton"] if triton_available() else [])
    out = ["cuda"] if _ext.HAS_CUDA_KERNELS else []
    return out + (["triton"] if triton_available() else [])


requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
requires_ext = pytest.mark.skipif(not _ext.HAS_EXT,
                                  reason=f"C++ extension not built: {_ext.EXT_ERROR}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: with the 2 cores shared, thread
    hand-offs and spin-waits cost more than the work (a resnet20 forward on 3 16x16
    images: 3 ms on 1 thread, 0.5 s on 2; test_models.py ran 2-3x slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def no_tf32():
    """fp32 references in IEEE fp32 on a GPU: cuDNN convolutions take TF32 by default
    (and matmuls may be set to), which would make the reference the less accurate side
    of a comparison with kernels that compute in fp32. Harmless without a GPU. (Not
    monkeypatch: torch.backends.cuda.matmul's attributes are not plain ones.)"""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    old = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = old
