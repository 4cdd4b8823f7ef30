// Second-generation AW-convolution kernels (aw op; docs/design.md §2.4): the weight
// gradient (_aw_conv2d_wgrad_v2_kernel) and the forward / dx (_aw_conv2d_fwd_v2_kernel,
// _aw_conv2d_dx_v2_kernel) on channels_last activations, fed through cp.async rings, and
// their launchers wgrad_v2 / conv_v2, which return false where the plan
// (aw_conv2d_plan.h: wgrad_v2_supported, fwd_v2_supported, dx_v2_supported) rejects a
// call and the caller runs the first kernels. The index math is aw_conv2d_v2_index.h.
//
// Not a translation unit of its own: aw_conv2d.cu includes it once, after its tile
// engines (WmmaCore, FmaCore, round_to), argument checks (Checked) and launch helpers
// (is_16bit, checked_blocks), which it uses; the ops (aw_conv2d_fwd_v2_cuda,
// aw_conv2d_bwd_v2_cuda) are there.
#pragma once

namespace manet_kernels {
namespace {

// ---------------------------------------------------------------------------------------
// Weight gradient, second generation (aw op, channels_last; aw_conv2d_plan.h decides
// when it runs, the index math is aw_conv2d_v2_index.h). One block: a 64x64 tile of
// output x input channels of one tap and group, over the samples of its split (split-K
// over the batch). g and x tiles arrive as 16-byte cp.async chunks in a kStages-deep
// ring, so loads stay in flight across K steps and across samples; each thread walks
// its chunks' positions with a cursor (no division in the loop). After each sample the
// tile holds G_n: the fold adds dscale[n, o, t] = sum_c w G_n (one partial per N tile)
// and keeps sum_n scale[n, o, t] G_n in registers, written out once as the split's
// partial; ATen adds the partials in a fixed order (no float atomics).

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src),
               "r"(valid ? 16 : 0));
#else
  // The host runs this kernel on sm_80+ only (wgrad_v2_supported).
  *reinterpret_cast<uint4*>(dst) =
      valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// fp16 / bf16 tiles for channels_last operands: A (g) arrives k-major, [BK][BM + pad], so
// it is a column-major matrix_a; B (x) is [BK][BN + pad], row-major. Same 4 x 2 warp grid
// of 16 x 32 warp tiles as WmmaCore.
template <typename comp_t_>
struct WmmaCoreKm {
  using acc_t = float;
  using comp_t = comp_t_;
  static constexpr WgradV2Tile kTile = wgrad_v2_tile(sizeof(comp_t_));
  static constexpr int BM = kTile.bm, BN = kTile.bn, BK = kTile.bk;
  static constexpr int kALd = BM + kTile.pad;
  static constexpr int kBLd = BN + kTile.pad;
  static constexpr int kCLd = BN + 4;
  static_assert(kALd * sizeof(comp_t) % 16 == 0 && kBLd * sizeof(comp_t) % 16 == 0 &&
                    16 * kALd * sizeof(comp_t) % 32 == 0 && 16 * kBLd * sizeof(comp_t) % 32 == 0,
                "WMMA leading dimensions: 16-byte multiples, fragment pointers 32-byte aligned");
  static_assert(kThreads == 8 * 32 && BM == 4 * 16 && BN == 2 * 32 && BK % 16 == 0,
                "warp grid is 4 x 2");

  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2];

  __device__ void zero() {
    nvcuda::wmma::fill_fragment(acc[0], 0.0f);
    nvcuda::wmma::fill_fragment(acc[1], 0.0f);
  }

  __device__ void step(const comp_t* As, const comp_t* Bs) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, comp_t, wmma::col_major> fa;
      wmma::load_matrix_sync(fa, As + ks * kALd + wm * 16, kALd);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, comp_t, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, Bs + ks * kBLd + wn * 32 + j * 16, kBLd);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
#else
    __trap();  // sm_80+ only (wgrad_v2_supported)
#endif
  }

  __device__ void store(acc_t* Cs) const {
    const int warp = threadIdx.x / 32;
    const int wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(Cs + wm * 16 * kCLd + wn * 32 + j * 16, acc[j], kCLd,
                                      nvcuda::wmma::mem_row_major);
  }
};

