// The BR-NPA CPU pass kernels (docs/design.md §3), shared by the pass ops
// (brnpa.cpp) and the stage ops (brnpa_stages.cpp). The contract, dtypes and
// output memory format included, is the brnpa_* functions of
// manet_kernels/reference/passes.py.
//
// Each op reads x once. x is NCHW-contiguous or channels_last-contiguous and each
// op has one loop nest per layout, arranged so the innermost loop runs along the
// unit-stride dimension:
//   * channels_last: the C-vector of a position is contiguous, so a position is
//     reduced over C and then used at once (it is still in L1).
//   * NCHW: the C-vector of a position is strided by P. A block of positions is
//     swept row by row (C rows of `len` contiguous elements), accumulating the
//     per-position sums element-wise, and the second phase of the op re-reads the
//     same block from cache (the block is sized for L2).
// Sums over positions are formed per block into partial buffers and then added
// block by block in order. Blocks depend on the shape only, never on the thread
// count, so every result is bitwise reproducible.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../check.h"

namespace manet_kernels {
namespace brnpa_cpu {

using at::Tensor;

enum class Layout { kNCHW, kNHWC };

// ---------------------------------------------------------------------------
// Argument checks. Each message starts with the argument's name.

inline Layout check_x(const Tensor& x) {
  MK_CHECK(x.defined(), "x: expected a tensor, got an undefined one");
  MK_CHECK(x.layout() == at::kStrided, "x: expected a strided tensor, got layout ", x.layout());
  MK_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got device ", x.device());
  MK_CHECK(x.dim() == 4, "x: expected a 4-D (B, C, H, W) tensor, got shape ", x.sizes());
  const auto st = x.scalar_type();
  MK_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
           "x: expected dtype float32, float64, bfloat16 or float16, got ", st);
  // Plain-contiguous wins when both hold (C == 1 or H*W == 1): the output then
  // comes back contiguous, as the reference's _like_x does.
  if (x.is_contiguous()) return Layout::kNCHW;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::kNHWC;
  MK_CHECK(false,
           "x: expected an NCHW-contiguous or channels_last-contiguous tensor, got "
           "shape ",
           x.sizes(), " with strides ", x.strides());
  return Layout::kNCHW;
}

inline at::ScalarType acc_type_of(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_cpu_dense(const Tensor& t, const char* name) {
  MK_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  MK_CHECK(t.layout() == at::kStrided, name, ": expected a strided tensor, got layout ",
           t.layout());
  MK_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
}

// A small operand: contiguous, in the accumulation dtype, of shape `sizes`
// (`dims` spells the symbolic shape for the message).
inline void check_small(const Tensor& t, const char* name, const char* dims, at::IntArrayRef sizes,
                        at::ScalarType acc, at::ScalarType x_dtype) {
  check_cpu_dense(t, name);
  MK_CHECK(t.sizes() == sizes, name, ": expected shape ", dims, " = ", sizes, ", got ", t.sizes());
  MK_CHECK(t.scalar_type() == acc, name, ": expected dtype ", acc,
           " (the accumulation dtype for x of dtype ", x_dtype, "), got ", t.scalar_type());
  MK_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

// The leading size of a (B, K, ...) operand whose K is free.
inline int64_t check_rank_get_dim1(const Tensor& t, const char* name, const char* dims,
                                   int64_t rank) {
  check_cpu_dense(t, name);
  MK_CHECK(t.dim() == rank, name, ": expected a ", rank, "-D tensor of shape ", dims,
           ", got shape ", t.sizes());
  return t.size(1);
}

// idx as a contiguous int64 copy (it has B elements), every value checked.
inline Tensor check_idx(const Tensor& idx, int64_t B, int64_t P) {
  check_cpu_dense(idx, "idx");
  MK_CHECK(idx.scalar_type() == at::kLong, "idx: expected dtype int64, got ", idx.scalar_type());
  MK_CHECK(idx.dim() == 1 && idx.size(0) == B, "idx: expected shape (B,) = (", B, "), got ",
           idx.sizes());
  Tensor c = idx.contiguous();
  const int64_t* ip = c.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    MK_CHECK(ip[b] >= 0 && ip[b] < P, "idx: expected values in [0, H*W) = [0, ", P, "), got idx[",
             b, "] = ", ip[b]);
  return c;
}

inline at::MemoryFormat memory_format_of(Layout l) {
  return l == Layout::kNCHW ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
}

// ---------------------------------------------------------------------------
// Element access. float16 and bfloat16 are read and written as their bit patterns
// and converted with the integer and float operations below, which gcc vectorises
// (c10's scalar conversions branch, which keeps a loop scalar). The conversions to
// float are exact; those from float round to nearest even, as torch's do (a NaN
// becomes the default quiet NaN, where torch may keep some payload bits).

struct HalfBits {
  uint16_t bits;
};
struct BF16Bits {
  uint16_t bits;
};

template <typename T>
struct ElemOf {
  using type = T;
};
template <>
struct ElemOf<at::Half> {
  using type = HalfBits;
};
template <>
struct ElemOf<at::BFloat16> {
  using type = BF16Bits;
};
template <typename T>
using elem_t = typename ElemOf<T>::type;

template <typename T>
const elem_t<T>* elems(const Tensor& t) {
  return reinterpret_cast<const elem_t<T>*>(t.const_data_ptr<T>());
}
template <typename T>
elem_t<T>* elems_mut(Tensor& t) {
  return reinterpret_cast<elem_t<T>*>(t.mutable_data_ptr<T>());
}

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// cond ? a : b as bit operations. gcc sinks the float arithmetic feeding a plain
// `?:` into a branch (it may trap, under the default -ftrapping-math), and a branch
// keeps the loop scalar; the mask form keeps both sides computed and vectorises.
inline uint32_t pick(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

inline float to_float(HalfBits h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const int32_t em = h.bits & 0x7FFF;  // exponent and mantissa
  // Normal: move the fields into place and rebias the exponent (127 - 15 = 112).
  const uint32_t normal = (static_cast<uint32_t>(em) << 13) + (112u << 23);
  // Infinity / NaN: exponent all ones, payload kept.
  const uint32_t special = (static_cast<uint32_t>(em) << 13) | 0x7F800000u;
  // Zero / subnormal: mantissa * 2^-24, exact in float.
  const uint32_t tiny = bits_of(static_cast<float>(em) * 0x1p-24f);
  uint32_t r = pick(em < 0x0400, tiny, normal);
  r = pick(em >= 0x7C00, special, r);
  return float_of(r | sign);
}

inline float to_float(BF16Bits b) {
  return float_of(static_cast<uint32_t>(b.bits) << 16);
}

inline HalfBits half_from_float(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t ua = u & 0x7FFFFFFFu;
  const int32_t ax = static_cast<int32_t>(ua);  // signed compares vectorise on SSE2
  // Normal result: drop 13 mantissa bits rounding to nearest even, rebias by 112
  // (a carry out of the mantissa correctly bumps the exponent).
  const uint32_t normal = ((ua + 0xFFFu + ((ua >> 13) & 1u)) >> 13) - (112u << 10);
  // Below 2^-14 the result is a multiple of 2^-24, which is float's step just above
  // 0.5: adding 0.5f rounds |f| to it (nearest even) and leaves the count of steps
  // in the low bits.
  const uint32_t tiny = bits_of(float_of(ua) + 0.5f) - 0x3F000000u;
  uint32_t r = pick(ax < 0x38800000, tiny, normal);
  r = pick(ax >= 0x477FF000, 0x7C00u, r);  // rounds to infinity, or is infinite
  r = pick(ax > 0x7F800000, 0x7E00u, r);   // NaN
  return HalfBits{static_cast<uint16_t>(r | sign)};
}

inline BF16Bits bf16_from_float(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = static_cast<int32_t>(u & 0x7FFFFFFFu) > 0x7F800000;
  return BF16Bits{static_cast<uint16_t>(nan ? 0x7FC0u : rounded)};
}

template <typename acc_t, typename T>
inline acc_t to_acc(T v) {
  if constexpr (std::is_same_v<T, HalfBits> || std::is_same_v<T, BF16Bits>)
    return to_float(v);
  else
    return static_cast<acc_t>(v);
}

template <typename T, typename acc_t>
inline T from_acc(acc_t v) {
  if constexpr (std::is_same_v<T, HalfBits>)
    return half_from_float(v);
  else if constexpr (std::is_same_v<T, BF16Bits>)
    return bf16_from_float(v);
  else
    return static_cast<T>(v);
}

// ---------------------------------------------------------------------------
// Loop helpers. Baseline x86-64 gcc vectorises with 16-byte SSE registers, which
// makes most of these passes bound by loads and stores to L1 rather than by DRAM;
// the helpers below share each load among up to four rows to cut that traffic.

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
inline int64_t round_up(int64_t a, int64_t m) {
  return ceil_div(a, m) * m;
}

// Parallel chunks of fewer elements than this cost more in fork/join than they save.
constexpr int64_t kMinChunkElems = 1 << 14;

inline int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, kMinChunkElems / std::max<int64_t>(elems_per_item, 1));
}

template <int N>
using Int = std::integral_constant<int, N>;

// Calls f(Int<n>{}) for a runtime n in [1, 4].
template <typename F>
inline void with_count(int64_t n, F&& f) {
  switch (n) {
    case 1: f(Int<1>{}); break;
    case 2: f(Int<2>{}); break;
    case 3: f(Int<3>{}); break;
    default: f(Int<4>{}); break;
  }
}

template <typename acc_t, int L>
inline acc_t lane_total(acc_t* lane) {
  for (int w = L / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) lane[j] += lane[j + w];
  return lane[0];
}

// A single dot product, 64 bytes of partial sums (enough to hide the add latency
// when nothing else runs alongside).
template <typename acc_t, typename a_t, typename b_t>
inline acc_t dot(const a_t* __restrict__ a, const b_t* __restrict__ b, int64_t n) {
  constexpr int L = static_cast<int>(64 / sizeof(acc_t));
  acc_t lane[L];
  for (int j = 0; j < L; ++j) lane[j] = acc_t(0);
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int j = 0; j < L; ++j) lane[j] += to_acc<acc_t>(a[i + j]) * to_acc<acc_t>(b[i + j]);
  acc_t s = lane_total<acc_t, L>(lane);
  for (; i < n; ++i) s += to_acc<acc_t>(a[i]) * to_acc<acc_t>(b[i]);
  return s;
}

// out[q] = sum_i a[q][i] * b[i] for q < N; each b[i] is loaded once for all N rows.
// `omp simd reduction` (the build passes -fopenmp) lets gcc keep one vector of
// partial sums per row, the N rows giving independent add chains. The lane order
// is fixed by the build and does not depend on the data's alignment (no peeling;
// the tests check this), so results are reproducible. gcc turns the hand-laned form
// used by `dot` above into scalar spills when it has several rows.
template <int N, typename acc_t, typename a_t, typename b_t>
inline void multi_dot(const a_t* const* a, const b_t* __restrict__ b, int64_t n, acc_t* out) {
  if constexpr (N == 1) {
    out[0] = dot<acc_t>(a[0], b, n);
  } else {
    const a_t* __restrict__ a0 = a[0];
    const a_t* __restrict__ a1 = a[1];
    const a_t* __restrict__ a2 = N > 2 ? a[2] : nullptr;
    const a_t* __restrict__ a3 = N > 3 ? a[3] : nullptr;
    acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t bv = to_acc<acc_t>(b[i]);
      s0 += to_acc<acc_t>(a0[i]) * bv;
      s1 += to_acc<acc_t>(a1[i]) * bv;
      if constexpr (N > 2) s2 += to_acc<acc_t>(a2[i]) * bv;
      if constexpr (N > 3) s3 += to_acc<acc_t>(a3[i]) * bv;
    }
    out[0] = s0;
    out[1] = s1;
    if constexpr (N > 2) out[2] = s2;
    if constexpr (N > 3) out[3] = s3;
  }
}

