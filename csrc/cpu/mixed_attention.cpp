// CPU kernels for the mixed-attention passes (docs/design.md §1). The contract,
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
// The passes themselves are in mixed_attention_passes.inc, compiled once per
// instruction set (baseline SSE2, AVX2, AVX-512; cpu_isa.h picks one per call).
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
#include "cpu_isa.h"
#include "mixed_attention.h"

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
  MK_CHECK_VALUE(t.dim() == 4, name, ": expected a rank-4 (N, C, H, W) tensor, got rank ", t.dim(),
                 " with shape ", t.sizes());
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
                 t.sizes(), " with strides ", t.strides(), " (make it contiguous before calling)");
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

// The passes, once per instruction set (cpu_isa.h). Arithmetic contraction into FMAs
// is off in the wider copies, so all three compute bit-identical results (the tests
// check that) and the numbers never depend on the machine.
namespace generic {
#include "mixed_attention_passes.inc"
}  // namespace generic
#if MK_CPU_ISA_X86
MK_CPU_ISA_BEGIN_AVX2
#pragma GCC optimize("fp-contract=off")
namespace avx2 {
#include "mixed_attention_passes.inc"
}  // namespace avx2
MK_CPU_ISA_END
MK_CPU_ISA_BEGIN_AVX512
#pragma GCC optimize("fp-contract=off")
namespace avx512 {
#include "mixed_attention_passes.inc"
}  // namespace avx512
MK_CPU_ISA_END
#endif

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
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "mixed_attention_channel_pool",
      [&] { MK_CPU_ISA_CALL(isa::channel_pool_impl<scalar_t>(x, layout, avg, mx, im)); });
  return {avg, mx, im};
}

std::tuple<Tensor, Tensor, Tensor> spatial_pool(const Tensor& x, const Tensor& mc) {
  const Layout layout = check_activation(x, "x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  MK_CHECK_VALUE(C >= 1, "x: expected C >= 1 to take a max over channels, got shape ", x.sizes());
  const auto acc = acc_dtype_for(x.scalar_type());
  check_small(mc, "mc", "(N, C)", {N, C}, acc, "x", x.scalar_type());
  Tensor sa = at::empty({N, H, W}, x.options().dtype(acc));
  Tensor sm = at::empty({N, H, W}, x.options().dtype(acc));
  Tensor ic = at::empty({N, H, W}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "mixed_attention_spatial_pool",
      [&] { MK_CPU_ISA_CALL(isa::spatial_pool_impl<scalar_t>(x, layout, mc, sa, sm, ic)); });
  return {sa, sm, ic};
}

Tensor apply(const Tensor& x, const Tensor& mc, const Tensor& ms) {
  const Layout layout = check_activation(x, "x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto acc = acc_dtype_for(x.scalar_type());
  check_small(mc, "mc", "(N, C)", {N, C}, acc, "x", x.scalar_type());
  check_small(ms, "ms", "(N, H, W)", {N, H, W}, acc, "x", x.scalar_type());
  Tensor y = at::empty(x.sizes(), x.options().memory_format(memory_format(layout)));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "mixed_attention_apply",
      [&] { MK_CPU_ISA_CALL(isa::apply_impl<scalar_t>(x, layout, mc, ms, y)); });
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
  MK_CHECK_VALUE(g_layout == layout, "g: expected the memory format of x (", layout_name(layout),
                 "), got ", layout_name(g_layout));
  const auto acc = acc_dtype_for(x.scalar_type());
  check_small(mc, "mc", "(N, C)", {N, C}, acc, "x", x.scalar_type());
  check_small(ms, "ms", "(N, H, W)", {N, H, W}, acc, "x", x.scalar_type());
  Tensor dms = at::empty({N, H, W}, x.options().dtype(acc));
  Tensor dmc = at::empty({N, C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "mixed_attention_bwd_reduce",
      [&] { MK_CPU_ISA_CALL(isa::bwd_reduce_impl<scalar_t>(g, x, layout, mc, ms, dms, dmc)); });
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
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "mixed_attention_bwd_channel",
      [&] { MK_CPU_ISA_CALL(isa::bwd_channel_impl<scalar_t>(x, layout, da_s, dm_s, ic, out)); });
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
    MK_CPU_ISA_CALL(
        isa::bwd_dx_impl<scalar_t>(g, layout, mc, ms, da_s, dm_s, ic, d_avg, d_mx, im, dx));
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
  for_each_tap(k, H, W,
               [&](int c, int64_t t, int64_t di, int64_t dj, int64_t i0, int64_t i1, int64_t j0,
                   int64_t j1) {
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
  for_each_tap(k, H, W,
               [&](int c, int64_t t, int64_t di, int64_t dj, int64_t i0, int64_t i1, int64_t j0,
                   int64_t j1) {
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
    // (bias is checked: (1,), dense, on the CPU, in sa's dtype; item() would dispatch)
    const scalar_t b = bias.has_value() ? *bias->const_data_ptr<scalar_t>() : scalar_t(0);
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
    at::parallel_for(
        0, N, std::max<int64_t>(1, conv_grain(H, W, k) / 2), [&](int64_t n0, int64_t n1) {
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

// For the stage ops (mixed_attention.h).
namespace manet_kernels::cpu {

std::tuple<Tensor, Tensor, Tensor> mixed_attention_channel_pool(const Tensor& x) {
  return channel_pool(x);
}
std::tuple<Tensor, Tensor, Tensor> mixed_attention_spatial_pool(const Tensor& x, const Tensor& mc) {
  return spatial_pool(x, mc);
}
Tensor mixed_attention_bwd_channel(const Tensor& x, const Tensor& da_s, const Tensor& dm_s,
                                   const Tensor& ic) {
  return bwd_channel(x, da_s, dm_s, ic);
}
Tensor mixed_attention_spatial_conv(const Tensor& sa, const Tensor& sm, const Tensor& weight,
                                    const std::optional<Tensor>& bias) {
  return spatial_conv(sa, sm, weight, bias);
}
std::tuple<Tensor, Tensor, Tensor, Tensor> mixed_attention_spatial_conv_bwd(
    const Tensor& dz, const Tensor& sa, const Tensor& sm, const Tensor& weight, bool has_bias) {
  return spatial_conv_bwd(dz, sa, sm, weight, has_bias);
}

}  // namespace manet_kernels::cpu

TORCH_LIBRARY_IMPL(manet_kernels, CPU, m) {
  m.impl("_mixed_attention_channel_pool", &channel_pool);
  m.impl("_mixed_attention_spatial_pool", &spatial_pool);
  m.impl("_mixed_attention_apply", &apply);
  m.impl("_mixed_attention_bwd_reduce", &bwd_reduce);
  m.impl("_mixed_attention_bwd_channel", &bwd_channel);
  m.impl("_mixed_attention_bwd_dx", &bwd_dx);
  m.impl("_mixed_attention_spatial_conv", &spatial_conv);
  m.impl("_mixed_attention_spatial_conv_bwd", &spatial_conv_bwd);
}
