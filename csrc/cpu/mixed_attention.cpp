// CPU kernels for the mixed-attention passes (DESIGN.md section 1). The contract,
// including dtypes, tie-breaking and output memory format, is
// manet_kernels/reference/passes.py.
//
// Each pass reads its activation-sized inputs once. x / g come either
// NCHW-contiguous or channels_last-contiguous and every pass has one loop nest per
// layout, chosen so the innermost loop runs along the unit-stride dimension:
// reductions along the unit-stride dimension keep kLanes independent accumulators
// (so gcc can vectorise without reassociating a single sum), reductions across it
// accumulate element-wise into a small buffer that stays in L1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

enum class Layout { kNCHW, kNHWC };

// ---------------------------------------------------------------------------
// Argument checks. Every message starts with the argument's name.

Layout check_activation(const Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  TORCH_CHECK(t.layout() == at::kStrided, name, ": expected a strided (dense) tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 4, name, ": expected a rank-4 (N, C, H, W) tensor, got rank ", t.dim(),
              " with shape ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              name, ": expected dtype float32, float64, bfloat16 or float16, got ", st);
  // Index tensors are int32.
  TORCH_CHECK(t.size(1) <= std::numeric_limits<int32_t>::max() &&
                  t.size(2) * t.size(3) <= std::numeric_limits<int32_t>::max(),
              name, ": C and H*W must fit in int32, got shape ", t.sizes());
  if (t.is_contiguous()) return Layout::kNCHW;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::kNHWC;
  TORCH_CHECK(false, name,
              ": expected NCHW-contiguous or channels_last-contiguous strides, got shape ",
              t.sizes(), " with strides ", t.strides(), " (make it contiguous before calling)");
  return Layout::kNCHW;  // unreachable
}

at::ScalarType acc_dtype_for(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

void check_same_device(const Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  TORCH_CHECK(t.layout() == at::kStrided, name, ": expected a strided (dense) tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
}

// `dims` names the expected shape, e.g. "(N, C)".
void check_small(const Tensor& t, const char* name, const char* dims, at::IntArrayRef sizes,
                 at::ScalarType acc, const char* act_name, at::ScalarType act_dtype) {
  check_same_device(t, name);
  TORCH_CHECK(t.sizes() == sizes, name, ": expected shape ", dims, " = ", sizes, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, name, ": expected dtype ", acc,
              " (the accumulation dtype for ", act_name, " of dtype ", act_dtype, "), got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ",
              t.strides());
}

void check_index(const Tensor& t, const char* name, const char* dims, at::IntArrayRef sizes) {
  check_same_device(t, name);
  TORCH_CHECK(t.sizes() == sizes, name, ": expected shape ", dims, " = ", sizes, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt, name, ": expected dtype int32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ",
              t.strides());
}

at::MemoryFormat memory_format(Layout l) {
  return l == Layout::kNCHW ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
}

// ---------------------------------------------------------------------------
// Loop helpers.

// 64 bytes of accumulators: four SSE vectors of float, enough independent adds
// to hide the add latency without spilling.
template <typename acc_t>
constexpr int kLanes = static_cast<int>(64 / sizeof(acc_t));

// Index lanes as wide as the value lanes, so compare-and-select vectorises.
template <typename acc_t>
using lane_index_t = std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t>;

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

// Rows of at least this many elements per parallel chunk: below that the OpenMP
// fork/join costs more than the work.
constexpr int64_t kMinChunkElems = 1 << 14;

inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, kMinChunkElems / std::max<int64_t>(row_len, 1));
}

// Splits one dimension (`len`, with `inner` elements per unit) of each sample into
// blocks. The split depends on the shape only, never on the thread count, so the
// cross-block sums below come out bitwise identical on any machine. Blocks are
// multiples of 16 elements (a cache line of floats) so neighbouring blocks do not
// share lines.
struct Blocks {
  int64_t size;
  int64_t count;
};

Blocks split_blocks(int64_t samples, int64_t len, int64_t inner) {
  if (len <= 0) return {0, 0};
  constexpr int64_t kTargetItems = 32;
  const int64_t want = ceil_div(kTargetItems, std::max<int64_t>(samples, 1));
  const int64_t by_work = std::max<int64_t>(1, len * std::max<int64_t>(inner, 1) / kMinChunkElems);
  const int64_t nb = std::max<int64_t>(1, std::min({want, by_work, ceil_div(len, 16)}));
  const int64_t size = std::min(len, ceil_div(ceil_div(len, nb), 16) * 16);
  return {size, ceil_div(len, size)};
}

// sum, max and first argmax (torch.max semantics: first maximum, a NaN counts as
// the maximum and the first NaN wins) of v[i] = x[i] (* w[i]) over a contiguous row.
template <typename scalar_t, typename acc_t, bool kScaled>
inline void row_sum_max(const scalar_t* __restrict__ x, const acc_t* __restrict__ w, int64_t n,
                        acc_t& sum_out, acc_t& max_out, int64_t& arg_out) {
  constexpr int L = kLanes<acc_t>;
  using idx_t = lane_index_t<acc_t>;
  acc_t s[L], m[L];
  idx_t id[L];
  for (int j = 0; j < L; ++j) {
    s[j] = acc_t(0);
    m[j] = kNegInf<acc_t>;
    id[j] = 0;
  }
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int j = 0; j < L; ++j) {
      acc_t v = static_cast<acc_t>(x[i + j]);
      if constexpr (kScaled) v = v * w[i + j];
      s[j] += v;
      const bool gt = v > m[j];
      m[j] = gt ? v : m[j];
      id[j] = gt ? static_cast<idx_t>(i + j) : id[j];
    }
  }
  for (int j = 0; i + j < n; ++j) {
    acc_t v = static_cast<acc_t>(x[i + j]);
    if constexpr (kScaled) v = v * w[i + j];
    s[j] += v;
    if (v > m[j]) {
      m[j] = v;
      id[j] = static_cast<idx_t>(i + j);
    }
  }
  // Each lane holds its own first maximum; across lanes the lowest index wins ties.
  // Lanes never updated hold (-inf, 0), which is right when every value is -inf.
  int best = 0;
  for (int j = 1; j < L; ++j)
    if (m[j] > m[best] || (m[j] == m[best] && id[j] < id[best])) best = j;
  acc_t sum = lane_sum<acc_t, L>(s);
  acc_t mx = m[best];
  int64_t arg = id[best];
  // A NaN anywhere makes the sum NaN, so the compare-and-select loop above needs no
  // NaN test; the rare NaN row is rescanned (inf - inf also lands here, finds no NaN
  // and keeps the result above).
  if (std::isnan(sum)) {
    for (int64_t k = 0; k < n; ++k) {
      acc_t v = static_cast<acc_t>(x[k]);
      if constexpr (kScaled) v = v * w[k];
      if (std::isnan(v)) {
        mx = v;
        arg = k;
        break;
      }
    }
  }
  sum_out = sum;
  max_out = mx;
  arg_out = arg;
}