// The v2 tile engine per dtype: WMMA for fp16/bf16, FmaCore (A already k-major) for
// fp32/fp64; both with the tile sizes of wgrad_v2_tile.
template <typename scalar_t>
struct V2Core {
  using type = FmaCore<scalar_t>;
};
template <>
struct V2Core<c10::Half> {
  using type = WmmaCoreKm<__half>;
};
template <>
struct V2Core<c10::BFloat16> {
  using type = WmmaCoreKm<__nv_bfloat16>;
};

template <typename scalar_t, typename acc_t>
struct WgradV2Args {
  Geo geo;
  const scalar_t* g;   // (N, C2, Ho, Wo) channels_last
  const scalar_t* x;   // (N, C1, H, W) channels_last
  const scalar_t* w;   // (C2, C1/g, kh, kw)
  const acc_t* scale;  // (N, C2, kh, kw)
  acc_t* dw_part;      // (S_n, C2, C1/g, kh, kw)
  acc_t* ds_part;      // (n_nt, N, C2, kh, kw)
  int n_mt, n_nt, n_chunk;
  int ks, d_oh, d_ow;  // K steps per sample, BK / Wo, BK % Wo
};

template <typename scalar_t, class Core, int kStages>
__global__ void __launch_bounds__(kThreads, 2)
    _aw_conv2d_wgrad_v2_kernel(const WgradV2Args<scalar_t, typename Core::acc_t> a) {
  using acc_t = typename Core::acc_t;
  using comp_t = typename Core::comp_t;
  using namespace aw_v2;
  constexpr int BM = Core::BM, BN = Core::BN, BK = Core::BK;
  constexpr WgradV2Tile kT = wgrad_v2_tile(sizeof(scalar_t));
  static_assert(sizeof(comp_t) == sizeof(scalar_t) && BM == kT.bm && BN == kT.bn && BK == kT.bk &&
                    kStages == kT.stages && Core::kALd == BM + kT.pad &&
                    Core::kBLd == BN + kT.pad && Core::kCLd == BN + 4,
                "the kernel's tiles are the plan's (wgrad_v2_tile, wgrad_v2_smem)");
  constexpr int VEC = kT.vec;
  static_assert(BM == BN, "A and B chunks share their GEMM-K rows");
  constexpr int kChunks = BK * BM / VEC / kThreads;  // per thread and operand
  static_assert(kChunks >= 1 && kChunks * VEC * kThreads == BK * BM, "chunk layout");
  constexpr int kAStage = BK * Core::kALd, kBStage = BK * Core::kBLd;  // elements
  constexpr int kRowParts = kThreads / BM;
  constexpr int kCols = BN / kRowParts;
  static_assert(kThreads % BM == 0 && BN % kRowParts == 0 && kRowParts <= 32 &&
                    (kRowParts & (kRowParts - 1)) == 0,
                "fold thread layout");

  extern __shared__ __align__(128) unsigned char raw[];
  comp_t* As = reinterpret_cast<comp_t*>(raw);
  comp_t* Bs = As + kStages * kAStage;
  acc_t* Cs = reinterpret_cast<acc_t*>(raw + wgrad_v2_c_offset(sizeof(scalar_t)));

  const Geo& g = a.geo;
  const WgradBlock blk = wgrad_block(blockIdx.x, a.n_nt, a.n_mt, g.taps, g.groups);
  const int n_begin = split_begin(blk.sn, a.n_chunk);
  const int n_end = split_end(blk.sn, a.n_chunk, g.n);
  const int r = blk.t / g.kw, s = blk.t - r * g.kw;
  const int m0 = blk.mt * BM, j0 = blk.nt * BN;
  const int64_t g_sample = int64_t{g.ho} * g.wo * g.c2;
  const int64_t x_sample = int64_t{g.h} * g.w * g.c1;

  // Producer: this thread's chunks (the same GEMM-K rows in A and B) and their cursors.
  int rowk[kChunks], col[kChunks];
  Cursor cur0[kChunks], cur[kChunks];
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int e = threadIdx.x + kThreads * i;
    rowk[i] = chunk_row<BM, VEC>(e);
    col[i] = chunk_col<BM, VEC>(e);
    cur0[i] = cursor_at(rowk[i], g.wo);
    cur[i] = cur0[i];
  }
  int pn = n_begin, pk = 0;
  const scalar_t* gs = a.g + pn * g_sample;
  const scalar_t* xs = a.x + pn * x_sample;
  auto issue = [&](int stage) {
    if (pn < n_end) {
      comp_t* as = As + stage * kAStage;
      comp_t* bs = Bs + stage * kBStage;
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        const int og = g_chunk(g, cur[i], m0, col[i], blk.gi);
        cp_async16(as + rowk[i] * Core::kALd + col[i], og >= 0 ? gs + og : a.g, og >= 0);
        const int ox = x_chunk(g, cur[i], r, s, j0, col[i], blk.gi);
        cp_async16(bs + rowk[i] * Core::kBLd + col[i], ox >= 0 ? xs + ox : a.x, ox >= 0);
      }
      if (++pk == a.ks) {  // next sample
        pk = 0;
        ++pn;
        gs += g_sample;
        xs += x_sample;
#pragma unroll
        for (int i = 0; i < kChunks; ++i) cur[i] = cur0[i];
      } else {
#pragma unroll
        for (int i = 0; i < kChunks; ++i) cursor_step(cur[i], BK, a.d_oh, a.d_ow, g.wo);
      }
    }
    cp_async_commit();  // an empty group past the end keeps the wait counts uniform
  };

  // Fold: row fr, columns fold_col(fp, jj); the weights of those columns for dscale.
  const int fr = fold_row(threadIdx.x, kRowParts);
  const bool row_ok = m0 + fr < g.c2g;
  const int o = blk.gi * g.c2g + m0 + fr;  // global output channel of row fr
  auto weight_at = [&](int jj) -> acc_t {
    const int c = j0 + fold_col(threadIdx.x, jj, kRowParts);
    return row_ok && c < g.c1g
               ? static_cast<acc_t>(a.w[(static_cast<int64_t>(o) * g.c1g + c) * g.taps + blk.t])
               : acc_t(0);
  };
  // fp64: 16 more double registers would spill (ptxas, sm_90), so the fold reloads its
  // weights (a tile that stays in L1) every sample.
  constexpr bool kWeightsInRegs = sizeof(acc_t) == 4;
  constexpr bool kSumInSmem = kT.sum_in_smem;
  acc_t wreg[kWeightsInRegs ? kCols : 1], dw[kSumInSmem ? 1 : kCols];
  // With sum_in_smem, thread tid's running sums are Ss[jj * kThreads + tid]: its own.
  acc_t* Ss = reinterpret_cast<acc_t*>(raw + wgrad_v2_sum_offset(sizeof(scalar_t), sizeof(acc_t)));
  auto sum_at = [&](int jj) -> acc_t& {
    if constexpr (kSumInSmem) {
      return Ss[jj * kThreads + threadIdx.x];
    } else {
      return dw[jj];
    }
  };
