"""Pure-PyTorch definitions of the fused stages (issue 16): the contract of the stage ops.

A *stage* is one op boundary of a fused forward or backward: a pass over the activation
(``reference/passes.py``) together with the tiny work (size N*C, N*H*W or B*K*C) that
follows it, so that a step dispatches a handful of ops instead of dozens
(docs/design.md §7). Every backend implements the same stages: the C++ CPU kernels as
one op each (``manet_kernels::_<stage>``), Triton and CUDA as one or two kernel launches
each. Each function here mirrors one schema in ``csrc/manet_kernels.cpp``.

Conventions are those of ``reference/passes.py`` (acc dtype, contiguous small tensors,
int32 indices, first maximum wins). An optional tensor is ``None`` when absent; a
gradient of an absent parameter is returned as an empty tensor (``numel() == 0``).

Each function takes ``passes``, the namespace of pass kernels it composes: the
PyTorch contract by default; the CUDA backend composes its verified pass kernels
with these same functions until its stage kernels have passed on a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from manet_kernels.reference import passes as _torch_passes

# ---------------------------------------------------------------------------
# Mixed attention (docs/design.md §1). mlp(v) = w2 @ relu(w1 @ v + b1) + b2, applied to
# the stacked rows [avg; mx]; weights and biases in the acc dtype.


def _mlp_hidden(avg: Tensor, mx: Tensor, w1: Tensor, b1: Tensor | None) -> Tensor:
    """``h = [avg; mx] @ w1^T + b1``, ``(2N, C_r)``."""
    return torch.nn.functional.linear(torch.cat([avg, mx]), w1, b1)


def mixed_attention_channel_attn(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
                                 b2: Tensor | None, passes=_torch_passes
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """F1 + the shared MLP: ``(mc, avg, mx, im)`` with
    ``mc = sigmoid(mlp(avg) + mlp(mx))`` ``(N, C)`` and ``avg, mx, im`` from the channel
    pool (kept for the backward)."""
    avg, mx, im = passes.mixed_attention_channel_pool(x)
    n = avg.shape[0]
    o = torch.nn.functional.linear(torch.relu(_mlp_hidden(avg, mx, w1, b1)), w2, b2)
    return torch.sigmoid(o[:n] + o[n:]), avg, mx, im


def _bn_eval(z: Tensor, weight, bias, mean, var, eps: float) -> Tensor:
    a = (z - mean[0]) * torch.rsqrt(var[0] + eps)
    if weight is not None:
        a = a * weight[0]
    return a + bias[0] if bias is not None else a


def mixed_attention_spatial_attn(x: Tensor, mc: Tensor, conv_w: Tensor, conv_b: Tensor | None,
                                 bn_weight: Tensor | None, bn_bias: Tensor | None,
                                 bn_mean: Tensor | None, bn_var: Tensor | None, eps: float,
                                 batch_norm: bool, passes=_torch_passes
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """F2 + the k x k conv + BatchNorm with given statistics + sigmoid:
    ``(ms, z, sa, sm, ic)``, each ``(N, H, W)``, with ``z = conv(cat[sa, sm])`` (the
    spatial pool of ``mc * x``, then ``passes.mixed_attention_spatial_conv``).

    ``ms = sigmoid(a)`` where ``a = z`` without BatchNorm (``bn_mean`` None) and
    ``a = (z - bn_mean) / sqrt(bn_var + eps) * bn_weight + bn_bias`` with it (weight and
    bias each optional). ``batch_norm``: BatchNorm with batch statistics follows in
    ``mixed_attention_spatial_norm``; ``ms`` is then returned empty and the bn_*
    arguments are ignored."""
    sa, sm, ic = passes.mixed_attention_spatial_pool(x, mc)
    z = passes.mixed_attention_spatial_conv(sa, sm, conv_w, conv_b)
    if batch_norm:
        return z.new_empty(0), z, sa, sm, ic
    a = z if bn_mean is None else _bn_eval(z, bn_weight, bn_bias, bn_mean, bn_var, eps)
    return torch.sigmoid(a), z, sa, sm, ic


def mixed_attention_spatial_norm(z: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                                 running_mean: Tensor | None, running_var: Tensor | None,
                                 num_batches_tracked: Tensor | None, momentum: float | None,
                                 eps: float) -> tuple[Tensor, Tensor]:
    """BatchNorm2d(1) in training mode + sigmoid on ``z (N, H, W)``: ``(ms, stats)``,
    ``stats = [mean, biased var]`` of ``z`` ``(2,)``. Needs ``z.numel() > 1``.

    Updates, in place and in their own dtype, as ``nn.BatchNorm2d`` does: with
    ``num_batches_tracked`` given, it is incremented first; with ``running_mean`` and
    ``running_var`` given, each becomes ``(1 - m) * old + m * new`` with the batch mean
    and the *unbiased* batch variance, ``m = momentum`` or, when ``momentum`` is None,
    ``1 / num_batches_tracked`` (a cumulative average)."""
    count = z.numel()
    mean, var = z.mean(), z.var(unbiased=False)
    a = (z - mean) * torch.rsqrt(var + eps)
    if bn_weight is not None:
        a = a * bn_weight[0]
    if bn_bias is not None:
        a = a + bn_bias[0]
    stats = torch.stack([mean, var])
    with torch.no_grad():
        bn_running_update(running_mean, running_var, num_batches_tracked, stats, momentum,
                          count)
    return torch.sigmoid(a), stats


def bn_running_update(running_mean: Tensor | None, running_var: Tensor | None,
                      num_batches_tracked: Tensor | None, stats: Tensor,
                      momentum: float | None, count: int) -> None:
    """``nn.BatchNorm2d``'s running-statistics update from the batch ``stats = [mean,
    biased var]`` of ``count`` values, in place and on the device (no host sync)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is None:
        return
    m = momentum if momentum is not None else 1.0 / num_batches_tracked.to(stats.dtype)
    unbiased = stats[1] * (count / (count - 1))
    running_mean.copy_((1 - m) * running_mean.to(stats.dtype) + m * stats[0])
    running_var.copy_((1 - m) * running_var.to(stats.dtype) + m * unbiased)


