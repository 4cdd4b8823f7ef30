// CPU kernels for AW-convolution and per-sample convolution (DESIGN.md section 2).
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
  MK_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              name, ": expected dtype float32, float64, bfloat16 or float16, got ", st);
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  MK_CHECK(false, name,
              ": expected NCHW-contiguous or channels_last-contiguous strides, got shape ",
              t.sizes(), " with strides ", t.strides(), " (make it contiguous before calling)");
  return at::MemoryFormat::Contiguous;  // unreachable
}

// `dims` names the expected shape, e.g. "(N, C2)".
void check_small(const Tensor& t, const char* name, const char* dims, at::IntArrayRef sizes,
                 at::ScalarType dtype, const char* why) {
  check_cpu_dense(t, name);
  MK_CHECK(t.sizes() == sizes, name, ": expected shape ", dims, " = ", sizes, ", got ",
              t.sizes());
  MK_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, " (", why, "), got ",
              t.scalar_type());
  MK_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ",
              t.strides());
}

std::array<int64_t, 2> check_pair(at::IntArrayRef v, const char* name, int64_t minimum) {
  MK_CHECK(v.size() == 2, name, ": expected two values (height, width), got ", v);
  MK_CHECK(v[0] >= minimum && v[1] >= minimum, name, ": expected values >= ", minimum,
              ", got ", v);
  return {v[0], v[1]};
}

struct Geometry {
  int64_t n, c1, h, w;    // x
  int64_t c2, kh, kw;     // weight(s)
  int64_t ho, wo;         // y
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
  MK_CHECK(geo.c2 % groups == 0, "groups: must divide ", wname, "'s output channel count C2 = ",
              geo.c2, ", got groups = ", groups);
  MK_CHECK(wsizes[r - 3] * groups == geo.c1, wname, ": expected C1/groups = ", geo.c1, "/",
              groups, " = ", geo.c1 / groups, " input channels (dim ", r - 3, "), got shape ",
              wsizes);
  MK_CHECK(geo.kh >= 1 && geo.kw >= 1, wname, ": expected a kernel of at least 1x1, got shape ",
              wsizes);
  const int64_t span_h = geo.h + 2 * geo.padding[0] - geo.dilation[0] * (geo.kh - 1) - 1;
  const int64_t span_w = geo.w + 2 * geo.padding[1] - geo.dilation[1] * (geo.kw - 1) - 1;
  MK_CHECK(geo.h >= 1 && geo.w >= 1 && span_h >= 0 && span_w >= 0,
              "x: spatial size (", geo.h, ", ", geo.w, ") with padding (", geo.padding[0], ", ",
              geo.padding[1], ") is smaller than the dilated kernel (",
              geo.dilation[0] * (geo.kh - 1) + 1, ", ", geo.dilation[1] * (geo.kw - 1) + 1, ")");
  geo.ho = span_h / geo.stride[0] + 1;
  geo.wo = span_w / geo.stride[1] + 1;
  geo.groups = groups;
  return geo;
}

void check_per_sample_weights(const Tensor& weights, const Geometry& geo) {
  check_cpu_dense(weights, "weights");
  MK_CHECK(weights.dim() == 5, "weights: expected a rank-5 (N, C2, C1/groups, kh, kw) tensor, "
              "got rank ", weights.dim(), " with shape ", weights.sizes());
  MK_CHECK(weights.size(0) == geo.n, "weights: expected one kernel per sample of x (N = ",
              geo.n, "), got shape ", weights.sizes());
  MK_CHECK(weights.scalar_type() == geo.dtype, "weights: expected x's dtype ", geo.dtype,
              ", got ", weights.scalar_type());
  MK_CHECK(weights.is_contiguous(), "weights: expected a contiguous tensor, got strides ",
              weights.strides());
}

void check_shared_weight(const Tensor& weight, const Geometry& geo) {
  MK_CHECK(weight.scalar_type() == geo.dtype, "weight: expected x's dtype ", geo.dtype,
              ", got ", weight.scalar_type());
  MK_CHECK(weight.is_contiguous(), "weight: expected a contiguous tensor, got strides ",
              weight.strides());
}

// Rank and device of a weight before its sizes are used for the geometry.
void check_weight_rank(const Tensor& weight) {
  check_cpu_dense(weight, "weight");
  MK_CHECK(weight.dim() == 4, "weight: expected a rank-4 (C2, C1/groups, kh, kw) tensor, got "
              "rank ", weight.dim(), " with shape ", weight.sizes());
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
  auto r = at::convolution_backward(gn, xn, wn, c10::nullopt, geo.stride, geo.padding,
                                    geo.dilation, /*transposed=*/false, {0, 0}, geo.groups,
                                    {true, true, false});
  return {std::get<0>(r), std::get<1>(r)};
}