#pragma unroll
  for (int jj = 0; jj < kCols; ++jj) {
    if constexpr (kWeightsInRegs) wreg[jj] = weight_at(jj);
    sum_at(jj) = acc_t(0);
  }

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) issue(st);
  Core core;
  core.zero();
  const int total = (n_end - n_begin) * a.ks;
  int cstage = 0, pstage = kStages - 1, ck = 0, cn = n_begin;
  for (int it = 0; it < total; ++it) {
    cp_async_wait<kStages - 2>();  // this thread's copies of stage `cstage` have landed
    __syncthreads();               // everyone's have; everyone is done with `pstage`
    issue(pstage);
    core.step(As + cstage * kAStage, Bs + cstage * kBStage);
    cstage = cstage == kStages - 1 ? 0 : cstage + 1;
    pstage = pstage == kStages - 1 ? 0 : pstage + 1;
    if (++ck == a.ks) {  // the tile holds G_n of sample cn
      core.store(Cs);
      core.zero();
      __syncthreads();
      const acc_t sc =
          row_ok ? a.scale[(static_cast<int64_t>(cn) * g.c2 + o) * g.taps + blk.t] : acc_t(0);
      acc_t part = acc_t(0);
#pragma unroll
      for (int jj = 0; jj < kCols; ++jj) {
        const acc_t v = Cs[fr * Core::kCLd + fold_col(threadIdx.x, jj, kRowParts)];
        if constexpr (kWeightsInRegs) {
          part += wreg[jj] * v;
        } else {
          part += weight_at(jj) * v;
        }
        sum_at(jj) += sc * v;
      }
      // The kRowParts threads of a row are consecutive lanes of one warp.
#pragma unroll
      for (int off = 1; off < kRowParts; off *= 2) part += __shfl_xor_sync(0xffffffffu, part, off);
      if (threadIdx.x % kRowParts == 0 && row_ok)
        a.ds_part[ds_part_at(g, blk.nt, cn, o, blk.t)] = part;
      ck = 0;
      ++cn;
      // Cs is stored again only after the next iteration's barrier.
    }
  }
  cp_async_wait<0>();

  if (!row_ok) return;
