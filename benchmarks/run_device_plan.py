"""The CPU side of benchmarks/run_device.sh: its dry-run checks and its step record.

    python benchmarks/run_device_plan.py check PLAN.tsv [--csv CSV] [--total S] [--quick]
    python benchmarks/run_device_plan.py record device_run.tar.gz [--csv CSV]

``check`` reads the plan that ``run_device.sh --dry-run`` writes (one step a line:
run, lane, step, cap seconds, kind, then the kind's words) and checks it without a
GPU: every file exists; every Python script answers ``--help`` and lists each option
the plan passes it; every pytest selection (files and ``-k``) collects at least one
test *as on a GPU machine* (see :func:`pretend_gpu`); each run's caps fit ``--total``
(lane A in sequence, lane B beside it, joined before the timed steps). It prints
each step's cap and the time of its last recorded run in ``--csv``, and exits 1
naming every check that failed.

``record`` appends the ``steps.csv`` of a fetched device tarball to ``--csv``
(default: benchmarks/results/device_steps.csv), skipping rows already there.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CSV = os.path.join(ROOT, "benchmarks", "results", "device_steps.csv")
# run_device.sh writes the same header into the tarball's steps.csv
COLUMNS = ["date_utc", "commit", "device", "run", "step", "seconds", "limit", "rc"]
KINDS = ("fn", "py", "bench", "pytest", "join")


@dataclass
class Step:
    run: str
    lane: str
    name: str
    cap: int
    kind: str
    words: list[str]
    checks: list[str] = field(default_factory=list)  # what passed, for the table
    errors: list[str] = field(default_factory=list)


def read_plan(path: str) -> list[Step]:
    steps = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 5 or cols[4] not in KINDS or not cols[3].isdigit():
                raise SystemExit(f"{path}:{n}: expected run, lane, step, cap, kind, words; "
                                 f"got {line.strip()!r}")
            steps.append(Step(cols[0], cols[1], cols[2], int(cols[3]), cols[4], cols[5:]))
    return steps


# --------------------------------------------------------------------------- checks


def check_files(step: Step) -> list[str]:
    """The files a step names: fn steps list theirs, py/bench steps start with the
    script, pytest steps give ``-k`` then the test files."""
    files = {"fn": step.words[1:], "pytest": step.words[1:], "py": step.words[:1],
             "bench": step.words[:1]}.get(step.kind, [])
    missing = [f for f in files if not os.path.exists(os.path.join(ROOT, f))]
    for f in missing:
        step.errors.append(f"missing file {f}")
    return [f for f in files if f not in missing]


def script_help(python: str, script: str) -> tuple[int, str]:
    p = subprocess.run([python, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stdout + p.stderr


def check_options(step: Step, rc: int, text: str) -> None:
    """``--help`` exits 0 and lists every ``--option`` and every choice the step passes."""
    if rc != 0:
        step.errors.append(f"{step.words[0]} --help exited {rc}: {text.strip()[-300:]}")
        return
    for word in step.words[1:]:
        if word.startswith("--"):
            if not re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text):
                step.errors.append(f"{step.words[0]} --help does not list {word}")
        elif re.fullmatch(r"[a-z_]+", word) and not re.search(rf"\b{word}\b", text):
            step.errors.append(f"{step.words[0]} --help does not list the value {word!r}")
    if not step.errors:
        step.checks.append("--help lists its options")


def pretend_gpu() -> None:
    """Make this process collect tests as a GPU machine with the CUDA build would:
    the GPU test modules skip themselves at import without one, and parametrise over
    bf16 and the cuda backend only with one. Nothing is run, only collected, so no
    kernel is ever launched. Must run before conftest and the test modules import."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    from manet_kernels import _ext
    cpu_kernel = _ext.has_kernel
    _ext.HAS_CUDA_KERNELS = True
    _ext.has_kernel = lambda op, device_type: device_type == "cuda" or cpu_kernel(op, device_type)