// wn[o, c, t] = wa[o, c, t] * s[o, t], t the kh*kw tap.
template <typename acc_t>
void scale_weight(const acc_t* __restrict__ wa, const acc_t* __restrict__ s,
                  acc_t* __restrict__ wn, int64_t c2, int64_t cg, int64_t taps) {
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

// How many samples run side by side: one per thread (see for_each_sample).
int64_t sample_threads(int64_t weight_bytes) {
  if (at::in_parallel_region()) return 1;
  const int64_t threads = at::get_num_threads();
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
// channel sum is one batched GEMM (at::bmm, BLAS) over N * a*a matrices.
//
// Error: fp32 F(2,3) is as accurate as a direct conv (max |err| / max |ref| ~4e-7
// against fp64 at 16 channels, randn inputs, scale in [1, 2)). F(4,3)'s transforms have
// entries up to 8 and 1/24 and lose about 3 more bits (~4e-6 there); see
// kWinoF4MaxChannels for where it is used.

// The Winograd kernels are compiled for AVX2 + FMA (the build has no -march) and run
// only on CPUs that have both (see wino_cpu_ok); elsewhere the ATen path runs.
#pragma GCC push_options
#pragma GCC target("avx2,fma,tune=haswell")

template <int M>
struct WinoMats;

template <>
struct WinoMats<2> {
  static constexpr int A = 4;
  static constexpr double BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  static constexpr double AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

template <>
struct WinoMats<4> {
  static constexpr int A = 6;
  static constexpr double BT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0},
                                      {0, 4, -4, -1, 1, 0}, {0, -2, -1, 2, 1, 0},
                                      {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr double G[6][3] = {{1.0 / 4, 0, 0},
                                     {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                     {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                     {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                     {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                     {0, 0, 1}};
  static constexpr double AT[4][6] = {{1, 1, 1, 1, 1, 0},
                                      {0, 1, -1, 2, -2, 0},
                                      {0, 1, 1, 4, 4, 0},
                                      {0, 1, -1, 8, -8, 1}};
};

// One 1-D transform out[o] = sum_i C(o, i) in[i], as coefficient tables the
// compiler sees: zero terms vanish and +-1 become adds (no -ffast-math needed).
template <int M> struct CoefBT  { static constexpr int K = M + 2; static constexpr double at(int o, int i) { return WinoMats<M>::BT[o][i]; } };
template <int M> struct CoefBTt { static constexpr int K = M + 2; static constexpr double at(int o, int i) { return WinoMats<M>::BT[i][o]; } };
template <int M> struct CoefAT  { static constexpr int K = M + 2; static constexpr double at(int o, int i) { return WinoMats<M>::AT[o][i]; } };
template <int M> struct CoefATt { static constexpr int K = M; static constexpr double at(int o, int i) { return WinoMats<M>::AT[i][o]; } };
template <int M> struct CoefG   { static constexpr int K = 3; static constexpr double at(int o, int i) { return WinoMats<M>::G[o][i]; } };
template <int M> struct CoefGt  { static constexpr int K = M + 2; static constexpr double at(int o, int i) { return WinoMats<M>::G[i][o]; } };

// The sum starts at the first nonzero term, so no 0 + x is left for the compiler to
// keep (it must, for -0.0, without -ffast-math). S is the element type of V.
template <typename Coef, int O, int I, bool Started, typename S, typename V>
C10_ALWAYS_INLINE V row_sum(const V* x, V acc) {
  if constexpr (I == Coef::K) {
    static_assert(Started, "a transform row with no nonzero coefficient");
    return acc;
  } else {
    constexpr double c = Coef::at(O, I);
    if constexpr (c == 0) {
      return row_sum<Coef, O, I + 1, Started, S>(x, acc);
    } else {
      V term;
      if constexpr (c == 1) term = x[I];
      else if constexpr (c == -1) term = -x[I];
      else term = S(c) * x[I];
      if constexpr (Started) return row_sum<Coef, O, I + 1, true, S>(x, acc + term);
      else return row_sum<Coef, O, I + 1, true, S>(x, term);
    }
  }
}

template <typename Coef, typename S, typename V, int... O>
C10_ALWAYS_INLINE void apply_rows(const V* x, V* y, std::integer_sequence<int, O...>) {
  ((y[O] = row_sum<Coef, O, 0, false, S>(x, V{})), ...);
}

// 32-byte GCC vector of T: two SSE registers without -mavx, one AVX register with it.
// Explicit vectors because the loop vectoriser gives up on the small per-element
// arrays these transforms need.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  // The same vector at T's alignment, for unaligned loads and stores.
  typedef T unaligned __attribute__((vector_size(32), aligned(alignof(T))));
  static constexpr int width = 32 / sizeof(T);
};

template <typename T>
C10_ALWAYS_INLINE typename Vec<T>::type vload(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::unaligned*>(p);
}

template <typename T>
C10_ALWAYS_INLINE void vstore(T* p, typename Vec<T>::type v) {
  *reinterpret_cast<typename Vec<T>::unaligned*>(p) = v;
}

// out[o][c] = sum_i Coef(o, i) * in[i][c] for c < len; R outputs from K inputs.
template <typename Coef, int R, int K, typename T>
C10_ALWAYS_INLINE void apply1d(const T* const* in, T* const* out, int64_t len) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  int64_t c = 0;
  for (; c + W <= len; c += W) {
    V x[K], y[R];
    for (int i = 0; i < K; ++i) x[i] = vload(in[i] + c);
    apply_rows<Coef, T>(x, y, std::make_integer_sequence<int, R>{});
    for (int o = 0; o < R; ++o) vstore(out[o] + c, y[o]);
  }
  for (; c < len; ++c) {
    T x[K], y[R];
    for (int i = 0; i < K; ++i) x[i] = in[i][c];
    apply_rows<Coef, T>(x, y, std::make_integer_sequence<int, R>{});
    for (int o = 0; o < R; ++o) out[o][c] = y[o];
  }
}

// Channels per block of a transform: its a*a scratch rows stay in L1.
constexpr int64_t kWinoChannelBlock = 64;

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

// V (N, a*a, tiles, C1) from x (N, H, W, C1); work items are (sample, tile row).
template <typename T, int M>
void wino_input_transform(const T* x, T* v, const WinoGeo& g, int64_t begin, int64_t end) {
  constexpr int A = M + 2;
  const int64_t cb_max = std::min(kWinoChannelBlock, g.c1);
  std::vector<T> tmp(A * A * cb_max), zeros(cb_max, T(0));
  const T* in[A];
  T* out[A];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / g.th, ti = item % g.th;
    for (int64_t tj = 0; tj < g.tw; ++tj) {
      const int64_t t = ti * g.tw + tj;
      for (int64_t c0 = 0; c0 < g.c1; c0 += cb_max) {
        const int64_t cb = std::min(cb_max, g.c1 - c0);
        for (int j = 0; j < A; ++j) {
          const int64_t col = tj * M + j - g.pw;
          for (int i = 0; i < A; ++i) {
            const int64_t row = ti * M + i - g.ph;
            in[i] = (row >= 0 && row < g.h && col >= 0 && col < g.w)
                        ? x + ((n * g.h + row) * g.w + col) * g.c1 + c0
                        : zeros.data();
            out[i] = tmp.data() + (i * A + j) * cb;
          }
          apply1d<CoefBT<M>, A, A>(in, out, cb);
        }
        for (int i = 0; i < A; ++i) {
          for (int j = 0; j < A; ++j) {
            in[j] = tmp.data() + (i * A + j) * cb;
            out[j] = v + ((n * A * A + i * A + j) * g.tiles + t) * g.c1 + c0;
          }
          apply1d<CoefBT<M>, A, A>(in, out, cb);
        }
      }
    }
  }
}

// y (N, Ho, Wo, C2) from M (N, a*a, tiles, C2), plus bias (N, C2) if given.
template <typename T, int M>
void wino_output_transform(const T* mm, const T* bias, T* y, const WinoGeo& g, int64_t begin,
                           int64_t end) {
  constexpr int A = M + 2;
  const int64_t cb_max = std::min(kWinoChannelBlock, g.c2);
  std::vector<T> tmp(M * A * cb_max), tile(M * M * cb_max);
  const T* in[A];
  T* out[A];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / g.th, ti = item % g.th;
    for (int64_t tj = 0; tj < g.tw; ++tj) {
      const int64_t t = ti * g.tw + tj;
      for (int64_t c0 = 0; c0 < g.c2; c0 += cb_max) {
        const int64_t cb = std::min(cb_max, g.c2 - c0);
        for (int j = 0; j < A; ++j) {
          for (int i = 0; i < A; ++i) in[i] = mm + ((n * A * A + i * A + j) * g.tiles + t) * g.c2 + c0;
          for (int i = 0; i < M; ++i) out[i] = tmp.data() + (i * A + j) * cb;
          apply1d<CoefAT<M>, M, A>(in, out, cb);
        }
        for (int i = 0; i < M; ++i) {
          for (int j = 0; j < A; ++j) in[j] = tmp.data() + (i * A + j) * cb;
          for (int j = 0; j < M; ++j) out[j] = tile.data() + (i * M + j) * cb;
          apply1d<CoefAT<M>, M, A>(in, out, cb);
        }
        for (int i = 0; i < M; ++i) {
          const int64_t row = ti * M + i;
          if (row >= g.ho) break;
          for (int j = 0; j < M; ++j) {
            const int64_t col = tj * M + j;
            if (col >= g.wo) break;
            const T* src = tile.data() + (i * M + j) * cb;
            T* dst = y + ((n * g.ho + row) * g.wo + col) * g.c2 + c0;
            if (bias) {
              const T* b = bias + n * g.c2 + c0;
#pragma omp simd
              for (int64_t c = 0; c < cb; ++c) dst[c] = src[c] + b[c];
            } else {
#pragma omp simd
              for (int64_t c = 0; c < cb; ++c) dst[c] = src[c];
            }
          }
        }
      }
    }
  }
}

// dM (N, a*a, tiles, C2) from g (N, Ho, Wo, C2).
template <typename T, int M>
void wino_grad_transform(const T* gy, T* dm, const WinoGeo& g, int64_t begin, int64_t end) {
  constexpr int A = M + 2;
  const int64_t cb_max = std::min(kWinoChannelBlock, g.c2);
  std::vector<T> tmp(A * M * cb_max), zeros(cb_max, T(0));
  const T* in[A];
  T* out[A];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / g.th, ti = item % g.th;
    for (int64_t tj = 0; tj < g.tw; ++tj) {
      const int64_t t = ti * g.tw + tj;
      for (int64_t c0 = 0; c0 < g.c2; c0 += cb_max) {
        const int64_t cb = std::min(cb_max, g.c2 - c0);
        for (int j = 0; j < M; ++j) {
          const int64_t col = tj * M + j;
          for (int i = 0; i < M; ++i) {
            const int64_t row = ti * M + i;
            in[i] = (row < g.ho && col < g.wo) ? gy + ((n * g.ho + row) * g.wo + col) * g.c2 + c0
                                               : zeros.data();
          }
          for (int i = 0; i < A; ++i) out[i] = tmp.data() + (i * M + j) * cb;
          apply1d<CoefATt<M>, A, M>(in, out, cb);
        }
        for (int i = 0; i < A; ++i) {
          for (int j = 0; j < M; ++j) in[j] = tmp.data() + (i * M + j) * cb;
          for (int j = 0; j < A; ++j) out[j] = dm + ((n * A * A + i * A + j) * g.tiles + t) * g.c2 + c0;
          apply1d<CoefATt<M>, A, M>(in, out, cb);
        }
      }
    }
  }
}

// dx (N, H, W, C1, zeroed) += B dV B^T over tile rows ti = parity, parity + 2, ...:
// windows of tile rows two apart never overlap, so each parity runs in parallel and
// every dx element sums its tiles in the same order whatever the thread count.
template <typename T, int M>
void wino_input_grad_transform(const T* dv, T* dx, const WinoGeo& g, int64_t parity,
                               int64_t begin, int64_t end) {
  constexpr int A = M + 2;
  const int64_t cb_max = std::min(kWinoChannelBlock, g.c1);
  const int64_t rows = (g.th - parity + 1) / 2;
  std::vector<T> tmp(A * A * cb_max), tile(A * A * cb_max);
  const T* in[A];
  T* out[A];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / rows, ti = parity + 2 * (item % rows);
    for (int64_t tj = 0; tj < g.tw; ++tj) {
      const int64_t t = ti * g.tw + tj;
      for (int64_t c0 = 0; c0 < g.c1; c0 += cb_max) {
        const int64_t cb = std::min(cb_max, g.c1 - c0);
        for (int j = 0; j < A; ++j) {
          for (int i = 0; i < A; ++i) {
            in[i] = dv + ((n * A * A + i * A + j) * g.tiles + t) * g.c1 + c0;
            out[i] = tmp.data() + (i * A + j) * cb;
          }
          apply1d<CoefBTt<M>, A, A>(in, out, cb);
        }
        for (int i = 0; i < A; ++i) {
          for (int j = 0; j < A; ++j) {
            in[j] = tmp.data() + (i * A + j) * cb;
            out[j] = tile.data() + (i * A + j) * cb;
          }
          apply1d<CoefBTt<M>, A, A>(in, out, cb);
        }
        for (int i = 0; i < A; ++i) {
          const int64_t row = ti * M + i - g.ph;
          if (row < 0 || row >= g.h) continue;
          for (int j = 0; j < A; ++j) {
            const int64_t col = tj * M + j - g.pw;
            if (col < 0 || col >= g.w) continue;
            const T* src = tile.data() + (i * A + j) * cb;
            T* dst = dx + ((n * g.h + row) * g.w + col) * g.c1 + c0;
#pragma omp simd
            for (int64_t c = 0; c < cb; ++c) dst[c] += src[c];
          }
        }
      }
    }
  }
}

// U (N, a*a, R, L) from a kernel kt (R, 3, 3, L), or per sample (N, R, 3, 3, L) when
// scale is null; work items are (sample, r), L the vectorised index. With scale
// (N, R, 3, 3) (inner_scale false) the tap's factor is a scalar per (n, r); with scale
// (N, 3, 3, L) (inner_scale true) a vector over L. The forward wants U as (c, o), the
// backward as (o, c): both are written directly, never transposed.
template <typename T, int M>
void wino_weight_transform(const T* kt, const T* scale, bool inner_scale, T* u, int64_t nn,
                           int64_t rr, int64_t ll, int64_t begin, int64_t end) {
  constexpr int A = M + 2;
  const int64_t cb_max = std::min(kWinoChannelBlock, ll);
  std::vector<T> ks(9 * cb_max), tmp(A * 3 * cb_max);
  const T* in[A];
  T* out[A];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / rr, r = item % rr;
    const T* k = kt + (scale ? r : item) * 9 * ll;
    for (int64_t c0 = 0; c0 < ll; c0 += cb_max) {
      const int64_t cb = std::min(cb_max, ll - c0);
      if (scale) {
        for (int tap = 0; tap < 9; ++tap) {
          const T* src = k + tap * ll + c0;
          T* dst = ks.data() + tap * cb;
          if (inner_scale) {
            const T* st = scale + (n * 9 + tap) * ll + c0;
            for (int64_t c = 0; c < cb; ++c) dst[c] = src[c] * st[c];
          } else {
            const T st = scale[item * 9 + tap];
            for (int64_t c = 0; c < cb; ++c) dst[c] = src[c] * st;
          }
        }
      }
      for (int j = 0; j < 3; ++j) {
        for (int i = 0; i < 3; ++i)
          in[i] = scale ? ks.data() + (i * 3 + j) * cb : k + (i * 3 + j) * ll + c0;
        for (int i = 0; i < A; ++i) out[i] = tmp.data() + (i * 3 + j) * cb;
        apply1d<CoefG<M>, A, 3>(in, out, cb);
      }
      for (int i = 0; i < A; ++i) {
        for (int j = 0; j < 3; ++j) in[j] = tmp.data() + (i * 3 + j) * cb;
        for (int j = 0; j < A; ++j) out[j] = u + ((n * A * A + i * A + j) * rr + r) * ll + c0;
        apply1d<CoefG<M>, A, 3>(in, out, cb);
      }
    }
  }
  (void)nn;
}

