// CPU kernels for the mixed-attention stages (issue 16; docs/design.md §1). The contract is
// manet_kernels/reference/stages.py: each stage is a pass of mixed_attention.cpp (called
// directly, mixed_attention.h) and the tiny work after it, in one op.
//
// The tiny work (N*C, N*H*W or C_r*C values) is plain loops on raw pointers in the
// accumulation dtype: an ATen op costs microseconds of host time, more than the
// arithmetic at small shapes. Sums over samples run in sample order (per-sample partials,
// then added in order; a weight gradient's row sums over its samples), and the split into
// tasks never changes a result: every output is bitwise independent of the thread count.
// Sums over N*H*W (BatchNorm statistics and their gradients) accumulate in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../check.h"
#include "../mixed_attention_stage_checks.h"
#include "cpu_isa.h"
#include "mixed_attention.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
namespace pass = manet_kernels::cpu;

// ---------------------------------------------------------------------------
// Argument checks: ../mixed_attention_stage_checks.h, with `arg` a dense CPU tensor.

void check_dense_cpu(const Tensor& t, const char* name) {
  manet_kernels::ma_stage::check_dense(t, name);
  MK_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
}

namespace checks = manet_kernels::ma_stage;
constexpr auto cpu_arg = &check_dense_cpu;

// ---------------------------------------------------------------------------
// Helpers.

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

template <typename T>
inline const T* ptr(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Items per task: at least ~64k multiply-adds, as waking the thread pool costs tens of
// microseconds; a range below one grain runs inline on the calling thread.
int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work_per_item));
}

// sum over n of fn(n) (K values each, in double), in sample order.
template <size_t K, typename F>
std::array<double, K> sample_sums(int64_t N, int64_t per_sample, const F& fn) {
  std::vector<std::array<double, K>> part(N);
  at::parallel_for(0, N, grain(per_sample), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) part[n] = fn(n);
  });
  std::array<double, K> s{};
  for (int64_t n = 0; n < N; ++n)
    for (size_t k = 0; k < K; ++k) s[k] += part[n][k];
  return s;
}

template <typename F>
void for_samples(int64_t N, int64_t per_sample, const F& fn) {
  at::parallel_for(0, N, grain(per_sample), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) fn(n);
  });
}

// ---------------------------------------------------------------------------
// The shared MLP, mlp(v) = w2 relu(w1 v + b1) + b2, with w1 (C_r, C), w2 (C, C_r).

template <typename T>
struct Mlp {
  const T *w1, *b1, *w2, *b2;
  int64_t C, Cr;
};

template <typename T>
Mlp<T> mlp_of(const Tensor& w1, const OptTensor& b1, const Tensor& w2, const OptTensor& b2,
              int64_t C, int64_t Cr) {
  return {w1.data_ptr<T>(), ptr<T>(b1), w2.data_ptr<T>(), ptr<T>(b2), C, Cr};
}

template <typename T>
struct MlpBwd {
  Mlp<T> mlp;
  const T *dmc, *dmc2, *gmc, *mc, *avg, *mx;  // dmc2: B2's part
  T *dl, *rs, *dh, *d_avg, *d_mx;             // dl (N, C), rs = r_avg + r_mx (N, C_r), dh (2N, C_r)
  int64_t N;
};

// The MLP's arithmetic, once per instruction set (cpu_isa.h), FMA contraction off in the
// wider copies as for the passes: every copy gives the same bits.
namespace generic {
#include "mixed_attention_mlp.inc"
}  // namespace generic
#if MK_CPU_ISA_X86
MK_CPU_ISA_BEGIN_AVX2
#pragma GCC optimize("fp-contract=off")
namespace avx2 {
#include "mixed_attention_mlp.inc"
}  // namespace avx2
MK_CPU_ISA_END
MK_CPU_ISA_BEGIN_AVX512
#pragma GCC optimize("fp-contract=off")
namespace avx512 {
#include "mixed_attention_mlp.inc"
}  // namespace avx512
MK_CPU_ISA_END
#endif

