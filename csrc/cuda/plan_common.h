// Host-only helpers of the CUDA launch plans (plain C++, no CUDA headers): the .cu
// launchers and the CPU-side launch-plan op (csrc/cpu/cuda_launch_plan.cpp) share them,
// so the kernel report computes grids with the launchers' own code.
#pragma once

#include <cstdint>
#include <initializer_list>

namespace manet_kernels {
namespace plan_util {

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline int log2_of(int v) {
  int l = 0;
  while ((1 << l) < v) ++l;
  return l;
}

// Widest vector (16, then 8 bytes) that divides L and the alignment of every pointer;
// `addr_bits` is the bitwise OR of the pointers (all aligned to a power of two exactly
// when their OR is), 0 for a plan of freshly allocated tensors.
inline int pick_vec_bits(int64_t L, int elem_bytes, uintptr_t addr_bits) {
  for (int bytes : {16, 8}) {
    const int v = bytes / elem_bytes;
    if (v <= 1 || L % v != 0) continue;
    if (addr_bits % bytes == 0) return v;
  }
  return 1;
}

inline uintptr_t addr_bits(std::initializer_list<const void*> ptrs) {
  uintptr_t bits = 0;
  for (const void* p : ptrs) bits |= reinterpret_cast<uintptr_t>(p);
  return bits;
}

template <typename scalar_t>
int pick_vec(int64_t L, std::initializer_list<const void*> ptrs) {
  return pick_vec_bits(L, static_cast<int>(sizeof(scalar_t)), addr_bits(ptrs));
}

}  // namespace plan_util
}  // namespace manet_kernels
