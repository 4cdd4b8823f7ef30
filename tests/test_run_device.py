"""benchmarks/run_device.sh without a GPU: its dry run checks the plan and prints every
step, a broken plan fails it, a CPU-only run still leaves its tarball and step record,
and --record appends a run's step times to a copy of the record (never the committed
one)."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "run_device.sh")
PLAN_HELPER = os.path.join(ROOT, "benchmarks", "run_device_plan.py")
RECORD = os.path.join(ROOT, "benchmarks", "results", "device_steps.csv")
HEADER = ["date_utc", "commit", "device", "run", "step", "seconds", "limit", "rc"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run_script(*args, **env):
    full = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=600)


def planned_steps():
    """(run, lane, step, cap) of every `add` line of the script."""
    with open(SCRIPT) as f:
        return re.findall(r"^add (\d) ([AB]) (\S+) (\d+) (?!join)", f.read(), re.M)


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    if shutil.which("shellcheck"):
        p = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout


def test_dry_run_checks_the_plan_and_prints_every_step():
    p = run_script("--dry-run")
    assert p.returncode == 0, p.stdout + p.stderr
    steps = planned_steps()
    assert {r for r, *_ in steps} == {"1", "2", "3"}
    for run, lane, step, cap in steps:
        line = rf"^\s*{run} {lane}\s+{re.escape(step)}\s+{cap}s  "
        assert re.search(line + r"(no recorded run|\d+s \(rc )", p.stdout, re.M), step
    # each test step reports what it collects as on a GPU, each script its --help
    assert len(re.findall(r"ok: \d+ tests", p.stdout)) == sum(
        1 for *_, s, _ in steps if s.startswith("tests-"))
    assert "ok: --help lists its options" in p.stdout
    assert "dry run: every check passed" in p.stdout
    assert "lane B 15..345s, joined at 360s" in p.stdout


def test_dry_run_fails_on_a_missing_script():
    p = run_script("--dry-run", BENCH_DIR="benchmarks/no_such_dir", DRY_RUN_QUICK="1")
    assert p.returncode == 1
    assert "missing file benchmarks/no_such_dir/bench_mixed_attention.py" in p.stdout
    assert "missing file benchmarks/no_such_dir/profile_device.py" in p.stdout


def test_dry_run_fails_when_the_caps_exceed_the_budget():
    p = run_script("--dry-run", TOTAL_S="300", DRY_RUN_QUICK="1")
    assert p.returncode == 1
    assert "run 1: lane A caps 470s + 10s to pack exceed the 300s budget" in p.stdout


def test_unknown_step_names_are_refused(tmp_path):
    p = run_script("--dry-run", STEPS="env no-such-step")
    assert p.returncode == 1 and "STEPS names no step of the plan: no-such-step" in p.stderr
    p = run_script(OUT=str(tmp_path / "out"), RUN="3", STEPS="build")
    assert p.returncode == 2 and "STEPS names no step of run 3: build" in p.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_last_recorded_time(tmp_path):
    record = tmp_path / "record.csv"
    record.write_text(",".join(HEADER) + "\n"
                      "2026-12-07T01:00:00Z,abc1234,NVIDIA H100 80GB HBM3,1,build,97,180,0\n"
                      "2026-12-07T02:00:00Z,def5678,NVIDIA H200,1,build,88,180,0\n"
                      "2026-12-07T02:00:00Z,def5678,NVIDIA H200,1,ext,0,15,skipped\n")
    p = run_script("--dry-run", RECORD_CSV=str(record), DRY_RUN_QUICK="1")
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"1 A\s+build\s+180s  88s \(rc 0, limit 180, NVIDIA H200, def5678, "
                     r"2026-12-07\)", p.stdout)
    assert re.search(r"1 A\s+ext\s+15s  no recorded run", p.stdout)
    assert "run 1: lane A 470s + 10s to pack of 480s; lane B 15..345s, joined at 360s; " \
           "last recorded lane A steps took 88s (1 steps)" in p.stdout


def test_selection_that_collects_nothing_fails(tmp_path):
    tests = tmp_path / "test_sample.py"
    tests.write_text("def test_matches():\n    pass\n\n\ndef test_other():\n    pass\n")
    plan = tmp_path / "plan.tsv"
    plan.write_text(f"1\tA\tgood\t10\tpytest\tmatches\t{tests}\n"
                    f"1\tA\tempty\t10\tpytest\tno_such_name\t{tests}\n")
    p = subprocess.run([sys.executable, PLAN_HELPER, "check", str(plan), "--csv",
                        str(tmp_path / "none.csv")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert re.search(r"good .*\n.*ok: 1 tests", p.stdout)
    assert "empty: -k 'no_such_name' collects no test" in p.stdout


def make_tarball(path, rows, name="./steps.csv"):
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    data = text.getvalue().encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_record_appends_a_runs_steps_once(tmp_path):
    committed = open(RECORD, "rb").read()
    record = tmp_path / "device_steps.csv"
    shutil.copy(RECORD, record)
    rows = [["2026-12-07T01:00:00Z", "abc1234", "NVIDIA H100 80GB HBM3", "1", "build", "97",
             "180", "0"],
            ["2026-12-07T01:00:00Z", "abc1234", "NVIDIA H100 80GB HBM3", "1", "tests-never",
             "40", "40", "124"]]
    tarball = tmp_path / "device_run.tar.gz"
    make_tarball(tarball, [HEADER, *rows])
    before = read_rows(record)
    p = run_script("--record", str(tarball), str(record))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "appended 2 step rows" in p.stdout
    assert read_rows(record) == before + rows
    p = run_script("--record", str(tarball), str(record))
    assert "appended 0 step rows" in p.stdout and "(2 already there)" in p.stdout
    assert read_rows(record) == before + rows
    assert open(RECORD, "rb").read() == committed


def test_record_refuses_a_tarball_without_steps(tmp_path):
    tarball = tmp_path / "other.tar.gz"
    make_tarball(tarball, [["a", "b"]], name="./summary.txt")
    p = run_script("--record", str(tarball), str(tmp_path / "record.csv"))
    assert p.returncode != 0
    assert "no steps.csv inside" in p.stderr
    assert not (tmp_path / "record.csv").exists()


def test_committed_record_has_the_header():
    assert read_rows(RECORD)[0] == HEADER


def test_a_run_without_a_gpu_still_packs_its_steps(tmp_path):
    """The device-side runner on CPU: the env step (it needs a GPU) fails, a lane-B test
    step is stopped by its time box with pytest's summary, the lane is joined, and the
    tarball's steps.csv is what --record takes."""
    out = tmp_path / "out"
    p = run_script(OUT=str(out), STEPS="env tests-triton-fp32", TOTAL_S="28", RESERVE_S="5",
                   MIN_STEP_S="1", MANET_KERNELS_COMMIT="abc1234")
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(os.listdir(out)) == ["device_run.tar.gz", "steps.csv", "summary.txt"]
    rows = read_rows(out / "steps.csv")
    assert rows[0] == HEADER
    assert [r[4] for r in rows[1:]] == ["env", "tests-triton-fp32"]
    env, tests = rows[1:]
    assert env[1] == "abc1234" and env[3] == "1"
    if not torch.cuda.is_available():
        assert env[7] != "0"  # nvidia-smi and the device name need a GPU
    # SIGINT at the limit (10 s more before SIGKILL): pytest reports what it ran
    assert tests[7] == "124" and int(tests[5]) <= int(tests[6]) + 10
    with tarfile.open(out / "device_run.tar.gz") as tar:
        logs = {os.path.basename(m.name): m for m in tar.getmembers()}
        assert {"steps.csv", "summary.txt", "env.log"} <= set(logs)
        log = tar.extractfile(logs["tests-triton-fp32.log"]).read().decode()
    assert "KeyboardInterrupt" in log
    assert "tests-triton-fp32: " in (out / "summary.txt").read_text()
    record = tmp_path / "record.csv"
    shutil.copy(RECORD, record)
    p = run_script("--record", str(out / "device_run.tar.gz"), str(record))
    assert p.returncode == 0 and read_rows(record)[-2:] == rows[1:]
