// lorakern: the segment path of the dense LoRA ops (prefill: long runs of tokens per adapter), on tensor cores
// through WMMA (sm_80+; fp16 and bf16). Torch-free templates: raw pointers in, cudaError_t out.
//
// Work list: the LoRAPlan's 64-token tiles (start, length, slot) — fixed grid, early exit, CUDA-graph safe.
//
//   segment_shrink_kernel  grid (tiles, slices, rank tiles of 64 [, K splits]):
//       Y[64 tokens, 64 ranks] = X[tokens, K] @ A[rows, K]^T, X rows gathered through token_ids, A rows through
//       the page table (only rows below the slot's real rank; rank tiles past it exit). fp32 accumulate; written
//       to y (float32 [S, T, max_rank]); with K splits the partial sums are added atomically into a zeroed y.
//   segment_expand_kernel  grid (tiles, slices, N tiles of 128):
//       out[tokens, off + n] += scale * Y[tokens, :rank] @ B[rows, n], the rank loop stops at the real rank in
//       steps of RK = 32 (rows past the rank are never loaded). The fp32 Y enters the tensor cores as a sum of terms of the weight dtype (hi + lo for fp16,
//       hi + mid + lo for bf16), so the intermediate keeps ~fp32 precision. The epilogue reads, adds and writes out once (16-byte vectors).
//
// Requirements checked by the host (else the gather path runs): 16-byte aligned rows, K and every N_i multiples
// of 8, unit inner strides.
#pragma once

#include <mma.h>

#include <type_traits>

#include "lorakern/common.cuh"
#include "lorakern/dense_dispatch.h"

namespace lorakern {

namespace seg {
// BK = 128: every K step moves 64 tokens x 128 + 64 rank rows x 128 elements (32 KB in bf16) with 8 independent
// 16-byte loads per thread, so few, wide, latency-bound steps; RK = 32 rank rows per expand step for the same reason.
constexpr int BM = 64, BR = 64, BK = 128, BN = 128, RK = 32;
constexpr int kSegThreads = 256;
constexpr int LDX = BK + 8;   // smem leading dims: multiples of 8 halves, padded against bank conflicts
constexpr int LDY = BR + 4;   // floats
constexpr int LDR = RK + 8;
constexpr int LDB = BN + 8;
constexpr int LDO = BN + 4;

// Shared memory of each kernel: the K-loop (or rank-loop) tiles and the fp32 accumulator tile written after the
// loop share one buffer (the accumulator is stored only once the loop's last reads are behind a barrier).
template <typename T> struct ShrinkSmem {
  static constexpr int kTiles = 2 * BM * LDX * int(sizeof(T));  // xs [BM][LDX], as [BR][LDX]
  static constexpr int kAcc = BM * LDY * int(sizeof(float));    // ys [BM][LDY]
  static constexpr int kBytes = kTiles > kAcc ? kTiles : kAcc;
};
template <typename T> struct ExpandSmem {
  // yhi, ylo, ylo2 [BM][LDR], bs [RK][LDB] (T), then the fp32 y stage [BM][RK] (fp16: scaled before the split)
  static constexpr int kYStage = (3 * BM * LDR + RK * LDB) * int(sizeof(T));
  static constexpr int kTiles = kYStage + BM * RK * int(sizeof(float));
  static constexpr int kAcc = BM * LDO * int(sizeof(float));                 // os [BM][LDO]
  static constexpr int kBytes = kTiles > kAcc ? kTiles : kAcc;
  static_assert(kYStage % 16 == 0, "y stage alignment");
};
}  // namespace seg

template <typename T>
__global__ void __launch_bounds__(seg::kSegThreads) segment_shrink_kernel(const DenseParams p, int k_split) {
  using namespace nvcuda;
  using namespace seg;
  __shared__ __align__(128) unsigned char smem[ShrinkSmem<T>::kBytes];
  __shared__ int64_t tok_s[BM];
  __shared__ int64_t rows_s[BR];
  LORAKERN_SHARED_TRACK(smem);
  LORAKERN_SHARED_TRACK(tok_s);
  LORAKERN_SHARED_TRACK(rows_s);
  auto xs = reinterpret_cast<T(*)[LDX]>(smem);
  auto as = reinterpret_cast<T(*)[LDX]>(smem + BM * LDX * sizeof(T));
  auto ys = reinterpret_cast<float(*)[LDY]>(smem);  // after the K loop

  const int tile = blockIdx.x, sl = blockIdx.y;
  const int r_tiles = (p.max_rank + BR - 1) / BR;
  const int r_tile = blockIdx.z % r_tiles, ks = blockIdx.z / r_tiles;
  const int start = p.tiles[3 * tile], len = p.tiles[3 * tile + 1], slot = p.tiles[3 * tile + 2];
  if (len <= 0 || slot < 0) return;
  const int rank = p.ranks[slot];
  const int r0 = r_tile * BR;
  if (r0 >= rank) return;
  const int nr = min(BR, rank - r0);
  const int k_chunk = ((p.K + k_split - 1) / k_split + BK - 1) / BK * BK;
  const int k_begin = ks * k_chunk, k_end = min(p.K, k_begin + k_chunk);
  if (k_begin >= k_end) return;

  const int tid = threadIdx.x, warp = tid >> 5;
  for (int i = tid; i < BM; i += kSegThreads) tok_s[i] = i < len ? p.token_ids[start + i] : -1;
  for (int i = tid; i < BR; i += kSegThreads) rows_s[i] = i < nr ? p.page_table[slot * p.s_pt + r0 + i] : -1;
  __syncthreads();

  const T* X = reinterpret_cast<const T*>(p.x);
  const T* A = reinterpret_cast<const T*>(p.a_ptrs[sl]);
  const int64_t sa = p.a_strides[sl];
  constexpr int V = 8;                                // 16-byte vectors of 8 halves
  constexpr int kLoads = BM * (BK / V) / kSegThreads;  // vectors per thread per operand and K step
  static_assert(BM == BR && BM * (BK / V) % kSegThreads == 0, "tile shapes");

  // 8 warps over the 4 x 4 fragments of the 64 x 64 output: warp w owns row block w / 2, columns 2 * (w % 2) + {0, 1}
  const int fm = warp >> 1, fn0 = (warp & 1) * 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);