// C (m x n, row stride ldc) = A B for each batch item, A (m x k) read as
// a[i * sai + l * sak] and B (k x n) row-major with row stride ldb: register tiles of
// 6 rows x two vectors, B read in place (a zero-padded copy for the last columns).
// Hand-written because MKL's batched GEMM ran these small shapes (e.g. 49 x 64 x 64)
// at a third of the machine's conv rate on AMD.
template <typename T, int MR>
C10_ALWAYS_INLINE void gemm_tile(int64_t k, const T* a, int64_t sai, int64_t sak, const T* b,
                                 int64_t ldb, T* c, int64_t ldc, int64_t nr) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  V acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = V{};
  for (int64_t l = 0; l < k; ++l) {
    const V b0 = vload(b + l * ldb), b1 = vload(b + l * ldb + W);
    const T* al = a + l * sak;
    for (int r = 0; r < MR; ++r) {
      const T av = al[r * sai];
      acc0[r] += av * b0;
      acc1[r] += av * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    if (nr == 2 * W) {
      vstore(c + r * ldc, acc0[r]);
      vstore(c + r * ldc + W, acc1[r]);
    } else {
      T row[2 * W];
      std::memcpy(row, &acc0[r], sizeof(V));
      std::memcpy(row + W, &acc1[r], sizeof(V));
      for (int64_t j = 0; j < nr; ++j) c[r * ldc + j] = row[j];
    }
  }
}

