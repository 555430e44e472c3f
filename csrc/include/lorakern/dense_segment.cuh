// lorakern: the segment path of the dense LoRA ops (prefill: long runs of tokens per adapter), on tensor cores
// through WMMA (sm_80+; fp16 and bf16). Torch-free templates: raw pointers in, cudaError_t out.
//
// Work list: the LoRAPlan's 64-token tiles (start, length, slot) — fixed grid, early exit, CUDA-graph safe.
//
//   segment_shrink_kernel  grid (tiles, slices, rank tiles of 64 [, K splits]):
//       Y[64 tokens, 64 ranks] = X[tokens, K] @ A[rows, K]^T, X rows gathered through token_ids, A rows through
//       the page table (only rows below the slot's real rank; rank tiles past it exit). K steps of 64 stream
//       through a 4-deep cp.async ring (three steps in flight while the tensor cores work on one). fp32
//       accumulate; written to y (float32 [S, T, max_rank]); with K splits the partial sums are added atomically
//       into a zeroed y.
//   segment_expand_kernel  grid (tiles, slices, N tiles of 128):
//       out[tokens, off + n] += scale * Y[tokens, :rank] @ B[rows, n], the rank loop stops at the real rank in
//       steps of RK = 32 (rows past the rank are never loaded; B rows double-buffered by cp.async). The fp32 Y
//       enters the tensor cores as a sum of terms of the weight dtype (hi + lo for fp16, hi + mid + lo for bf16),
//       so the intermediate keeps ~fp32 precision. The out tile streams into shared memory by cp.async from the
//       start, behind the rank loop; the epilogue adds the accumulators to it there and writes it back once with
//       16-byte stores.
//
// Requirements checked by the host (else the gather path runs): 16-byte aligned rows, K and every N_i multiples
// of 8, unit inner strides.
#pragma once

#include <mma.h>

#include <type_traits>

#include "lorakern/common.cuh"
#include "lorakern/dense_dispatch.h"

