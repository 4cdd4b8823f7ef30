"""What the compiler says about every GPU kernel of the package, without a GPU.

    python benchmarks/kernel_report.py --quick                 # one shape and config per kernel
    python benchmarks/kernel_report.py --op aw_conv2d --json out.json
    python benchmarks/kernel_report.py --backend triton --kernel bwd_weight --dtype bfloat16

The Triton half (kernel_report_triton.py) compiles each Triton kernel for sm_90 from
its launcher's real arguments, per autotune config; the CUDA half
(kernel_report_cuda.py) reads the sm_90 build of the extension. Both give rows of
kernel_report_common.FIELDS; benchmarks/README.md says what each column means.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_report_common as krc  # noqa: E402

BACKENDS = ("triton", "cuda", "all")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", action="append", choices=krc.OPS,
                   help="an op to report (repeatable; default: all)")
    p.add_argument("--backend", choices=BACKENDS, default="all",
                   help="kernels to report (default: all)")
    p.add_argument("--kernel", action="append", metavar="SUBSTR",
                   help="keep kernels whose name contains SUBSTR (repeatable)")
    p.add_argument("--dtype", action="append", choices=krc.DTYPES,
                   help="Triton: a dtype (repeatable; default both, bfloat16 with --quick)")
    p.add_argument("--layout", action="append", choices=krc.LAYOUTS,
                   help="Triton: a layout (repeatable; default both, channels_last with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="the first shape of each op and one config per kernel")
    p.add_argument("--json", metavar="PATH", help="also write the records as a JSON list")
    return p.parse_args(argv)


def triton_records(args) -> list[dict]:
    try:
        import kernel_report_triton as krt
        return krt.records(ops=args.op, quick=args.quick, kernels=args.kernel,
                           dtypes=args.dtype, layouts=args.layout)
    except ImportError as e:
        print(f"note: no Triton kernel report ({e})", file=sys.stderr)
        return []


def cuda_records(args) -> list[dict]:
    try:
        import kernel_report_cuda
    except ImportError as e:
        print(f"note: no CUDA kernel report ({e})", file=sys.stderr)
        return []
    rows = kernel_report_cuda.records(ops=args.op or list(krc.OPS), quick=args.quick)
    if args.kernel:
        rows = [r for r in rows if any(k in (r["kernel"] or "") for k in args.kernel)]
    if not rows:
        print("note: the CUDA kernel report gave no rows (extension not built for sm_90?)",
              file=sys.stderr)
    return rows


# column title, record field, formatter
_DTYPE = {"bfloat16": "bf16", "float32": "fp32"}
_LAYOUT = {"nchw": "NCHW", "channels_last": "CL"}
COLUMNS = (
    ("backend", "backend", str),
    ("op", "op", str),
    ("kernel", "kernel", lambda k: k.strip("_").removesuffix("_kernel")),
    ("shape", "shape", str),
    ("dtype", "dtype", lambda d: _DTYPE.get(d, d)),
    ("layout", "layout", lambda v: _LAYOUT.get(v, v)),
    ("config", "config", str),
    ("regs", "regs", str),
    ("spill", "spill_bytes", str),
    ("smem", "smem_bytes", str),
    ("cta/sm", "ctas_per_sm", str),
    ("grid", "grid", str),
    ("waves", "waves", lambda w: f"{w:.2f}"),
    ("mma", "mma", str),
    ("N", "mma_n", str),
    ("pipe", "pipelined", lambda b: "yes" if b else "no"),
    ("vec16", "vec16_load_share", lambda s: f"{s:.2f}"),
)


def table(rows: list[dict]) -> str:
    """Rows as aligned text columns; '-' where a field does not apply."""
    cells = [[title for title, _, _ in COLUMNS]]
    for r in rows:
        cells.append(["-" if r.get(field) is None else fmt(r[field]) for _, field, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    notes = [f"  {r['kernel']} {r['shape']} {r['dtype']} {r['layout']} [{r['config']}]: {r['note']}"
             for r in rows if r.get("note")]
    return "\n".join(lines + (["notes:"] + notes if notes else []))


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    rows = []
    if args.backend in ("triton", "all"):
        try:
            rows += triton_records(args)
        except RuntimeError as e:  # e.g. TRITON_INTERPRET set: nothing to compile
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.backend in ("cuda", "all"):
        rows += cuda_records(args)
    print(table(rows))
    print(f"{len(rows)} kernel variants in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
