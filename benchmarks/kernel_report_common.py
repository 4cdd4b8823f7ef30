"""What the kernel report's Triton and CUDA halves share: the H100 limits used for
occupancy, the shapes each op is compiled at, and the record every row becomes.

Occupancy is the static one the CUDA occupancy calculator gives: registers are
allocated per warp in units of 256, shared memory per CTA plus 1 KB the driver
reserves, at most 64 warps and 32 CTAs per SM. Nothing here needs a GPU.
"""

from __future__ import annotations

import math
import re

# NVIDIA H100 SXM (sm_90): the device the GPU targets are set on.
H100 = {
    "sms": 132,
    "regs_per_sm": 65536,
    "reg_alloc_unit": 256,      # registers per warp are rounded up to this
    "max_warps_per_sm": 64,
    "max_ctas_per_sm": 32,
    "smem_per_sm": 228 * 1024,
    "smem_reserved_per_cta": 1024,
}

FIELDS = ("kernel", "backend", "op", "shape", "dtype", "layout", "config", "regs",
          "spill_bytes", "smem_bytes", "ctas_per_sm", "grid", "waves", "mma", "mma_n",
          "pipelined", "vec16_load_share")

OPS = ("mixed_attention", "aw_conv2d", "brnpa")
DTYPES = ("bfloat16", "float32")
LAYOUTS = ("nchw", "channels_last")

# ResNet-50's four stages at batch 64: the attention modules' inputs (mixed attention,
# BR-NPA) and the stages' 3x3 convs C -> C (AW-conv), as the GPU benchmarks use them.
STAGE_SHAPES = [(64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7)]
SHAPES = {
    "mixed_attention": STAGE_SHAPES,
    "aw_conv2d": [(64, 64, 56, 56), (64, 128, 28, 28), (64, 256, 14, 14), (64, 512, 7, 7)],
    # BR-NPA runs on the last stage's features; its benchmark shapes come first.
    "brnpa": [(64, 2048, 14, 14), (32, 2048, 56, 56)] + STAGE_SHAPES,
}
QUICK_SHAPES = {op: shapes[:1] for op, shapes in SHAPES.items()}
BRNPA_PARTS = 3
AW_KERNEL = 3  # AW-conv: 3x3, stride 1, padding 1, C2 = C1


def ctas_per_sm(regs: int | None, threads: int, smem_bytes: int | None,
                hw: dict = H100) -> int | None:
    """CTAs of ``threads`` threads that fit on one SM at once (0: the CTA does not fit)."""
    if regs is None or threads <= 0:
        return None
    warps = math.ceil(threads / 32)
    by_warps = hw["max_warps_per_sm"] // warps
    regs_per_warp = math.ceil(max(regs, 1) * 32 / hw["reg_alloc_unit"]) * hw["reg_alloc_unit"]
    by_regs = (hw["regs_per_sm"] // regs_per_warp) // warps
    smem = (smem_bytes or 0) + hw["smem_reserved_per_cta"]
    by_smem = hw["smem_per_sm"] // smem
    return max(0, min(by_warps, by_regs, by_smem, hw["max_ctas_per_sm"]))


def grid_size(grid) -> int | None:
    """Number of CTAs of a grid given as an int or a (x, y, z) tuple."""
    if grid is None:
        return None
    if isinstance(grid, int):
        return grid
    return math.prod(int(g) for g in grid)


def waves(grid, ctas: int | None, hw: dict = H100) -> float | None:
    """Grid size over what the whole GPU runs at once."""
    n = grid_size(grid)
    if n is None or not ctas:
        return None
    return n / (hw["sms"] * ctas)


def shape_str(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def record(**fields) -> dict:
    """One row of the report: every field of FIELDS, None where it does not apply."""
    unknown = set(fields) - set(FIELDS) - {"stack_bytes", "threads", "note"}
    if unknown:
        raise KeyError(f"kernel report record: unknown fields {sorted(unknown)}")
    row = {k: fields.get(k) for k in FIELDS}
    for extra in ("stack_bytes", "threads", "note"):
        if extra in fields:
            row[extra] = fields[extra]
    return row


_PTXAS_ENTRY = re.compile(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?")
_PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas_verbose(text: str) -> dict[str, dict]:
    """``ptxas -v`` (or ``nvcc -Xptxas -v``) output -> per function
    ``{"regs", "stack", "spill_stores", "spill_loads"}`` (bytes per thread)."""
    out: dict[str, dict] = {}
    name = None
    for line in text.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            name = m.group(1)
            out.setdefault(name, {"regs": None, "stack": 0, "spill_stores": 0, "spill_loads": 0})
        elif name is not None and (m := _PTXAS_FRAME.search(line)):
            out[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                             spill_loads=int(m.group(3)))
        elif name is not None and (m := _PTXAS_USED.search(line)):
            out[name]["regs"] = int(m.group(1))
    return out