// Per-block running sum / max / first argmax across rows, element-wise along a
// unit-stride segment of length len: the reduction runs across the rows.
template <typename acc_t>
struct ColumnStats {
  std::vector<acc_t> sum, max;
  std::vector<int32_t> arg;
  explicit ColumnStats(int64_t len) : sum(len), max(len), arg(len) {}
  void reset(int64_t len) {
    std::fill_n(sum.data(), len, acc_t(0));
    std::fill_n(max.data(), len, kNegInf<acc_t>);
    std::fill_n(arg.data(), len, int32_t(0));
  }
  template <typename scalar_t>
  inline void add_row(const scalar_t* __restrict__ x, acc_t scale, int32_t row, int64_t len) {
    acc_t* __restrict__ s = sum.data();
    acc_t* __restrict__ m = max.data();
    int32_t* __restrict__ a = arg.data();
    for (int64_t k = 0; k < len; ++k) {
      const acc_t v = static_cast<acc_t>(x[k]) * scale;
      s[k] += v;
      const bool gt = v > m[k];
      m[k] = gt ? v : m[k];
      a[k] = gt ? row : a[k];
    }
  }
  template <typename scalar_t>
  inline void add_row(const scalar_t* __restrict__ x, int32_t row, int64_t len) {
    acc_t* __restrict__ s = sum.data();
    acc_t* __restrict__ m = max.data();
    int32_t* __restrict__ a = arg.data();
    for (int64_t k = 0; k < len; ++k) {
      const acc_t v = static_cast<acc_t>(x[k]);
      s[k] += v;
      const bool gt = v > m[k];
      m[k] = gt ? v : m[k];
      a[k] = gt ? row : a[k];
    }
  }
};