// ---------------------------------------------------------------------------
// channel_attn: F1 + mc = sigmoid(mlp(avg) + mlp(mx)).

std::tuple<Tensor, Tensor, Tensor, Tensor> channel_attn(const Tensor& x, const Tensor& w1,
                                                        const OptTensor& b1, const Tensor& w2,
                                                        const OptTensor& b2) {
  const int64_t Cr = checks::check_channel_attn(x, w1, b1, w2, b2, cpu_arg);
  auto [avg, mx, im] = pass::mixed_attention_channel_pool(x);
  const int64_t N = avg.size(0), C = avg.size(1);
  const auto acc = avg.scalar_type();
  Tensor mc = at::empty({N, C}, avg.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "mixed_attention_channel_attn", [&] {
    using T = scalar_t;
    const auto mlp = mlp_of<T>(w1, b1, w2, b2, C, Cr);
    MK_CPU_ISA_CALL(
        isa::mlp_forward<T>(mlp, avg.data_ptr<T>(), mx.data_ptr<T>(), mc.data_ptr<T>(), N));
  });
  return {mc, avg, mx, im};
}

// ---------------------------------------------------------------------------
// channel_attn_bwd: B2 + back through the channel sigmoid and the shared MLP.

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> channel_attn_bwd(
    const Tensor& x, const Tensor& da_s, const Tensor& dm_s, const Tensor& ic, const Tensor& dmc,
    const OptTensor& gmc, const Tensor& mc, const Tensor& avg, const Tensor& mx, const Tensor& w1,
    const OptTensor& b1, const Tensor& w2, bool has_b2) {
  const int64_t Cr =
      checks::check_channel_attn_bwd(x, da_s, dm_s, ic, dmc, gmc, mc, avg, mx, w1, b1, w2, cpu_arg);
  Tensor dmc2 = pass::mixed_attention_bwd_channel(x, da_s, dm_s, ic);
  const int64_t N = dmc2.size(0), C = dmc2.size(1);
  const auto acc = dmc2.scalar_type();
  const auto opt = dmc2.options();
  Tensor d_avg = at::empty({N, C}, opt), d_mx = at::empty({N, C}, opt);
  Tensor dw1 = at::empty({Cr, C}, opt), db1 = at::empty({b1.has_value() ? Cr : 0}, opt);
  Tensor dw2 = at::empty({C, Cr}, opt), db2 = at::empty({has_b2 ? C : 0}, opt);
  AT_DISPATCH_FLOATING_TYPES(acc, "mixed_attention_channel_attn_bwd", [&] {
    using T = scalar_t;
    std::vector<T> scratch(N * C + 3 * N * Cr);
    const MlpBwd<T> b{mlp_of<T>(w1, b1, w2, std::nullopt, C, Cr),
                      dmc.data_ptr<T>(),
                      dmc2.data_ptr<T>(),
                      ptr<T>(gmc),
                      mc.data_ptr<T>(),
                      avg.data_ptr<T>(),
                      mx.data_ptr<T>(),
                      scratch.data(),
                      scratch.data() + N * C,
                      scratch.data() + N * C + N * Cr,
                      d_avg.data_ptr<T>(),
                      d_mx.data_ptr<T>(),
                      N};
    T *pdw1 = dw1.data_ptr<T>(), *pdb1 = b1.has_value() ? db1.data_ptr<T>() : nullptr;
    T *pdw2 = dw2.data_ptr<T>(), *pdb2 = has_b2 ? db2.data_ptr<T>() : nullptr;
    MK_CPU_ISA_CALL(isa::mlp_backward<T>(b, pdw1, pdb1, pdw2, pdb2));
  });
  return {d_avg, d_mx, dw1, db1, dw2, db2};
}

// ---------------------------------------------------------------------------
// spatial_attn: F2 + the k x k conv + BatchNorm with given statistics + sigmoid.

// BatchNorm with given statistics: a = (z - mean) * rstd * weight + bias, each optional;
// off (a = z) when default-constructed.
template <typename T>
struct BnEval {
  bool on = false, has_w = false, has_b = false;
  T mean = 0, rstd = 1, w = 1, b = 0;

