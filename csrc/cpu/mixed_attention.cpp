// CPU kernels for the mixed-attention passes (DESIGN.md section 1). The contract,
// including dtypes, tie-breaking and output memory format, is
// manet_kernels/reference/passes.py.
//
// Each pass reads its activation-sized inputs once. x / g come either
// NCHW-contiguous or channels_last-contiguous, and every pass has one loop nest
// per layout so that the innermost loop runs along the unit-stride dimension:
// reductions along it keep kLanes independent accumulators (a fixed summation
// order that vectorises without reassociation), reductions across it accumulate
// element-wise into a small buffer that stays in L1.
//
// Vectorisation notes (gcc, SSE2 baseline, default -ftrapping-math):
// * `#pragma omp simd` (honoured under -fopenmp) marks the lane loops: without it
//   gcc unrolls them completely first and then fails to SLP-vectorise a max
//   reduction, leaving scalar code ~7x slower. It never reorders our arithmetic:
//   every lane loop is free of cross-iteration dependences.
// * A float compare feeding an integer `?:` stays a branch; select_if does the
//   same with masks and vectorises.
// * c10's Half conversions and its float -> BFloat16 rounding do not vectorise;
//   Elem<> below has branch-free equivalents, bit-exact with c10 (checked over all
//   2^16 halves, up to NaN payloads, and all 2^32 floats). Even vectorised they
//   cost several SSE2 instructions per element, so the 16-bit dtypes run a few
//   times slower than float32 here.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../check.h"
#include "../spatial_conv_checks.h"

namespace {

using at::Tensor;

enum class Layout { kNCHW, kNHWC };

// ---------------------------------------------------------------------------
// Argument checks. Every message starts with the argument's name. Wrong dtypes
// raise TypeError and wrong shapes, strides or index values ValueError in Python,
// as the Triton backend's checks do; a wrong device stays a RuntimeError.

using manet_kernels::dtype_name;

Layout check_activation(const Tensor& t, const char* name) {
  MK_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  MK_CHECK_VALUE(t.layout() == at::kStrided, name,
                    ": expected a strided (dense) tensor, got layout ", t.layout());
  MK_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  MK_CHECK_VALUE(t.dim() == 4, name, ": expected a rank-4 (N, C, H, W) tensor, got rank ",
                    t.dim(), " with shape ", t.sizes());
  const auto st = t.scalar_type();
  MK_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
                   name, ": expected dtype float32, float64, bfloat16 or float16, got ",
                   dtype_name(st));
  // Index tensors are int32.
  MK_CHECK_VALUE(t.size(1) <= std::numeric_limits<int32_t>::max() &&
                    t.size(2) * t.size(3) <= std::numeric_limits<int32_t>::max(),
                    name, ": C and H*W must fit in int32, got shape ", t.sizes());
  if (t.is_contiguous()) return Layout::kNCHW;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::kNHWC;
  MK_CHECK_VALUE(false, name,
                    ": expected NCHW-contiguous or channels_last-contiguous strides, got shape ",
                    t.sizes(), " with strides ", t.strides(),
                    " (make it contiguous before calling)");
  return Layout::kNCHW;  // unreachable
}

at::ScalarType acc_dtype_for(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

void check_dense_cpu(const Tensor& t, const char* name) {
  MK_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  MK_CHECK_VALUE(t.layout() == at::kStrided, name,
                    ": expected a strided (dense) tensor, got layout ", t.layout());
  MK_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
}

// `dims` names the expected shape, e.g. "(N, C)".
void check_small(const Tensor& t, const char* name, const char* dims, at::IntArrayRef sizes,
                 at::ScalarType acc, const char* act_name, at::ScalarType act_dtype) {
  check_dense_cpu(t, name);
  MK_CHECK_VALUE(t.sizes() == sizes, name, ": expected shape ", dims, " = ", sizes, ", got ",
                    t.sizes());
  MK_CHECK_TYPE(t.scalar_type() == acc, name, ": expected dtype ", dtype_name(acc),
                   " (the accumulation dtype for ", act_name, " of dtype ", dtype_name(act_dtype),
                   "), got ", dtype_name(t.scalar_type()));
  MK_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ",
                    t.strides());
}

void check_index(const Tensor& t, const char* name, const char* dims, at::IntArrayRef sizes) {
  check_dense_cpu(t, name);
  MK_CHECK_VALUE(t.sizes() == sizes, name, ": expected shape ", dims, " = ", sizes, ", got ",
                    t.sizes());
  MK_CHECK_TYPE(t.scalar_type() == at::kInt, name, ": expected dtype int32, got ",
                   dtype_name(t.scalar_type()));
  MK_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ",
                    t.strides());
}

const char* layout_name(Layout l) {
  return l == Layout::kNCHW ? "NCHW-contiguous" : "channels_last-contiguous";
}

at::MemoryFormat memory_format(Layout l) {
  return l == Layout::kNCHW ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
}

// ---------------------------------------------------------------------------
// Element access: activations are read and written through their raw storage
// type and converted to / from the accumulation type.

template <typename I>
inline I select_if(bool cond, I a, I b) {
  const I mask = -static_cast<I>(cond);
  return (a & mask) | (b & ~mask);
}

inline uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

