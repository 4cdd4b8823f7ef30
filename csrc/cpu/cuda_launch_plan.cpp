// manet_kernels::_cuda_launch_plan: the CUDA kernel launches one call of a CUDA op makes
// at a given shape, computed on the host by the launchers' own planning code
// (csrc/cuda/*_plan.h) for a GPU described by its SM count, compute capability and
// opt-in shared memory per block. Host arithmetic only, so it is in every build
// (CPU-only included); benchmarks/kernel_report_cuda.py joins it with the cubins'
// resource usage. It lives in csrc/cpu because that is what the CPU build compiles.
//
// Assumes every tensor the op allocates or receives is 16-byte aligned (the caching
// allocator's blocks are), so the vector widths are the widest the shape allows.
#include <torch/library.h>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "../cuda/aw_conv2d_plan.h"
#include "../cuda/brnpa_plan.h"
#include "../cuda/mixed_attention_plan.h"

namespace manet_kernels {
namespace {

struct Launch {
  std::string kernel;  // as the demangled symbol reads, namespaces and parameters dropped
  int64_t grid[3] = {1, 1, 1};
  int64_t threads = 0;
  int64_t smem = 0;       // dynamic shared memory the host passes
  int64_t occupancy = 0;  // 0: grid independent of occupancy; 1: from occ, missing; 2: given
};

struct Gpu {
  int sms;
  int cc_major;
  size_t smem_optin;
  std::vector<std::string> occ_kernels;
  std::vector<int64_t> occ_ctas;
};

std::string scalar_name(c10::ScalarType t) {
  switch (t) {
    case c10::kBFloat16: return "c10::BFloat16";
    case c10::kHalf: return "c10::Half";
    case c10::kFloat: return "float";
    case c10::kDouble: return "double";
    default: TORCH_CHECK(false, "_cuda_launch_plan: dtype: expected a floating dtype, got ", t);
  }
}

// The accumulation dtype (at::opmath_type) and its size.
std::string acc_name(c10::ScalarType t) {
  return t == c10::kDouble ? "double" : "float";
}
int acc_bytes(c10::ScalarType t) {
  return t == c10::kDouble ? 8 : 4;
}

const char* bool_name(bool v) {
  return v ? "true" : "false";
}

std::string tmpl(const std::string& name, std::initializer_list<std::string> args) {
  std::string s = name + "<";
  bool first = true;
  for (const auto& a : args) {
    s += (first ? "" : ", ") + a;
    first = false;
  }
  return s + ">";
}

Launch launch1d(std::string kernel, int64_t blocks, int threads, int64_t smem = 0) {
  Launch l;
  l.kernel = std::move(kernel);
  l.grid[0] = blocks;
  l.threads = threads;
  l.smem = smem;
  return l;
}

// ---------------------------------------------------------------------------------------
// Mixed attention (csrc/cuda/mixed_attention.cu: run_pass, launch_finalize, spatial conv)

template <int OP, bool CL>
void ma_pass(std::vector<Launch>& out, c10::ScalarType dt, int64_t N, int64_t C, int64_t P,
             const Gpu& gpu) {
  namespace mp = ma_plan;
  const mp::PassPlan pp =
      mp::plan_pass<OP, CL>(N, C, P, static_cast<int>(c10::elementSize(dt)), 0, gpu.sms);
  out.push_back(launch1d(
      tmpl("_mixed_attention_tile_kernel",
           {scalar_name(dt), std::to_string(pp.tile.vec), std::to_string(OP), bool_name(CL)}),
      pp.blocks, mp::kThreads));
  const bool with_max = mp::OpTraits<OP, CL>::kMax;
  for (int64_t total : {pp.row_fin, pp.col_fin}) {
    if (total > 0) {
      out.push_back(
          launch1d(tmpl("_mixed_attention_finalize_kernel", {acc_name(dt), bool_name(with_max)}),
                   mp::finalize_blocks(total), mp::kThreads));
    }
  }
}

template <int OP>
void ma_pass_layout(std::vector<Launch>& out, bool cl, c10::ScalarType dt, int64_t N, int64_t C,
                    int64_t P, const Gpu& gpu) {
  if (cl) {
    ma_pass<OP, true>(out, dt, N, C, P, gpu);
  } else {
    ma_pass<OP, false>(out, dt, N, C, P, gpu);
  }
}

// sa: (N, H, W) in `dt` (the maps' dtype); params = {k, has_bias}.
void ma_spatial_conv(std::vector<Launch>& out, bool bwd, c10::ScalarType dt, at::IntArrayRef shape,
                     at::IntArrayRef params, const Gpu& gpu) {
  namespace mp = ma_plan;
  TORCH_CHECK(shape.size() == 3 && params.size() == 2,
              "_cuda_launch_plan: spatial conv: expected shape (N, H, W) and params (k, "
              "has_bias), got ",
              shape, " and ", params);
  const int64_t P = shape[0] * shape[1] * shape[2], k = params[0];
  const std::string T = scalar_name(dt);
  if (!bwd) {
    out.push_back(launch1d(tmpl("_mixed_attention_spatial_conv_fwd_kernel", {T}),
                           mp::conv_blocks(P), mp::kConvThreads));
    return;
  }
  const int64_t taps = 2 * k * k + (params[1] ? 1 : 0);
  const int64_t S = mp::conv_dw_splits(P, taps, gpu.sms);
  out.push_back(launch1d(tmpl("_mixed_attention_spatial_conv_dmap_kernel", {T}), mp::conv_blocks(P),
                         mp::kConvThreads));
  Launch dw =
      launch1d(tmpl("_mixed_attention_spatial_conv_dw_kernel", {T}), taps, mp::kConvThreads);
  dw.grid[1] = S;
  out.push_back(dw);
  out.push_back(launch1d(tmpl("_mixed_attention_spatial_conv_dw_finalize_kernel", {T}),
                         mp::ceil_div(taps, mp::kConvThreads), mp::kConvThreads));
}

bool mixed_attention(std::vector<Launch>& out, const std::string& op, bool cl, c10::ScalarType dt,
                     at::IntArrayRef shape, at::IntArrayRef params, const Gpu& gpu) {
  namespace mp = ma_plan;
  if (op == "mixed_attention_spatial_conv" || op == "mixed_attention_spatial_conv_bwd") {
    ma_spatial_conv(out, op.back() == 'd', dt, shape, params, gpu);
    return true;
  }
  const int64_t N = shape[0], C = shape[1], P = shape[2] * shape[3];
  if (op == "mixed_attention_channel_pool") {
    ma_pass_layout<mp::kChannelPool>(out, cl, dt, N, C, P, gpu);
  } else if (op == "mixed_attention_spatial_pool") {
    ma_pass_layout<mp::kSpatialPool>(out, cl, dt, N, C, P, gpu);
  } else if (op == "mixed_attention_apply") {
    ma_pass_layout<mp::kApply>(out, cl, dt, N, C, P, gpu);
  } else if (op == "mixed_attention_bwd_reduce") {
    ma_pass_layout<mp::kBwdReduce>(out, cl, dt, N, C, P, gpu);
  } else if (op == "mixed_attention_bwd_channel") {
    ma_pass_layout<mp::kBwdChannel>(out, cl, dt, N, C, P, gpu);
  } else if (op == "mixed_attention_bwd_dx") {
    ma_pass_layout<mp::kBwdDx>(out, cl, dt, N, C, P, gpu);
  } else {
    return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------
// BR-NPA (csrc/cuda/brnpa.cu: run_reduce and the four ops)

int64_t occupancy_of(const Gpu& gpu, const std::string& kernel, int64_t* flag) {
  for (size_t i = 0; i < gpu.occ_kernels.size(); ++i) {
    if (gpu.occ_kernels[i] == kernel) {
      *flag = 2;
      return gpu.occ_ctas[i];
    }
  }
  *flag = 1;
  return 0;
}

void brnpa_reduce(std::vector<Launch>& out, int mode, bool cl, c10::ScalarType dt, int64_t B,
                  int nw, const brnpa_plan::ReducePlan& pl, const Gpu& gpu) {
  namespace bp = brnpa_plan;
  Launch l = launch1d(tmpl("_brnpa_reduce_kernel", {scalar_name(dt), std::to_string(pl.vec),
                                                    std::to_string(mode), bool_name(cl)}),
                      0, bp::kThreads, static_cast<int64_t>(pl.smem));
  const int64_t per_sm = occupancy_of(gpu, l.kernel, &l.occupancy);
  const int64_t nblk =
      bp::reduce_blocks_per_sample(static_cast<int>(per_sm), gpu.sms, B, pl.ntiles);
  l.grid[0] = B * nblk;
  out.push_back(l);
  if (bp::reduce_finalizes(mode, nblk, nw)) {
    out.push_back(launch1d(tmpl("_brnpa_finalize_kernel", {acc_name(dt)}), B * nw, bp::kThreads));
  }
}

bool brnpa(std::vector<Launch>& out, const std::string& op, bool cl, c10::ScalarType dt,
           at::IntArrayRef shape, at::IntArrayRef params, const Gpu& gpu) {
  namespace bp = brnpa_plan;
  const int64_t B = shape[0], C = shape[1], P = shape[2] * shape[3];
  const int elem = static_cast<int>(c10::elementSize(dt));
  const int acc = acc_bytes(dt);
  const int vec = plan_util::pick_vec_bits(cl ? C : P, elem, 0);
  auto check_smem = [&](size_t smem) {
    TORCH_CHECK(smem <= gpu.smem_optin, "_cuda_launch_plan: ", op, " at shape ", shape, " needs ",
                smem, " bytes of shared memory (limit ", gpu.smem_optin, "): the op refuses it");
  };
  if (op == "brnpa_norms") {
    const bp::ReducePlan pl = bp::plan_reduce(cl, C, P, vec, elem, acc, 0, 1);
    check_smem(pl.smem);
    brnpa_reduce(out, bp::kNorms, cl, dt, B, 0, pl, gpu);
  } else if (op == "brnpa_step") {
    out.push_back(launch1d(tmpl("_brnpa_gather_kernel", {scalar_name(dt)}),
                           bp::gather_blocks(B * C), bp::kThreads));
    const bp::ReducePlan pl = bp::plan_reduce(cl, C, P, vec, elem, acc, 1, 1);
    check_smem(pl.smem);
    brnpa_reduce(out, bp::kStep, cl, dt, B, 1, pl, gpu);
  } else if (op == "brnpa_bwd_reduce") {
    TORCH_CHECK(params.size() == 1 && params[0] >= 1,
                "_cuda_launch_plan: brnpa_bwd_reduce: expected params (K,), got ", params);
    for (const bp::BwdChunk& ch :
         bp::plan_bwd_chunks(cl, C, P, vec, elem, acc, params[0], gpu.smem_optin)) {
      check_smem(ch.pl.smem);
      brnpa_reduce(out, bp::kBwd, cl, dt, B, static_cast<int>(ch.nk + ch.with_t), ch.pl, gpu);
    }
  } else if (op == "brnpa_bwd_dx") {
    const int64_t L = cl ? C : P;
    const bp::DxPlan pl = bp::plan_dx(cl, B, C, P, plan_util::pick_vec_bits(L, elem, 0), acc);
    out.push_back(
        launch1d(tmpl("_brnpa_bwd_dx_kernel",
                      {scalar_name(dt), std::to_string(pl.tcol / pl.lanes), bool_name(cl)}),
                 pl.blocks, bp::kThreads, static_cast<int64_t>(pl.smem)));
  } else {
    return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------
// AW-conv and per-sample conv (csrc/cuda/aw_conv2d.cu: ConvLaunch, WgradLaunch, and
// csrc/cuda/aw_conv2d_v2.cuh: wgrad_v2 for aw_conv2d_bwd_v2, which falls back to
// WgradLaunch where the v2 kernel does not take the call)

bool aw_conv2d(std::vector<Launch>& out, const std::string& op_name, bool channels_last,
               c10::ScalarType dt, at::IntArrayRef shape, at::IntArrayRef params, const Gpu& gpu) {
  namespace ap = aw_plan;
  const bool v2 = op_name == "aw_conv2d_bwd_v2" || op_name == "aw_conv2d_fwd_v2";
  const std::string op = v2 ? op_name.substr(0, op_name.size() - 3) : op_name;
  const bool aw = op.rfind("aw_conv2d_", 0) == 0;
  const bool ps = op.rfind("per_sample_conv2d_", 0) == 0;
  if (!aw && !ps) return false;
  const bool bwd = op.size() > 4 && op.compare(op.size() - 4, 4, "_bwd") == 0;
  TORCH_CHECK(bwd || op.compare(op.size() - 4, 4, "_fwd") == 0, "_cuda_launch_plan: unknown op ",
              op);
  TORCH_CHECK(params.size() == 10, "_cuda_launch_plan: ", op,
              ": expected params (C2, kh, kw, stride_h, stride_w, "
              "pad_h, pad_w, dilation_h, dilation_w, groups), got ",
              params);
  const int64_t st[2] = {params[3], params[4]}, pd[2] = {params[5], params[6]},
                dl[2] = {params[7], params[8]};
  const ap::Geo g = ap::make_geo(shape[0], shape[1], shape[2], shape[3], params[0], params[1],
                                 params[2], st, pd, dl, params[9]);
  const bool is16 = dt == c10::kHalf || dt == c10::kBFloat16;
  const bool tc = ap::tensor_cores_for(is16, dt == c10::kHalf, gpu.cc_major);
  const std::string core = tc ? tmpl("WmmaCore", {dt == c10::kHalf ? "__half" : "__nv_bfloat16"})
                              : tmpl("FmaCore", {acc_name(dt)});
  const int bm = tc ? ap::WmmaTile::BM : ap::FmaTile::BM;
  const int bn = tc ? ap::WmmaTile::BN : ap::FmaTile::BN;
  const int bk = tc ? ap::WmmaTile::BK : ap::FmaTile::BK;
  const std::string T = scalar_name(dt);
  const ap::ConvGrid cg = ap::conv_grid(g, bwd, bm, bn);
  const int elem = static_cast<int>(c10::elementSize(dt));
  const std::string conv_v2_core = is16 ? core : tmpl("FmaCoreRm", {"float"});
  if (v2 && !bwd && ap::fwd_v2_supported(g, elem, channels_last, 0, gpu.cc_major)) {
    const ap::FwdV2Grid fg = ap::fwd_v2_grid(g, elem, false);
    out.push_back(launch1d(tmpl("_aw_conv2d_fwd_v2_kernel", {T, conv_v2_core}), fg.blocks,
                           ap::kThreads, fg.smem));
  } else if (v2 && bwd && ap::dx_v2_supported(g, elem, channels_last, 0, gpu.cc_major)) {
    const ap::FwdV2Grid dg = ap::fwd_v2_grid(g, elem, true);
    out.push_back(launch1d(tmpl("_aw_conv2d_dx_v2_kernel", {T, conv_v2_core}), dg.blocks,
                           ap::kThreads, dg.smem));
  } else if (cg.blocks > 0) {
    out.push_back(launch1d(
        tmpl(bwd ? "_aw_conv2d_dx_kernel" : "_aw_conv2d_fwd_kernel", {T, core, bool_name(aw)}),
        cg.blocks, ap::kThreads));
  }
  if (v2 && bwd && ap::wgrad_v2_supported(g, elem, channels_last, 0, gpu.cc_major)) {
    const ap::WgradV2Grid vg = ap::wgrad_v2_grid(g, elem, acc_bytes(dt), gpu.sms);
    const std::string v2core =
        is16 ? tmpl("WmmaCoreKm", {dt == c10::kHalf ? "__half" : "__nv_bfloat16"})
             : tmpl("FmaCore", {acc_name(dt)});
    if (vg.blocks > 0) {
      out.push_back(launch1d(tmpl("_aw_conv2d_wgrad_v2_kernel",
                                  {T, v2core, std::to_string(ap::wgrad_v2_tile(elem).stages)}),
                             vg.blocks, ap::kThreads, vg.smem));
    }
  } else if (bwd) {
    const ap::WgradGrid wg = ap::wgrad_grid(g, bm, bn, bk, aw, acc_bytes(dt), gpu.sms);
    if (wg.blocks > 0) {
      out.push_back(launch1d(tmpl("_aw_conv2d_wgrad_kernel", {T, core, bool_name(aw)}), wg.blocks,
                             ap::kThreads));
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------------

std::tuple<std::vector<std::string>, std::vector<int64_t>> cuda_launch_plan(
    const std::string& op, at::IntArrayRef shape, c10::ScalarType dtype, bool channels_last,
    at::IntArrayRef params, int64_t sms, int64_t cc_major, int64_t smem_optin,
    const std::vector<std::string>& occ_kernels, at::IntArrayRef occ_ctas) {
  TORCH_CHECK(occ_kernels.size() == occ_ctas.size(),
              "_cuda_launch_plan: occ_kernels and "
              "occ_ctas: expected lists of one length, got ",
              occ_kernels.size(), " and ", occ_ctas.size());
  TORCH_CHECK(sms >= 1 && smem_optin >= 0,
              "_cuda_launch_plan: expected sms >= 1 and "
              "smem_optin >= 0, got ",
              sms, " and ", smem_optin);
  TORCH_CHECK(shape.size() == 4 || shape.size() == 3,
              "_cuda_launch_plan: shape: expected "
              "(N, C, H, W) (or (N, H, W) for the spatial conv), got ",
              shape);
  for (int64_t s : shape) {
    TORCH_CHECK(s >= 1, "_cuda_launch_plan: shape: expected sizes >= 1, got ", shape);
  }
  scalar_name(dtype);  // rejects a dtype the kernels do not take
  const Gpu gpu{static_cast<int>(sms), static_cast<int>(cc_major), static_cast<size_t>(smem_optin),
                occ_kernels, std::vector<int64_t>(occ_ctas.begin(), occ_ctas.end())};
  std::vector<Launch> launches;
  const bool known =
      (shape.size() == 4 || op.rfind("mixed_attention_spatial_conv", 0) == 0) &&
      (mixed_attention(launches, op, channels_last, dtype, shape, params, gpu) ||
       (shape.size() == 4 && (brnpa(launches, op, channels_last, dtype, shape, params, gpu) ||
                              aw_conv2d(launches, op, channels_last, dtype, shape, params, gpu))));
  TORCH_CHECK(known, "_cuda_launch_plan: op: unknown op ", op, " for shape ", shape);
  std::vector<std::string> names;
  std::vector<int64_t> nums;
  for (const Launch& l : launches) {
    names.push_back(l.kernel);
    nums.insert(nums.end(), {l.grid[0], l.grid[1], l.grid[2], l.threads, l.smem, l.occupancy});
  }
  return {names, nums};
}

}  // namespace
}  // namespace manet_kernels

TORCH_LIBRARY_FRAGMENT(manet_kernels, m) {
  // Private: for benchmarks/kernel_report_cuda.py. Returns the kernels, and six ints per
  // launch: grid x, y, z, threads per block, dynamic shared memory bytes, occupancy flag
  // (0: the grid does not depend on occupancy; 1: it does and occ_ctas had no entry for
  // the kernel, 1 CTA per SM assumed; 2: it does and the entry was used).
  m.def(
      "_cuda_launch_plan(str op, int[] shape, ScalarType dtype, bool channels_last, "
      "int[] params, int sms, int cc_major, int smem_optin, str[] occ_kernels, "
      "int[] occ_ctas) -> (str[], int[])",
      &manet_kernels::cuda_launch_plan);
}