#pragma unroll
  for (int jj = 0; jj < kCols; ++jj) {
    const int c = j0 + fold_col(threadIdx.x, jj, kRowParts);
    if (c < g.c1g) a.dw_part[dw_part_at(g, blk.sn, o, c, blk.t)] = sum_at(jj);
  }
}

// ---------------------------------------------------------------------------------------
// Forward and dx, second generation (aw op, fp16/bf16/fp32, channels_last; fwd_v2_supported /
// dx_v2_supported decide when they run, the index math is aw_conv2d_v2_index.h). One
// block: 64 positions of one sample x 64 channels of a group (forward: output positions x
// output channels, K = (tap, input channel); dx, stride 1: input positions x input
// channels, K = (tap, output channel)), K in steps of 32 channels (16 for fp32), taps
// outer. The
// activation (x or g) arrives as 16-byte cp.async chunks in a 3-stage ring; the weight
// tile is gathered into registers one step ahead (the loads fly during the MMA), scaled
// by scale[n, o, t] and rounded as it is stored into its ring slot (round(w * s), as the
// first kernels and eager PyTorch's conv on the scaled weight). Cursors step the tap and
// channel block without division. WmmaCore's (fp16/bf16) and FmaCoreRm's (fp32) tiles,
// row-major A and B, are the plan's.

// fp32 tiles of the forward / dx v2 body: as FmaCore, but A row-major ([BM][BK + pad_a]),
// as the activation's channels arrive.
template <typename acc_t_>
struct FmaCoreRm {
  using acc_t = acc_t_;
  using comp_t = acc_t_;
  static constexpr FwdV2Tile kTile = fwd_v2_tile(sizeof(acc_t_));
  static constexpr int BM = kTile.bm, BN = kTile.bn, BK = kTile.bk;
  static constexpr int kALd = BK + kTile.pad_a;
  static constexpr int kBLd = BN + kTile.pad_b;
  static constexpr int kCLd = BN + 4;
  static_assert(kThreads == 256 && BM == 64 && BN == 64, "16 x 16 threads of 4 x 4 sub-tiles");

  acc_t acc[4][4];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
  }

  __device__ void step(const comp_t* As, const comp_t* Bs) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      acc_t av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[(ty + 16 * i) * kALd + kk];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Bs[kk * kBLd + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
  }

  __device__ void store(acc_t* Cs) const {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[(ty + 16 * i) * kCLd + tx + 16 * j] = acc[i][j];
  }
};

// The forward / dx v2 tile engine per dtype (fp64 keeps the first kernels).
template <typename scalar_t>
struct ConvV2Core {
  using type = FmaCoreRm<float>;
};
template <>
struct ConvV2Core<c10::Half> {
  using type = WmmaCore<__half>;
};
template <>
struct ConvV2Core<c10::BFloat16> {
  using type = WmmaCore<__nv_bfloat16>;
};

template <typename scalar_t>
struct ConvV2Args {
  Geo geo;
  const scalar_t* in;  // forward: x (N, C1, H, W); dx: g (N, C2, Ho, Wo); channels_last
  const scalar_t* w;   // (C2, C1/g, kh, kw)
  const float* scale;  // (N, C2, kh, kw)
  const float* bias;   // forward: (N, C2) or null; dx: null
  scalar_t* out;       // forward: y; dx: dx; channels_last
  int n_mt, n_nt, ks_tap;
};

