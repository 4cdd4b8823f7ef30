// CPU kernels for AW-convolution and per-sample convolution (docs/design.md §2).
// The contract, including dtypes and output memory format, is
// manet_kernels/reference/passes.py.
//
// Every sample has its own weights, so a sample is one ordinary convolution; ATen's
// (oneDNN for float32, im2col + BLAS for float64) does that better than a
// hand-written loop nest. The aw_* ops build one sample's scaled weight at a time
// (C2 * C1/g * kh * kw elements) and never the (N, C2, C1/g, kh, kw) stack.
// Low-precision x is widened to float32 one sample at a time, since the contract
// computes in the accumulation dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <cstdint>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../check.h"
#include "cpu_isa.h"

#if MK_CPU_ISA_X86
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

// ---------------------------------------------------------------------------
// Argument checks. Every message starts with the argument's name.

at::ScalarType acc_dtype_for(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cpu_dense(const Tensor& t, const char* name) {
  MK_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  MK_CHECK(t.layout() == at::kStrided, name, ": expected a strided (dense) tensor, got layout ",
           t.layout());
  MK_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
}

// Returns the memory format the outputs derived from `t` take: NCHW when `t` is
// NCHW-contiguous (also when it is both, e.g. C == 1 or H == W == 1), else channels_last.
at::MemoryFormat check_activation(const Tensor& t, const char* name) {
  check_cpu_dense(t, name);
  MK_CHECK(t.dim() == 4, name, ": expected a rank-4 (N, C, H, W) tensor, got rank ", t.dim(),
           " with shape ", t.sizes());
  const auto st = t.scalar_type();
  MK_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, name,
           ": expected dtype float32, float64, bfloat16 or float16, got ", st);
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  MK_CHECK(false, name,
           ": expected NCHW-contiguous or channels_last-contiguous strides, got shape ", t.sizes(),
           " with strides ", t.strides(), " (make it contiguous before calling)");
  return at::MemoryFormat::Contiguous;  // unreachable
}

// `dims` names the expected shape, e.g. "(N, C2)".
void check_small(const Tensor& t, const char* name, const char* dims, at::IntArrayRef sizes,
                 at::ScalarType dtype, const char* why) {
  check_cpu_dense(t, name);
  MK_CHECK(t.sizes() == sizes, name, ": expected shape ", dims, " = ", sizes, ", got ", t.sizes());
  MK_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, " (", why, "), got ",
           t.scalar_type());
  MK_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

std::array<int64_t, 2> check_pair(at::IntArrayRef v, const char* name, int64_t minimum) {
  MK_CHECK(v.size() == 2, name, ": expected two values (height, width), got ", v);
  MK_CHECK(v[0] >= minimum && v[1] >= minimum, name, ": expected values >= ", minimum, ", got ", v);
  return {v[0], v[1]};
}

struct Geometry {
  int64_t n, c1, h, w;  // x
  int64_t c2, kh, kw;   // weight(s)
  int64_t ho, wo;       // y
  std::array<int64_t, 2> stride, padding, dilation;
  int64_t groups;
  at::MemoryFormat format;  // of x, and so of y and dx
  at::ScalarType dtype, acc;

  // One sample's weights in the accumulation dtype.
  int64_t weight_bytes() const {
    return c2 * (c1 / groups) * kh * kw * static_cast<int64_t>(c10::elementSize(acc));
  }
};