namespace lorakern {

// Tuning macros (compile time; the defaults are the measured configuration, bench/sweep_variants.sh times the
// others on a GPU by rebuilding with LORAKERN_NVCC_DEFINES):
//   LORAKERN_SEG_SK, LORAKERN_SEG_STAGES   shrink K step and cp.async ring depth (64, 4: 72 KB of shared memory)
//   LORAKERN_SEG_MMA                       expand on mma.sync + ldmatrix instead of WMMA (0; 1: the accumulators
//                                          go from registers into the out tile, no fp32 staging; not yet timed)
//   LORAKERN_SEG_BF16_TERMS                bf16 terms of the fp32 intermediate in the expand (3: ~24 bits, the
//                                          contract's fp32; 2: ~16 bits, 9 % faster expand on an H100, but outside
//                                          the fp32 tolerance where the sum cancels: not a default)
// Timed on the H100 and removed, no faster: 2 expand CTAs per SM with the next rank step's y prefetched into
// registers (0-4 % slower), rank steps of 64 (1-4 % slower).
#ifndef LORAKERN_SEG_SK
#define LORAKERN_SEG_SK 64
#endif
#ifndef LORAKERN_SEG_STAGES
#define LORAKERN_SEG_STAGES 4
#endif
#ifndef LORAKERN_SEG_MMA
#define LORAKERN_SEG_MMA 0
#endif
#ifndef LORAKERN_SEG_BF16_TERMS
#define LORAKERN_SEG_BF16_TERMS 3
#endif

namespace seg {
// (BN = 256 was tried: 8 fragments per warp spill at 128 registers)
constexpr int BM = 64, BR = 64, BN = 128, RK = 32;
constexpr int kWarpFrags = BN / 32;  // expand: 16 x 16 accumulator fragments per warp (8 warps over 4 x BN / 16)
constexpr int kSegThreads = 256;
constexpr int kExpandMinBlocks = 3;  // expand: 3 CTAs per SM (50 KB of shared memory each; <= 80 registers)
// Shrink: K steps of SK = 64 through a STAGES-deep cp.async ring (3 steps, 48 KB, in flight per CTA while the
// tensor cores work on the fourth); 72 KB of shared memory, so 3 CTAs per SM on an H100 (2 on an A100, 1 on sm_89).
constexpr int SK = LORAKERN_SEG_SK, STAGES = LORAKERN_SEG_STAGES;
static_assert(SK % 16 == 0 && STAGES >= 2, "shrink ring");
constexpr int LDX = SK + 8;   // smem leading dims: multiples of 8 halves, padded against bank conflicts
constexpr int LDY = BR + 4;   // floats
constexpr int LDR = RK + 8;
constexpr int LDB = BN + 8;
constexpr int LDT = BN + 8;   // the out tile (T)
constexpr int LDS = 16 + 4;   // a warp's fp32 fragment stage in the expand epilogue

constexpr int round128(int b) { return (b + 127) / 128 * 128; }

// Dynamic shared memory of each kernel. Shrink: the K ring, aliased after the loop by the fp32 result tile.
template <typename T> struct ShrinkSmem {
  static constexpr int kStage = 2 * BM * LDX * int(sizeof(T));  // xs [BM][LDX], as [BR][LDX]
  static constexpr int kRing = STAGES * kStage;
  static constexpr int kAcc = BM * LDY * int(sizeof(float));    // ys [BM][LDY]
  static constexpr int kBytes = kRing > kAcc ? kRing : kAcc;
};
// Expand: the rank loop's y terms (yhi, ylo, ylo2 [BM][LDR]) and two B buffers [RK][LDB] (aliased after the
// loop by the warps' fragment stages), then the out tile [BM][LDT], filled by cp.async while the loop runs.
template <typename T> struct ExpandSmem {
  static constexpr int kY = 3 * BM * LDR * int(sizeof(T));
  static constexpr int kB = RK * LDB * int(sizeof(T));
  static constexpr int kLoop = kY + 2 * kB;
  static constexpr int kStage = (kSegThreads / 32) * 16 * LDS * int(sizeof(float));
  static constexpr int kOutOffset = round128(kLoop > kStage ? kLoop : kStage);
  static constexpr int kBytes = kOutOffset + BM * LDT * int(sizeof(T));
  static_assert(kY % 128 == 0 && kB % 128 == 0, "buffer alignment");
};
}  // namespace seg

template <typename T>
__global__ void __launch_bounds__(seg::kSegThreads) segment_shrink_kernel(const DenseParams p, int k_split) {
  using namespace nvcuda;
  using namespace seg;
  LORAKERN_DYNAMIC_SMEM(smem);
  __shared__ int64_t tok_s[BM];
  __shared__ int64_t rows_s[BR];
  LORAKERN_SHARED_TRACK(tok_s);
  LORAKERN_SHARED_TRACK(rows_s);
  using Tile = T[BM][LDX];
  auto xs = [&](int st) { return reinterpret_cast<Tile*>(smem + st * ShrinkSmem<T>::kStage)[0]; };
  auto as = [&](int st) { return reinterpret_cast<Tile*>(smem + st * ShrinkSmem<T>::kStage + BM * LDX * sizeof(T))[0]; };
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
  const int k_chunk = ((p.K + k_split - 1) / k_split + SK - 1) / SK * SK;
  const int k_begin = ks * k_chunk, k_end = min(p.K, k_begin + k_chunk);
  if (k_begin >= k_end) return;
  const int steps = (k_end - k_begin + SK - 1) / SK;

  const int tid = threadIdx.x, warp = tid >> 5;
  for (int i = tid; i < BM; i += kSegThreads) tok_s[i] = i < len ? p.token_ids[start + i] : -1;
  for (int i = tid; i < BR; i += kSegThreads) rows_s[i] = i < nr ? p.page_table[slot * p.s_pt + r0 + i] : -1;
  __syncthreads();

  const T* X = reinterpret_cast<const T*>(p.x);
  const T* A = reinterpret_cast<const T*>(p.a_ptrs[sl]);
  const int64_t sa = p.a_strides[sl];
  constexpr int V = 8;                                // 16-byte vectors of 8 halves
  constexpr int kLoads = BM * (SK / V) / kSegThreads;  // vectors per thread per operand and K step
  static_assert(BM == BR && BM * (SK / V) % kSegThreads == 0, "tile shapes");

  // one K step into ring stage `st`: x rows through token_ids, A rank rows through the page table (below the
  // rank only); zeros past the tile, the rank or K
  auto issue = [&](int step, int st) {
    const int k0 = k_begin + step * SK;
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const int i = tid + l * kSegThreads, m = i / (SK / V), c = (i % (SK / V)) * V;
      const bool in_k = k0 + c < k_end;
      const bool vx = tok_s[m] >= 0 && in_k, va = rows_s[m] >= 0 && in_k;
      cp_async16(&xs(st)[m][c], vx ? X + tok_s[m] * p.sx_t + k0 + c : X, vx);
      cp_async16(&as(st)[m][c], va ? A + rows_s[m] * sa + k0 + c : A, va);
    }
  };