// o_q[i] (= or +=) sum_{r < NI} w[q][r] * x_r[i] for q < NO, i < n: each input
// element is loaded once for the NO outputs, each output once for the NI inputs.
// Pointers are separate restrict parameters (unused ones null) so gcc vectorises
// without run-time alias checks.
template <int NO, int NI, bool kInit, typename acc_t, typename x_t>
inline void accum(acc_t* __restrict__ o0, acc_t* __restrict__ o1, acc_t* __restrict__ o2,
                  acc_t* __restrict__ o3, const x_t* __restrict__ x0, const x_t* __restrict__ x1,
                  const x_t* __restrict__ x2, const x_t* __restrict__ x3, const acc_t (&w)[4][4],
                  int64_t n) {
  acc_t c[4][4];
  for (int q = 0; q < 4; ++q)
    for (int r = 0; r < 4; ++r) c[q][r] = w[q][r];
  for (int64_t i = 0; i < n; ++i) {
    acc_t v[4];
    v[0] = to_acc<acc_t>(x0[i]);
    if constexpr (NI > 1) v[1] = to_acc<acc_t>(x1[i]);
    if constexpr (NI > 2) v[2] = to_acc<acc_t>(x2[i]);
    if constexpr (NI > 3) v[3] = to_acc<acc_t>(x3[i]);
    acc_t t[4];
    for (int q = 0; q < NO; ++q) {
      acc_t s = c[q][0] * v[0];
      for (int r = 1; r < NI; ++r) s += c[q][r] * v[r];
      t[q] = s;
    }
    if constexpr (kInit) {
      o0[i] = t[0];
      if constexpr (NO > 1) o1[i] = t[1];
      if constexpr (NO > 2) o2[i] = t[2];
      if constexpr (NO > 3) o3[i] = t[3];
    } else {
      o0[i] += t[0];
      if constexpr (NO > 1) o1[i] += t[1];
      if constexpr (NO > 2) o2[i] += t[2];
      if constexpr (NO > 3) o3[i] += t[3];
    }
  }
}