// ---------------------------------------------------------------------------
// F1: avg / max / argmax over positions.

template <typename scalar_t>
void channel_pool_impl(const Tensor& x, Layout layout, Tensor& avg, Tensor& mx, Tensor& im) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* ap = avg.mutable_data_ptr<acc_t>();
  acc_t* mp = mx.mutable_data_ptr<acc_t>();
  int32_t* ip = im.mutable_data_ptr<int32_t>();
  const acc_t den = static_cast<acc_t>(P);

  if (layout == Layout::kNCHW) {
    at::parallel_for(0, N * C, row_grain(P), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        acc_t s, m;
        int64_t a;
        row_sum_max<scalar_t, acc_t, false>(xp + r * P, nullptr, P, s, m, a);
        ap[r] = s / den;
        mp[r] = m;
        ip[r] = static_cast<int32_t>(a);
      }
    });
    return;
  }

  const Blocks cb = split_blocks(N, C, P);
  at::parallel_for(0, N * cb.count, 1, [&](int64_t begin, int64_t end) {
    ColumnStats<acc_t> st(cb.size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / cb.count, c0 = (item % cb.count) * cb.size;
      const int64_t len = std::min(cb.size, C - c0);
      const scalar_t* base = xp + n * P * C + c0;
      st.reset(len);
      for (int64_t p = 0; p < P; ++p) st.add_row(base + p * C, static_cast<int32_t>(p), len);
      for (int64_t k = 0; k < len; ++k) {
        if (std::isnan(st.sum[k])) {
          for (int64_t p = 0; p < P; ++p) {
            const acc_t v = static_cast<acc_t>(base[p * C + k]);
            if (std::isnan(v)) {
              st.max[k] = v;
              st.arg[k] = static_cast<int32_t>(p);
              break;
            }
          }
        }
        const int64_t o = n * C + c0 + k;
        ap[o] = st.sum[k] / den;
        mp[o] = st.max[k];
        ip[o] = st.arg[k];
      }
    }
  });
}

// ---------------------------------------------------------------------------
// F2: with x1 = mc * x, mean / max / argmax over channels.

template <typename scalar_t>
void spatial_pool_impl(const Tensor& x, Layout layout, const Tensor& mc, Tensor& sa, Tensor& sm,
                       Tensor& ic) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* mcp = mc.const_data_ptr<acc_t>();
  acc_t* sap = sa.mutable_data_ptr<acc_t>();
  acc_t* smp = sm.mutable_data_ptr<acc_t>();
  int32_t* icp = ic.mutable_data_ptr<int32_t>();
  const acc_t den = static_cast<acc_t>(C);

  if (layout == Layout::kNHWC) {
    at::parallel_for(0, N * P, row_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / P;
        acc_t s, m;
        int64_t a;
        row_sum_max<scalar_t, acc_t, true>(xp + r * C, mcp + n * C, C, s, m, a);
        sap[r] = s / den;
        smp[r] = m;
        icp[r] = static_cast<int32_t>(a);
      }
    });
    return;
  }

  // NCHW: stream the C rows of a block of positions, accumulating per position.
  const Blocks pb = split_blocks(N, P, C);
  at::parallel_for(0, N * pb.count, 1, [&](int64_t begin, int64_t end) {
    ColumnStats<acc_t> st(pb.size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / pb.count, p0 = (item % pb.count) * pb.size;
      const int64_t len = std::min(pb.size, P - p0);
      const scalar_t* base = xp + n * C * P + p0;
      const acc_t* mcn = mcp + n * C;
      st.reset(len);
      for (int64_t c = 0; c < C; ++c) st.add_row(base + c * P, mcn[c], static_cast<int32_t>(c), len);
      for (int64_t k = 0; k < len; ++k) {
        if (std::isnan(st.sum[k])) {
          for (int64_t c = 0; c < C; ++c) {
            const acc_t v = static_cast<acc_t>(base[c * P + k]) * mcn[c];
            if (std::isnan(v)) {
              st.max[k] = v;
              st.arg[k] = static_cast<int32_t>(c);
              break;
            }
          }
        }
        const int64_t o = n * P + p0 + k;
        sap[o] = st.sum[k] / den;
        smp[o] = st.max[k];
        icp[o] = st.arg[k];
      }
    }
  });
}

