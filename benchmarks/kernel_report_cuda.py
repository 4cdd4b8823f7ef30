"""The CUDA half of the kernel report (benchmarks/kernel_report.py): for every CUDA
kernel one forward+backward of an op launches at the report's shapes, what the sm_90
build says about it (registers, spills, shared memory, stack, matrix instructions) and
the launch grid its host code computes. No GPU is needed.

Two sources, joined by kernel name:

* the launches: ``torch.ops.manet_kernels._cuda_launch_plan``, a host-only op compiled
  from the launchers' own planning code (``csrc/cuda/*_plan.h``, in every build), asked
  per CUDA op for an H100 (132 SMs, compute capability 9, 227 KiB of opt-in shared
  memory per block), assuming 16-byte aligned tensors;
* the resources: ``cuobjdump --dump-resource-usage`` (REG, STACK, SHARED) and
  ``cuobjdump -sass`` of the sm_90 cubins inside the built ``manet_kernels._C``.
  Spill bytes are the bytes of the SASS's local stores (STL): the cubin keeps no
  ptxas spill count, and a local array that is not a spill would count too.

BR-NPA's reduce grid depends on the kernel's occupancy (cudaOccupancyMaxActiveBlocks-
PerMultiprocessor on a GPU); here that is kernel_report_common.ctas_per_sm of the
kernel's resources, fed back into the plan.
"""

from __future__ import annotations

import functools
import glob
import importlib
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections import Counter

import torch

from manet_kernels import _ext  # loads the extension, and with it _cuda_launch_plan

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_report_common as common  # noqa: E402

BUILD_HINT = ("build the extension with CUDA kernels for sm_90: MANET_KERNELS_CUDA=1 "
              "TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace")
CC_MAJOR = 9
# H100's cudaDevAttrMaxSharedMemoryPerBlockOptin: the SM's shared memory less the
# driver's reservation for one block.
SMEM_OPTIN = common.H100["smem_per_sm"] - common.H100["smem_reserved_per_cta"]
# What the SASS's matrix instructions are, at the level of detail.
_HMMA_N = {"16816": 8, "1688": 8, "884": 8}