  BnEval() = default;
  BnEval(T mean, T var, double eps, const T* weight, const T* bias)
      : on(true),
        has_w(weight != nullptr),
        has_b(bias != nullptr),
        mean(mean),
        rstd(T(1) / std::sqrt(var + T(eps))),
        w(weight ? *weight : T(1)),
        b(bias ? *bias : T(0)) {}

  T operator()(T z) const {
    if (!on) return z;
    T a = (z - mean) * rstd;
    if (has_w) a = a * w;
    return has_b ? a + b : a;
  }
};

template <typename T>
BnEval<T> bn_eval(const OptTensor& weight, const OptTensor& bias, const OptTensor& mean,
                  const OptTensor& var, double eps) {
  if (!mean.has_value()) return {};
  return {mean->data_ptr<T>()[0], var->data_ptr<T>()[0], eps, ptr<T>(weight), ptr<T>(bias)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> spatial_attn(
    const Tensor& x, const Tensor& mc, const Tensor& conv_w, const OptTensor& conv_b,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& bn_mean,
    const OptTensor& bn_var, double eps, bool batch_norm) {
  checks::check_spatial_attn(x, mc, conv_w, conv_b, bn_weight, bn_bias, bn_mean, bn_var, batch_norm,
                             cpu_arg);
  auto [sa, sm, ic] = pass::mixed_attention_spatial_pool(x, mc);
  const auto acc = sa.scalar_type();
  Tensor z = pass::mixed_attention_spatial_conv(sa, sm, conv_w, conv_b);
  if (batch_norm) return {at::empty({0}, z.options()), z, sa, sm, ic};
  const int64_t N = z.size(0), P = z.size(1) * z.size(2);
  Tensor ms = at::empty(z.sizes(), z.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "mixed_attention_spatial_attn", [&] {
    using T = scalar_t;
    const auto bn = bn_eval<T>(bn_weight, bn_bias, bn_mean, bn_var, eps);
    const T* pz = z.data_ptr<T>();
    T* out = ms.data_ptr<T>();
    for_samples(N, 8 * P, [&](int64_t n) {
      for (int64_t p = n * P; p < (n + 1) * P; ++p) out[p] = sigmoid(bn(pz[p]));
    });
  });
  return {ms, z, sa, sm, ic};
}

// ---------------------------------------------------------------------------
// spatial_attn_bwd: back through the sigmoid, the BatchNorm with given statistics and
// the conv.

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> spatial_attn_bwd(
    const Tensor& d, const OptTensor& gms, const OptTensor& ms, const Tensor& z, const Tensor& sa,
    const Tensor& sm, const Tensor& conv_w, bool has_conv_bias, const OptTensor& bn_weight,
    bool has_bn_bias, const OptTensor& bn_mean, const OptTensor& bn_var, double eps) {
  checks::check_spatial_attn_bwd(d, gms, ms, z, sa, sm, conv_w, bn_weight, bn_mean, bn_var,
                                 cpu_arg);
  const auto acc = z.scalar_type();
  Tensor dbw = at::empty({0}, z.options()), dbb = at::empty({0}, z.options());
  Tensor dz = d;
  if (ms.has_value()) {
    const bool bn = bn_mean.has_value();
    const int64_t N = z.size(0), P = z.size(1) * z.size(2);
    dz = at::empty(z.sizes(), z.options());
    if (bn && bn_weight.has_value()) dbw = at::empty({1}, z.options());
    if (bn && has_bn_bias) dbb = at::empty({1}, z.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "mixed_attention_spatial_attn_bwd", [&] {
      using T = scalar_t;
      const auto e = bn_eval<T>(bn_weight, std::nullopt, bn_mean, bn_var, eps);
      const T scale = e.rstd * e.w;
      const T *pd = d.data_ptr<T>(), *pg = ptr<T>(gms), *pm = ms->data_ptr<T>(),
              *pz = z.data_ptr<T>();
      T* out = dz.data_ptr<T>();
      // dz = d(ms) * ms (1 - ms), then sum dz * zhat and sum dz, then dz *= weight * rstd
      const auto s = sample_sums<2>(N, 4 * P, [&](int64_t n) {
        double sw = 0, sb = 0;
        for (int64_t p = n * P; p < (n + 1) * P; ++p) {
          const T dms = pg ? pd[p] + pg[p] : pd[p];
          const T g = dms * pm[p] * (T(1) - pm[p]);
          if (e.on) {
            sw += double(g * (pz[p] - e.mean) * e.rstd);
            sb += double(g);
            out[p] = g * scale;
          } else {
            out[p] = g;
          }
        }
        return std::array<double, 2>{sw, sb};
      });
      if (dbw.numel()) dbw.data_ptr<T>()[0] = T(s[0]);
      if (dbb.numel()) dbb.data_ptr<T>()[0] = T(s[1]);
    });
  }
  auto [da_s, dm_s, dcw, dcb] =
      pass::mixed_attention_spatial_conv_bwd(dz, sa, sm, conv_w, has_conv_bias);
  return {da_s, dm_s, dcw, dcb, dbw, dbb};
}

// ---------------------------------------------------------------------------
// spatial_norm: BatchNorm2d(1) in training mode + sigmoid, and the running statistics.

// A one-element tensor of any floating dtype, read and written as T.
template <typename T>
T read_scalar(const Tensor& t) {
  T v = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "read_scalar",
                                  [&] { v = static_cast<T>(t.data_ptr<scalar_t>()[0]); });
  return v;
}

template <typename T>
void write_scalar(const Tensor& t, T v) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "write_scalar",
                                  [&] { t.data_ptr<scalar_t>()[0] = static_cast<scalar_t>(v); });
}

