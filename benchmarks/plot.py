"""Bar charts from benchmark CSVs: one PNG per (op, device, mode, dtype), bars per
provider, grouped by shape.

    python benchmarks/plot.py                       # every CSV in benchmarks/results
    python benchmarks/plot.py benchmarks/results/mixed_attention.csv --metric gbps

CSVs are append-only logs; for each (device, provider, mode, shape, dtype, layout)
the last row wins, unless ``--commit`` picks one commit's rows.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
METRICS = {
    "ms": "median time (ms, lower is better)",
    "gbps": "GB/s by the pass budget (higher is better)",
    "frac_copy_bw": "fraction of copy bandwidth (higher is better)",
    "speedup_vs_ref": "speedup over reference eager (higher is better)",
    "peak_mem_mb": "peak extra memory (MB, lower is better)",
}


def load(paths, commit=None, device_name=None):
    """The latest row per configuration, in first-seen order."""
    latest = OrderedDict()
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if commit and row.get("commit") != commit:
                    continue
                if device_name and device_name.lower() not in row.get("device_name", "").lower():
                    continue
                key = tuple(row.get(k, "") for k in ("op", "device_name", "provider", "mode",
                                                      "shape", "dtype", "layout"))
                latest[key] = row
    return list(latest.values())


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_")


def plot(rows, metric: str, out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = OrderedDict()
    for r in rows:
        if r.get(metric, "") == "":
            continue
        figures.setdefault((r["op"], r["device"], r["device_name"], r["mode"], r["dtype"],
                            r.get("layout", "")), []).append(r)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (op, device, device_name, mode, dtype, layout), group in figures.items():
        shapes = list(OrderedDict.fromkeys(r["shape"] for r in group))
        providers = list(OrderedDict.fromkeys(r["provider"] for r in group))
        value = {(r["provider"], r["shape"]): float(r[metric]) for r in group}
        width = 0.8 / len(providers)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(shapes) * max(1, len(providers) / 3)),
                                        4.5))
        for i, p in enumerate(providers):
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(shapes))]
            ys = [value.get((p, s), float("nan")) for s in shapes]
            bars = ax.bar(xs, ys, width, label=p)
            ax.bar_label(bars, fmt="%.3g", fontsize=7, rotation=90, padding=2)
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_xlabel("shape (N x C x H x W)")
        ax.set_ylabel(METRICS.get(metric, metric))
        ax.margins(y=0.2)
        commits = sorted({r.get("commit", "") for r in group})
        ax.set_title(f"{op} {mode} {dtype} {layout}\n{device_name} | commit "
                     f"{', '.join(commits)}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = _slug(f"{op}_{device}_{mode}_{dtype}"
                     + (f"_{layout}" if layout and layout != "contiguous" else "")
                     + ("" if metric == "ms" else f"_{metric}")) + ".png"
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="*", help="result CSVs (default: benchmarks/results/*.csv)")
    ap.add_argument("--metric", choices=sorted(METRICS), default="ms")
    ap.add_argument("--out-dir", default=os.path.join(RESULTS, "plots"))
    ap.add_argument("--commit", help="only rows of this commit")
    ap.add_argument("--device-name", help="only rows whose device_name contains this")
    args = ap.parse_args(argv)

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot.py needs matplotlib, which is not installed: pip install matplotlib "
              "(the benchmarks themselves do not need it)", file=sys.stderr)
        return 1
    paths = args.csv or sorted(glob.glob(os.path.join(RESULTS, "*.csv")))
    if not paths:
        print(f"no CSV given and none in {RESULTS}: run a benchmark first", file=sys.stderr)
        return 1
    rows = load(paths, args.commit, args.device_name)
    written = plot(rows, args.metric, args.out_dir)
    if not written:
        print(f"no rows with a {args.metric!r} value in {', '.join(paths)}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
