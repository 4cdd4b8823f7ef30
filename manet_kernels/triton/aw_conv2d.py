"""Triton kernels for the AW-convolution passes (docs/design.md §2, §2.5).

Each launcher has the signature and return values of the function of the same
name in ``manet_kernels/reference/passes.py``, which is the contract.

Two launches per forward call and three per backward: a small prep kernel, then
implicit GEMMs with ``tl.dot`` (fp16/bf16 operands, fp32 accumulation; fp32 operands at
``input_precision="ieee"``, so no TF32; fp64 operands with fp64 accumulation), shaped
for the software pipeliner: each main loop is one flat loop with tens of iterations,
not nested short ones.

* prep: the weight as ``(..., kh*kw, C1/g, C2)`` and the scale as ``(N, kh*kw,
  C2)`` (one launch for both), so every weight and scale tile is contiguous along
  output channels.
* forward ``y[n]``: M = output positions, N = output channels of a group,
  K = (tap, input channel) flattened into one loop of ``taps * C1/g / BLOCK_K``
  iterations. The weight tile of the aw op is scaled by ``scale[n, c2, tap]`` as it
  is loaded; per-sample weights are never built.
* dx: the transposed GEMM, M = input positions, N = input channels, K = (tap,
  output channel), flattened the same way. For stride > 1 the input positions are
  split by stride phase ``(ih % sh, iw % sw)``: inside one phase a tap reaches every
  position from a fixed output offset or none, and the taps that reach them form an
  arithmetic progression, so the loop walks only those.
* weight grad: M = output channels, N = input channels, one tap per program,
  K = all samples' positions, split over chunks of samples (split-K) so that the
  grid fills the GPU. Per sample the ``G_n`` tile is kept in its own accumulator
  and folded into the ``dscale`` partial (``sum_c1 weight * G_n``) and into
  ``scale[n] * G_n``, the row scaling of the g tile. Each program writes its
  partials; the last program of a tile to finish (an int32 counter per tile) adds
  them in index order: no float atomics, the same bits every run.

The per-sample op runs the same kernels with the weight tile read from ``weights[n]``
instead of scaled, and its weight-grad kernel writes each ``G_n`` out.

Activations (``x``, ``g``) are read through explicit ``(N, C, H, W)`` strides, so
one kernel serves NCHW and channels_last; channels_last is the fast layout (the
channel axis is the contiguous one of every tile: 16-byte loads). ``y`` and ``dx``
come back in ``x``'s memory format.

On CUDA tensors the op layer runs these kernels only once they have passed their
GPU tests (``TRITON_AW_V2_VERIFIED`` in ``ops/_common.py``); until then it runs the
kernels of ``aw_conv2d_v1`` there. On CPU tensors the kernels run only under the
Triton interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is first imported).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from manet_kernels.triton._common import INTERPRET as _INTERPRET
from manet_kernels.triton._common import acc_dtype as _acc_dtype
from manet_kernels.triton._common import activation, device_ctx, interpreting, launch, needs_i64
from manet_kernels.triton._common import sample_counters as _sample_counters
from manet_kernels.triton._common import small as _small
from manet_kernels.triton._tiles import gemm_blocks

__all__ = [
    "per_sample_conv2d_fwd",
    "per_sample_conv2d_bwd",
    "aw_conv2d_fwd",
    "aw_conv2d_bwd",
]

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Interpreter tiles: channel and K tiles of 16, the least tl.dot takes on a GPU,
# so padded rows and columns are exercised; position tiles of 32, because the
# interpreter pays per operation, not per element, and 7x7 maps still span two.
_INTERP_GEMM_TILE = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}
_INTERP_WGRAD_TILE = {"BLOCK_K": 32}
_INTERP_WGRAD_MN = 16

# GPU tile lists, (tile, num_warps, num_stages), by operand width. 16-bit operands
# run on wgmma (sm_90): 64-wide K steps and 3-4 stages, so the flattened K loop keeps
# loads in flight. fp32 at input_precision="ieee" runs on the FMA units and fp64 on
# DMMA, both short of registers at the 16-bit tiles, so they get smaller ones.
# Compiled for sm_90 without a GPU (benchmarks/README.md, kernel report): no spills.
# None is yet timed on a GPU. Autotune sees only the tiles that fit the channel
# counts and the map (_fits); with deterministic algorithms on, the first of those
# is used. Four warps per 128-row tile: a thread then moves 16 x 16 bytes of
# operands per step against one 4-byte scale load (eight warps: 8 against 1).
_GEMM_CONFIGS = {  # forward and dx: (positions, channels, K) tiles
    16: [
        # >= 128 channels: wgmma N=128
        ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 4, 3),
        # 64 channels: wgmma N=64
        ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 4),
        # small maps (7x7): fewer wasted rows
        ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 4),
        ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
        # narrow groups
        ({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, 4, 3),
        # depthwise, first layer (C1 = 3)
        ({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}, 2, 3),
    ],
    32: [
        ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, 8, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 16}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}, 4, 3),
    ],
}
# Weight grad: the (output channel, input channel) tile is the launcher's pick
# (_wgrad_tile), because it sizes the partials allocated before the launch; autotune
# picks the position step, warps and stages.
# One warp per 16 output channels of the tile (_fits): 128-row tiles spilled at four
# warps (ptxas, sm_90), 64-row ones at eight split wgmma's N to 32.
_WGRAD_CONFIGS = {
    16: [
        ({"BLOCK_K": 64}, 8, 3),
        ({"BLOCK_K": 32}, 8, 4),
        ({"BLOCK_K": 64}, 4, 3),
        ({"BLOCK_K": 32}, 4, 4),
    ],
    32: [
        ({"BLOCK_K": 16}, 4, 3),
        ({"BLOCK_K": 32}, 4, 3),
    ],
}
# Largest (output, input) channel tile: two fp32 accumulators (G_n and the sum) of
# 128 x 128 spilled (ptxas, sm_90); 128 x 64 does not. fp32 operands: 64 x 64 spilled
# up to 196 bytes in NCHW.
_WGRAD_MN_MAX = {16: (128, 64), 32: (64, 32)}
# Weight-grad programs aimed at per SM: at least two waves at two CTAs per SM.
_WGRAD_PROGRAMS_PER_SM = 4
_PREP_BLOCK = 1024  # 8 elements per thread: 16-byte loads of 16-bit weights


def _cfg_key(cfg: triton.Config):
    return tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages


def _gpu_configs_for(table: dict, width: int) -> list[triton.Config]:
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in table[width]]


def _width(dtype: torch.dtype) -> int:
    return 16 if dtype.itemsize == 2 else 32


def _fits(cfg: triton.Config, dims: dict) -> bool:
    """Whether a tile suits the problem: ``dims`` maps ``BLOCK_M/N/K`` to the size
    that tile axis covers (positions or channels; a tile twice as large only adds
    padding, one under 64 channels wide only narrows wgmma), and ``"rows"`` to the
    weight grad's output-channel tile (one warp per 16 rows, at least four)."""
    kw = cfg.kwargs
    if "rows" in dims and cfg.num_warps * 16 != max(64, dims["rows"]):
        return False
    if "BLOCK_N" in dims and kw["BLOCK_N"] < min(64, triton.next_power_of_2(dims["BLOCK_N"])):
        return False  # narrow tiles are for narrow groups: wgmma N >= 64 where it fits
    return all(kw.get(name, 0) <= max(16 if name != "BLOCK_M" else 64,
                                      triton.next_power_of_2(dim))
               for name, dim in dims.items() if name.startswith("BLOCK_"))