// ---------------------------------------------------------------------------
// F3: y = x * mc * ms (in that order, as the reference rounds).

template <typename scalar_t>
void apply_impl(const Tensor& x, Layout layout, const Tensor& mc, const Tensor& ms, Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* mcp = mc.const_data_ptr<acc_t>();
  const acc_t* msp = ms.const_data_ptr<acc_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();

  if (layout == Layout::kNCHW) {
    at::parallel_for(0, N * C, row_grain(P), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t s = mcp[r];
        const acc_t* __restrict__ msr = msp + (r / C) * P;
        const scalar_t* __restrict__ xr = xp + r * P;
        scalar_t* __restrict__ yr = yp + r * P;
        for (int64_t p = 0; p < P; ++p)
          yr[p] = static_cast<scalar_t>(static_cast<acc_t>(xr[p]) * s * msr[p]);
      }
    });
  } else {
    at::parallel_for(0, N * P, row_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t t = msp[r];
        const acc_t* __restrict__ mcr = mcp + (r / P) * C;
        const scalar_t* __restrict__ xr = xp + r * C;
        scalar_t* __restrict__ yr = yp + r * C;
        for (int64_t c = 0; c < C; ++c)
          yr[c] = static_cast<scalar_t>(static_cast<acc_t>(xr[c]) * mcr[c] * t);
      }
    });
  }
}

// ---------------------------------------------------------------------------
// B1: dms = sum_c g*x*mc and dmc = sum_p g*x*ms, both from one read of g and x.
// One of the two reductions crosses the position blocks; each block writes its
// own partial row and the partials are added in block order afterwards.

