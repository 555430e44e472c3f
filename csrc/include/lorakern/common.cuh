// lorakern: torch-free CUDA helpers shared by the kernels (no torch header anywhere under include/).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Hooks of the CPU emulation build (csrc/emu/cuda_emu.h, -DLORAKERN_EMU); nothing in a CUDA build.
#ifndef LORAKERN_CHECK_VEC_ALIGN
#define LORAKERN_CHECK_VEC_ALIGN(p) ((void)0)
#endif
#ifndef LORAKERN_SHARED_TRACK
#define LORAKERN_SHARED_TRACK(name) ((void)0)
#endif

namespace lorakern {

// Launch `kernel` on `stream` (or, in the emulation build, run it on the CPU); returns the launch error.
template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, A... args) {
#ifdef LORAKERN_EMU
  (void)stream;
  if (::lk_emu::launch(grid, block, [&] { kernel(args...); })) return cudaGetLastError();
  return cudaSuccess;
#else
  kernel<<<grid, block, 0, stream>>>(args...);
  return cudaGetLastError();
#endif
}

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
// Aligned to 16 bytes when VEC: it is read and written as one uint4.
template <typename T, bool VEC> struct alignas(VEC ? 16 : alignof(T)) Vec {
  static constexpr int N = VEC ? int(16 / sizeof(T)) : 1;
  T v[N];
};

template <typename T, bool VEC>
__device__ __forceinline__ void load_vec(Vec<T, VEC>& dst, const T* p) {
  if constexpr (VEC) {
    LORAKERN_CHECK_VEC_ALIGN(p);
    *reinterpret_cast<uint4*>(dst.v) = __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    dst.v[0] = p[0];
  }
}

template <typename T, bool VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& src) {
  if constexpr (VEC) {
    LORAKERN_CHECK_VEC_ALIGN(p);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(src.v);
  } else {
    p[0] = src.v[0];
  }
}

// Vector load through the coherent path (for data this grid also writes, e.g. `out`).
template <typename T, bool VEC>
__device__ __forceinline__ void load_vec_rw(Vec<T, VEC>& dst, const T* p) {
  if constexpr (VEC) {
    LORAKERN_CHECK_VEC_ALIGN(p);
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

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace lorakern