inline float float_of(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

template <typename scalar_t>
struct Elem {  // float, double: stored as they are computed
  using raw = scalar_t;
  static inline scalar_t load(raw v) { return v; }
  static inline raw store(scalar_t v) { return v; }
};

template <>
struct Elem<c10::BFloat16> {
  using raw = uint16_t;
  static inline float load(raw v) { return float_of(static_cast<uint32_t>(v) << 16); }
  // Round to nearest even; NaN becomes the canonical quiet NaN, as c10 does.
  static inline raw store(float f) {
    const uint32_t w = bits_of(f);
    const uint32_t r = (w + 0x7fffu + ((w >> 16) & 1u)) >> 16;
    return static_cast<raw>(select_if<uint32_t>(f != f, 0x7fc0u, r));
  }
};

// Integer work is done in int32 (every value fits): SSE2 has signed 32-bit
// compares only, and unsigned ones would cost extra bias operations.
template <>
struct Elem<c10::Half> {
  using raw = uint16_t;
  static inline float load(raw h) {
    const int32_t em = static_cast<int32_t>(h & 0x7fffu) << 13;  // exponent, mantissa in place
    const int32_t e = em & (0x1f << 23);
    int32_t o = em + (112 << 23);                                 // rebias 15 -> 127
    o = select_if(e == (0x1f << 23), o + (112 << 23), o);         // inf / NaN: exponent 255
    // Zero / subnormal: o + 2^23 reads as 2^-14 * (1 + m/1024); subtracting 2^-14
    // leaves m * 2^-24 exactly.
    const float sub = float_of(static_cast<uint32_t>(o + (1 << 23))) - float_of(113u << 23);
    o = select_if(e == 0, static_cast<int32_t>(bits_of(sub)), o);
    return float_of(static_cast<uint32_t>(o) | (static_cast<uint32_t>(h & 0x8000u) << 16));
  }
  // Round to nearest even.
  static inline raw store(float f) {
    const uint32_t w = bits_of(f);
    const int32_t sign = static_cast<int32_t>((w >> 16) & 0x8000u);
    const int32_t a = static_cast<int32_t>(w & 0x7fffffffu);
    const int32_t normal = (a - (112 << 23) + 0xfff + ((a >> 13) & 1)) >> 13;
    // Below 2^-14 the result is subnormal: adding 0.5 leaves exactly the rounded
    // count of 2^-24 units in the low mantissa bits.
    const int32_t sub = static_cast<int32_t>(bits_of(float_of(static_cast<uint32_t>(a)) + 0.5f) -
                                             bits_of(0.5f));
    int32_t h = select_if(a < (113 << 23), sub, normal);
    h = select_if(a >= 0x477ff000, 0x7c00, h);  // rounds to >= 65520: inf
    h = select_if(a > 0x7f800000, 0x7e00, h);   // NaN
    return static_cast<raw>(h | sign);
  }
};

template <typename scalar_t>
using raw_t = typename Elem<scalar_t>::raw;

template <typename scalar_t>
const raw_t<scalar_t>* raw_ptr(const Tensor& t) {
  return reinterpret_cast<const raw_t<scalar_t>*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
raw_t<scalar_t>* raw_mut_ptr(Tensor& t) {
  return reinterpret_cast<raw_t<scalar_t>*>(t.mutable_data_ptr<scalar_t>());
}

// ---------------------------------------------------------------------------
// Loop helpers.

// 64 bytes of accumulators: four SSE vectors, enough independent adds to hide
// the add latency without running out of registers.
template <typename acc_t>
constexpr int kLanes = static_cast<int>(64 / sizeof(acc_t));

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

template <typename acc_t, int L>
inline acc_t lane_sum(const acc_t* s) {
  acc_t t[L];
  for (int j = 0; j < L; ++j) t[j] = s[j];
  for (int w = L / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) t[j] += t[j + w];
  return t[0];
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// At least this many elements per parallel chunk: below that the OpenMP
// fork/join costs more than the work.
constexpr int64_t kMinChunkElems = 1 << 14;

inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, kMinChunkElems / std::max<int64_t>(row_len, 1));
}

// Splits one dimension (`len`, with `inner` elements per unit) of each sample into
// blocks of at least `min_block` units (when there is that much). The split
// depends on the shape only, never on the thread count, so sums combined across
// blocks come out bitwise identical on any machine. Blocks are multiples of 16
// units so that neighbouring blocks do not share cache lines.
struct Blocks {
  int64_t size;
  int64_t count;
};

Blocks split_blocks(int64_t samples, int64_t len, int64_t inner, int64_t min_block) {
  if (len <= 0) return {0, 0};
  constexpr int64_t kTargetItems = 16;  // balances a few cores
  const int64_t want = ceil_div(kTargetItems, std::max<int64_t>(samples, 1));
  const int64_t by_work = len * std::max<int64_t>(inner, 1) / kMinChunkElems;
  const int64_t nb = std::max<int64_t>(1, std::min({want, by_work, len / min_block}));
  const int64_t size = std::min(len, ceil_div(ceil_div(len, nb), 16) * 16);
  return {size, ceil_div(len, size)};
}

// sum, max and first argmax with torch.max semantics (first maximum wins; a NaN
// counts as the maximum and the first NaN wins) of v[i] = x[i] (* w[i]) over a
// contiguous row.
//
// The hot loop keeps per-lane sums and maxima only; the first position of the
// maximum is then found by rescanning (in L1) only the lanes that hold it. NaN
// needs no test in either loop: any NaN makes the sum NaN, and such rows
// are rescanned for their first NaN.
template <typename scalar_t, bool kScaled>
struct RowStats {
  using acc_t = at::opmath_type<scalar_t>;
  using E = Elem<scalar_t>;
  acc_t sum, max;
  int64_t arg;

  RowStats(const raw_t<scalar_t>* __restrict__ x, const acc_t* __restrict__ w, int64_t n) {
    constexpr int L = kLanes<acc_t>;
    auto val = [&](int64_t i) -> acc_t {
      acc_t v = E::load(x[i]);
      if constexpr (kScaled) v = v * w[i];
      return v;
    };
    acc_t s[L], m[L];
    for (int j = 0; j < L; ++j) {
      s[j] = acc_t(0);
      m[j] = kNegInf<acc_t>;
    }
    int64_t i = 0;
    for (; i + L <= n; i += L) {
#pragma omp simd
      for (int j = 0; j < L; ++j) {
        acc_t v = E::load(x[i + j]);
        if constexpr (kScaled) v = v * w[i + j];
        s[j] += v;
        m[j] = v > m[j] ? v : m[j];
      }
    }
    sum = lane_sum<acc_t, L>(s);
    max = kNegInf<acc_t>;
    for (int j = 0; j < L; ++j) max = m[j] > max ? m[j] : max;
    // First position of the maximum among the first i values: only the lanes
    // holding it can contain it (typically one), each scanned with stride L.
    arg = i;
    for (int j = 0; j < L; ++j) {
      if (!(m[j] == max)) continue;
      for (int64_t k = j; k < arg; k += L) {
        if (val(k) == max) {
          arg = k;
          break;
        }
      }
    }
    // Not found only when i == 0 or the first i values are all NaN; (-inf, 0)
    // is then the right start for the tail and the NaN rescan.
    if (arg == i) arg = 0;
    for (; i < n; ++i) {
      const acc_t v = val(i);
      sum += v;
      if (v > max) {
        max = v;
        arg = i;
      }
    }
    if (std::isnan(sum)) {
      // inf - inf lands here too, finds no NaN and keeps the result above.
      for (int64_t k = 0; k < n; ++k) {
        if (std::isnan(val(k))) {
          arg = k;
          break;
        }
      }
    }
    if (n > 0) max = val(arg);  // the value at the index, as torch.max returns
  }
};

// Sum / max / first argmax across `rows` rows of a block of `len` unit-stride
// columns: row r, column k is x[r * stride + k] (* w[r]). Each column accumulates
// element-wise. Rows are taken kRows at a time, so a group's sum and max stay in
// registers and the running max / argmax are touched once per group; the argmax
// remembers the first row of the group where the column's maximum first appeared
// and finish() rescans from there.
template <typename scalar_t>
struct ColumnStats {
  using acc_t = at::opmath_type<scalar_t>;
  using E = Elem<scalar_t>;
  static constexpr int kRows = 8;
  std::vector<acc_t> sum, max;
  std::vector<int32_t> arg;

  explicit ColumnStats(int64_t len) : sum(len), max(len), arg(len) {}

  template <bool kScaled>
  void run(const raw_t<scalar_t>* x, int64_t stride, const acc_t* w, int64_t rows, int64_t len) {
    std::fill_n(sum.data(), len, acc_t(0));
    std::fill_n(max.data(), len, kNegInf<acc_t>);
    std::fill_n(arg.data(), len, int32_t(0));
    int64_t r0 = 0;
    for (; r0 + kRows <= rows; r0 += kRows)
      group<kRows, kScaled>(x + r0 * stride, stride, kScaled ? w + r0 : nullptr,
                            static_cast<int32_t>(r0), len);
    for (; r0 < rows; ++r0)
      group<1, kScaled>(x + r0 * stride, stride, kScaled ? w + r0 : nullptr,
                        static_cast<int32_t>(r0), len);
    for (int64_t k = 0; k < len; ++k) finish<kScaled>(x, stride, w, rows, k);
  }

 private:
  template <int R, bool kScaled>
  inline void group(const raw_t<scalar_t>* __restrict__ x, int64_t stride,
                    const acc_t* __restrict__ w, int32_t first_row, int64_t len) {
    acc_t* __restrict__ s = sum.data();
    acc_t* __restrict__ m = max.data();
    int32_t* __restrict__ a = arg.data();
    acc_t wr[R];
    for (int r = 0; r < R; ++r) wr[r] = kScaled ? w[r] : acc_t(1);
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      acc_t bs = acc_t(0), bm = kNegInf<acc_t>;
      for (int r = 0; r < R; ++r) {
        acc_t v = E::load(x[r * stride + k]);
        if constexpr (kScaled) v = v * wr[r];
        bs += v;
        bm = v > bm ? v : bm;
      }
      s[k] += bs;
      const bool gt = bm > m[k];
      m[k] = gt ? bm : m[k];
      a[k] = select_if(gt, first_row, a[k]);
    }
  }

  template <bool kScaled>
  inline void finish(const raw_t<scalar_t>* x, int64_t stride, const acc_t* w, int64_t rows,
                     int64_t k) {
    auto val = [&](int64_t r) -> acc_t {
      acc_t v = E::load(x[r * stride + k]);
      if constexpr (kScaled) v = v * w[r];
      return v;
    };
    if (std::isnan(sum[k])) {
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t v = val(r);
        if (std::isnan(v)) {
          max[k] = v;
          arg[k] = static_cast<int32_t>(r);
          return;
        }
      }
    }
    // Rows before arg[k] are all below max[k], which occurs within that group.
    int64_t r = arg[k];
    while (r + 1 < rows && !(val(r) == max[k])) ++r;
    arg[k] = static_cast<int32_t>(r);
    max[k] = val(r);
  }
};

