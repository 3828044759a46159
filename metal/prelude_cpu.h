// Plain C++ prelude: runs the kernel bodies one thread at a time on the CPU (tests only; one lane
// per (b, d), so NSPLIT must be 1). Lets CI check the kernels' arithmetic without a GPU.
#include <cmath>
#include <cstddef>

typedef std::size_t mgk_idx;  // 64-bit element index
#define MGK_FN static inline
#define MGK_EXP(v) std::exp(v)
#define MGK_COS(v) std::cos(v)
#define MGK_SIN(v) std::sin(v)
#define MGK_LOG(v) std::log(v)
#define MGK_RSQRT(v) (1.0f / std::sqrt(v))
#define MGK_FMA(a, b, c) std::fma(a, b, c)  // a * b + c, one rounding
#define MGK_UNROLL_ALL  // g++ -O2 decides

static inline float mgk_load(float v) { return v; }

template <typename U>
static inline U mgk_cast(float v) { return static_cast<U>(v); }

template <int W>
static inline float mgk_group_sum(float v) {
  static_assert(W == 1, "the CPU emulation runs one lane per (b, d)");
  return v;
}

template <int W>
static inline float mgk_group_max(float v) {
  static_assert(W == 1, "the CPU emulation runs one lane per (b, d)");
  return v;
}

//@ entry
const unsigned int tid = mgk_cpu_tid;
