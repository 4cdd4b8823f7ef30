"""Triton kernels for the six mixed-attention stages (issue 16), built on the passes of
``manet_kernels/triton/mixed_attention.py``.

Each stage launcher (``mixed_attention_channel_attn`` and the rest) has the signature
and return values of the function of the same name in
``manet_kernels/reference/stages.py`` (without ``passes``), which is the contract. A
stage runs its tiny work (shared MLP, k x k conv, BatchNorm, sigmoids and their
backwards) inside its kernels: one or two launches, and no other PyTorch op than
allocation. A stage that starts with a pass calls that pass's launcher, so the pass
module's launch and device helpers and test hooks (``_launch``, ``_FORCED_CONFIGS``,
``_device_ctx``, ``_interpreting``) serve both modules.

Activations are seen as ``(N, C, P)`` views as in the pass module; reductions never use
float atomics. On CPU tensors the kernels run only under the Triton interpreter.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from manet_kernels.triton._common import INTERPRET as _INTERPRET_AT_IMPORT
from manet_kernels.triton._common import acc_dtype as _acc_dtype
from manet_kernels.triton._common import block_grid
from manet_kernels.triton._common import configs as _configs
from manet_kernels.triton._common import needs_i64 as _needs_i64
from manet_kernels.triton._common import sample_counters as _sample_counters
from manet_kernels.triton._tiles import div_rn, sample_block, sqrt_rn
from manet_kernels.triton.mixed_attention import (
    _BWD_CHANNEL_CONFIGS,
    _INTERP_TILE,
    _activation,
    _bwd_channel_rows,
    _device_ctx,
    _launch,
    _small,
    mixed_attention_channel_pool,
    mixed_attention_spatial_pool,
)

__all__ = [
    "mixed_attention_channel_attn",
    "mixed_attention_spatial_attn",
    "mixed_attention_spatial_norm",
    "mixed_attention_spatial_norm_bwd",
    "mixed_attention_spatial_attn_bwd",
    "mixed_attention_channel_attn_bwd",
]


# --------------------------------------------------------------------------- #
# stage kernels (issue 16; contract: manet_kernels/reference/stages.py): the tiny
# work between the passes (shared MLP, k x k conv, BatchNorm, sigmoids and their
# backwards) runs inside kernels, so a stage is one or two launches. Their tiles
# are picked by the launcher (_stage_tile), not autotuned: spatial_norm updates the
# running statistics in place, which autotune's repeated runs would repeat.
# --------------------------------------------------------------------------- #


@triton.jit
def _f64_arg(bits):
    # A float passed as the int64 bits of its IEEE double (_f64_bits): Triton passes
    # a Python float as float32, which would round eps and momentum for float64.
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _rsqrt(v):
    # 1 / sqrt(v) rounded as torch.rsqrt's (IEEE sqrt and division, not the fast
    # approximations).
    return div_rn(tl.full(v.shape, 1.0, v.dtype), sqrt_rn(v))


@triton.jit
def _relu(h):
    # torch.relu: NaN stays NaN.
    return tl.where(h < 0, 0.0, h)


@triton.jit
def _mlp_hidden_tile(avg_row, mx_row, dl_row, w1_ptr, b1_ptr, w2_ptr, offs_r, mask_r, C, CR,
                     HAS_B1: tl.constexpr, WITH_DR: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """For the hidden units ``offs_r``: ``h = w1 @ v + b1`` for ``v`` = the rows
    ``avg_row`` and ``mx_row`` and, with ``WITH_DR``, ``dr = dl_row @ w2``; each
    ``(BLOCK_R,)``, summed over C in tiles in a fixed order."""
    acc_t = avg_row.dtype.element_ty
    ha = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_t)
    hm = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_t)
    dr = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_t)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        m = mask_r[:, None] & mask_c[None, :]
        w = tl.load(w1_ptr + offs_r[:, None] * C + offs_c[None, :], mask=m, other=0.0)
        a = tl.load(avg_row + offs_c, mask=mask_c, other=0.0)
        b = tl.load(mx_row + offs_c, mask=mask_c, other=0.0)
        ha += w * a[None, :]
        hm += w * b[None, :]
        if WITH_DR:
            w2t = tl.load(w2_ptr + offs_c[None, :] * CR + offs_r[:, None], mask=m, other=0.0)
            # dl was written by other programs: read past L1.
            d = tl.load(dl_row + offs_c, mask=mask_c, other=0.0, cache_modifier=".cg")
            dr += w2t * d[None, :]
    ha = tl.sum(ha, axis=1)
    hm = tl.sum(hm, axis=1)
    if HAS_B1:
        b1 = tl.load(b1_ptr + offs_r, mask=mask_r, other=0.0)
        ha = ha + b1
        hm = hm + b1
    return ha, hm, tl.sum(dr, axis=1)


@triton.jit
def _mixed_attention_channel_mlp_kernel(
    avg_ptr, mx_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, hid_ptr, mc_ptr,
    C, CR,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program per sample: mc = sigmoid(mlp(avg) + mlp(mx)). The hidden rows
    # relu(h) (2, CR) go through the scratch hid between the two products.
    acc_t = avg_ptr.dtype.element_ty
    n = tl.program_id(0).to(tl.int64)
    avg_row = avg_ptr + n * C
    mx_row = mx_ptr + n * C
    hid_row = hid_ptr + n * 2 * CR
    for r0 in range(0, CR, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < CR
        ha, hm, _ = _mlp_hidden_tile(avg_row, mx_row, avg_row, w1_ptr, b1_ptr, w2_ptr, offs_r,
                                     mask_r, C, CR, HAS_B1, False, BLOCK_R, BLOCK_C)
        tl.store(hid_row + offs_r, _relu(ha), mask=mask_r)
        tl.store(hid_row + CR + offs_r, _relu(hm), mask=mask_r)
    tl.debug_barrier()  # hid is read back below by other threads of this program
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        oa = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_t)
        om = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_t)
        for r0 in range(0, CR, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < CR
            w = tl.load(w2_ptr + offs_c[None, :] * CR + offs_r[:, None],
                        mask=mask_r[:, None] & mask_c[None, :], other=0.0)
            ra = tl.load(hid_row + offs_r, mask=mask_r, other=0.0)
            rm = tl.load(hid_row + CR + offs_r, mask=mask_r, other=0.0)
            oa += w * ra[:, None]
            om += w * rm[:, None]
        oa = tl.sum(oa, axis=0)
        om = tl.sum(om, axis=0)
        if HAS_B2:
            b2 = tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0)
            oa = oa + b2
            om = om + b2
        tl.store(mc_ptr + n * C + offs_c, tl.sigmoid(oa + om), mask=mask_c)


@triton.jit(do_not_specialize=["eps_bits"])
def _mixed_attention_spatial_map_kernel(
    sa_ptr, sm_ptr, w_ptr, b_ptr, bnw_ptr, bnb_ptr, bnm_ptr, bnv_ptr, z_ptr, ms_ptr,
    H, W, eps_bits,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_MS: tl.constexpr, BN: tl.constexpr,
    HAS_BN_W: tl.constexpr, HAS_BN_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # z = conv(cat[sa, sm]) (k x k, zero padding k//2) for one tile of positions of
    # one sample, then (WRITE_MS) ms = sigmoid(BN(z)) with the given statistics.
    acc_t = z_ptr.dtype.element_ty
    P = H * W
    pid = tl.program_id(0)
    num_pb = tl.cdiv(P, BLOCK_P)
    base = (pid // num_pb).to(tl.int64) * P
    offs_p = (pid % num_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    hh = offs_p // W
    ww = offs_p % W
    z = tl.zeros((BLOCK_P,), dtype=acc_t)
    for t in range(0, K * K):
        hi = hh + (t // K - K // 2)
        wj = ww + (t % K - K // 2)
        ok = mask_p & (hi >= 0) & (hi < H) & (wj >= 0) & (wj < W)
        q = base + hi * W + wj
        z += (tl.load(w_ptr + t) * tl.load(sa_ptr + q, mask=ok, other=0.0)
              + tl.load(w_ptr + K * K + t) * tl.load(sm_ptr + q, mask=ok, other=0.0))
    if HAS_BIAS:
        z += tl.load(b_ptr)
    tl.store(z_ptr + base + offs_p, z, mask=mask_p)
    if WRITE_MS:
        a = z
        if BN:
            eps = _f64_arg(eps_bits).to(acc_t)
            a = (z - tl.load(bnm_ptr)) * _rsqrt(tl.load(bnv_ptr) + eps)
            if HAS_BN_W:
                a = a * tl.load(bnw_ptr)
            if HAS_BN_B:
                a = a + tl.load(bnb_ptr)
        tl.store(ms_ptr + base + offs_p, tl.sigmoid(a), mask=mask_p)


@triton.jit(do_not_specialize=["eps_bits", "mom_bits", "keep_bits", "corr_bits"])
def _mixed_attention_spatial_norm_kernel(
    z_ptr, bnw_ptr, bnb_ptr, rmean_ptr, rvar_ptr, nbt_ptr, ms_ptr, stats_ptr,
    COUNT, eps_bits, mom_bits, keep_bits, corr_bits,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RUNNING: tl.constexpr,
    HAS_NBT: tl.constexpr, CUMULATIVE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program: batch mean and biased variance of z (two passes, fixed order),
    # ms = sigmoid(BN(z)) (a third pass), then the running statistics, in place.
    acc_t = z_ptr.dtype.element_ty
    s = tl.zeros((BLOCK,), dtype=acc_t)
    for i0 in range(0, COUNT, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        s += tl.load(z_ptr + offs, mask=offs < COUNT, other=0.0)
    mean = tl.sum(s, axis=0) / COUNT
    s = tl.zeros((BLOCK,), dtype=acc_t)
    for i0 in range(0, COUNT, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        mask = offs < COUNT
        dev = tl.where(mask, tl.load(z_ptr + offs, mask=mask, other=0.0) - mean, 0.0)
        s += dev * dev
    var = tl.sum(s, axis=0) / COUNT
    tl.store(stats_ptr, mean)
    tl.store(stats_ptr + 1, var)
    rstd = _rsqrt(var + _f64_arg(eps_bits).to(acc_t))
    for i0 in range(0, COUNT, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        mask = offs < COUNT
        a = (tl.load(z_ptr + offs, mask=mask, other=0.0) - mean) * rstd
        if HAS_W:
            a = a * tl.load(bnw_ptr)
        if HAS_B:
            a = a + tl.load(bnb_ptr)
        tl.store(ms_ptr + offs, tl.sigmoid(a), mask=mask)
    if HAS_NBT:
        nbt = tl.load(nbt_ptr) + 1
        tl.store(nbt_ptr, nbt)
    if HAS_RUNNING:
        if CUMULATIVE:  # momentum None: m = 1 / num_batches_tracked, in z's dtype
            m = 1.0 / nbt.to(acc_t)
            keep = 1.0 - m
        else:  # 1 - momentum taken on the host in double, as the contract's Python float
            m = _f64_arg(mom_bits).to(acc_t)
            keep = _f64_arg(keep_bits).to(acc_t)
        unbiased = var * _f64_arg(corr_bits).to(acc_t)
        tl.store(rmean_ptr, keep * tl.load(rmean_ptr).to(acc_t) + m * mean)
        tl.store(rvar_ptr, keep * tl.load(rvar_ptr).to(acc_t) + m * unbiased)


@triton.jit(do_not_specialize=["eps_bits"])
def _mixed_attention_spatial_norm_bwd_kernel(
    dms_ptr, g_ptr, ms_ptr, z_ptr, stats_ptr, bnw_ptr, dz_ptr, dw_ptr, db_ptr,
    COUNT, eps_bits,
    HAS_G: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program: back through the sigmoid and training-mode BatchNorm; the sums
    # over the batch in a first pass (fixed order), dz in a second.
    acc_t = z_ptr.dtype.element_ty
    mean = tl.load(stats_ptr)
    rstd = _rsqrt(tl.load(stats_ptr + 1) + _f64_arg(eps_bits).to(acc_t))
    w = 1.0
    if HAS_W:
        w = tl.load(bnw_ptr)
    s_da = tl.zeros((BLOCK,), dtype=acc_t)
    s_dazh = tl.zeros((BLOCK,), dtype=acc_t)
    s_dzh = tl.zeros((BLOCK,), dtype=acc_t)
    s_dzhzh = tl.zeros((BLOCK,), dtype=acc_t)
    for i0 in range(0, COUNT, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        mask = offs < COUNT
        da, zh, dzh = _norm_bwd_terms(offs, mask, dms_ptr, g_ptr, ms_ptr, z_ptr, mean, rstd, w,
                                      HAS_G, HAS_W)
        s_da += tl.where(mask, da, 0.0)
        s_dazh += tl.where(mask, da * zh, 0.0)
        s_dzh += tl.where(mask, dzh, 0.0)
        s_dzhzh += tl.where(mask, dzh * zh, 0.0)
    if HAS_W:
        tl.store(dw_ptr, tl.sum(s_dazh, axis=0))
    if HAS_B:
        tl.store(db_ptr, tl.sum(s_da, axis=0))
    m_dzh = tl.sum(s_dzh, axis=0) / COUNT
    m_dzhzh = tl.sum(s_dzhzh, axis=0) / COUNT
    for i0 in range(0, COUNT, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        mask = offs < COUNT
        da, zh, dzh = _norm_bwd_terms(offs, mask, dms_ptr, g_ptr, ms_ptr, z_ptr, mean, rstd, w,
                                      HAS_G, HAS_W)
        tl.store(dz_ptr + offs, rstd * (dzh - m_dzh - zh * m_dzhzh), mask=mask)


@triton.jit
def _norm_bwd_terms(offs, mask, dms_ptr, g_ptr, ms_ptr, z_ptr, mean, rstd, w,
                    HAS_G: tl.constexpr, HAS_W: tl.constexpr):
    d = tl.load(dms_ptr + offs, mask=mask, other=0.0)
    if HAS_G:
        d = d + tl.load(g_ptr + offs, mask=mask, other=0.0)
    s = tl.load(ms_ptr + offs, mask=mask, other=0.0)
    da = d * s * (1 - s)
    zh = (tl.load(z_ptr + offs, mask=mask, other=0.0) - mean) * rstd
    dzh = da
    if HAS_W:
        dzh = da * w
    return da, zh, dzh


@triton.jit
def _map_grad(q, ok, d_ptr, g_ptr, ms_ptr, scale,
              HAS_MS: tl.constexpr, HAS_G: tl.constexpr, SCALE: tl.constexpr):
    # z's gradient at the flat positions q: d, or back through the sigmoid (ms given)
    # and (SCALE) the BatchNorm with given statistics; 0 where not ok.
    d = tl.load(d_ptr + q, mask=ok, other=0.0)
    if HAS_MS:
        if HAS_G:
            d = d + tl.load(g_ptr + q, mask=ok, other=0.0)
        s = tl.load(ms_ptr + q, mask=ok, other=0.0)
        d = d * s * (1 - s)
        if SCALE:
            d = d * scale
    return d


@triton.jit(do_not_specialize=["N", "eps_bits"])
def _mixed_attention_spatial_attn_bwd_kernel(
    d_ptr, g_ptr, ms_ptr, z_ptr, sa_ptr, sm_ptr, w_ptr, bnw_ptr, bnm_ptr, bnv_ptr,
    dsa_ptr, dsm_ptr, dw_ptr, db_ptr, dbnw_ptr, dbnb_ptr,
    N, H, W, eps_bits,
    K: tl.constexpr, HAS_MS: tl.constexpr, HAS_G: tl.constexpr, BN: tl.constexpr,
    HAS_BN_W: tl.constexpr, HAS_BN_B: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_RED: tl.constexpr,
):
    # Programs 0 .. K*K-1: the conv weight taps (both input maps) of one offset;
    # program K*K: the conv bias and the BatchNorm weight and bias; each sums over
    # all N*H*W positions in a fixed order. Then N * cdiv(P, BLOCK_P) programs, each
    # da_s and dm_s for a tile of positions of one sample.
    acc_t = dsa_ptr.dtype.element_ty
    P = H * W
    NT: tl.constexpr = K * K
    mean = 0.0
    rstd = 1.0
    scale = 1.0
    if BN:
        mean = tl.load(bnm_ptr)
        rstd = _rsqrt(tl.load(bnv_ptr) + _f64_arg(eps_bits).to(acc_t))
        scale = rstd
        if HAS_BN_W:
            scale = tl.load(bnw_ptr) * rstd
    pid = tl.program_id(0)
    count = N.to(tl.int64) * P
    if pid < NT:
        hoff = pid // K - K // 2
        woff = pid % K - K // 2
        acc_a = tl.zeros((BLOCK_RED,), dtype=acc_t)
        acc_m = tl.zeros((BLOCK_RED,), dtype=acc_t)
        for i0 in range(0, count, BLOCK_RED):
            offs = i0 + tl.arange(0, BLOCK_RED)
            mask = offs < count
            dz = _map_grad(offs, mask, d_ptr, g_ptr, ms_ptr, scale, HAS_MS, HAS_G, BN)
            p = offs % P
            hi = p // W + hoff
            wj = p % W + woff
            ok = mask & (hi >= 0) & (hi < H) & (wj >= 0) & (wj < W)
            q = offs + hoff * W + woff
            acc_a += dz * tl.load(sa_ptr + q, mask=ok, other=0.0)
            acc_m += dz * tl.load(sm_ptr + q, mask=ok, other=0.0)
        tl.store(dw_ptr + pid, tl.sum(acc_a, axis=0))
        tl.store(dw_ptr + NT + pid, tl.sum(acc_m, axis=0))
    elif pid == NT:
        acc_b = tl.zeros((BLOCK_RED,), dtype=acc_t)
        acc_bw = tl.zeros((BLOCK_RED,), dtype=acc_t)
        acc_bb = tl.zeros((BLOCK_RED,), dtype=acc_t)
        for i0 in range(0, count, BLOCK_RED):
            offs = i0 + tl.arange(0, BLOCK_RED)
            mask = offs < count
            da = _map_grad(offs, mask, d_ptr, g_ptr, ms_ptr, scale, HAS_MS, HAS_G, False)
            if BN:
                if HAS_BN_W:
                    zv = tl.load(z_ptr + offs, mask=mask, other=0.0)
                    acc_bw += tl.where(mask, da * (zv - mean) * rstd, 0.0)
                acc_bb += da
                acc_b += da * scale
            else:
                acc_b += da
        if HAS_BIAS:
            tl.store(db_ptr, tl.sum(acc_b, axis=0))
        if BN:
            if HAS_BN_W:
                tl.store(dbnw_ptr, tl.sum(acc_bw, axis=0))
            if HAS_BN_B:
                tl.store(dbnb_ptr, tl.sum(acc_bb, axis=0))
    else:
        tile = pid - (NT + 1)
        num_pb = tl.cdiv(P, BLOCK_P)
        base = (tile // num_pb).to(tl.int64) * P
        offs_p = (tile % num_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        hh = offs_p // W
        ww = offs_p % W
        ga = tl.zeros((BLOCK_P,), dtype=acc_t)
        gm = tl.zeros((BLOCK_P,), dtype=acc_t)
        for t in range(0, NT):
            # The output positions whose window puts tap t on this position.
            ho = hh - (t // K - K // 2)
            wo = ww - (t % K - K // 2)
            ok = mask_p & (ho >= 0) & (ho < H) & (wo >= 0) & (wo < W)
            dz = _map_grad(base + ho * W + wo, ok, d_ptr, g_ptr, ms_ptr, scale, HAS_MS, HAS_G,
                           BN)
            ga += tl.load(w_ptr + t) * dz
            gm += tl.load(w_ptr + NT + t) * dz
        tl.store(dsa_ptr + base + offs_p, ga, mask=mask_p)
        tl.store(dsm_ptr + base + offs_p, gm, mask=mask_p)


@triton.jit
def _channel_mlp_bwd_finish(n, avg_ptr, mx_ptr, dl_ptr, w1_ptr, b1_ptr, w2_ptr, hid_ptr, dh_ptr,
                            davg_ptr, dmx_ptr, C, CR, HAS_B1: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Back through the shared MLP for sample n, from dl (N, C): recomputes h, writes
    # relu(h) and dh (each (2, CR) per sample, for the weight-gradient kernel) and
    # [d_avg; d_mx] = dh @ w1.
    acc_t = avg_ptr.dtype.element_ty
    avg_row = avg_ptr + n * C
    mx_row = mx_ptr + n * C
    hid_row = hid_ptr + n * 2 * CR
    dh_row = dh_ptr + n * 2 * CR
    for r0 in range(0, CR, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < CR
        ha, hm, dr = _mlp_hidden_tile(avg_row, mx_row, dl_ptr + n * C, w1_ptr, b1_ptr, w2_ptr,
                                      offs_r, mask_r, C, CR, HAS_B1, True, BLOCK_R, BLOCK_C)
        tl.store(hid_row + offs_r, _relu(ha), mask=mask_r)
        tl.store(hid_row + CR + offs_r, _relu(hm), mask=mask_r)
        # Products with the indicator (not tl.where): inf/NaN in dr spread as in the contract.
        tl.store(dh_row + offs_r, dr * (ha > 0).to(acc_t), mask=mask_r)
        tl.store(dh_row + CR + offs_r, dr * (hm > 0).to(acc_t), mask=mask_r)
    tl.debug_barrier()  # dh is read back below by other threads of this program
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        va = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_t)
        vm = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_t)
        for r0 in range(0, CR, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < CR
            w = tl.load(w1_ptr + offs_r[:, None] * C + offs_c[None, :],
                        mask=mask_r[:, None] & mask_c[None, :], other=0.0)
            va += w * tl.load(dh_row + offs_r, mask=mask_r, other=0.0)[:, None]
            vm += w * tl.load(dh_row + CR + offs_r, mask=mask_r, other=0.0)[:, None]
        tl.store(davg_ptr + n * C + offs_c, tl.sum(va, axis=0), mask=mask_c)
        tl.store(dmx_ptr + n * C + offs_c, tl.sum(vm, axis=0), mask=mask_c)


@triton.autotune(configs=_configs(_BWD_CHANNEL_CONFIGS, _INTERP_TILE),
                 key=["C", "P", "CR", "CHANNELS_LAST"])
@triton.jit
def _mixed_attention_channel_attn_bwd_kernel(
    x_ptr, da_ptr, dm_ptr, ic_ptr, dmc_ptr, gmc_ptr, mc_ptr, avg_ptr, mx_ptr,
    w1_ptr, b1_ptr, w2_ptr, dl_ptr, hid_ptr, dh_ptr, davg_ptr, dmx_ptr, count_ptr,
    C, P, CR, sN, sC, sP,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr, HAS_G: tl.constexpr, HAS_B1: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # B2 for one tile of channels of one sample, then dl = (dmc + B2 + gmc) * mc *
    # (1 - mc) for them; the last program of the sample to finish (an int32 counter
    # per sample) takes dl back through the MLP and resets the counter to 0.
    n, offs_c, mask_c = sample_block(C, I64, BLOCK_C)
    rows = x_ptr + n * sN + offs_c[:, None] * sC
    dmc2 = _bwd_channel_rows(rows, da_ptr, dm_ptr, ic_ptr, n, offs_c, mask_c, C, P, sP,
                             I64, BLOCK_C, BLOCK_P)
    small = n * C + offs_c
    dmc = tl.load(dmc_ptr + small, mask=mask_c, other=0.0) + dmc2
    if HAS_G:
        dmc = dmc + tl.load(gmc_ptr + small, mask=mask_c, other=0.0)
    mcv = tl.load(mc_ptr + small, mask=mask_c, other=0.0)
    tl.store(dl_ptr + small, dmc * mcv * (1 - mcv), mask=mask_c)
    # Every thread's dl stores before the (acq_rel, gpu-scope) increment; the program
    # that sees num_cb - 1 comes after every other program's increment, hence stores.
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + n, 1)
    if done == tl.cdiv(C, BLOCK_C) - 1:
        tl.debug_barrier()
        _channel_mlp_bwd_finish(n.to(tl.int64), avg_ptr, mx_ptr, dl_ptr, w1_ptr, b1_ptr, w2_ptr,
                                hid_ptr, dh_ptr, davg_ptr, dmx_ptr, C, CR, HAS_B1, BLOCK_R,
                                BLOCK_C)
        tl.atomic_xchg(count_ptr + n, 0)  # ready for the next launch, without a fill


@triton.jit(do_not_specialize=["N"])
def _mixed_attention_channel_mlp_wgrad_kernel(
    avg_ptr, mx_ptr, dl_ptr, hid_ptr, dh_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
    N, C, CR,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One (BLOCK_R, BLOCK_C) tile of dw1 (CR, C) and the transposed tile of dw2 (C, CR),
    # summed over the samples in order; the programs of the first C tile also db1,
    # those of the first CR tile db2.
    acc_t = avg_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_cb = tl.cdiv(C, BLOCK_C)
    rb = pid // num_cb
    cb = pid % num_cb
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = offs_r < CR
    mask_c = offs_c < C
    g1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_t)
    g2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_t)
    s1 = tl.zeros((BLOCK_R,), dtype=acc_t)
    s2 = tl.zeros((BLOCK_C,), dtype=acc_t)
    for n in range(0, N):
        n64 = tl.cast(n, tl.int64)  # the loop variable is a Python int in the interpreter
        rrow = n64 * 2 * CR + offs_r
        crow = n64 * C + offs_c
        dha = tl.load(dh_ptr + rrow, mask=mask_r, other=0.0)
        dhm = tl.load(dh_ptr + rrow + CR, mask=mask_r, other=0.0)
        a = tl.load(avg_ptr + crow, mask=mask_c, other=0.0)
        b = tl.load(mx_ptr + crow, mask=mask_c, other=0.0)
        g1 += dha[:, None] * a[None, :] + dhm[:, None] * b[None, :]
        r = tl.load(hid_ptr + rrow, mask=mask_r, other=0.0) + tl.load(hid_ptr + rrow + CR,
                                                                      mask=mask_r, other=0.0)
        dl = tl.load(dl_ptr + crow, mask=mask_c, other=0.0)
        g2 += r[:, None] * dl[None, :]
        if HAS_B1:
            s1 += dha + dhm
        if HAS_B2:
            s2 += dl
    m = mask_r[:, None] & mask_c[None, :]
    tl.store(dw1_ptr + offs_r[:, None] * C + offs_c[None, :], g1, mask=m)
    tl.store(dw2_ptr + offs_c[None, :] * CR + offs_r[:, None], g2, mask=m)
    if HAS_B1:
        if cb == 0:
            tl.store(db1_ptr + offs_r, s1, mask=mask_r)
    if HAS_B2:
        if rb == 0:
            tl.store(db2_ptr + offs_c, 2 * s2, mask=mask_c)


# --------------------------------------------------------------------------- #
# stages (issue 16): the contract is manet_kernels/reference/stages.py. Host code
# only allocates (torch.empty) and launches: no other torch op, no host sync.
# --------------------------------------------------------------------------- #

_MAP_DTYPES = (torch.float32, torch.float64)


def _f64_bits(v: float) -> int:
    """``v``'s IEEE double as a signed 64-bit int, for ``_f64_arg`` in a kernel."""
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def _stage_tile(n: int, cap: int, interp: int) -> int:
    """A power-of-two tile over ``n`` items, at most ``cap`` (not yet measured on a
    GPU); ``interp`` under the interpreter, small so odd shapes take several tiles."""
    if _INTERPRET_AT_IMPORT:
        return interp
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _opt(name: str, t, shape: tuple[int, ...], dtype: torch.dtype,
         device: torch.device) -> Tensor | None:
    return None if t is None else _small(name, t, shape, dtype, device)