def _autotune(table: dict, interp: dict, operand: str, key: list[str], dim_args=None):
    """Autotune over the tables' union, pruned to the operand dtype's list and to the
    tiles that fit (``dim_args``: ``_fits``'s dims, named by kernel argument; the
    first survivor is the deterministic pick)."""
    if _INTERPRET:
        # The interpreter cannot time configs, and autotune over several fails under it.
        return triton.autotune(configs=[triton.Config(interp, num_warps=1, num_stages=1)], key=key)
    configs, seen = [], set()
    for width in table:
        for cfg in _gpu_configs_for(table, width):
            if _cfg_key(cfg) not in seen:
                seen.add(_cfg_key(cfg))
                configs.append(cfg)

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        dims = {name: args[arg] for name, arg in (dim_args or {}).items()}
        keep = {_cfg_key(c) for c in _pruned(table, args[operand].dtype, dims)}
        return [c for c in configs if _cfg_key(c) in keep]

    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})


def _pruned(table: dict, dtype: torch.dtype, dims: dict) -> list[triton.Config]:
    cfgs = _gpu_configs_for(table, _width(dtype))
    return [c for c in cfgs if _fits(c, dims)] or cfgs[-1:]


# --------------------------------------------------------------------------- #
# kernels
# --------------------------------------------------------------------------- #

