"""benchmarks/kernel_report.py: the analysis functions on hand-written PTX / TTGIR /
ptxas output, on a tiny matmul compiled for sm_90 here, the report itself in --quick
mode on one kernel per op, and the merge of the CUDA half.

Compiling needs triton without its interpreter, which tests/conftest.py turns on for
this process on a machine without a GPU: those tests run in a subprocess with a clean
environment."""

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import kernel_report as kr  # noqa: E402
import kernel_report_common as krc  # noqa: E402
import kernel_report_triton as krt  # noqa: E402


def _sm90_skip_reason() -> str | None:
    try:
        import triton  # noqa: F401
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        return f"triton's NVIDIA backend is not importable: {e}"
    if "nvidia" not in backends:
        return "triton has no NVIDIA backend"
    try:
        _ = get_ptxas(krt.TARGET_ARCH).path  # reading it looks the binary up
    except Exception as e:  # the knob raises when no ptxas binary answers
        return f"triton finds no ptxas for sm_{krt.TARGET_ARCH}: {e}"
    return None


needs_sm90 = pytest.mark.skipif(_sm90_skip_reason() is not None,
                                reason=str(_sm90_skip_reason()))


def _run(args, cwd=ROOT, **env_extra) -> subprocess.CompletedProcess:
    """A Python subprocess without TRITON_INTERPRET, with the repo importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.update(env_extra)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


# --------------------------------------------------------------------------- #
# analysis functions on snippets
# --------------------------------------------------------------------------- #

def test_mma_info_snippets():
    wgmma = """
        wgmma.fence.sync.aligned;
        wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, p, 1, 1, 0, 1;
        wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, p, 1, 1, 0, 1;
        wgmma.wait_group.sync.aligned 1;"""
    assert krt.mma_info(wgmma) == ("wgmma", 128)
    mma = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2}, {%r1}, {%r2}, {%f3};"
    assert krt.mma_info(mma) == ("mma.sync", 8)
    assert krt.mma_info("fma.rn.f32 %f1, %f2, %f3, %f4;\nwgmma.fence.sync.aligned;") == (None, None)


_LOOP = """
    %9 = ttg.async_copy_global_to_local %7, %8 : tensor<64x32x!tt.ptr<bf16>> -> <64x32xbf16>
    %acc:3 = scf.for %k = %c0 to %K step %c32 iter_args(%a = %cst, %t0 = %10) -> (tensor<64x64xf32, #mma>{carried})  : i32 {{
      %w = ttg.async_wait %t0 {{num = {num} : i32}} loc(#loc3)
      %d = ttng.warp_group_dot %x, %y, %a {{inputPrecision = 0 : i32, isAsync = true}} : !ttg.memdesc<64x32xbf16>
      %e:3 = ttng.warp_group_dot_wait %d, %x, %y {{pendings = {pendings} : i32}} : tensor<64x64xf32, #mma>
      scf.yield %e#0 : tensor<64x64xf32, #mma>
    }} loc(#loc4)
    %z = ttg.async_wait {{num = 1 : i32}}
"""  # noqa: E501  (TTGIR lines as the compiler writes them)


@pytest.mark.parametrize("carried, num, pendings, expected", [
    (", !ttg.async.token", 1, 0, True),    # two copies in flight (num_stages=3)
    (", !ttg.async.token", 0, 1, True),    # next copy issued while the MMA runs
    (", !ttg.async.token", 0, 0, False),   # copy crosses iterations, but all drained first
    ("", 1, 1, False),                     # no copy crosses an iteration
])
def test_pipelined_snippets(carried, num, pendings, expected):
    ttgir = _LOOP.format(carried=carried, num=num, pendings=pendings)
    assert len(krt.loops(ttgir)) == 1
    assert len(krt.loops(ttgir)[0][1]) == 4  # the body, not the wait after the loop
    assert krt.pipelined(ttgir) is expected


def test_pipelined_without_a_loop():
    assert krt.pipelined("%x = tt.load %p : tensor<128x!tt.ptr<f32>>\ntt.store %q, %x") is None


def test_global_load_bytes_and_vec16_share():
    ptx = """
        @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        @%p2 ld.global.L1::evict_last.v2.b64 { %rd5, %rd6 }, [ %rd2 + 0 ];
        @%p3 ld.global.b32 { %r5 }, [ %rd3 + 0 ];
        ld.global.b16 %rs1, [ %rd4 + 0 ];
        cp.async.cg.shared.global [ %r9 + 0 ], [ %rd7 + 0 ], 0x10, %r10;
        cp.async.ca.shared.global [ %r11 + 0 ], [ %rd8 + 0 ], 4, %r12;
        cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd9, {%r2, %r3}], [%r4];
        cp.async.commit_group;
        cp.async.wait_group 1;
        st.global.v4.b32 [ %rd10 + 0 ], { %r1, %r2, %r3, %r4 };
        // ld.global.b8 in a comment is no load
    """  # noqa: E501  (PTX lines as the compiler writes them)
    assert krt.global_load_bytes(ptx) == [16, 16, 4, 2, 16, 4, 16]
    assert krt.vec16_load_share(ptx) == pytest.approx(4 / 7)
    assert krt.vec16_load_share("st.global.b32 [ %rd1 + 0 ], { %r1 };") is None


def test_parse_ptxas_verbose():
    log = textwrap.dedent("""\
        ptxas info    : 0 bytes gmem
        ptxas info    : Compiling entry function '_k_kernel' for 'sm_90a'
        ptxas info    : Function properties for _k_kernel
            24 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 98304 bytes smem, 400 bytes cmem[0]
        ptxas info    : Compiling entry function '_Z4stepPf' for 'sm_90a'
        ptxas info    : Function properties for _Z4stepPf
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 18 registers, used 0 barriers, 360 bytes cmem[0]
        """)
    assert krc.parse_ptxas_verbose(log) == {
        "_k_kernel": {"regs": 255, "stack": 24, "spill_stores": 40, "spill_loads": 36},
        "_Z4stepPf": {"regs": 18, "stack": 0, "spill_stores": 0, "spill_loads": 0},
    }


def test_table_marks_missing_fields():
    row = krc.record(kernel="_k_kernel", backend="triton", op="brnpa", shape="2x3x4x5",
                     dtype="bfloat16", layout="nchw", config="C16 P128 w4 s3", regs=40,
                     spill_bytes=0, smem_bytes=0, ctas_per_sm=0, grid=8, waves=None, mma=None,
                     mma_n=None, pipelined=None, vec16_load_share=0.5, note="does not fit")
    lines = kr.table([row]).splitlines()
    assert lines[0].split()[:3] == ["backend", "op", "kernel"]
    assert lines[1].split()[2:6] == ["k", "2x3x4x5", "bf16", "NCHW"]
    assert lines[1].split()[-5:] == ["-", "-", "-", "-", "0.50"]
    assert lines[-1].endswith("does not fit")


# --------------------------------------------------------------------------- #
# the CUDA half's merge (no compile)
# --------------------------------------------------------------------------- #

def _cuda_row(kernel="step_kernel"):
    return krc.record(kernel=kernel, backend="cuda", op="brnpa", shape="64x2048x14x14",
                      dtype="bfloat16", layout="nchw", regs=32, spill_bytes=0, smem_bytes=0,
                      ctas_per_sm=16, grid=128, waves=0.06)


def test_cuda_half_is_merged(monkeypatch, tmp_path, capsys):
    calls = []

    def records(ops, quick):
        calls.append((ops, quick))
        return [_cuda_row("step_kernel"), _cuda_row("norms_kernel")]
    monkeypatch.setitem(sys.modules, "kernel_report_cuda", types.SimpleNamespace(records=records))
    out = tmp_path / "r.json"
    assert kr.main(["--backend", "cuda", "--op", "brnpa", "--quick", "--kernel", "step",
                    "--json", str(out)]) == 0
    assert calls == [(["brnpa"], True)]
    assert json.loads(out.read_text()) == [_cuda_row("step_kernel")]
    assert "step" in capsys.readouterr().out


@pytest.mark.parametrize("module", [None, types.SimpleNamespace(records=lambda ops, quick: [])],
                         ids=["missing", "empty"])
def test_cuda_half_absent_or_empty_is_a_note(monkeypatch, tmp_path, capsys, module):
    monkeypatch.setitem(sys.modules, "kernel_report_cuda", module)  # None: import fails
    out = tmp_path / "r.json"
    assert kr.main(["--backend", "cuda", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == []
    assert "note: " in capsys.readouterr().err


def test_report_refuses_the_interpreter():
    proc = _run([os.path.join("benchmarks", "kernel_report.py"), "--backend", "triton", "--quick"],
                TRITON_INTERPRET="1")
    assert proc.returncode == 2, proc.stderr
    assert "TRITON_INTERPRET" in proc.stderr


# --------------------------------------------------------------------------- #
# compiled for sm_90 here
# --------------------------------------------------------------------------- #

_TINY_MATMUL = '''
import json, sys
import torch
import triton
import triton.language as tl
sys.path.insert(0, {bench!r})
import kernel_report_triton as krt


@triton.jit
def _mm_kernel(a, b, c, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               IEEE: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        x = tl.load(a + rm[:, None] * K + (k + rk)[None, :])
        y = tl.load(b + (k + rk)[:, None] * BN + rn[None, :])
        if IEEE:
            acc = tl.dot(x, y, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, y, acc)
    tl.store(c + rm[:, None] * BN + rn[None, :], acc)


out = {{}}
for name, dtype, stages in (("bf16_s3", torch.bfloat16, 3), ("bf16_s1", torch.bfloat16, 1),
                            ("fp32_s1", torch.float32, 1)):
    a = torch.empty(128, 256, dtype=dtype)
    c = torch.empty(128, 64, dtype=torch.float32)
    with krt.sm90_target():
        ck = _mm_kernel.warmup(a, a, c, 256, BM=128, BN=64, BK=32, IEEE=dtype == torch.float32,
                               grid=(1,), num_warps=4, num_stages=stages)
    out[name] = krt.analyse(ck)
print(json.dumps(out))
'''


@needs_sm90
def test_triton_tiny_matmul_analysis(tmp_path):
    script = tmp_path / "tiny_matmul.py"
    script.write_text(_TINY_MATMUL.format(bench=os.path.join(ROOT, "benchmarks")))
    proc = _run([str(script)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, facts in res.items():
        assert facts["regs"] > 0 and facts["spill_bytes"] >= 0 and facts["threads"] == 128, name
    # bf16 tl.dot on sm_90: warpgroup MMA with the tile's N; three stages keep copies in
    # flight across iterations, one stage waits for every load.
    assert (res["bf16_s3"]["mma"], res["bf16_s3"]["mma_n"]) == ("wgmma", 64)
    assert res["bf16_s3"]["pipelined"] is True
    assert res["bf16_s1"]["pipelined"] is False
    assert res["bf16_s3"]["smem_bytes"] > res["bf16_s1"]["smem_bytes"]
    # Aligned rows of 32 bf16: every global load moves 16 bytes.
    assert res["bf16_s3"]["vec16_load_share"] == 1.0
    assert res["bf16_s1"]["vec16_load_share"] == 1.0
    # fp32 at input_precision="ieee" runs on the FMA units: no matrix instruction.
    assert (res["fp32_s1"]["mma"], res["fp32_s1"]["mma_n"]) == (None, None)


# One kernel per op: the AW weight gradient is the one whose grid the host sizes from
# the GPU's SM count.
QUICK_KERNELS = {"mixed_attention": "channel_pool", "aw_conv2d": "bwd_weight",
                 "brnpa": "brnpa_prepare"}


def _check_row(r):
    assert set(krc.FIELDS) <= set(r), r
    assert r["backend"] == "triton" and r["note"] is None, r
    assert r["regs"] > 0 and r["spill_bytes"] >= 0 and r["smem_bytes"] >= 0, r
    assert r["ctas_per_sm"] >= 1, r
    assert r["grid"] > 0 and r["waves"] == pytest.approx(
        r["grid"] / (krc.H100["sms"] * r["ctas_per_sm"])), r
    assert r["mma"] in (None, "wgmma", "mma.sync"), r
    assert (r["mma_n"] is None) == (r["mma"] is None), r
    assert r["pipelined"] in (None, True, False), r
    assert r["vec16_load_share"] is None or 0.0 <= r["vec16_load_share"] <= 1.0, r


@needs_sm90
def test_triton_kernel_report_quick(tmp_path):
    out = tmp_path / "report.json"
    args = [os.path.join("benchmarks", "kernel_report.py"), "--backend", "triton", "--quick",
            "--json", str(out)]
    for kernel in QUICK_KERNELS.values():
        args += ["--kernel", kernel]
    proc = _run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert sorted(r["op"] for r in rows) == sorted(QUICK_KERNELS), rows
    for r in rows:
        _check_row(r)
        assert QUICK_KERNELS[r["op"]] in r["kernel"]
        assert (r["shape"], r["dtype"], r["layout"]) == (
            krc.shape_str(krc.QUICK_SHAPES[r["op"]][0]), "bfloat16", "channels_last")
        assert r["kernel"].strip("_").removesuffix("_kernel") in proc.stdout
    aw = next(r for r in rows if r["op"] == "aw_conv2d")
    assert aw["mma"] is not None  # a bf16 tl.dot kernel
