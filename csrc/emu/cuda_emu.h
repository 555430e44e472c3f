// lorakern: a CPU emulation of the CUDA device constructs our kernels use, so that the very same kernel templates
// (csrc/include/lorakern/*.cuh) compile with a host C++ compiler and run on the CPU: `lorakern._C_emu`, the
// extension behind LORAKERN_CUDA_EMULATE=1. It exists to test the kernels' logic (indexing, page-table reads,
// rank loops, tiling, split-K, epilogues, synchronisation) on machines without a GPU; it says nothing about speed
// and does not model the GPU memory system.
//
// Force-included before every kernel source (g++ -include csrc/emu/cuda_emu.h -DLORAKERN_EMU). What it provides:
//   * one block at a time; its threads are fibers (cooperative user-level threads on one OS thread); warps advance
//     independently, in a chosen order (forward, reverse or seeded random, the default), so one warp can run far
//     ahead of the others between barriers and a missing __syncthreads shows up as a poisoned or order-dependent
//     result;
//   * __syncthreads() as a barrier that checks every waiting thread reached the SAME barrier (divergence is an
//     error, exited threads count as arrived, as on sm_70+);
//   * warp collectives (__shfl_xor_sync, __shfl_up_sync, the WMMA *_sync calls) as warp barriers that require
//     all 32 lanes (a full
//     mask) and fail on a diverged or partially exited warp;
//   * __shared__ = function-level static storage (blocks run one after another), filled with a NaN pattern
//     before each block so that reading shared memory nobody wrote poisons the result;
//   * nvcuda::wmma fragments holding the whole tile (layout is opaque in CUDA, so kernels cannot depend on it),
//     fp32 accumulation; pointer-alignment and ldm rules of WMMA and of 16-byte vector accesses are checked;
//   * dynamic shared memory (LORAKERN_DYNAMIC_SMEM), poisoned like the rest;
//   * cp.async (cp_async16 / cp_async_commit / cp_async_wait in common.cuh): the destination is poisoned at the
//     copy and the 16 bytes land only when the issuing thread's cp_async_wait retires the copy's commit group,
//     so a read before the wait (or, by another thread, before the wait and a barrier) sees the poison;
//     the destination must be shared memory;
//   * mma.sync m16n8k16 and ldmatrix .x4 (common.cuh) with the PTX per-lane fragment layouts, as warp collectives;
//   * atomicAdd, __ldg, min/max, prefetch.global.L2 (reads one byte), cudaGetLastError/cudaGetErrorString.
// An error stops the launch and is returned as cudaErrorLaunchFailure with the message in cudaGetErrorString.
#pragma once

#ifndef LORAKERN_EMU
#error "cuda_emu.h is only for the CPU emulation build (-DLORAKERN_EMU)"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>  // the CUDA math functions the kernels call (fmaxf, frexpf, ...) in the global namespace

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>

namespace lk_emu {

// ---- the current thread's coordinates (one OS thread runs every fiber, so plain globals, set on each switch)
extern uint3 g_thread_idx, g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

[[noreturn]] void fail(const std::string& what);          // record an error and abandon the launch
void sync_block(int line);                                // __syncthreads
void sync_warp();                                         // a warp-collective rendezvous (all 32 lanes)
void register_shared(void* p, size_t bytes);              // poison and track a __shared__ array
int launch(dim3 grid, dim3 block, const std::function<void()>& body, int dynamic_smem_bytes = 0);  // 0 or error
unsigned char* dynamic_smem();                            // the block's dynamic shared memory (poisoned)
void cp_async16(void* dst, const void* src, bool valid);  // cp.async: lands at the thread's wait_group
void cp_async_commit();
void cp_async_wait(int n);
uint64_t& warp_slot(int lane);                            // exchange slot of `lane` in the current warp
float* warp_scratch();                                    // 512 words shared by the current warp's lanes
bool is_shared(const void* p, size_t bytes);             // [p, p + bytes) lies in shared memory
cudaError_t last_error();
const char* error_string(cudaError_t e);
void set_schedule(int order, uint64_t seed);             // 0 forward, 1 reverse, 2 random(seed)

inline unsigned flat_tid() {
  return g_thread_idx.x + g_block_dim.x * (g_thread_idx.y + g_block_dim.y * g_thread_idx.z);
}

// A warp exchange: every lane deposits v, then reads the value of lane src(lane), or keeps its own where that is
// negative (__shfl_up_sync's low lanes). Full warps only, as the kernels use them.
template <typename T, typename Src>
T shuffle(unsigned mask, T v, Src src, const char* what) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  if (mask != 0xffffffffu) fail(std::string(what) + " with a partial mask (the emulator supports full warps only)");
  const int lane = static_cast<int>(flat_tid() & 31);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  sync_warp();  // every lane is here (and finished reading the previous exchange)
  warp_slot(lane) = bits;
  sync_warp();  // every lane has deposited
  const int from = src(lane);
  const uint64_t got = from >= 0 ? warp_slot(from) : bits;
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask) {
  return shuffle(mask, v, [&](int lane) { return lane ^ (lane_mask & 31); }, "__shfl_xor_sync");
}

