"""Smoke test of the AW benchmark script's CPU path: interleaved rounds, one row per
provider and mode, ratios from the medians, nothing appended to benchmarks/results."""

import json
import math
import os
import sys

import pytest
import torch

import manet_kernels._ext as ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_aw_conv2d as bac  # noqa: E402
import utils as bu  # noqa: E402


@pytest.mark.skipif(not ext.HAS_EXT, reason="needs the compiled extension")
def test_aw_benchmark_rounds(tmp_path):
    results = os.path.join(bu.RESULTS_DIR, "aw_conv2d.csv")
    before = os.path.getsize(results) if os.path.exists(results) else None
    threads = torch.get_num_threads()
    try:
        rc = bac.main(["--device", "cpu", "--shapes", "2x16x7x7", "--providers", "reference",
                       "plain_conv", "cpu", "--modes", "forward", "full", "--rounds", "3",
                       "--quick", "--no-save", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    after = os.path.getsize(results) if os.path.exists(results) else None
    assert after == before, "--no-save appended to benchmarks/results"
    with open(tmp_path / "aw_conv2d.json") as f:
        rows = json.load(f)["rows"]
    got = {(r["provider"], r["mode"]) for r in rows}
    assert got == {(p, m) for p in ("reference", "plain_conv", "cpu")
                   for m in ("forward", "full")}
    for r in rows:
        assert r["ms"] > 0 and "rounds=3" in r["params"], r
        if r["provider"] == "cpu":
            assert math.isfinite(r["speedup_vs_ref"]) and math.isfinite(r["speedup_vs_plain"])
            assert r["max_abs_err"] < 1e-4
    by = {(r["provider"], r["mode"]): r for r in rows}
    for m in ("forward", "full"):
        ratio = by[("reference", m)]["ms"] / by[("cpu", m)]["ms"]
        assert by[("cpu", m)]["speedup_vs_ref"] == pytest.approx(ratio)


def test_rounds_default():
    class Args:
        rounds = 0
        quick = False
    assert bac.rounds_for(Args, torch.device("cpu")) == 5
    assert bac.rounds_for(Args, torch.device("cuda")) == 1
    Args.quick = True
    assert bac.rounds_for(Args, torch.device("cpu")) == 1
    Args.rounds = 4
    assert bac.rounds_for(Args, torch.device("cuda")) == 4