class _Counter:
    """pytest plugin: after collection, counts the items each selection picks with
    pytest's own ``-k`` matching, then deselects everything."""

    def __init__(self, selections):
        self.selections = selections  # (files as absolute paths, -k expression)
        self.counts = [0] * len(selections)
        self.errors: list[tuple[str, str]] = []  # (file or "", message)

    def pytest_collection_modifyitems(self, items):
        from _pytest.mark import KeywordMatcher
        from _pytest.mark.expression import Expression
        exprs = []
        for _, k in self.selections:
            try:
                exprs.append(Expression.compile(k))
            except Exception as e:  # noqa: BLE001 -- pytest's ParseError, whatever its class
                exprs.append(None)
                self.errors.append(("", f"-k {k!r}: {e}"))
        for item in items:
            path = str(item.path)
            matcher = KeywordMatcher.from_item(item)
            for i, ((files, _), expr) in enumerate(zip(self.selections, exprs)):
                if expr is not None and path in files and expr.evaluate(matcher):
                    self.counts[i] += 1
        items[:] = []

    def pytest_collectreport(self, report):
        if report.failed:
            self.errors.append((report.nodeid.split("::")[0], str(report.longrepr)))


def check_selections(steps: list[Step]) -> None:
    """One in-process collection of every test file the pytest steps name."""
    chosen = [s for s in steps if s.kind == "pytest" and not s.errors]
    if not chosen:
        return
    sels = [({os.path.join(ROOT, f) for f in s.words[1:]}, s.words[0]) for s in chosen]
    files = sorted(set().union(*(f for f, _ in sels)))
    pretend_gpu()
    import pytest
    counter = _Counter(sels)
    out = io.StringIO()
    stdout, sys.stdout = sys.stdout, out  # pytest's own report is not ours to print
    try:
        pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", ROOT, *files],
                    plugins=[counter])
    finally:
        sys.stdout = stdout
    for s, n in zip(chosen, counter.counts):
        if n == 0:
            s.errors.append(f"-k {s.words[0]!r} collects no test from {' '.join(s.words[1:])}")
        else:
            s.checks.append(f"{n} tests")
    for path, message in counter.errors:
        for s in chosen:
            if path in s.words[1:] or not path:
                note_collection_error(s, path, message)


# The one error pretend_gpu() cannot avoid: a module that makes CUDA tensors while it is
# imported collects only on a real GPU. Its tests are not counted, the rest still are.
NO_DRIVER = "Found no NVIDIA driver"


def note_collection_error(step: Step, path: str, message: str) -> None:
    if NO_DRIVER in message:
        step.checks.append(f"{path} not counted: it makes CUDA tensors at import, so it "
                           "collects only on a GPU")
    else:
        step.errors.append(f"collecting {path}: {message[-400:]}")


def check_budget(steps: list[Step], total: int, reserve: int, last: dict[str, dict]
                 ) -> list[str]:
    """Per run: lane A in sequence plus the packing reserve fits ``total``; lane B
    starts where its first step stands in lane A's order and ends by the join."""
    errors = []
    for run in dict.fromkeys(s.run for s in steps):
        a_time, b_start, b_sum, joined_at = 0, None, 0, None
        recorded = [int(last[s.name]["seconds"]) for s in steps
                    if s.run == run and s.lane == "A" and s.name in last]
        for s in (s for s in steps if s.run == run):
            if s.lane == "B":
                b_start = a_time if b_start is None else b_start
                b_sum += s.cap
            elif s.kind == "join":
                joined_at = a_time
            else:
                a_time += s.cap
        if a_time + reserve > total:
            errors.append(f"run {run}: lane A caps {a_time}s + {reserve}s to pack exceed "
                          f"the {total}s budget")
        if b_start is not None:
            if joined_at is None:
                errors.append(f"run {run}: lane B steps but no join before the timed steps")
            elif b_start + b_sum > joined_at:
                errors.append(f"run {run}: lane B ends at {b_start + b_sum}s, after the "
                              f"join at {joined_at}s")
        print(f"run {run}: lane A {a_time}s + {reserve}s to pack of {total}s"
              + (f"; lane B {b_start}..{b_start + b_sum}s, joined at {joined_at}s"
                 if b_start is not None else "")
              + (f"; last recorded lane A steps took {sum(recorded)}s ({len(recorded)} steps)"
                 if recorded else ""))
    return errors


