// Which x86 instruction set the CPU kernels run with.
//
// The build has no -march (a wheel or a shared install must run on any x86-64), so
// the hot loops are compiled more than once: a baseline (SSE2) copy and copies for
// AVX2 + FMA and AVX-512, each inside its own namespace and `#pragma GCC target`
// region, and every call picks one at run time. Functions defined inside such a
// region carry its target; everything included before it (ATen, the STL) does not,
// so no inline function of a header is ever compiled for a wider ISA than the
// baseline (which would break the one-definition rule on older CPUs).
//
// MANET_KERNELS_CPU_ISA = auto (default: the widest the CPU supports) | generic |
// avx2 | avx512 overrides the choice; asking for more than the CPU has is an error.
// Tests use it to run every copy.
#pragma once

#include <cstdlib>
#include <cstring>

#include "../check.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MK_CPU_ISA_X86 1
#else
#define MK_CPU_ISA_X86 0
#endif

namespace manet_kernels {

enum class CpuIsa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "generic";
  }
}

// The widest copy this CPU can run (libgcc's checks include the OS's XSAVE support).
inline CpuIsa best_cpu_isa() {
#if MK_CPU_ISA_X86
  static const CpuIsa best = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return CpuIsa::kAvx512;
    return avx2 ? CpuIsa::kAvx2 : CpuIsa::kGeneric;
  }();
  return best;
#else
  return CpuIsa::kGeneric;
#endif
}

// The copy to run now: best_cpu_isa() unless MANET_KERNELS_CPU_ISA says otherwise.
inline CpuIsa cpu_isa() {
  const char* env = std::getenv("MANET_KERNELS_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best_cpu_isa();
  CpuIsa want = CpuIsa::kGeneric;
  if (std::strcmp(env, "generic") == 0) {
    want = CpuIsa::kGeneric;
  } else if (std::strcmp(env, "avx2") == 0) {
    want = CpuIsa::kAvx2;
  } else if (std::strcmp(env, "avx512") == 0) {
    want = CpuIsa::kAvx512;
  } else {
    MK_CHECK(false, "MANET_KERNELS_CPU_ISA: expected auto, generic, avx2 or avx512, got '",
             std::string(env), "'");
  }
  MK_CHECK(static_cast<int>(want) <= static_cast<int>(best_cpu_isa()),
           "MANET_KERNELS_CPU_ISA=", std::string(env),
           ": not supported by this CPU or build (the widest here is ",
           cpu_isa_name(best_cpu_isa()), ")");
  return want;
}

}  // namespace manet_kernels

// Open / close a region whose functions are compiled for AVX2 + FMA or AVX-512: the
// features best_cpu_isa() checks for, listed once here.
#define MK_CPU_ISA_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define MK_CPU_ISA_BEGIN_AVX512 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512vl,avx512bw,avx512dq,avx2,fma\")")
#define MK_CPU_ISA_END _Pragma("GCC pop_options")

// MK_CPU_ISA_CALL(expr): evaluates `expr` once, in the copy cpu_isa() picks, with `isa`
// naming that copy's namespace (generic, avx2 or avx512: a file includes its kernels
// once per namespace, see mixed_attention.cpp), and returns its value:
// `MK_CPU_ISA_CALL(isa::apply_impl<scalar_t>(x, ...))`. The one dispatch of every CPU
// kernel file; a file whose kernels have no generic copy never calls it on that ISA.
#if MK_CPU_ISA_X86
#define MK_CPU_ISA_CALL(...)                   \
  [&] {                                        \
    switch (::manet_kernels::cpu_isa()) {      \
      case ::manet_kernels::CpuIsa::kAvx512: { \
        namespace isa = avx512;                \
        return __VA_ARGS__;                    \
      }                                        \
      case ::manet_kernels::CpuIsa::kAvx2: {   \
        namespace isa = avx2;                  \
        return __VA_ARGS__;                    \
      }                                        \
      default: {                               \
        namespace isa = generic;               \
        return __VA_ARGS__;                    \
      }                                        \
    }                                          \
  }()
#else
#define MK_CPU_ISA_CALL(...) \
  [&] {                      \
    namespace isa = generic; \
    return __VA_ARGS__;      \
  }()
#endif
