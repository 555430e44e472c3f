// lorakern: torch-free CUDA helpers shared by the kernels (no torch header anywhere under include/).
#pragma once

#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>
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
// The kernel's dynamic shared memory (sized by the launch), 128-byte aligned.
#ifndef LORAKERN_DYNAMIC_SMEM
#define LORAKERN_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace lorakern {

#ifndef LORAKERN_EMU
// Let `kernel` use `smem_bytes` of dynamic shared memory on the current device (needed above 48 KB). The attribute
// is set once per (kernel, device) and only ever raised, under a lock: a launch costs no driver call once its size
// is allowed, and two host threads launching one kernel with different sizes never lower the limit under each
// other's launch. A failure is returned and cleared (not left behind for the next launch's error check).
// `forget` drops what was recorded for (kernel, current device) first: for a launch that failed although its size
// was recorded as allowed (a cudaDeviceReset resets the attribute behind the record), before one retry.
inline cudaError_t allow_dynamic_smem(const void* kernel, int smem_bytes, bool forget = false) {
  struct Allowed {
    const void* kernel;
    int device, bytes;
  };
  static std::mutex mu;
  static std::vector<Allowed> allowed;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return e;
  }
  std::lock_guard<std::mutex> lock(mu);
  Allowed* hit = nullptr;
  for (Allowed& a : allowed)
    if (a.kernel == kernel && a.device == device) hit = &a;
  if (hit && forget) hit->bytes = 0;
  if (hit && hit->bytes >= smem_bytes) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return e;
  }
  if (hit) {
    hit->bytes = smem_bytes;
  } else {
    allowed.push_back({kernel, device, smem_bytes});
  }
  return cudaSuccess;
}
#endif

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

// The same with `smem_bytes` of dynamic shared memory (above 48 KB the kernel is first allowed to use it).
template <typename... P, typename... A>
cudaError_t launch_kernel_smem(void (*kernel)(P...), dim3 grid, dim3 block, int smem_bytes, cudaStream_t stream,
                               A... args) {
#ifdef LORAKERN_EMU
  (void)stream;
  if (::lk_emu::launch(grid, block, [&] { kernel(args...); }, smem_bytes)) return cudaGetLastError();
  return cudaSuccess;
#else
  const bool big = smem_bytes > 48 * 1024;
  if (big) {
    const cudaError_t e = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem_bytes);
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, block, smem_bytes, stream>>>(args...);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess && big) {  // (a failed launch ran nothing: set the attribute again and retry once)
    if (allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem_bytes, /*forget=*/true) != cudaSuccess) return e;
    kernel<<<grid, block, smem_bytes, stream>>>(args...);
    e = cudaGetLastError();
  }
  return e;
#endif
}

// CTAs of `kernel` (block threads, smem_bytes of dynamic shared memory) that fit on one SM of the current device.
template <typename... P>
int ctas_per_sm(void (*kernel)(P...), int threads, int smem_bytes) {
#ifdef LORAKERN_EMU
  (void)kernel; (void)threads; (void)smem_bytes;
  return 2;
#else
  if (smem_bytes > 48 * 1024 && allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem_bytes) != cudaSuccess)
    return 0;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem_bytes) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
#endif
}

// Asynchronous 16-byte copies global -> shared (sm_80+ cp.async, L2 only): `valid` false writes 16 zero bytes
// without reading `src` (which must still be a valid address expression). Completed per thread, by commit groups:
// cp_async_wait<N>() returns when at most the N most recent groups are still in flight; a __syncthreads() after
// it makes the data visible to the other threads.
#ifdef LORAKERN_EMU
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  ::lk_emu::cp_async16(dst, src, valid);
}
__device__ __forceinline__ void cp_async_commit() { ::lk_emu::cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { ::lk_emu::cp_async_wait(N); }
#else
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

// A hint that the 128-byte line holding `p` (global memory) will be read soon: fetched into L2, no register, no
// wait. `p` must be a valid address (the emulator reads a byte there, so a memcheck build catches a wrong one).
#ifdef LORAKERN_EMU
__device__ __forceinline__ void prefetch_l2(const void* p) { ::lk_emu::prefetch_l2(p); }
#else
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}
#endif

// Tensor-core primitives with known fragment layouts (sm_80+; see csrc/emu/cuda_emu.h for the layouts): ldmatrix
// .x4 (each lane gives one 16-byte row address in shared memory; `trans` transposes each 8x8 matrix) and
// mma.sync m16n8k16 with fp32 accumulation, T = __half or __nv_bfloat16.
#ifdef LORAKERN_EMU
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row, bool trans) {
  ::lk_emu::ldmatrix_x4(r, row, trans);
}
template <typename T>
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  ::lk_emu::mma_16816<T>(d, a, b, c);
}
#else
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row, bool trans) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if (trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  }
}
template <typename T>
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%10, %11, %12, %13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%10, %11, %12, %13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  }
}
#endif

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

// The max of v over a block of kWarps full warps, returned to every thread; one barrier. `scratch` (a float per
// warp, shared) must not be rewritten before another barrier has passed.
template <int kWarps>
__device__ __forceinline__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) v = fmaxf(v, scratch[w]);
  return v;
}

}  // namespace lorakern