template <typename scalar_t>
void bwd_reduce_impl(const Tensor& g, const Tensor& x, Layout layout, const Tensor& mc,
                     const Tensor& ms, Tensor& dms, Tensor& dmc) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = kLanes<acc_t>;
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* mcp = mc.const_data_ptr<acc_t>();
  const acc_t* msp = ms.const_data_ptr<acc_t>();
  acc_t* dmsp = dms.mutable_data_ptr<acc_t>();
  acc_t* dmcp = dmc.mutable_data_ptr<acc_t>();

  const Blocks pb = split_blocks(N, P, C);
  // partial[n][block][c]
  std::vector<acc_t> partial(static_cast<size_t>(N * pb.count * C));
  acc_t* part = partial.data();

  if (layout == Layout::kNCHW) {
    at::parallel_for(0, N * pb.count, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(pb.size);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / pb.count, p0 = (item % pb.count) * pb.size;
        const int64_t len = std::min(pb.size, P - p0);
        const acc_t* __restrict__ msr = msp + n * P + p0;
        acc_t* __restrict__ d = buf.data();
        acc_t* __restrict__ pr = part + item * C;
        std::fill_n(d, len, acc_t(0));
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* __restrict__ gr = gp + (n * C + c) * P + p0;
          const scalar_t* __restrict__ xr = xp + (n * C + c) * P + p0;
          const acc_t w = mcp[n * C + c];
          acc_t lane[L];
          for (int j = 0; j < L; ++j) lane[j] = acc_t(0);
          int64_t k = 0;
          for (; k + L <= len; k += L) {
            for (int j = 0; j < L; ++j) {
              const acc_t gx = static_cast<acc_t>(gr[k + j]) * static_cast<acc_t>(xr[k + j]);
              d[k + j] += gx * w;
              lane[j] += gx * msr[k + j];
            }
          }
          for (int j = 0; k + j < len; ++j) {
            const acc_t gx = static_cast<acc_t>(gr[k + j]) * static_cast<acc_t>(xr[k + j]);
            d[k + j] += gx * w;
            lane[j] += gx * msr[k + j];
          }
          pr[c] = lane_sum<acc_t, L>(lane);
        }
        std::copy_n(d, len, dmsp + n * P + p0);
      }
    });
  } else {
    at::parallel_for(0, N * pb.count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / pb.count, p0 = (item % pb.count) * pb.size;
        const int64_t len = std::min(pb.size, P - p0);
        const acc_t* __restrict__ mcr = mcp + n * C;
        acc_t* __restrict__ pr = part + item * C;
        std::fill_n(pr, C, acc_t(0));
        for (int64_t p = p0; p < p0 + len; ++p) {
          const scalar_t* __restrict__ gr = gp + (n * P + p) * C;
          const scalar_t* __restrict__ xr = xp + (n * P + p) * C;
          const acc_t t = msp[n * P + p];
          acc_t lane[L];
          for (int j = 0; j < L; ++j) lane[j] = acc_t(0);
          int64_t c = 0;
          for (; c + L <= C; c += L) {
            for (int j = 0; j < L; ++j) {
              const acc_t gx = static_cast<acc_t>(gr[c + j]) * static_cast<acc_t>(xr[c + j]);
              lane[j] += gx * mcr[c + j];
              pr[c + j] += gx * t;
            }
          }
          for (int j = 0; c + j < C; ++j) {
            const acc_t gx = static_cast<acc_t>(gr[c + j]) * static_cast<acc_t>(xr[c + j]);
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
// The dense and the gathered terms are summed apart and added at the end, as the
// reference does.

template <typename scalar_t>
void bwd_channel_impl(const Tensor& x, Layout layout, const Tensor& da_s, const Tensor& dm_s,
                      const Tensor& ic, Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = kLanes<acc_t>;
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* dap = da_s.const_data_ptr<acc_t>();
  const acc_t* dmp = dm_s.const_data_ptr<acc_t>();
  const int32_t* icp = ic.const_data_ptr<int32_t>();
  acc_t* op = out.mutable_data_ptr<acc_t>();

  // The gather below reads x[n, ic, p]: an index outside [0, C) would read out of
  // bounds (the reference's gather raises too).
  {
    int32_t lo = 0, hi = 0;
    const int64_t NP = N * P;
    if (NP > 0) {
      lo = hi = icp[0];
      for (int64_t i = 0; i < NP; ++i) {
        lo = std::min(lo, icp[i]);
        hi = std::max(hi, icp[i]);
      }
    }
    TORCH_CHECK(NP == 0 || (lo >= 0 && hi < C), "ic: expected channel indices in [0, C=", C,
                "), got values in [", lo, ", ", hi, "]");
  }

  // da_s / C once per position (a division, as the reference computes it).
  std::vector<acc_t> wbuf(static_cast<size_t>(N * P));
  const acc_t den = static_cast<acc_t>(C);
  for (int64_t i = 0; i < N * P; ++i) wbuf[i] = dap[i] / den;
  const acc_t* wp = wbuf.data();

  if (layout == Layout::kNCHW) {
    // Gathered term first (N*P scattered reads, not a pass), then the dense rows.
    std::vector<acc_t> sparse(static_cast<size_t>(N * C), acc_t(0));
    acc_t* sp = sparse.data();
    at::parallel_for(0, N, std::max<int64_t>(1, kMinChunkElems / std::max<int64_t>(P, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t n = begin; n < end; ++n)
                         for (int64_t p = 0; p < P; ++p) {
                           const int64_t c = icp[n * P + p];
                           sp[n * C + c] += dmp[n * P + p] *
                                            static_cast<acc_t>(xp[(n * C + c) * P + p]);
                         }
                     });
    at::parallel_for(0, N * C, row_grain(P), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* __restrict__ xr = xp + r * P;
        const acc_t* __restrict__ wr = wp + (r / C) * P;
        acc_t lane[L];
        for (int j = 0; j < L; ++j) lane[j] = acc_t(0);
        int64_t p = 0;
        for (; p + L <= P; p += L)
          for (int j = 0; j < L; ++j) lane[j] += static_cast<acc_t>(xr[p + j]) * wr[p + j];
        for (int j = 0; p + j < P; ++j) lane[j] += static_cast<acc_t>(xr[p + j]) * wr[p + j];
        op[r] = lane_sum<acc_t, L>(lane) + sp[r];
      }
    });
    return;
  }

  const Blocks pb = split_blocks(N, P, C);
  // partial[n][block][{dense, sparse}][c]
  std::vector<acc_t> partial(static_cast<size_t>(N * pb.count * 2 * C));
  acc_t* part = partial.data();
  at::parallel_for(0, N * pb.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / pb.count, p0 = (item % pb.count) * pb.size;
      const int64_t len = std::min(pb.size, P - p0);
      acc_t* __restrict__ dense = part + item * 2 * C;
      acc_t* __restrict__ sparse = dense + C;
      std::fill_n(dense, 2 * C, acc_t(0));
      for (int64_t p = p0; p < p0 + len; ++p) {
        const scalar_t* __restrict__ xr = xp + (n * P + p) * C;
        const acc_t w = wp[n * P + p];
        for (int64_t c = 0; c < C; ++c) dense[c] += static_cast<acc_t>(xr[c]) * w;
        const int64_t c = icp[n * P + p];
        sparse[c] += dmp[n * P + p] * static_cast<acc_t>(xr[c]);
      }
    }
  });
  for (int64_t n = 0; n < N; ++n) {
    acc_t* __restrict__ o = op + n * C;
    for (int64_t c = 0; c < C; ++c) {
      acc_t d = 0, s = 0;
      for (int64_t b = 0; b < pb.count; ++b) {
        d += part[((n * pb.count + b) * 2) * C + c];
        s += part[((n * pb.count + b) * 2 + 1) * C + c];
      }
      o[c] = d + s;
    }
  }
}