def mixed_attention_spatial_norm_bwd(dms: Tensor, gms: Tensor | None, ms: Tensor, z: Tensor,
                                     stats: Tensor, bn_weight: Tensor | None, has_bias: bool,
                                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Back through the sigmoid and the training-mode BatchNorm: ``(dz, dbn_weight,
    dbn_bias)`` from ``dms (+ gms)``, the map's gradient; ``dbn_weight`` is empty without
    a weight, ``dbn_bias`` without a bias."""
    d = dms if gms is None else dms + gms
    da = d * ms * (1 - ms)
    rstd = torch.rsqrt(stats[1] + eps)
    zh = (z - stats[0]) * rstd
    dw = (da * zh).sum().reshape(1) if bn_weight is not None else z.new_empty(0)
    db = da.sum().reshape(1) if has_bias else z.new_empty(0)
    dzh = da * bn_weight[0] if bn_weight is not None else da
    dz = rstd * (dzh - dzh.mean() - zh * (dzh * zh).mean())
    return dz, dw, db


def mixed_attention_spatial_attn_bwd(d: Tensor, gms: Tensor | None, ms: Tensor | None,
                                     z: Tensor, sa: Tensor, sm: Tensor, conv_w: Tensor,
                                     has_conv_bias: bool, bn_weight: Tensor | None,
                                     has_bn_bias: bool, bn_mean: Tensor | None,
                                     bn_var: Tensor | None, eps: float, passes=_torch_passes
                                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Back through ``mixed_attention_spatial_attn``'s tiny part: ``(da_s, dm_s, dconv_w,
    dconv_b, dbn_weight, dbn_bias)``.

    With ``ms`` given, ``d (+ gms)`` is the map's gradient, taken back through the
    sigmoid and (``bn_mean`` given) the BatchNorm with given statistics (its weight and
    bias gradients: ``sum dA * zhat``, ``sum dA``); with ``ms`` None, ``d`` is already
    ``z``'s gradient (``mixed_attention_spatial_norm_bwd``) and the bn gradients are
    empty. Then back through the conv (``dconv_b`` empty without a conv bias)."""
    empty = z.new_empty(0)
    dbw = dbb = empty
    dz = d
    if ms is not None:
        dms = d if gms is None else d + gms
        dz = dms * ms * (1 - ms)
        if bn_mean is not None:
            rstd = torch.rsqrt(bn_var[0] + eps)
            if bn_weight is not None:
                dbw = (dz * (z - bn_mean[0]) * rstd).sum().reshape(1)
            if has_bn_bias:
                dbb = dz.sum().reshape(1)
            dz = dz * (rstd if bn_weight is None else bn_weight[0] * rstd)
    da_s, dm_s, dcw, dcb = passes.mixed_attention_spatial_conv_bwd(dz, sa, sm, conv_w,
                                                                   has_conv_bias)
    return da_s, dm_s, dcw, dcb, dbw, dbb


def mixed_attention_channel_attn_bwd(x: Tensor, da_s: Tensor, dm_s: Tensor, ic: Tensor,
                                     dmc: Tensor, gmc: Tensor | None, mc: Tensor, avg: Tensor,
                                     mx: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
                                     has_b2: bool, passes=_torch_passes
                                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """B2 + back through the channel sigmoid and the shared MLP:
    ``(d_avg, d_mx, dw1, db1, dw2, db2)``.

    ``mc``'s gradient is ``dmc + gmc`` (from B1 and the caller) plus B2's part through
    the spatial pooling (``passes.mixed_attention_bwd_channel``); ``dl`` = the logit's
    gradient; both MLP rows get ``dl``, so ``dw2 = dl^T (r_avg + r_mx)``, ``db2 = 2 sum dl``
    (``r = relu(h)``), ``dh = [dl @ w2; dl @ w2] * (h > 0)``, ``dw1 = dh^T [avg; mx]``,
    ``db1 = sum dh``, ``[d_avg; d_mx] = dh @ w1``. ``db1`` is empty without ``b1``,
    ``db2`` without ``has_b2``."""
    dmc = dmc + passes.mixed_attention_bwd_channel(x, da_s, dm_s, ic)
    if gmc is not None:
        dmc = dmc + gmc
    dl = dmc * mc * (1 - mc)
    n = avg.shape[0]
    h = _mlp_hidden(avg, mx, w1, b1)
    r = torch.relu(h)
    dr = dl @ w2
    dh = torch.cat([dr, dr]) * (h > 0).to(dr.dtype)
    dv = dh @ w1
    empty = avg.new_empty(0)
    return (dv[:n].contiguous(), dv[n:].contiguous(), dh.t() @ torch.cat([avg, mx]),
            dh.sum(0) if b1 is not None else empty, dl.t() @ (r[:n] + r[n:]),
            2 * dl.sum(0) if has_b2 else empty)


# ---------------------------------------------------------------------------
# BR-NPA (docs/design.md §3); ``eps`` is reference.brnpa.NORM_EPS.

def brnpa_prepare(x: Tensor, paper: bool, eps: float, passes=_torch_passes
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The norms pass and what follows it: ``(nrm, inv, score)``, each ``(B, H, W)``:
    ``nrm = ||f_i||``, ``inv = 1 / (nrm + eps)``, and the first part's score
    ``nrm^2`` (``paper``) or ``nrm + eps`` (official)."""
    nrm = passes.brnpa_norms(x)
    return nrm, 1.0 / (nrm + eps), nrm * nrm if paper else nrm + eps


def brnpa_part(x: Tensor, inv: Tensor, score: Tensor, j: int, paper: bool, idx: Tensor,
               s: Tensor, total: Tensor, vectors: Tensor, maps: Tensor,
               passes=_torch_passes) -> None:
    """Part ``j``, in place: its representative ``idx[:, j] = argmax_i score`` (first
    maximum; a NaN counts as the maximum, as in ``torch.argmax``), then
    ``(s_j, sv) = brnpa_step``, ``S = sum_i s_j`` (``+inf`` where it is exactly 0: the
    part gets weights 0), ``s[:, j] = s_j``, ``total[:, j] = S``,
    ``vectors[:, j] = sv / S`` and ``maps[:, j] = s_j / S`` (in their own dtype, x's),
    and ``score *= 1 - (s_j / S if paper else s_j)`` for the next part.

    Shapes: ``inv, score (B, H, W)``; ``idx (B, K)`` int64; ``s (B, K, H, W)`` and
    ``total (B, K)`` in acc dtype; ``vectors (B, K, C)`` and ``maps (B, K, H, W)``."""
    b = x.shape[0]
    i = score.reshape(b, -1).argmax(1)
    sj, sv = passes.brnpa_step(x, inv, i)
    t = sj.reshape(b, -1).sum(1)
    t = torch.where(t == 0, torch.inf, t)
    wgt = sj / t[:, None, None]
    idx[:, j] = i
    s[:, j] = sj
    total[:, j] = t
    vectors[:, j] = (sv / t[:, None]).to(vectors.dtype)
    maps[:, j] = wgt.to(maps.dtype)
    score.mul_(1 - (wgt if paper else sj))


def brnpa_bwd_finish(x: Tensor, dw: Tensor, u: Tensor, t: Tensor, inv: Tensor, nrm: Tensor,
                     idx: Tensor, s: Tensor, total: Tensor, gv: Tensor | None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """The tiny part of the backward, between ``brnpa_bwd_reduce`` (``dw (B, K, H, W)``,
    ``u (B, K, C)``, ``t (B, C)``) and ``brnpa_bwd_dx``: ``(a (B, 3K, H, W),
    m (B, 3K, C), c (B, H, W))`` such that ``dx = sum_j a_j m_j - c f`` is the whole
    gradient. With ``w = s / S``, ``c_k = sum_i dw w``, ``ds = (dw - c_k) / S``,
    ``q = (u - c_k t) / S``, ``r_k = f_{idx_k}`` and ``dr_k = q_k inv[idx_k]``:
    ``a = [w; ds * inv * inv[idx_k]; onehot(idx_k)]``, ``m = [gv; r; dr]`` (``gv`` None:
    zeros) and ``c = (sum_k ds s) * inv / nrm`` (0 where ``nrm`` is 0).

    docs/design.md's ``dr`` also has ``-(sum_i ds_i s_i) r / (nrm_r ||r||)``; that sum is
    0 (``w`` does not change when ``s`` is scaled), so it is left out. The one-hot rows
    add each representative's own gradient at its position (twice, in part order, for a
    position chosen twice)."""
    b, ch, h, w_ = x.shape
    k = idx.shape[1]
    p = h * w_
    dw = dw.reshape(b, k, p)
    s = s.reshape(b, k, p)
    inv = inv.reshape(b, p)
    tot = total[..., None]
    wgt = s / tot
    ck = (dw * wgt).sum(2)
    ds = (dw - ck[..., None]) / tot
    q = (u - ck[..., None] * t[:, None]) / tot
    f = x.to(inv.dtype).reshape(b, ch, p)
    r = f.gather(2, idx[:, None, :].expand(b, ch, k)).transpose(1, 2)  # (B, K, C)
    inv_r = inv.gather(1, idx)
    onehot = torch.zeros_like(s).scatter_(2, idx[..., None], 1.0)
    a = torch.cat([wgt, ds * inv[:, None] * inv_r[..., None], onehot], 1)
    gv = torch.zeros_like(u) if gv is None else gv
    m = torch.cat([gv, r, q * inv_r[..., None]], 1)
    nrm = nrm.reshape(b, p)
    safe = torch.where(nrm > 0, inv / nrm.clamp_min(1e-300), torch.zeros_like(inv))
    c = (ds * s).sum(1) * safe
    return a.reshape(b, 3 * k, h, w_), m, c.reshape(b, h, w_)
