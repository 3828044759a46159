// CUDA (NVRTC, via mx.fast.cuda_kernel) prelude for the kernel bodies in *.body. MLX's own header
// (cuda_fp16/cuda_bf16 types, cooperative_groups) comes first; this goes into `header=`.
typedef unsigned long long mgk_idx;  // 64-bit element index
#define MGK_FN __device__ __forceinline__
#define MGK_EXP(v) expf(v)
#define MGK_COS(v) cosf(v)
#define MGK_SIN(v) sinf(v)
#define MGK_LOG(v) logf(v)
#define MGK_RSQRT(v) rsqrtf(v)
#define MGK_FMA(a, b, c) fmaf(a, b, c)  // a * b + c, one rounding
// Before a loop over a per-thread array: fully unrolled, so the array stays in registers.
#define MGK_UNROLL_ALL _Pragma("unroll")

__device__ __forceinline__ float mgk_load(float v) { return v; }
__device__ __forceinline__ float mgk_load(__half v) { return __half2float(v); }
__device__ __forceinline__ float mgk_load(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename U>
__device__ __forceinline__ U mgk_cast(float v) { return static_cast<U>(v); }
template <>
__device__ __forceinline__ __half mgk_cast<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 mgk_cast<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// Sum over W adjacent lanes of one warp (W a power of two <= 32, groups aligned to W). Only the
// group's lanes are named in the mask, so groups may run different trip counts.
template <int W>
__device__ __forceinline__ float mgk_group_sum(float v) {
  if (W > 1) {
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int mask =
        (W >= 32) ? 0xffffffffu : (((1u << (W & 31)) - 1u) << (lane & ~(unsigned int)(W - 1)));
    for (int m = 1; m < W; m <<= 1) {
      v += __shfl_xor_sync(mask, v, m);
    }
  }
  return v;
}

// Max over W adjacent lanes of one warp, aligned as in mgk_group_sum.
template <int W>
__device__ __forceinline__ float mgk_group_max(float v) {
  if (W > 1) {
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int mask =
        (W >= 32) ? 0xffffffffu : (((1u << (W & 31)) - 1u) << (lane & ~(unsigned int)(W - 1)));
    for (int m = 1; m < W; m <<= 1) {
      v = fmaxf(v, __shfl_xor_sync(mask, v, m));
    }
  }
  return v;
}

//@ entry
const unsigned int tid = blockIdx.x * blockDim.x + threadIdx.x;