template <typename scalar_t, class Core, bool kDx>
__device__ __forceinline__ void conv_v2_body(const ConvV2Args<scalar_t>& a) {
  using comp_t = typename Core::comp_t;
  using namespace aw_v2;
  constexpr FwdV2Tile kT = fwd_v2_tile(sizeof(scalar_t));
  constexpr int BM = Core::BM, BN = Core::BN, BK = Core::BK;
  constexpr int VEC = kT.vec, kStages = kT.stages;
  static_assert(sizeof(comp_t) == sizeof(scalar_t) && BM == kT.bm && BN == kT.bn && BK == kT.bk &&
                    Core::kALd == BK + kT.pad_a && Core::kBLd == BN + kT.pad_b &&
                    Core::kCLd == BN + 4 && VEC * sizeof(scalar_t) == 16,
                "the kernel's tiles are the plan's (fwd_v2_tile, fwd_v2_smem)");
  static_assert(BM * BK == VEC * kThreads, "one activation chunk per thread and step");
  constexpr int kBRowStep = kThreads / BN;  // weight rows between a thread's elements
  constexpr int kBPer = BK / kBRowStep;     // weight elements per thread and step
  constexpr int kOutChunks = BM * BN / VEC / kThreads;
  static_assert(kThreads % BN == 0 && BK % kBRowStep == 0 && kOutChunks * VEC * kThreads == BM * BN,
                "thread layouts");
  constexpr int kAStage = BM * Core::kALd, kBStage = BK * Core::kBLd;  // elements

  extern __shared__ __align__(128) unsigned char raw[];
  comp_t* As = reinterpret_cast<comp_t*>(raw);
  comp_t* Bs = reinterpret_cast<comp_t*>(raw + fwd_v2_ring_a_bytes(sizeof(scalar_t)));
  float* Cs = reinterpret_cast<float*>(raw);  // after the K loop, over the ring

  const Geo& g = a.geo;
  const FwdBlock blk = fwd_block(blockIdx.x, a.n_nt, a.n_mt, g.groups);
  const int P = kDx ? g.h * g.w : g.ho * g.wo;  // rows of the GEMM (positions)
  const int row_w = kDx ? g.w : g.wo;
  const int q0 = blk.mt * BM, j0 = blk.nt * BN;
  const scalar_t* in =
      a.in + blk.n * (kDx ? int64_t{g.ho} * g.wo * g.c2 : int64_t{g.h} * g.w * g.c1);

  // Activation chunk of this thread: position q0 + am (one division, here), channels akc..
  const int am = chunk_row<BK, VEC>(threadIdx.x), akc = chunk_col<BK, VEC>(threadIdx.x);
  const int aq = q0 + am;
  const bool q_ok = aq < P;
  const int ph = q_ok ? aq / row_w : 0;
  const int pw = q_ok ? aq - ph * row_w : 0;
  // Weight elements of this thread: column bj, rows bk0 + kBRowStep * i.
  const int bj = threadIdx.x % BN, bk0 = threadIdx.x / BN;
  const bool col_ok = j0 + bj < (kDx ? g.c1g : g.c2g);
  // forward: the scale of column bj (output channel), per tap
  const float* srow = a.scale + (static_cast<int64_t>(blk.n) * g.c2 + blk.gi * g.c2g +
                                 (!kDx && col_ok ? j0 + bj : 0)) *
                                    g.taps;

  const int total = g.taps * a.ks_tap;
  int issued = 0;
  KCursor pk{0, 0, 0};
  float breg[kBPer];
  auto issue_a = [&](int stage) {
    if (issued < total) {
      const int off = kDx ? g_dx_chunk(g, q_ok, ph, pw, pk, akc, blk.gi)
                          : x_fwd_chunk(g, q_ok, ph, pw, pk, akc, blk.gi);
      cp_async16(As + stage * kAStage + am * Core::kALd + akc, off >= 0 ? in + off : a.in,
                 off >= 0);
    }
    cp_async_commit();
  };
  auto fetch_b = [&]() {
    if (issued < total) {
      const float sc = !kDx && col_ok ? srow[pk.r * g.kw + pk.s] : 0.0f;
#pragma unroll
      for (int i = 0; i < kBPer; ++i) {
        const int kk = bk0 + kBRowStep * i;
        if constexpr (kDx) {
          const int64_t wi = w_dx_at(g, pk, kk, j0, bj, blk.gi);
          breg[i] = wi >= 0
                        ? static_cast<float>(a.w[wi]) * a.scale[s_dx_at(g, blk.n, pk, kk, blk.gi)]
                        : 0.0f;
        } else {
          const int64_t wi = w_fwd_at(g, pk, kk, j0, bj, blk.gi);
          breg[i] = wi >= 0 ? static_cast<float>(a.w[wi]) * sc : 0.0f;
        }
      }
    }
  };
  auto store_b_and_advance = [&](int stage) {
    if (issued < total) {
#pragma unroll
      for (int i = 0; i < kBPer; ++i)
        Bs[stage * kBStage + (bk0 + kBRowStep * i) * Core::kBLd + bj] = round_to<comp_t>(breg[i]);
      ++issued;
      kcursor_step(pk, BK, kDx ? g.c2g : g.c1g, g.kw);
    }
  };

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    issue_a(st);
    fetch_b();
    store_b_and_advance(st);
  }
  Core core;
  core.zero();
  int cstage = 0, pstage = kStages - 1;
  for (int it = 0; it < total; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `cstage` is complete; everyone is done with `pstage`
    issue_a(pstage);
    fetch_b();
    core.step(As + cstage * kAStage, Bs + cstage * kBStage);
    store_b_and_advance(pstage);  // read at iteration it + kStages - 1, after its barrier
    cstage = cstage == kStages - 1 ? 0 : cstage + 1;
    pstage = pstage == kStages - 1 ? 0 : pstage + 1;
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is free: C goes over it
  core.store(Cs);
  __syncthreads();

#pragma unroll
  for (int i = 0; i < kOutChunks; ++i) {
    const int e = threadIdx.x + kThreads * i;
    const int m = chunk_row<BN, VEC>(e), jc = chunk_col<BN, VEC>(e);
    const int64_t off = kDx ? dx_chunk(g, blk.n, q0 + m, j0, jc, blk.gi)
                            : y_fwd_chunk(g, blk.n, q0 + m, j0, jc, blk.gi);
    if (off < 0) continue;
    const float* bias = !kDx && a.bias != nullptr
                            ? a.bias + static_cast<int64_t>(blk.n) * g.c2 + blk.gi * g.c2g + j0 + jc
                            : nullptr;
    alignas(16) comp_t v[VEC];
#pragma unroll
    for (int u = 0; u < VEC; ++u)
      v[u] = round_to<comp_t>(Cs[m * Core::kCLd + jc + u] + (bias != nullptr ? bias[u] : 0.0f));
    *reinterpret_cast<uint4*>(a.out + off) = *reinterpret_cast<const uint4*>(v);
  }
}

