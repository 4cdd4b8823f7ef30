"""The CUDA half of the kernel report: the host-side launch-plan op (in every build),
the cuobjdump parsers, and, on a build with sm_90 CUDA kernels (CI's), a record with
resources for every planned kernel."""

import math
import os
import sys

import pytest
import torch

import manet_kernels._ext as ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import kernel_report_common as common  # noqa: E402
import kernel_report_cuda as krc  # noqa: E402

requires_plan = pytest.mark.skipif(
    not ext.HAS_EXT or "_cuda_launch_plan" not in ext.KERNELS,
    reason=f"needs the compiled extension with _cuda_launch_plan ({ext.EXT_ERROR})")


def _all_calls(op, dtype=torch.bfloat16):
    return krc.op_calls(op, common.QUICK_SHAPES[op][0], dtype)


@requires_plan
@pytest.mark.parametrize("op", common.OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cl", [False, True])
def test_plan_launches_are_plausible(op, dtype, cl):
    for name, shape, dt, params, _ in _all_calls(op, dtype):
        launches = krc.plan(name, shape, dt, cl, params)
        assert launches, name
        for la in launches:
            assert all(g >= 1 for g in la["grid"]) and math.prod(la["grid"]) < 2**31, (name, la)
            assert la["threads"] % 32 == 0 and 32 <= la["threads"] <= 1024, (name, la)
            assert 0 <= la["dyn_smem"] <= krc.SMEM_OPTIN, (name, la)


@requires_plan
@pytest.mark.parametrize("shape", [(64, 64, 56, 56), (2, 96, 9, 7)])
def test_plan_aw_forward_grid(shape):
    # One block per 64 output positions x 64 output channels of one sample (3x3, pad 1:
    # output size = input size), on tensor cores for bf16 from sm_80, FMA tiles for fp32.
    n, c, h, w = shape
    conv = (c, 3, 3, 1, 1, 1, 1, 1, 1, 1)
    blocks = n * math.ceil(h * w / 64) * math.ceil(c / 64)
    for dtype, args in ((torch.bfloat16, "c10::BFloat16, WmmaCore<__nv_bfloat16>"),
                        (torch.float32, "float, FmaCore<float>")):
        (la,) = krc.plan("aw_conv2d_fwd", shape, dtype, False, conv)
        assert la["kernel"] == f"_aw_conv2d_fwd_kernel<{args}, true>"
        assert la["grid"] == (blocks, 1, 1) and la["threads"] == 256


@requires_plan
def test_plan_follows_the_gpu_description():
    conv = (64, 3, 3, 1, 1, 1, 1, 1, 1, 1)
    # bf16 has no tensor-core tiles before sm_80 (the launcher's use_tensor_cores)
    names, _ = torch.ops.manet_kernels._cuda_launch_plan(
        "aw_conv2d_fwd", [2, 64, 8, 8], torch.bfloat16, False, list(conv), 132, 7, 232448, [],
        [])
    assert names == ["_aw_conv2d_fwd_kernel<c10::BFloat16, FmaCore<float>, true>"]
    # The spatial conv's forward: one thread per map position, 256 per block.
    (la,) = krc.plan("mixed_attention_spatial_conv", (4, 30, 30), torch.float32, False, (7, 1))
    assert la["grid"] == (math.ceil(4 * 30 * 30 / 256), 1, 1) and la["threads"] == 256


@requires_plan
def test_plan_brnpa_reduce_takes_occupancy():
    # The reduce launch is one resident wave of blocks (occupancy x 132 SMs) split over
    # the samples, at most one block per position tile.
    shape = (64, 2048, 14, 14)
    (la, fin) = krc.plan("brnpa_step", shape, torch.bfloat16, False)[1:]
    assert la["occupancy"] == 1 and la["grid"] == (64 * (132 // 64), 1, 1)
    assert fin["kernel"] == "_brnpa_finalize_kernel<float>" and fin["grid"] == (64, 1, 1)
    (la2, _) = krc.plan("brnpa_step", shape, torch.bfloat16, False, occ={la["kernel"]: 3})[1:]
    assert la2["occupancy"] == 2 and la2["grid"] == (64 * (3 * 132 // 64), 1, 1)


@requires_plan
def test_plan_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="unknown op"):
        krc.plan("mixed_attention_nope", (2, 8, 4, 4), torch.float32, False)
    with pytest.raises(RuntimeError, match="shape"):
        krc.plan("brnpa_norms", (2, 0, 4, 4), torch.float32, False)
    with pytest.raises(RuntimeError, match="params"):
        krc.plan("brnpa_bwd_reduce", (2, 8, 4, 4), torch.float32, False)


def test_parsers():
    usage = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
Resource usage:
 Function _Z3fooi:
  REG:168 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0
Fatbin elf code:
================
arch = sm_80
 Function _Z3fooi:
  REG:99 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert krc.parse_resource_usage(usage) == {
        "_Z3fooi": {"regs": 168, "stack_bytes": 16, "smem_bytes": 1024, "local_bytes": 0}}
    sass = """
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E R8, desc[UR4][R2.64+0x10] ;
        /*0030*/               @P0 STL.64 [R1+0x8], R4 ;
        /*0040*/                   STL [R1], R9 ;
        /*0050*/                   HMMA.16816.F32.BF16 R12, R16, R20, R12 ;
"""
    st = krc.sass_stats(sass)
    assert st["spill_bytes"] == 12 and st["mma"] == "mma.sync" and st["mma_n"] == 8
    assert st["vec16_load_share"] == 0.5 and st["pipelined"] is False
    assert krc.short_name("void manet_kernels::(anonymous namespace)::k<c10::BFloat16, "
                          "manet_kernels::(anonymous namespace)::WmmaCore<__nv_bfloat16>, "
                          "true>(manet_kernels::(anonymous namespace)::A<float>)") == \
        "k<c10::BFloat16, WmmaCore<__nv_bfloat16>, true>"


def _cuda_report_ready() -> str | None:
    if not ext.HAS_CUDA_KERNELS:
        return "the extension has no CUDA kernels (CPU-only build)"
    if krc.cuobjdump() is None or krc.shutil.which("c++filt") is None:
        return "needs cuobjdump and c++filt"
    return None


@requires_plan
def test_records_quick_covers_every_planned_kernel(capsys):
    reason = _cuda_report_ready()
    if reason is not None:
        # The report degrades to no CUDA rows, and says how to get them.
        assert krc.records(list(common.OPS), quick=True) == []
        assert "MANET_KERNELS_CUDA=1" in capsys.readouterr().err
        pytest.skip(reason)
    recs = krc.records(list(common.OPS), quick=True)
    for op in common.OPS:
        planned = {krc.readable(la["kernel"]) for call in _all_calls(op)
                   for la in krc.plan(call[0], call[1], call[2], False, call[3])}
        got = {r["kernel"] for r in recs if r["op"] == op}
        assert planned <= got, (op, planned - got)
    for r in recs:
        assert set(common.FIELDS) <= set(r) and r["backend"] == "cuda"
        assert r["regs"] and r["regs"] > 0 and r["ctas_per_sm"] >= 1, r
        assert r["waves"] > 0 and r["spill_bytes"] >= 0 and r["stack_bytes"] >= 0, r
        assert "no sm_90 cubin" not in (r.get("note") or ""), r
    aw = [r for r in recs if r["kernel"].startswith("_aw_conv2d_") and "bf16" in r["kernel"]]
    assert aw and all(r["mma"] == "mma.sync" for r in aw), aw