// ---------------------------------------------------------------------------
// F1: avg / max / argmax over positions.

template <typename scalar_t>
void channel_pool_impl(const Tensor& x, Layout layout, Tensor& avg, Tensor& mx, Tensor& im) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const raw_t<scalar_t>* xp = raw_ptr<scalar_t>(x);
  acc_t* ap = avg.mutable_data_ptr<acc_t>();
  acc_t* mp = mx.mutable_data_ptr<acc_t>();
  int32_t* ip = im.mutable_data_ptr<int32_t>();
  const acc_t den = static_cast<acc_t>(P);

  if (layout == Layout::kNCHW) {
    at::parallel_for(0, N * C, row_grain(P), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const RowStats<scalar_t, false> st(xp + r * P, nullptr, P);
        ap[r] = st.sum / den;
        mp[r] = st.max;
        ip[r] = static_cast<int32_t>(st.arg);
      }
    });
    return;
  }

  // channels_last: blocks of channels, each reduced over every position.
  const Blocks cb = split_blocks(N, C, P, 64);
  at::parallel_for(0, N * cb.count, 1, [&](int64_t begin, int64_t end) {
    ColumnStats<scalar_t> st(cb.size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / cb.count, c0 = (item % cb.count) * cb.size;
      const int64_t len = std::min(cb.size, C - c0);
      st.template run<false>(xp + n * P * C + c0, C, nullptr, P, len);
      for (int64_t k = 0; k < len; ++k) {
        const int64_t o = n * C + c0 + k;
        ap[o] = st.sum[k] / den;
        mp[o] = st.max[k];
        ip[o] = st.arg[k];
      }
    }
  });
}

// ---------------------------------------------------------------------------
// F2: with x1 = x * mc, mean / max / argmax over channels.

template <typename scalar_t>
void spatial_pool_impl(const Tensor& x, Layout layout, const Tensor& mc, Tensor& sa, Tensor& sm,
                       Tensor& ic) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const raw_t<scalar_t>* xp = raw_ptr<scalar_t>(x);
  const acc_t* mcp = mc.const_data_ptr<acc_t>();
  acc_t* sap = sa.mutable_data_ptr<acc_t>();
  acc_t* smp = sm.mutable_data_ptr<acc_t>();
  int32_t* icp = ic.mutable_data_ptr<int32_t>();
  const acc_t den = static_cast<acc_t>(C);

  if (layout == Layout::kNHWC) {
    at::parallel_for(0, N * P, row_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const RowStats<scalar_t, true> st(xp + r * C, mcp + (r / P) * C, C);
        sap[r] = st.sum / den;
        smp[r] = st.max;
        icp[r] = static_cast<int32_t>(st.arg);
      }
    });
    return;
  }

  // NCHW: stream the C rows of a block of positions, accumulating per position.
  const Blocks pb = split_blocks(N, P, C, 256);
  at::parallel_for(0, N * pb.count, 1, [&](int64_t begin, int64_t end) {
    ColumnStats<scalar_t> st(pb.size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / pb.count, p0 = (item % pb.count) * pb.size;
      const int64_t len = std::min(pb.size, P - p0);
      st.template run<true>(xp + n * C * P + p0, P, mcp + n * C, C, len);
      for (int64_t k = 0; k < len; ++k) {
        const int64_t o = n * P + p0 + k;
        sap[o] = st.sum[k] / den;
        smp[o] = st.max[k];
        icp[o] = st.arg[k];
      }
    }
  });
}

