"""Triton kernels for the four BR-NPA passes (docs/design.md §3, §7); the three
BR-NPA stages built on them are in ``manet_kernels/triton/brnpa_stages.py``.

Each pass launcher has the signature and return values of the function of the same
name in ``manet_kernels/reference/passes.py``, which is the contract.

The activation is seen as ``(B, C, P)`` with strides ``(sB, sC, sP)``:
``(C*P, P, 1)`` for NCHW and ``(P*C, 1, C)`` for channels_last, so one kernel
serves both layouts. Sums over positions that span programs (``sv``, ``u``,
``t``) are written as one partial per (sample, block of positions) and added in
a fixed order (by torch for ``sv``; for ``u`` and ``t`` by the last program of
the sample to finish, in the same launch): there are no float atomics, so
results are bitwise reproducible run to run for a given tile config. Under
``torch.use_deterministic_algorithms(True)`` the tile config is fixed instead of
autotuned, so they are also reproducible across processes.

On CPU tensors the kernels run only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is first imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from manet_kernels.triton._common import INTERPRET as _INTERPRET
from manet_kernels.triton._common import acc_dtype as _acc_dtype
from manet_kernels.triton._common import (
    block_grid,
    device_ctx,
    interpreting,
    launch,
    ncp_strides,
    tile_grid,
)
from manet_kernels.triton._common import configs as _configs
from manet_kernels.triton._common import needs_i64 as _i64
from manet_kernels.triton._common import sample_counters as _sample_counters
from manet_kernels.triton._common import small as _check_small
from manet_kernels.triton._tiles import cp_tile, sample_block, sqrt_rn

__all__ = ["brnpa_norms", "brnpa_step", "brnpa_bwd_reduce", "brnpa_bwd_dx"]

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# Interpreter tile: 16 along both axes, so the odd test shapes (C=33, P=35) span
# several blocks with a partial last one, and the K-chunks of bwd_reduce reach
# the tl.dot path (every dot operand dimension must be >= 16).
_INTERP_BLOCK = 16
_INTERP_TILE = {"BLOCK_C": _INTERP_BLOCK, "BLOCK_P": _INTERP_BLOCK}


# Every list runs from P-long to C-long tiles; with deterministic algorithms on,
# NCHW takes the first and channels_last the last, without autotuning.
_NORMS_CONFIGS = [  # (BLOCK_C, BLOCK_P) tile, loop over C. Not yet measured on a GPU.
    ({"BLOCK_C": 16, "BLOCK_P": 128}, 4),
    ({"BLOCK_C": 32, "BLOCK_P": 64}, 4),
    ({"BLOCK_C": 64, "BLOCK_P": 32}, 4),
    ({"BLOCK_C": 128, "BLOCK_P": 16}, 4),
]
# step / bwd_reduce: the launcher picks BLOCK_P (it sizes the partials buffer,
# allocated before launch), so autotune only chooses BLOCK_C and the warps.
_STEP_CONFIGS = [  # Not yet measured on a GPU.
    ({"BLOCK_C": 16}, 4),
    ({"BLOCK_C": 32}, 4),
    ({"BLOCK_C": 64}, 4),
    ({"BLOCK_C": 128}, 8),
]
# BLOCK_C >= 16 in every entry, as tl.dot needs; kept small because without
# tl.dot a (K, C, P) product sits in registers. Not yet measured on a GPU.
_BWD_REDUCE_CONFIGS = [
    ({"BLOCK_C": 16}, 4),
    ({"BLOCK_C": 16}, 8),
    ({"BLOCK_C": 32}, 4),
    ({"BLOCK_C": 32}, 8),
]
_BWD_DX_CONFIGS = [  # one (BLOCK_C, BLOCK_P) tile per program. Not yet measured on a GPU.
    ({"BLOCK_C": 16, "BLOCK_P": 128}, 4),
    ({"BLOCK_C": 32, "BLOCK_P": 64}, 4),
    ({"BLOCK_C": 64, "BLOCK_P": 32}, 4),
    ({"BLOCK_C": 128, "BLOCK_P": 16}, 4),
]

# bwd_reduce takes up to this many parts per program; more parts get more
# programs along grid axis 1 (each rereads its block of x). Not yet measured on a GPU.
_MAX_BLOCK_K = 16


def _step_block_p(p: int, channels_last: bool) -> int:
    if _INTERPRET:
        return _INTERP_BLOCK
    # NCHW: 64 contiguous positions per row; channels_last: C is the contiguous
    # axis, so fewer positions. Not yet measured on a GPU.
    return min(32 if channels_last else 64, triton.next_power_of_2(p))


def _bwd_reduce_block_p(p: int, channels_last: bool, block_k: int, dot: bool) -> int:
    if _INTERPRET:
        return _INTERP_BLOCK
    if dot:
        # tl.dot needs >= 16 positions; padding lanes are masked. Not yet measured on a GPU.
        return max(16, _step_block_p(p, channels_last))
    # Keeps BLOCK_K * BLOCK_P <= 256, so the (K, C, P) product stays <= 8192
    # values at BLOCK_C=32. Not yet measured on a GPU.
    return min(_step_block_p(p, channels_last), max(8, 256 // block_k))


# --------------------------------------------------------------------------- #
# kernels
# --------------------------------------------------------------------------- #


@triton.jit
def _mask_if(mask, ok):
    """``mask & ok`` for a block mask and a scalar condition. Written as a where:
    triton 3.9's interpreter broadcasts a scalar bool in ``&`` to int32, and a load
    or store then rejects the mask ("mask has unsupported dtype")."""
    return tl.where(ok, mask, False)


@triton.jit
def _block_norms(x_ptr, nrm_ptr, C, P, sB, sC, sP,
                 I64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The norms over C of the program's block of positions (``sample_block``), summed in
    nrm's dtype and correctly rounded like torch's: ``(b, offs_p, mask_p, nrm)``."""
    acc_t = nrm_ptr.dtype.element_ty
    b, offs_p, mask_p = sample_block(P, I64, BLOCK_P)
    cols = x_ptr + b * sB + offs_p[None, :] * sP

    sq = tl.zeros((BLOCK_C, BLOCK_P), dtype=acc_t)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = (offs_c < C)[:, None] & mask_p[None, :]
        if I64:
            offs_c = offs_c.to(tl.int64)
        f = tl.load(cols + offs_c[:, None] * sC, mask=m, other=0.0).to(acc_t)
        sq += f * f
    sq = tl.sum(sq, axis=0)
    return b, offs_p, mask_p, sqrt_rn(sq)


