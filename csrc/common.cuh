// Device helpers shared by the kernels in csrc/*.cu.
//
// The kernel sources are compiled twice over: by nvcc into a fatbin (the default
// build) and by NVRTC (the CUDA 12.9 wheel built from PyPI's toolchain packages,
// which ship no nvcc). So this header and the kernels use no host or standard
// headers: only cuda_fp16.h / cuda_bf16.h and builtins. Every kernel is
// `extern "C"` so the host finds it by a plain name in the loaded image.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define MOE_FULL_MASK 0xffffffffu

namespace moe {

// No INT_MAX / INFINITY without <climits> / <cmath> under NVRTC.
constexpr int kNoIndex = 0x7fffffff;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// No isnan without <cmath> under NVRTC; nvcc keeps this test (no finite-math flags).
__device__ __forceinline__ bool is_nan(float v) { return v != v; }

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Butterfly reductions: every lane ends with the same, order-fixed result.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(MOE_FULL_MASK, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(MOE_FULL_MASK, v, o);
  return v;
}

// Warp-wide argmax of (value, index) with ties to the lowest index (torch.topk's and
// moe_kernels.routing's rule), carrying one payload value along with the winner.
__device__ __forceinline__ void warp_argmax(float& value, int& index, float& payload) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(MOE_FULL_MASK, value, o);
    const int oi = __shfl_xor_sync(MOE_FULL_MASK, index, o);
    const float op = __shfl_xor_sync(MOE_FULL_MASK, payload, o);
    if (ov > value || (ov == value && oi < index)) {
      value = ov;
      index = oi;
      payload = op;
    }
  }
}

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned mask;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(mask));
  return mask;
}

}  // namespace moe