template <typename scalar_t, class Core>
__global__ void __launch_bounds__(kThreads, 2)
    _aw_conv2d_fwd_v2_kernel(const ConvV2Args<scalar_t> a) {
  conv_v2_body<scalar_t, Core, false>(a);
}

template <typename scalar_t, class Core>
__global__ void __launch_bounds__(kThreads, 2)
    _aw_conv2d_dx_v2_kernel(const ConvV2Args<scalar_t> a) {
  conv_v2_body<scalar_t, Core, true>(a);
}

// ---------------------------------------------------------------------------------------
// Launchers

// The v2 weight gradient (aw op): false when wgrad_v2_supported rejects the call, and
// the caller runs WgradLaunch.
template <typename scalar_t>
bool wgrad_v2(const Checked& ck, const Tensor& gy, const Tensor& x, const Tensor& w,
              const Tensor& scale, Tensor& dw, Tensor& ds) {
  using acc_t = at::opmath_type<scalar_t>;
  using Core = typename V2Core<scalar_t>::type;
  constexpr int kStages = wgrad_v2_tile(sizeof(scalar_t)).stages;
  const Geo& g = ck.geo;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  gy.is_contiguous(at::MemoryFormat::ChannelsLast);
  const uint64_t bits = plan_util::addr_bits({x.const_data_ptr(), gy.const_data_ptr()});
  if (!wgrad_v2_supported(g, sizeof(scalar_t), cl, bits, props->major)) return false;
  const WgradV2Grid v =
      wgrad_v2_grid(g, sizeof(scalar_t), sizeof(acc_t), props->multiProcessorCount);
  const auto opts = x.options().dtype(ck.acc).memory_format(at::MemoryFormat::Contiguous);
  WgradV2Args<scalar_t, acc_t> a{};
  a.geo = g;
  a.g = gy.const_data_ptr<scalar_t>();
  a.x = x.const_data_ptr<scalar_t>();
  a.w = w.const_data_ptr<scalar_t>();
  a.scale = scale.const_data_ptr<acc_t>();
  a.n_mt = v.n_mt;
  a.n_nt = v.n_nt;
  a.n_chunk = v.n_chunk;
  a.ks = v.ks;
  a.d_oh = v.d_oh;
  a.d_ow = v.d_ow;
  Tensor dw_part = at::empty({v.s_n, g.c2, g.c1g, g.kh, g.kw}, opts);
  Tensor ds_part = at::empty({v.n_nt, g.n, g.c2, g.kh, g.kw}, opts);
  a.dw_part = dw_part.mutable_data_ptr<acc_t>();
  a.ds_part = ds_part.mutable_data_ptr<acc_t>();
  const int64_t blocks = checked_blocks(v.blocks, "aw_conv2d_bwd");
  auto* kernel = &_aw_conv2d_wgrad_v2_kernel<scalar_t, Core, kStages>;
  if (v.smem > 48 * 1024) {
    MK_CHECK(static_cast<size_t>(v.smem) <= props->sharedMemPerBlockOptin,
             "aw_conv2d_bwd: the weight-gradient tile needs ", v.smem,
             " bytes of shared memory, the GPU allows ", props->sharedMemPerBlockOptin);
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, v.smem));
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  kernel<<<static_cast<unsigned>(blocks), kThreads, v.smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // ATen's reduction adds the partials in a fixed order.
  dw = dw_part.size(0) == 1 ? dw_part.select(0, 0) : dw_part.sum(0);
  ds = ds_part.size(0) == 1 ? ds_part.select(0, 0) : ds_part.sum(0);
  return true;
}

