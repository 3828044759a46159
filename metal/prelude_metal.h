// Metal prelude for the kernel bodies in *.body (see cema_scan.body). Goes into `header=` of
// mx.fast.metal_kernel, in front of the shared header section.
#include <metal_stdlib>
using namespace metal;

typedef size_t mgk_idx;  // 64-bit element index
#define MGK_FN inline
#define MGK_EXP(v) metal::exp(v)
#define MGK_COS(v) metal::cos(v)
#define MGK_SIN(v) metal::sin(v)
#define MGK_LOG(v) metal::log(v)
#define MGK_RSQRT(v) metal::rsqrt(v)
#define MGK_FMA(a, b, c) metal::fma(a, b, c)  // a * b + c, one rounding
// Before a loop over a per-thread array: fully unrolled, so the array stays in registers.
#define MGK_UNROLL_ALL _Pragma("unroll")

template <typename U>
inline float mgk_load(U v) {
  return static_cast<float>(v);
}

template <typename U>
inline U mgk_cast(float v) {
  return static_cast<U>(v);
}

// Sum over W adjacent lanes of one simdgroup (W a power of two <= 32, groups aligned to W).
template <int W>
inline float mgk_group_sum(float v) {
  for (ushort m = 1; m < (ushort)W; m <<= 1) {
    v += simd_shuffle_xor(v, m);
  }
  return v;
}

// Max over W adjacent lanes of one simdgroup, aligned as in mgk_group_sum.
template <int W>
inline float mgk_group_max(float v) {
  for (ushort m = 1; m < (ushort)W; m <<= 1) {
    v = metal::max(v, simd_shuffle_xor(v, m));
  }
  return v;
}

//@ entry
const unsigned int tid = thread_position_in_grid.x;