// ---------------------------------------------------------------------------
// B3: dx = mc*(g*ms + da_s/C + dm_s*[c == ic]) + d_avg/P + d_mx*[p == im].
// The dense part is one streaming pass; the two one-hot terms touch N*P and N*C
// elements, which are recomputed in full where they apply. An index out of range
// matches nothing, as in the reference.

template <typename scalar_t>
void bwd_dx_impl(const Tensor& g, Layout layout, const Tensor& mc, const Tensor& ms,
                 const Tensor& da_s, const Tensor& dm_s, const Tensor& ic, const Tensor& d_avg,
                 const Tensor& d_mx, const Tensor& im, Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = g.size(0), C = g.size(1), P = g.size(2) * g.size(3);
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const acc_t* mcp = mc.const_data_ptr<acc_t>();
  const acc_t* msp = ms.const_data_ptr<acc_t>();
  const acc_t* dap = da_s.const_data_ptr<acc_t>();
  const acc_t* dmp = dm_s.const_data_ptr<acc_t>();
  const int32_t* icp = ic.const_data_ptr<int32_t>();
  const acc_t* davp = d_avg.const_data_ptr<acc_t>();
  const acc_t* dmxp = d_mx.const_data_ptr<acc_t>();
  const int32_t* imp = im.const_data_ptr<int32_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();

  // da_s / C and d_avg / P, divided once as the reference does.
  std::vector<acc_t> abuf(static_cast<size_t>(N * P)), bbuf(static_cast<size_t>(N * C));
  for (int64_t i = 0; i < N * P; ++i) abuf[i] = dap[i] / static_cast<acc_t>(C);
  for (int64_t i = 0; i < N * C; ++i) bbuf[i] = davp[i] / static_cast<acc_t>(P);
  const acc_t* ap = abuf.data();
  const acc_t* bp = bbuf.data();

  // The exact reference expression for one element.
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
        const int32_t c32 = static_cast<int32_t>(c);
        const acc_t s = mcp[r], b = bp[r];
        const scalar_t* __restrict__ gr = gp + r * P;
        const acc_t* __restrict__ msr = msp + n * P;
        const acc_t* __restrict__ ar = ap + n * P;
        const acc_t* __restrict__ dmr = dmp + n * P;
        const int32_t* __restrict__ icr = icp + n * P;
        scalar_t* __restrict__ out = dxp + r * P;
        for (int64_t p = 0; p < P; ++p) {
          const acc_t inner =
              (static_cast<acc_t>(gr[p]) * msr[p] + ar[p]) + (icr[p] == c32 ? dmr[p] : acc_t(0));
          out[p] = static_cast<scalar_t>(s * inner + b);
        }
        const int64_t pi = imp[r];
        if (pi >= 0 && pi < P) out[pi] = static_cast<scalar_t>(full(n, c, pi, static_cast<acc_t>(gr[pi])));
      }
    });
    return;
  }

  at::parallel_for(0, N * P, row_grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / P, p = r % P;
      const acc_t t = msp[r], a = ap[r];
      const scalar_t* __restrict__ gr = gp + r * C;
      const acc_t* __restrict__ mcr = mcp + n * C;
      const acc_t* __restrict__ br = bp + n * C;
      scalar_t* __restrict__ out = dxp + r * C;
      for (int64_t c = 0; c < C; ++c)
        out[c] = static_cast<scalar_t>(mcr[c] * (static_cast<acc_t>(gr[c]) * t + a) + br[c]);
      const int64_t ci = icp[r];
      if (ci >= 0 && ci < C) out[ci] = static_cast<scalar_t>(full(n, ci, p, static_cast<acc_t>(gr[ci])));
    }
  });
  // The argmax-position term, after every row above is written.
  at::parallel_for(0, N * C, std::max<int64_t>(1, kMinChunkElems / 16), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / C, c = r % C, pi = imp[r];
      if (pi < 0 || pi >= P) continue;
      const int64_t o = (n * P + pi) * C + c;
      dxp[o] = static_cast<scalar_t>(full(n, c, pi, static_cast<acc_t>(gp[o])));
    }
  });
}

