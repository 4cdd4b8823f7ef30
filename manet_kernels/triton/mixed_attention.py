"""Triton kernels for the six mixed-attention passes (docs/design.md §1); the stages
built on them (issue 16) are in ``manet_kernels/triton/mixed_attention_stages.py``.

Each pass launcher has the signature and return values of the function of the
same name in ``manet_kernels/reference/passes.py``, which is the contract.

Every kernel sees an activation as ``(N, C, P)`` with strides ``(sN, sC, sP)``:
``(C*P, P, 1)`` for NCHW and ``(P*C, 1, C)`` for channels_last, so one kernel
serves both layouts. Reductions never use float atomics, so results are bitwise
reproducible run to run for a given tile config; under
``torch.use_deterministic_algorithms(True)`` the config is fixed rather than
autotuned, so they are also reproducible across processes.

On CPU tensors the kernels run only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is first imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from manet_kernels.triton._common import INTERPRET as _INTERPRET_AT_IMPORT
from manet_kernels.triton._common import acc_dtype as _acc_dtype
from manet_kernels.triton._common import (
    block_grid,
    device_ctx,
    interpreting,
    launch,
    ncp_strides,
    small,
    tile_grid,
)
from manet_kernels.triton._common import configs as _configs
from manet_kernels.triton._common import needs_i64 as _needs_i64
from manet_kernels.triton._common import sample_counters as _sample_counters
from manet_kernels.triton._tiles import cp_tile, sample_block

__all__ = [
    "mixed_attention_channel_pool",
    "mixed_attention_spatial_pool",
    "mixed_attention_apply",
    "mixed_attention_bwd_reduce",
    "mixed_attention_bwd_channel",
    "mixed_attention_bwd_dx",
]

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Block shapes: NCHW wants long P rows (P is contiguous), channels_last long C
# columns; the autotune key holds the layout so each layout gets its own pick.
# Each list runs from P-long to C-long tiles: under
# torch.use_deterministic_algorithms the first serves NCHW and the last
# channels_last, without autotuning (see _launch).
# Every GPU list below is a first guess, not yet measured on a GPU.

# channel_pool: tile (BLOCK_C, BLOCK_P), loop over P. Not yet measured on a GPU.
_POOL_C_CONFIGS = [
    ({"BLOCK_C": 4, "BLOCK_P": 256}, 4),
    ({"BLOCK_C": 8, "BLOCK_P": 128}, 4),
    ({"BLOCK_C": 16, "BLOCK_P": 64}, 4),
    ({"BLOCK_C": 64, "BLOCK_P": 16}, 4),
    ({"BLOCK_C": 128, "BLOCK_P": 8}, 4),
]
# spatial_pool: tile (BLOCK_C, BLOCK_P), loop over C. Not yet measured on a GPU.
_POOL_P_CONFIGS = [
    ({"BLOCK_C": 8, "BLOCK_P": 128}, 4),
    ({"BLOCK_C": 16, "BLOCK_P": 64}, 4),
    ({"BLOCK_C": 32, "BLOCK_P": 32}, 4),
    ({"BLOCK_C": 64, "BLOCK_P": 16}, 4),
    ({"BLOCK_C": 128, "BLOCK_P": 8}, 4),
]
# apply / bwd_dx: one (BLOCK_C, BLOCK_P) tile per program. Not yet measured on a GPU.
_ELEMENTWISE_CONFIGS = [
    ({"BLOCK_C": 16, "BLOCK_P": 128}, 4),
    ({"BLOCK_C": 32, "BLOCK_P": 64}, 4),
    ({"BLOCK_C": 64, "BLOCK_P": 64}, 8),
    ({"BLOCK_C": 64, "BLOCK_P": 32}, 4),
    ({"BLOCK_C": 128, "BLOCK_P": 16}, 4),
]
# bwd_reduce: BLOCK_P fixes the size of the dmc partial buffer, which must be
# allocated before launch, so the launcher picks BLOCK_P and autotune only BLOCK_C.
_BWD_REDUCE_CONFIGS = [  # not yet measured on a GPU.
    ({"BLOCK_C": 8}, 4),
    ({"BLOCK_C": 32}, 4),
    ({"BLOCK_C": 64}, 4),
    ({"BLOCK_C": 128}, 8),
]
# Same loop shape as channel_pool; not yet measured on a GPU.
_BWD_CHANNEL_CONFIGS = _POOL_C_CONFIGS

# Interpreter tiles: small enough that the odd test shapes (C=33, P=35) take
# several loop iterations and partial blocks.
_INTERP_TILE = {"BLOCK_C": 16, "BLOCK_P": 16}


def _bwd_reduce_block_p(p: int, channels_last: bool) -> int:
    if _INTERPRET_AT_IMPORT:
        return _INTERP_TILE["BLOCK_P"]
    # 64 contiguous positions per row for NCHW, fewer when C is the contiguous
    # axis; the dmc partials are 1/BLOCK_P of x's element count. Not yet measured on a GPU.
    return min(32 if channels_last else 64, triton.next_power_of_2(p))


# --------------------------------------------------------------------------- #
# kernels
# --------------------------------------------------------------------------- #


@triton.jit
def _argmax_combine(v1, i1, v2, i2):
    # torch.max semantics: NaN beats everything (first NaN wins); on equal
    # values the lower index wins. Padding lanes carry (-inf, INT32_MAX) so a
    # real -inf still beats them.
    nan1 = v1 != v1
    nan2 = v2 != v2
    greater = (v1 > v2) | (nan1 & ~nan2)
    same = (v1 == v2) | (nan1 & nan2)
    pick1 = greater | (same & (i1 < i2))
    return tl.where(pick1, v1, v2), tl.where(pick1, i1, i2)


@triton.jit
def _max_argmax(v, i, AXIS: tl.constexpr):
    # The order of _argmax_combine, from plain max/min reductions: tl.reduce
    # with a custom combine runs element by element in the interpreter (the
    # pool passes were 3x slower at (2,33,5,7), measured), and NaN is kept
    # out of tl.max, whose NaN handling differs between interpreter and GPU.
    isnan = v != v
    has_nan = tl.max(isnan.to(tl.int32), axis=AXIS) > 0
    key = tl.where(isnan, float("inf"), v)
    mx = tl.max(key, axis=AXIS)
    hit = tl.where(tl.expand_dims(has_nan, AXIS), isnan, key == tl.expand_dims(mx, AXIS))
    idx = tl.min(tl.where(hit, i, 2147483647), axis=AXIS)
    return tl.where(has_nan, float("nan"), mx), idx


@triton.autotune(configs=_configs(_POOL_C_CONFIGS, _INTERP_TILE), key=["C", "P", "CHANNELS_LAST"])
@triton.jit
def _mixed_attention_channel_pool_kernel(
    x_ptr, avg_ptr, mx_ptr, im_ptr,
    C, P, sN, sC, sP,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    acc_t = avg_ptr.dtype.element_ty
    n, offs_c, mask_c = sample_block(C, I64, BLOCK_C)
    rows = x_ptr + n * sN + offs_c[:, None] * sC

    total = tl.zeros((BLOCK_C, BLOCK_P), dtype=acc_t)
    best_v = tl.full((BLOCK_C, BLOCK_P), float("-inf"), acc_t)
    best_i = tl.full((BLOCK_C, BLOCK_P), 2147483647, tl.int32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        m = mask_c[:, None] & (offs_p < P)[None, :]
        addr_p = offs_p
        if I64:
            addr_p = offs_p.to(tl.int64)
        xv = tl.load(rows + addr_p[None, :] * sP, mask=m, other=0.0).to(acc_t)
        total += xv
        # Lanes keep their own running (max, argmax); later blocks have higher
        # indices, so the combine keeps the earlier one on ties.
        best_v, best_i = _argmax_combine(
            best_v, best_i, tl.where(m, xv, float("-inf")),
            tl.where(m, offs_p[None, :], 2147483647))

    mx, im = _max_argmax(best_v, best_i, 1)
    out = n * C + offs_c
    tl.store(avg_ptr + out, tl.sum(total, axis=1) / P, mask=mask_c)
    tl.store(mx_ptr + out, mx, mask=mask_c)
    tl.store(im_ptr + out, im, mask=mask_c)


@triton.autotune(configs=_configs(_POOL_P_CONFIGS, _INTERP_TILE), key=["C", "P", "CHANNELS_LAST"])
@triton.jit
def _mixed_attention_spatial_pool_kernel(
    x_ptr, mc_ptr, sa_ptr, sm_ptr, ic_ptr,
    C, P, sN, sC, sP,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    acc_t = mc_ptr.dtype.element_ty
    n, offs_p, mask_p = sample_block(P, I64, BLOCK_P)
    cols = x_ptr + n * sN + offs_p[None, :] * sP

    total = tl.zeros((BLOCK_C, BLOCK_P), dtype=acc_t)
    best_v = tl.full((BLOCK_C, BLOCK_P), float("-inf"), acc_t)
    best_i = tl.full((BLOCK_C, BLOCK_P), 2147483647, tl.int32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        m = mask_c[:, None] & mask_p[None, :]
        addr_c = offs_c
        if I64:
            addr_c = offs_c.to(tl.int64)
        mcv = tl.load(mc_ptr + n * C + addr_c, mask=mask_c, other=0.0)
        xv = tl.load(cols + addr_c[:, None] * sC, mask=m, other=0.0).to(acc_t)
        # Rounded once in acc dtype, like the reference's x.to(acc) * mc, so
        # the max comparisons (and hence the indices) match it exactly.
        x1 = xv * mcv[:, None]
        total += x1
        best_v, best_i = _argmax_combine(
            best_v, best_i, tl.where(m, x1, float("-inf")),
            tl.where(m, offs_c[:, None], 2147483647))

    sm, ic = _max_argmax(best_v, best_i, 0)
    out = n * P + offs_p
    tl.store(sa_ptr + out, tl.sum(total, axis=0) / C, mask=mask_p)
    tl.store(sm_ptr + out, sm, mask=mask_p)
    tl.store(ic_ptr + out, ic, mask=mask_p)


@triton.autotune(configs=_configs(_ELEMENTWISE_CONFIGS, _INTERP_TILE),
                  key=["C", "P", "CHANNELS_LAST"])
@triton.jit
def _mixed_attention_apply_kernel(
    x_ptr, mc_ptr, ms_ptr, y_ptr,
    C, P, sN, sC, sP, ysN, ysC, ysP,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    acc_t = mc_ptr.dtype.element_ty
    n, offs_c, offs_p, mask_c, mask_p, m = cp_tile(C, P, I64, BLOCK_C, BLOCK_P)
    mcv = tl.load(mc_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    msv = tl.load(ms_ptr + n * P + offs_p, mask=mask_p, other=0.0)
    xv = tl.load(x_ptr + n * sN + offs_c[:, None] * sC + offs_p[None, :] * sP, mask=m, other=0.0)
    # Same association as the reference, (x * mc) * ms, for bitwise-equal fp32.
    y = (xv.to(acc_t) * mcv[:, None]) * msv[None, :]
    tl.store(y_ptr + n * ysN + offs_c[:, None] * ysC + offs_p[None, :] * ysP,
             y.to(y_ptr.dtype.element_ty), mask=m)


@triton.autotune(configs=_configs(_BWD_REDUCE_CONFIGS, {"BLOCK_C": _INTERP_TILE["BLOCK_C"]}),
                 key=["C", "P", "G_CHANNELS_LAST", "X_CHANNELS_LAST", "BLOCK_P"])
@triton.jit
def _mixed_attention_bwd_reduce_kernel(
    g_ptr, x_ptr, mc_ptr, ms_ptr, dms_ptr, dmc_part_ptr, dmc_ptr, count_ptr,
    C, P, gsN, gsC, gsP, xsN, xsC, xsP,
    G_CHANNELS_LAST: tl.constexpr, X_CHANNELS_LAST: tl.constexpr,  # only key the autotune cache
    I64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_t = mc_ptr.dtype.element_ty
    n, offs_p, mask_p = sample_block(P, I64, BLOCK_P)
    part_row = tl.program_id(0).to(n.dtype)
    num_pb = tl.cdiv(P, BLOCK_P)
    msv = tl.load(ms_ptr + n * P + offs_p, mask=mask_p, other=0.0)
    g_cols = g_ptr + n * gsN + offs_p[None, :] * gsP
    x_cols = x_ptr + n * xsN + offs_p[None, :] * xsP

    dms = tl.zeros((BLOCK_C, BLOCK_P), dtype=acc_t)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        m = mask_c[:, None] & mask_p[None, :]
        if I64:
            offs_c = offs_c.to(tl.int64)
        mcv = tl.load(mc_ptr + n * C + offs_c, mask=mask_c, other=0.0)
        gv = tl.load(g_cols + offs_c[:, None] * gsC, mask=m, other=0.0).to(acc_t)
        xv = tl.load(x_cols + offs_c[:, None] * xsC, mask=m, other=0.0).to(acc_t)
        gx = gv * xv
        dms += gx * mcv[:, None]
        # One partial per (n, P-block, c); the last program of the sample sums them
        # over P-blocks in a fixed order, which keeps dmc deterministic without
        # float atomics.
        tl.store(dmc_part_ptr + part_row * C + offs_c, tl.sum(gx * msv[None, :], axis=1),
                 mask=mask_c)
    tl.store(dms_ptr + n * P + offs_p, tl.sum(dms, axis=0), mask=mask_p)
    # Every thread's partial stores before the (acq_rel, gpu-scope) increment; the
    # program that sees num_pb - 1 comes after every other program's increment,
    # hence after their stores (as in channel_attn_bwd).
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + n, 1)
    if done == num_pb - 1:
        tl.debug_barrier()
        rows = dmc_part_ptr + n * num_pb * C  # this sample's (num_pb, C) partials
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            if I64:
                offs_c = offs_c.to(tl.int64)
            tot = tl.zeros((BLOCK_C,), dtype=acc_t)
            ptrs = rows + offs_c
            for _ in range(0, num_pb):  # block order: the same sum every run
                tot += tl.load(ptrs, mask=mask_c, other=0.0)
                ptrs += C
            tl.store(dmc_ptr + n * C + offs_c, tot, mask=mask_c)
        tl.atomic_xchg(count_ptr + n, 0)  # ready for the next launch, without a fill


@triton.jit
def _bwd_channel_rows(rows, da_ptr, dm_ptr, ic_ptr, n, offs_c, mask_c, C, P, sP,
                      I64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """B2 for the channels ``offs_c`` of sample ``n`` (``rows``: their x rows):
    ``sum_p (da_s/C) x + sum_{p: ic == c} dm_s x``, in da_s's dtype."""
    acc_t = da_ptr.dtype.element_ty
    dense = tl.zeros((BLOCK_C, BLOCK_P), dtype=acc_t)
    sparse = tl.zeros((BLOCK_C, BLOCK_P), dtype=acc_t)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        m = mask_c[:, None] & mask_p[None, :]
        if I64:
            offs_p = offs_p.to(tl.int64)
        small = n * P + offs_p
        da = tl.load(da_ptr + small, mask=mask_p, other=0.0)
        dm = tl.load(dm_ptr + small, mask=mask_p, other=0.0)
        icv = tl.load(ic_ptr + small, mask=mask_p, other=-1)
        xv = tl.load(rows + offs_p[None, :] * sP, mask=m, other=0.0).to(acc_t)
        dense += xv * (da / C)[None, :]
        # The scatter of the reference, done as a match: the x value it needs
        # is already in this tile, so the sparse term costs no extra read.
        hit = offs_c[:, None] == icv[None, :]  # padded lanes: ic=-1, or rows not stored
        sparse += tl.where(hit, xv * dm[None, :], 0.0)
    return tl.sum(dense, axis=1) + tl.sum(sparse, axis=1)