def note(msg: str) -> None:
    print(f"kernel_report_cuda: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# Tools and the library


def cuobjdump() -> str | None:
    """cuobjdump from $CUDA_HOME, PATH, or the one Triton bundles (CUDA 13.1 with
    triton 3.8, which reads nvcc 13.0's cubins)."""
    cands = []
    if os.environ.get("CUDA_HOME"):
        cands.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    cands.append(shutil.which("cuobjdump"))
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cands.append(os.path.join(loc, "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def extension_library() -> str | None:
    """Path of the loaded manet_kernels._C (or MANET_KERNELS_LIB)."""
    if os.environ.get("MANET_KERNELS_LIB"):
        return os.environ["MANET_KERNELS_LIB"]
    spec = importlib.util.find_spec("manet_kernels._C")
    return spec.origin if spec is not None else None


def _run(args: list[str], stdin: str | None = None, cwd: str | None = None) -> str:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, check=True,
                          cwd=cwd).stdout


# ---------------------------------------------------------------------------------------
# Cubin contents


def short_name(demangled: str) -> str:
    """``void ns::kernel<args>(params)`` -> ``kernel<args>``, namespaces dropped: the
    form the launch plan names kernels in."""
    name = re.sub(r"^void ", "", demangled)
    name = name.replace("(anonymous namespace)::", "").replace("manet_kernels::", "")
    # c++filt writes nested closing brackets as "> >", the plans as ">>"
    while "> >" in name:
        name = name.replace("> >", ">>")
    depth = 0
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def readable(kernel: str) -> str:
    """A plan kernel name with the long type names shortened, for the table."""
    for long, short in (("c10::BFloat16", "bf16"), ("__nv_bfloat16", "bf16"),
                        ("c10::Half", "fp16"), ("__half", "fp16")):
        kernel = kernel.replace(long, short)
    return kernel.replace(", ", ",")


def parse_resource_usage(text: str, arch: str = "sm_90") -> dict[str, dict]:
    """mangled name -> {regs, stack_bytes, smem_bytes, local_bytes} for ``arch``'s cubins."""
    out, cur_arch, fn = {}, None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (\S+)", line)
        if m:
            cur_arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and fn is not None and cur_arch == arch:
            out[fn] = {"regs": int(m.group(1)), "stack_bytes": int(m.group(2)),
                       "smem_bytes": int(m.group(3)), "local_bytes": int(m.group(4))}
            fn = None
    return out


def sass_stats(sass: str) -> dict:
    """Local-store bytes, matrix instructions and global-load widths of one function's
    SASS."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    stl = sum(int(m.group(1) or 32) // 8
              for op in ops if (m := re.fullmatch(r"STL(?:\.(?:U|S)?(\d+))?", op)))
    hmma = [op for op in ops if op.startswith("HMMA")]
    ldg = [op for op in ops if op.startswith("LDG")]
    shape = re.search(r"HMMA\.(\d+)", hmma[0]).group(1) if hmma else None
    return {
        "spill_bytes": stl,
        "mma": "mma.sync" if hmma else None,
        "mma_n": _HMMA_N.get(shape) if shape else None,
        "vec16_load_share": (sum(".128" in op for op in ldg) / len(ldg)) if ldg else None,
        # No async copies at all: nothing can be in flight across iterations.
        "pipelined": False if not any(op.startswith("LDGSTS") for op in ops) else None,
    }


def split_sass(text: str) -> dict[str, str]:
    """mangled name -> its SASS, from ``cuobjdump -sass`` ("Function : name") or
    ``nvdisasm`` ("//---- .text.name ----") output."""
    out, name, buf = {}, None, []
    for line in text.splitlines():
        m = re.match(r"\s*(?:Function : |//-+ \.text\.)(\S+)", line)
        if m:
            if name is not None:
                out[name] = "\n".join(buf)
            name, buf = m.group(1), []
        elif name is not None:
            buf.append(line)
    if name is not None:
        out[name] = "\n".join(buf)
    return out


def elf_functions(path: str) -> dict[str, int]:
    """Function symbol name -> symbol index of an ELF64 little-endian file (a cubin),
    the indices ``nvdisasm -fun`` takes."""
    with open(path, "rb") as f:
        data = f.read()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    out = {}
    for _, sh_type, _, _, off, size, link, _, _, entsize in sections:
        if sh_type != 2:  # SHT_SYMTAB
            continue
        stroff = sections[link][4]
        for i in range(size // entsize):
            st_name, st_info = struct.unpack_from("<IB", data, off + i * entsize)
            if st_info & 0xF == 2:  # STT_FUNC
                end = data.index(b"\0", stroff + st_name)
                out[data[stroff + st_name:end].decode()] = i
    return out


@functools.lru_cache(maxsize=2)
def cubin_kernels(lib: str, tool: str) -> dict[str, dict]:
    """short name -> resources of every sm_90 kernel in ``lib`` (fast: no SASS)."""
    usage = parse_resource_usage(_run([tool, "--dump-resource-usage", lib]))
    mangled = sorted(usage)
    demangled = _run(["c++filt"], "\n".join(mangled) + "\n").splitlines() if mangled else []
    return {short_name(d): dict(usage[m], mangled=m, demangled=d)
            for m, d in zip(mangled, demangled)}


def add_sass_stats(lib: str, tool: str, infos: list[dict]) -> None:
    """Adds sass_stats() to each cubin kernel info. Disassembles only those kernels,
    with nvdisasm on the extracted sm_90 cubins (~1 s per 15 kernels, where the whole
    library's SASS is ~80 MB and 10-40 s, and cuobjdump -fun ~0.4 s per kernel)."""
    todo = [i for i in infos if "spill_bytes" not in i]
    nvdisasm = os.path.join(os.path.dirname(tool), "nvdisasm")
    if not todo:
        return
    sass = {}
    if not os.access(nvdisasm, os.X_OK):
        sass = split_sass(_run([tool, "-sass", "-arch", "sm_90", lib]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            _run([tool, "-xelf", "all", os.path.abspath(lib)], cwd=tmp)
            for cubin in glob.glob(os.path.join(tmp, "*.sm_90.cubin")):
                syms = elf_functions(cubin)
                idx = [str(syms[i["mangled"]]) for i in todo if i["mangled"] in syms]
                if idx:
                    sass.update(split_sass(_run([nvdisasm, "-c", "-fun", ",".join(idx),
                                                 cubin])))
    for info in todo:
        info.update(sass_stats(sass.get(info["mangled"], "")))


# ---------------------------------------------------------------------------------------
# Launch plans


def plan(op: str, shape, dtype, channels_last: bool, params=(), occ: dict | None = None
         ) -> list[dict]:
    """The launches of one call of CUDA op ``op`` at ``shape`` on an H100."""
    occ = occ or {}
    names, nums = torch.ops.manet_kernels._cuda_launch_plan(
        op, list(shape), dtype, channels_last, list(params), common.H100["sms"], CC_MAJOR,
        SMEM_OPTIN, list(occ), list(occ.values()))
    return [{"kernel": k, "grid": tuple(nums[6 * i:6 * i + 3]), "threads": nums[6 * i + 3],
             "dyn_smem": nums[6 * i + 4], "occupancy": nums[6 * i + 5]}
            for i, k in enumerate(names)]


def op_calls(op: str, shape, dtype) -> list[tuple[str, tuple, object, tuple, str | None]]:
    """(CUDA op, its input shape, its dtype, params, note) for one forward+backward of
    ``op`` at the report's ``shape``, in dispatch order (manet_kernels/ops/<op>.py)."""
    n, c, h, w = shape
    if op == "mixed_attention":
        # the module (manet_kernels.ops re-exports a function of the same name)
        ma_ops = importlib.import_module("manet_kernels.ops.mixed_attention")
        passes = ("channel_pool", "spatial_pool", "apply", "bwd_reduce", "bwd_channel",
                  "bwd_dx")
        calls = [(f"mixed_attention_{p}", shape, dtype, (), None) for p in passes]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        conv_note = (None if ma_ops.CUDA_SPATIAL_CONV_VERIFIED else
                     "not dispatched yet: the fused op keeps cuDNN's conv on CUDA "
                     "(CUDA_SPATIAL_CONV_VERIFIED = False)")
        for name in ("mixed_attention_spatial_conv", "mixed_attention_spatial_conv_bwd"):
            # the module's default 7x7 conv with bias, on the (N, H, W) maps
            calls.append((name, (n, h, w), acc, (7, 1), conv_note))
        return calls
    if op == "brnpa":
        k = common.BRNPA_PARTS
        return ([("brnpa_norms", shape, dtype, (), None)]
                + [("brnpa_step", shape, dtype, (), None)] * k
                + [("brnpa_bwd_reduce", shape, dtype, (k,), None),
                   ("brnpa_bwd_dx", shape, dtype, (2 * k,), None)])
    if op == "aw_conv2d":
        r = common.AW_KERNEL
        conv = (c, r, r, 1, 1, r // 2, r // 2, 1, 1, 1)
        ps_note = "per_sample_conv2d (the same kernels without the scale)"
        gates = importlib.import_module("manet_kernels.ops._common")
        v2_note = ("the v2 kernels where they apply" if gates.CUDA_AW_V2_VERIFIED
                   else "not dispatched yet: backend='cuda' runs the first kernels "
                   "(CUDA_AW_V2_VERIFIED = False)")
        return [("aw_conv2d_fwd", shape, dtype, conv, None),
                ("aw_conv2d_bwd", shape, dtype, conv, None),
                ("aw_conv2d_fwd_v2", shape, dtype, conv, v2_note),
                ("aw_conv2d_bwd_v2", shape, dtype, conv, v2_note),
                ("per_sample_conv2d_fwd", shape, dtype, conv, ps_note),
                ("per_sample_conv2d_bwd", shape, dtype, conv, ps_note)]
    raise ValueError(f"op: expected one of {common.OPS}, got {op!r}")


def _resources(info: dict, threads: int, dyn_smem: int) -> tuple[int, int]:
    smem = info["smem_bytes"] + dyn_smem
    return smem, common.ctas_per_sm(info["regs"], threads, smem)


def resolved_plan(call, channels_last: bool, kernels: dict) -> list[dict]:
    """plan() of one call, again with the occupancy of every kernel whose grid depends
    on it (BR-NPA's reduce) computed from the cubin's resources."""
    name, shape, dtype, params, _ = call
    launches = plan(name, shape, dtype, channels_last, params)
    occ = {la["kernel"]: _resources(kernels[la["kernel"]], la["threads"], la["dyn_smem"])[1]
           for la in launches if la["occupancy"] and la["kernel"] in kernels}
    return plan(name, shape, dtype, channels_last, params, occ) if occ else launches


# ---------------------------------------------------------------------------------------
# Records


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _record(op, shape, dtype, call, layout, launch, count: int, kernels: dict) -> dict:
    """One report row at the op's report ``shape`` and activation ``dtype`` (the spatial
    conv runs on (N, H, W) maps in the accumulation dtype: its kernel name says which)."""
    name, _, _, _, call_note = call
    info = kernels.get(launch["kernel"])
    notes = [call_note] if call_note else []
    config = f"{name}, {launch['threads']} threads"
    if launch["dyn_smem"]:
        config += f", {launch['dyn_smem']} B dynamic smem"
    if count > 1:
        config += f", x{count} per fwd+bwd"
    fields = dict(kernel=readable(launch["kernel"]), backend="cuda", op=op,
                  shape=common.shape_str(shape), dtype=_dtype_name(dtype), layout=layout,
                  config=config, grid=list(launch["grid"]), threads=launch["threads"])
    if info is None:
        notes.append("planned, but no sm_90 cubin has this kernel")
        return common.record(**fields, note="; ".join(notes))
    smem, ctas = _resources(info, launch["threads"], launch["dyn_smem"])
    if launch["occupancy"] == 1:
        notes.append("grid assumes 1 CTA/SM (occupancy unknown)")
    return common.record(**fields, regs=info["regs"], spill_bytes=info["spill_bytes"],
                        smem_bytes=smem, stack_bytes=info["stack_bytes"], ctas_per_sm=ctas,
                        waves=common.waves(launch["grid"], ctas), mma=info["mma"],
                        mma_n=info["mma_n"], pipelined=info["pipelined"],
                        vec16_load_share=info["vec16_load_share"],
                        **({"note": "; ".join(notes)} if notes else {}))


def op_launches(op: str, shape, dtype, layout: str, kernels: dict) -> list[tuple]:
    """(call, layout, launch, count) per distinct launch of one forward+backward: a
    launch repeated with the same grid (e.g. BR-NPA's step per part) is one entry."""
    counts, order = Counter(), []
    for call in op_calls(op, shape, dtype):
        # AW-conv kernels take strides at run time (but for the v2 kernels, which take
        # channels_last only), the spatial conv runs on (N, H, W) maps: their
        # kernels and grids do not depend on the layout (layout None).
        layout_free = (op == "aw_conv2d" and not call[0].endswith("_v2")) or len(call[1]) == 3
        if layout_free and layout != common.LAYOUTS[0]:
            continue
        for la in resolved_plan(call, layout == "channels_last", kernels):
            key = (call[0], call[4], tuple(sorted(la.items())))
            if key not in counts:
                order.append((key, call, None if layout_free else layout, la))
            counts[key] += 1
    return [(call, lay, la, counts[key]) for key, call, lay, la in order]


def _plan_available() -> bool:
    return hasattr(torch.ops.manet_kernels, "_cuda_launch_plan")


def records(ops: list[str], quick: bool) -> list[dict]:
    """The CUDA records of ``ops`` at the report's shapes (quick: the first shape,
    bfloat16). [] with a note on stderr where the build has no sm_90 CUDA kernels."""
    lib, tool = extension_library(), cuobjdump()
    if not _ext.HAS_CUDA_KERNELS or lib is None:
        note(f"the extension has no CUDA kernels ({_ext.EXT_ERROR or 'CPU-only build'}): "
             f"no CUDA records; {BUILD_HINT}")
        return []
    if not _plan_available():
        note(f"{lib} has no _cuda_launch_plan op (built from older sources): rebuild it")
        return []
    if tool is None or shutil.which("c++filt") is None:
        note("needs cuobjdump (CUDA_HOME, PATH or triton's bundled one) and c++filt "
             "(binutils): no CUDA records")
        return []
    kernels = cubin_kernels(lib, tool)
    if not kernels:
        note(f"{lib} has no sm_90 cubins: no CUDA records; {BUILD_HINT}")
        return []
    dtypes = [torch.bfloat16] if quick else [getattr(torch, d) for d in common.DTYPES]
    shapes = common.QUICK_SHAPES if quick else common.SHAPES
    rows = [(op, shape, dtype, *row) for op in ops for shape in shapes[op] for dtype in dtypes
            for layout in common.LAYOUTS
            for row in op_launches(op, shape, dtype, layout, kernels)]
    add_sass_stats(lib, tool, list({la["kernel"]: kernels[la["kernel"]]
                                    for *_, la, _ in rows if la["kernel"] in kernels
                                    }.values()))
    out = [_record(*row, kernels) for row in rows]
    _note_unplanned(ops, kernels, out)
    return out


# Kernel name prefix of each op, for the cubin kernels no planned launch uses.
_PREFIX = {"mixed_attention": "_mixed_attention_", "brnpa": "_brnpa_", "aw_conv2d": "_aw_conv2d_"}


def _note_unplanned(ops, kernels: dict, recs: list[dict]) -> None:
    planned = {r["kernel"] for r in recs}
    for op in ops:
        extra = sorted(readable(k) for k in kernels if k.startswith(_PREFIX[op])
                       and readable(k) not in planned)
        if extra:
            note(f"{op}: {len(extra)} sm_90 kernels are not launched at the report's shapes "
                 f"and dtypes (other dtypes, vector widths or GPUs): "
                 + ", ".join(extra[:6]) + (" ..." if len(extra) > 6 else ""))


if __name__ == "__main__":
    import json

    print(json.dumps(records(list(common.OPS), quick="--quick" in sys.argv), indent=1))