@triton.jit
def _taps_major_segment(src_ptr, dst_ptr, offs, total, C1, C2, T):
    """``dst (L, T, C1, C2) = src (L, C2, C1, T)`` at the source offsets ``offs <
    total``: contiguous (16-byte) loads, scattered stores."""
    mask = offs < total
    t = offs % T
    rest = offs // T
    c1 = rest % C1
    rest = rest // C1
    c2 = rest % C2
    lead = rest // C2
    v = tl.load(src_ptr + offs, mask=mask)
    tl.store(dst_ptr + ((lead * T + t) * C1 + c1) * C2 + c2, v.to(dst_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _aw_conv2d_prep_kernel(w_ptr, wp_ptr, s_ptr, sp_ptr, W_TOTAL, S_TOTAL, C1G, C2, T,
                           W_BLOCKS, I64: tl.constexpr, BLOCK: tl.constexpr):
    # Programs [0, W_BLOCKS) transpose the weight, the rest the scale (a weight
    # with one input channel): both in one launch.
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    if I64:
        offs = offs.to(tl.int64)
    if pid < W_BLOCKS:
        _taps_major_segment(w_ptr, wp_ptr, pid * BLOCK + offs, W_TOTAL, C1G, C2, T)
    else:
        _taps_major_segment(s_ptr, sp_ptr, (pid - W_BLOCKS) * BLOCK + offs, S_TOTAL, 1, C2, T)


@_autotune(_GEMM_CONFIGS, _INTERP_GEMM_TILE, "x_ptr",
           key=["C1G", "C2G", "P_OUT", "T", "CHANNELS_LAST", "SCALED"],
           dim_args={"BLOCK_M": "P_OUT", "BLOCK_N": "C2G", "BLOCK_K": "C1G"})
@triton.jit
def _aw_conv2d_fwd_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    G, C1G, C2G, H, W, WO, P_OUT, KW, T,
    SH, SW, PH, PW, DH, DW,
    xsN, xsC, xsH, xsW,
    wsN, wsT, wsC,          # weights (N?, T, C1/g, C2); C2 is the unit-stride axis
    ssN, ssT,               # scale (N, T, C2)
    ysN, ysC, ysH, ysW,
    SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    dot_t = x_ptr.dtype.element_ty
    # Channel blocks vary fastest: neighbouring programs share the x tile.
    nb, mb, rest = gemm_blocks(C2G, BLOCK_N, P_OUT, BLOCK_M)
    gi = rest % G
    n = rest // G

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < P_OUT
    oh = offs_m // WO
    ow = offs_m - oh * WO
    co = gi * C2G + nb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = co < (gi + 1) * C2G
    ck = tl.arange(0, BLOCK_K)
    if I64:
        n = n.to(tl.int64)
        gi = gi.to(tl.int64)
        oh = oh.to(tl.int64)
        ow = ow.to(tl.int64)
        co = co.to(tl.int64)
        ck = ck.to(tl.int64)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_base = x_ptr + n * xsN + (gi * C1G) * xsC
    w_base = w_ptr + n * wsN + co[None, :]
    s_base = s_ptr + n * ssN + co
    mask_n2 = mask_n[None, :]

    # One flat loop over (tap, channel block): taps * C1/g / BLOCK_K iterations for
    # the pipeliner, instead of a short channel loop per tap.
    num_cb = (C1G + BLOCK_K - 1) // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k32 in range(0, T * num_cb):
        k = k32
        if I64:
            k = tl.cast(k32, tl.int64)  # and every index derived from it
        t = k // num_cb
        c = (k - t * num_cb) * BLOCK_K + ck
        ki = t // KW
        ih = ih0 + ki * DH
        iw = iw0 + (t - ki * KW) * DW
        ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        mask_c = c < C1G
        a = tl.load(x_base + (ih * xsH + iw * xsW)[:, None] + c[None, :] * xsC,
                    mask=ok[:, None] & mask_c[None, :], other=0.0)
        b = tl.load(w_base + t * wsT + c[:, None] * wsC, mask=mask_c[:, None] & mask_n2,
                    other=0.0)
        if SCALED:
            # The per-sample weight exists only as this tile: one multiply per weight
            # element, rounded once to the operand dtype.
            sv = tl.load(s_base + t * ssT, mask=mask_n, other=0.0)
            b = (b.to(ACC) * sv.to(ACC)[None, :]).to(dot_t)
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)

    if HAS_BIAS:
        acc += tl.load(b_ptr + n * (G * C2G) + co, mask=mask_n, other=0.0).to(ACC)[None, :]
    y_ptrs = y_ptr + n * ysN + co[None, :] * ysC + (oh * ysH + ow * ysW)[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n2)


@triton.jit
def _first_tap(r, D, S, STEP, K):
    """The least tap ``k < STEP`` with ``(r - k*D) % S == 0`` (``K`` if none, or if
    it is past the kernel): the taps that reach a stride phase are ``first + j*STEP``
    (``STEP*D`` is a multiple of ``S``). A zero remainder is the same test under C
    and floor division."""
    first = K
    for j in range(0, STEP):
        hit = ((r - j * D) % S == 0) & (first == K) & (j < K)
        first = tl.where(hit, j, first)
    return first


@_autotune(_GEMM_CONFIGS, _INTERP_GEMM_TILE, "g_ptr",
           key=["C1G", "C2G", "PA_MAX", "T", "CHANNELS_LAST", "SCALED"],
           dim_args={"BLOCK_M": "PA_MAX", "BLOCK_N": "C1G", "BLOCK_K": "C2G"})
@triton.jit
def _aw_conv2d_bwd_input_kernel(
    g_ptr, w_ptr, s_ptr, dx_ptr,
    G, C1G, C2G, H, W, HO, WO, KH, KW, T, PA_MAX, STEP_H, STEP_W,
    SH, SW, PH, PW, DH, DW,
    gsN, gsC, gsH, gsW,
    wsN, wsT, wsC,
    ssN, ssT,
    dsN, dsC, dsH, dsW,
    SCALED: tl.constexpr, ACC: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    dot_t = g_ptr.dtype.element_ty
    nb, mb, rest = gemm_blocks(C1G, BLOCK_N, PA_MAX, BLOCK_M)
    phase = rest % (SH * SW)
    rest = rest // (SH * SW)
    gi = rest % G
    n = rest // G

    # This program's input positions: ih = rh + pa*SH, iw = rw + pb*SW.
    rh = phase // SW
    rw = phase - rh * SW
    ha = (H - rh + SH - 1) // SH
    wa = (W - rw + SW - 1) // SW
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < ha * wa
    pa = offs_m // tl.where(wa > 0, wa, 1)  # wa == 0: a phase past the edge, all masked
    pb = offs_m - pa * wa
    c1 = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = c1 < C1G
    ck = tl.arange(0, BLOCK_K)
    if I64:
        n = n.to(tl.int64)
        gi = gi.to(tl.int64)
        rh = rh.to(tl.int64)
        rw = rw.to(tl.int64)
        pa = pa.to(tl.int64)
        pb = pb.to(tl.int64)
        c1 = c1.to(tl.int64)
        ck = ck.to(tl.int64)
    g_base = g_ptr + n * gsN + (gi * C2G) * gsC
    w_base = w_ptr + n * wsN + gi * C2G + c1[None, :] * wsC
    s_base = s_ptr + n * ssN + gi * C2G
    mask_n2 = mask_n[None, :]

    # The taps that reach this phase: ki = ki0 + jh*STEP_H, kj = kj0 + jw*STEP_W.
    ki0 = _first_tap(rh + PH, DH, SH, STEP_H, KH)
    kj0 = _first_tap(rw + PW, DW, SW, STEP_W, KW)
    nkh = tl.where(ki0 < KH, (KH - ki0 + STEP_H - 1) // STEP_H, 0)
    nkw = tl.where(kj0 < KW, (KW - kj0 + STEP_W - 1) // STEP_W, 0)
    nkw_div = tl.where(nkw > 0, nkw, 1)
    num_cb = (C2G + BLOCK_K - 1) // BLOCK_K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k32 in range(0, nkh * nkw * num_cb):
        k = k32
        if I64:
            k = tl.cast(k32, tl.int64)  # and every index derived from it
        j = k // num_cb
        kk = (k - j * num_cb) * BLOCK_K + ck
        jh = j // nkw_div
        ki = ki0 + jh * STEP_H
        kj = kj0 + (j - jh * nkw_div) * STEP_W
        # Exact divisions (the tap reaches the phase), so C and floor division agree.
        oh = (rh + PH - ki * DH) // SH + pa
        ow = (rw + PW - kj * DW) // SW + pb
        ok = mask_m & (oh >= 0) & (oh < HO) & (ow >= 0) & (ow < WO)
        t = ki * KW + kj
        mask_k = kk < C2G
        a = tl.load(g_base + (oh * gsH + ow * gsW)[:, None] + kk[None, :] * gsC,
                    mask=ok[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_base + t * wsT + kk[:, None], mask=mask_k[:, None] & mask_n2, other=0.0)
        if SCALED:
            # g*scale*w == g*(scale*w): the scale rides on the weight tile.
            sv = tl.load(s_base + t * ssT + kk, mask=mask_k, other=0.0).to(ACC)
            b = (b.to(ACC) * sv[:, None]).to(dot_t)
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)

    ih = rh + pa * SH
    iw = rw + pb * SW
    dx_ptrs = dx_ptr + n * dsN + (gi * C1G + c1)[None, :] * dsC + (ih * dsH + iw * dsW)[:, None]
    # Positions no tap reaches are written too (zeros): every dx element has one owner.
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n2)


@_autotune(_WGRAD_CONFIGS, _INTERP_WGRAD_TILE, "g_ptr",
           key=["C1G", "C2G", "P_OUT", "T", "N_CHUNK", "CHANNELS_LAST", "AW", "BLOCK_M",
                "BLOCK_N"], dim_args={"rows": "BLOCK_M"})
@triton.jit
def _aw_conv2d_bwd_weight_kernel(
    g_ptr, x_ptr, w_ptr, s_ptr, dw_ptr, ds_ptr, dwp_ptr, dsp_ptr, cnt_ptr,
    N, G, C1G, C2G, H, W, WO, P_OUT, KW, T,
    SH, SW, PH, PW, DH, DW,
    N_CHUNK, NUM_SPLITS,
    gsN, gsC, gsH, gsW,
    xsN, xsC, xsH, xsW,
    wsT, wsC,               # weight (T, C1/g, C2), aw only
    ssN, ssT,               # scale (N, T, C2), aw only
    AW: tl.constexpr, ACC: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Outputs (T innermost, like the weight): dw (C2, C1/g, T) for aw, (N, C2, C1/g, T)
    # per-sample; ds (N, C2, T). Partials, taps outer so that the finishing program
    # reads them along channels: dwp (NUM_SPLITS, T, C2, C1/g), dsp (channel blocks,
    # N, T, C2).
    nb, mb, rest = gemm_blocks(C1G, BLOCK_N, C2G, BLOCK_M)
    num_nb = (C1G + BLOCK_N - 1) // BLOCK_N  # for the counters and the partials below
    num_mb = (C2G + BLOCK_M - 1) // BLOCK_M
    t = rest % T
    rest = rest // T
    gi = rest % G
    split = rest // G
    tile = (gi * T + t) * num_mb + mb
    n_lo = split * N_CHUNK
    n_hi = tl.where(n_lo + N_CHUNK < N, n_lo + N_CHUNK, N)
    ki = t // KW
    ih_t = ki * DH - PH
    iw_t = (t - ki * KW) * DW - PW

    co = gi * C2G + mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = co < (gi + 1) * C2G
    c1 = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = c1 < C1G
    qk = tl.arange(0, BLOCK_K)
    if I64:
        gi = gi.to(tl.int64)
        co = co.to(tl.int64)
        c1 = c1.to(tl.int64)
        split = split.to(tl.int64)
        qk = qk.to(tl.int64)
    mask_m2 = mask_m[:, None]
    mask_mn = mask_m2 & mask_n[None, :]
    g_rows = g_ptr + co[:, None] * gsC
    x_cols = x_ptr + (gi * C1G + c1)[None, :] * xsC
    c2_all = G * C2G
    out_off = co[:, None] * (C1G * T) + c1[None, :] * T + t  # within one (C2, C1/g, T)
    part_off = (t * c2_all + co[:, None]) * C1G + c1[None, :]  # within one (T, C2, C1/g)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for n32 in range(n_lo, n_hi):
        n = n32
        if I64:
            n = tl.cast(n32, tl.int64)
        gn = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for q0 in range(0, P_OUT, BLOCK_K):
            q = q0 + qk
            oh = q // WO
            ow = q - oh * WO
            ih = oh * SH + ih_t
            iw = ow * SW + iw_t
            mask_q = q < P_OUT
            ok = mask_q & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(g_rows + n * gsN + (oh * gsH + ow * gsW)[None, :],
                        mask=mask_m2 & mask_q[None, :], other=0.0)
            b = tl.load(x_cols + n * xsN + (ih * xsH + iw * xsW)[:, None],
                        mask=ok[:, None] & mask_n[None, :], other=0.0)
            gn = tl.dot(a, b, gn, input_precision="ieee", out_dtype=ACC)
        if AW:
            # G_n is folded into both gradients while it is in registers, so the
            # (N, C2, C1/g, kh, kw) per-sample gradient is never written. The
            # weight tile is re-read per sample (cache-resident) to spare registers.
            wv = tl.load(w_ptr + t * wsT + c1[None, :] * wsC + co[:, None], mask=mask_mn,
                         other=0.0)
            ds_off = ((nb * N + n) * T + t) * c2_all + co
            tl.store(dsp_ptr + ds_off, tl.sum(wv.to(ACC) * gn, axis=1), mask=mask_m)
            sv = tl.load(s_ptr + n * ssN + t * ssT + co, mask=mask_m, other=0.0).to(ACC)
            acc += sv[:, None] * gn
        else:
            tl.store(dw_ptr + n * (c2_all * C1G * T) + out_off, gn, mask=mask_mn)

    if AW:
        tl.store(dwp_ptr + split * (c2_all * C1G * T) + part_off, acc, mask=mask_mn)
        # The last program to arrive at a counter adds the partials in index order and
        # resets it. Every thread's stores come before the (acq_rel, gpu-scope)
        # increment, so the last program sees every other program's stores.
        # (Inline, not a helper: the interpreter pays ~5 ms per nested jit call.)
        # dscale: the last of this sample chunk's channel blocks.
        ds_cnt = cnt_ptr + split * (G * T * num_mb) + tile
        tl.debug_barrier()
        if tl.atomic_add(ds_cnt, 1) == num_nb - 1:
            tl.debug_barrier()
            for n32 in range(n_lo, n_hi):
                n = n32
                if I64:
                    n = tl.cast(n32, tl.int64)
                tot = tl.zeros((BLOCK_M,), dtype=ACC)
                rows = dsp_ptr + (n * T + t) * c2_all + co  # channel block 0's partial
                for _ in range(0, num_nb):  # block order: the same sum every run
                    tot += tl.load(rows, mask=mask_m, other=0.0)
                    rows += N * T * c2_all
                tl.store(ds_ptr + n * (c2_all * T) + co * T + t, tot, mask=mask_m)
            tl.atomic_xchg(ds_cnt, 0)  # ready for the next launch, without a fill
        # dweight: the last sample chunk of this tile.
        dw_cnt = cnt_ptr + NUM_SPLITS * (G * T * num_mb) + tile * num_nb + nb
        if tl.atomic_add(dw_cnt, 1) == NUM_SPLITS - 1:
            tl.debug_barrier()
            tot2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            parts = dwp_ptr + part_off  # chunk 0's partial
            for _ in range(0, NUM_SPLITS):  # chunk order: the same sum every run
                tot2 += tl.load(parts, mask=mask_mn, other=0.0)
                parts += c2_all * C1G * T
            tl.store(dw_ptr + out_off, tot2, mask=mask_mn)
            tl.atomic_xchg(dw_cnt, 0)


# --------------------------------------------------------------------------- #
# host side
# --------------------------------------------------------------------------- #

# Test hooks. _FORCED_CONFIGS: kernel -> triton.Config launched on the raw jit
# function (no autotune), so the GPU tiles can be run under the interpreter.
# _FORCED_SPLITS: sample chunks of the weight grad, so the split-K path runs on tiny
# shapes. _FORCED_WGRAD_MN: the weight grad's (output, input) channel tile.
_FORCED_CONFIGS: dict = {}
_FORCED_SPLITS: int | None = None
_FORCED_WGRAD_MN: tuple[int, int] | None = None


_TABLES = {
    _aw_conv2d_fwd_kernel: _GEMM_CONFIGS,
    _aw_conv2d_bwd_input_kernel: _GEMM_CONFIGS,
    _aw_conv2d_bwd_weight_kernel: _WGRAD_CONFIGS,
}


def _gpu_configs(kernel, dtype) -> list[triton.Config]:
    """The GPU tiles autotune may choose from for ``kernel`` on operands of ``dtype``."""
    return _gpu_configs_for(_TABLES[kernel], _width(dtype))


def _launch(kernel, grid, dtype: torch.dtype, dims: dict, *args, **kwargs) -> None:
    """``dims``: what the tile must fit (``_fits``)."""
    def pick(kernel, _kwargs):  # deterministic: the first tile that fits
        return kernel.configs[0] if _INTERPRET else _pruned(_TABLES[kernel], dtype, dims)[0]
    launch(_FORCED_CONFIGS, kernel, grid, *args, pick=pick, **kwargs)


def _interpreting() -> bool:
    return interpreting(_aw_conv2d_fwd_kernel)


def _device_ctx(x: Tensor):
    return device_ctx(x, _interpreting, "aw_conv2d")


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _strides(shape, channels_last: bool) -> tuple[int, int, int, int]:
    # Canonical strides, not t.stride(): a dim of size 1 may carry any stride.
    _, c, h, w = shape
    return (h * w * c, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)


def _activation(name: str, t) -> bool:
    """Validate an activation; return whether it is read as channels_last."""
    return activation(name, t, _ACT_DTYPES, sizes="nonempty")


def _pair(name: str, v, minimum: int) -> tuple[int, int]:
    vals = [v] * 2 if isinstance(v, int) and not isinstance(v, bool) else v
    try:
        vals = list(vals)
    except TypeError:
        raise TypeError(
            f"{name}: expected an int or a pair of ints, got {type(v).__name__}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or any(isinstance(e, bool) or not isinstance(e, int) for e in vals):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}")
    if min(vals) < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {v!r}")
    return vals[0], vals[1]


class _Geo(NamedTuple):
    n: int
    c1: int
    h: int
    w: int
    c2: int
    c1g: int
    c2g: int
    kh: int
    kw: int
    ho: int
    wo: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    x_cl: bool
    acc: torch.dtype

    @property
    def taps(self) -> int:
        return self.kh * self.kw

    def conv_args(self) -> tuple[int, ...]:
        return (*self.stride, *self.padding, *self.dilation)


def _geometry(x, wname: str, wt, per_sample: bool, stride, padding, dilation, groups) -> _Geo:
    x_cl = _activation("x", x)
    n, c1, h, w = x.shape
    if not isinstance(wt, Tensor):
        raise TypeError(f"{wname}: expected a torch.Tensor, got {type(wt).__name__}")
    want = 5 if per_sample else 4
    layout = "(N, C2, C1/groups, kh, kw)" if per_sample else "(C2, C1/groups, kh, kw)"
    if wt.dim() != want:
        raise ValueError(
            f"{wname}: expected a {want}-D {layout} tensor, got shape {tuple(wt.shape)}")
    if wt.dtype != x.dtype:
        raise TypeError(
            f"{wname}: expected x's dtype {x.dtype} (the caller casts), got {wt.dtype}")
    if wt.device != x.device:
        raise ValueError(
            f"{wname}: expected a tensor on {x.device} (x's device), got one on {wt.device}")
    if per_sample and wt.shape[0] != n:
        raise ValueError(
            f"{wname}: expected {n} samples (x's batch) in dim 0, got shape {tuple(wt.shape)}")
    c2, c1g, kh, kw = wt.shape[-4:]
    if min(c2, c1g, kh, kw) < 1:
        raise ValueError(
            f"{wname}: expected non-empty C2, C1/groups, kh, kw, got shape {tuple(wt.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups: expected an int, got {type(groups).__name__}")
    if groups < 1:
        raise ValueError(f"groups: expected >= 1, got {groups}")
    if c1 % groups or c2 % groups:
        raise ValueError(f"groups: {groups} must divide both C1 ({c1}) and C2 ({c2})")
    if c1g * groups != c1:
        raise ValueError(f"{wname}: expected C1/groups = {c1 // groups} input channels "
                         f"in dim {want - 3}, got shape {tuple(wt.shape)}")
    st = _pair("stride", stride, 1)
    pd = _pair("padding", padding, 0)
    dl = _pair("dilation", dilation, 1)
    ho = (h + 2 * pd[0] - dl[0] * (kh - 1) - 1) // st[0] + 1
    wo = (w + 2 * pd[1] - dl[1] * (kw - 1) - 1) // st[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"x: spatial size {(h, w)} with padding {pd} is smaller than the "
                         f"dilated kernel {(dl[0] * (kh - 1) + 1, dl[1] * (kw - 1) + 1)}")
    return _Geo(n, c1, h, w, c2, c1g, c2 // groups, kh, kw, ho, wo, st, pd, dl, groups, x_cl,
                _acc_dtype(x.dtype))


def _check_g(g, x: Tensor, geo: _Geo) -> bool:
    g_cl = _activation("g", g)
    want = (geo.n, geo.c2, geo.ho, geo.wo)
    if tuple(g.shape) != want:
        raise ValueError(f"g: expected shape {want} (the conv output), got {tuple(g.shape)}")
    if g.dtype != x.dtype:
        raise TypeError(f"g: expected x's dtype {x.dtype}, got {g.dtype}")
    if g.device != x.device:
        raise ValueError(f"g: expected a tensor on {x.device} (x's device), got one on {g.device}")
    return g_cl


# The interpreter checks every int32 add/mul for overflow (about 1 ms apiece,
# measured) and skips int64 ones, so it indexes in int64; a test runs the
# int32 path too.
_INTERP_I64 = _INTERPRET


def _i64(*ts: Tensor) -> bool:
    return _INTERP_I64 or needs_i64(*ts)


def _fmt(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


def _prep(wt: Tensor, scale: Tensor | None, geo: _Geo) -> tuple[Tensor, Tensor | None]:
    """One launch: ``(..., C2, C1/g, kh, kw)`` -> ``(..., kh*kw, C1/g, C2)`` and
    ``scale (N, C2, kh, kw)`` -> ``(N, kh*kw, C2)``, both contiguous."""
    lead = wt.shape[:-4]
    wp = torch.empty((*lead, geo.taps, geo.c1g, geo.c2), dtype=wt.dtype, device=wt.device)
    sp = None if scale is None else torch.empty((geo.n, geo.taps, geo.c2), dtype=scale.dtype,
                                                device=wt.device)
    w_blocks = triton.cdiv(wt.numel(), _PREP_BLOCK)
    s_total = 0 if scale is None else scale.numel()
    grid = (w_blocks + triton.cdiv(s_total, _PREP_BLOCK),)
    with _device_ctx(wt):
        _aw_conv2d_prep_kernel[grid](wt, wp, wt if scale is None else scale,
                                     wp if sp is None else sp, wt.numel(), s_total, geo.c1g,
                                     geo.c2, geo.taps, w_blocks, I64=_i64(wt),
                                     BLOCK=_PREP_BLOCK)
    return wp, sp


def _forward(x: Tensor, wp: Tensor, sp: Tensor | None, bias: Tensor | None, geo: _Geo,
             per_sample: bool) -> Tensor:
    y = torch.empty((geo.n, geo.c2, geo.ho, geo.wo), dtype=x.dtype, device=x.device,
                    memory_format=_fmt(geo.x_cl))
    if geo.n == 0:
        return y
    p_out = geo.ho * geo.wo
    xs = _strides(x.shape, geo.x_cl)
    ys = _strides(y.shape, geo.x_cl)
    ws = (wp.stride(0) if per_sample else 0, wp.stride(-3), wp.stride(-2))
    ss = (sp.stride(0), sp.stride(1)) if sp is not None else (0, 0)
    grid = lambda meta: (geo.n * geo.groups * triton.cdiv(p_out, meta["BLOCK_M"])  # noqa: E731
                         * triton.cdiv(geo.c2g, meta["BLOCK_N"]),)
    with _device_ctx(x):
        _launch(_aw_conv2d_fwd_kernel, grid, x.dtype,
                {"BLOCK_M": p_out, "BLOCK_N": geo.c2g, "BLOCK_K": geo.c1g},
                x, wp, sp if sp is not None else wp, bias if bias is not None else y, y,
                geo.groups, geo.c1g, geo.c2g, geo.h, geo.w, geo.wo, p_out, geo.kw, geo.taps,
                *geo.conv_args(), *xs, *ws, *ss, *ys,
                SCALED=sp is not None, HAS_BIAS=bias is not None, ACC=_tl_acc(x.dtype),
                CHANNELS_LAST=geo.x_cl, I64=_i64(x, y, wp))
    return y


def _input_grad(g: Tensor, g_cl: bool, wp: Tensor, sp: Tensor | None, geo: _Geo, x: Tensor,
                per_sample: bool) -> Tensor:
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_fmt(geo.x_cl))
    sh, sw = geo.stride
    dh, dw = geo.dilation
    pa_max = triton.cdiv(geo.h, sh) * triton.cdiv(geo.w, sw)
    gs = _strides(g.shape, g_cl)
    ds = _strides(dx.shape, geo.x_cl)
    ws = (wp.stride(0) if per_sample else 0, wp.stride(-3), wp.stride(-2))
    ss = (sp.stride(0), sp.stride(1)) if sp is not None else (0, 0)
    grid = lambda meta: (geo.n * geo.groups * sh * sw  # noqa: E731
                         * triton.cdiv(pa_max, meta["BLOCK_M"])
                         * triton.cdiv(geo.c1g, meta["BLOCK_N"]),)
    with _device_ctx(x):
        _launch(_aw_conv2d_bwd_input_kernel, grid, x.dtype,
                {"BLOCK_M": pa_max, "BLOCK_N": geo.c1g, "BLOCK_K": geo.c2g},
                g, wp, sp if sp is not None else wp, dx,
                geo.groups, geo.c1g, geo.c2g, geo.h, geo.w, geo.ho, geo.wo, geo.kh, geo.kw,
                geo.taps, pa_max, sh // math.gcd(sh, dh), sw // math.gcd(sw, dw),
                *geo.conv_args(), *gs, *ws, *ss, *ds,
                SCALED=sp is not None, ACC=_tl_acc(x.dtype), CHANNELS_LAST=g_cl,
                I64=_i64(g, dx, wp))
    return dx


def _wgrad_tile(geo: _Geo, dtype: torch.dtype) -> tuple[int, int]:
    """(output, input) channel tile of the weight grad: as wide as the channels, up
    to ``_WGRAD_MN_MAX``."""
    if _FORCED_WGRAD_MN is not None:
        return _FORCED_WGRAD_MN
    if _INTERPRET:
        return _INTERP_WGRAD_MN, _INTERP_WGRAD_MN
    tops = _WGRAD_MN_MAX[_width(dtype)]
    return tuple(min(top, max(16, triton.next_power_of_2(c)))
                 for top, c in zip(tops, (geo.c2g, geo.c1g)))


def _wgrad_splits(geo: _Geo, base_programs: int, device: torch.device) -> int:
    """Sample chunks (split-K) of the weight grad: enough programs for
    ``_WGRAD_PROGRAMS_PER_SM`` per SM, each chunk at least one sample."""
    if _FORCED_SPLITS is not None:
        return min(_FORCED_SPLITS, geo.n)
    if device.type != "cuda":
        return 1
    target = _WGRAD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    # Chunks of n_chunk samples, n_chunk rounded down: at least the target.
    return triton.cdiv(geo.n, max(1, geo.n * base_programs // target))


def _weight_grad(g: Tensor, g_cl: bool, x: Tensor, wp: Tensor | None, sp: Tensor | None,
                 geo: _Geo) -> tuple[Tensor, Tensor | None]:
    """aw (``wp``, ``sp`` given): ``(dweight, dscale)``; per-sample: ``(dweights, None)``."""
    aw = wp is not None
    acc, t, dev = geo.acc, geo.taps, x.device
    block_m, block_n = _wgrad_tile(geo, x.dtype)
    num_mb, num_nb = triton.cdiv(geo.c2g, block_m), triton.cdiv(geo.c1g, block_n)
    tiles = geo.groups * t * num_mb
    splits = _wgrad_splits(geo, tiles * num_nb, dev)
    n_chunk = triton.cdiv(geo.n, splits)
    splits = triton.cdiv(geo.n, n_chunk)  # no empty sample chunk
    lead = (geo.n,) if not aw else ()
    dw = torch.empty((*lead, geo.c2, geo.c1g, geo.kh, geo.kw), dtype=acc, device=dev)
    if aw:
        ds = torch.empty((geo.n, geo.c2, geo.kh, geo.kw), dtype=acc, device=dev)
        dwp = torch.empty((splits, t, geo.c2, geo.c1g), dtype=acc, device=dev)
        dsp = torch.empty((num_nb, geo.n, t, geo.c2), dtype=acc, device=dev)
        cnt = _sample_counters(tiles * (splits + num_nb), dev)
        wsp, ssp = (wp.stride(0), wp.stride(1)), (sp.stride(0), sp.stride(1))
    else:
        ds = dwp = dsp = cnt = dw  # unused
        wsp = ssp = (0, 0)
    gs = _strides(g.shape, g_cl)
    xs = _strides(x.shape, geo.x_cl)
    grid = (splits * tiles * num_nb,)
    with _device_ctx(x):
        _launch(_aw_conv2d_bwd_weight_kernel, grid, x.dtype, {"rows": block_m},
                g, x, wp if aw else x, sp if aw else x, dw, ds, dwp, dsp, cnt,
                geo.n, geo.groups, geo.c1g, geo.c2g, geo.h, geo.w, geo.wo, geo.ho * geo.wo,
                geo.kw, t, *geo.conv_args(), n_chunk, splits, *gs, *xs, *wsp, *ssp,
                AW=aw, ACC=_tl_acc(x.dtype), CHANNELS_LAST=geo.x_cl,
                I64=_i64(g, x, dw, dwp, dsp), BLOCK_M=block_m, BLOCK_N=block_n)
    return dw, (ds if aw else None)


# --------------------------------------------------------------------------- #
# launchers: the contract of reference/passes.py
# --------------------------------------------------------------------------- #

def per_sample_conv2d_fwd(x: Tensor, weights: Tensor, bias: Tensor | None,
                          stride: list[int], padding: list[int], dilation: list[int],
                          groups: int) -> Tensor:
    """``y[n] = conv2d(x[n], weights[n], bias[n])``; ``weights (N, C2, C1/g, kh, kw)``
    in ``x``'s dtype, ``bias (N, C2)`` in acc dtype or None. ``y`` in ``x``'s
    dtype and memory format."""
    geo = _geometry(x, "weights", weights, True, stride, padding, dilation, groups)
    if bias is not None:
        bias = _small("bias", bias, (geo.n, geo.c2), geo.acc, x.device)
    if geo.n == 0:
        return _forward(x, weights, None, bias, geo, per_sample=True)
    wp, _ = _prep(weights.contiguous(), None, geo)
    return _forward(x, wp, None, bias, geo, per_sample=True)


def per_sample_conv2d_bwd(g: Tensor, x: Tensor, weights: Tensor, stride: list[int],
                          padding: list[int], dilation: list[int], groups: int
                          ) -> tuple[Tensor, Tensor]:
    """``(dx, dweights)``: ``dx`` in ``x``'s dtype/format, ``dweights (N, C2, C1/g,
    kh, kw)`` in acc dtype."""
    geo = _geometry(x, "weights", weights, True, stride, padding, dilation, groups)
    g_cl = _check_g(g, x, geo)
    if geo.n == 0:
        return torch.empty_like(x), torch.empty(weights.shape, dtype=geo.acc, device=x.device)
    wp, _ = _prep(weights.contiguous(), None, geo)
    dx = _input_grad(g, g_cl, wp, None, geo, x, per_sample=True)
    dws, _ = _weight_grad(g, g_cl, x, None, None, geo)
    return dx, dws


def aw_conv2d_fwd(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None,
                  stride: list[int], padding: list[int], dilation: list[int],
                  groups: int) -> Tensor:
    """``y[n] = conv2d(x[n], weight * scale[n][:, None], bias[n])`` with ``weight
    (C2, C1/g, kh, kw)`` in ``x``'s dtype, ``scale (N, C2, kh, kw)`` and ``bias
    (N, C2)`` in acc dtype (bias may be None)."""
    geo = _geometry(x, "weight", weight, False, stride, padding, dilation, groups)
    scale = _small("scale", scale, (geo.n, geo.c2, geo.kh, geo.kw), geo.acc, x.device)
    if bias is not None:
        bias = _small("bias", bias, (geo.n, geo.c2), geo.acc, x.device)
    if geo.n == 0:
        return _forward(x, weight, scale, bias, geo, per_sample=False)
    wp, sp = _prep(weight.contiguous(), scale, geo)
    return _forward(x, wp, sp, bias, geo, per_sample=False)


def aw_conv2d_bwd(g: Tensor, x: Tensor, weight: Tensor, scale: Tensor, stride: list[int],
                  padding: list[int], dilation: list[int], groups: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight (C2, C1/g, kh, kw), dscale (N, C2, kh, kw))``; with ``G_n``
    the per-sample weight gradient: ``dweight = sum_n scale[n] * G_n`` and
    ``dscale[n] = sum_{c1} weight * G_n`` (both in acc dtype)."""
    geo = _geometry(x, "weight", weight, False, stride, padding, dilation, groups)
    scale = _small("scale", scale, (geo.n, geo.c2, geo.kh, geo.kw), geo.acc, x.device)
    g_cl = _check_g(g, x, geo)
    if geo.n == 0:
        return (torch.empty_like(x), torch.zeros(weight.shape, dtype=geo.acc, device=x.device),
                torch.empty(scale.shape, dtype=geo.acc, device=x.device))
    wp, sp = _prep(weight.contiguous(), scale, geo)
    dx = _input_grad(g, g_cl, wp, sp, geo, x, per_sample=False)
    dw, ds = _weight_grad(g, g_cl, x, wp, sp, geo)
    return dx, dw, ds