// accum with NO and NI given at run time (each in [1, 4]); out[q] / x[r] index
// arrays of row pointers.
template <bool kInit, typename acc_t, typename x_t>
inline void accum_rows(acc_t* const* out, int64_t no, const x_t* const* x, int64_t ni,
                       const acc_t (&w)[4][4], int64_t n) {
  with_count(no, [&](auto NO) {
    with_count(ni, [&](auto NI) {
      constexpr int kO = decltype(NO)::value, kI = decltype(NI)::value;
      accum<kO, kI, kInit>(out[0], kO > 1 ? out[1] : nullptr, kO > 2 ? out[2] : nullptr,
                           kO > 3 ? out[3] : nullptr, x[0], kI > 1 ? x[1] : nullptr,
                           kI > 2 ? x[2] : nullptr, kI > 3 ? x[3] : nullptr, w, n);
    });
  });
}

// Low-precision rows are widened once into a scratch row so that loops that read
// them several times (once per part) convert each element only once.
template <typename scalar_t, typename acc_t>
inline const acc_t* widen(const scalar_t* __restrict__ src, acc_t* __restrict__ scratch,
                          int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) scratch[i] = to_acc<acc_t>(src[i]);
    return scratch;
  }
}

// Positions per block for the NCHW loop nests: the block's C rows are read twice
// and must still be in cache (L2) the second time.
constexpr int64_t kMaxBlock = 1024;
constexpr int64_t kBlockCacheBytes = 256 * 1024;

// Splits the P positions of each sample into blocks (multiples of 16 positions, so
// blocks do not share cache lines of per-position outputs), no larger than
// `max_size` and cut further while the batch alone gives too few items to keep a
// few cores busy. Depends on the shape only.
struct Blocks {
  int64_t size;
  int64_t count;
};