// ---------------------------------------------------------------------------
// Op entry points: check, allocate, dispatch.

std::tuple<Tensor, Tensor, Tensor> channel_pool(const Tensor& x) {
  const Layout layout = check_activation(x, "x");
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  TORCH_CHECK(P >= 1, "x: expected H*W >= 1 to take a max over positions, got shape ", x.sizes());
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
  TORCH_CHECK(C >= 1, "x: expected C >= 1 to take a max over channels, got shape ", x.sizes());
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
  TORCH_CHECK(g.sizes() == x.sizes(), "g: expected the shape of x ", x.sizes(), ", got ",
              g.sizes());
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), "g: expected the dtype of x (",
              x.scalar_type(), "), got ", g.scalar_type());
  TORCH_CHECK(g_layout == layout, "g: expected the memory format of x (",
              layout == Layout::kNCHW ? "NCHW-contiguous" : "channels_last-contiguous",
              "), got ", g_layout == Layout::kNCHW ? "NCHW-contiguous" : "channels_last-contiguous");
  const auto acc = acc_dtype_for(x.scalar_type());
  check_small(mc, "mc", "(N, C)", {N, C}, acc, "x", x.scalar_type());
  check_small(ms, "ms", "(N, H, W)", {N, H, W}, acc, "x", x.scalar_type());
  Tensor dms = at::empty({N, H, W}, x.options().dtype(acc));
  Tensor dmc = at::empty({N, C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "mixed_attention_bwd_reduce",
                                  [&] { bwd_reduce_impl<scalar_t>(g, x, layout, mc, ms, dms, dmc); });
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
                                  "mixed_attention_bwd_channel",
                                  [&] { bwd_channel_impl<scalar_t>(x, layout, da_s, dm_s, ic, out); });
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

}  // namespace

TORCH_LIBRARY_IMPL(manet_kernels, CPU, m) {
  m.impl("mixed_attention_channel_pool", &channel_pool);
  m.impl("mixed_attention_spatial_pool", &spatial_pool);
  m.impl("mixed_attention_apply", &apply);
  m.impl("mixed_attention_bwd_reduce", &bwd_reduce);
  m.impl("mixed_attention_bwd_channel", &bwd_channel);
  m.impl("mixed_attention_bwd_dx", &bwd_dx);
}