// __shfl_up_sync: lane l gets lane l - delta's value, lanes below delta keep their own (width 32)
template <typename T>
T shfl_up(unsigned mask, T v, unsigned delta) {
  return shuffle(mask, v, [&](int lane) { return lane - static_cast<int>(delta); }, "__shfl_up_sync");
}

// prefetch.global.L2: no effect on results; one byte is read so that a memcheck build catches a bad address
inline void prefetch_l2(const void* p) {
  const volatile unsigned char* b = static_cast<const volatile unsigned char*>(p);
  (void)*b;
}

inline void check_align(const void* p, size_t a, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % a)
    fail(std::string("misaligned address: ") + what + " needs " + std::to_string(a) + "-byte alignment, got " +
         std::to_string(reinterpret_cast<uintptr_t>(p)));
}

// ---- mma.sync / ldmatrix (common.cuh's ldmatrix_x4 and mma_16816): the PTX fragment layouts, lane by lane
// (g = lane / 4, q = lane % 4; two 16-bit elements per 32-bit register, the lower one first):
//   ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; register i of a lane holds row g,
//                 columns 2q, 2q+1 of matrix i (.trans: rows 2q, 2q+1 of column g);
//   mma m16n8k16: A (16x16, row) a0 = (g, 2q..), a1 = (g+8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..);
//                 B (16x8, col) b0 = (k 2q.., n g), b1 = (k 2q+8.., n g); C, D (16x8 f32) c0, c1 = (g, 2q..),
//                 c2, c3 = (g+8, 2q..).
template <typename T>
inline float half_bits_to_f(uint16_t bits) {
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, 2);
  if constexpr (std::is_same<T, __half>::value) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

inline void ldmatrix_x4(uint32_t r[4], const void* row, bool trans) {
  const int lane = static_cast<int>(flat_tid() & 31);
  check_align(row, 16, "ldmatrix row address");
  if (!is_shared(row, 16)) fail("ldmatrix row address is not shared memory");
  sync_warp();
  warp_slot(lane) = reinterpret_cast<uintptr_t>(row);
  sync_warp();
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (int k = 0; k < 2; ++k) {
      const int rr = trans ? 2 * (lane % 4) + k : lane / 4, cc = trans ? lane / 4 : 2 * (lane % 4) + k;
      const auto* base = reinterpret_cast<const uint16_t*>(static_cast<uintptr_t>(warp_slot(8 * i + rr)));
      std::memcpy(&e[k], base + cc, 2);
    }
    r[i] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
  sync_warp();  // the slots are reused
}

template <typename T>
inline void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  const int lane = static_cast<int>(flat_tid() & 31);
  auto* w = reinterpret_cast<uint32_t*>(warp_scratch());
  sync_warp();
  for (int i = 0; i < 4; ++i) w[lane * 6 + i] = a[i];
  for (int i = 0; i < 2; ++i) w[lane * 6 + 4 + i] = b[i];
  sync_warp();
  float A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L / 4, q = L % 4;
    const uint32_t* f = w + L * 6;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * q + e] = half_bits_to_f<T>(static_cast<uint16_t>(f[0] >> (16 * e)));
      A[g + 8][2 * q + e] = half_bits_to_f<T>(static_cast<uint16_t>(f[1] >> (16 * e)));
      A[g][2 * q + 8 + e] = half_bits_to_f<T>(static_cast<uint16_t>(f[2] >> (16 * e)));
      A[g + 8][2 * q + 8 + e] = half_bits_to_f<T>(static_cast<uint16_t>(f[3] >> (16 * e)));
      B[2 * q + e][g] = half_bits_to_f<T>(static_cast<uint16_t>(f[4] >> (16 * e)));
      B[2 * q + 8 + e][g] = half_bits_to_f<T>(static_cast<uint16_t>(f[5] >> (16 * e)));
    }
  }
  sync_warp();  // every lane has read the operands before the scratch is reused
  const int g = lane / 4, q = lane % 4;
  float out[4];
  for (int h = 0; h < 2; ++h)
    for (int e = 0; e < 2; ++e) {
      float acc = c[2 * h + e];
      for (int k = 0; k < 16; ++k) acc += A[g + 8 * h][k] * B[k][2 * q + e];
      out[2 * h + e] = acc;
    }
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// Registers a __shared__ array on first use in a block: poisoned before the block's first read.
struct SharedTag {
  SharedTag(void* p, size_t n) { register_shared(p, n); }
};

}  // namespace lk_emu