  // software pipeline: the next K step's x and A vectors are loaded into registers (2 * kLoads 16-byte loads in
  // flight per thread) while the tensor cores work on the current step in shared memory
  Vec<T, true> vx[kLoads], va[kLoads];
  auto load_step = [&](int k0) {
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const int i = tid + l * kSegThreads, m = i / (BK / V), c = (i % (BK / V)) * V;
      if (tok_s[m] >= 0 && k0 + c < k_end) {  // x rows through token_ids; zeros past the tile or K
        load_vec(vx[l], X + tok_s[m] * p.sx_t + k0 + c);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) vx[l].v[e] = Num<T>::from_f(0.f);
      }
      if (rows_s[m] >= 0 && k0 + c < k_end) {  // A rank rows through the page table, below the rank only
        load_vec(va[l], A + rows_s[m] * sa + k0 + c);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) va[l].v[e] = Num<T>::from_f(0.f);
      }
    }
  };
  load_step(k_begin);
  for (int k0 = k_begin; k0 < k_end; k0 += BK) {
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const int i = tid + l * kSegThreads, m = i / (BK / V), c = (i % (BK / V)) * V;
      store_vec(&xs[m][c], vx[l]);
      store_vec(&as[m][c], va[l]);
    }
    __syncthreads();
    if (k0 + BK < k_end) load_step(k0 + BK);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, &xs[fm * 16][kk], LDX);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // (k, j) at as[j][k]: A^T
        wmma::load_matrix_sync(fb, &as[(fn0 + f) * 16][kk], LDX);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
    __syncthreads();  // the tiles are rewritten by the next step (and ys aliases them)
  }
