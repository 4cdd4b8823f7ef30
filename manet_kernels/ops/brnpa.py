"""Fused BR-NPA grouping: public function, argument checks, forward/backward bodies.

Forward = one pass for the norms, then one pass per part (similarities and the
weighted sum of the features from the same read); backward = two passes (one read
for every part's ``<f_i, dv_k>`` and the two C-vector sums, one read + one write for
``dx``). docs/design.md §3 has the formulas. Tiny (B, K, P) / (B, K, C) work
stays in PyTorch between the passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from manet_kernels.ops._boundary import Boundary, drop_in_function
from manet_kernels.ops._common import activation_format, check_dtype, pass_kernels, resolve_backend
from manet_kernels.reference import brnpa as _reference
from manet_kernels.reference.brnpa import NORM_EPS, VARIANTS
from manet_kernels.reference.passes import acc_dtype

__all__ = ["brnpa", "BRNPAFunction"]


def _passes(backend: str):
    return pass_kernels(backend, "brnpa")


def _forward_impl(x: Tensor, n_parts: int, paper: bool, backend: str
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    kern = _passes(backend)
    x = x.contiguous(memory_format=activation_format(x))
    b, c, h, w = x.shape
    if b == 0:
        return _fake_forward(x, n_parts)
    nrm0 = kern.brnpa_norms(x).reshape(b, h * w)
    inv = 1.0 / (nrm0 + NORM_EPS)
    score = nrm0 * nrm0 if paper else nrm0 + NORM_EPS
    idxs, sims, sums, vectors = [], [], [], []
    for _ in range(n_parts):
        idx = score.argmax(1)  # first maximum, as the reference
        s, sv = kern.brnpa_step(x, inv.reshape(b, h, w), idx)
        s = s.reshape(b, h * w)
        total = _nonzero_sum(s)
        wgt = s / total
        vectors.append(sv / total)
        score = score * (1 - (wgt if paper else s))
        idxs.append(idx)
        sims.append(s)
        sums.append(total)
    s = torch.stack(sims, 1)
    total = torch.cat(sums, 1)
    maps = (s / total[..., None]).reshape(b, n_parts, h, w)
    return (torch.stack(vectors, 1).to(x.dtype), maps.to(x.dtype), inv, nrm0,
            torch.stack(idxs, 1), s, total)


def _fake_forward(x, n_parts):
    b, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    bp = x.new_empty((b, h * w), dtype=acc)
    return (x.new_empty((b, n_parts, c)), x.new_empty((b, n_parts, h, w)), bp, bp.clone(),
            x.new_empty((b, n_parts), dtype=torch.int64),
            x.new_empty((b, n_parts, h * w), dtype=acc), x.new_empty((b, n_parts), dtype=acc))


def _nonzero_sum(s: Tensor) -> Tensor:
    """``S = sum_i s_i`` per sample, ``(B, 1)``, with ``+inf`` where it is exactly 0.

    A part whose similarities sum to 0 (e.g. its representative is an all-zero
    vector) gets weights 0 instead of 0/0 (issue 12.5). Dividing by ``+inf`` gives
    exactly 0 in the map, the vector, the paper's score update and every backward
    term that divides by ``S`` (``ds``, ``q``), and is the same division as the
    official formula wherever ``S != 0``, so those results keep their bits."""
    total = s.sum(1, keepdim=True)
    return torch.where(total == 0, torch.inf, total)


def _backward_impl(gv: Tensor | None, gmap: Tensor | None, x: Tensor, inv: Tensor,
                   nrm0: Tensor, idx: Tensor, s: Tensor, total: Tensor, backend: str) -> Tensor:
    kern = _passes(backend)
    acc = inv.dtype
    x = x.contiguous(memory_format=activation_format(x))
    b, c, h, w = x.shape
    if b == 0:
        return torch.zeros_like(x)
    k = idx.shape[1]
    gv = gv.to(acc) if gv is not None else inv.new_zeros(b, k, c)
    gmap = gmap.to(acc) if gmap is not None else inv.new_zeros(b, k, h, w)

    dw, u, t = kern.brnpa_bwd_reduce(x, inv.reshape(b, h, w), gv.contiguous(),
                                     gmap.contiguous())
    dw = dw.reshape(b, k, h * w)
    wgt = s / total[..., None]
    ck = (dw * wgt).sum(2)                                   # (B, K)
    ds = (dw - ck[..., None]) / total[..., None]             # grad of the similarities
    q = (u - ck[..., None] * t[:, None]) / total[..., None]  # sum_i ds_i f_i / nrm_i
    r = x.flatten(2).gather(2, idx[:, None, :].expand(b, c, k)).transpose(1, 2).to(acc)  # (B, K, C)
    inv_r = inv.gather(1, idx)
    # docs/design.md's dr also has -(sum_i ds_i s_i) r / (nrm_r ||r||), through the
    # representative's own norm. That sum is 0: w = s / S does not change when s is
    # scaled, so sum_i ds_i s_i = sum_i (dw_i - c_k) w_i = c_k - c_k (sum_i w_i = 1; and
    # ds = 0 for a part with S = 0). Computed, it is only rounding noise.
    dr = q * inv_r[..., None]

    a = torch.cat([wgt, ds * inv[:, None] * inv_r[..., None]], 1).reshape(b, 2 * k, h, w)
    m = torch.cat([gv, r], 1)
    safe = torch.where(nrm0 > 0, inv / nrm0.clamp_min(1e-300), torch.zeros_like(inv))
    cc = ((ds * s).sum(1) * safe).reshape(b, h, w)
    dx = kern.brnpa_bwd_dx(x, a.contiguous(), m.contiguous(), cc.contiguous())
    # The representatives' own dependence: K columns added in place, one part after the
    # other (a position chosen twice gets both, in order: deterministic). index_put_
    # with accumulate=True would do it in one call, but on CUDA it sorts on a contiguous
    # copy of the (B, P, C) view, i.e. two full copies of dx in NCHW.
    dxf = dx.flatten(2)  # (B, C, P), a view in either layout
    drt = dr.to(dx.dtype)
    for j in range(k):
        at = idx[:, j].view(b, 1, 1).expand(b, c, 1)
        dxf.scatter_(2, at, dxf.gather(2, at) + drt[:, j, :, None])
    return dx


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