  // 8 warps over the 4 x 4 fragments of the 64 x 64 output: warp w owns row block w / 2, columns 2 * (w % 2) + {0, 1}
  const int fm = warp >> 1, fn0 = (warp & 1) * 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);

  // group g holds step g (empty past the last step): before step s, at most STAGES - 2 newer groups are in flight
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < steps) issue(s, s);
    cp_async_commit();
  }
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // step's stage complete for every thread; the stage refilled below was last read a step ago
    if (step + STAGES - 1 < steps) issue(step + STAGES - 1, (step + STAGES - 1) % STAGES);
    cp_async_commit();
    const int st = step % STAGES;
#pragma unroll
    for (int kk = 0; kk < SK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, &xs(st)[fm * 16][kk], LDX);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // (k, j) at as[j][k]: A^T
        wmma::load_matrix_sync(fb, &as(st)[(fn0 + f) * 16][kk], LDX);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups are left; nothing may land in ys
  __syncthreads();     // the ring's last reads are done (ys aliases it)
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
__global__ void __launch_bounds__(seg::kSegThreads, seg::kExpandMinBlocks) segment_expand_kernel(const DenseParams p) {
  using namespace nvcuda;
  using namespace seg;
  using E = ExpandSmem<T>;
  LORAKERN_DYNAMIC_SMEM(smem);
  __shared__ int64_t tok_s[BM];
  __shared__ float wmax_s[kSegThreads / 32];
  LORAKERN_SHARED_TRACK(tok_s);
  LORAKERN_SHARED_TRACK(wmax_s);
  auto yhi = reinterpret_cast<T(*)[LDR]>(smem);
  auto ylo = reinterpret_cast<T(*)[LDR]>(smem + BM * LDR * sizeof(T));
  auto ylo2 = reinterpret_cast<T(*)[LDR]>(smem + 2 * BM * LDR * sizeof(T));  // third term, bf16 only
  auto bs = [&](int buf) { return reinterpret_cast<T(*)[LDB]>(smem + E::kY + buf * E::kB); };
  auto ot = reinterpret_cast<T(*)[LDT]>(smem + E::kOutOffset);

  constexpr bool kThreeTerms = std::is_same<T, __nv_bfloat16>::value && LORAKERN_SEG_BF16_TERMS == 3;  // 3 x 8 bits
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

  constexpr int V = 8;
  const T* B = reinterpret_cast<const T*>(p.b_ptrs[sl]);
  const int64_t sb = p.b_strides[sl];
  const float* Y = p.y + sl * p.sy_s;
  const int64_t off = p.offsets[sl];
  T* O = reinterpret_cast<T*>(p.out);

  // B rows rc .. rc + RK (below the rank) into buffer `buf`, zeros past the rank or N_i
  const int32_t* pt = p.page_table + slot * p.s_pt;  // the slot's rank rows
  const T* Bn = B + n0;
  static_assert(RK * (BN / V) % kSegThreads == 0, "B tile");
  auto issue_b = [&](int rc, int buf) {
#pragma unroll
    for (int l = 0; l < RK * (BN / V) / kSegThreads; ++l) {
      const int i = tid + l * kSegThreads, j = i / (BN / V), c = (i % (BN / V)) * V;
      const bool ok = rc + j < rank && n0 + c < n_i;
      cp_async16(&bs(buf)[j][c], ok ? Bn + pt[rc + j] * sb + c : B, ok);
    }
  };
  // Commit groups: B(0), B(1), the out tile, then B(s + 2) after step s. Step 0 and 1 wait for all but the 2
  // newest groups, later steps for all but the newest; the out tile is needed only by the epilogue, so it streams
  // in behind the rank loop (rows past the tile and columns past N_i are neither read nor written).
  issue_b(0, 0);
  cp_async_commit();
  if (RK < rank) issue_b(RK, 1);
  cp_async_commit();
  for (int i = tid; i < BM * (BN / V); i += kSegThreads) {
    const int m = i / (BN / V), c = (i % (BN / V)) * V;
    if (m < len && n0 + c < n_i) cp_async16(&ot[m][c], O + tok_s[m] * p.so_t + off + n0 + c, true);
  }
  cp_async_commit();

  // the fp32 y of a rank step (L2-resident: the shrink has just written it), RK columns per warp row
  constexpr int kY = BM * RK / kSegThreads;  // per thread: column j = tid % RK, rows tid / RK + l * (threads / RK)
  static_assert(BM * RK % kSegThreads == 0 && kSegThreads % RK == 0, "y staging");
  float yv[kY];
  auto load_y = [&](int rc) {
    const bool in_rank = rc + tid % RK < rank;
    const float* Yc = Y + (rc + tid % RK) * p.sy_r;
#pragma unroll
    for (int l = 0; l < kY; ++l) {
      const int m = tid / RK + l * (kSegThreads / RK);
      yv[l] = (tok_s[m] >= 0 && in_rank) ? Yc[tok_s[m] * p.sy_t] : 0.f;
    }
  };

  // 8 warps over the 4 x (BN / 16) fragments of the 64 x BN tile: warp w owns row block w / 2 and kWarpFrags columns
  const int fm = warp >> 1, fn0 = (warp & 1) * kWarpFrags;
#if LORAKERN_SEG_MMA
  float acc[2 * kWarpFrags][4];  // mma.sync: two n8 tiles per 16-column fragment, 4 fp32 per lane each
#pragma unroll
  for (int t = 0; t < 2 * kWarpFrags; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = 0.f;
#else
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kWarpFrags];
#pragma unroll
  for (int f = 0; f < kWarpFrags; ++f) wmma::fill_fragment(acc[f], 0.f);
#endif

  float S = 1.f, inv_S = 1.f;  // fp16's scale (see kScaled)
  for (int rc = 0, step = 0; rc < rank; rc += RK, ++step) {  // the slot's real rank, RK rows at a time
    load_y(rc);
    if constexpr (kScaled) {
      float amax = 0.f;
#pragma unroll
      for (int l = 0; l < kY; ++l) amax = fmaxf(amax, fabsf(yv[l]));
      amax = warp_max(amax);
      if (lane == 0) wmax_s[warp] = amax;
      __syncthreads();
#pragma unroll
      for (int w = 0; w < kSegThreads / 32; ++w) amax = fmaxf(amax, wmax_s[w]);
      int e = 0;
      frexpf(amax, &e);  // amax < 2^e
      if (e > 14 && ldexpf(1.f, e - 14) > S) {  // block-uniform: every thread computed the same amax
        const float grow = ldexpf(1.f, e - 14) * inv_S;
#if LORAKERN_SEG_MMA
#pragma unroll
        for (int t = 0; t < 2 * kWarpFrags; ++t)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[t][i] /= grow;
#else
#pragma unroll
        for (int f = 0; f < kWarpFrags; ++f)
          for (int i = 0; i < acc[f].num_elements; ++i) acc[f].x[i] /= grow;  // any fragment layout: uniform
#endif
        S = ldexpf(1.f, e - 14);
        inv_S = ldexpf(1.f, 14 - e);
      }
    }
#pragma unroll
    for (int l = 0; l < kY; ++l) {
      const int m = tid / RK + l * (kSegThreads / RK), j = tid % RK;
      const float v = kScaled ? yv[l] * inv_S : yv[l];  // a power of two: exact
      const T hi = Num<T>::from_f(v);
      const float r1 = v - Num<T>::to_f(hi);
      const T lo = Num<T>::from_f(r1);
      yhi[m][j] = hi;
      ylo[m][j] = lo;
      if constexpr (kThreeTerms) ylo2[m][j] = Num<T>::from_f(r1 - Num<T>::to_f(lo));
    }
    if (step < 2) cp_async_wait<2>(); else cp_async_wait<1>();  // this step's B rows (and, from step 2, the out tile)
    __syncthreads();
    const int buf = step & 1;
#pragma unroll 1
    for (int kk = 0; kk < RK; kk += 16) {  // not unrolled: one k slice's fragments live at a time (80 registers)
#if LORAKERN_SEG_MMA
      // A (y terms, [m][k]): lane l addresses row l % 16, columns kk + 8 (l / 16) of the warp's 16 rows
      uint32_t ah[4], al[4], al2[4];
      ldmatrix_x4(ah, &yhi[fm * 16 + (lane & 15)][kk + (lane >> 4) * 8], false);
      ldmatrix_x4(al, &ylo[fm * 16 + (lane & 15)][kk + (lane >> 4) * 8], false);
      if constexpr (kThreeTerms) ldmatrix_x4(al2, &ylo2[fm * 16 + (lane & 15)][kk + (lane >> 4) * 8], false);
#pragma unroll
      for (int f = 0; f < kWarpFrags; ++f) {
        // B ([k][n]) transposed: k row kk + l % 16, columns of n8 tile l / 16 -> {b0, b1} of the fragment's two tiles
        uint32_t bq[4];
        ldmatrix_x4(bq, &bs(buf)[kk + (lane & 15)][(fn0 + f) * 16 + (lane >> 4) * 8], true);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t bb[2] = {bq[2 * h], bq[2 * h + 1]};
          float* c = acc[2 * f + h];
          mma_16816<T>(c, ah, bb, c);
          mma_16816<T>(c, al, bb, c);
          if constexpr (kThreeTerms) mma_16816<T>(c, al2, bb, c);
        }
      }
#else
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fh, fl, fl2;
      wmma::load_matrix_sync(fh, &yhi[fm * 16][kk], LDR);
      wmma::load_matrix_sync(fl, &ylo[fm * 16][kk], LDR);
      if constexpr (kThreeTerms) wmma::load_matrix_sync(fl2, &ylo2[fm * 16][kk], LDR);
#pragma unroll
      for (int f = 0; f < kWarpFrags; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, &bs(buf)[kk][(fn0 + f) * 16], LDB);
        wmma::mma_sync(acc[f], fh, fb, acc[f]);
        wmma::mma_sync(acc[f], fl, fb, acc[f]);
        if constexpr (kThreeTerms) wmma::mma_sync(acc[f], fl2, fb, acc[f]);
      }
#endif
    }
    __syncthreads();  // the y terms and this B buffer are rewritten next (and the fragment stages alias them)
    if (rc + 2 * RK < rank) issue_b(rc + 2 * RK, buf);
    cp_async_commit();
  }

  // Epilogue: each warp passes its fragments through its own fp32 stage into the out tile (in shared memory),
  // then the block writes the tile back with 16-byte stores.
  cp_async_wait<0>();
  __syncthreads();
  const float scale = (p.scales ? p.scales[slot] : 1.0f) * S;