template <typename T>
void small_gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t sai, int64_t sak,
                const T* b, int64_t ldb, T* c, int64_t ldc, std::vector<T>& pack) {
  constexpr int NR = 2 * Vec<T>::width, MR = 6;
  for (int64_t j0 = 0; j0 < n; j0 += NR) {
    const int64_t nr = std::min<int64_t>(NR, n - j0);
    const T* bp = b + j0;
    int64_t ldp = ldb;
    if (nr < NR) {
      pack.assign(k * NR, T(0));
      for (int64_t l = 0; l < k; ++l)
        for (int64_t j = 0; j < nr; ++j) pack[l * NR + j] = b[l * ldb + j0 + j];
      bp = pack.data();
      ldp = NR;
    }
    int64_t i0 = 0;
    for (; i0 + MR <= m; i0 += MR)
      gemm_tile<T, MR>(k, a + i0 * sai, sai, sak, bp, ldp, c + i0 * ldc + j0, ldc, nr);
    const T* ai = a + i0 * sai;
    T* ci = c + i0 * ldc + j0;
    switch (m - i0) {
      case 5: gemm_tile<T, 5>(k, ai, sai, sak, bp, ldp, ci, ldc, nr); break;
      case 4: gemm_tile<T, 4>(k, ai, sai, sak, bp, ldp, ci, ldc, nr); break;
      case 3: gemm_tile<T, 3>(k, ai, sai, sak, bp, ldp, ci, ldc, nr); break;
      case 2: gemm_tile<T, 2>(k, ai, sai, sak, bp, ldp, ci, ldc, nr); break;
      case 1: gemm_tile<T, 1>(k, ai, sai, sak, bp, ldp, ci, ldc, nr); break;
      default: break;
    }
  }
}