inline Blocks split_positions(int64_t B, int64_t P, int64_t max_size) {
  if (P <= 0) return {1, 0};
  constexpr int64_t kTargetItems = 16;
  constexpr int64_t kMinBlock = 16;
  const int64_t per_sample = ceil_div(kTargetItems, std::max<int64_t>(B, 1));
  int64_t size = std::max(kMinBlock, round_up(ceil_div(P, per_sample), 16));
  size = std::min({size, std::max(kMinBlock, max_size), P});
  return {size, ceil_div(P, size)};
}

inline int64_t nchw_block_cap(int64_t C, int64_t elem_bytes) {
  const int64_t fit = kBlockCacheBytes / std::max<int64_t>(C * elem_bytes, 1);
  return std::min(kMaxBlock, std::max<int64_t>(16, fit / 16 * 16));
}

// out[r * n + i] = sum_blk part[(r * nblk + blk) * n + i], blocks in order.
template <typename acc_t>
void reduce_blocks(const acc_t* part, acc_t* out, int64_t rows, int64_t nblk, int64_t n) {
  at::parallel_for(0, rows, grain_for(nblk * n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t* __restrict__ o = out + r * n;
      const acc_t* __restrict__ p = part + r * nblk * n;
      for (int64_t i = 0; i < n; ++i) o[i] = p[i];
      for (int64_t blk = 1; blk < nblk; ++blk) {
        const acc_t* __restrict__ q = p + blk * n;
        for (int64_t i = 0; i < n; ++i) o[i] += q[i];
      }
    }
  });
}

// ---------------------------------------------------------------------------
// norms[b, i] = ||f_i||.

template <typename dtype_t>
void norms_impl(const Tensor& x, Layout layout, Tensor& out) {
  using acc_t = at::opmath_type<dtype_t>;
  using scalar_t = elem_t<dtype_t>;
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const scalar_t* xp = elems<dtype_t>(x);
  acc_t* op = out.mutable_data_ptr<acc_t>();

  if (layout == Layout::kNHWC) {
    at::parallel_for(0, B * P, grain_for(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * C;
        op[r] = std::sqrt(dot<acc_t>(xr, xr, C));
      }
    });
    return;
  }

  // Each position's sum runs over c in the same order whatever the block, so the
  // split only balances the work.
  const Blocks pb = split_positions(B, P, kMaxBlock);
  at::parallel_for(0, B * pb.count, grain_for(C * pb.size), [&](int64_t begin, int64_t end) {
    acc_t sq[kMaxBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / pb.count, p0 = (item % pb.count) * pb.size;
      const int64_t len = std::min(pb.size, P - p0);
      const scalar_t* base = xp + b * C * P + p0;
      std::fill_n(sq, len, acc_t(0));
      int64_t c = 0;
      // Four rows per sweep: a quarter of the read-modify-writes of sq.
      for (; c + 4 <= C; c += 4) {
        const scalar_t* __restrict__ x0 = base + c * P;
        const scalar_t* __restrict__ x1 = x0 + P;
        const scalar_t* __restrict__ x2 = x1 + P;
        const scalar_t* __restrict__ x3 = x2 + P;
        for (int64_t p = 0; p < len; ++p) {
          const acc_t a0 = to_acc<acc_t>(x0[p]), a1 = to_acc<acc_t>(x1[p]);
          const acc_t a2 = to_acc<acc_t>(x2[p]), a3 = to_acc<acc_t>(x3[p]);
          sq[p] += a0 * a0 + a1 * a1 + a2 * a2 + a3 * a3;
        }
      }
      for (; c < C; ++c) {
        const scalar_t* __restrict__ x0 = base + c * P;
        for (int64_t p = 0; p < len; ++p) {
          const acc_t a0 = to_acc<acc_t>(x0[p]);
          sq[p] += a0 * a0;
        }
      }
      acc_t* __restrict__ o = op + b * P + p0;
      for (int64_t p = 0; p < len; ++p) o[p] = std::sqrt(sq[p]);
    }
  });
}

// ---------------------------------------------------------------------------
// One grouping step: s_i = <f_i, r> inv_i inv_r, sv = sum_i s_i f_i.

