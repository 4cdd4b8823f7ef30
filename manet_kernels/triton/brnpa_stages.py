"""Triton kernels for the three BR-NPA stages (docs/design.md §3, §7), built on the
passes of ``manet_kernels/triton/brnpa.py``.

Each stage launcher (``brnpa_prepare``, ``brnpa_part``, ``brnpa_bwd_finish``) has the
signature and return values of the function of the same name in
``manet_kernels/reference/stages.py`` less its ``passes`` argument, which is the
contract. A stage runs no PyTorch op that does work (only allocations):
``brnpa_prepare`` is one launch, ``brnpa_part`` two (the step with its own argmax, then
a per-sample finish), ``brnpa_bwd_finish`` one, so a forward+backward with K parts is
``1 + 2K + 3`` launches with ``brnpa_bwd_reduce`` and ``brnpa_bwd_dx``. The stage
kernels reuse the pass kernels' tiles, and the launchers the pass module's launch and
device helpers and test hooks (``_launch``, ``_FORCED_CONFIGS``, ``_device_ctx``,
``_interpreting``).

The activation is seen as ``(B, C, P)`` as in the pass module; there are no float
atomics. On CPU tensors the kernels run only under the Triton interpreter.
"""

from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl
from torch import Tensor

from manet_kernels.triton._common import INTERPRET as _INTERPRET
from manet_kernels.triton._common import acc_dtype as _acc_dtype
from manet_kernels.triton._common import block_grid
from manet_kernels.triton._common import configs as _configs
from manet_kernels.triton._common import needs_i64 as _i64
from manet_kernels.triton._common import small as _check_small
from manet_kernels.triton._tiles import div_rn, sample_block
from manet_kernels.triton.brnpa import (
    _INTERP_BLOCK,
    _INTERP_TILE,
    _NORMS_CONFIGS,
    _STEP_CONFIGS,
    _block_norms,
    _check_rank,
    _check_x,
    _device_ctx,
    _launch,
    _step_block_p,
    _step_tile,
)

__all__ = ["brnpa_prepare", "brnpa_part", "brnpa_bwd_finish"]


# --------------------------------------------------------------------------- #
# stage kernels (reference/stages.py, issue 16)
# --------------------------------------------------------------------------- #


@triton.jit
def _first_argmax(row_ptr, P, BLOCK_A: tl.constexpr):
    """``torch.argmax`` of the ``P`` values at ``row_ptr`` (int32): the first maximum,
    and the first NaN if there is one (a NaN counts as the maximum). Each lane keeps the
    first maximum of the positions it sees (strict ``>``, in increasing order); one
    reduction over the lanes at the end."""
    lanes = tl.arange(0, BLOCK_A)
    best = tl.full([BLOCK_A], float("-inf"), row_ptr.dtype.element_ty)
    at = tl.zeros([BLOCK_A], tl.int32) + P  # P: no value seen yet
    nan_at = tl.zeros([BLOCK_A], tl.int32) + P
    for p0 in range(0, P, BLOCK_A):
        offs = p0 + lanes
        m = offs < P
        v = tl.load(row_ptr + offs, mask=m, other=float("-inf"))
        is_nan = v != v  # padding lanes hold -inf
        nan_at = tl.minimum(nan_at, tl.where(is_nan, offs, P))
        take = (v > best) | ((at == P) & m & (v == v))
        best = tl.where(take, v, best)
        at = tl.where(take, offs, at)
    vmax = tl.max(best, axis=0)
    i = tl.min(tl.where((at < P) & (best == vmax), at, P), axis=0)
    first_nan = tl.min(nan_at, axis=0)
    return tl.where(first_nan < P, first_nan, i)


@triton.autotune(configs=_configs(_NORMS_CONFIGS, _INTERP_TILE),
                 key=["C", "P", "CHANNELS_LAST"])