// small_gemm over `batch` items, item i offset by the given element strides.
template <typename T>
void batched_gemm(int64_t batch, int64_t m, int64_t n, int64_t k, const T* a, int64_t stride_a,
                  int64_t sai, int64_t sak, const T* b, int64_t stride_b, int64_t ldb, T* c,
                  int64_t stride_c, int64_t ldc) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> pack;
    for (int64_t i = begin; i < end; ++i)
      small_gemm<T>(m, n, k, a + i * stride_a, sai, sak, b + i * stride_b, ldb,
                    c + i * stride_c, ldc, pack);
  });
}

// G_n = G^T dU_n G for one (n, o), channels [c0, c0 + cb), into gw (9, cb).
template <typename T, int M>
C10_ALWAYS_INLINE void wino_weight_grad_tile(const T* du, T* tmp, T* gw, const WinoGeo& g,
                                             int64_t n, int64_t o, int64_t c0, int64_t cb) {
  constexpr int A = M + 2;
  const T* in[A];
  T* out[A];
  for (int j = 0; j < A; ++j) {
    for (int i = 0; i < A; ++i) in[i] = du + ((n * A * A + i * A + j) * g.c2 + o) * g.c1 + c0;
    for (int i = 0; i < 3; ++i) out[i] = tmp + (i * A + j) * cb;
    apply1d<CoefGt<M>, 3, A>(in, out, cb);
  }
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < A; ++j) in[j] = tmp + (i * A + j) * cb;
    for (int j = 0; j < 3; ++j) out[j] = gw + (i * 3 + j) * cb;
    apply1d<CoefGt<M>, 3, A>(in, out, cb);
  }
}

// dkt (C2, 3, 3, C1, zeroed) += sum_n scale_n * G_n and dscale_n = sum_c kt * G_n, n in
// increasing order; work items are output channels o.
template <typename T, int M>
void wino_weight_grad_fold(const T* du, const T* kt, const T* scale, T* dkt, T* dscale,
                           const WinoGeo& g, int64_t begin, int64_t end) {
  constexpr int A = M + 2;
  const int64_t cb_max = std::min(kWinoChannelBlock, g.c1);
  std::vector<T> tmp(3 * A * cb_max), gw(9 * cb_max);
  for (int64_t o = begin; o < end; ++o) {
    for (int64_t n = 0; n < g.n; ++n) {
      const T* s = scale + (n * g.c2 + o) * 9;
      T* ds = dscale + (n * g.c2 + o) * 9;
      for (int tap = 0; tap < 9; ++tap) ds[tap] = T(0);
      for (int64_t c0 = 0; c0 < g.c1; c0 += cb_max) {
        const int64_t cb = std::min(cb_max, g.c1 - c0);
        wino_weight_grad_tile<T, M>(du, tmp.data(), gw.data(), g, n, o, c0, cb);
        for (int tap = 0; tap < 9; ++tap) {
          const T* gt = gw.data() + tap * cb;
          const T* k = kt + (o * 9 + tap) * g.c1 + c0;
          T* dk = dkt + (o * 9 + tap) * g.c1 + c0;
          const T st = s[tap];
          T acc = T(0);
#pragma omp simd reduction(+ : acc)
          for (int64_t c = 0; c < cb; ++c) {
            acc += k[c] * gt[c];
            dk[c] += st * gt[c];
          }
          ds[tap] += acc;
        }
      }
    }
  }
}