// On raw pointers: inv_nrm (B, P), idx (B,) and sv (B, C) contiguous; sample b's
// similarities go to sp + b * s_ld (the stage op writes one part of (B, K, P)).
template <typename dtype_t>
void step_core(const Tensor& x, Layout layout, const at::opmath_type<dtype_t>* invp,
               const int64_t* ip, at::opmath_type<dtype_t>* sp, int64_t s_ld,
               at::opmath_type<dtype_t>* svp) {
  using acc_t = at::opmath_type<dtype_t>;
  using scalar_t = elem_t<dtype_t>;
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const scalar_t* xp = elems<dtype_t>(x);

  // The representatives, widened once: (B, C).
  std::vector<acc_t> rbuf(static_cast<size_t>(B * C));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t i = ip[b];
    for (int64_t c = 0; c < C; ++c)
      rbuf[b * C + c] = to_acc<acc_t>(layout == Layout::kNHWC ? xp[(b * P + i) * C + c]
                                                              : xp[(b * C + c) * P + i]);
  }
  const acc_t* rp = rbuf.data();

  const int64_t cap = layout == Layout::kNCHW ? nchw_block_cap(C, sizeof(scalar_t)) : P;
  const Blocks pb = split_positions(B, P, cap);
  // One block per sample writes its sum straight into sv.
  std::vector<acc_t> part_buf(pb.count > 1 ? static_cast<size_t>(B * pb.count * C) : 0);
  acc_t* part = pb.count > 1 ? part_buf.data() : svp;

  if (layout == Layout::kNHWC) {
    at::parallel_for(0, B * pb.count, grain_for(C * pb.size), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / pb.count, p0 = (item % pb.count) * pb.size;
        const int64_t p1 = std::min(P, p0 + pb.size);
        const acc_t* r = rp + b * C;
        const acc_t* inv = invp + b * P;
        const acc_t inv_r = inv[ip[b]];
        acc_t* acc = part + item * C;
        std::fill_n(acc, C, acc_t(0));
        // Up to four positions at a time: their dot products with r share the
        // loads of r, and their contributions to sv one read-modify-write of acc.
        for (int64_t p = p0; p < p1; p += 4) {
          const int64_t n = std::min<int64_t>(4, p1 - p);
          const scalar_t* rows[4];
          acc_t d[4], w[4][4] = {};
          for (int64_t q = 0; q < n; ++q) rows[q] = xp + (b * P + p + q) * C;
          with_count(n, [&](auto N) { multi_dot<decltype(N)::value>(rows, r, C, d); });
          for (int64_t q = 0; q < n; ++q) {
            w[0][q] = d[q] * inv[p + q] * inv_r;
            sp[b * s_ld + p + q] = w[0][q];
          }
          accum_rows<false>(&acc, 1, rows, n, w, C);
        }
      }
    });
  } else {
    at::parallel_for(0, B * pb.count, grain_for(C * pb.size), [&](int64_t begin, int64_t end) {
      acc_t d[kMaxBlock];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / pb.count, p0 = (item % pb.count) * pb.size;
        const int64_t len = std::min(pb.size, P - p0);
        const scalar_t* base = xp + b * C * P + p0;
        const acc_t* r = rp + b * C;
        const acc_t* inv = invp + b * P + p0;
        const acc_t inv_r = invp[b * P + ip[b]];
        // Phase 1: <f_i, r> for the block's positions, element-wise over rows, four
        // rows per sweep of d.
        acc_t* dp = d;
        for (int64_t c = 0; c < C; c += 4) {
          const int64_t n = std::min<int64_t>(4, C - c);
          const scalar_t* rows[4];
          acc_t w[4][4] = {};
          for (int64_t q = 0; q < n; ++q) {
            rows[q] = base + (c + q) * P;
            w[0][q] = r[c + q];
          }
          if (c == 0)
            accum_rows<true>(&dp, 1, rows, n, w, len);
          else
            accum_rows<false>(&dp, 1, rows, n, w, len);
        }
        if (C == 0) std::fill_n(d, len, acc_t(0));
        acc_t* __restrict__ so = sp + b * s_ld + p0;
        for (int64_t p = 0; p < len; ++p) {
          d[p] = d[p] * inv[p] * inv_r;
          so[p] = d[p];
        }
        // Phase 2: the block again, now in cache: one dot product per channel, four
        // channels sharing the loads of s.
        acc_t* acc = part + item * C;
        for (int64_t c = 0; c < C; c += 4) {
          const int64_t n = std::min<int64_t>(4, C - c);
          const scalar_t* rows[4];
          for (int64_t q = 0; q < n; ++q) rows[q] = base + (c + q) * P;
          with_count(n, [&](auto N) { multi_dot<decltype(N)::value>(rows, d, len, acc + c); });
        }
      }
    });
  }
  if (pb.count > 1) reduce_blocks(part, svp, B, pb.count, C);
}

template <typename dtype_t>
void step_impl(const Tensor& x, Layout layout, const Tensor& inv_nrm, const Tensor& idx, Tensor& s,
               Tensor& sv) {
  using acc_t = at::opmath_type<dtype_t>;
  step_core<dtype_t>(x, layout, inv_nrm.const_data_ptr<acc_t>(), idx.const_data_ptr<int64_t>(),
                     s.mutable_data_ptr<acc_t>(), x.size(2) * x.size(3),
                     sv.mutable_data_ptr<acc_t>());
}

// ---------------------------------------------------------------------------
// Backward reduction: dw[k, i] = <f_i, dv_k> + dmap[k, i],
// u[k] = sum_i dw[k, i] inv_i f_i, t = sum_i inv_i f_i.
// Both layouts treat t as row K of u with weights inv_i in place of dw[k, i] inv_i.

