"""benchmarks/plot.py on the CSVs the repository ships (op rows and training-step rows),
the last-row-wins rule per configuration, and the exit status when nothing plots."""

import csv
import glob
import os
import sys

import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import plot  # noqa: E402

SHIPPED = plot.shipped_csvs()


def test_default_arguments_plot_every_shipped_csv(tmp_path, capsys):
    assert SHIPPED, "benchmarks/results ships no CSV"
    # every CSV there is a benchmark's, but for run_device.sh's step-time record
    others = set(glob.glob(os.path.join(plot.RESULTS, "*.csv"))) - set(SHIPPED)
    assert {os.path.basename(p) for p in others} <= {"device_steps.csv"}
    assert plot.main(["--out-dir", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    expected = plot.figures_of(plot.load(SHIPPED), "ms")
    assert len(written) == len(expected)
    assert capsys.readouterr().out.count("wrote ") == len(written)
    for path in SHIPPED:  # every CSV, train_step.csv included, has at least one figure
        op = os.path.basename(path).removesuffix(".csv")
        assert any(name.startswith(op + "_") for name in written), (op, written)
    for name in written:
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and min(img.size) > 100


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def _step(arch, kernels, ms, commit="a"):
    return {"op": "train_step", "arch": arch, "kernels": kernels, "batch": 64,
            "image_size": 32, "classes": 10, "amp": "float32", "channels_last": "False",
            "ms": ms, "vs_reference": "", "device": "cpu", "device_name": "CPU (2 cores)",
            "commit": commit}


def test_train_step_rows_last_wins_and_one_figure(tmp_path):
    path = _write(tmp_path / "train_step.csv", [
        _step("resnet20", "fused", 10), _step("se_resnet20", "fused", 12),
        _step("se_resnet20", "reference", 15), _step("resnet20", "fused", 11, commit="b")])
    rows = plot.load([path])
    assert [(r["arch"], r["kernels"], r["ms"]) for r in rows] == [
        ("resnet20", "fused", "11"), ("se_resnet20", "fused", "12"),
        ("se_resnet20", "reference", "15")]
    assert [r["ms"] for r in plot.load([path], commit="a")] == ["10", "12", "15"]
    written = plot.plot(rows, "ms", str(tmp_path / "png"))
    assert [os.path.basename(p) for p in written] == ["train_step_cpu_b64_32px_float32.png"]


def test_no_rows_with_the_metric_is_an_error(tmp_path, capsys):
    path = _write(tmp_path / "train_step.csv", [_step("resnet20", "fused", 10)])
    assert plot.main([path, "--metric", "vs_reference", "--out-dir", str(tmp_path)]) == 1
    assert "no rows with a 'vs_reference' value" in capsys.readouterr().err