template <typename T>
void update_running(const Tensor& z, T mean, T var, const OptTensor& running_mean,
                    const OptTensor& running_var, const OptTensor& nbt,
                    std::optional<double> momentum) {
  int64_t count = 0;
  if (nbt.has_value()) {
    int64_t* p = nbt->data_ptr<int64_t>();
    count = ++p[0];
  }
  if (!running_mean.has_value()) return;
  const double numel = static_cast<double>(z.numel());
  // as the contract evaluates it: (1 - m) and m in T, or a Python float cast to T
  const T m = momentum ? T(*momentum) : T(1) / T(count);
  const T keep = momentum ? T(1.0 - *momentum) : T(1) - m;
  const T unbiased = var * T(numel / (numel - 1));
  write_scalar(*running_mean, T(keep * read_scalar<T>(*running_mean) + m * mean));
  write_scalar(*running_var, T(keep * read_scalar<T>(*running_var) + m * unbiased));
}

std::tuple<Tensor, Tensor> spatial_norm(const Tensor& z, const OptTensor& bn_weight,
                                        const OptTensor& bn_bias, const OptTensor& running_mean,
                                        const OptTensor& running_var, const OptTensor& nbt,
                                        std::optional<double> momentum, double eps) {
  checks::check_spatial_norm(z, bn_weight, bn_bias, running_mean, running_var, nbt, momentum,
                             cpu_arg);
  const int64_t N = z.size(0), P = z.size(1) * z.size(2);
  const double count = static_cast<double>(z.numel());
  Tensor ms = at::empty(z.sizes(), z.options()), stats = at::empty({2}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mixed_attention_spatial_norm", [&] {
    using T = scalar_t;
    const T* pz = z.data_ptr<T>();
    // two passes in double: the mean, then the biased variance
    const double mean_d = sample_sums<1>(N, P,
                                         [&](int64_t n) {
                                           double s = 0;
                                           for (int64_t p = n * P; p < (n + 1) * P; ++p) s += pz[p];
                                           return std::array<double, 1>{s};
                                         })[0] /
                          count;
    const double var_d = sample_sums<1>(N, 2 * P,
                                        [&](int64_t n) {
                                          double s = 0;
                                          for (int64_t p = n * P; p < (n + 1) * P; ++p) {
                                            const double c = pz[p] - mean_d;
                                            s += c * c;
                                          }
                                          return std::array<double, 1>{s};
                                        })[0] /
                         count;
    const T mean = T(mean_d), var = T(var_d);
    T* st = stats.data_ptr<T>();
    st[0] = mean;
    st[1] = var;
    const BnEval<T> bn(mean, var, eps, ptr<T>(bn_weight), ptr<T>(bn_bias));
    T* out = ms.data_ptr<T>();
    for_samples(N, 8 * P, [&](int64_t n) {
      for (int64_t p = n * P; p < (n + 1) * P; ++p) out[p] = sigmoid(bn(pz[p]));
    });
    update_running<T>(z, mean, var, running_mean, running_var, nbt, momentum);
  });
  return {ms, stats};
}