// ---------------------------------------------------------------------------
// F3: y = x * mc * ms, rounded in that order as the reference does.

template <typename scalar_t>
void apply_impl(const Tensor& x, Layout layout, const Tensor& mc, const Tensor& ms, Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  using E = Elem<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const raw_t<scalar_t>* xp = raw_ptr<scalar_t>(x);
  const acc_t* mcp = mc.const_data_ptr<acc_t>();
  const acc_t* msp = ms.const_data_ptr<acc_t>();
  raw_t<scalar_t>* yp = raw_mut_ptr<scalar_t>(y);

  if (layout == Layout::kNCHW) {
    at::parallel_for(0, N * C, row_grain(P), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t s = mcp[r];
        const acc_t* __restrict__ msr = msp + (r / C) * P;
        const raw_t<scalar_t>* __restrict__ xr = xp + r * P;
        raw_t<scalar_t>* __restrict__ yr = yp + r * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) yr[p] = E::store(E::load(xr[p]) * s * msr[p]);
      }
    });
  } else {
    at::parallel_for(0, N * P, row_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t t = msp[r];
        const acc_t* __restrict__ mcr = mcp + (r / P) * C;
        const raw_t<scalar_t>* __restrict__ xr = xp + r * C;
        raw_t<scalar_t>* __restrict__ yr = yp + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) yr[c] = E::store(E::load(xr[c]) * mcr[c] * t);
      }
    });
  }
}

// ---------------------------------------------------------------------------
// B1: dms = sum_c g*x*mc and dmc = sum_p g*x*ms, both from one read of g and x.
// Work items are (sample, block of positions), so dms is complete within an item
// while dmc crosses items: each item writes its own partial row, and the partials
// are added in block order afterwards.
//
// NCHW takes channel rows kGroup at a time, so the per-position accumulator is
// loaded and stored once per group; the adds into it stay in row order, so the
// grouping changes no rounding. Each row of the group has its own kLanes2
// dot-product lanes (half the usual width, so that the group's lanes fit in
// registers).

template <typename acc_t>
constexpr int kLanes2 = static_cast<int>(32 / sizeof(acc_t));

template <typename scalar_t, int R>
inline void bwd_reduce_nchw_rows(const raw_t<scalar_t>* __restrict__ g,
                                 const raw_t<scalar_t>* __restrict__ x, int64_t stride,
                                 const at::opmath_type<scalar_t>* __restrict__ w,
                                 const at::opmath_type<scalar_t>* __restrict__ ms,
                                 at::opmath_type<scalar_t>* __restrict__ d,
                                 at::opmath_type<scalar_t>* __restrict__ dot, int64_t len) {
  using acc_t = at::opmath_type<scalar_t>;
  using E = Elem<scalar_t>;
  constexpr int L = kLanes2<acc_t>;
  acc_t lane[R][L];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < L; ++j) lane[r][j] = acc_t(0);
  int64_t k = 0;
  for (; k + L <= len; k += L) {
#pragma omp simd
    for (int j = 0; j < L; ++j) {
      acc_t acc = d[k + j];
      for (int r = 0; r < R; ++r) {
        const acc_t gx = E::load(g[r * stride + k + j]) * E::load(x[r * stride + k + j]);
        acc = acc + gx * w[r];
        lane[r][j] += gx * ms[k + j];
      }
      d[k + j] = acc;
    }
  }
  for (int j = 0; k + j < len; ++j) {
    acc_t acc = d[k + j];
    for (int r = 0; r < R; ++r) {
      const acc_t gx = E::load(g[r * stride + k + j]) * E::load(x[r * stride + k + j]);
      acc = acc + gx * w[r];
      lane[r][j] += gx * ms[k + j];
    }
    d[k + j] = acc;
  }
  for (int r = 0; r < R; ++r) dot[r] = lane_sum<acc_t, L>(lane[r]);
}

template <typename scalar_t>
void bwd_reduce_impl(const Tensor& g, const Tensor& x, Layout layout, const Tensor& mc,
                     const Tensor& ms, Tensor& dms, Tensor& dmc) {
  using acc_t = at::opmath_type<scalar_t>;
  using E = Elem<scalar_t>;
  constexpr int kGroup = 4;
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const raw_t<scalar_t>* gp = raw_ptr<scalar_t>(g);
  const raw_t<scalar_t>* xp = raw_ptr<scalar_t>(x);
  const acc_t* mcp = mc.const_data_ptr<acc_t>();
  const acc_t* msp = ms.const_data_ptr<acc_t>();
  acc_t* dmsp = dms.mutable_data_ptr<acc_t>();
  acc_t* dmcp = dmc.mutable_data_ptr<acc_t>();

  // NCHW streams C row segments per item: keep them long.
  const Blocks pb = split_blocks(N, P, C, layout == Layout::kNCHW ? 256 : 16);
  std::vector<acc_t> partial(static_cast<size_t>(N * pb.count * C));  // [n][block][c]
  acc_t* part = partial.data();

  if (layout == Layout::kNCHW) {
    at::parallel_for(0, N * pb.count, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(pb.size);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / pb.count, p0 = (item % pb.count) * pb.size;
        const int64_t len = std::min(pb.size, P - p0);
        acc_t* d = buf.data();
        std::fill_n(d, len, acc_t(0));
        const int64_t off = n * C * P + p0;
        int64_t c = 0;
        for (; c + kGroup <= C; c += kGroup)
          bwd_reduce_nchw_rows<scalar_t, kGroup>(gp + off + c * P, xp + off + c * P, P,
                                                 mcp + n * C + c, msp + n * P + p0, d,
                                                 part + item * C + c, len);
        for (; c < C; ++c)
          bwd_reduce_nchw_rows<scalar_t, 1>(gp + off + c * P, xp + off + c * P, P,
                                            mcp + n * C + c, msp + n * P + p0, d,
                                            part + item * C + c, len);
        std::copy_n(d, len, dmsp + n * P + p0);
      }
    });
  } else {
    constexpr int L = kLanes<acc_t>;
    at::parallel_for(0, N * pb.count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / pb.count, p0 = (item % pb.count) * pb.size;
        const int64_t len = std::min(pb.size, P - p0);
        const acc_t* __restrict__ mcr = mcp + n * C;
        acc_t* __restrict__ pr = part + item * C;
        std::fill_n(pr, C, acc_t(0));
        for (int64_t p = p0; p < p0 + len; ++p) {
          const raw_t<scalar_t>* __restrict__ gr = gp + (n * P + p) * C;
          const raw_t<scalar_t>* __restrict__ xr = xp + (n * P + p) * C;
          const acc_t t = msp[n * P + p];
          acc_t lane[L];
          for (int j = 0; j < L; ++j) lane[j] = acc_t(0);
          int64_t c = 0;
          for (; c + L <= C; c += L) {
#pragma omp simd
            for (int j = 0; j < L; ++j) {
              const acc_t gx = E::load(gr[c + j]) * E::load(xr[c + j]);
              lane[j] += gx * mcr[c + j];
              pr[c + j] += gx * t;
            }
          }
          for (int j = 0; c + j < C; ++j) {
            const acc_t gx = E::load(gr[c + j]) * E::load(xr[c + j]);
            lane[j] += gx * mcr[c + j];
            pr[c + j] += gx * t;
          }
          dmsp[n * P + p] = lane_sum<acc_t, L>(lane);
        }
      }
    });
  }

  for (int64_t n = 0; n < N; ++n) {
    acc_t* __restrict__ out = dmcp + n * C;
    std::fill_n(out, C, acc_t(0));
    for (int64_t b = 0; b < pb.count; ++b) {
      const acc_t* __restrict__ pr = part + (n * pb.count + b) * C;
      for (int64_t c = 0; c < C; ++c) out[c] += pr[c];
    }
  }
}