@triton.jit
def _brnpa_prepare_kernel(
    x_ptr, nrm_ptr, inv_ptr, score_ptr,
    C, P, sB, sC, sP,
    EPS: tl.constexpr,  # a constant of the op; constexpr keeps its fp64 bits
    PAPER: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The norms kernel, plus ``inv = 1 / (nrm + eps)`` and the first score."""
    acc_t = nrm_ptr.dtype.element_ty
    b, offs_p, mask_p, nrm = _block_norms(x_ptr, nrm_ptr, C, P, sB, sC, sP,
                                          I64, BLOCK_C, BLOCK_P)
    # torch's 1.0 / t is reciprocal(t) * 1.0, i.e. a correctly rounded 1 / t.
    ne = nrm + EPS
    inv = div_rn(tl.full([BLOCK_P], 1.0, acc_t), ne)
    if PAPER:
        score = nrm * nrm
    else:
        score = ne
    at = b * P + offs_p
    tl.store(nrm_ptr + at, nrm, mask=mask_p)
    tl.store(inv_ptr + at, inv, mask=mask_p)
    tl.store(score_ptr + at, score, mask=mask_p)


@triton.autotune(configs=_configs(_STEP_CONFIGS, {"BLOCK_C": _INTERP_BLOCK}),
                 key=["C", "P", "CHANNELS_LAST", "BLOCK_P", "BLOCK_A"])
@triton.jit
def _brnpa_part_step_kernel(
    x_ptr, inv_ptr, score_ptr, idx_ptr, s_ptr, sv_part_ptr,
    C, P, K, j, sB, sC, sP,
    CHANNELS_LAST: tl.constexpr,  # only keys the autotune cache
    I64: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``brnpa_part``, launch 1 of 2: every program finds its sample's representative
    (the whole score row, from L2: P values against a block's BLOCK_P * C), then runs
    the step for its block of positions: ``s[:, j]`` and a partial of ``sv``. The
    sample's first program writes ``idx[:, j]``. Reads no output of its own, so
    autotune may rerun it."""
    b, offs_p, mask_p = sample_block(P, I64, BLOCK_P)
    part = tl.program_id(0).to(b.dtype)
    pb = tl.program_id(0) % tl.cdiv(P, BLOCK_P)
    ridx = _first_argmax(score_ptr + b * P, P, BLOCK_A).to(tl.int64)
    row = b * K + j
    tl.store(idx_ptr + row, ridx, mask=pb == 0)
    _step_tile(x_ptr + b * sB, inv_ptr + b * P, ridx, s_ptr + row * P, sv_part_ptr + part * C,
               offs_p, mask_p, C, P, sC, sP, I64, BLOCK_P, BLOCK_C)


@triton.jit
def _brnpa_part_finish_kernel(
    s_ptr, sv_part_ptr, score_ptr, total_ptr, vec_ptr, maps_ptr,
    C, P, K, j, NUM_PB,
    PAPER: tl.constexpr,
    I64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``brnpa_part``, launch 2 of 2, one program per sample: ``S`` (``+inf`` where it
    is exactly 0), ``total[:, j]``, ``maps[:, j] = s / S``, the score update, and
    ``vectors[:, j] = sv / S`` with the partials added in block order. Updates the score
    in place: never autotuned (a rerun would update it twice)."""
    acc_t = s_ptr.dtype.element_ty
    b = tl.program_id(0)
    if I64:
        b = b.to(tl.int64)
    row = b * K + j
    s_row = s_ptr + row * P
    score_row = score_ptr + b * P
    maps_row = maps_ptr + row * P

    acc = tl.zeros([BLOCK_P], dtype=acc_t)
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(s_row + offs, mask=offs < P, other=0.0)
    tot = tl.sum(acc, axis=0)
    tot = tl.where(tot == 0, float("inf"), tot)
    tl.store(total_ptr + row, tot)

    for p0 in range(0, P, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        m = offs < P
        sv = tl.load(s_row + offs, mask=m, other=0.0)
        w = div_rn(sv, tot)
        tl.store(maps_row + offs, w.to(maps_ptr.dtype.element_ty), mask=m)
        sc = tl.load(score_row + offs, mask=m, other=0.0)
        if PAPER:
            sc = sc * (1 - w)
        else:
            sc = sc * (1 - sv)
        tl.store(score_row + offs, sc, mask=m)

    part0 = sv_part_ptr + b * NUM_PB * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        if I64:
            offs_c = offs_c.to(tl.int64)
        vacc = tl.zeros([BLOCK_C], dtype=acc_t)
        for q in range(0, NUM_PB):
            vacc += tl.load(part0 + q * C + offs_c, mask=mc, other=0.0)
        tl.store(vec_ptr + row * C + offs_c, div_rn(vacc, tot).to(vec_ptr.dtype.element_ty),
                 mask=mc)


@triton.jit
def _brnpa_bwd_finish_kernel(
    x_ptr, dw_ptr, u_ptr, t_ptr, inv_ptr, nrm_ptr, idx_ptr, s_ptr, total_ptr, gv_ptr,
    a_ptr, m_ptr, c_ptr, ck_ptr,
    C, P, K, sB, sC, sP,
    HAS_GV: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # K <= BLOCK_K: c_k stays in registers, no scratch
    I64: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``brnpa_bwd_finish``, one program per sample. Phase 1, per chunk of BLOCK_K
    parts: ``c_k = sum_i dw w`` over the positions, then the ``m`` rows ``[gv; r; dr]``
    (``r`` gathered from x). Phase 2, per block of positions: the ``a`` rows
    ``[w; ds * inv * inv_r; onehot]`` of every part and ``c = (sum_k ds s) * inv / nrm``.
    With several chunks, ``c_k`` goes through ``ck_ptr`` (written in phase 1, read in
    phase 2 after a barrier)."""
    acc_t = inv_ptr.dtype.element_ty
    b = tl.program_id(0)
    lanes_k = tl.arange(0, BLOCK_K)
    if I64:
        b = b.to(tl.int64)
        lanes_k = lanes_k.to(tl.int64)
    x_b = x_ptr + b * sB
    inv_b = inv_ptr + b * P
    a_b = a_ptr + b * (3 * K) * P
    m_b = m_ptr + b * (3 * K) * C
    kc_b = b * K * C  # (B, K, C) inputs

    ck_keep = tl.zeros([BLOCK_K], dtype=acc_t)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + lanes_k
        mask_k = offs_k < K
        rows = b * K + offs_k
        tot = tl.load(total_ptr + rows, mask=mask_k, other=1.0)
        ck = tl.zeros([BLOCK_K], dtype=acc_t)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            kp = mask_k[:, None] & (offs_p < P)[None, :]
            at = rows[:, None] * P + offs_p[None, :]
            sv = tl.load(s_ptr + at, mask=kp, other=0.0)
            dwv = tl.load(dw_ptr + at, mask=kp, other=0.0)
            ck += tl.sum(dwv * div_rn(sv, tot[:, None]), axis=1)
        if ONE_CHUNK:
            ck_keep = ck
        else:
            tl.store(ck_ptr + rows, ck, mask=mask_k)
        ridx = tl.load(idx_ptr + rows, mask=mask_k, other=-1)
        r_ok = mask_k & (ridx >= 0) & (ridx < P)  # outside [0, P): r = 0, dr = 0
        inv_r = tl.load(inv_b + ridx, mask=r_ok, other=0.0)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            if I64:
                offs_c = offs_c.to(tl.int64)
            kc = mask_k[:, None] & mask_c[None, :]
            kcs = offs_k[:, None] * C + offs_c[None, :]
            if HAS_GV:
                g = tl.load(gv_ptr + kc_b + kcs, mask=kc, other=0.0)
            else:
                g = tl.zeros([BLOCK_K, BLOCK_C], dtype=acc_t)
            tl.store(m_b + kcs, g, mask=kc)
            r = tl.load(x_b + offs_c[None, :] * sC + ridx[:, None] * sP,
                        mask=r_ok[:, None] & mask_c[None, :], other=0.0).to(acc_t)
            tl.store(m_b + K * C + kcs, r, mask=kc)
            uv = tl.load(u_ptr + kc_b + kcs, mask=kc, other=0.0)
            tv = tl.load(t_ptr + b * C + offs_c, mask=mask_c, other=0.0)
            q = div_rn(uv - ck[:, None] * tv[None, :], tot[:, None])
            tl.store(m_b + 2 * K * C + kcs, q * inv_r[:, None], mask=kc)

    if not ONE_CHUNK:
        tl.debug_barrier()  # phase 1's c_k stores, visible to every thread of the program

    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        if I64:
            offs_p = offs_p.to(tl.int64)
        inv = tl.load(inv_b + offs_p, mask=mask_p, other=0.0)
        cacc = tl.zeros([BLOCK_P], dtype=acc_t)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + lanes_k
            mask_k = offs_k < K
            rows = b * K + offs_k
            tot = tl.load(total_ptr + rows, mask=mask_k, other=1.0)
            if ONE_CHUNK:
                ck = ck_keep
            else:
                ck = tl.load(ck_ptr + rows, mask=mask_k, other=0.0)
            ridx = tl.load(idx_ptr + rows, mask=mask_k, other=-1)
            r_ok = mask_k & (ridx >= 0) & (ridx < P)
            inv_r = tl.load(inv_b + ridx, mask=r_ok, other=0.0)
            kp = mask_k[:, None] & mask_p[None, :]
            at = rows[:, None] * P + offs_p[None, :]
            sv = tl.load(s_ptr + at, mask=kp, other=0.0)
            dwv = tl.load(dw_ptr + at, mask=kp, other=0.0)
            ds = div_rn(dwv - ck[:, None], tot[:, None])  # padding rows and lanes: 0
            kps = offs_k[:, None] * P + offs_p[None, :]
            tl.store(a_b + kps, div_rn(sv, tot[:, None]), mask=kp)
            tl.store(a_b + K * P + kps, (ds * inv[None, :]) * inv_r[:, None], mask=kp)
            hit = offs_p[None, :] == ridx[:, None]
            tl.store(a_b + 2 * K * P + kps, tl.where(hit, 1.0, 0.0).to(acc_t), mask=kp)
            cacc += tl.sum(ds * sv, axis=0)
        nr = tl.load(nrm_ptr + b * P + offs_p, mask=mask_p, other=0.0)
        safe = tl.where(nr > 0, div_rn(inv, nr), 0.0)
        tl.store(c_ptr + b * P + offs_p, cacc * safe, mask=mask_p)


# --------------------------------------------------------------------------- #
# stages (reference/stages.py): no PyTorch op that does work, only allocations
# --------------------------------------------------------------------------- #

# bwd_finish: parts per chunk (the interpreter's 2 runs the several-chunk path on the
# tests' K = 3). Not yet measured on a GPU.
_FINISH_MAX_BLOCK_K = 16


def _check_out(name: str, t, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> Tensor:
    """An operand updated in place: ``_check_small``, and contiguous as it is (a
    contiguous copy would take the writes)."""
    if isinstance(t, Tensor) and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (updated in place), got "
                         f"strides {t.stride()} for shape {tuple(t.shape)}")
    return _check_small(name, t, shape, dtype, device)


def _argmax_block(p: int) -> int:
    if _INTERPRET:
        return _INTERP_BLOCK
    # Each step program reads its sample's score row, once per launch. Not yet measured
    # on a GPU.
    return min(1024, triton.next_power_of_2(p))


def _finish_blocks(p: int, c: int) -> tuple[int, int]:
    if _INTERPRET:
        return _INTERP_BLOCK, _INTERP_BLOCK
    # One program per sample, tiles of 1-D vectors. Not yet measured on a GPU.
    return min(1024, triton.next_power_of_2(p)), min(512, triton.next_power_of_2(c))


def _bwd_finish_blocks(p: int, c: int, k: int) -> tuple[int, int, int]:
    if _INTERPRET:
        return 2, _INTERP_BLOCK, _INTERP_BLOCK
    # (BLOCK_K, BLOCK_P) and (BLOCK_K, BLOCK_C) tiles of at most 2048 values. Not yet
    # measured on a GPU.
    block_k = min(_FINISH_MAX_BLOCK_K, triton.next_power_of_2(max(k, 1)))
    cap = max(16, 2048 // block_k)
    return (block_k, min(cap, triton.next_power_of_2(p)), min(cap, triton.next_power_of_2(c)))


def brnpa_prepare(x: Tensor, paper: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(nrm, inv, score)``, each ``(B, H, W)`` in acc dtype: ``nrm = ||f_i||``,
    ``inv = 1 / (nrm + eps)`` and the first part's score, ``nrm^2`` (``paper``) or
    ``nrm + eps``. One launch."""
    sb, sc, sp, cl = _check_x("x", x)
    b, c, h, w = x.shape
    p = h * w
    acc = _acc_dtype(x.dtype)
    nrm, inv, score = (torch.empty((b, h, w), dtype=acc, device=x.device) for _ in range(3))
    if b == 0:
        return nrm, inv, score
    with _device_ctx(x):
        _launch(_brnpa_prepare_kernel, block_grid(b, p, "BLOCK_P"),
                x, nrm, inv, score, c, p, sb, sc, sp, EPS=float(eps), PAPER=bool(paper),
                CHANNELS_LAST=cl, I64=_i64(x))
    return nrm, inv, score


def brnpa_part(x: Tensor, inv: Tensor, score: Tensor, j: int, paper: bool, idx: Tensor,
               s: Tensor, total: Tensor, vectors: Tensor, maps: Tensor) -> None:
    """Part ``j``, in place (``reference/stages.py``): ``idx[:, j]`` = the first maximum
    of ``score`` (a NaN counts as the maximum), ``s[:, j]``, ``total[:, j]`` (``+inf``
    where the similarities sum to exactly 0), ``vectors[:, j] = sv / S``,
    ``maps[:, j] = s / S`` and ``score *= 1 - (s / S if paper else s)``. Two launches:
    the step (each program finds the representative itself), then one program per
    sample for the rest. The in-place operands must be contiguous."""
    sb, sc, sp, cl = _check_x("x", x)
    b, c, h, w = x.shape
    p = h * w
    acc = _acc_dtype(x.dtype)
    inv = _check_small("inv", inv, (b, h, w), acc, x.device)
    score = _check_out("score", score, (b, h, w), acc, x.device)
    _check_rank("idx", idx, 2)
    k = idx.shape[1]
    try:
        jj = None if isinstance(j, bool) else operator.index(j)
    except TypeError:
        jj = None
    if jj is None or not 0 <= jj < k:
        raise ValueError(f"j: expected an int in [0, {k}), got {j!r}")
    j = jj
    idx = _check_out("idx", idx, (b, k), torch.int64, x.device)
    s = _check_out("s", s, (b, k, h, w), acc, x.device)
    total = _check_out("total", total, (b, k), acc, x.device)
    vectors = _check_out("vectors", vectors, (b, k, c), x.dtype, x.device)
    maps = _check_out("maps", maps, (b, k, h, w), x.dtype, x.device)
    if b == 0:
        return
    block_p = _step_block_p(p, cl)
    num_pb = triton.cdiv(p, block_p)
    sv_part = torch.empty((b, num_pb, c), dtype=acc, device=x.device)
    i64 = _i64(x, s, sv_part, vectors, maps)
    fin_p, fin_c = _finish_blocks(p, c)
    with _device_ctx(x):
        _launch(_brnpa_part_step_kernel, (b * num_pb,),
                x, inv, score, idx, s, sv_part, c, p, k, j, sb, sc, sp,
                CHANNELS_LAST=cl, I64=i64, BLOCK_A=_argmax_block(p), BLOCK_P=block_p)
        _brnpa_part_finish_kernel[(b,)](
            s, sv_part, score, total, vectors, maps, c, p, k, j, num_pb,
            PAPER=bool(paper), I64=i64, BLOCK_P=fin_p, BLOCK_C=fin_c, num_warps=4)


def brnpa_bwd_finish(x: Tensor, dw: Tensor, u: Tensor, t: Tensor, inv: Tensor, nrm: Tensor,
                     idx: Tensor, s: Tensor, total: Tensor, gv: Tensor | None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Between ``brnpa_bwd_reduce`` and ``brnpa_bwd_dx``: ``(a (B, 3K, H, W),
    m (B, 3K, C), c (B, H, W))`` in acc dtype, ``a = [w; ds * inv * inv_r; onehot]``,
    ``m = [gv; r; dr]`` (``gv`` None: zero rows), ``c = (sum_k ds s) * inv / nrm``
    (0 where ``nrm`` is 0), as ``reference/stages.py``. One launch, one program per
    sample. A representative index outside ``[0, H*W)`` gives ``r = dr = 0`` and no
    one-hot entry (the reference raises)."""
    sb, sc, sp, cl = _check_x("x", x)
    b, ch, h, w = x.shape
    p = h * w
    acc = _acc_dtype(x.dtype)
    _check_rank("idx", idx, 2)
    k = idx.shape[1]
    idx = _check_small("idx", idx, (b, k), torch.int64, x.device)
    dw = _check_small("dw", dw, (b, k, h, w), acc, x.device)
    u = _check_small("u", u, (b, k, ch), acc, x.device)
    t = _check_small("t", t, (b, ch), acc, x.device)
    inv = _check_small("inv", inv, (b, h, w), acc, x.device)
    nrm = _check_small("nrm", nrm, (b, h, w), acc, x.device)
    s = _check_small("s", s, (b, k, h, w), acc, x.device)
    total = _check_small("total", total, (b, k), acc, x.device)
    if gv is not None:
        gv = _check_small("gv", gv, (b, k, ch), acc, x.device)
    a = torch.empty((b, 3 * k, h, w), dtype=acc, device=x.device)
    m = torch.empty((b, 3 * k, ch), dtype=acc, device=x.device)
    c = torch.empty((b, h, w), dtype=acc, device=x.device)
    if b == 0:
        return a, m, c
    block_k, block_p, block_c = _bwd_finish_blocks(p, ch, k)
    one_chunk = k <= block_k
    ck = c if one_chunk else torch.empty((b, k), dtype=acc, device=x.device)  # scratch
    with _device_ctx(x):
        _brnpa_bwd_finish_kernel[(b,)](
            x, dw, u, t, inv, nrm, idx, s, total, u if gv is None else gv, a, m, c, ck,
            ch, p, k, sb, sc, sp, HAS_GV=gv is not None, ONE_CHUNK=one_chunk,
            I64=_i64(x, a, m, s, u), BLOCK_K=block_k, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=4)
    return a, m, c