#pragma unroll
  for (int f = 0; f < 2; ++f) wmma::store_matrix_sync(&ys[fm * 16][(fn0 + f) * 16], acc[f], LDY, wmma::mem_row_major);
  __syncthreads();
  float* Y = p.y + sl * p.sy_s;
  for (int i = tid; i < BM * BR; i += kSegThreads) {
    const int m = i / BR, j = i % BR;
    if (m < len && j < nr) {
      float* dst = Y + tok_s[m] * p.sy_t + (r0 + j) * p.sy_r;
      if (k_split > 1) atomicAdd(dst, ys[m][j]); else *dst = ys[m][j];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(seg::kSegThreads) segment_expand_kernel(const DenseParams p) {
  using namespace nvcuda;
  using namespace seg;
  __shared__ __align__(128) unsigned char smem[ExpandSmem<T>::kBytes];
  __shared__ int64_t tok_s[BM];
  LORAKERN_SHARED_TRACK(smem);
  LORAKERN_SHARED_TRACK(tok_s);
  auto yhi = reinterpret_cast<T(*)[LDR]>(smem);
  auto ylo = reinterpret_cast<T(*)[LDR]>(smem + BM * LDR * sizeof(T));
  auto ylo2 = reinterpret_cast<T(*)[LDR]>(smem + 2 * BM * LDR * sizeof(T));  // third term, bf16 only
  auto bs = reinterpret_cast<T(*)[LDB]>(smem + 3 * BM * LDR * sizeof(T));
  auto ystage = reinterpret_cast<float(*)[RK]>(smem + ExpandSmem<T>::kYStage);
  auto os = reinterpret_cast<float(*)[LDO]>(smem);  // after the rank loop
  __shared__ float wmax_s[kSegThreads / 32];
  LORAKERN_SHARED_TRACK(wmax_s);

  constexpr bool kThreeTerms = std::is_same<T, __nv_bfloat16>::value;  // bf16: 3 x 8 bits ~ fp32's 24
  // fp16 tops out at 65504, below what a float32 y may hold: y enters the split divided by a power of two S (exact)
  // with |y / S| <= 2^14; S only grows along the rank loop (the accumulator is rescaled when it does) and the
  // epilogue multiplies by it. S = 1 unless some |y| > 2^14.
  constexpr bool kScaled = std::is_same<T, __half>::value;
  const int tile = blockIdx.x, sl = blockIdx.y, n0 = blockIdx.z * BN;
  const int start = p.tiles[3 * tile], len = p.tiles[3 * tile + 1], slot = p.tiles[3 * tile + 2];
  if (len <= 0 || slot < 0) return;
  const int n_i = static_cast<int>(p.n_sizes[sl]);
  const int rank = p.ranks[slot];
  if (n0 >= n_i || rank <= 0) return;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  for (int i = tid; i < BM; i += kSegThreads) tok_s[i] = i < len ? p.token_ids[start + i] : -1;
  __syncthreads();

  // (Reading the out tile into registers before the rank loop was tried: 72 -> 127 registers, 3 -> 2 CTAs per SM,
  // and the prefill expand went from 163 to 191 us on an H100. The out tile is read in the epilogue.)
  constexpr int V = 8;

  const T* B = reinterpret_cast<const T*>(p.b_ptrs[sl]);
  const int64_t sb = p.b_strides[sl];
  const float* Y = p.y + sl * p.sy_s;

  // 8 warps over the 4 x 8 fragments of the 64 x 128 tile: warp w owns row block w / 2, columns 4 * (w % 2) + {0..3}
  const int fm = warp >> 1, fn0 = (warp & 1) * 4;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
  for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc[f], 0.f);

  float S = 1.f, inv_S = 1.f;  // fp16's scale (see kScaled)
  for (int rc = 0; rc < rank; rc += RK) {  // the slot's real rank, RK rows at a time
    if constexpr (kScaled) {
      float amax = 0.f;
      for (int i = tid; i < BM * RK; i += kSegThreads) {
        const int m = i / RK, j = i % RK;
        const float v = (tok_s[m] >= 0 && rc + j < rank) ? Y[tok_s[m] * p.sy_t + (rc + j) * p.sy_r] : 0.f;
        ystage[m][j] = v;
        amax = fmaxf(amax, fabsf(v));
      }
      amax = warp_max(amax);
      if (lane == 0) wmax_s[warp] = amax;
      __syncthreads();
#pragma unroll
      for (int w = 0; w < kSegThreads / 32; ++w) amax = fmaxf(amax, wmax_s[w]);
      int e = 0;
      frexpf(amax, &e);  // amax < 2^e
      if (e > 14 && ldexpf(1.f, e - 14) > S) {  // block-uniform: every thread computed the same amax
        const float grow = ldexpf(1.f, e - 14) * inv_S;
#pragma unroll
        for (int f = 0; f < 4; ++f)
          for (int i = 0; i < acc[f].num_elements; ++i) acc[f].x[i] /= grow;  // any fragment layout: uniform
        S = ldexpf(1.f, e - 14);
        inv_S = ldexpf(1.f, 14 - e);
      }
    }
    for (int i = tid; i < BM * RK; i += kSegThreads) {
      const int m = i / RK, j = i % RK;
      float v;
      if constexpr (kScaled) {
        v = ystage[m][j] * inv_S;  // a power of two: exact
      } else {
        v = (tok_s[m] >= 0 && rc + j < rank) ? Y[tok_s[m] * p.sy_t + (rc + j) * p.sy_r] : 0.f;
      }
      const T hi = Num<T>::from_f(v);
      const float r1 = v - Num<T>::to_f(hi);
      const T lo = Num<T>::from_f(r1);
      yhi[m][j] = hi;
      ylo[m][j] = lo;
      if constexpr (kThreeTerms) ylo2[m][j] = Num<T>::from_f(r1 - Num<T>::to_f(lo));
    }
    for (int i = tid; i < RK * (BN / V); i += kSegThreads) {
      const int j = i / (BN / V), c = (i % (BN / V)) * V;
      Vec<T, true> v;
      if (rc + j < rank && n0 + c < n_i) {
        const int64_t row = p.page_table[slot * p.s_pt + rc + j];  // entries below the rank only
        load_vec(v, B + row * sb + n0 + c);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v.v[e] = Num<T>::from_f(0.f);
      }
      store_vec(&bs[j][c], v);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < RK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fh, fl, fl2;
      wmma::load_matrix_sync(fh, &yhi[fm * 16][kk], LDR);
      wmma::load_matrix_sync(fl, &ylo[fm * 16][kk], LDR);
      if constexpr (kThreeTerms) wmma::load_matrix_sync(fl2, &ylo2[fm * 16][kk], LDR);
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, &bs[kk][(fn0 + f) * 16], LDB);
        wmma::mma_sync(acc[f], fh, fb, acc[f]);
        wmma::mma_sync(acc[f], fl, fb, acc[f]);
        if constexpr (kThreeTerms) wmma::mma_sync(acc[f], fl2, fb, acc[f]);
      }
    }
    __syncthreads();  // the tiles are rewritten by the next step (and os aliases them)
  }