// Checks x and the convolution parameters against a weight of shape
// (C2, C1/groups, kh, kw) taken from `wsizes` (the trailing four sizes).
Geometry check_conv(const Tensor& x, at::IntArrayRef wsizes, const char* wname,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    int64_t groups) {
  Geometry geo;
  geo.format = check_activation(x, "x");
  geo.dtype = x.scalar_type();
  geo.acc = acc_dtype_for(geo.dtype);
  geo.n = x.size(0);
  geo.c1 = x.size(1);
  geo.h = x.size(2);
  geo.w = x.size(3);
  geo.stride = check_pair(stride, "stride", 1);
  geo.padding = check_pair(padding, "padding", 0);
  geo.dilation = check_pair(dilation, "dilation", 1);
  MK_CHECK(groups >= 1, "groups: expected a positive value, got ", groups);
  const size_t r = wsizes.size();
  geo.c2 = wsizes[r - 4];
  geo.kh = wsizes[r - 2];
  geo.kw = wsizes[r - 1];
  MK_CHECK(geo.c1 % groups == 0, "groups: must divide x's channel count C1 = ", geo.c1,
           ", got groups = ", groups);
  MK_CHECK(geo.c2 % groups == 0, "groups: must divide ", wname,
           "'s output channel count C2 = ", geo.c2, ", got groups = ", groups);
  MK_CHECK(wsizes[r - 3] * groups == geo.c1, wname, ": expected C1/groups = ", geo.c1, "/", groups,
           " = ", geo.c1 / groups, " input channels (dim ", r - 3, "), got shape ", wsizes);
  MK_CHECK(geo.kh >= 1 && geo.kw >= 1, wname, ": expected a kernel of at least 1x1, got shape ",
           wsizes);
  const int64_t span_h = geo.h + 2 * geo.padding[0] - geo.dilation[0] * (geo.kh - 1) - 1;
  const int64_t span_w = geo.w + 2 * geo.padding[1] - geo.dilation[1] * (geo.kw - 1) - 1;
  MK_CHECK(geo.h >= 1 && geo.w >= 1 && span_h >= 0 && span_w >= 0, "x: spatial size (", geo.h, ", ",
           geo.w, ") with padding (", geo.padding[0], ", ", geo.padding[1],
           ") is smaller than the dilated kernel (", geo.dilation[0] * (geo.kh - 1) + 1, ", ",
           geo.dilation[1] * (geo.kw - 1) + 1, ")");
  geo.ho = span_h / geo.stride[0] + 1;
  geo.wo = span_w / geo.stride[1] + 1;
  geo.groups = groups;
  return geo;
}

void check_per_sample_weights(const Tensor& weights, const Geometry& geo) {
  check_cpu_dense(weights, "weights");
  MK_CHECK(weights.dim() == 5,
           "weights: expected a rank-5 (N, C2, C1/groups, kh, kw) tensor, "
           "got rank ",
           weights.dim(), " with shape ", weights.sizes());
  MK_CHECK(weights.size(0) == geo.n, "weights: expected one kernel per sample of x (N = ", geo.n,
           "), got shape ", weights.sizes());
  MK_CHECK(weights.scalar_type() == geo.dtype, "weights: expected x's dtype ", geo.dtype, ", got ",
           weights.scalar_type());
  MK_CHECK(weights.is_contiguous(), "weights: expected a contiguous tensor, got strides ",
           weights.strides());
}

void check_shared_weight(const Tensor& weight, const Geometry& geo) {
  MK_CHECK(weight.scalar_type() == geo.dtype, "weight: expected x's dtype ", geo.dtype, ", got ",
           weight.scalar_type());
  MK_CHECK(weight.is_contiguous(), "weight: expected a contiguous tensor, got strides ",
           weight.strides());
}

// Rank and device of a weight before its sizes are used for the geometry.
void check_weight_rank(const Tensor& weight) {
  check_cpu_dense(weight, "weight");
  MK_CHECK(weight.dim() == 4,
           "weight: expected a rank-4 (C2, C1/groups, kh, kw) tensor, got "
           "rank ",
           weight.dim(), " with shape ", weight.sizes());
}

void check_scale(const Tensor& scale, const Geometry& geo) {
  check_small(scale, "scale", "(N, C2, kh, kw)", {geo.n, geo.c2, geo.kh, geo.kw}, geo.acc,
              "the accumulation dtype for x's dtype");
}

void check_bias(const c10::optional<Tensor>& bias, const Geometry& geo) {
  if (bias.has_value() && bias->defined())
    check_small(*bias, "bias", "(N, C2)", {geo.n, geo.c2}, geo.acc,
                "the accumulation dtype for x's dtype");
}

void check_grad(const Tensor& g, const Geometry& geo) {
  check_activation(g, "g");
  MK_CHECK(g.sizes() == at::IntArrayRef({geo.n, geo.c2, geo.ho, geo.wo}),
           "g: expected the output's shape (N, C2, Ho, Wo) = ",
           at::IntArrayRef({geo.n, geo.c2, geo.ho, geo.wo}), ", got ", g.sizes());
  MK_CHECK(g.scalar_type() == geo.dtype, "g: expected x's dtype ", geo.dtype, ", got ",
           g.scalar_type());
}

// ---------------------------------------------------------------------------
// Per-sample pieces.

// Sample n of an activation as a (1, C, H, W) view, widened to the
// accumulation dtype when it is narrower.
Tensor sample_of(const Tensor& t, int64_t n, at::ScalarType acc) {
  Tensor s = t.narrow(0, n, 1);
  return s.scalar_type() == acc ? s : s.to(acc);
}