@triton.autotune(configs=_configs(_NORMS_CONFIGS, _INTERP_TILE),
                 key=["C", "P", "CHANNELS_LAST"])
@triton.jit
def _brnpa_norms_kernel(
    x_ptr, nrm_ptr,
    C, P, sB, sC, sP,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b, offs_p, mask_p, nrm = _block_norms(x_ptr, nrm_ptr, C, P, sB, sC, sP,
                                          I64, BLOCK_C, BLOCK_P)
    tl.store(nrm_ptr + b * P + offs_p, nrm, mask=mask_p)


@triton.jit
def _step_tile(x_b, inv_b, ridx, s_row, sv_row, offs_p, mask_p, C, P, sC, sP,
               I64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One block of positions of ``brnpa_step`` against the representative at ``ridx``:
    ``s`` of the block to ``s_row + offs_p``, its share of ``sum_i s_i f_i`` to
    ``sv_row``. ``x_b``, ``inv_b``: the sample's activation and ``inv``."""
    acc_t = inv_b.dtype.element_ty
    # An index outside [0, P) reads nothing (r = 0, so s = 0) instead of
    # faulting; the reference raises there.
    r_ok = (ridx >= 0) & (ridx < P)
    inv = tl.load(inv_b + offs_p, mask=mask_p, other=0.0)
    inv_r = tl.load(inv_b + ridx, mask=r_ok, other=0.0)
    cols = x_b + offs_p[None, :] * sP

    fr = tl.zeros((BLOCK_C, BLOCK_P), dtype=acc_t)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if I64:
            offs_c = offs_c.to(tl.int64)
        f = tl.load(cols + offs_c[:, None] * sC, mask=mask_c[:, None] & mask_p[None, :], other=0.0)
        r = tl.load(x_b + offs_c * sC + ridx * sP, mask=_mask_if(mask_c, r_ok), other=0.0)
        fr += f.to(acc_t) * r.to(acc_t)[:, None]
    # The reference's association, (<f, r> * inv_i) * inv_r; padding lanes get s = 0.
    s = (tl.sum(fr, axis=0) * inv) * inv_r
    tl.store(s_row + offs_p, s, mask=mask_p)

    # Second read of the same block, still in L1/L2: partial sum_i s_i f_i.
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if I64:
            offs_c = offs_c.to(tl.int64)
        f = tl.load(cols + offs_c[:, None] * sC, mask=mask_c[:, None] & mask_p[None, :], other=0.0)
        tl.store(sv_row + offs_c, tl.sum(f.to(acc_t) * s[None, :], axis=1), mask=mask_c)


@triton.autotune(configs=_configs(_STEP_CONFIGS, {"BLOCK_C": _INTERP_BLOCK}),
                 key=["C", "P", "CHANNELS_LAST", "BLOCK_P"])
@triton.jit
def _brnpa_step_kernel(
    x_ptr, inv_ptr, idx_ptr, s_ptr, sv_part_ptr,
    C, P, sB, sC, sP,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, offs_p, mask_p = sample_block(P, I64, BLOCK_P)
    part = tl.program_id(0).to(b.dtype)
    ridx = tl.load(idx_ptr + b).to(tl.int64)
    _step_tile(x_ptr + b * sB, inv_ptr + b * P, ridx, s_ptr + b * P, sv_part_ptr + part * C,
               offs_p, mask_p, C, P, sC, sP, I64, BLOCK_P, BLOCK_C)


@triton.autotune(configs=_configs(_BWD_REDUCE_CONFIGS, {"BLOCK_C": _INTERP_BLOCK}),
                 key=["C", "P", "CHANNELS_LAST", "BLOCK_P", "BLOCK_K", "DOT"])
@triton.jit
def _brnpa_bwd_reduce_kernel(
    x_ptr, inv_ptr, dv_ptr, dmap_ptr, dw_ptr, u_part_ptr, t_part_ptr, u_ptr, t_ptr, count_ptr,
    C, P, K, sB, sC, sP,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr,
    DOT: tl.constexpr,  # fp32 acc and BLOCK_K, BLOCK_P >= 16 (the host checks); BLOCK_C below
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_t = inv_ptr.dtype.element_ty
    if DOT:
        tl.static_assert(BLOCK_C >= 16, "tl.dot needs every operand dimension >= 16")
    # sample_block's prologue, written out: with the K-chunk indices interleaved as
    # here the compile keeps its register count (through sample_block, ptxas took 72
    # registers instead of 69 at C16 K4 P64, sm_90).
    pid = tl.program_id(0)
    kc = tl.program_id(1)
    num_pb = tl.cdiv(P, BLOCK_P)
    b = pid // num_pb
    offs_p = (pid % num_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = kc * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_p = offs_p < P
    mask_k = offs_k < K
    part = pid
    if I64:
        b = b.to(tl.int64)
        offs_p = offs_p.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
        part = part.to(tl.int64)
    inv = tl.load(inv_ptr + b * P + offs_p, mask=mask_p, other=0.0)
    cols = x_ptr + b * sB + offs_p[None, :] * sP
    rows_k = b * K + offs_k  # row of (B, K, .) small tensors

    # dw[k, i] = <f_i, dv_k>: (BLOCK_K, BLOCK_C) x (BLOCK_C, BLOCK_P) per C-block.
    dw = tl.zeros((BLOCK_K, BLOCK_P), dtype=acc_t)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if I64:
            offs_c = offs_c.to(tl.int64)
        f = tl.load(cols + offs_c[:, None] * sC, mask=mask_c[:, None] & mask_p[None, :],
                    other=0.0).to(acc_t)
        d = tl.load(dv_ptr + rows_k[:, None] * C + offs_c[None, :],
                    mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        if DOT:
            # ieee: tf32 would lose ~3 digits against the fp32 reference.
            dw = tl.dot(d, f, acc=dw, input_precision="ieee")
        else:
            dw += tl.sum(d[:, :, None] * f[None, :, :], axis=1)
    kp = mask_k[:, None] & mask_p[None, :]
    small_kp = rows_k[:, None] * P + offs_p[None, :]
    # Padding rows / lanes stay exactly 0, so they add nothing to u below.
    dw += tl.load(dmap_ptr + small_kp, mask=kp, other=0.0)
    tl.store(dw_ptr + small_kp, dw, mask=kp)

    # Second read of the block: u[k] = sum_i dw[k,i] inv_i f_i and t = sum_i inv_i f_i.
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if I64:
            offs_c = offs_c.to(tl.int64)
        f = tl.load(cols + offs_c[:, None] * sC, mask=mask_c[:, None] & mask_p[None, :],
                    other=0.0).to(acc_t)
        fn = f * inv[None, :]
        if DOT:
            u = tl.dot(dw, tl.trans(fn), input_precision="ieee")
        else:
            u = tl.sum(dw[:, None, :] * fn[None, :, :], axis=2)
        tl.store(u_part_ptr + (part * K + offs_k[:, None]) * C + offs_c[None, :], u,
                 mask=mask_k[:, None] & mask_c[None, :])
        # Every K-chunk has fn at hand; only the first writes t.
        tl.store(t_part_ptr + part * C + offs_c, tl.sum(fn, axis=1), mask=_mask_if(mask_c, kc == 0))

    # The last program of (sample, K-chunk) to finish (an int32 counter each) sums
    # that chunk's u partials, and the chunk-0 one t's, over the P-blocks in block
    # order (deterministic, no float atomics), then resets its counter to 0. Every
    # thread's partial stores come before the (acq_rel, gpu-scope) increment; the
    # program that sees num_pb - 1 comes after every other one's increment, hence
    # after their stores.
    tl.debug_barrier()
    cnt = count_ptr + b * tl.num_programs(1) + kc
    done = tl.atomic_add(cnt, 1)
    if done == num_pb - 1:
        tl.debug_barrier()
        u_rows = u_part_ptr + (b * num_pb * K + offs_k[:, None]) * C  # block 0's rows
        t_rows = t_part_ptr + b * num_pb * C
        mask_t = kc == 0
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            if I64:
                offs_c = offs_c.to(tl.int64)
            kc_mask = mask_k[:, None] & mask_c[None, :]
            u_tot = tl.zeros((BLOCK_K, BLOCK_C), dtype=acc_t)
            t_tot = tl.zeros((BLOCK_C,), dtype=acc_t)
            u_ptrs = u_rows + offs_c[None, :]
            t_ptrs = t_rows + offs_c
            for _ in range(0, num_pb):
                u_tot += tl.load(u_ptrs, mask=kc_mask, other=0.0)
                t_tot += tl.load(t_ptrs, mask=_mask_if(mask_c, mask_t), other=0.0)
                u_ptrs += K * C
                t_ptrs += C
            tl.store(u_ptr + (b * K + offs_k[:, None]) * C + offs_c[None, :], u_tot,
                     mask=kc_mask)
            tl.store(t_ptr + b * C + offs_c, t_tot, mask=_mask_if(mask_c, mask_t))
        tl.atomic_xchg(cnt, 0)  # ready for the next launch, without a fill


@triton.autotune(configs=_configs(_BWD_DX_CONFIGS, _INTERP_TILE),
                 key=["C", "P", "CHANNELS_LAST"])
@triton.jit
def _brnpa_bwd_dx_kernel(
    x_ptr, a_ptr, m_ptr, c_ptr, df_ptr,
    C, P, J, sB, sC, sP, dsB, dsC, dsP,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    acc_t = m_ptr.dtype.element_ty
    b, offs_c, offs_p, mask_c, mask_p, mask = cp_tile(C, P, I64, BLOCK_C, BLOCK_P)

    # J (= 2K) rank-1 updates: a few FMAs per element of a pass that is
    # memory-bound, and no (J, C, P) product or tf32 question.
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=acc_t)
    for j in range(0, J):
        row = b * J + j
        av = tl.load(a_ptr + row * P + offs_p, mask=mask_p, other=0.0)
        mv = tl.load(m_ptr + row * C + offs_c, mask=mask_c, other=0.0)
        acc += mv[:, None] * av[None, :]
    cv = tl.load(c_ptr + b * P + offs_p, mask=mask_p, other=0.0)
    f = tl.load(x_ptr + b * sB + offs_c[:, None] * sC + offs_p[None, :] * sP, mask=mask, other=0.0)
    df = acc - cv[None, :] * f.to(acc_t)
    tl.store(df_ptr + b * dsB + offs_c[:, None] * dsC + offs_p[None, :] * dsP,
             df.to(df_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- #
# host side
# --------------------------------------------------------------------------- #

# Test hook: kernel -> triton.Config launched on the raw jit function (no
# autotune), so the GPU tiles can be run under the interpreter.
_FORCED_CONFIGS: dict = {}


def _launch(kernel, grid, *args, **kwargs) -> None:
    launch(_FORCED_CONFIGS, kernel, grid, *args, **kwargs)


def _interpreting() -> bool:
    return interpreting(_brnpa_norms_kernel)


def _device_ctx(x: Tensor):
    return device_ctx(x, _interpreting, "brnpa")


def _check_x(name: str, t) -> tuple[int, int, int, bool]:
    """Validate an activation; return its (sB, sC, sP) as a (B, C, P) view and
    whether it is channels_last."""
    return ncp_strides(name, t, _X_DTYPES, batch="B", sizes="nonempty_if_batch")


def _check_rank(name: str, t, dim: int) -> None:
    # Before shapes are read off t (K, J); the full check comes from _check_small.
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")


def brnpa_norms(x: Tensor) -> Tensor:
    """``||f_i||``, shape ``(B, H, W)`` (no epsilon added)."""
    sb, sc, sp, cl = _check_x("x", x)
    b, c, h, w = x.shape
    p = h * w
    nrm = torch.empty((b, h, w), dtype=_acc_dtype(x.dtype), device=x.device)
    if b == 0:
        return nrm
    with _device_ctx(x):
        _launch(_brnpa_norms_kernel, block_grid(b, p, "BLOCK_P"),
                x, nrm, c, p, sb, sc, sp, CHANNELS_LAST=cl, I64=_i64(x))
    return nrm


def brnpa_step(x: Tensor, inv_nrm: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """``s[b,i] = <f_i, r_b> * inv_nrm[b,i] * inv_nrm[b, idx[b]]`` ``(B, H, W)`` and
    ``sv[b] = sum_i s[b,i] f_i`` ``(B, C)``, with ``r_b = f_{idx[b]}`` (``idx``:
    ``(B,)`` int64 flat positions). An ``idx`` outside ``[0, H*W)`` gives ``s = 0``
    (the reference raises)."""
    sb, sc, sp, cl = _check_x("x", x)
    b, c, h, w = x.shape
    p = h * w
    acc = _acc_dtype(x.dtype)
    inv_nrm = _check_small("inv_nrm", inv_nrm, (b, h, w), acc, x.device)
    idx = _check_small("idx", idx, (b,), torch.int64, x.device)
    s = torch.empty((b, h, w), dtype=acc, device=x.device)
    if b == 0:
        return s, torch.empty((b, c), dtype=acc, device=x.device)
    block_p = _step_block_p(p, cl)
    num_pb = triton.cdiv(p, block_p)
    sv_part = torch.empty((b, num_pb, c), dtype=acc, device=x.device)
    with _device_ctx(x):
        _launch(_brnpa_step_kernel, (b * num_pb,),
                x, inv_nrm, idx, s, sv_part, c, p, sb, sc, sp,
                CHANNELS_LAST=cl, I64=_i64(x, sv_part), BLOCK_P=block_p)
    return s, sv_part.sum(1)


def brnpa_bwd_reduce(x: Tensor, inv_nrm: Tensor, dv: Tensor, dmap: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """``dw[b,k,i] = <f_i, dv[b,k]> + dmap[b,k,i]`` ``(B, K, H, W)``,
    ``u[b,k] = sum_i dw[b,k,i] * inv_nrm[b,i] * f_i`` ``(B, K, C)`` and
    ``t[b] = sum_i inv_nrm[b,i] * f_i`` ``(B, C)``, from one read of ``x`` per
    16 parts."""
    sb, sc, sp, cl = _check_x("x", x)
    b, c, h, w = x.shape
    p = h * w
    acc = _acc_dtype(x.dtype)
    inv_nrm = _check_small("inv_nrm", inv_nrm, (b, h, w), acc, x.device)
    _check_rank("dv", dv, 3)
    k = dv.shape[1]
    dv = _check_small("dv", dv, (b, k, c), acc, x.device)
    dmap = _check_small("dmap", dmap, (b, k, h, w), acc, x.device)
    if b == 0:
        return (torch.empty((b, k, h, w), dtype=acc, device=x.device),
                torch.empty((b, k, c), dtype=acc, device=x.device),
                torch.empty((b, c), dtype=acc, device=x.device))
    block_k = min(_MAX_BLOCK_K, triton.next_power_of_2(max(k, 1)))
    num_kc = max(1, triton.cdiv(k, block_k))  # K = 0 still needs one chunk for t
    # fp64 stays off tl.dot: its lowering differs across GPUs and triton versions.
    dot = acc == torch.float32 and block_k >= 16
    block_p = _bwd_reduce_block_p(p, cl, block_k, dot)
    dot = dot and block_p >= 16
    num_pb = triton.cdiv(p, block_p)
    dw = torch.empty((b, k, h, w), dtype=acc, device=x.device)
    u_part = torch.empty((b, num_pb, k, c), dtype=acc, device=x.device)
    t_part = torch.empty((b, num_pb, c), dtype=acc, device=x.device)
    u = torch.empty((b, k, c), dtype=acc, device=x.device)
    t = torch.empty((b, c), dtype=acc, device=x.device)
    with _device_ctx(x):
        # The last program of each (sample, K-chunk) sums the partials: one launch.
        _launch(_brnpa_bwd_reduce_kernel, (b * num_pb, num_kc),
                x, inv_nrm, dv, dmap, dw, u_part, t_part, u, t,
                _sample_counters(b * num_kc, x.device), c, p, k, sb, sc, sp,
                CHANNELS_LAST=cl, I64=_i64(x, u_part, dw), DOT=dot, BLOCK_K=block_k,
                BLOCK_P=block_p)
    return dw, u, t


def brnpa_bwd_dx(x: Tensor, a: Tensor, m: Tensor, c: Tensor) -> Tensor:
    """``df[b,:,i] = sum_j a[b,j,i] * m[b,j,:] - c[b,i] * f_i`` with ``a (B, J, H, W)``,
    ``m (B, J, C)``, ``c (B, H, W)``; returned in ``x``'s dtype and memory format."""
    sb, sc, sp, cl = _check_x("x", x)
    b, ch, h, w = x.shape
    p = h * w
    acc = _acc_dtype(x.dtype)
    _check_rank("a", a, 4)
    j = a.shape[1]
    a = _check_small("a", a, (b, j, h, w), acc, x.device)
    m = _check_small("m", m, (b, j, ch), acc, x.device)
    c = _check_small("c", c, (b, h, w), acc, x.device)
    df = torch.empty_like(x)  # keeps x's strides, hence its memory format
    if b == 0:
        return df
    dsb, dsc, dsp, _ = _check_x("df", df)
    with _device_ctx(x):
        _launch(_brnpa_bwd_dx_kernel,
                tile_grid(b, ch, p),
                x, a, m, c, df, ch, p, j, sb, sc, sp, dsb, dsc, dsp,
                CHANNELS_LAST=cl, I64=_i64(x, a, m))
    return df