def last_recorded(path: str) -> dict[str, dict]:
    """step -> its last row in the record that ran (rc not 'skipped')."""
    last: dict[str, dict] = {}
    if os.path.exists(path):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("rc") not in (None, "", "skipped"):
                    last[row["step"]] = row
    return last


def estimate(row: dict | None) -> str:
    if row is None:
        return "no recorded run"
    return (f"{row['seconds']}s (rc {row['rc']}, limit {row['limit']}, {row['device']}, "
            f"{row['commit']}, {row['date_utc'][:10]})")


def check(args) -> int:
    steps = read_plan(args.plan)
    scripts = {}
    for s in steps:
        present = check_files(s)
        if s.kind in ("py", "bench") and present and not args.quick:
            scripts.setdefault(s.words[0], []).append(s)
    # the scripts' --help runs (each imports torch) overlap the test collection
    with ThreadPoolExecutor(max_workers=4) as pool:
        helps = {p: pool.submit(script_help, args.python, p) for p in scripts}
        if not args.quick:
            check_selections(steps)
        for script, users in scripts.items():
            for s in users:
                check_options(s, *helps[script].result())
    last = last_recorded(args.csv)
    budget_errors = check_budget(steps, args.total, args.reserve, last)
    print(f"\n{'run':>3} {'lane':4} {'step':32} {'cap':>5}  last recorded / checks")
    for s in steps:
        if s.kind == "join":
            print(f"{s.run:>3} {'':4} {'(lane B joins here)':32}")
            continue
        print(f"{s.run:>3} {s.lane:4} {s.name:32} {s.cap:>4}s  {estimate(last.get(s.name))}")
        for c in s.checks:
            print(f"{'':45}ok: {c}")
        for e in s.errors:
            print(f"{'':45}FAILED: {e}")
    errors = [f"{s.name}: {e}" for s in steps for e in s.errors] + budget_errors
    if errors:
        print(f"\ndry run: {len(errors)} check(s) failed:\n  " + "\n  ".join(errors))
        return 1
    print("\ndry run: every check passed" + (" (--quick: files and budget only)"
                                             if args.quick else ""))
    return 0


# --------------------------------------------------------------------------- record


def read_steps_csv(tarball: str) -> list[list[str]]:
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if os.path.basename(m.name) == "steps.csv"]
        if not members:
            raise SystemExit(f"{tarball}: no steps.csv inside (not a run_device.sh tarball?)")
        text = tar.extractfile(members[0]).read().decode()
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0] != COLUMNS:
        raise SystemExit(f"{tarball}: steps.csv header {rows[0] if rows else []} is not "
                         f"{COLUMNS}")
    return rows[1:]


def record(args) -> int:
    new = read_steps_csv(args.tarball)
    old: list[list[str]] = []
    if os.path.exists(args.csv) and os.path.getsize(args.csv):
        with open(args.csv, newline="") as f:
            old = list(csv.reader(f))
        if old[0] != COLUMNS:
            raise SystemExit(f"{args.csv}: header {old[0]} is not {COLUMNS}")
    seen = {tuple(r) for r in old[1:]}
    fresh = [r for r in new if tuple(r) not in seen]
    with open(args.csv, "a", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        if not old:
            w.writerow(COLUMNS)
        w.writerows(fresh)
    print(f"appended {len(fresh)} step rows to {args.csv}"
          + (f" ({len(new) - len(fresh)} already there)" if len(fresh) < len(new) else ""))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="check a dry-run plan")
    c.add_argument("plan")
    c.add_argument("--csv", default=DEFAULT_CSV, help="the step record (default: %(default)s)")
    c.add_argument("--total", type=int, default=480, help="seconds one run may take")
    c.add_argument("--reserve", type=int, default=10, help="seconds kept for packing")
    c.add_argument("--python", default=sys.executable, help="runs each script's --help")
    c.add_argument("--quick", action="store_true",
                   help="files and budget only: no --help runs, no test collection")
    r = sub.add_parser("record", help="append a device tarball's steps.csv to the record")
    r.add_argument("tarball")
    r.add_argument("--csv", default=DEFAULT_CSV, help="the step record (default: %(default)s)")
    args = ap.parse_args(argv)
    return check(args) if args.cmd == "check" else record(args)


if __name__ == "__main__":
    sys.exit(main())