Tensor conv_forward(const Tensor& xn, const Tensor& wn, const c10::optional<Tensor>& bn,
                    const Geometry& geo) {
  return at::convolution(xn, wn, bn, geo.stride, geo.padding, geo.dilation,
                         /*transposed=*/false, /*output_padding=*/{0, 0}, geo.groups);
}

// (dx_n, G_n) for one sample.
std::tuple<Tensor, Tensor> conv_backward(const Tensor& gn, const Tensor& xn, const Tensor& wn,
                                         const Geometry& geo) {
  auto r = at::convolution_backward(gn, xn, wn, c10::nullopt, geo.stride, geo.padding, geo.dilation,
                                    /*transposed=*/false, {0, 0}, geo.groups, {true, true, false});
  return {std::get<0>(r), std::get<1>(r)};
}

// wn[o, c, t] = wa[o, c, t] * s[o, t], t the kh*kw tap.
template <typename acc_t>
void scale_weight(const acc_t* __restrict__ wa, const acc_t* __restrict__ s, acc_t* __restrict__ wn,
                  int64_t c2, int64_t cg, int64_t taps) {
  for (int64_t o = 0; o < c2; ++o) {
    const acc_t* so = s + o * taps;
    for (int64_t c = 0; c < cg; ++c) {
      const int64_t base = (o * cg + c) * taps;
#pragma omp simd
      for (int64_t t = 0; t < taps; ++t) wn[base + t] = wa[base + t] * so[t];
    }
  }
}

// dweight += s ⊙ G and ds[o, t] = Σ_c wa[o, c, t] G[o, c, t], c in increasing order.
template <typename acc_t>
void fold_weight_grad(const acc_t* __restrict__ gw, const acc_t* __restrict__ wa,
                      const acc_t* __restrict__ s, acc_t* __restrict__ dweight,
                      acc_t* __restrict__ ds, int64_t c2, int64_t cg, int64_t taps) {
  for (int64_t o = 0; o < c2; ++o) {
    const acc_t* so = s + o * taps;
    acc_t* dso = ds + o * taps;
    for (int64_t t = 0; t < taps; ++t) dso[t] = acc_t(0);
    for (int64_t c = 0; c < cg; ++c) {
      const int64_t base = (o * cg + c) * taps;
#pragma omp simd
      for (int64_t t = 0; t < taps; ++t) {
        dso[t] += wa[base + t] * gw[base + t];
        dweight[base + t] += so[t] * gw[base + t];
      }
    }
  }
}

// Below this many elements a parallel chunk costs more in fork/join than it saves.
constexpr int64_t kMinFoldElems = 1 << 14;

// Running samples side by side keeps one sample's weights (and, in aw_conv2d_bwd,
// its weight gradient) alive per thread; past this much, samples go one at a time.
constexpr int64_t kMaxSideBySideBytes = int64_t{512} << 20;

// Threads a parallel_for started here would use: 1 inside a parallel region (nested
// ones run serially).
int64_t free_threads() {
  return at::in_parallel_region() ? 1 : at::get_num_threads();
}

// How many samples run side by side: one per thread (see for_each_sample).
int64_t sample_threads(int64_t weight_bytes) {
  const int64_t threads = free_threads();
  return threads * weight_bytes * 2 > kMaxSideBySideBytes ? 1 : threads;
}

// Sets this thread's OpenMP thread count to 1 while alive.
struct OneOmpThread {
#ifdef _OPENMP
  int saved = omp_get_max_threads();
  OneOmpThread() { omp_set_num_threads(1); }
  ~OneOmpThread() { omp_set_num_threads(saved); }
#endif
};

// Runs fn(n) for n in [begin, end): whole rounds of one sample per thread in
// parallel, each convolution single-threaded; the samples left over one after the
// other, each convolution using every thread.
// Fwd+bwd, fp32, 2 threads (Zen 4): (8,64,28,28)->64 3x3 8.4 ms vs 9.2 ms with every
// sample's conv threaded, (8,256,14,14)->256 34.1 vs 34.5-38.0 ms.
template <typename F>
void for_each_sample(int64_t begin, int64_t end, int64_t threads, const F& fn) {
  const int64_t split = threads > 1 ? begin + (end - begin) / threads * threads : begin;
  if (split > begin) {
    at::parallel_for(begin, split, 1, [&](int64_t b, int64_t e) {
      // Worker threads do not inherit the caller's dispatch state.
      at::AutoDispatchBelowADInplaceOrView guard;
      // oneDNN splits its work by omp_get_max_threads(), which still reports every
      // thread in here, then runs on one: its weight gradients came back partly
      // uncomputed.
      OneOmpThread one_thread;
      for (int64_t i = b; i < e; ++i) fn(i);
    });
  }
  // Not through parallel_for: that would mark the region parallel and make every
  // ATen op inside single-threaded.
  for (int64_t i = split; i < end; ++i) fn(i);
}

