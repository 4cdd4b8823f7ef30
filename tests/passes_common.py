"""What the pass tests of every op share (tests/test_<op>_passes.py): the backends as
one pytest parameter, layouts, id formatting, input makers and the tolerance rules.

A pass test compares one backend's pass kernels with the contract,
``manet_kernels.reference.passes``, on the same inputs. The backends (``BACKENDS``):

* ``cpu``: the C++ CPU kernels, the private ops ``torch.ops.manet_kernels._<pass>`` on
  CPU tensors;
* ``cuda``: the CUDA kernels, the same ops on CUDA tensors;
* ``triton``: ``manet_kernels.triton.<op>`` (its stages: ``<op>_stages`` where the op
  has that module), on a GPU or under the interpreter
  (tests/conftest.py sets TRITON_INTERPRET=1 on a machine without one);
* ``torch``: the contract itself, for the tests that state a semantic fact (ties,
  NaN, empty batches) rather than compare with the contract.

Each backend's name is in the id of every test it runs (CI reruns ``-k triton`` under
another triton; the GPU script selects ``-k cuda``), and a backend this machine cannot
run is a skipped parameter, never a skipped module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property

import pytest
import torch

from manet_kernels import _ext
from manet_kernels.ops._common import CPP_PASSES, triton_available, triton_stage_module
from manet_kernels.reference import passes as ref

BACKENDS = ("cpu", "cuda", "triton", "torch")
HAS_GPU = torch.cuda.is_available()

# --------------------------------------------------------------------------- layouts and ids

LAYOUTS = ("nchw", "channels_last")
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def to_layout(t, layout):
    return t.contiguous(memory_format=FORMATS[layout])


def dtype_id(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def param_id(v) -> str:
    if isinstance(v, torch.dtype):
        return dtype_id(v)
    if isinstance(v, (tuple, list)):
        return shape_id(v)
    return str(v)


def case_id(*values) -> str:
    return "-".join(param_id(v) for v in values)


# --------------------------------------------------------------------------- inputs

acc_dtype = ref.acc_dtype


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, g: torch.Generator) -> torch.Tensor:
    """float64 draws on the CPU, cast by the caller: the same values whatever the dtype
    and device a case runs in."""
    return torch.randn(shape, generator=g, dtype=torch.float64)


def tie_free(shape, g: torch.Generator) -> torch.Tensor:
    """Distinct multiples of 1/64, exact in fp16 while numel <= 4096, so every row and
    column has one maximum. Bigger tensors and bf16 round some together: indices must
    still match (the first maximum wins on both sides)."""
    numel = 1
    for s in shape:
        numel *= s
    vals = torch.randperm(numel, generator=g).to(torch.float64) - numel // 2
    return (vals / 64).reshape(shape)


def distinct_along(shape, dims, device) -> torch.Tensor:
    """float64 values drawn on ``device``, pairwise distinct along ``dims`` (the reduced
    axes) and exact in fp16, bf16 and fp32: no ties for a maximum to break, at sizes
    too big for ``tie_free``."""
    m = torch.arange(128, 256, dtype=torch.float64)  # 8 significant bits
    e = torch.arange(-6, 8, dtype=torch.float64)
    pool = (m[None] * torch.pow(2.0, e)[:, None]).flatten()
    pool = torch.cat([-pool.flip(0), pool]).to(device)  # sorted, 3584 values
    perm = [0] + [d for d in (1, 2, 3) if d not in dims] + list(dims)
    k = 1
    for d in dims:
        k *= shape[d]
    lines = torch.rand(shape[0] * shape[1] * shape[2] * shape[3] // k, k, device=device)
    lines = lines.argsort(1)
    lines = lines + torch.randint(0, pool.numel() - k + 1, (lines.shape[0], 1), device=device)
    return pool[lines].reshape([shape[d] for d in perm]).permute(
        *[perm.index(i) for i in range(4)])


def act(t, dtype, layout, device="cpu"):
    """An activation: ``t``'s values in ``dtype`` on ``device``, in ``layout``."""
    return to_layout(t.to(device=device, dtype=dtype), layout)


def small(shape, g, dtype, device="cpu", unit=False):
    """A per-sample tensor (N*C or N*P values): uniform in [0, 1) if ``unit``, else normal."""
    t = torch.rand(shape, generator=g, dtype=torch.float64) if unit else randn(shape, g)
    return t.to(device=device, dtype=dtype)