template <typename dtype_t>
void bwd_reduce_impl(const Tensor& x, Layout layout, const Tensor& inv_nrm, const Tensor& dv,
                     const Tensor& dmap, Tensor& dw, Tensor& u, Tensor& t) {
  using acc_t = at::opmath_type<dtype_t>;
  using scalar_t = elem_t<dtype_t>;
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const int64_t K = dv.size(1);
  const scalar_t* xp = elems<dtype_t>(x);
  const acc_t* invp = inv_nrm.const_data_ptr<acc_t>();
  const acc_t* dvp = dv.const_data_ptr<acc_t>();
  const acc_t* dmp = dmap.const_data_ptr<acc_t>();
  acc_t* dwp = dw.mutable_data_ptr<acc_t>();
  acc_t* up = u.mutable_data_ptr<acc_t>();
  acc_t* tp = t.mutable_data_ptr<acc_t>();

  const int64_t cap = layout == Layout::kNCHW ? nchw_block_cap(C, sizeof(scalar_t)) : P;
  const Blocks pb = split_positions(B, P, cap);
  const bool direct = pb.count <= 1;
  std::vector<acc_t> ubuf(direct ? 0 : static_cast<size_t>(B * pb.count * K * C));
  std::vector<acc_t> tbuf(direct ? 0 : static_cast<size_t>(B * pb.count * C));
  acc_t* upart = direct ? up : ubuf.data();
  acc_t* tpart = direct ? tp : tbuf.data();

  if (layout == Layout::kNHWC) {
    at::parallel_for(
        0, B * pb.count, grain_for(C * pb.size * (K + 1)), [&](int64_t begin, int64_t end) {
          std::vector<acc_t> scratch(std::is_same_v<scalar_t, acc_t> ? 0 : 4 * C);
          std::vector<acc_t> g(static_cast<size_t>(4 * (K + 1)));  // g[q * (K + 1) + k]
          std::vector<acc_t*> out_rows(static_cast<size_t>(K + 1));
          for (int64_t item = begin; item < end; ++item) {
            const int64_t b = item / pb.count, p0 = (item % pb.count) * pb.size;
            const int64_t p1 = std::min(P, p0 + pb.size);
            const acc_t* dvb = dvp + b * K * C;
            const acc_t* inv = invp + b * P;
            acc_t* ua = upart + item * K * C;
            acc_t* ta = tpart + item * C;
            std::fill_n(ua, K * C, acc_t(0));
            std::fill_n(ta, C, acc_t(0));
            for (int64_t k = 0; k < K; ++k) out_rows[k] = ua + k * C;
            out_rows[K] = ta;
            // Up to four positions at a time: their contributions to u and t share one
            // read-modify-write of each accumulator row.
            for (int64_t p = p0; p < p1; p += 4) {
              const int64_t n = std::min<int64_t>(4, p1 - p);
              const acc_t* rows[4];
              for (int64_t q = 0; q < n; ++q) {
                rows[q] = widen(xp + (b * P + p + q) * C, scratch.data() + q * C, C);
                acc_t* gq = g.data() + q * (K + 1);
                // The K dot products of this position, four parts sharing its loads.
                for (int64_t k0 = 0; k0 < K; k0 += 4) {
                  const int64_t nk = std::min<int64_t>(4, K - k0);
                  const acc_t* vr[4];
                  for (int64_t j = 0; j < nk; ++j) vr[j] = dvb + (k0 + j) * C;
                  with_count(
                      nk, [&](auto N) { multi_dot<decltype(N)::value>(vr, rows[q], C, gq + k0); });
                }
                for (int64_t k = 0; k < K; ++k) {
                  const int64_t o = (b * K + k) * P + p + q;
                  const acc_t wv = gq[k] + dmp[o];
                  dwp[o] = wv;
                  gq[k] = wv * inv[p + q];
                }
                gq[K] = inv[p + q];
              }
              for (int64_t k0 = 0; k0 <= K; k0 += 4) {
                const int64_t nk = std::min<int64_t>(4, K + 1 - k0);
                acc_t w[4][4] = {};
                for (int64_t j = 0; j < nk; ++j)
                  for (int64_t q = 0; q < n; ++q) w[j][q] = g[q * (K + 1) + k0 + j];
                accum_rows<false>(out_rows.data() + k0, nk, rows, n, w, C);
              }
            }
          }
        });
  } else {
    at::parallel_for(
        0, B * pb.count, grain_for(C * pb.size * (K + 1)), [&](int64_t begin, int64_t end) {
          // wb rows 0..K-1: phase-1 sums, then dw * inv; row K: inv.
          const int64_t ld = pb.size;
          std::vector<acc_t> wb(static_cast<size_t>((K + 1) * ld));
          std::vector<acc_t> scratch(std::is_same_v<scalar_t, acc_t> ? 0 : 4 * ld);
          std::vector<acc_t*> wrows(static_cast<size_t>(K + 1));
          for (int64_t k = 0; k <= K; ++k) wrows[k] = wb.data() + k * ld;
          std::vector<acc_t> dots(static_cast<size_t>(K + 1));
          for (int64_t item = begin; item < end; ++item) {
            const int64_t b = item / pb.count, p0 = (item % pb.count) * pb.size;
            const int64_t len = std::min(pb.size, P - p0);
            const scalar_t* base = xp + b * C * P + p0;
            const acc_t* dvb = dvp + b * K * C;
            const acc_t* inv = invp + b * P + p0;
            // Phase 1: K dot products per position, element-wise over rows: four rows
            // (widened once) times four parts per sweep.
            for (int64_t k = 0; k < K; ++k) std::fill_n(wrows[k], len, acc_t(0));
            for (int64_t c = 0; c < C; c += 4) {
              const int64_t n = std::min<int64_t>(4, C - c);
              const acc_t* rows[4];
              for (int64_t q = 0; q < n; ++q)
                rows[q] = widen(base + (c + q) * P, scratch.data() + q * ld, len);
              for (int64_t k0 = 0; k0 < K; k0 += 4) {
                const int64_t nk = std::min<int64_t>(4, K - k0);
                acc_t w[4][4] = {};
                for (int64_t j = 0; j < nk; ++j)
                  for (int64_t q = 0; q < n; ++q) w[j][q] = dvb[(k0 + j) * C + c + q];
                accum_rows<false>(wrows.data() + k0, nk, rows, n, w, len);
              }
            }
            for (int64_t k = 0; k < K; ++k) {
              acc_t* __restrict__ wk = wrows[k];
              const acc_t* __restrict__ dm = dmp + (b * K + k) * P + p0;
              acc_t* __restrict__ out = dwp + (b * K + k) * P + p0;
              for (int64_t p = 0; p < len; ++p) {
                const acc_t wv = wk[p] + dm[p];
                out[p] = wv;
                wk[p] = wv * inv[p];
              }
            }
            std::copy_n(inv, len, wrows[K]);
            // Phase 2: the block again, from cache: K + 1 dot products per channel, four
            // weight rows sharing the loads of the channel's row.
            acc_t* ua = upart + item * K * C;
            acc_t* ta = tpart + item * C;
            for (int64_t c = 0; c < C; ++c) {
              const acc_t* xr = widen(base + c * P, scratch.data(), len);
              for (int64_t k0 = 0; k0 <= K; k0 += 4) {
                const int64_t nk = std::min<int64_t>(4, K + 1 - k0);
                with_count(nk, [&](auto N) {
                  multi_dot<decltype(N)::value>(wrows.data() + k0, xr, len, dots.data() + k0);
                });
              }
              for (int64_t k = 0; k < K; ++k) ua[k * C + c] = dots[k];
              ta[c] = dots[K];
            }
          }
        });
  }
  if (!direct) {
    reduce_blocks(upart, up, B, pb.count, K * C);
    reduce_blocks(tpart, tp, B, pb.count, C);
  }
}

