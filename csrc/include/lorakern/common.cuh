// lorakern: torch-free CUDA helpers shared by the kernels (no torch header anywhere under include/).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace lorakern {

// float <-> storage type, one table for every kernel (no body copied per dtype).
template <typename T> struct Num;
template <> struct Num<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <> struct Num<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};
template <> struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// A 16-byte vector of T (8 halves / 8 bf16 / 4 floats) when VEC, a single element otherwise.
template <typename T, bool VEC> struct Vec {
  static constexpr int N = VEC ? int(16 / sizeof(T)) : 1;
  T v[N];
};

template <typename T, bool VEC>
__device__ __forceinline__ void load_vec(Vec<T, VEC>& dst, const T* p) {
  if constexpr (VEC) {
    *reinterpret_cast<uint4*>(dst.v) = __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    dst.v[0] = p[0];
  }
}

template <typename T, bool VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& src) {
  if constexpr (VEC) {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(src.v);
  } else {
    p[0] = src.v[0];
  }
}

// Vector load through the coherent path (for data this grid also writes, e.g. `out`).
template <typename T, bool VEC>
__device__ __forceinline__ void load_vec_rw(Vec<T, VEC>& dst, const T* p) {
  if constexpr (VEC) {
    *reinterpret_cast<uint4*>(dst.v) = *reinterpret_cast<const uint4*>(p);
  } else {
    dst.v[0] = p[0];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace lorakern
