"""The first Triton kernels of the AW-convolution passes (docs/design.md §2.5), the
ones that passed their GPU tests (H100, 2026-11-23). ``ops/aw_conv2d.py`` runs them on
CUDA tensors until the kernels of ``aw_conv2d.py`` have passed theirs
(``TRITON_AW_V2_VERIFIED`` in ``ops/_common.py``); the host-side checks are shared
with that module. Nothing here runs on CPU tensors.


Each launcher has the signature and return values of the function of the same
name in ``manet_kernels/reference/passes.py``, which is the contract.

All three kernels are implicit GEMMs with ``tl.dot`` (fp16/bf16 operands,
fp32 accumulation; fp32 operands at ``input_precision="ieee"``, so no TF32;
fp64 operands with fp64 accumulation):

* forward  ``y[n]``: M = output positions, N = output channels of a group,
  K = (tap, input channel), taps outer. The weight tile of the aw op is scaled
  by ``scale[n, c2, tap]`` as it is loaded; per-sample weights are never built.
* dx: the transposed GEMM, M = input positions, N = input channels, K = (tap,
  output channel). For stride > 1 the input positions are split by stride
  phase ``(ih % sh, iw % sw)``: inside one phase a tap either reaches every
  position from a fixed output offset or none, so off-grid taps are skipped
  whole instead of masked element by element.
* weight grad: M = output channels, N = input channels, one tap per program,
  K = output positions. The aw kernel walks samples in its outer loop with the
  per-sample ``G_n`` tile in its own accumulator, folds
  ``sum_c1 weight * G_n`` into a ``dscale`` partial and ``scale[n] * G_n`` into
  the ``dweight`` accumulator. Work is split over chunks of samples and of
  positions (both sums are linear in ``G_n``); each program writes its own
  partial and torch adds the partials in a fixed order afterwards.

The per-sample op runs the same three kernels with the weight tile read from
``weights[n]`` instead of scaled, and its weight-grad kernel writes each
``G_n`` out.

There are no float atomics, so results are bitwise reproducible run to run for
a given tile config and split; under ``torch.use_deterministic_algorithms(True)``
the config is fixed instead of autotuned, so they are reproducible across
processes on the same GPU model.

Activations (``x``, ``g``) are read through explicit ``(N, C, H, W)`` strides,
so one kernel serves NCHW and channels_last; ``y`` and ``dx`` come back in
``x``'s memory format. Weights are handed to the kernels as ``(..., kh, kw,
C1/g, C2)`` copies (one pass over the weights) so that every weight tile is
contiguous along output channels, and scales as ``(N, kh, kw, C2)``.

On CPU tensors the kernels run only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is first imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from manet_kernels.triton._common import INTERPRET as _INTERPRET
from manet_kernels.triton._common import device_ctx, interpreting, needs_i64
from manet_kernels.triton._common import small as _small
from manet_kernels.triton.aw_conv2d import (  # noqa: F401  (shared host checks)
    _check_g,
    _fmt,
    _Geo,
    _geometry,
    _strides,
    _tl_acc,
)

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
_INTERP_WGRAD_TILE = {"BLOCK_M": 16, "BLOCK_K": 32}
_INTERP_WGRAD_BLOCK_N = 16

# GPU tile lists, (tile, num_warps), by operand width: 16-bit operands run on
# tensor cores (wgmma on sm_90); fp32 at input_precision="ieee" runs on the FMA
# units and fp64 on DMMA, both short of registers at the 16-bit tiles (ptxas
# spilled kilobytes), so they get smaller ones. Compiled for sm_90 without a
# GPU (triton 3.8 and 3.6): the 16-bit entries do not spill (but one, 48 bytes
# on 3.6), the 32/64-bit ones spill at most 48 bytes. None is yet timed on a
# GPU. With deterministic algorithms on, the first entry for the dtype is used
# without autotuning.
_GEMM_CONFIGS = {  # forward and dx: (positions, channels, K) tiles
    16: [
        # general case; not yet measured on a GPU
        ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, 8),
        # small maps (14x14, 7x7); not yet measured on a GPU
        ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 4),
        # wide layers; not yet measured on a GPU
        ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, 8),
        # wide layers, small maps; not yet measured on a GPU
        ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, 8),
        # deep K (C/g >= 256); not yet measured on a GPU
        ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 8),
        # narrow groups; not yet measured on a GPU
        ({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, 4),
        # first layer (C1 = 3); not yet measured on a GPU
        ({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 16}, 4),
        # depthwise; not yet measured on a GPU
        ({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}, 2),
    ],
    32: [
        # general case; not yet measured on a GPU
        ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, 8),
        # narrow groups, small maps; not yet measured on a GPU
        ({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, 4),
        # large maps; not yet measured on a GPU
        ({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 16}, 8),
        # wide layers, small maps; not yet measured on a GPU
        ({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16}, 4),
        # depthwise; not yet measured on a GPU
        ({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}, 4),
    ],
}
# Weight grad: BLOCK_N (input channels) is the launcher's pick, because it sizes
# the dscale partials that are allocated before the launch.
_WGRAD_CONFIGS = {  # (output channels, positions) tiles
    16: [
        # general case; not yet measured on a GPU
        ({"BLOCK_M": 64, "BLOCK_K": 32}, 8),
        # wide layers; not yet measured on a GPU
        ({"BLOCK_M": 128, "BLOCK_K": 32}, 8),
        # large maps; not yet measured on a GPU
        ({"BLOCK_M": 64, "BLOCK_K": 64}, 8),
        # few output channels per group; not yet measured on a GPU
        ({"BLOCK_M": 32, "BLOCK_K": 128}, 8),
        # depthwise; not yet measured on a GPU
        ({"BLOCK_M": 16, "BLOCK_K": 128}, 4),
    ],
    32: [
        # general case; not yet measured on a GPU
        ({"BLOCK_M": 64, "BLOCK_K": 16}, 8),
        # few output channels per group; not yet measured on a GPU
        ({"BLOCK_M": 32, "BLOCK_K": 16}, 4),
        # wide layers; not yet measured on a GPU
        ({"BLOCK_M": 128, "BLOCK_K": 16}, 8),
    ],
}
# The loops nest (taps, then channels; samples, then positions), so the software
# pipeliner adds nothing measurable at compile time (same shared memory at 1-4
# stages); 2 keeps the door open. Not yet measured on a GPU.
_NUM_STAGES = 2
# Position chunks of the weight-grad split are whole multiples of this, so no
# BLOCK_K above (powers of two up to 128) leaves a ragged block mid-range.
_Q_ALIGN = _INTERP_WGRAD_TILE["BLOCK_K"] if _INTERPRET else 128


def _cfg_key(cfg: triton.Config):
    return tuple(sorted(cfg.kwargs.items())), cfg.num_warps


def _gpu_configs_for(table: dict, width: int) -> list[triton.Config]:
    return [triton.Config(kw, num_warps=w, num_stages=_NUM_STAGES) for kw, w in table[width]]


def _width(dtype: torch.dtype) -> int:
    return 16 if dtype.itemsize == 2 else 32


def _autotune(table: dict, interp: dict, operand: str, key: list[str]):
    """Autotune over the tables' union, pruned to the operand dtype's list."""
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
        allowed = {_cfg_key(c) for c in _gpu_configs_for(table, _width(named_args[operand].dtype))}
        return [c for c in configs if _cfg_key(c) in allowed]

    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})


# --------------------------------------------------------------------------- #
# kernels
# --------------------------------------------------------------------------- #

@_autotune(_GEMM_CONFIGS, _INTERP_GEMM_TILE, "x_ptr",
           key=["C1G", "C2G", "P_OUT", "T", "CHANNELS_LAST", "SCALED"])
@triton.jit
def _aw_conv2d_fwd_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    G, C1G, C2G, H, W, WO, P_OUT, KH, KW, T,
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
    pid = tl.program_id(0)
    num_nb = (C2G + BLOCK_N - 1) // BLOCK_N
    num_mb = (P_OUT + BLOCK_M - 1) // BLOCK_M
    # Channel blocks vary fastest: neighbouring programs share the x tile.
    nb = pid % num_nb
    rest = pid // num_nb
    mb = rest % num_mb
    rest = rest // num_mb
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
    w_base = w_ptr + n * wsN
    s_ptrs = s_ptr + n * ssN + co
    mask_n2 = mask_n[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for ki in range(KH):
        ih = ih0 + ki * DH
        ok_h = mask_m & (ih >= 0) & (ih < H)
        for kj in range(KW):
            iw = iw0 + kj * DW
            ok = ok_h & (iw >= 0) & (iw < W)
            row_off = ih * xsH + iw * xsW
            t = ki * KW + kj
            w_tap = w_base + t * wsT
            if SCALED:
                sv = tl.load(s_ptrs + t * ssT, mask=mask_n, other=0.0).to(ACC)[None, :]
            for c0 in range(0, C1G, BLOCK_K):
                c = c0 + ck
                mask_c = c < C1G
                a = tl.load(x_base + row_off[:, None] + c[None, :] * xsC,
                            mask=ok[:, None] & mask_c[None, :], other=0.0)
                b = tl.load(w_tap + c[:, None] * wsC + co[None, :],
                            mask=mask_c[:, None] & mask_n2, other=0.0)
                if SCALED:
                    # The per-sample weight exists only as this tile: one multiply
                    # per weight element, rounded once to the operand dtype.
                    b = (b.to(ACC) * sv).to(dot_t)
                acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)

    if HAS_BIAS:
        acc += tl.load(b_ptr + n * (G * C2G) + co, mask=mask_n, other=0.0).to(ACC)[None, :]
    y_ptrs = y_ptr + n * ysN + co[None, :] * ysC + (oh * ysH + ow * ysW)[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n2)


@_autotune(_GEMM_CONFIGS, _INTERP_GEMM_TILE, "g_ptr",
           key=["C1G", "C2G", "PA_MAX", "T", "CHANNELS_LAST", "SCALED"])
@triton.jit
def _aw_conv2d_bwd_input_kernel(
    g_ptr, w_ptr, s_ptr, dx_ptr,
    G, C1G, C2G, H, W, HO, WO, KH, KW, T, PA_MAX,
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
    pid = tl.program_id(0)
    num_nb = (C1G + BLOCK_N - 1) // BLOCK_N
    num_mb = (PA_MAX + BLOCK_M - 1) // BLOCK_M
    nb = pid % num_nb
    rest = pid // num_nb
    mb = rest % num_mb
    rest = rest // num_mb
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
        pa = pa.to(tl.int64)
        pb = pb.to(tl.int64)
        c1 = c1.to(tl.int64)
        ck = ck.to(tl.int64)
    g_base = g_ptr + n * gsN + (gi * C2G) * gsC
    w_base = w_ptr + n * wsN + gi * C2G
    s_base = s_ptr + n * ssN + gi * C2G
    mask_n2 = mask_n[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for ki in range(KH):
        num_h = rh + PH - ki * DH
        # oh*SH = ih + PH - ki*DH has a solution for every position of the phase
        # or for none; a zero remainder is the same test under C and floor division.
        if num_h % SH == 0:
            oh = num_h // SH + pa
            ok_h = mask_m & (oh >= 0) & (oh < HO)
            for kj in range(KW):
                num_w = rw + PW - kj * DW
                if num_w % SW == 0:
                    ow = num_w // SW + pb
                    ok = ok_h & (ow >= 0) & (ow < WO)
                    row_off = oh * gsH + ow * gsW
                    t = ki * KW + kj
                    w_tap = w_base + t * wsT
                    s_tap = s_base + t * ssT
                    for k0 in range(0, C2G, BLOCK_K):
                        k = k0 + ck
                        mask_k = k < C2G
                        a = tl.load(g_base + row_off[:, None] + k[None, :] * gsC,
                                    mask=ok[:, None] & mask_k[None, :], other=0.0)
                        b = tl.load(w_tap + k[:, None] + c1[None, :] * wsC,
                                    mask=mask_k[:, None] & mask_n2, other=0.0)
                        if SCALED:
                            # g*scale*w == g*(scale*w): the scale rides on the weight tile.
                            sv = tl.load(s_tap + k, mask=mask_k, other=0.0).to(ACC)
                            b = (b.to(ACC) * sv[:, None]).to(dot_t)
                        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)

    ih = rh + pa * SH
    iw = rw + pb * SW
    dx_ptrs = dx_ptr + n * dsN + (gi * C1G + c1)[None, :] * dsC + (ih * dsH + iw * dsW)[:, None]
    # Positions no tap reaches are written too (zeros): every dx element has one owner.
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n2)


@_autotune(_WGRAD_CONFIGS, _INTERP_WGRAD_TILE, "g_ptr",
           key=["C1G", "C2G", "P_OUT", "T", "CHANNELS_LAST", "AW", "BLOCK_N"])
@triton.jit
def _aw_conv2d_bwd_weight_kernel(
    g_ptr, x_ptr, w_ptr, s_ptr, dw_ptr, ds_ptr,
    N, G, C1G, C2G, H, W, WO, P_OUT, KW, T,
    SH, SW, PH, PW, DH, DW,
    N_CHUNK, Q_CHUNK, NUM_PS,
    gsN, gsC, gsH, gsW,
    xsN, xsC, xsH, xsW,
    wsT, wsC,               # weight (T, C1/g, C2), aw only
    ssN, ssT,               # scale (N, T, C2), aw only
    dwsS, dwsN,             # partials (S, [N,] C2, C1/g, T), last three dims contiguous
    dssR, dssN,             # dscale partials (R, N, C2, T), last two dims contiguous
    AW: tl.constexpr, ACC: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_nb = (C1G + BLOCK_N - 1) // BLOCK_N
    num_mb = (C2G + BLOCK_M - 1) // BLOCK_M
    nb = pid % num_nb
    rest = pid // num_nb
    mb = rest % num_mb
    rest = rest // num_mb
    t = rest % T
    rest = rest // T
    gi = rest % G
    split = rest // G
    ns = split // NUM_PS
    ps = split - ns * NUM_PS
    n_lo = ns * N_CHUNK
    n_hi = tl.where(n_lo + N_CHUNK < N, n_lo + N_CHUNK, N)
    q_lo = ps * Q_CHUNK
    q_hi = tl.where(q_lo + Q_CHUNK < P_OUT, q_lo + Q_CHUNK, P_OUT)
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
        ps = ps.to(tl.int64)
        qk = qk.to(tl.int64)
    mask_m2 = mask_m[:, None]
    mask_n2 = mask_n[None, :]
    g_rows = g_ptr + co[:, None] * gsC
    x_cols = x_ptr + (gi * C1G + c1)[None, :] * xsC

    if AW:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for n32 in range(n_lo, n_hi):
        n = n32
        if I64:
            n = tl.cast(n32, tl.int64)
        gn = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for q0 in range(q_lo, q_hi, BLOCK_K):
            q = q0 + qk
            oh = q // WO
            ow = q - oh * WO
            ih = oh * SH + ih_t
            iw = ow * SW + iw_t
            mask_q = q < q_hi
            ok = mask_q & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(g_rows + n * gsN + (oh * gsH + ow * gsW)[None, :],
                        mask=mask_m2 & mask_q[None, :], other=0.0)
            b = tl.load(x_cols + n * xsN + (ih * xsH + iw * xsW)[:, None],
                        mask=ok[:, None] & mask_n2, other=0.0)
            gn = tl.dot(a, b, gn, input_precision="ieee", out_dtype=ACC)
        if AW:
            # G_n is folded into both gradients while it is in registers, so the
            # (N, C2, C1/g, kh, kw) per-sample gradient is never written. The
            # weight tile is re-read per sample (cache-resident) to spare registers.
            wv = tl.load(w_ptr + t * wsT + c1[None, :] * wsC + co[:, None],
                         mask=mask_m2 & mask_n2, other=0.0)
            ds_off = (ps * num_nb + nb) * dssR + n * dssN + co * T + t
            tl.store(ds_ptr + ds_off, tl.sum(wv.to(ACC) * gn, axis=1), mask=mask_m)
            sv = tl.load(s_ptr + n * ssN + t * ssT + co, mask=mask_m, other=0.0).to(ACC)
            acc += sv[:, None] * gn
        else:
            # Partials are (C2, C1/g, T) with T innermost, like the weight itself.
            out_off = ps * dwsS + n * dwsN + co[:, None] * (C1G * T) + c1[None, :] * T + t
            tl.store(dw_ptr + out_off, gn, mask=mask_m2 & mask_n2)
    if AW:
        out_off = split * dwsS + co[:, None] * (C1G * T) + c1[None, :] * T + t
        tl.store(dw_ptr + out_off, acc, mask=mask_m2 & mask_n2)


# --------------------------------------------------------------------------- #
# host side
# --------------------------------------------------------------------------- #

# Test hooks. _FORCED_CONFIGS: kernel -> triton.Config launched on the raw jit
# function (no autotune), so the GPU tiles can be run under the interpreter.
# _FORCED_SPLITS: (sample chunks, position chunks) for the weight grad (the
# per-sample op takes only the second), so the split path runs on tiny shapes.
_FORCED_CONFIGS: dict = {}
_FORCED_SPLITS: tuple[int, int] | None = None


_TABLES = {
    _aw_conv2d_fwd_kernel: _GEMM_CONFIGS,
    _aw_conv2d_bwd_input_kernel: _GEMM_CONFIGS,
    _aw_conv2d_bwd_weight_kernel: _WGRAD_CONFIGS,
}


def _gpu_configs(kernel, dtype) -> list[triton.Config]:
    """The GPU tiles autotune chooses from for ``kernel`` on operands of ``dtype``."""
    return _gpu_configs_for(_TABLES[kernel], _width(dtype))


def _launch(kernel, grid, dtype: torch.dtype, *args, **kwargs) -> None:
    cfg = _FORCED_CONFIGS.get(kernel)
    if cfg is None and torch.are_deterministic_algorithms_enabled():
        # The tile sets the summation order and autotune may pick another tile
        # in another process; a fixed pick keeps the bits equal.
        cfg = kernel.configs[0] if _INTERPRET else _gpu_configs(kernel, dtype)[0]
    if cfg is None:
        kernel[grid](*args, **kwargs)
    else:
        kernel.fn[grid](*args, **kwargs, **cfg.kwargs,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _interpreting() -> bool:
    return interpreting(_aw_conv2d_fwd_kernel)


def _device_ctx(x: Tensor):
    return device_ctx(x, _interpreting, "aw_conv2d")


# The interpreter checks every int32 add/mul for overflow (about 1 ms apiece,
# measured) and skips int64 ones, so it indexes in int64; a test runs the
# int32 path too.
_INTERP_I64 = _INTERPRET


def _i64(*ts: Tensor) -> bool:
    return _INTERP_I64 or needs_i64(*ts)


def _taps_major(wt: Tensor) -> Tensor:
    """``(..., C2, C1/g, kh, kw)`` -> contiguous ``(..., kh*kw, C1/g, C2)``."""
    lead = wt.dim() - 4
    perm = (*range(lead), lead + 2, lead + 3, lead + 1, lead)
    c2, c1g, kh, kw = wt.shape[lead:]
    return wt.permute(perm).contiguous().reshape(*wt.shape[:lead], kh * kw, c1g, c2)


def _scale_taps_major(scale: Tensor) -> Tensor:
    """``(N, C2, kh, kw)`` -> contiguous ``(N, kh*kw, C2)``."""
    return scale.flatten(2).transpose(1, 2).contiguous()


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
                x, wp, sp if sp is not None else wp, bias if bias is not None else y, y,
                geo.groups, geo.c1g, geo.c2g, geo.h, geo.w, geo.wo, p_out, geo.kh, geo.kw, geo.taps,
                *geo.conv_args(), *xs, *ws, *ss, *ys,
                SCALED=sp is not None, HAS_BIAS=bias is not None, ACC=_tl_acc(x.dtype),
                CHANNELS_LAST=geo.x_cl, I64=_i64(x, y, wp))
    return y


def _input_grad(g: Tensor, g_cl: bool, wp: Tensor, sp: Tensor | None, geo: _Geo, x: Tensor,
                per_sample: bool) -> Tensor:
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_fmt(geo.x_cl))
    sh, sw = geo.stride
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
                g, wp, sp if sp is not None else wp, dx,
                geo.groups, geo.c1g, geo.c2g, geo.h, geo.w, geo.ho, geo.wo, geo.kh, geo.kw,
                geo.taps, pa_max,
                *geo.conv_args(), *gs, *ws, *ss, *ds,
                SCALED=sp is not None, ACC=_tl_acc(x.dtype), CHANNELS_LAST=g_cl,
                I64=_i64(g, dx, wp))
    return dx


def _wgrad_block_n(c1g: int) -> int:
    if _INTERPRET:
        return _INTERP_WGRAD_BLOCK_N
    # 32 input channels per tile: at 64 the aw kernel (two fp32 accumulators)
    # spills in all but one of the tiles tried (ptxas, sm_90). Not yet measured on a GPU.
    return min(32, max(16, triton.next_power_of_2(c1g)))


def _wgrad_splits(geo: _Geo, base_programs: int, device: torch.device, aw: bool) -> tuple[int, int]:
    """(sample chunks, position chunks) for the weight grad."""
    if _FORCED_SPLITS is not None:
        ns, ps = _FORCED_SPLITS
        return (min(ns, geo.n) if aw else geo.n), ps
    if device.type != "cuda":
        return (1 if aw else geo.n), 1
    # About two programs per SM, each still reducing over >= 256 positions.
    # Not yet measured on a GPU.
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, triton.cdiv(target, base_programs))
    max_ps = max(1, triton.cdiv(geo.ho * geo.wo, 256))
    if not aw:
        return geo.n, min(want, max_ps)
    # Samples first: a sample chunk ends on a sample boundary, a position chunk
    # may leave a ragged last block.
    ns = min(want, geo.n)
    return ns, min(triton.cdiv(want, ns), max_ps)


def _weight_grad(g: Tensor, g_cl: bool, x: Tensor, wp: Tensor | None, sp: Tensor | None,
                 geo: _Geo) -> tuple[Tensor, Tensor | None]:
    """aw (``wp``, ``sp`` given): ``(dweight, dscale)``; per-sample: ``(dweights, None)``."""
    aw = wp is not None
    acc = geo.acc
    t = geo.taps
    p_out = geo.ho * geo.wo
    block_n = _wgrad_block_n(geo.c1g)
    num_nb = triton.cdiv(geo.c1g, block_n)
    # Programs without splitting, counted with a 64-row tile.
    base = geo.groups * t * triton.cdiv(geo.c2g, 64) * num_nb * (1 if aw else geo.n)
    ns, ps = _wgrad_splits(geo, base, x.device, aw)
    n_chunk = triton.cdiv(geo.n, ns) if aw else 1
    ns = triton.cdiv(geo.n, n_chunk)  # no empty sample chunk
    q_chunk = triton.cdiv(triton.cdiv(p_out, ps), _Q_ALIGN) * _Q_ALIGN
    ps = triton.cdiv(p_out, q_chunk)
    if aw:
        dw_part = torch.empty((ns * ps, geo.c2, geo.c1g, t), dtype=acc, device=x.device)
        ds_part = torch.empty((ps * num_nb, geo.n, geo.c2, t), dtype=acc, device=x.device)
        dws = (dw_part.stride(0), 0)
        dss = (ds_part.stride(0), ds_part.stride(1))
        wsp = (wp.stride(0), wp.stride(1))
        ssp = (sp.stride(0), sp.stride(1))
    else:
        dw_part = torch.empty((ps, geo.n, geo.c2, geo.c1g, t), dtype=acc, device=x.device)
        ds_part = dw_part  # unused
        dws = (dw_part.stride(0), dw_part.stride(1))
        dss = wsp = ssp = (0, 0)
    gs = _strides(g.shape, g_cl)
    xs = _strides(x.shape, geo.x_cl)
    grid = lambda meta: (  # noqa: E731
        ns * ps * geo.groups * t * triton.cdiv(geo.c2g, meta["BLOCK_M"]) * num_nb,)
    with _device_ctx(x):
        _launch(_aw_conv2d_bwd_weight_kernel, grid, x.dtype,
                g, x, wp if aw else x, sp if aw else x, dw_part, ds_part,
                geo.n, geo.groups, geo.c1g, geo.c2g, geo.h, geo.w, geo.wo, p_out, geo.kw, t,
                *geo.conv_args(), n_chunk, q_chunk, ps, *gs, *xs, *wsp, *ssp, *dws, *dss,
                AW=aw, ACC=_tl_acc(x.dtype), CHANNELS_LAST=geo.x_cl,
                I64=_i64(g, x, dw_part, ds_part), BLOCK_N=block_n)
    wshape = (geo.c2, geo.c1g, geo.kh, geo.kw)
    # Partials are added in index order: the same bits every run.
    dw = dw_part[0] if dw_part.shape[0] == 1 else dw_part.sum(0)
    if not aw:
        return dw.reshape(geo.n, *wshape), None
    ds = ds_part[0] if ds_part.shape[0] == 1 else ds_part.sum(0)
    return dw.reshape(wshape), ds.reshape(geo.n, geo.c2, geo.kh, geo.kw)


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
    return _forward(x, _taps_major(weights), None, bias, geo, per_sample=True)


def per_sample_conv2d_bwd(g: Tensor, x: Tensor, weights: Tensor, stride: list[int],
                          padding: list[int], dilation: list[int], groups: int
                          ) -> tuple[Tensor, Tensor]:
    """``(dx, dweights)``: ``dx`` in ``x``'s dtype/format, ``dweights (N, C2, C1/g,
    kh, kw)`` in acc dtype."""
    geo = _geometry(x, "weights", weights, True, stride, padding, dilation, groups)
    g_cl = _check_g(g, x, geo)
    if geo.n == 0:
        return torch.empty_like(x), torch.empty(weights.shape, dtype=geo.acc, device=x.device)
    dx = _input_grad(g, g_cl, _taps_major(weights), None, geo, x, per_sample=True)
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
    return _forward(x, _taps_major(weight), _scale_taps_major(scale), bias, geo, per_sample=False)


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
    wp, sp = _taps_major(weight), _scale_taps_major(scale)
    dx = _input_grad(g, g_cl, wp, sp, geo, x, per_sample=False)
    dw, ds = _weight_grad(g, g_cl, x, wp, sp, geo)
    return dx, dw, ds