// ---------------------------------------------------------------------------
// df[:, i] = sum_j a[j, i] m[j, :] - c_i f_i, in x's dtype and layout.
// Both layouts produce four output rows at a time (four channels in NCHW, four
// positions in channels_last) so that each load of the unit-stride operand (a's
// rows, resp. m's rows) serves four outputs. The terms are summed four j at a time
// into a scratch row; the last (or only) group of terms is added as the output is
// written, so that with J <= 4 there is no scratch row at all.

// o_q[i] = (t_q[i] + sum_{r < NI} w[q][r] * s_r[i]) - sub_q(i) * x_q[i] for q < NO,
// rows q of o at stride o_ld, of x at stride ld, of t at stride t_ld, rows r of s at
// stride s_ld; sub_q(i) is sub[q] with kSubPerRow, else sub[i]. kTmp false: no t.
template <int NO, int NI, bool kTmp, bool kSubPerRow, typename acc_t, typename out_t,
          typename scalar_t>
inline void finish_rows(out_t* __restrict__ o, int64_t o_ld, const scalar_t* __restrict__ x,
                        int64_t ld, const acc_t* __restrict__ t, int64_t t_ld,
                        const acc_t* __restrict__ s, int64_t s_ld, const acc_t (&w)[4][4],
                        const acc_t* __restrict__ sub, int64_t n) {
  acc_t c[4][4], sr[4];
  for (int q = 0; q < 4; ++q) {
    for (int r = 0; r < 4; ++r) c[q][r] = w[q][r];
    sr[q] = kSubPerRow && q < NO ? sub[q] : acc_t(0);
  }
  for (int64_t i = 0; i < n; ++i) {
    acc_t v[4];
    for (int r = 0; r < NI; ++r) v[r] = s[r * s_ld + i];
    for (int q = 0; q < NO; ++q) {
      acc_t sum;
      if constexpr (NI > 0) {
        sum = c[q][0] * v[0];
        for (int r = 1; r < NI; ++r) sum += c[q][r] * v[r];
        if constexpr (kTmp) sum = t[q * t_ld + i] + sum;
      } else {
        sum = kTmp ? t[q * t_ld + i] : acc_t(0);
      }
      const acc_t sq = kSubPerRow ? sr[q] : sub[i];
      o[q * o_ld + i] = from_acc<out_t>(sum - sq * to_acc<acc_t>(x[q * ld + i]));
    }
  }
}