// ---------------------------------------------------------------------------
// Winograd F(m x m, 3 x 3) for 3x3, stride 1, dilation 1, groups 1 (Lavin & Gray,
// "Fast Algorithms for Convolutional Neural Networks", 2015), m = 2 or 4.
//
// A sample's conv is one ordinary conv, but its FLOPs are what bound the small-map
// case: at (8,64,28,28)->64 fwd+bwd is three 0.46 GFLOP convs at the machine's matmul
// rate. Winograd does the products in an (m+2)^2-point transform domain, where each
// of the three convs is a batch of (m+2)^2 channel GEMMs (2.25x fewer multiplies for
// m = 2, 4x for m = 4) plus transforms that cost O(C) per tile instead of O(C^2).
// With a = m + 2, tiles t of m x m outputs, xi one of the a*a transform points:
//   U_n = G (K * s_n) G^T           per sample and (o, c): the scale is per tap, so
//                                   it goes in before the transform
//   V_n[t] = B^T d_t B               d_t the a x a input window of tile t
//   y_n[t] = A^T [sum_c U_n[o,c] * V_n[c,t]] A
//   dM_n[t] = A dy_t A^T,  dV_n[c,t] = sum_o U_n[o,c] * dM_n[o,t],
//   dx_n = sum_t B dV_n[t] B^T       (tile windows overlap by 2 rows / columns)
//   dU_n[o,c] = sum_t dM_n[o,t] * V_n[c,t],  G_n = G^T dU_n G (the per-sample weight
//   gradient), then dweight += s_n * G_n and dscale_n = sum_c K * G_n as before.
// Layout: activations as (N, H, W, C) and transform-domain tensors as
// (N, a*a, tiles, C), so every transform loop runs over contiguous channels and each
// channel sum is one batched GEMM (batched_gemm, aw_winograd.inc's own) over N * a*a
// matrices.
//
// Error: fp32 F(2,3) is as accurate as a direct conv (max |err| / max |ref| ~4e-7
// against fp64 at 16 channels, randn inputs, scale in [1, 2)). F(4,3)'s transforms have
// entries up to 8 and 1/24 and lose about 3 more bits (~4e-6 there); see
// kWinoF4MaxChannels for where it is used.

struct WinoGeo {
  int64_t n, c1, c2, h, w, ho, wo, ph, pw, th, tw, tiles;
};

WinoGeo wino_geometry(const Geometry& geo, int m) {
  WinoGeo g;
  g.n = geo.n;
  g.c1 = geo.c1;
  g.c2 = geo.c2;
  g.h = geo.h;
  g.w = geo.w;
  g.ho = geo.ho;
  g.wo = geo.wo;
  g.ph = geo.padding[0];
  g.pw = geo.padding[1];
  g.th = (geo.ho + m - 1) / m;
  g.tw = (geo.wo + m - 1) / m;
  g.tiles = g.th * g.tw;
  return g;
}

enum class ConvAlgo { kAten, kWino2, kWino4 };

// Fwd+bwd, fp32, one thread, 2-core AMD EPYC VM (AVX2), vs the grouped-conv trick:
// (8,64,28,28)->64: ATen per sample 0.98x, F(2,3) 1.11x, F(4,3) 1.61x;
// (8,256,14,14)->256: ATen 1.47x, F(2,3) 1.91x, F(4,3) 1.36x. F(4,3) needs enough
// tiles per sample for its GEMMs (a 14x14 map has 16, and wastes 2 rows and columns)
// and loses precision as channel sums grow, so it is kept to <= 128 channels. With few
// channels the O(C) transforms outweigh the O(C^2) products they save.
constexpr int64_t kWinoMinChannels = 16;
constexpr int64_t kWinoF4MaxChannels = 128;
constexpr int64_t kWinoF4MinTiles = 36;

ConvAlgo wino_auto(const Geometry& geo) {
  if (std::min(geo.c1, geo.c2) < kWinoMinChannels) return ConvAlgo::kAten;
  const int64_t tiles4 = ((geo.ho + 3) / 4) * ((geo.wo + 3) / 4);
  if (std::max(geo.c1, geo.c2) <= kWinoF4MaxChannels && tiles4 >= kWinoF4MinTiles)
    return ConvAlgo::kWino4;
  return ConvAlgo::kWino2;
}

