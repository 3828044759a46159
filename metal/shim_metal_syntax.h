// Just enough of the Metal Shading Language for `g++ -fsyntax-only` to parse the generated
// metal/*.metal files on a machine without Apple's compiler (tests/test_kernels.py). It checks C++
// syntax, names and types, not Metal semantics; nothing here runs.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

// Address spaces and the kernel attribute: `[[kernel]]` becomes the empty attribute list `[[]]`.
#define device
#define constant
#define thread
#define threadgroup
#define kernel

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

struct uint2 { uint x, y; };
struct uint3 { uint x, y, z; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };

// 16-bit floats: storage types with float conversions, as far as the kernels use them.
struct half {
  unsigned short bits;
  half() = default;
  half(float) {}
  operator float() const { return 0.0f; }
};
struct bfloat16_t {
  unsigned short bits;
  bfloat16_t() = default;
  bfloat16_t(float) {}
  operator float() const { return 0.0f; }
};
typedef bfloat16_t bfloat;

namespace metal {
inline float exp(float v) { return std::exp(v); }
inline float cos(float v) { return std::cos(v); }
inline float sin(float v) { return std::sin(v); }
inline float log(float v) { return std::log(v); }
inline float rsqrt(float v) { return 1.0f / std::sqrt(v); }
inline float sqrt(float v) { return std::sqrt(v); }
inline float abs(float v) { return std::fabs(v); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
template <typename U> inline U min(U a, U b) { return a < b ? a : b; }
template <typename U> inline U max(U a, U b) { return a < b ? b : a; }
namespace precise {
inline float exp(float v) { return std::exp(v); }
inline float cos(float v) { return std::cos(v); }
inline float sin(float v) { return std::sin(v); }
}  // namespace precise
namespace fast {
inline float exp(float v) { return std::exp(v); }
inline float cos(float v) { return std::cos(v); }
inline float sin(float v) { return std::sin(v); }
}  // namespace fast
}  // namespace metal

// SIMD-group functions (values only; no lanes here).
template <typename U> inline U simd_shuffle_xor(U v, ushort) { return v; }
template <typename U> inline U simd_shuffle_down(U v, ushort) { return v; }
template <typename U> inline U simd_sum(U v) { return v; }
template <typename U> inline U simd_max(U v) { return v; }

enum class mem_flags { mem_none, mem_device, mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