// ---------------------------------------------------------------------------
// spatial_norm_bwd: back through the sigmoid and the training-mode BatchNorm.

std::tuple<Tensor, Tensor, Tensor> spatial_norm_bwd(const Tensor& dms, const OptTensor& gms,
                                                    const Tensor& ms, const Tensor& z,
                                                    const Tensor& stats, const OptTensor& bn_weight,
                                                    bool has_bias, double eps) {
  checks::check_spatial_norm_bwd(dms, gms, ms, z, stats, bn_weight, cpu_arg);
  const int64_t N = z.size(0), P = z.size(1) * z.size(2);
  const double count = static_cast<double>(z.numel());
  Tensor dz = at::empty(z.sizes(), z.options());
  Tensor dw = at::empty({bn_weight.has_value() ? 1 : 0}, z.options());
  Tensor db = at::empty({has_bias ? 1 : 0}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mixed_attention_spatial_norm_bwd", [&] {
    using T = scalar_t;
    const T *pd = dms.data_ptr<T>(), *pg = ptr<T>(gms), *pm = ms.data_ptr<T>(),
            *pz = z.data_ptr<T>(), *st = stats.data_ptr<T>();
    const T mean = st[0], rstd = T(1) / std::sqrt(st[1] + T(eps));
    const T w = bn_weight.has_value() ? bn_weight->data_ptr<T>()[0] : T(1);
    const bool has_w = bn_weight.has_value();
    // da = d(ms) ms (1 - ms), zh = (z - mean) rstd, dzh = da * weight
    auto terms = [&](int64_t p, T& da, T& zh, T& dzh) {
      const T d = pg ? pd[p] + pg[p] : pd[p];
      da = d * pm[p] * (T(1) - pm[p]);
      zh = (pz[p] - mean) * rstd;
      dzh = has_w ? da * w : da;
    };
    // sums of da * zh, da, dzh, dzh * zh
    const auto s = sample_sums<4>(N, 4 * P, [&](int64_t n) {
      std::array<double, 4> a{};
      for (int64_t p = n * P; p < (n + 1) * P; ++p) {
        T da, zh, dzh;
        terms(p, da, zh, dzh);
        a[0] += double(da * zh);
        a[1] += double(da);
        a[2] += double(dzh);
        a[3] += double(dzh * zh);
      }
      return a;
    });
    if (has_w) dw.data_ptr<T>()[0] = T(s[0]);
    if (has_bias) db.data_ptr<T>()[0] = T(s[1]);
    const T m1 = T(s[2] / count), m2 = T(s[3] / count);
    T* out = dz.data_ptr<T>();
    for_samples(N, 4 * P, [&](int64_t n) {
      for (int64_t p = n * P; p < (n + 1) * P; ++p) {
        T da, zh, dzh;
        terms(p, da, zh, dzh);
        out[p] = rstd * (dzh - m1 - zh * m2);
      }
    });
  });
  return {dz, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(manet_kernels, CPU, m) {
  m.impl("_mixed_attention_channel_attn", &channel_attn);
  m.impl("_mixed_attention_spatial_attn", &spatial_attn);
  m.impl("_mixed_attention_spatial_norm", &spatial_norm);
  m.impl("_mixed_attention_spatial_norm_bwd", &spatial_norm_bwd);
  m.impl("_mixed_attention_spatial_attn_bwd", &spatial_attn_bwd);
  m.impl("_mixed_attention_channel_attn_bwd", &channel_attn_bwd);
}