def amax(t) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


class Seeded:
    """A test's inputs as float64 draws from a seeded CPU generator, cast and moved to
    ``device`` (the CPU and Triton tests). ``scale``: positive factors (attention maps),
    ``normal``: gradients, ``index``: int32 indices below ``high``."""

    def __init__(self, seed, device):
        self.g, self.device = gen(seed), device

    def tie_free(self, shape, dims, dtype, layout):
        return act(tie_free(shape, self.g), dtype, layout, self.device)

    def act(self, shape, dtype, layout):
        return act(randn(shape, self.g), dtype, layout, self.device)

    def scale(self, shape, dtype):
        return small(shape, self.g, dtype, self.device, unit=True)

    def normal(self, shape, dtype):
        return small(shape, self.g, dtype, self.device)

    def index(self, high, shape):
        return torch.randint(0, high, shape, generator=self.g, dtype=torch.int32).to(self.device)


class OnDevice(Seeded):
    """The same inputs drawn on the GPU by the global generator (the CUDA tests, at sizes
    too big to draw on the CPU); ``tie_free`` has no ties along the reduced axes only."""

    def __init__(self, seed, device):
        self.device = device

    def tie_free(self, shape, dims, dtype, layout):
        return to_layout(distinct_along(shape, dims, self.device).to(dtype), layout)

    def act(self, shape, dtype, layout):
        return to_layout(torch.randn(shape, device=self.device).to(dtype), layout)

    def scale(self, shape, dtype):
        return torch.randn(shape, device=self.device, dtype=dtype).abs() + 0.5

    def normal(self, shape, dtype):
        return torch.randn(shape, device=self.device, dtype=dtype)

    def index(self, high, shape):
        return torch.randint(0, high, shape, device=self.device, dtype=torch.int32)


def source(b, seed: int):
    """The inputs of backend ``b``'s tests: CUDA's drawn on the GPU, the others seeded."""
    return (OnDevice if b.name == "cuda" else Seeded)(seed, b.device)


# --------------------------------------------------------------------------- tolerance rules

# error <= SUM_ULPS * eps(acc) * sum|terms|: generous for fp32 sums of a few thousand
# terms, still far below the effect of one missing or doubled term.
SUM_ULPS = 128


def assert_all_within(err, tol, n, what):
    bad = ~(err <= tol)  # NaN errors are bad too
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {n} beyond tolerance, "
                           f"max error {err.max().item():.3e}, "
                           f"first at {bad.nonzero()[0].tolist()}")


def assert_sum_close(out, expect, abs_sum, what):
    """A sum in the accumulation dtype against the contract's, bounded by ``abs_sum``,
    the contract evaluated on the terms' absolute values."""
    assert out.dtype == expect.dtype and out.shape == expect.shape, what
    assert out.is_contiguous(), what
    fi = torch.finfo(out.dtype)
    assert_all_within((out - expect).abs(), SUM_ULPS * fi.eps * abs_sum + fi.tiny,
                      out.numel(), what)


def assert_equal(out, expect, what):
    """Maxima and indices: bit for bit."""
    assert out.dtype == expect.dtype and out.shape == expect.shape, what
    assert out.is_contiguous(), what
    assert torch.equal(out, expect), (
        f"{what}: {int((out != expect).sum())} of {out.numel()} differ, "
        f"first at {(out != expect).nonzero()[0].tolist()}")