bool wino_cpu_ok() {
  return static_cast<int>(manet_kernels::cpu_isa()) >=
         static_cast<int>(manet_kernels::CpuIsa::kAvx2);
}

bool wino_eligible(const Geometry& geo) {
  return geo.kh == 3 && geo.kw == 3 && geo.stride[0] == 1 && geo.stride[1] == 1 &&
         geo.dilation[0] == 1 && geo.dilation[1] == 1 && geo.groups == 1;
}

// MANET_KERNELS_AW_CPU_ALGO = auto (default) | aten | winograd2 | winograd4 overrides the
// choice (tests force each path; convs Winograd cannot do always run on ATen).
ConvAlgo choose_algo(const Geometry& geo) {
  const char* env = std::getenv("MANET_KERNELS_AW_CPU_ALGO");
  const std::string mode = env ? env : "";
  MK_CHECK(mode.empty() || mode == "auto" || mode == "aten" || mode == "winograd2" ||
               mode == "winograd4",
           "MANET_KERNELS_AW_CPU_ALGO: expected auto, aten, winograd2 or winograd4, got '", mode,
           "'");
  if (mode == "aten" || !wino_eligible(geo) || !wino_cpu_ok()) return ConvAlgo::kAten;
  if (mode == "winograd2") return ConvAlgo::kWino2;
  if (mode == "winograd4") return ConvAlgo::kWino4;
  return wino_auto(geo);
}

// The Winograd kernels read and write activations one sample at a time as (H, W, C)
// arrays (channels contiguous). An NCHW tensor in the accumulation dtype is transposed
// per sample by the kernels' own blocked transpose, inside the per-sample loop, so the
// transposed copy is still in cache when the transforms read it (whole-batch ATen
// permute copies were ~25% of the (8,64,28,28) fwd+bwd step). Other dtypes (x in
// bfloat16 / float16) go through these two ATen copies, which widen or round.

// Sample n of activation t (N, C, H, W), in dtype acc, into buf as (H, W, C).
// Both may run on a worker thread, which does not inherit the caller's dispatch state:
// the guard keeps autograd out of these copies there too.
void sample_to_hwc(const Tensor& t, int64_t n, void* buf, at::ScalarType acc) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t c = t.size(1), h = t.size(2), w = t.size(3);
  at::from_blob(buf, {c, h, w}, {1, w * c, c}, t.options().dtype(acc)).copy_(t.select(0, n));
}

// Sample n of out (N, C, H, W) from buf, (H, W, C) in dtype acc.
void hwc_to_sample(const void* buf, at::ScalarType acc, const Tensor& out, int64_t n) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t c = out.size(1), h = out.size(2), w = out.size(3);
  out.select(0, n).copy_(
      at::from_blob(const_cast<void*>(buf), {c, h, w}, {1, w * c, c}, out.options().dtype(acc)));
}

// Whether t's samples are (H, W, C) arrays already (channels_last strides; also when
// C == 1 or H == W == 1, where both formats are one).
bool hwc_layout(const Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

template <typename F>
void wino_for(int64_t n, int64_t grain, const F& fn) {
  at::parallel_for(0, n, grain, fn);
}

int64_t wino_weight_grain(int64_t c1) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(c1, 1));
}

// The Winograd kernels, compiled for AVX2 + FMA and for AVX-512 (the build has no
// -march); they run only on CPUs that have one of them (cpu_isa.h), elsewhere (and
// with MANET_KERNELS_CPU_ISA=generic) the ATen path runs.
#if MK_CPU_ISA_X86
MK_CPU_ISA_BEGIN_AVX2
namespace avx2 {
constexpr int kVecBytes = 32;
#include "aw_winograd.inc"
}  // namespace avx2
MK_CPU_ISA_END
MK_CPU_ISA_BEGIN_AVX512
namespace avx512 {
constexpr int kVecBytes = 64;
#include "aw_winograd.inc"
}  // namespace avx512
MK_CPU_ISA_END
// MK_CPU_ISA_CALL's generic slot: never reached (choose_algo picks ATen on that ISA).
namespace generic = avx2;
#else
// Never chosen (wino_cpu_ok is false off x86-64), compiled so that the ops need no #if.
namespace generic {
constexpr int kVecBytes = 32;
#include "aw_winograd.inc"
}  // namespace generic
#endif