def _map(name: str, t, like: Tensor | None = None) -> Tensor:
    """A ``(N, H, W)`` map in float32/float64 (the acc dtype), shaped like ``like``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if like is None:
        if t.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D (N, H, W) tensor, got shape {tuple(t.shape)}")
        if t.dtype not in _MAP_DTYPES:
            raise TypeError(f"{name}: expected float32/float64, got {t.dtype}")
        return t.contiguous()
    return _small(name, t, tuple(like.shape), like.dtype, like.device)


def _conv_weight(conv_w, acc: torch.dtype, device: torch.device) -> tuple[Tensor, int]:
    if not isinstance(conv_w, Tensor) or conv_w.dim() != 4:
        raise ValueError("conv_w: expected a (1, 2, k, k) tensor")
    k = conv_w.shape[-1]
    if k % 2 == 0:
        raise ValueError(f"conv_w: expected an odd kernel size, got {k}")
    return _small("conv_w", conv_w, (1, 2, k, k), acc, device), k


def _mlp_weights(w1, b1, w2, c: int, acc: torch.dtype,
                 dev: torch.device) -> tuple[Tensor, Tensor | None, Tensor, int]:
    """Check the shared MLP's ``w1 (C_r, C)``, ``b1 (C_r,)`` or None and ``w2 (C, C_r)``;
    return them and ``C_r``."""
    if not isinstance(w1, Tensor) or w1.dim() != 2:
        raise ValueError("w1: expected a (C_r, C) tensor")
    cr = w1.shape[0]
    w1 = _small("w1", w1, (cr, c), acc, dev)
    b1 = _opt("b1", b1, (cr,), acc, dev)
    w2 = _small("w2", w2, (c, cr), acc, dev)
    return w1, b1, w2, cr


def _bn_given(bn_mean, bn_var, bn_weight, acc: torch.dtype,
              dev: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
    """Check BatchNorm's given statistics (``bn_var`` goes with ``bn_mean``) and its
    weight or None; return them."""
    bn_mean = _small("bn_mean", bn_mean, (1,), acc, dev)
    if bn_var is None:
        raise ValueError("bn_var: expected a tensor with bn_mean, got None")
    bn_var = _small("bn_var", bn_var, (1,), acc, dev)
    bn_weight = _opt("bn_weight", bn_weight, (1,), acc, dev)
    return bn_mean, bn_var, bn_weight


def mixed_attention_channel_attn(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
                                 b2: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """F1 + the shared MLP: ``(mc, avg, mx, im)``, ``mc = sigmoid(mlp(avg) + mlp(mx))``.
    Launches the channel pool, then one program per sample for the MLP."""
    _activation("x", x)
    n, c = x.shape[:2]
    acc = _acc_dtype(x.dtype)
    dev = x.device
    w1, b1, w2, cr = _mlp_weights(w1, b1, w2, c, acc, dev)
    b2 = _opt("b2", b2, (c,), acc, dev)
    avg, mx, im = mixed_attention_channel_pool(x)
    mc = torch.empty((n, c), dtype=acc, device=dev)
    if n * c == 0:
        return mc, avg, mx, im
    hid = torch.empty((n, 2, cr), dtype=acc, device=dev)  # scratch: relu(h)
    with _device_ctx(x):
        _launch(_mixed_attention_channel_mlp_kernel, (n,),
                avg, mx, w1, b1, w2, b2, hid, mc, c, cr,
                HAS_B1=b1 is not None, HAS_B2=b2 is not None,
                BLOCK_R=_stage_tile(cr, 32, 2), BLOCK_C=_stage_tile(c, 64, 16))
    return mc, avg, mx, im


def mixed_attention_spatial_attn(x: Tensor, mc: Tensor, conv_w: Tensor, conv_b: Tensor | None,
                                 bn_weight: Tensor | None, bn_bias: Tensor | None,
                                 bn_mean: Tensor | None, bn_var: Tensor | None, eps: float,
                                 batch_norm: bool
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """F2 + the k x k conv + BatchNorm with given statistics + sigmoid:
    ``(ms, z, sa, sm, ic)``; ``ms`` empty when ``batch_norm``. Launches the spatial
    pool, then one kernel for conv, BatchNorm and sigmoid."""
    _activation("x", x)
    n, _, h, w = x.shape
    acc = _acc_dtype(x.dtype)
    dev = x.device
    conv_w, k = _conv_weight(conv_w, acc, dev)
    conv_b = _opt("conv_b", conv_b, (1,), acc, dev)
    bn = not batch_norm and bn_mean is not None
    if bn:
        bn_mean, bn_var, bn_weight = _bn_given(bn_mean, bn_var, bn_weight, acc, dev)
        bn_bias = _opt("bn_bias", bn_bias, (1,), acc, dev)
    else:
        bn_weight = bn_bias = bn_mean = bn_var = None
    sa, sm, ic = mixed_attention_spatial_pool(x, mc)
    z = torch.empty((n, h, w), dtype=acc, device=dev)
    ms = z.new_empty(0) if batch_norm else torch.empty((n, h, w), dtype=acc, device=dev)
    p = h * w
    if n * p == 0:
        return ms, z, sa, sm, ic
    block_p = _stage_tile(p, 256, 16)
    with _device_ctx(x):
        _launch(_mixed_attention_spatial_map_kernel, (n * triton.cdiv(p, block_p),),
                sa, sm, conv_w, conv_b, bn_weight, bn_bias, bn_mean, bn_var, z, ms,
                h, w, _f64_bits(eps),
                K=k, HAS_BIAS=conv_b is not None, WRITE_MS=not batch_norm, BN=bn,
                HAS_BN_W=bn_weight is not None, HAS_BN_B=bn_bias is not None, BLOCK_P=block_p)
    return ms, z, sa, sm, ic


def mixed_attention_spatial_norm(z: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                                 running_mean: Tensor | None, running_var: Tensor | None,
                                 num_batches_tracked: Tensor | None, momentum: float | None,
                                 eps: float) -> tuple[Tensor, Tensor]:
    """BatchNorm2d(1) in training mode + sigmoid: ``(ms, stats)``, and the running
    statistics updated in place (in their own dtype), all in one single-program launch.
    Needs ``z.numel() > 1``."""
    z = _map("z", z)
    acc = z.dtype
    dev = z.device
    count = z.numel()
    if count <= 1:
        raise ValueError(f"z: expected more than one value (N*H*W > 1) for batch "
                         f"statistics, got shape {tuple(z.shape)}")
    bn_weight = _opt("bn_weight", bn_weight, (1,), acc, dev)
    bn_bias = _opt("bn_bias", bn_bias, (1,), acc, dev)
    running = running_mean is not None
    if running != (running_var is not None):  # the C++ stages' messages (stage_checks.h)
        given, absent = (("running_mean", "running_var") if running
                         else ("running_var", "running_mean"))
        raise ValueError(f"{absent}: expected a tensor when {given} is given, got None")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.numel() != 1:
                raise ValueError(f"{name}: expected a floating-point tensor of one value")
            if t.device != dev:
                raise ValueError(f"{name}: expected a tensor on {dev}, got one on {t.device}")
    if num_batches_tracked is not None:
        t = num_batches_tracked
        if not isinstance(t, Tensor) or t.numel() != 1:
            raise ValueError("num_batches_tracked: expected one value")
        if t.dtype != torch.int64:
            raise TypeError(f"num_batches_tracked: expected dtype int64, got {t.dtype}")
        if t.device != dev:
            raise ValueError(f"num_batches_tracked: expected a tensor on {dev}, got one on "
                             f"{t.device}")
    if running and momentum is None and num_batches_tracked is None:
        raise ValueError("num_batches_tracked: expected a tensor when momentum is None (a "
                         "cumulative average), got None")
    m = 0.0 if momentum is None else float(momentum)
    ms = torch.empty(z.shape, dtype=acc, device=dev)
    stats = torch.empty(2, dtype=acc, device=dev)
    with _device_ctx(z, "z"):
        _launch(_mixed_attention_spatial_norm_kernel, (1,),
                z, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, ms, stats,
                count, _f64_bits(eps), _f64_bits(m), _f64_bits(1 - m),
                _f64_bits(count / (count - 1)),
                HAS_W=bn_weight is not None, HAS_B=bn_bias is not None, HAS_RUNNING=running,
                HAS_NBT=num_batches_tracked is not None, CUMULATIVE=momentum is None,
                BLOCK=_stage_tile(count, 1024, 16), num_warps=4 if _INTERPRET_AT_IMPORT else 8)
    return ms, stats


def mixed_attention_spatial_norm_bwd(dms: Tensor, gms: Tensor | None, ms: Tensor, z: Tensor,
                                     stats: Tensor, bn_weight: Tensor | None, has_bias: bool,
                                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Back through the sigmoid and the training-mode BatchNorm: ``(dz, dbn_weight,
    dbn_bias)`` (empty for an absent parameter), in one single-program launch."""
    z = _map("z", z)
    acc = z.dtype
    dev = z.device
    dms = _map("dms", dms, z)
    gms = None if gms is None else _map("gms", gms, z)
    ms = _map("ms", ms, z)
    stats = _small("stats", stats, (2,), acc, dev)
    bn_weight = _opt("bn_weight", bn_weight, (1,), acc, dev)
    dz = torch.empty(z.shape, dtype=acc, device=dev)
    dw = torch.empty(1 if bn_weight is not None else 0, dtype=acc, device=dev)
    db = torch.empty(1 if has_bias else 0, dtype=acc, device=dev)
    count = z.numel()
    with _device_ctx(z, "z"):
        _launch(_mixed_attention_spatial_norm_bwd_kernel, (1,),
                dms, gms, ms, z, stats, bn_weight, dz, dw, db, count, _f64_bits(eps),
                HAS_G=gms is not None, HAS_W=bn_weight is not None, HAS_B=bool(has_bias),
                BLOCK=_stage_tile(count, 1024, 16), num_warps=4 if _INTERPRET_AT_IMPORT else 8)
    return dz, dw, db