// dweights (N, C2, 3, 3, C1) = G_n for per-sample weights; work items are (n, o).
template <typename T, int M>
void wino_weight_grad_per_sample(const T* du, T* dwt, const WinoGeo& g, int64_t begin,
                                 int64_t end) {
  constexpr int A = M + 2;
  const int64_t cb_max = std::min(kWinoChannelBlock, g.c1);
  std::vector<T> tmp(3 * A * cb_max), gw(9 * cb_max);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / g.c2, o = item % g.c2;
    for (int64_t c0 = 0; c0 < g.c1; c0 += cb_max) {
      const int64_t cb = std::min(cb_max, g.c1 - c0);
      wino_weight_grad_tile<T, M>(du, tmp.data(), gw.data(), g, n, o, c0, cb);
      for (int tap = 0; tap < 9; ++tap) {
        const T* src = gw.data() + tap * cb;
        T* dst = dwt + (item * 9 + tap) * g.c1 + c0;
#pragma omp simd
        for (int64_t c = 0; c < cb; ++c) dst[c] = src[c];
      }
    }
  }
}

#pragma GCC pop_options

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
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
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
              "MANET_KERNELS_AW_CPU_ALGO: expected auto, aten, winograd2 or winograd4, got '",
              mode, "'");
  if (mode == "aten" || !wino_eligible(geo) || !wino_cpu_ok()) return ConvAlgo::kAten;
  if (mode == "winograd2") return ConvAlgo::kWino2;
  if (mode == "winograd4") return ConvAlgo::kWino4;
  return wino_auto(geo);
}

// An (N, C, H, W) tensor in the accumulation dtype whose (N, H, W, C) view is
// contiguous, i.e. channels_last strides.
Tensor hwc_buffer(int64_t n, int64_t c, int64_t h, int64_t w, const Geometry& geo,
                  const at::TensorOptions& opts, bool zero) {
  // at::zeros would drop the memory format.
  Tensor t = at::empty({n, c, h, w},
                       opts.dtype(geo.acc).memory_format(at::MemoryFormat::ChannelsLast));
  return zero ? t.zero_() : t;
}

// `t` (an activation in x's dtype and either format) as an (N, H, W, C)-contiguous
// tensor in the accumulation dtype; no copy when it already is one.
Tensor as_hwc(const Tensor& t, at::ScalarType acc) {
  return t.to(acc).permute({0, 2, 3, 1}).contiguous();
}

// A channels_last acc-dtype result in the output's dtype and memory format.
Tensor to_output(const Tensor& cl, const Geometry& geo) {
  if (geo.format == at::MemoryFormat::ChannelsLast && geo.dtype == geo.acc) return cl;
  Tensor out = at::empty(cl.sizes(), cl.options().dtype(geo.dtype).memory_format(geo.format));
  out.copy_(cl);
  return out;
}

template <typename F>
void wino_for(int64_t n, int64_t grain, const F& fn) {
  at::parallel_for(0, n, grain, fn);
}

int64_t wino_weight_grain(int64_t c1) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(c1, 1)); }

#pragma GCC push_options
#pragma GCC target("avx2,fma,tune=haswell")

// Samples go through in chunks of about this many transform-domain elements (U, V
// and the GEMM's output), in buffers reused from chunk to chunk: allocating them
// whole-batch cost ~20% of the time in page faults.
constexpr int64_t kWinoChunkElems = int64_t{1} << 20;

int64_t wino_chunk(const WinoGeo& g, int a) {
  const int64_t per_sample =
      int64_t{a} * a * (g.c1 * g.c2 + g.tiles * (g.c1 + g.c2));
  return std::clamp<int64_t>(kWinoChunkElems / std::max<int64_t>(per_sample, 1), 1, g.n);
}

// V (n*a*a, tiles, C1) of chunk geometry g from x as (n, H, W, C1).
template <typename T, int M>
void wino_input(const T* xp, T* vp, const WinoGeo& g) {
  wino_for(g.n * g.th, 1, [&](int64_t b, int64_t e) {
    wino_input_transform<T, M>(xp, vp, g, b, e);
  });
}

// U (n*a*a, R, L); see wino_weight_transform.
template <typename T, int M>
void wino_weights(const T* kp, const T* sp, bool inner_scale, T* up, int64_t n, int64_t rr,
                  int64_t ll) {
  wino_for(n * rr, wino_weight_grain(ll), [&](int64_t b, int64_t e) {
    wino_weight_transform<T, M>(kp, sp, inner_scale, up, n, rr, ll, b, e);
  });
}

