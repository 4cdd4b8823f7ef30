// MK_CHECK(cond, parts...): TORCH_CHECK with the message built here, without iostreams.
//
// TORCH_CHECK formats its message with std::ostringstream in code instantiated in this
// library. Where the extension is compiled by a different C++ toolchain than the one
// whose libstdc++ the process loads (seen on a GPU machine: a g++ under /opt/gcc, Python
// and torch on the system runtime), `stream << int64_t` in our object code crashed with
// SIGSEGV inside std::num_put, turning every "bad argument" error into a segfault.
// Building the message from std::to_string and plain appends never touches the stream
// or locale machinery; the finished std::string is handed to TORCH_CHECK as is (c10
// passes a lone std::string through without streaming it).
#pragma once

#include <ATen/ATen.h>

#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

namespace manet_kernels {
namespace msg {

inline void put(std::string& s, const char* v) {
  s += v;
}
inline void put(std::string& s, const std::string& v) {
  s += v;
}
inline void put(std::string& s, char v) {
  s += v;
}
inline void put(std::string& s, bool v) {
  s += v ? "true" : "false";
}

template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>,
                                       int> = 0>
inline void put(std::string& s, T v) {
  s += std::to_string(v);
}

template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
inline void put(std::string& s, T v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
  s += buf;
}

inline void put(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void put(std::string& s, const std::vector<int64_t>& v) {
  put(s, c10::IntArrayRef(v));
}
inline void put(std::string& s, at::ScalarType v) {
  s += c10::toString(v);
}
inline void put(std::string& s, const c10::Device& v) {
  s += v.str();
}
inline void put(std::string& s, c10::Layout v) {
  switch (v) {
    case c10::kStrided: s += "Strided"; return;
    case c10::kSparse: s += "Sparse"; return;
    case c10::kSparseCsr: s += "SparseCsr"; return;
    case c10::kSparseCsc: s += "SparseCsc"; return;
    case c10::kSparseBsr: s += "SparseBsr"; return;
    case c10::kSparseBsc: s += "SparseBsc"; return;
    case c10::kMkldnn: s += "Mkldnn"; return;
    case c10::kJagged: s += "Jagged"; return;
    default: s += "Layout(" + std::to_string(static_cast<int>(v)) + ")";
  }
}

template <typename... Parts>
inline std::string cat(const Parts&... parts) {
  std::string s;
  (put(s, parts), ...);
  return s;
}

}  // namespace msg

// The Python spelling of a dtype, which is what users of the ops know.
inline const char* dtype_name(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    default: return c10::toString(st);
  }
}

}  // namespace manet_kernels

#define MK_CHECK(cond, ...) TORCH_CHECK((cond), ::manet_kernels::msg::cat(__VA_ARGS__))
#define MK_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE((cond), ::manet_kernels::msg::cat(__VA_ARGS__))
#define MK_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE((cond), ::manet_kernels::msg::cat(__VA_ARGS__))