// ---- CUDA spellings
#undef __shared__
#define LK_EMU_CAT2(a, b) a##b
#define LK_EMU_CAT(a, b) LK_EMU_CAT2(a, b)
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define threadIdx (::lk_emu::g_thread_idx)
#define blockIdx (::lk_emu::g_block_idx)
#define blockDim (::lk_emu::g_block_dim)
#define gridDim (::lk_emu::g_grid_dim)
#define __syncthreads() ::lk_emu::sync_block(__LINE__)
#define __syncwarp(...) ::lk_emu::sync_warp()
#define cudaGetLastError() ::lk_emu::last_error()
#define cudaGetErrorString(e) ::lk_emu::error_string(e)

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (width != 32) ::lk_emu::fail("__shfl_xor_sync with width != 32 is not emulated");
  return ::lk_emu::shfl_xor(mask, v, lane_mask);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) ::lk_emu::fail("__shfl_up_sync with width != 32 is not emulated");
  return ::lk_emu::shfl_up(mask, v, delta);
}
template <typename T>
inline T __ldg(const T* p) {
  ::lk_emu::check_align(p, alignof(T) < sizeof(T) ? sizeof(T) : alignof(T), "__ldg");
  return *p;
}
inline float atomicAdd(float* p, float v) {
  ::lk_emu::check_align(p, 4, "atomicAdd");
  const float old = *p;
  *p = old + v;
  return old;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }

// The kernels' 16-byte vector accesses go through this check (a misaligned uint4 access faults on a GPU).
#define LORAKERN_CHECK_VEC_ALIGN(p) ::lk_emu::check_align((p), 16, "16-byte vector access")
#define LORAKERN_DYNAMIC_SMEM(name) unsigned char* name = ::lk_emu::dynamic_smem()
// __shared__ arrays are declared through this so the emulator can poison them per block.
#define LORAKERN_SHARED_TRACK(name) \
  static ::lk_emu::SharedTag LK_EMU_CAT(lk_emu_tag_, name)(&(name), sizeof(name)); (void)LK_EMU_CAT(lk_emu_tag_, name)

// ---- WMMA, whole-tile fragments (the real fragment layout is opaque, so a kernel cannot depend on it)
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;  // per lane here (all of it); opaque on a GPU
  float x[rows * cols];
};

namespace detail {
template <typename T> inline float to_f(T v) { return static_cast<float>(v); }
template <> inline float to_f(__half v) { return __half2float(v); }
template <> inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
inline void check_ptr_ldm(const void* p, unsigned ldm, size_t elem, const char* what) {
  ::lk_emu::check_align(p, 32, what);  // 256-bit aligned pointer
  if ((ldm * elem) % 16) ::lk_emu::fail(std::string(what) + ": ldm must be a multiple of 16 bytes");
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  ::lk_emu::sync_warp();
  for (float& e : f.x) e = v;
}

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  static_assert(std::is_same<P, T>::value, "load_matrix_sync: pointer type differs from the fragment type");
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads need a layout argument");
  ::lk_emu::sync_warp();
  detail::check_ptr_ldm(p, ldm, sizeof(P), "wmma::load_matrix_sync");
  using Fr = fragment<Use, M, N, K, T, L>;
  constexpr bool row = std::is_same<L, row_major>::value;
  for (int r = 0; r < Fr::rows; ++r)
    for (int c = 0; c < Fr::cols; ++c)
      f.x[r * Fr::cols + c] = detail::to_f(row ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r]);
}

template <int M, int N, int K, typename TA, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  static_assert(M * N <= 256, "accumulator tile larger than the warp scratch");
  ::lk_emu::sync_warp();
  float* t = ::lk_emu::warp_scratch();
  if ((::lk_emu::flat_tid() & 31) == 0) {  // every lane holds the same tiles: one lane computes for the warp
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        float s = c.x[i * N + j];
        for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
        t[i * N + j] = s;
      }
  }
  ::lk_emu::sync_warp();
  std::memcpy(d.x, t, sizeof(float) * M * N);
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t l) {
  ::lk_emu::sync_warp();
  detail::check_ptr_ldm(p, ldm, sizeof(float), "wmma::store_matrix_sync");
  if ((::lk_emu::flat_tid() & 31) != 0) return;  // one lane writes the tile (all lanes hold all of it)
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (l == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r]) = f.x[r * N + c];
}
}  // namespace wmma
}  // namespace nvcuda