// ---------------------------------------------------------------------------
// B2: dmc[n,c] = sum_p (da_s/C) x  +  sum_{p: ic[n,p]==c} dm_s x.
// The dense and the gathered sums are kept apart and added at the end, as the
// reference does.

template <typename scalar_t>
void bwd_channel_impl(const Tensor& x, Layout layout, const Tensor& da_s, const Tensor& dm_s,
                      const Tensor& ic, Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  using E = Elem<scalar_t>;
  constexpr int L = kLanes<acc_t>;
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const raw_t<scalar_t>* xp = raw_ptr<scalar_t>(x);
  const acc_t* dap = da_s.const_data_ptr<acc_t>();
  const acc_t* dmp = dm_s.const_data_ptr<acc_t>();
  const int32_t* icp = ic.const_data_ptr<int32_t>();
  acc_t* op = out.mutable_data_ptr<acc_t>();

  // The gather reads x[n, ic, p]: an index outside [0, C) would read out of
  // bounds (the reference's gather raises as well).
  const int64_t NP = N * P;
  if (NP > 0) {
    int32_t lo = icp[0], hi = icp[0];
    for (int64_t i = 0; i < NP; ++i) {
      lo = std::min(lo, icp[i]);
      hi = std::max(hi, icp[i]);
    }
    MK_CHECK_VALUE(lo >= 0 && hi < C, "ic: expected channel indices in [0, C=", C,
                      "), got values in [", lo, ", ", hi, "]");
  }

  // da_s / C once per position (a division, as the reference computes it).
  std::vector<acc_t> wbuf(static_cast<size_t>(NP));
  for (int64_t i = 0; i < NP; ++i) wbuf[i] = dap[i] / static_cast<acc_t>(C);
  const acc_t* wp = wbuf.data();

  if (layout == Layout::kNCHW) {
    // The gathered term first: N*P scattered reads, not a pass.
    std::vector<acc_t> sparse(static_cast<size_t>(N * C), acc_t(0));
    acc_t* sp = sparse.data();
    at::parallel_for(0, N, row_grain(P), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        for (int64_t p = 0; p < P; ++p) {
          const int64_t c = icp[n * P + p];
          sp[n * C + c] += dmp[n * P + p] * E::load(xp[(n * C + c) * P + p]);
        }
    });
    at::parallel_for(0, N * C, row_grain(P), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const raw_t<scalar_t>* __restrict__ xr = xp + r * P;
        const acc_t* __restrict__ wr = wp + (r / C) * P;
        acc_t lane[L];
        for (int j = 0; j < L; ++j) lane[j] = acc_t(0);
        int64_t p = 0;
        for (; p + L <= P; p += L) {
#pragma omp simd
          for (int j = 0; j < L; ++j) lane[j] += E::load(xr[p + j]) * wr[p + j];
        }
        for (int j = 0; p + j < P; ++j) lane[j] += E::load(xr[p + j]) * wr[p + j];
        op[r] = lane_sum<acc_t, L>(lane) + sp[r];
      }
    });
    return;
  }

  // channels_last: items are (sample, block of positions), each with its own
  // partial rows, added in block order afterwards.
  const Blocks pb = split_blocks(N, P, C, 16);
  std::vector<acc_t> partial(static_cast<size_t>(N * pb.count * 2 * C));  // [n][block][2][c]
  acc_t* part = partial.data();
  at::parallel_for(0, N * pb.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / pb.count, p0 = (item % pb.count) * pb.size;
      const int64_t len = std::min(pb.size, P - p0);
      acc_t* __restrict__ dense = part + item * 2 * C;
      acc_t* __restrict__ sparse = dense + C;
      std::fill_n(dense, 2 * C, acc_t(0));
      for (int64_t p = p0; p < p0 + len; ++p) {
        const raw_t<scalar_t>* __restrict__ xr = xp + (n * P + p) * C;
        const acc_t w = wp[n * P + p];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dense[c] += E::load(xr[c]) * w;
        const int64_t c = icp[n * P + p];
        sparse[c] += dmp[n * P + p] * E::load(xr[c]);
      }
    }
  });
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      acc_t d = 0, s = 0;
      for (int64_t b = 0; b < pb.count; ++b) {
        d += part[((n * pb.count + b) * 2) * C + c];
        s += part[((n * pb.count + b) * 2 + 1) * C + c];
      }
      op[n * C + c] = d + s;
    }
  }
}