// kt: the kernel as (C1, 3, 3, C2), or per sample (N, C1, 3, 3, C2); scale_t
// (N, 3, 3, C2) or null.
template <typename T, int M>
Tensor wino_forward(const Tensor& x, const Tensor& kt, const Tensor* scale_t,
                    const c10::optional<Tensor>& bias, const Geometry& geo) {
  constexpr int A = M + 2;
  const WinoGeo full = wino_geometry(geo, M);
  const auto opts = x.options().dtype(geo.acc);
  const Tensor xh = as_hwc(x, geo.acc);
  Tensor y = hwc_buffer(full.n, full.c2, full.ho, full.wo, geo, opts, false);
  const int64_t chunk = wino_chunk(full, A);
  Tensor u = at::empty({chunk * A * A, full.c1, full.c2}, opts);
  Tensor v = at::empty({chunk * A * A, full.tiles, full.c1}, opts);
  Tensor mm = at::empty({chunk * A * A, full.tiles, full.c2}, opts);
  const T* kp = kt.const_data_ptr<T>();
  const T* sp = scale_t ? scale_t->const_data_ptr<T>() : nullptr;
  const T* xp = xh.const_data_ptr<T>();
  const T* bp = bias.has_value() && bias->defined() ? bias->const_data_ptr<T>() : nullptr;
  T* yp = y.mutable_data_ptr<T>();
  T* up = u.mutable_data_ptr<T>();
  T* vp = v.mutable_data_ptr<T>();
  T* mp = mm.mutable_data_ptr<T>();
  for (int64_t n0 = 0; n0 < full.n; n0 += chunk) {
    WinoGeo g = full;
    g.n = std::min(chunk, full.n - n0);
    wino_weights<T, M>(sp ? kp : kp + n0 * g.c1 * 9 * g.c2, sp ? sp + n0 * 9 * g.c2 : nullptr,
                       true, up, g.n, g.c1, g.c2);  // U as (c, o)
    wino_input<T, M>(xp + n0 * g.h * g.w * g.c1, vp, g);
    batched_gemm<T>(g.n * A * A, g.tiles, g.c2, g.c1, vp, g.tiles * g.c1, g.c1, 1, up,
                    g.c1 * g.c2, g.c2, mp, g.tiles * g.c2, g.c2);
    const T* bn = bp ? bp + n0 * g.c2 : nullptr;
    T* yn = yp + n0 * g.ho * g.wo * g.c2;
    wino_for(g.n * g.th, 1, [&](int64_t b, int64_t e) {
      wino_output_transform<T, M>(mp, bn, yn, g, b, e);
    });
  }
  return to_output(y, geo);
}

// Returns dx; calls on_chunk(n0, g, du) with each chunk's dU (g.n*a*a, C2, C1).
// kt: (C2, 3, 3, C1), or per sample (N, C2, 3, 3, C1); scale (N, C2, 3, 3) or null.
template <typename T, int M, typename F>
Tensor wino_backward(const Tensor& gy, const Tensor& x, const Tensor& kt, const Tensor* scale,
                     const Geometry& geo, const F& on_chunk) {
  constexpr int A = M + 2;
  const WinoGeo full = wino_geometry(geo, M);
  const auto opts = x.options().dtype(geo.acc);
  const Tensor xh = as_hwc(x, geo.acc);
  const Tensor gh = as_hwc(gy, geo.acc);
  Tensor dx = hwc_buffer(full.n, full.c1, full.h, full.w, geo, opts, true);
  const int64_t chunk = wino_chunk(full, A);
  Tensor u = at::empty({chunk * A * A, full.c2, full.c1}, opts);
  Tensor v = at::empty({chunk * A * A, full.tiles, full.c1}, opts);
  Tensor dm = at::empty({chunk * A * A, full.tiles, full.c2}, opts);
  Tensor du = at::empty({chunk * A * A, full.c2, full.c1}, opts);
  const T* kp = kt.const_data_ptr<T>();
  const T* sp = scale ? scale->const_data_ptr<T>() : nullptr;
  const T* xp = xh.const_data_ptr<T>();
  const T* gp = gh.const_data_ptr<T>();
  T* dxp = dx.mutable_data_ptr<T>();
  T* up = u.mutable_data_ptr<T>();
  T* vp = v.mutable_data_ptr<T>();
  T* dmp = dm.mutable_data_ptr<T>();
  T* dup = du.mutable_data_ptr<T>();
  for (int64_t n0 = 0; n0 < full.n; n0 += chunk) {
    WinoGeo g = full;
    g.n = std::min(chunk, full.n - n0);
    const int64_t batch = g.n * A * A;
    wino_weights<T, M>(sp ? kp : kp + n0 * g.c2 * 9 * g.c1, sp ? sp + n0 * g.c2 * 9 : nullptr,
                       false, up, g.n, g.c2, g.c1);  // U as (o, c)
    wino_input<T, M>(xp + n0 * g.h * g.w * g.c1, vp, g);
    const T* gn = gp + n0 * g.ho * g.wo * g.c2;
    wino_for(g.n * g.th, 1, [&](int64_t b, int64_t e) {
      wino_grad_transform<T, M>(gn, dmp, g, b, e);
    });
    // dU = dM^T V, (C2 x tiles) (tiles x C1).
    batched_gemm<T>(batch, g.c2, g.c1, g.tiles, dmp, g.tiles * g.c2, 1, g.c2, vp,
                    g.tiles * g.c1, g.c1, dup, g.c2 * g.c1, g.c1);
    // dV = dM U, (tiles x C2) (C2 x C1), into V's storage.
    batched_gemm<T>(batch, g.tiles, g.c1, g.c2, dmp, g.tiles * g.c2, g.c2, 1, up, g.c2 * g.c1,
                    g.c1, vp, g.tiles * g.c1, g.c1);
    T* dxn = dxp + n0 * g.h * g.w * g.c1;
    for (int64_t parity = 0; parity < std::min<int64_t>(2, g.th); ++parity) {
      const int64_t rows = (g.th - parity + 1) / 2;
      wino_for(g.n * rows, 1, [&](int64_t b, int64_t e) {
        wino_input_grad_transform<T, M>(vp, dxn, g, parity, b, e);
      });
    }
    on_chunk(n0, g, static_cast<const T*>(dup));
  }
  return to_output(dx, geo);
}