#pragma unroll
  for (int f = 0; f < 4; ++f) wmma::store_matrix_sync(&os[fm * 16][(fn0 + f) * 16], acc[f], LDO, wmma::mem_row_major);
  __syncthreads();

  const float scale = (p.scales ? p.scales[slot] : 1.0f) * S;
  const int64_t off = p.offsets[sl];
  T* O = reinterpret_cast<T*>(p.out);
  for (int i = tid; i < BM * (BN / V); i += kSegThreads) {
    const int m = i / (BN / V), c = (i % (BN / V)) * V;
    if (m < len && n0 + c < n_i) {
      T* o = O + tok_s[m] * p.so_t + off + n0 + c;
      Vec<T, true> v;
      load_vec_rw(v, o);
#pragma unroll
      for (int e = 0; e < V; ++e) v.v[e] = Num<T>::from_f(Num<T>::to_f(v.v[e]) + scale * os[m][c + e]);
      store_vec(o, v);
    }
  }
}

// mode 1: shrink into a zeroed y; mode 2: expand from y. `k_split` >= 1 (shrink only).
template <typename T>
cudaError_t launch_dense_segment(const DenseParams& p, int mode, int k_split, cudaStream_t stream) {
  if (p.num_tiles <= 0 || p.num_slices <= 0) return cudaSuccess;
  if (mode == 1) {
    const int r_tiles = (p.max_rank + seg::BR - 1) / seg::BR;
    dim3 grid(p.num_tiles, p.num_slices, r_tiles * max(k_split, 1));
    return launch_kernel(segment_shrink_kernel<T>, grid, dim3(seg::kSegThreads), stream, p, max(k_split, 1));
  } else if (mode == 2) {
    dim3 grid(p.num_tiles, p.num_slices, (p.max_n + seg::BN - 1) / seg::BN);
    return launch_kernel(segment_expand_kernel<T>, grid, dim3(seg::kSegThreads), stream, p);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lorakern