// ---------------------------------------------------------------------------
// B3: dx = mc*(g*ms + da_s/C + dm_s*[c == ic]) + d_avg/P + d_mx*[p == im].
// The dense part is one streaming pass; the one-hot terms touch N*P and N*C
// elements, which are rewritten with the full expression afterwards (each
// element's value is the same whichever fix-up writes it last). An index out of range
// matches nothing, as in the reference.

template <typename scalar_t>
void bwd_dx_impl(const Tensor& g, Layout layout, const Tensor& mc, const Tensor& ms,
                 const Tensor& da_s, const Tensor& dm_s, const Tensor& ic, const Tensor& d_avg,
                 const Tensor& d_mx, const Tensor& im, Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  using E = Elem<scalar_t>;
  const int64_t N = g.size(0), C = g.size(1), P = g.size(2) * g.size(3);
  const raw_t<scalar_t>* gp = raw_ptr<scalar_t>(g);
  const acc_t* mcp = mc.const_data_ptr<acc_t>();
  const acc_t* msp = ms.const_data_ptr<acc_t>();
  const acc_t* dap = da_s.const_data_ptr<acc_t>();
  const acc_t* dmp = dm_s.const_data_ptr<acc_t>();
  const int32_t* icp = ic.const_data_ptr<int32_t>();
  const acc_t* davp = d_avg.const_data_ptr<acc_t>();
  const acc_t* dmxp = d_mx.const_data_ptr<acc_t>();
  const int32_t* imp = im.const_data_ptr<int32_t>();
  raw_t<scalar_t>* dxp = raw_mut_ptr<scalar_t>(dx);

  // da_s / C and d_avg / P, divided once, as the reference computes them.
  std::vector<acc_t> abuf(static_cast<size_t>(N * P)), bbuf(static_cast<size_t>(N * C));
  for (int64_t i = 0; i < N * P; ++i) abuf[i] = dap[i] / static_cast<acc_t>(C);
  for (int64_t i = 0; i < N * C; ++i) bbuf[i] = davp[i] / static_cast<acc_t>(P);
  const acc_t* ap = abuf.data();
  const acc_t* bp = bbuf.data();

  // The reference expression for one element, one-hot terms included.
  auto full = [&](int64_t n, int64_t c, int64_t p, acc_t gv) -> acc_t {
    const int64_t np = n * P + p, nc = n * C + c;
    acc_t inner = gv * msp[np] + ap[np];
    if (icp[np] == c) inner = inner + dmp[np];
    acc_t v = mcp[nc] * inner + bp[nc];
    if (imp[nc] == p) v = v + dmxp[nc];
    return v;
  };

  if (layout == Layout::kNCHW) {
    at::parallel_for(0, N * C, row_grain(P), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / C, c = r % C;
        const acc_t s = mcp[r], b = bp[r];
        const raw_t<scalar_t>* __restrict__ gr = gp + r * P;
        const acc_t* __restrict__ msr = msp + n * P;
        const acc_t* __restrict__ ar = ap + n * P;
        raw_t<scalar_t>* __restrict__ out = dxp + r * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p)
          out[p] = E::store(s * (E::load(gr[p]) * msr[p] + ar[p]) + b);
        const int64_t pi = imp[r];
        if (pi >= 0 && pi < P) out[pi] = E::store(full(n, c, pi, E::load(gr[pi])));
      }
    });
    // The picked-channel term, once every row above is written.
    at::parallel_for(0, N * P, kMinChunkElems / 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / P, p = r % P, ci = icp[r];
        if (ci < 0 || ci >= C) continue;
        const int64_t o = (n * C + ci) * P + p;
        dxp[o] = E::store(full(n, ci, p, E::load(gp[o])));
      }
    });
    return;
  }

  at::parallel_for(0, N * P, row_grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / P, p = r % P;
      const acc_t t = msp[r], a = ap[r];
      const raw_t<scalar_t>* __restrict__ gr = gp + r * C;
      const acc_t* __restrict__ mcr = mcp + n * C;
      const acc_t* __restrict__ br = bp + n * C;
      raw_t<scalar_t>* __restrict__ out = dxp + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) out[c] = E::store(mcr[c] * (E::load(gr[c]) * t + a) + br[c]);
      const int64_t ci = icp[r];
      if (ci >= 0 && ci < C) out[ci] = E::store(full(n, ci, p, E::load(gr[ci])));
    }
  });
  // The argmax-position term, once every row above is written.
  at::parallel_for(0, N * C, kMinChunkElems / 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / C, c = r % C, pi = imp[r];
      if (pi < 0 || pi >= P) continue;
      const int64_t o = (n * P + pi) * C + c;
      dxp[o] = E::store(full(n, c, pi, E::load(gp[o])));
    }
  });
}

// ---------------------------------------------------------------------------
// Op entry points: check, allocate, dispatch.

std::tuple<Tensor, Tensor, Tensor> channel_pool(const Tensor& x) {
  const Layout layout = check_activation(x, "x");
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  MK_CHECK_VALUE(P >= 1, "x: expected H*W >= 1 to take a max over positions, got shape ",
                    x.sizes());
  const auto acc = acc_dtype_for(x.scalar_type());
  Tensor avg = at::empty({N, C}, x.options().dtype(acc));
  Tensor mx = at::empty({N, C}, x.options().dtype(acc));
  Tensor im = at::empty({N, C}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "mixed_attention_channel_pool",
                                  [&] { channel_pool_impl<scalar_t>(x, layout, avg, mx, im); });
  return {avg, mx, im};
}

std::tuple<Tensor, Tensor, Tensor> spatial_pool(const Tensor& x, const Tensor& mc) {
  const Layout layout = check_activation(x, "x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  MK_CHECK_VALUE(C >= 1, "x: expected C >= 1 to take a max over channels, got shape ",
                    x.sizes());
  const auto acc = acc_dtype_for(x.scalar_type());
  check_small(mc, "mc", "(N, C)", {N, C}, acc, "x", x.scalar_type());
  Tensor sa = at::empty({N, H, W}, x.options().dtype(acc));
  Tensor sm = at::empty({N, H, W}, x.options().dtype(acc));
  Tensor ic = at::empty({N, H, W}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "mixed_attention_spatial_pool",
                                  [&] { spatial_pool_impl<scalar_t>(x, layout, mc, sa, sm, ic); });
  return {sa, sm, ic};
}