def assert_exact(out, expect, what):
    """Maxima and indices: the same values, NaN where the contract has NaN."""
    assert out.dtype == expect.dtype and out.shape == expect.shape, what
    assert out.is_contiguous(), what
    if out.is_floating_point():
        torch.testing.assert_close(out, expect, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(out, expect), (what, (out != expect).nonzero()[:8].tolist())


def assert_ulp_close(out, expect, what):
    """Elementwise outputs: same dtype, shape and strides, within one ulp."""
    assert out.dtype == expect.dtype and out.shape == expect.shape, what
    assert out.stride() == expect.stride(), f"{what}: memory format differs"
    fi = torch.finfo(out.dtype)
    torch.testing.assert_close(out, expect, rtol=fi.eps, atol=fi.tiny,
                               msg=lambda m: f"{what}: {m}")


def assert_same_format(out, x):
    """``out`` has ``x``'s dtype, shape, device and memory format."""
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    assert out.is_contiguous() == x.is_contiguous()
    assert (out.is_contiguous(memory_format=torch.channels_last)
            == x.is_contiguous(memory_format=torch.channels_last))


# --------------------------------------------------------------------------- backends


def triton_module(op: str):
    """``manet_kernels.triton.<op>``, or None where triton is not installed."""
    if not triton_available():
        return None
    return importlib.import_module(f"manet_kernels.triton.{op}")


def triton_interpreting(op: str) -> bool:
    mod = triton_module(op)
    return mod is not None and mod._interpreting()


@dataclass(frozen=True)
class Backend:
    """One backend of one op's passes. ``kernel`` names one of the op's compiled
    passes (``manet_kernels::_<kernel>``), to learn whether the library has it."""

    name: str
    op: str
    kernel: str

    @cached_property
    def device(self) -> str:
        if self.name == "cuda" or (self.name == "triton" and not self.interpreting):
            return "cuda"
        return "cpu"

    @cached_property
    def interpreting(self) -> bool:
        return self.name == "triton" and triton_interpreting(self.op)

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    @cached_property
    def namespace(self):
        """Where the backend's passes are (for Triton, the module whose attributes the
        tests patch: its hooks serve its stage module too)."""
        if self.name == "triton":
            return triton_module(self.op)
        return ref if self.name == "torch" else CPP_PASSES

    @cached_property
    def stage_namespace(self):
        """Triton: ``manet_kernels.triton.<op>_stages`` where the op has it, else None."""
        if self.name != "triton" or not triton_available():
            return None
        return triton_stage_module(self.op)

    def __getattr__(self, name):  # backend.mixed_attention_apply(...): its pass/stage
        if name.startswith(("_", "__")):
            raise AttributeError(name)
        stages = self.stage_namespace
        if stages is not None and hasattr(stages, name):
            return getattr(stages, name)
        return getattr(self.namespace, name)

    def __repr__(self):
        return self.name

    def skip_reason(self) -> str | None:
        """Why this machine cannot run the backend, or None."""
        if self.name == "cpu" and not _ext.has_kernel(self.kernel, "cpu"):
            return f"no C++ CPU kernel {self.kernel} ({_ext.EXT_ERROR or 'not built'})"
        if self.name == "cuda" and not (HAS_GPU and _ext.has_kernel(self.kernel, "cuda")):
            return "needs a CUDA device and manet_kernels built with its CUDA kernels"
        if self.name == "triton":
            if not triton_available():
                return "triton is not installed"
            if not (self.interpreting or HAS_GPU):
                return ("triton was imported without TRITON_INTERPRET=1 and there is no GPU: "
                        "run pytest with TRITON_INTERPRET=1")
        return None

    def marks(self) -> list:
        out = [pytest.mark.triton] if self.name == "triton" else []
        if self.name in ("cuda", "triton") and HAS_GPU and not self.interpreting:
            out.append(pytest.mark.gpu)
        reason = self.skip_reason()
        return out + ([pytest.mark.skip(reason=reason)] if reason else [])


def backend_params(op: str, kernel: str, cases: dict, names=None) -> list:
    """``pytest.param(backend, *case)`` for each backend in ``names`` (default: the keys
    of ``cases``) and each case of ``cases[name]``: a tuple of values, or a
    ``pytest.param`` for cases with marks of their own. The id starts with the backend's
    name, then the case's values (``case_id``)."""
    out = []
    for name in names or cases:
        b = Backend(name, op, kernel)
        for case in cases[name]:
            values, marks = (case.values, list(case.marks)) if hasattr(case, "values") \
                else (tuple(case), [])
            out.append(pytest.param(b, *values, marks=b.marks() + marks,
                                    id=case_id(name, *values)))
    return out


def backends(op: str, kernel: str, *names) -> list:
    """``pytest.param(backend)`` for each of ``names``: a test that runs once per backend."""
    return backend_params(op, kernel, {n: [()] for n in names})


def gpu_only(reason="needs a CUDA device (bf16 and big shapes are GPU-only)"):
    return pytest.mark.skipif(not HAS_GPU, reason=reason)