def mixed_attention_spatial_attn_bwd(d: Tensor, gms: Tensor | None, ms: Tensor | None,
                                     z: Tensor, sa: Tensor, sm: Tensor, conv_w: Tensor,
                                     has_conv_bias: bool, bn_weight: Tensor | None,
                                     has_bn_bias: bool, bn_mean: Tensor | None,
                                     bn_var: Tensor | None, eps: float
                                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Back through ``mixed_attention_spatial_attn``'s tiny part: ``(da_s, dm_s, dconv_w,
    dconv_b, dbn_weight, dbn_bias)``, in one launch: ``k*k`` programs for the conv weight
    taps and one for the biases, each summing over the batch in a fixed order, then the
    per-sample tiles of ``da_s`` and ``dm_s``."""
    z = _map("z", z)
    acc = z.dtype
    dev = z.device
    n, h, w = z.shape
    d = _map("d", d, z)
    sa = _map("sa", sa, z)
    sm = _map("sm", sm, z)
    conv_w, k = _conv_weight(conv_w, acc, dev)
    has_ms = ms is not None
    if has_ms:
        ms = _map("ms", ms, z)
        gms = None if gms is None else _map("gms", gms, z)
    else:
        gms = None
    bn = has_ms and bn_mean is not None
    if bn:
        bn_mean, bn_var, bn_weight = _bn_given(bn_mean, bn_var, bn_weight, acc, dev)
    else:
        bn_weight = bn_mean = bn_var = None
    has_bn_w = bn and bn_weight is not None
    has_bn_b = bn and bool(has_bn_bias)
    da_s = torch.empty((n, h, w), dtype=acc, device=dev)
    dm_s = torch.empty((n, h, w), dtype=acc, device=dev)
    dcw = torch.empty((1, 2, k, k), dtype=acc, device=dev)
    dcb = torch.empty(1 if has_conv_bias else 0, dtype=acc, device=dev)
    dbw = torch.empty(1 if has_bn_w else 0, dtype=acc, device=dev)
    dbb = torch.empty(1 if has_bn_b else 0, dtype=acc, device=dev)
    p = h * w
    block_p = _stage_tile(p, 256, 16)
    with _device_ctx(z, "z"):
        _launch(_mixed_attention_spatial_attn_bwd_kernel,
                (k * k + 1 + n * triton.cdiv(p, block_p),),
                d, gms, ms, z, sa, sm, conv_w, bn_weight, bn_mean, bn_var,
                da_s, dm_s, dcw, dcb, dbw, dbb, n, h, w, _f64_bits(eps),
                K=k, HAS_MS=has_ms, HAS_G=gms is not None, BN=bn, HAS_BN_W=has_bn_w,
                HAS_BN_B=has_bn_b, HAS_BIAS=bool(has_conv_bias), BLOCK_P=block_p,
                BLOCK_RED=_stage_tile(n * p, 1024, 16))
    return da_s, dm_s, dcw, dcb, dbw, dbb


def mixed_attention_channel_attn_bwd(x: Tensor, da_s: Tensor, dm_s: Tensor, ic: Tensor,
                                     dmc: Tensor, gmc: Tensor | None, mc: Tensor, avg: Tensor,
                                     mx: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
                                     has_b2: bool
                                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """B2 + back through the channel sigmoid and the shared MLP: ``(d_avg, d_mx, dw1, db1,
    dw2, db2)``. Two launches: B2 per channel tile, whose last program per sample takes
    ``dl`` back through the MLP (``d_avg``, ``d_mx``); then the weight gradients, each
    tile summed over the samples in order."""
    sn, sc, sp, cl = _activation("x", x)
    n, c, h, w = x.shape
    p = h * w
    acc = _acc_dtype(x.dtype)
    dev = x.device
    da_s = _small("da_s", da_s, (n, h, w), acc, dev)
    dm_s = _small("dm_s", dm_s, (n, h, w), acc, dev)
    ic = _small("ic", ic, (n, h, w), torch.int32, dev)
    dmc = _small("dmc", dmc, (n, c), acc, dev)
    gmc = _opt("gmc", gmc, (n, c), acc, dev)
    mc = _small("mc", mc, (n, c), acc, dev)
    avg = _small("avg", avg, (n, c), acc, dev)
    mx = _small("mx", mx, (n, c), acc, dev)
    w1, b1, w2, cr = _mlp_weights(w1, b1, w2, c, acc, dev)
    d_avg = torch.empty((n, c), dtype=acc, device=dev)
    d_mx = torch.empty((n, c), dtype=acc, device=dev)
    dw1 = torch.empty((cr, c), dtype=acc, device=dev)
    db1 = torch.empty(cr if b1 is not None else 0, dtype=acc, device=dev)
    dw2 = torch.empty((c, cr), dtype=acc, device=dev)
    db2 = torch.empty(c if has_b2 else 0, dtype=acc, device=dev)
    # Scratch, per sample: dl (C), relu(h) and dh (2, C_r each).
    dl = torch.empty((n, c), dtype=acc, device=dev)
    hid = torch.empty((n, 2, cr), dtype=acc, device=dev)
    dh = torch.empty((n, 2, cr), dtype=acc, device=dev)
    block_r = _stage_tile(cr, 32, 2)
    block_c = _stage_tile(c, 64, 16)
    with _device_ctx(x):
        if n * c > 0:
            _launch(_mixed_attention_channel_attn_bwd_kernel,
                    block_grid(n, c, "BLOCK_C"),
                    x, da_s, dm_s, ic, dmc, gmc, mc, avg, mx, w1, b1, w2, dl, hid, dh, d_avg,
                    d_mx, _sample_counters(n, dev), c, p, cr, sn, sc, sp, CHANNELS_LAST=cl,
                    I64=_needs_i64(x), HAS_G=gmc is not None, HAS_B1=b1 is not None,
                    BLOCK_R=block_r)
        # With no samples this still runs, and writes the zero sums.
        _launch(_mixed_attention_channel_mlp_wgrad_kernel,
                (max(1, triton.cdiv(cr, block_r)) * max(1, triton.cdiv(c, block_c)),),
                avg, mx, dl, hid, dh, dw1, db1, dw2, db2, n, c, cr,
                HAS_B1=b1 is not None, HAS_B2=bool(has_b2), BLOCK_R=block_r, BLOCK_C=block_c)
    return d_avg, d_mx, dw1, db1, dw2, db2