#if LORAKERN_SEG_MMA
  {  // each lane owns rows g, g + 8 and columns 2q, 2q + 1 of every n8 tile: added in place, no staging
    const int g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int t = 0; t < 2 * kWarpFrags; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        T* o = &ot[fm * 16 + g + 8 * h][fn0 * 16 + t * 8 + 2 * q];
        o[0] = Num<T>::from_f(Num<T>::to_f(o[0]) + scale * acc[t][2 * h]);
        o[1] = Num<T>::from_f(Num<T>::to_f(o[1]) + scale * acc[t][2 * h + 1]);
      }
  }
#else
  float(*stage)[LDS] = reinterpret_cast<float(*)[LDS]>(smem + warp * 16 * LDS * sizeof(float));
#pragma unroll
  for (int f = 0; f < kWarpFrags; ++f) {
    wmma::store_matrix_sync(&stage[0][0], acc[f], LDS, wmma::mem_row_major);
    __syncwarp();
    const int r = lane >> 1, c = (lane & 1) * V;  // 16 rows x 2 vectors of the fragment
    T* o = &ot[fm * 16 + r][(fn0 + f) * 16 + c];
    Vec<T, true> v;
    load_vec_rw(v, o);
#pragma unroll
    for (int e = 0; e < V; ++e) v.v[e] = Num<T>::from_f(Num<T>::to_f(v.v[e]) + scale * stage[r][c + e]);
    store_vec(o, v);
    __syncwarp();  // the stage is rewritten by the next fragment
  }