template <typename dtype_t>
void bwd_dx_impl(const Tensor& x, Layout layout, const Tensor& a, const Tensor& m, const Tensor& cc,
                 Tensor& df) {
  using acc_t = at::opmath_type<dtype_t>;
  using scalar_t = elem_t<dtype_t>;
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const int64_t J = a.size(1);
  const scalar_t* xp = elems<dtype_t>(x);
  const acc_t* ap = a.const_data_ptr<acc_t>();
  const acc_t* mp = m.const_data_ptr<acc_t>();
  const acc_t* cp = cc.const_data_ptr<acc_t>();
  scalar_t* dp = elems_mut<dtype_t>(df);
  constexpr int64_t kChunk = 256;
  // Terms [0, last) go through the scratch rows, [last, J) into the output.
  const int64_t last = J <= 4 ? 0 : (J - 1) / 4 * 4;

  // nr (1 or 4) output rows of length n: out_q = sum_j coef(j, q) src_j - sub_q x_q,
  // src_j = src + j * src_ld; x / out rows at stride x_ld.
  auto rows_out = [&](auto kSubPerRow, int64_t nr, const acc_t* src, int64_t src_ld, auto coef,
                      const acc_t* sub, const scalar_t* x0, int64_t x_ld, scalar_t* o0, int64_t n) {
    constexpr bool kRow = decltype(kSubPerRow)::value;
    acc_t tmp[4][kChunk];
    acc_t* trows[4] = {tmp[0], tmp[1], tmp[2], tmp[3]};
    acc_t w[4][4] = {};
    for (int64_t j0 = 0; j0 < last; j0 += 4) {
      const acc_t* srows[4];
      for (int64_t j = 0; j < 4; ++j) {
        srows[j] = src + (j0 + j) * src_ld;
        for (int64_t q = 0; q < nr; ++q) w[q][j] = coef(j0 + j, q);
      }
      if (j0 == 0)
        accum_rows<true>(trows, nr, srows, 4, w, n);
      else
        accum_rows<false>(trows, nr, srows, 4, w, n);
    }
    for (int64_t j = last; j < J; ++j)
      for (int64_t q = 0; q < nr; ++q) w[q][j - last] = coef(j, q);
    const acc_t* s0 = src + last * src_ld;
    // Low-precision results go through a float row and are narrowed by a separate
    // unit-stride loop: gcc does not vectorise the conversion inside finish_rows.
    acc_t res[std::is_same_v<scalar_t, acc_t> ? 1 : 4][kChunk];
    auto fin = [&](auto NO, auto NI, auto kTmp) {
      constexpr int kO = decltype(NO)::value;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        finish_rows<kO, decltype(NI)::value, decltype(kTmp)::value, kRow>(
            o0, x_ld, x0, x_ld, tmp[0], kChunk, s0, src_ld, w, sub, n);
      } else {
        finish_rows<kO, decltype(NI)::value, decltype(kTmp)::value, kRow>(
            res[0], kChunk, x0, x_ld, tmp[0], kChunk, s0, src_ld, w, sub, n);
        for (int q = 0; q < kO; ++q) {
          const acc_t* __restrict__ rq = res[q];
          scalar_t* __restrict__ oq = o0 + q * x_ld;
          for (int64_t i = 0; i < n; ++i) oq[i] = from_acc<scalar_t>(rq[i]);
        }
      }
    };
    auto with_ni = [&](auto NO, auto kTmp) {
      switch (J - last) {
        case 0: fin(NO, Int<0>{}, kTmp); break;
        case 1: fin(NO, Int<1>{}, kTmp); break;
        case 2: fin(NO, Int<2>{}, kTmp); break;
        case 3: fin(NO, Int<3>{}, kTmp); break;
        default: fin(NO, Int<4>{}, kTmp); break;
      }
    };
    auto with_tmp = [&](auto NO) {
      if (last > 0)
        with_ni(NO, std::true_type{});
      else
        with_ni(NO, std::false_type{});
    };
    if (nr == 4)
      with_tmp(Int<4>{});
    else
      with_tmp(Int<1>{});
  };

  if (layout == Layout::kNCHW) {
    const int64_t groups = ceil_div(C, 4);
    at::parallel_for(0, B * groups, grain_for(4 * P), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / groups, c0 = (item % groups) * 4;
        const int64_t rows = std::min<int64_t>(4, C - c0);
        // A full group of four channels, else the leftover channels one by one.
        for (int64_t c = c0; c < c0 + rows; c += (rows == 4 ? 4 : 1)) {
          const int64_t nr = rows == 4 ? 4 : 1;
          const acc_t* mb = mp + b * J * C + c;
          for (int64_t p0 = 0; p0 < P; p0 += kChunk) {
            const int64_t n = std::min(kChunk, P - p0);
            rows_out(
                std::false_type{}, nr, ap + b * J * P + p0, P,
                [&](int64_t j, int64_t q) { return mb[j * C + q]; }, cp + b * P + p0,
                xp + (b * C + c) * P + p0, P, dp + (b * C + c) * P + p0, n);
          }
        }
      }
    });
    return;
  }
  const int64_t groups = ceil_div(P, 4);
  at::parallel_for(0, B * groups, grain_for(4 * C), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / groups, p0 = (item % groups) * 4;
      const int64_t rows = std::min<int64_t>(4, P - p0);
      for (int64_t p = p0; p < p0 + rows; p += (rows == 4 ? 4 : 1)) {
        const int64_t nr = rows == 4 ? 4 : 1;
        const acc_t* ab = ap + b * J * P + p;
        for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
          const int64_t n = std::min(kChunk, C - c0);
          rows_out(
              std::true_type{}, nr, mp + b * J * C + c0, C,
              [&](int64_t j, int64_t q) { return ab[j * P + q]; }, cp + b * P + p,
              xp + (b * P + p) * C + c0, C, dp + (b * P + p) * C + c0, n);
        }
      }
    }
  });
}

}  // namespace brnpa_cpu
}  // namespace manet_kernels