#pragma GCC pop_options

template <typename F>
auto with_wino(ConvAlgo algo, const F& fn) {
  return algo == ConvAlgo::kWino4 ? fn(std::integral_constant<int, 4>{})
                                  : fn(std::integral_constant<int, 2>{});
}

// ---------------------------------------------------------------------------
// Ops.

Tensor per_sample_conv2d_fwd(const Tensor& x, const Tensor& weights,
                             const c10::optional<Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_cpu_dense(weights, "weights");
  MK_CHECK(weights.dim() == 5, "weights: expected a rank-5 (N, C2, C1/groups, kh, kw) tensor, "
              "got rank ", weights.dim(), " with shape ", weights.sizes());
  const Geometry geo = check_conv(x, weights.sizes(), "weights", stride, padding, dilation, groups);
  check_per_sample_weights(weights, geo);
  check_bias(bias, geo);
  at::AutoDispatchBelowADInplaceOrView guard;

  Tensor y = at::empty({geo.n, geo.c2, geo.ho, geo.wo}, x.options().memory_format(geo.format));
  const ConvAlgo algo = geo.n == 0 ? ConvAlgo::kAten : choose_algo(geo);
  if (algo != ConvAlgo::kAten) {
    const Tensor kt = weights.to(geo.acc).permute({0, 2, 3, 4, 1}).contiguous();
    return AT_DISPATCH_FLOATING_TYPES(geo.acc, "per_sample_conv2d_fwd_winograd", [&] {
      return with_wino(algo, [&](auto m) {
        return wino_forward<scalar_t, decltype(m)::value>(x, kt, nullptr, bias, geo);
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
                                                 at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, int64_t groups) {
  check_cpu_dense(weights, "weights");
  MK_CHECK(weights.dim() == 5, "weights: expected a rank-5 (N, C2, C1/groups, kh, kw) tensor, "
              "got rank ", weights.dim(), " with shape ", weights.sizes());
  const Geometry geo = check_conv(x, weights.sizes(), "weights", stride, padding, dilation, groups);
  check_per_sample_weights(weights, geo);
  check_grad(g, geo);
  at::AutoDispatchBelowADInplaceOrView guard;

  const ConvAlgo algo = geo.n == 0 ? ConvAlgo::kAten : choose_algo(geo);
  if (algo != ConvAlgo::kAten) {
    const Tensor kt = weights.to(geo.acc).permute({0, 1, 3, 4, 2}).contiguous();
    return AT_DISPATCH_FLOATING_TYPES(geo.acc, "per_sample_conv2d_bwd_winograd", [&] {
      return with_wino(algo, [&](auto m) {
        constexpr int M = decltype(m)::value;
        Tensor dwt = at::empty({geo.n, geo.c2, 3, 3, geo.c1}, kt.options());
        scalar_t* dwp = dwt.template mutable_data_ptr<scalar_t>();
        Tensor dx = wino_backward<scalar_t, M>(
            g, x, kt, nullptr, geo, [&](int64_t n0, const WinoGeo& wg, const scalar_t* dup) {
              scalar_t* dwn = dwp + n0 * geo.c2 * 9 * geo.c1;
              wino_for(wg.n * wg.c2, wino_weight_grain(wg.c1), [&](int64_t b, int64_t e) {
                wino_weight_grad_per_sample<scalar_t, M>(dup, dwn, wg, b, e);
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
      return with_wino(algo, [&](auto m) {
        return wino_forward<scalar_t, decltype(m)::value>(x, kt, &scale_t, bias, geo);
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
      with_wino(algo, [&](auto m) {
        constexpr int M = decltype(m)::value;
        Tensor dkt = at::zeros({geo.c2, 3, 3, geo.c1}, kt.options());
        const scalar_t* kp = kt.template const_data_ptr<scalar_t>();
        const scalar_t* sp = scale.template const_data_ptr<scalar_t>();
        scalar_t* dkp = dkt.template mutable_data_ptr<scalar_t>();
        scalar_t* dsp = dscale.template mutable_data_ptr<scalar_t>();
        // Chunks come in sample order and each folds its samples in order: dkt's sums
        // run over n = 0, 1, ... whatever the chunking or thread count.
        dx = wino_backward<scalar_t, M>(
            g, x, kt, &scale, geo, [&](int64_t n0, const WinoGeo& wg, const scalar_t* dup) {
              wino_for(geo.c2, 1, [&](int64_t b, int64_t e) {
                wino_weight_grad_fold<scalar_t, M>(dup, kp, sp + n0 * geo.c2 * 9, dkp,
                                                   dsp + n0 * geo.c2 * 9, wg, b, e);
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
        scale_weight<scalar_t>(wp, sp + n * geo.c2 * taps, wn.mutable_data_ptr<scalar_t>(),
                               geo.c2, cg, taps);
        auto [dxn, gw] =
            conv_backward(sample_of(g, n, geo.acc), sample_of(x, n, geo.acc), wn, geo);
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
  m.impl("per_sample_conv2d_fwd", &per_sample_conv2d_fwd);
  m.impl("per_sample_conv2d_bwd", &per_sample_conv2d_bwd);
  m.impl("aw_conv2d_fwd", &aw_conv2d_fwd);
  m.impl("aw_conv2d_bwd", &aw_conv2d_bwd);
}