// The v2 forward (kDx false: in = x, out = y) or dx (kDx true: in = g, out = dx) of the
// aw op: false when fwd_v2_supported / dx_v2_supported rejects the call, and the caller
// runs ConvLaunch.
template <typename scalar_t, bool kDx>
bool conv_v2(const Checked& ck, const Tensor& in, const Tensor& w, const Tensor& scale,
             const Tensor* bias, Tensor& out) {
  if constexpr (!is_16bit<scalar_t>() && !std::is_same_v<scalar_t, float>) {
    return false;
  } else {
    const Geo& g = ck.geo;
    const auto* props = at::cuda::getCurrentDeviceProperties();
    const bool cl = in.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                    out.is_contiguous(at::MemoryFormat::ChannelsLast);
    const uint64_t bits = plan_util::addr_bits({in.const_data_ptr(), out.const_data_ptr()});
    const bool ok = kDx ? dx_v2_supported(g, sizeof(scalar_t), cl, bits, props->major)
                        : fwd_v2_supported(g, sizeof(scalar_t), cl, bits, props->major);
    if (!ok) return false;
    const FwdV2Grid v = fwd_v2_grid(g, sizeof(scalar_t), kDx);
    ConvV2Args<scalar_t> a{};
    a.geo = g;
    a.in = in.const_data_ptr<scalar_t>();
    a.w = w.const_data_ptr<scalar_t>();
    a.scale = scale.const_data_ptr<float>();
    a.bias = bias != nullptr ? bias->const_data_ptr<float>() : nullptr;
    a.out = out.mutable_data_ptr<scalar_t>();
    a.n_mt = v.n_mt;
    a.n_nt = v.n_nt;
    a.ks_tap = v.ks_tap;
    const int64_t blocks = checked_blocks(v.blocks, kDx ? "aw_conv2d_bwd" : "aw_conv2d");
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    using Core = typename ConvV2Core<scalar_t>::type;
    if constexpr (kDx) {
      _aw_conv2d_dx_v2_kernel<scalar_t, Core>
          <<<static_cast<unsigned>(blocks), kThreads, v.smem, stream>>>(a);
    } else {
      _aw_conv2d_fwd_v2_kernel<scalar_t, Core>
          <<<static_cast<unsigned>(blocks), kThreads, v.smem, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
}

}  // namespace
}  // namespace manet_kernels
