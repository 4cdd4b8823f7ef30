"""Bar charts from benchmark CSVs: one PNG per figure key, bars per provider grouped
by shape for the op benchmarks; bars per kernel flavour grouped by model for the
training-step rows (``train_step.csv``).

    python benchmarks/plot.py                       # every CSV in benchmarks/results
    python benchmarks/plot.py benchmarks/results/mixed_attention.csv --metric gbps

CSVs are append-only logs; for each configuration (figure key, group, bar) the last
row wins, unless ``--commit`` picks one commit's rows. Rows without the chosen
metric are left out (e.g. train_step rows for ``--metric gbps``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
METRICS = {
    "ms": "median time (ms, lower is better)",
    "gbps": "GB/s by the pass budget (higher is better)",
    "frac_copy_bw": "fraction of copy bandwidth (higher is better)",
    "speedup_vs_ref": "speedup over reference eager (higher is better)",
    "peak_mem_mb": "peak extra memory (MB, lower is better)",
    "tflops": "TFLOP/s (higher is better)",
    "frac_matmul": "fraction of matmul TFLOP/s (higher is better)",
    "speedup_vs_plain": "speedup over the plain conv (higher is better)",
    "images_per_s": "images per second (higher is better)",
    "vs_plain": "plain ResNet step time / this (higher is better)",
    "vs_reference": "reference kernels' step time / fused (higher is better)",
}


@dataclass(frozen=True)
class Layout:
    """How one kind of CSV becomes figures: the columns that pick a figure, the x-axis
    groups, the bars, and the figure's file name and title from one of its rows."""
    figure: tuple[str, ...]
    group: str
    bar: str
    xlabel: str
    name: Callable[[dict], str]
    title: Callable[[dict], str]


def _op_name(r: dict) -> str:
    layout = r.get("layout", "")
    return (f"{r['op']}_{r['device']}_{r['mode']}_{r['dtype']}"
            + (f"_{layout}" if layout and layout != "contiguous" else ""))


def _train_step_name(r: dict) -> str:
    return (f"{r['op']}_{r['device']}_b{r['batch']}_{r['image_size']}px_{r['amp']}"
            + ("_channels_last" if r.get("channels_last") == "True" else ""))


def _train_step_title(r: dict) -> str:
    return (f"{r['op']}: batch {r['batch']} at {r['image_size']}x{r['image_size']}, "
            f"{r['classes']} classes, {r['amp']}, channels_last={r.get('channels_last')}")


OP_LAYOUT = Layout(("op", "device", "device_name", "mode", "dtype", "layout"), "shape",
                   "provider", "shape (N x C x H x W)", _op_name,
                   lambda r: f"{r['op']} {r['mode']} {r['dtype']} {r.get('layout', '')}")
LAYOUTS = {"train_step": Layout(("op", "device", "device_name", "batch", "image_size",
                                 "classes", "amp", "channels_last"), "arch", "kernels",
                                "model", _train_step_name, _train_step_title),
           # bench_host_time.py: host time per step at tiny shapes, fused against eager
           "host_time": Layout(("op", "device", "device_name"), "case", "backend",
                               "step (tiny shape)", lambda r: f"{r['op']}_{r['device']}",
                               lambda r: f"host time per forward+backward, {r['device']}")}


def layout_of(row: dict) -> Layout:
    return LAYOUTS.get(row.get("op", ""), OP_LAYOUT)


def shipped_csvs(folder: str = RESULTS) -> list[str]:
    """The benchmark CSVs in ``folder``: those whose rows name their ``op`` (not, e.g.,
    run_device.sh's record of step times, device_steps.csv)."""
    paths = []
    for path in sorted(glob.glob(os.path.join(folder, "*.csv"))):
        with open(path, newline="") as f:
            if "op" in (csv.DictReader(f).fieldnames or ()):
                paths.append(path)
    return paths


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
                lay = layout_of(row)
                key = tuple(row.get(k, "") for k in (*lay.figure, lay.group, lay.bar))
                latest[key] = row
    return list(latest.values())


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_")


def figures_of(rows, metric: str) -> OrderedDict:
    """``(layout, figure key) -> rows`` of the rows that have ``metric``."""
    figures = OrderedDict()
    for r in rows:
        if r.get(metric, "") != "":
            lay = layout_of(r)
            figures.setdefault((lay, tuple(r.get(k, "") for k in lay.figure)), []).append(r)
    return figures


def _draw(plt, lay: Layout, group: list[dict], metric: str):
    groups = list(OrderedDict.fromkeys(r[lay.group] for r in group))
    bars = list(OrderedDict.fromkeys(r[lay.bar] for r in group))
    value = {(r[lay.bar], r[lay.group]): float(r[metric]) for r in group}
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(bars) / 3)), 4.5))
    for i, b in enumerate(bars):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(groups))]
        ys = [value.get((b, g), float("nan")) for g in groups]
        ax.bar_label(ax.bar(xs, ys, width, label=b), fmt="%.3g", fontsize=7, rotation=90,
                     padding=2)
    tilt = len(groups) > 4  # long model names overlap when level
    ax.set_xticks(range(len(groups)), groups, rotation=30 if tilt else 0,
                  ha="right" if tilt else "center")
    ax.set_xlabel(lay.xlabel)
    ax.set_ylabel(METRICS.get(metric, metric))
    ax.margins(y=0.2)
    commits = sorted({r.get("commit", "") for r in group})
    ax.set_title(f"{lay.title(group[0])}\n{group[0].get('device_name', '')} | commit "
                 f"{', '.join(commits)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(rows, metric: str, out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (lay, _), group in figures_of(rows, metric).items():
        name = _slug(lay.name(group[0]) + ("" if metric == "ms" else f"_{metric}"))
        path = os.path.join(out_dir, name + ".png")
        if path in written:  # two GPUs' rows of one configuration: keep both figures
            path = os.path.join(out_dir, f"{name}_{_slug(group[0]['device_name'])}.png")
        fig = _draw(plt, lay, group, metric)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="*",
                    help="result CSVs (default: the benchmark CSVs in benchmarks/results)")
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
    paths = args.csv or shipped_csvs()
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