// The Wino of one instruction-set copy, passed as a value to the generic op bodies.
template <typename W>
struct WinoCopy {
  using type = W;
};

// fn(m, isa): m an integral_constant (the Winograd tile size), isa a WinoCopy whose
// ::type is the Wino of the instruction-set copy MK_CPU_ISA_CALL picks (cpu_isa.h).
template <typename F>
auto with_wino(ConvAlgo algo, const F& fn) {
  const auto by_m = [&](auto isa) {
    return algo == ConvAlgo::kWino4 ? fn(std::integral_constant<int, 4>{}, isa)
                                    : fn(std::integral_constant<int, 2>{}, isa);
  };
  return MK_CPU_ISA_CALL(by_m(WinoCopy<isa::Wino>{}));
}

// ---------------------------------------------------------------------------
// Ops.

Tensor per_sample_conv2d_fwd(const Tensor& x, const Tensor& weights,
                             const c10::optional<Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_cpu_dense(weights, "weights");
  MK_CHECK(weights.dim() == 5,
           "weights: expected a rank-5 (N, C2, C1/groups, kh, kw) tensor, "
           "got rank ",
           weights.dim(), " with shape ", weights.sizes());
  const Geometry geo = check_conv(x, weights.sizes(), "weights", stride, padding, dilation, groups);
  check_per_sample_weights(weights, geo);
  check_bias(bias, geo);
  at::AutoDispatchBelowADInplaceOrView guard;

  Tensor y = at::empty({geo.n, geo.c2, geo.ho, geo.wo}, x.options().memory_format(geo.format));
  const ConvAlgo algo = geo.n == 0 ? ConvAlgo::kAten : choose_algo(geo);
  if (algo != ConvAlgo::kAten) {
    const Tensor kt = weights.to(geo.acc).permute({0, 2, 3, 4, 1}).contiguous();
    return AT_DISPATCH_FLOATING_TYPES(geo.acc, "per_sample_conv2d_fwd_winograd", [&] {
      return with_wino(algo, [&](auto m, auto isa) {
        using W = typename decltype(isa)::type;
        return W::template forward<scalar_t, decltype(m)::value>(x, kt, nullptr, bias, geo);
      });
    });
  }
  const bool has_bias = bias.has_value() && bias->defined();
  for_each_sample(0, geo.n, sample_threads(geo.weight_bytes()), [&](int64_t n) {
    Tensor wn = weights.select(0, n);
    if (wn.scalar_type() != geo.acc) wn = wn.to(geo.acc);
    c10::optional<Tensor> bn;
    if (has_bias) bn = bias->select(0, n);
    y.narrow(0, n, 1).copy_(conv_forward(sample_of(x, n, geo.acc), wn, bn, geo));
  });
  return y;
}

std::tuple<Tensor, Tensor> per_sample_conv2d_bwd(const Tensor& g, const Tensor& x,
                                                 const Tensor& weights, at::IntArrayRef stride,
                                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                                 int64_t groups) {
  check_cpu_dense(weights, "weights");
  MK_CHECK(weights.dim() == 5,
           "weights: expected a rank-5 (N, C2, C1/groups, kh, kw) tensor, "
           "got rank ",
           weights.dim(), " with shape ", weights.sizes());
  const Geometry geo = check_conv(x, weights.sizes(), "weights", stride, padding, dilation, groups);
  check_per_sample_weights(weights, geo);
  check_grad(g, geo);
  at::AutoDispatchBelowADInplaceOrView guard;

  const ConvAlgo algo = geo.n == 0 ? ConvAlgo::kAten : choose_algo(geo);
  if (algo != ConvAlgo::kAten) {
    const Tensor kt = weights.to(geo.acc).permute({0, 1, 3, 4, 2}).contiguous();
    return AT_DISPATCH_FLOATING_TYPES(geo.acc, "per_sample_conv2d_bwd_winograd", [&] {
      return with_wino(algo, [&](auto m, auto isa) {
        using W = typename decltype(isa)::type;
        constexpr int M = decltype(m)::value;
        Tensor dwt = at::empty({geo.n, geo.c2, 3, 3, geo.c1}, kt.options());
        scalar_t* dwp = dwt.template mutable_data_ptr<scalar_t>();
        Tensor dx = W::template backward<scalar_t, M>(
            g, x, kt, nullptr, geo,
            [&](int64_t n0, int64_t o0, const WinoGeo& wg, const scalar_t* dup) {
              // (n, o) rows of dwt (N, C2, 3, 3, C1); wg.c2 == C2 whenever wg.n > 1.
              scalar_t* dwn = dwp + (n0 * geo.c2 + o0) * 9 * geo.c1;
              wino_for(wg.n * wg.c2, wino_weight_grain(wg.c1), [&](int64_t b, int64_t e) {
                W::template weight_grad_per_sample<scalar_t, M>(dup, dwn, wg, b, e);
              });
            });
        return std::make_tuple(dx, dwt.permute({0, 1, 4, 2, 3}).contiguous());
      });
    });
  }
  Tensor dx = at::empty(x.sizes(), x.options().memory_format(geo.format));
  Tensor dweights = at::empty(weights.sizes(), weights.options().dtype(geo.acc));
  for_each_sample(0, geo.n, sample_threads(geo.weight_bytes()), [&](int64_t n) {
    Tensor wn = weights.select(0, n);
    if (wn.scalar_type() != geo.acc) wn = wn.to(geo.acc);
    auto [dxn, gw] = conv_backward(sample_of(g, n, geo.acc), sample_of(x, n, geo.acc), wn, geo);
    dx.narrow(0, n, 1).copy_(dxn);
    dweights.select(0, n).copy_(gw);
  });
  return {dx, dweights};
}

