"""Device-side pieces the Triton kernels share: which block of a ``(N, C, P)``
activation (or of a GEMM) a program owns, and arithmetic rounded as torch's. The
block helpers run once per program, before the kernel's loops (a nested
``@triton.jit`` call is inlined on a GPU, but costs Python time per call under the
interpreter: keep such helpers out of hot loops).

With ``I64`` the sample index and the offsets come back as int64, so that every
element offset computed from them is exact past 2**31.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sample_block(L, I64: tl.constexpr, BLOCK: tl.constexpr):
    """The program's block of ``BLOCK`` indices along an axis of length ``L`` (C or P),
    one program per (sample, block), blocks fastest: ``(n, offs, mask)``."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(L, BLOCK)
    n = pid // num_blocks
    offs = (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    if I64:
        n = n.to(tl.int64)
        offs = offs.to(tl.int64)
    return n, offs, mask


@triton.jit
def cp_tile(C, P, I64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The program's ``(BLOCK_C, BLOCK_P)`` tile, one program per tile, P-blocks fastest,
    then C-blocks, then samples: ``(n, offs_c, offs_p, mask_c, mask_p, mask)``, ``mask``
    the tile's."""
    pid = tl.program_id(0)
    num_pb = tl.cdiv(P, BLOCK_P)
    num_cb = tl.cdiv(C, BLOCK_C)
    pb = pid % num_pb
    cb = (pid // num_pb) % num_cb
    n = pid // (num_pb * num_cb)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_c = offs_c < C
    mask_p = offs_p < P
    mask = mask_c[:, None] & mask_p[None, :]
    if I64:
        n = n.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
        offs_p = offs_p.to(tl.int64)
    return n, offs_c, offs_p, mask_c, mask_p, mask


@triton.jit
def gemm_blocks(N_EXT, BLOCK_N: tl.constexpr, M_EXT, BLOCK_M: tl.constexpr):
    """A GEMM-like kernel's program id split into ``(nb, mb, rest)``: its block of
    ``BLOCK_N`` along an axis of ``N_EXT`` (fastest, so neighbouring programs share the
    other operand's tile), its block of ``BLOCK_M`` along ``M_EXT``, and what is left
    of the id (the kernel's own outer indices)."""
    pid = tl.program_id(0)
    num_nb = (N_EXT + BLOCK_N - 1) // BLOCK_N
    num_mb = (M_EXT + BLOCK_M - 1) // BLOCK_M
    nb = pid % num_nb
    rest = pid // num_nb
    return nb, rest % num_mb, rest // num_mb


@triton.jit
def div_rn(a, b):
    """``a / b`` correctly rounded, as torch divides (fp32 ``/`` may be approximate
    on a GPU; ``tl.div_rn`` takes fp32 only, fp64 ``/`` is exact)."""
    if a.dtype == tl.float64:
        q = a / b
    else:
        q = tl.div_rn(a, b)
    return q


@triton.jit
def sqrt_rn(v):
    """``sqrt(v)`` correctly rounded, like torch's (``tl.sqrt`` may be approximate on a
    GPU; ``tl.sqrt_rn`` takes fp32 only, fp64 ``tl.sqrt`` is exact)."""
    if v.dtype == tl.float64:
        r = tl.sqrt(v)
    else:
        r = tl.sqrt_rn(v)
    return r