@triton.autotune(configs=_configs(_BWD_CHANNEL_CONFIGS, _INTERP_TILE),
                  key=["C", "P", "CHANNELS_LAST"])
@triton.jit
def _mixed_attention_bwd_channel_kernel(
    x_ptr, da_ptr, dm_ptr, ic_ptr, out_ptr,
    C, P, sN, sC, sP,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n, offs_c, mask_c = sample_block(C, I64, BLOCK_C)
    rows = x_ptr + n * sN + offs_c[:, None] * sC
    tl.store(out_ptr + n * C + offs_c,
             _bwd_channel_rows(rows, da_ptr, dm_ptr, ic_ptr, n, offs_c, mask_c, C, P, sP,
                               I64, BLOCK_C, BLOCK_P),
             mask=mask_c)


@triton.autotune(configs=_configs(_ELEMENTWISE_CONFIGS, _INTERP_TILE),
                  key=["C", "P", "CHANNELS_LAST"])
@triton.jit
def _mixed_attention_bwd_dx_kernel(
    g_ptr, mc_ptr, ms_ptr, da_ptr, dm_ptr, ic_ptr, davg_ptr, dmx_ptr, im_ptr, dx_ptr,
    C, P, sN, sC, sP, dsN, dsC, dsP,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    acc_t = mc_ptr.dtype.element_ty
    n, offs_c, offs_p, mask_c, mask_p, m = cp_tile(C, P, I64, BLOCK_C, BLOCK_P)
    per_c = n * C + offs_c
    per_p = n * P + offs_p
    mcv = tl.load(mc_ptr + per_c, mask=mask_c, other=0.0)
    davg = tl.load(davg_ptr + per_c, mask=mask_c, other=0.0)
    dmx = tl.load(dmx_ptr + per_c, mask=mask_c, other=0.0)
    imv = tl.load(im_ptr + per_c, mask=mask_c, other=-1)
    msv = tl.load(ms_ptr + per_p, mask=mask_p, other=0.0)
    da = tl.load(da_ptr + per_p, mask=mask_p, other=0.0)
    dm = tl.load(dm_ptr + per_p, mask=mask_p, other=0.0)
    icv = tl.load(ic_ptr + per_p, mask=mask_p, other=-1)
    gv = tl.load(g_ptr + n * sN + offs_c[:, None] * sC + offs_p[None, :] * sP,
                 mask=m, other=0.0).to(acc_t)
    # Indicator multiplies (not tl.where) so inf/NaN in dm_s / d_mx spread as
    # in the reference.
    inner = (gv * msv[None, :] + (da / C)[None, :]
             + dm[None, :] * (offs_c[:, None] == icv[None, :]).to(acc_t))
    dx = (mcv[:, None] * inner + (davg / P)[:, None]
          + dmx[:, None] * (offs_p[None, :] == imv[:, None]).to(acc_t))
    tl.store(dx_ptr + n * dsN + offs_c[:, None] * dsC + offs_p[None, :] * dsP,
             dx.to(dx_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------- #
# host side
# --------------------------------------------------------------------------- #

# Test hook: kernel -> triton.Config. When set, that config is launched on the
# raw jit function, bypassing autotune, so the GPU tile shapes can be checked
# under the interpreter.
_FORCED_CONFIGS: dict = {}


def _launch(kernel, grid, *args, **kwargs) -> None:
    launch(_FORCED_CONFIGS, kernel, grid, *args, **kwargs)


def _interpreting() -> bool:
    return interpreting(_mixed_attention_apply_kernel)


def _device_ctx(t: Tensor, name: str = "x"):
    return device_ctx(t, _interpreting, "mixed_attention", name)


def _activation(name: str, t) -> tuple[int, int, int, bool]:
    """Validate an activation; return its (sN, sC, sP) as a (N, C, P) view and
    whether it is channels_last."""
    return ncp_strides(name, t, _ACT_DTYPES)


def _small(name: str, t, shape: tuple[int, ...], dtype: torch.dtype,
           device: torch.device) -> Tensor:
    return small(name, t, shape, dtype, device, device_of=None)


def _same_shape(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(
            f"{name}: expected the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(
            f"{name}: expected a tensor on {ref.device} like {ref_name}, got one on {t.device}")


def mixed_attention_channel_pool(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """F1: ``avg[n,c] = mean_p x``, ``mx[n,c] = max_p x``, ``im[n,c] = argmax_p x``."""
    sn, sc, sp, cl = _activation("x", x)
    n, c, h, w = x.shape
    p = h * w
    acc = _acc_dtype(x.dtype)
    avg = torch.empty((n, c), dtype=acc, device=x.device)
    mx = torch.empty((n, c), dtype=acc, device=x.device)
    im = torch.empty((n, c), dtype=torch.int32, device=x.device)
    if n * c == 0:
        return avg, mx, im
    if p == 0:
        raise ValueError(f"x: cannot take a max over zero positions (shape {tuple(x.shape)})")
    with _device_ctx(x):
        _launch(_mixed_attention_channel_pool_kernel,
                block_grid(n, c, "BLOCK_C"),
                x, avg, mx, im, c, p, sn, sc, sp, CHANNELS_LAST=cl, I64=_needs_i64(x))
    return avg, mx, im


def mixed_attention_spatial_pool(x: Tensor, mc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """F2: with ``x1 = mc[n,c] * x``: ``sa = mean_c x1``, ``sm = max_c x1``,
    ``ic = argmax_c x1``; each ``(N, H, W)``."""
    sn, sc, sp, cl = _activation("x", x)
    n, c, h, w = x.shape
    p = h * w
    acc = _acc_dtype(x.dtype)
    mc = _small("mc", mc, (n, c), acc, x.device)
    sa = torch.empty((n, h, w), dtype=acc, device=x.device)
    sm = torch.empty((n, h, w), dtype=acc, device=x.device)
    ic = torch.empty((n, h, w), dtype=torch.int32, device=x.device)
    if n * p == 0:
        return sa, sm, ic
    if c == 0:
        raise ValueError(f"x: cannot take a max over zero channels (shape {tuple(x.shape)})")
    with _device_ctx(x):
        _launch(_mixed_attention_spatial_pool_kernel,
                block_grid(n, p, "BLOCK_P"),
                x, mc, sa, sm, ic, c, p, sn, sc, sp, CHANNELS_LAST=cl, I64=_needs_i64(x))
    return sa, sm, ic


def mixed_attention_apply(x: Tensor, mc: Tensor, ms: Tensor) -> Tensor:
    """F3: ``y = x * mc[n,c] * ms[n,h,w]`` computed in acc dtype, returned in
    ``x``'s dtype and memory format."""
    sn, sc, sp, cl = _activation("x", x)
    n, c, h, w = x.shape
    p = h * w
    acc = _acc_dtype(x.dtype)
    mc = _small("mc", mc, (n, c), acc, x.device)
    ms = _small("ms", ms, (n, h, w), acc, x.device)
    y = torch.empty_like(x)  # keeps x's strides, hence its memory format
    if y.numel() == 0:
        return y
    ysn, ysc, ysp, _ = _activation("y", y)
    with _device_ctx(x):
        _launch(_mixed_attention_apply_kernel,
                tile_grid(n, c, p),
                x, mc, ms, y, c, p, sn, sc, sp, ysn, ysc, ysp, CHANNELS_LAST=cl, I64=_needs_i64(x))
    return y


def mixed_attention_bwd_reduce(g: Tensor, x: Tensor, mc: Tensor,
                               ms: Tensor) -> tuple[Tensor, Tensor]:
    """B1: ``dms[n,h,w] = sum_c g*mc*x`` and ``dmc[n,c] = sum_p g*ms*x``, in one
    read of ``g`` and ``x``."""
    gsn, gsc, gsp, gcl = _activation("g", g)
    xsn, xsc, xsp, xcl = _activation("x", x)
    _same_shape("g", g, "x", x)
    n, c, h, w = x.shape
    p = h * w
    acc = _acc_dtype(x.dtype)
    if g.dtype != x.dtype:
        raise TypeError(f"g: expected the dtype of x ({x.dtype}), got {g.dtype}")
    mc = _small("mc", mc, (n, c), acc, x.device)
    ms = _small("ms", ms, (n, h, w), acc, x.device)
    if x.numel() == 0:  # sums over nothing
        return (torch.zeros((n, h, w), dtype=acc, device=x.device),
                torch.zeros((n, c), dtype=acc, device=x.device))
    block_p = _bwd_reduce_block_p(p, xcl)
    num_pb = triton.cdiv(p, block_p)
    dms = torch.empty((n, h, w), dtype=acc, device=x.device)
    dmc_part = torch.empty((n, num_pb, c), dtype=acc, device=x.device)
    dmc = torch.empty((n, c), dtype=acc, device=x.device)
    with _device_ctx(x):
        # The last program of each sample sums its dmc partials (one launch, no torch sum).
        _launch(_mixed_attention_bwd_reduce_kernel, (n * num_pb,),
                g, x, mc, ms, dms, dmc_part, dmc, _sample_counters(n, x.device),
                c, p, gsn, gsc, gsp, xsn, xsc, xsp,
                G_CHANNELS_LAST=gcl, X_CHANNELS_LAST=xcl, I64=_needs_i64(x, dmc_part),
                BLOCK_P=block_p)
    return dms, dmc


def mixed_attention_bwd_channel(x: Tensor, da_s: Tensor, dm_s: Tensor, ic: Tensor) -> Tensor:
    """B2: ``dmc[n,c] = sum_p (da_s[n,p] / C) * x[n,c,p]
    + sum_{p : ic[n,p] == c} dm_s[n,p] * x[n,c,p]``. ``ic`` values outside
    ``[0, C)`` contribute nothing (the reference raises instead)."""
    sn, sc, sp, cl = _activation("x", x)
    n, c, h, w = x.shape
    p = h * w
    acc = _acc_dtype(x.dtype)
    da_s = _small("da_s", da_s, (n, h, w), acc, x.device)
    dm_s = _small("dm_s", dm_s, (n, h, w), acc, x.device)
    ic = _small("ic", ic, (n, h, w), torch.int32, x.device)
    if x.numel() == 0:
        return torch.zeros((n, c), dtype=acc, device=x.device)
    out = torch.empty((n, c), dtype=acc, device=x.device)
    with _device_ctx(x):
        _launch(_mixed_attention_bwd_channel_kernel,
                block_grid(n, c, "BLOCK_C"),
                x, da_s, dm_s, ic, out, c, p, sn, sc, sp, CHANNELS_LAST=cl, I64=_needs_i64(x))
    return out


def mixed_attention_bwd_dx(g: Tensor, mc: Tensor, ms: Tensor, da_s: Tensor, dm_s: Tensor,
                           ic: Tensor, d_avg: Tensor, d_mx: Tensor, im: Tensor) -> Tensor:
    """B3: ``dx = mc*(g*ms + da_s/C + dm_s*[c == ic]) + d_avg/P + d_mx*[p == im]``,
    returned in ``g``'s dtype and memory format."""
    sn, sc, sp, cl = _activation("g", g)
    n, c, h, w = g.shape
    p = h * w
    acc = _acc_dtype(g.dtype)
    dev = g.device
    mc = _small("mc", mc, (n, c), acc, dev)
    ms = _small("ms", ms, (n, h, w), acc, dev)
    da_s = _small("da_s", da_s, (n, h, w), acc, dev)
    dm_s = _small("dm_s", dm_s, (n, h, w), acc, dev)
    ic = _small("ic", ic, (n, h, w), torch.int32, dev)
    d_avg = _small("d_avg", d_avg, (n, c), acc, dev)
    d_mx = _small("d_mx", d_mx, (n, c), acc, dev)
    im = _small("im", im, (n, c), torch.int32, dev)
    dx = torch.empty_like(g)  # keeps g's strides, hence its memory format
    if dx.numel() == 0:
        return dx
    dsn, dsc, dsp, _ = _activation("dx", dx)
    with _device_ctx(g, "g"):
        _launch(_mixed_attention_bwd_dx_kernel,
                tile_grid(n, c, p),
                g, mc, ms, da_s, dm_s, ic, d_avg, d_mx, im, dx, c, p, sn, sc, sp, dsn, dsc, dsp,
                CHANNELS_LAST=cl, I64=_needs_i64(g))
    return dx