Tensor aw_conv2d_fwd(const Tensor& x, const Tensor& weight, const Tensor& scale,
                     const c10::optional<Tensor>& bias, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_weight_rank(weight);
  const Geometry geo = check_conv(x, weight.sizes(), "weight", stride, padding, dilation, groups);
  check_shared_weight(weight, geo);
  check_scale(scale, geo);
  check_bias(bias, geo);
  at::AutoDispatchBelowADInplaceOrView guard;

  Tensor y = at::empty({geo.n, geo.c2, geo.ho, geo.wo}, x.options().memory_format(geo.format));
  if (geo.n == 0) return y;
  const ConvAlgo algo = choose_algo(geo);
  if (algo != ConvAlgo::kAten) {
    const Tensor kt = weight.to(geo.acc).permute({1, 2, 3, 0}).contiguous();
    const Tensor scale_t = scale.permute({0, 2, 3, 1}).contiguous();
    return AT_DISPATCH_FLOATING_TYPES(geo.acc, "aw_conv2d_fwd_winograd", [&] {
      return with_wino(algo, [&](auto m, auto isa) {
        using W = typename decltype(isa)::type;
        return W::template forward<scalar_t, decltype(m)::value>(x, kt, &scale_t, bias, geo);
      });
    });
  }
  const Tensor wa = weight.to(geo.acc).contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t cg = weight.size(1), taps = geo.kh * geo.kw;
  AT_DISPATCH_FLOATING_TYPES(geo.acc, "aw_conv2d_fwd", [&] {
    for_each_sample(0, geo.n, sample_threads(geo.weight_bytes()), [&](int64_t n) {
      Tensor wn = at::empty_like(wa);
      scale_weight<scalar_t>(wa.const_data_ptr<scalar_t>(),
                             scale.const_data_ptr<scalar_t>() + n * geo.c2 * taps,
                             wn.mutable_data_ptr<scalar_t>(), geo.c2, cg, taps);
      c10::optional<Tensor> bn;
      if (has_bias) bn = bias->select(0, n);
      y.narrow(0, n, 1).copy_(conv_forward(sample_of(x, n, geo.acc), wn, bn, geo));
    });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> aw_conv2d_bwd(const Tensor& g, const Tensor& x,
                                                 const Tensor& weight, const Tensor& scale,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, int64_t groups) {
  check_weight_rank(weight);
  const Geometry geo = check_conv(x, weight.sizes(), "weight", stride, padding, dilation, groups);
  check_shared_weight(weight, geo);
  check_scale(scale, geo);
  check_grad(g, geo);
  at::AutoDispatchBelowADInplaceOrView guard;

  Tensor dx = at::empty(x.sizes(), x.options().memory_format(geo.format));
  Tensor dweight = at::zeros(weight.sizes(), weight.options().dtype(geo.acc));
  Tensor dscale = at::empty(scale.sizes(), scale.options());
  if (geo.n == 0) return {dx, dweight, dscale};
  const ConvAlgo algo = choose_algo(geo);
  if (algo != ConvAlgo::kAten) {
    const Tensor kt = weight.to(geo.acc).permute({0, 2, 3, 1}).contiguous();
    AT_DISPATCH_FLOATING_TYPES(geo.acc, "aw_conv2d_bwd_winograd", [&] {
      with_wino(algo, [&](auto m, auto isa) {
        using W = typename decltype(isa)::type;
        constexpr int M = decltype(m)::value;
        Tensor dkt = at::zeros({geo.c2, 3, 3, geo.c1}, kt.options());
        const scalar_t* kp = kt.template const_data_ptr<scalar_t>();
        const scalar_t* sp = scale.template const_data_ptr<scalar_t>();
        scalar_t* dkp = dkt.template mutable_data_ptr<scalar_t>();
        scalar_t* dsp = dscale.template mutable_data_ptr<scalar_t>();
        // Chunks (or, in blocked mode, single samples) come in sample order and each
        // folds its samples in order: dkt's sums run over n = 0, 1, ... whatever the
        // chunking, blocking or thread count.
        dx = W::template backward<scalar_t, M>(
            g, x, kt, &scale, geo,
            [&](int64_t n0, int64_t o0, const WinoGeo& wg, const scalar_t* dup) {
              // Channels o0 .. o0 + wg.c2 - 1; wg.c2 == C2 whenever wg.n > 1.
              const int64_t off = (n0 * geo.c2 + o0) * 9;
              wino_for(wg.c2, 1, [&](int64_t b, int64_t e) {
                W::template weight_grad_fold<scalar_t, M>(dup, kp + o0 * 9 * geo.c1, sp + off,
                                                          dkp + o0 * 9 * geo.c1, dsp + off, wg, b,
                                                          e);
              });
            });
        dweight = dkt.permute({0, 3, 1, 2}).contiguous();
        return 0;
      });
    });
    return {dx, dweight, dscale};
  }
  const Tensor wa = weight.to(geo.acc).contiguous();
  const int64_t cg = weight.size(1), taps = geo.kh * geo.kw;
  // Samples go in waves of one per thread; a wave's G_n are kept (wave weights'
  // worth) and then folded in sample order, so the sums do not depend on which
  // thread computed what.
  const int64_t wave = sample_threads(geo.weight_bytes());
  std::vector<Tensor> gws(wave);
  const int64_t fold_grain =
      std::max<int64_t>(1, kMinFoldElems / std::max<int64_t>(cg * taps * wave, 1));
  AT_DISPATCH_FLOATING_TYPES(geo.acc, "aw_conv2d_bwd", [&] {
    const scalar_t* sp = scale.const_data_ptr<scalar_t>();
    const scalar_t* wp = wa.const_data_ptr<scalar_t>();
    scalar_t* dwp = dweight.mutable_data_ptr<scalar_t>();
    scalar_t* dsp = dscale.mutable_data_ptr<scalar_t>();
    for (int64_t w0 = 0; w0 < geo.n; w0 += wave) {
      const int64_t count = std::min(wave, geo.n - w0);
      for_each_sample(w0, w0 + count, wave, [&](int64_t n) {
        Tensor wn = at::empty_like(wa);
        scale_weight<scalar_t>(wp, sp + n * geo.c2 * taps, wn.mutable_data_ptr<scalar_t>(), geo.c2,
                               cg, taps);
        auto [dxn, gw] = conv_backward(sample_of(g, n, geo.acc), sample_of(x, n, geo.acc), wn, geo);
        dx.narrow(0, n, 1).copy_(dxn);
        // oneDNN may hand G_n back channels_last when x is.
        gws[n - w0] = gw.contiguous();
      });
      at::parallel_for(0, geo.c2, fold_grain, [&](int64_t ob, int64_t oe) {
        for (int64_t i = 0; i < count; ++i) {
          const int64_t n = w0 + i;
          const int64_t off = ob * cg * taps;
          fold_weight_grad<scalar_t>(gws[i].const_data_ptr<scalar_t>() + off, wp + off,
                                     sp + (n * geo.c2 + ob) * taps, dwp + off,
                                     dsp + (n * geo.c2 + ob) * taps, oe - ob, cg, taps);
        }
      });
    }
  });
  return {dx, dweight, dscale};
}

}  // namespace

TORCH_LIBRARY_IMPL(manet_kernels, CPU, m) {
  m.impl("_per_sample_conv2d_fwd", &per_sample_conv2d_fwd);
  m.impl("_per_sample_conv2d_bwd", &per_sample_conv2d_bwd);
  m.impl("_aw_conv2d_fwd", &aw_conv2d_fwd);
  m.impl("_aw_conv2d_bwd", &aw_conv2d_bwd);
}
