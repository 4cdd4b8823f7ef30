"""The benchmark scripts' shared harness: the AW script's interleaved rounds (one row
per provider and mode, ratios from the medians), the --help texts, the rule that only
deliberate runs append to benchmarks/results, and the busy-machine note."""

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
import bench_brnpa as bbr  # noqa: E402
import bench_mixed_attention as bma  # noqa: E402
import bench_train_step as bts  # noqa: E402
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


# ----------------------------------------------------- flags, saving rule, busy note

BENCHES = [bma, bbr, bac, bts]


@pytest.mark.parametrize("bench", BENCHES, ids=lambda m: m.OP)
def test_help_shows_the_whole_docstring(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    # The first paragraph's last words: the description no longer stops at line one.
    first_paragraph = bench.__doc__.split("\n\n")[0]
    assert " ".join(first_paragraph.split()) in out
    assert "never appends to benchmarks/results" in out  # --quick's help


class _Args:
    def __init__(self, quick=False, no_save=False, out=None):
        self.quick, self.no_save, self.out = quick, no_save, out


def test_only_deliberate_runs_save(tmp_path):
    results = os.path.join(bu.RESULTS_DIR, "x.csv")
    assert bu.saves_results(_Args()) and not bu.saves_results(_Args(quick=True))
    assert not bu.saves_results(_Args(no_save=True))
    assert bu.Sink("x", ["a"], _Args(), {}).csv_paths == [results]
    quick = bu.Sink("x", ["a"], _Args(quick=True, out=str(tmp_path)), {})
    assert quick.csv_paths == [str(tmp_path / "x.csv")]
    assert quick.notes == ["--quick: a smoke run, not appended to benchmarks/results/x.csv"]
    assert bu.Sink("x", ["a"], _Args(no_save=True), {}).csv_paths == []


def test_quick_run_leaves_results_alone(tmp_path):
    results = os.path.join(bu.RESULTS_DIR, "mixed_attention.csv")
    with open(results, "rb") as f:
        before = f.read()
    threads = torch.get_num_threads()
    try:
        rc = bma.main(["--device", "cpu", "--quick", "--shapes", "1x16x5x5", "--providers",
                       "reference", "--modes", "forward", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    with open(results, "rb") as f:
        assert f.read() == before, "--quick appended to benchmarks/results"
    with open(tmp_path / "mixed_attention.json") as f:
        rows = json.load(f)["rows"]
    assert [(r["provider"], r["mode"], r["shape"]) for r in rows] == \
        [("reference", "forward", "1x16x5x5")]
    assert (tmp_path / "mixed_attention.csv").read_text().count("\n") == 2  # header + row


def _stat(user, idle, steal=0, cpus=((0, 1),)):
    """A /proc/stat text: the aggregate line and one line per CPU (user, idle split)."""
    def line(name, u, i):
        return f"{name} {u} 0 0 {i} 0 0 0 {steal} 0 0"
    lines = [line("cpu", user, idle)]
    lines += [line(f"cpu{c}", user * share, idle * share) for c, share in cpus]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 5"]) + "\n"


def test_cpu_jiffies_per_cpu_and_aggregate():
    text = "cpu  10 1 2 100 7 1 1 3 5 0\ncpu0 4 0 1 50 3 0 0 1 0 0\ncpu1 6 1 1 50 4 1 1 2 5 0\n"
    # busy = user + nice + system + irq + softirq + steal (guest is inside user)
    assert bu.cpu_jiffies(text, None) == (18, 125)
    assert bu.cpu_jiffies(text, [0]) == (6, 59)
    assert bu.cpu_jiffies(text, [1, 0]) == (18, 125)
    assert bu.cpu_jiffies(text, [7]) == (18, 125)  # no line of its own: the aggregate
    with pytest.raises(ValueError, match="no cpu lines"):
        bu.cpu_jiffies("intr 1\n", None)


def test_busy_note_measures_other_processes_not_the_load_average():
    cpu = torch.device("cpu")

    def reader(*texts):
        it = iter(texts)
        return lambda: next(it)
    cpus = sorted(os.sched_getaffinity(0))
    per_cpu = tuple((c, 1) for c in cpus)
    # Idle: 2 of 200 jiffies busy over the window.
    idle = reader(_stat(100, 1000, cpus=per_cpu), _stat(101, 1199, cpus=per_cpu))
    assert bu.busy_note(cpu, window_s=0.01, read_stat=idle) is None
    # Others keep 60% of the cores busy (steal counts: another VM took the time).
    busy = reader(_stat(100, 1000, cpus=per_cpu), _stat(150, 1040, steal=10, cpus=per_cpu))
    note = bu.busy_note(cpu, window_s=0.01, read_stat=busy)
    assert note is not None and note.startswith(
        f"machine busy (other processes used 60% of {len(cpus)} cores")
    assert bu.busy_note(torch.device("cuda"), read_stat=busy) is None

    def no_proc():
        raise OSError("no /proc")
    assert bu.busy_note(cpu, window_s=0.01, read_stat=no_proc) is None