Tensor apply(const Tensor& x, const Tensor& mc, const Tensor& ms) {
  const Layout layout = check_activation(x, "x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto acc = acc_dtype_for(x.scalar_type());
  check_small(mc, "mc", "(N, C)", {N, C}, acc, "x", x.scalar_type());
  check_small(ms, "ms", "(N, H, W)", {N, H, W}, acc, "x", x.scalar_type());
  Tensor y = at::empty(x.sizes(), x.options().memory_format(memory_format(layout)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "mixed_attention_apply",
                                  [&] { apply_impl<scalar_t>(x, layout, mc, ms, y); });
  return y;
}

std::tuple<Tensor, Tensor> bwd_reduce(const Tensor& g, const Tensor& x, const Tensor& mc,
                                      const Tensor& ms) {
  const Layout layout = check_activation(x, "x");
  const Layout g_layout = check_activation(g, "g");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  MK_CHECK_VALUE(g.sizes() == x.sizes(), "g: expected the shape of x ", x.sizes(), ", got ",
                    g.sizes());
  MK_CHECK_TYPE(g.scalar_type() == x.scalar_type(), "g: expected the dtype of x (",
                   dtype_name(x.scalar_type()), "), got ", dtype_name(g.scalar_type()));
  MK_CHECK_VALUE(g_layout == layout, "g: expected the memory format of x (",
                    layout_name(layout), "), got ", layout_name(g_layout));
  const auto acc = acc_dtype_for(x.scalar_type());
  check_small(mc, "mc", "(N, C)", {N, C}, acc, "x", x.scalar_type());
  check_small(ms, "ms", "(N, H, W)", {N, H, W}, acc, "x", x.scalar_type());
  Tensor dms = at::empty({N, H, W}, x.options().dtype(acc));
  Tensor dmc = at::empty({N, C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "mixed_attention_bwd_reduce", [&] {
                                    bwd_reduce_impl<scalar_t>(g, x, layout, mc, ms, dms, dmc);
                                  });
  return {dms, dmc};
}

Tensor bwd_channel(const Tensor& x, const Tensor& da_s, const Tensor& dm_s, const Tensor& ic) {
  const Layout layout = check_activation(x, "x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto acc = acc_dtype_for(x.scalar_type());
  check_small(da_s, "da_s", "(N, H, W)", {N, H, W}, acc, "x", x.scalar_type());
  check_small(dm_s, "dm_s", "(N, H, W)", {N, H, W}, acc, "x", x.scalar_type());
  check_index(ic, "ic", "(N, H, W)", {N, H, W});
  Tensor out = at::empty({N, C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "mixed_attention_bwd_channel", [&] {
                                    bwd_channel_impl<scalar_t>(x, layout, da_s, dm_s, ic, out);
                                  });
  return out;
}

Tensor bwd_dx(const Tensor& g, const Tensor& mc, const Tensor& ms, const Tensor& da_s,
              const Tensor& dm_s, const Tensor& ic, const Tensor& d_avg, const Tensor& d_mx,
              const Tensor& im) {
  const Layout layout = check_activation(g, "g");
  const int64_t N = g.size(0), C = g.size(1), H = g.size(2), W = g.size(3);
  const auto acc = acc_dtype_for(g.scalar_type());
  const auto st = g.scalar_type();
  check_small(mc, "mc", "(N, C)", {N, C}, acc, "g", st);
  check_small(ms, "ms", "(N, H, W)", {N, H, W}, acc, "g", st);
  check_small(da_s, "da_s", "(N, H, W)", {N, H, W}, acc, "g", st);
  check_small(dm_s, "dm_s", "(N, H, W)", {N, H, W}, acc, "g", st);
  check_index(ic, "ic", "(N, H, W)", {N, H, W});
  check_small(d_avg, "d_avg", "(N, C)", {N, C}, acc, "g", st);
  check_small(d_mx, "d_mx", "(N, C)", {N, C}, acc, "g", st);
  check_index(im, "im", "(N, C)", {N, C});
  Tensor dx = at::empty(g.sizes(), g.options().memory_format(memory_format(layout)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "mixed_attention_bwd_dx", [&] {
    bwd_dx_impl<scalar_t>(g, layout, mc, ms, da_s, dm_s, ic, d_avg, d_mx, im, dx);
  });
  return dx;
}


// ---------------------------------------------------------------------------
// The k x k conv on the 2-channel [mean, max] map, (N, H, W) each, padding k//2.
// It is tiny (2*k*k MACs per position), and ATen's CPU convolution spends far more
// on its im2col / oneDNN setup than on the arithmetic; here every tap is one
// unit-stride axpy over a row. Per-sample partial sums keep dweight / dbias
// deterministic.

// The rows/columns of the output that tap offset `d` (input = output + d) reaches.
inline void tap_range(int64_t d, int64_t len, int64_t& lo, int64_t& hi) {
  lo = std::max<int64_t>(0, -d);
  hi = std::min<int64_t>(len, len - d);
}

// Calls fn(c, weight index, di, dj, i0, i1, j0, j1) for every tap (c, ki, kj): output
// rows [i0, i1) and columns [j0, j1) read input (i + di, j + dj).
template <typename F>
void for_each_tap(int64_t k, int64_t H, int64_t W, const F& fn) {
  const int64_t r = k / 2;
  for (int c = 0; c < 2; ++c) {
    for (int64_t ki = 0; ki < k; ++ki) {
      int64_t i0, i1;
      tap_range(ki - r, H, i0, i1);
      for (int64_t kj = 0; kj < k; ++kj) {
        int64_t j0, j1;
        tap_range(kj - r, W, j0, j1);
        fn(c, (c * k + ki) * k + kj, ki - r, kj - r, i0, i1, j0, j1);
      }
    }
  }
}

template <typename T>
void spatial_conv_sample(const T* sa, const T* sm, const T* w, T b, T* z, int64_t H, int64_t W,
                         int64_t k) {
  std::fill(z, z + H * W, b);
  for_each_tap(k, H, W, [&](int c, int64_t t, int64_t di, int64_t dj, int64_t i0, int64_t i1,
                            int64_t j0, int64_t j1) {
    const T* f = c == 0 ? sa : sm;
    const T wv = w[t];
    for (int64_t i = i0; i < i1; ++i) {
      T* __restrict__ zr = z + i * W;
      const T* __restrict__ fr = f + (i + di) * W + dj;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) zr[j] += wv * fr[j];
    }
  });
}

// d(sa), d(sm) of one sample (scatter of dz through every tap), and its partial
// dweight (2*k*k) and dbias (1).
template <typename T>
void spatial_conv_bwd_sample(const T* dz, const T* sa, const T* sm, const T* w, T* dsa, T* dsm,
                             T* dw, T* db, int64_t H, int64_t W, int64_t k) {
  std::fill(dsa, dsa + H * W, T(0));
  std::fill(dsm, dsm + H * W, T(0));
  T sb = 0;
  for (int64_t p = 0; p < H * W; ++p) sb += dz[p];
  *db = sb;
  for_each_tap(k, H, W, [&](int c, int64_t t, int64_t di, int64_t dj, int64_t i0, int64_t i1,
                            int64_t j0, int64_t j1) {
    const T* f = c == 0 ? sa : sm;
    T* df = c == 0 ? dsa : dsm;
    const T wv = w[t];
    T acc = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const T* __restrict__ dzr = dz + i * W;
      const int64_t off = (i + di) * W + dj;
      const T* __restrict__ fr = f + off;
      T* __restrict__ dfr = df + off;
      T row = 0;
#pragma omp simd reduction(+ : row)
      for (int64_t j = j0; j < j1; ++j) {
        dfr[j] += wv * dzr[j];
        row += dzr[j] * fr[j];
      }
      acc += row;
    }
    dw[t] = acc;
  });
}

// Samples per task: waking the thread pool costs tens of microseconds on a small VM, more
// than a whole 14x14 map's 2*k*k taps, so a task gets at least ~256k multiply-adds.
int64_t conv_grain(int64_t H, int64_t W, int64_t k) {
  const int64_t per_sample = std::max<int64_t>(1, H * W * 2 * k * k);
  return std::max<int64_t>(1, (int64_t{1} << 18) / per_sample);
}

int64_t check_spatial_conv(const Tensor& sa, const Tensor& sm, const Tensor& weight) {
  return manet_kernels::check_spatial_conv_args(sa, sm, weight, check_dense_cpu);
}

Tensor spatial_conv(const Tensor& sa_in, const Tensor& sm_in, const Tensor& weight_in,
                    const std::optional<Tensor>& bias) {
  const int64_t k = check_spatial_conv(sa_in, sm_in, weight_in);
  manet_kernels::check_spatial_bias(bias, sa_in, check_dense_cpu);
  const Tensor sa = sa_in.contiguous(), sm = sm_in.contiguous(), weight = weight_in.contiguous();
  const int64_t N = sa.size(0), H = sa.size(1), W = sa.size(2);
  Tensor z = at::empty({N, H, W}, sa.options());
  AT_DISPATCH_FLOATING_TYPES(sa.scalar_type(), "mixed_attention_spatial_conv", [&] {
    const scalar_t b = bias.has_value() ? bias->item<scalar_t>() : scalar_t(0);
    const scalar_t *a = sa.data_ptr<scalar_t>(), *m = sm.data_ptr<scalar_t>(),
                   *w = weight.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, N, conv_grain(H, W, k), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        spatial_conv_sample(a + n * H * W, m + n * H * W, w, b, zp + n * H * W, H, W, k);
    });
  });
  return z;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> spatial_conv_bwd(const Tensor& dz_in,
                                                            const Tensor& sa_in,
                                                            const Tensor& sm_in,
                                                            const Tensor& weight_in,
                                                            bool has_bias) {
  const int64_t k = check_spatial_conv(sa_in, sm_in, weight_in);
  manet_kernels::check_spatial_map(dz_in, "dz", sa_in, check_dense_cpu);
  const Tensor dz = dz_in.contiguous(), sa = sa_in.contiguous(), sm = sm_in.contiguous(),
               weight = weight_in.contiguous();
  const int64_t N = sa.size(0), H = sa.size(1), W = sa.size(2);
  Tensor dsa = at::empty({N, H, W}, sa.options()), dsm = at::empty({N, H, W}, sa.options());
  const int64_t kk = 2 * k * k;
  Tensor part = at::empty({N, kk + 1}, sa.options());  // per sample: dweight, then dbias
  AT_DISPATCH_FLOATING_TYPES(sa.scalar_type(), "mixed_attention_spatial_conv_bwd", [&] {
    const scalar_t *g = dz.data_ptr<scalar_t>(), *a = sa.data_ptr<scalar_t>(),
                   *m = sm.data_ptr<scalar_t>(), *w = weight.data_ptr<scalar_t>();
    scalar_t *da = dsa.data_ptr<scalar_t>(), *dm = dsm.data_ptr<scalar_t>(),
             *pp = part.data_ptr<scalar_t>();
    // twice the forward's work per sample: half its grain
    at::parallel_for(0, N, std::max<int64_t>(1, conv_grain(H, W, k) / 2),
                     [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t o = n * H * W;
        spatial_conv_bwd_sample(g + o, a + o, m + o, w, da + o, dm + o, pp + n * (kk + 1),
                                pp + n * (kk + 1) + kk, H, W, k);
      }
    });
  });
  // Summed over samples in order: deterministic. A plain loop: 2*k*k+1 sums of N
  // values, where ATen's sum/narrow/reshape/clone cost more than the arithmetic.
  Tensor dweight = at::empty({1, 2, k, k}, sa.options());
  Tensor dbias = at::empty({has_bias ? 1 : 0}, sa.options());
  AT_DISPATCH_FLOATING_TYPES(sa.scalar_type(), "mixed_attention_spatial_conv_bwd_sum", [&] {
    const scalar_t* pp = part.data_ptr<scalar_t>();
    scalar_t* dw = dweight.data_ptr<scalar_t>();
    for (int64_t t = 0; t <= kk; ++t) {
      scalar_t acc = 0;
      for (int64_t n = 0; n < N; ++n) acc += pp[n * (kk + 1) + t];
      if (t < kk) {
        dw[t] = acc;
      } else if (has_bias) {
        dbias.data_ptr<scalar_t>()[0] = acc;
      }
    }
  });
  return {dsa, dsm, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(manet_kernels, CPU, m) {
  m.impl("mixed_attention_channel_pool", &channel_pool);
  m.impl("mixed_attention_spatial_pool", &spatial_pool);
  m.impl("mixed_attention_apply", &apply);
  m.impl("mixed_attention_bwd_reduce", &bwd_reduce);
  m.impl("mixed_attention_bwd_channel", &bwd_channel);
  m.impl("mixed_attention_bwd_dx", &bwd_dx);
  m.impl("mixed_attention_spatial_conv", &spatial_conv);
  m.impl("mixed_attention_spatial_conv_bwd", &spatial_conv_bwd);
}
