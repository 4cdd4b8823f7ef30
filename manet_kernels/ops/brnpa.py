"""Fused BR-NPA grouping: public function, argument checks, forward/backward bodies.

Forward = one stage for the norms, then one stage per part (similarities and the
weighted sum of the features from the same read, then the part's normalisation, score
update and outputs); backward = three stages (one read for every part's ``<f_i, dv_k>``
and the two C-vector sums, the tiny algebra, one read + one write for ``dx``).
docs/design.md §3 has the formulas, manet_kernels/reference/stages.py the contract.
"""

from __future__ import annotations

import torch
from torch import Tensor

from manet_kernels.ops._boundary import Boundary, drop_in_function
from manet_kernels.ops._common import (
    activation_format,
    check_dtype,
    resolve_backend,
    stage_kernels,
)
from manet_kernels.reference import brnpa as _reference
from manet_kernels.reference.brnpa import NORM_EPS, VARIANTS
from manet_kernels.reference.passes import acc_dtype

__all__ = ["brnpa", "BRNPAFunction"]


def _stages(backend: str, device: torch.device):
    return stage_kernels(backend, "brnpa", device.type)


def _forward_impl(x: Tensor, n_parts: int, paper: bool, backend: str
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The prepare stage (norms, ``1 / (nrm + eps)``, the first score), then one stage
    per part, each writing its slice of the outputs (reference/stages.py)."""
    st = _stages(backend, x.device)
    x = x.contiguous(memory_format=activation_format(x))
    b, c, h, w = x.shape
    if b == 0:
        return _fake_forward(x, n_parts)
    nrm, inv, score = st.brnpa_prepare(x, paper, NORM_EPS)
    vectors, maps, idx, s, total = _part_outputs(x, n_parts)
    for j in range(n_parts):
        st.brnpa_part(x, inv, score, j, paper, idx, s, total, vectors, maps)
    return vectors, maps, inv, nrm, idx, s, total


def _part_outputs(x: Tensor, k: int):
    """``(vectors, maps, idx, s, total)``, allocated (no fill) for the part stages."""
    b, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    return (x.new_empty((b, k, c)), x.new_empty((b, k, h, w)),
            x.new_empty((b, k), dtype=torch.int64), x.new_empty((b, k, h, w), dtype=acc),
            x.new_empty((b, k), dtype=acc))


def _fake_forward(x, n_parts):
    b, c, h, w = x.shape
    bp = x.new_empty((b, h, w), dtype=acc_dtype(x.dtype))
    vectors, maps, idx, s, total = _part_outputs(x, n_parts)
    return vectors, maps, bp, bp.clone(), idx, s, total


def _backward_impl(gv: Tensor | None, gmap: Tensor | None, x: Tensor, inv: Tensor,
                   nrm: Tensor, idx: Tensor, s: Tensor, total: Tensor, backend: str) -> Tensor:
    """Three stages: one read of ``x`` for every part's sums, the tiny algebra between
    (reference/stages.py, brnpa_bwd_finish), one read + one write for ``dx``."""
    st = _stages(backend, x.device)
    acc = inv.dtype
    x = x.contiguous(memory_format=activation_format(x))
    b, c, h, w = x.shape
    if b == 0:
        return torch.zeros_like(x)
    k = idx.shape[1]
    gv = None if gv is None else gv.to(acc).contiguous()
    dmap = inv.new_zeros(b, k, h, w) if gmap is None else gmap.to(acc).contiguous()
    dw, u, t = st.brnpa_bwd_reduce(x, inv, inv.new_zeros(b, k, c) if gv is None else gv, dmap)
    a, m, cc = st.brnpa_bwd_finish(x, dw, u, t, inv, nrm, idx, s, total, gv)
    return st.brnpa_bwd_dx(x, a, m, cc)


def _fake_backward(gv, gmap, x, inv, nrm0, idx, s, total, backend):
    return torch.empty_like(x, memory_format=activation_format(x))


def _save(inputs, outputs):
    return (inputs[0], *outputs[2:]), (inputs[3],)  # x, inv, nrm, idx, s, S; backend


# outputs: (vectors, maps, inv_nrm, nrm, idx, s, S); all but the first two are small
# tensors kept for the backward (S is +inf for a part whose similarities sum to 0)
_BRNPA = Boundary("brnpa", _forward_impl, _backward_impl,
                  forward_fake=lambda x, n_parts, paper, backend: _fake_forward(x, n_parts),
                  backward_fake=_fake_backward, save=_save, grad_inputs=(0,), grad_outputs=2)


def _check_args(x, n_parts, variant, backend) -> str:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if min(x.shape[1:]) < 1:
        raise ValueError(f"x must have C, H, W >= 1, got shape {tuple(x.shape)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if isinstance(n_parts, bool) or not isinstance(n_parts, int):
        raise TypeError(f"n_parts must be an int, got {type(n_parts).__name__}")
    p = x.shape[2] * x.shape[3]
    if not 1 <= n_parts <= p:
        raise ValueError(f"n_parts must be in [1, H*W={p}], got {n_parts}")
    backend = resolve_backend(backend, x.device, "brnpa_step")
    check_dtype("x", x, backend)
    return backend


def brnpa(x: Tensor, n_parts: int = 3, *, variant: str = "official",
          backend: str = "auto") -> tuple[Tensor, Tensor]:
    """BR-NPA grouping of the feature vectors of ``x (B, C, H, W)`` into ``n_parts``
    representative vectors ``(B, n_parts, C)`` and part maps ``(B, n_parts, H, W)``.

    ``variant="official"`` follows the authors' code (score ``||f|| + 1e-5``, updated by
    the similarities); ``"paper"`` follows Alg. 1 (score ``||f||^2``, updated by the
    normalised weights). Gradients flow through both outputs; the argmax indices are
    constants. A part whose similarities sum to exactly zero (e.g. its representative
    is an all-zero vector, or the sample is all zeros) gets weights 0: a zero map, a
    zero vector and no gradient through that part, as in the reference.
    """
    backend = _check_args(x, n_parts, variant, backend)
    if backend == "reference":
        return _reference.brnpa(x, n_parts, variant=variant)
    out = _BRNPA(x, n_parts, variant == "paper", backend)
    return out[0], out[1]


def _function_args(ctx, x, n_parts=3, variant="official"):
    backend = _check_args(x, n_parts, variant, "auto")
    backend = "torch" if backend == "reference" else backend  # the pass contract, through the op
    return _BRNPA, (x, n_parts, variant == "paper", backend)


BRNPAFunction = drop_in_function(
    "BRNPAFunction", """Drop-in ``torch.autograd.Function``: ``BRNPAFunction.apply(x, n_parts,
    variant)`` returns ``(vectors, maps)`` with the automatic backend.""", _function_args,
    outputs=2)