#endif
  __syncthreads();
  for (int i = tid; i < BM * (BN / V); i += kSegThreads) {
    const int m = i / (BN / V), c = (i % (BN / V)) * V;
    if (m < len && n0 + c < n_i) {
      Vec<T, true> v;
      load_vec_rw(v, &ot[m][c]);
      store_vec(O + tok_s[m] * p.so_t + off + n0 + c, v);
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
    return launch_kernel_smem(segment_shrink_kernel<T>, grid, dim3(seg::kSegThreads), seg::ShrinkSmem<T>::kBytes,
                              stream, p, max(k_split, 1));
  } else if (mode == 2) {
    dim3 grid(p.num_tiles, p.num_slices, (p.max_n + seg::BN - 1) / seg::BN);
    return launch_kernel_smem(segment_expand_kernel<T>, grid, dim3(seg::kSegThreads), seg::ExpandSmem<T>::kBytes,
                              stream, p);
  }
  return cudaErrorInvalidValue;
}

// CTAs per SM of the segment kernel of `mode` on the current device (0 when unknown), for the host's split-K rule.
template <typename T>
int segment_ctas_per_sm_t(int mode) {
  if (mode == 1) return ctas_per_sm(segment_shrink_kernel<T>, seg::kSegThreads, seg::ShrinkSmem<T>::kBytes);
  if (mode == 2) return ctas_per_sm(segment_expand_kernel<T>, seg::kSegThreads, seg::ExpandSmem<T>::kBytes);
  return 0;
}

}  // namespace lorakern
