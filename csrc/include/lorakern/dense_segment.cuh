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
//   LORAKERN_FUSED_DEEP_STAGES, _STAGES,   the fused kernel's (K ring, out-chunk ring) configurations, of which the
//   LORAKERN_FUSED_OSTAGES                 host takes the first that fits: (6, 3), (4, 3), (4, 2) (dense_dispatch.h)
//   LORAKERN_SEG_BF16_TERMS                bf16 terms of the fp32 intermediate in the expand (3: ~24 bits, the
//                                          contract's fp32; 2: ~16 bits, 9 % faster expand on an H100, but outside
//                                          the fp32 tolerance where the sum cancels: not a default)
//   LORAKERN_FUSED_BLOCK_BRANCH            1: the fused kernel's shrink skips a warp's dead 16-column blocks with a
//                                          branch per (16-wide k step, block) inside the K loop, as up to session
//                                          8; 0 (session 9, untimed): the K loop is instantiated per block count
//                                          (1-4, block-uniform) with no branch in it, so ptxas can issue the next
//                                          block's ldmatrix under the previous block's mma (sm_90a SASS: 16
//                                          branches per K step before)
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
#ifndef LORAKERN_FUSED_BLOCK_BRANCH
#define LORAKERN_FUSED_BLOCK_BRANCH 0
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

// v - hi: what the hi term of v misses, split further into the lower terms. 0 where hi is infinite (v = +-Inf, or a
// bf16 hi rounded past the largest finite value): Inf - Inf would make the lower terms NaN and the product NaN,
// where the float64 reference (and the gather path) give +-Inf.
template <typename T> __device__ __forceinline__ float term_rest(float v, T hi) {
  const float h = Num<T>::to_f(hi);
  return isinf(h) ? 0.f : v - h;
}

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
  if (len <= 0) return;
  const int rank = slot_rank(p, slot);  // (0: skip; see DenseParams)
  const int r0 = r_tile * BR;
  if (r0 >= rank) return;
  const int nr = min(BR, rank - r0);
  const int k_chunk = ((p.K + k_split - 1) / k_split + SK - 1) / SK * SK;
  const int k_begin = ks * k_chunk, k_end = min(p.K, k_begin + k_chunk);
  if (k_begin >= k_end) return;
  const int steps = (k_end - k_begin + SK - 1) / SK;

  const int tid = threadIdx.x, warp = tid >> 5;
  for (int i = tid; i < BM; i += kSegThreads) tok_s[i] = i < len ? p.token_ids[start + i] : -1;
  for (int i = tid; i < BR; i += kSegThreads)
    rows_s[i] = i < nr ? checked_row(p.page_table[slot * p.s_pt + r0 + i], p.num_rows) : -1;
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
  if (len <= 0) return;
  const int n_i = static_cast<int>(p.n_sizes[sl]);
  const int rank = slot_rank(p, slot);  // (0: skip; see DenseParams)
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
      cp_async16(&bs(buf)[j][c], ok ? Bn + checked_row(pt[rc + j], p.num_rows) * sb + c : B, ok);
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
      amax = block_max<kSegThreads / 32>(amax, wmax_s);  // (wmax_s is rewritten a rank step later, after barriers)
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
      const float r1 = seg::term_rest(v, hi);
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

// ------------------------------------------------------------------------------------------------------------
// segment_fused_kernel  grid (tiles): one CTA per 64-token tile does the shrink AND the expand of every slice.
// The slices go in groups: as many as fit `p.seg_cols` (<= 256) rank columns at the TILE's rank rounded up to 16
// (rank16), so a tile of rank <= 16 does qkv in one group whatever the pool's max_rank; a group re-reads x.
//   1. Shrink: Y[64 tokens, G x rank16] = X[tokens, K] @ A^T for the group's G slices at once (slice s0 + i owns
//      columns i rank16 ..), K steps of 64 through a STAGES-deep cp.async ring (6 or 4: kFusedConfigs); the
//      whole K per CTA (no split, no atomics: deterministic). mma.sync + ldmatrix; 8 warps as 2 row halves x 4
//      column groups (16-column blocks b = group + 4 i); the accumulators (<= 64 per lane) stay in registers. Rank
//      rows past the rank are zeros.
//   2. The fp32 Y goes to shared memory once, as terms of the weight dtype (as in the expand kernel), and never to
//      global memory.
//   3. Expand: the group's out columns in chunks of BN = 128 (each slice's N_i in turn), OSTAGES-deep: the B rows
//      (below the rank) and the out chunk of chunk c + OSTAGES - 1 stream in by cp.async while chunk c
//      multiplies; each warp (16 rows x 64 columns) adds its accumulators to the out chunk in shared memory and
//      writes its part back with 16-byte stores. The first out chunks are issued before the Y terms are written.
// One CTA per SM (up to ~210 KB of shared memory): the host picks seg_cols and the ring depth that fit the device
// (segment_fused_smem) and takes this path while there are enough tiles for the GPU (LORAKERN_CUDA_SEGMENT).

// Two adjacent 16-bit elements as one 32-bit shared-memory access (4-byte aligned: an even column of a row).
template <typename T> struct alignas(4) Pair { T v[2]; };
template <typename T> __device__ __forceinline__ Pair<T> load_pair(const T* p) {
  Pair<T> r;
  *reinterpret_cast<uint32_t*>(r.v) = *reinterpret_cast<const uint32_t*>(p);
  return r;
}
template <typename T> __device__ __forceinline__ void store_pair(T* p, const Pair<T>& r) {
  *reinterpret_cast<uint32_t*>(p) = *reinterpret_cast<const uint32_t*>(r.v);
}

namespace segf {
constexpr int BM = 64, SK = 64, BN = 128;
constexpr int kThreads = 256;
constexpr int kMaxCols = 256;                  // rank columns of a group
constexpr int kMaxSlices = 32;                 // slices of a call (more: the split kernels)
constexpr int kBlocksPerWarp = kMaxCols / 64;  // 16-column blocks per warp column group in the shrink
constexpr int LDX = SK + 8;
constexpr int LDB = BN + 8;
static_assert(BM * (SK / 8) % kThreads == 0 && kMaxCols * (SK / 8) % kThreads == 0, "ring loads");

template <typename T> constexpr int terms() {
  return std::is_same<T, __nv_bfloat16>::value && LORAKERN_SEG_BF16_TERMS == 3 ? 3 : 2;
}

// Shared-memory layout (bytes) for `cols` rank columns per group, B chunks of up to r16 = max_rank rounded up to
// 16 rows, a K ring `stages` deep and an out-chunk ring `ostages` deep. The K ring (from 0) is dead once a group's
// shrink ends; the Y terms (from 0) and the expand stages (after them) reuse it.
template <typename T> struct FusedLayout {
  int r16, cols, ldy, ring_stage, ring, y_bytes, stage_off, ot_off, stage, bytes;
  __host__ __device__ FusedLayout(int max_rank, int stages, int ostages, int cols_) {
    r16 = (max_rank + 15) / 16 * 16;
    cols = cols_;
    ldy = cols + 8;
    ring_stage = (BM + cols) * LDX * int(sizeof(T));  // xs [BM][LDX], then as [cols][LDX]
    ring = stages * ring_stage;
    y_bytes = terms<T>() * BM * ldy * int(sizeof(T));  // yt [terms][BM][ldy]
    stage_off = seg::round128(y_bytes);
    ot_off = r16 * LDB * int(sizeof(T));               // a stage: bs [r16][LDB], then ot [BM][LDB]
    stage = ot_off + BM * LDB * int(sizeof(T));
    const int expand = stage_off + ostages * stage;
    bytes = ring > expand ? ring : expand;
  }
  // a group holds at least one slice at the pool's max rank; columns in 16-blocks up to kMaxCols
  __host__ __device__ bool supported() const { return r16 > 0 && cols >= r16 && cols <= kMaxCols && cols % 16 == 0; }
};
}  // namespace segf

template <typename T, int STAGES, int OSTAGES>
__global__ void __launch_bounds__(segf::kThreads, 1) segment_fused_kernel(const DenseParams p) {
  using segf::FusedLayout;
  static_assert(STAGES >= 2 && OSTAGES >= 2, "fused rings");
  constexpr int BM = segf::BM, SK = segf::SK, BN = segf::BN;
  constexpr int kThreads = segf::kThreads, kMaxCols = segf::kMaxCols, kMaxSlices = segf::kMaxSlices;
  constexpr int kBlocksPerWarp = segf::kBlocksPerWarp, LDX = segf::LDX, LDB = segf::LDB;
  LORAKERN_DYNAMIC_SMEM(smem);
  __shared__ int64_t tok_s[BM];
  __shared__ int32_t rows_s[kMaxCols];     // the slot's rank rows (rank <= r16 <= cols <= kMaxCols)
  __shared__ int chunk_s[kMaxSlices + 1];  // first out chunk of each slice, then the total
  __shared__ float wmax_s[kThreads / 32];
  LORAKERN_SHARED_TRACK(tok_s);
  LORAKERN_SHARED_TRACK(rows_s);
  LORAKERN_SHARED_TRACK(chunk_s);
  LORAKERN_SHARED_TRACK(wmax_s);

  const int tile = blockIdx.x;
  const int start = p.tiles[3 * tile], len = p.tiles[3 * tile + 1], slot = p.tiles[3 * tile + 2];
  if (len <= 0) return;
  const int rank = slot_rank(p, slot);  // (0: skip; see DenseParams)
  if (rank <= 0) return;
  const FusedLayout<T> L(p.max_rank, STAGES, OSTAGES, p.seg_cols);
  const int rank16 = (rank + 15) / 16 * 16;
  const int S = p.num_slices, G = min(S, L.cols / rank16);  // slices per group
  constexpr int kTerms = segf::terms<T>();
  constexpr bool kScaled = std::is_same<T, __half>::value;  // fp16: y / S with |y / S| < 2^14 (see the expand)

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, q = lane & 3;
  for (int i = tid; i < BM; i += kThreads) tok_s[i] = i < len ? p.token_ids[start + i] : -1;
  for (int j = tid; j < rank; j += kThreads)
    rows_s[j] = static_cast<int32_t>(checked_row(p.page_table[slot * p.s_pt + j], p.num_rows));
  if (tid == 0) {
    int c = 0;
    for (int s = 0; s < S; ++s) {
      chunk_s[s] = c;
      c += static_cast<int>((p.n_sizes[s] + BN - 1) / BN);
    }
    chunk_s[S] = c;
  }
  __syncthreads();

  const T* X = reinterpret_cast<const T*>(p.x);
  T* O = reinterpret_cast<T*>(p.out);
  using RowX = T[LDX];
  using RowB = T[LDB];
  auto xs = [&](int st) { return reinterpret_cast<RowX*>(smem + st * L.ring_stage); };
  auto as = [&](int st) { return reinterpret_cast<RowX*>(smem + st * L.ring_stage + BM * LDX * sizeof(T)); };
  auto yt = [&](int t) { return reinterpret_cast<T*>(smem) + t * BM * L.ldy; };
  auto bs = [&](int buf) { return reinterpret_cast<RowB*>(smem + L.stage_off + buf * L.stage); };
  auto ot = [&](int buf) { return reinterpret_cast<RowB*>(smem + L.stage_off + buf * L.stage + L.ot_off); };
  auto slice_of = [&](int c) {
    int s = 0;
    while (c >= chunk_s[s + 1]) ++s;
    return s;
  };
  constexpr int kXL = BM * (SK / 8) / kThreads, kAL = kMaxCols * (SK / 8) / kThreads;
  const int steps = (p.K + SK - 1) / SK;
  const int wm = warp & 1, wn = warp >> 1;  // shrink: rows wm * 32 .. + 32; 16-column blocks wn + 4 i
  const int fm = warp & 3, fn = warp >> 2;  // expand: rows fm * 16 .. + 16, chunk columns fn * 64 .. + 64
  const float scale0 = p.scales ? p.scales[slot] : 1.0f;
  // this thread's x rows of a K step (fixed for the CTA); null = a zero fill
  const T* xrow[kXL];
#pragma unroll
  for (int l = 0; l < kXL; ++l) {
    const int m = (tid + l * kThreads) / (SK / 8);
    xrow[l] = tok_s[m] >= 0 ? X + tok_s[m] * p.sx_t : nullptr;
  }

  for (int s0 = 0; s0 < S; s0 += G) {
    const int s1 = min(S, s0 + G), C = (s1 - s0) * rank16;
    if (s0 > 0) {  // the previous group's expand is done with the Y terms and the stages that the ring reuses
      cp_async_wait<0>();
      __syncthreads();
    }

    // ---- 1. shrink of slices s0 .. s1 - 1
    // this thread's A rank rows of a K step (fixed over the K loop); null = a zero fill (rank16 - rank rows)
    const T* arow[kAL];
    unsigned a_live = 0;  // bit l: row l of this thread is a column of the group (copied, maybe zeros)
#pragma unroll
    for (int l = 0; l < kAL; ++l) {
      const int c = (tid + l * kThreads) / (SK / 8), s = s0 + c / rank16, j = c % rank16;
      arow[l] = (c < C && j < rank) ? reinterpret_cast<const T*>(p.a_ptrs[s]) + rows_s[j] * p.a_strides[s] : nullptr;
      if (c < C) a_live |= 1u << l;
    }
    auto issue = [&](int step, int st) {
      const int k0 = step * SK;
#pragma unroll
      for (int l = 0; l < kXL; ++l) {
        const int i = tid + l * kThreads, m = i / (SK / 8), k = (i % (SK / 8)) * 8;
        const bool ok = xrow[l] != nullptr && k0 + k < p.K;
        cp_async16(&xs(st)[m][k], ok ? xrow[l] + k0 + k : X, ok);
      }
#pragma unroll
      for (int l = 0; l < kAL; ++l) {
        const int i = tid + l * kThreads, c = i / (SK / 8), k = (i % (SK / 8)) * 8;
        if (a_live >> l & 1u) {  // zeros past the rank or K
          const bool ok = arow[l] != nullptr && k0 + k < p.K;
          cp_async16(&as(st)[c][k], ok ? arow[l] + k0 + k : X, ok);
        }
      }
    };

    float acc[kBlocksPerWarp][2][2][4];  // [block][row half mi][n8 tile h][mma.sync C fragment]
    constexpr int kAccBlock = 2 * 2 * 4, kAccN = kBlocksPerWarp * kAccBlock;
    float(&acc_flat)[kAccN] = reinterpret_cast<float(&)[kAccN]>(acc);
#pragma unroll
    for (int e = 0; e < kAccN; ++e) acc_flat[e] = 0.f;
    unsigned b_live = 0;  // bit i: this warp's block b = wn + 4 i is a column block of the group (warp-uniform)
#pragma unroll
    for (int i = 0; i < kBlocksPerWarp; ++i)
      if ((wn + 4 * i) * 16 < C) b_live |= 1u << i;

#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
      if (st < steps) issue(st, st);
      cp_async_commit();
    }
    // The K loop for NL 16-column blocks per warp (blocks b = wn + 4 i, i < NL). Without LORAKERN_FUSED_BLOCK_BRANCH
    // NL is the same for every warp (the group's blocks rounded up to 4 per warp: (C + 63) / 64) and the loop has
    // no branch on the blocks: a warp whose block b lies past the group's C columns multiplies block 0 instead (its
    // rows are always in the stage) into accumulators that are never read (the Y terms and the fp16 scale below
    // look at live blocks only). With it, NL = kBlocksPerWarp and each dead block is skipped by a branch.
    auto k_loop = [&](auto nl) {
      constexpr int NL = decltype(nl)::value;
      for (int ks = 0; ks < steps; ++ks) {
        cp_async_wait<STAGES - 2>();  // this thread's copies of K step ks have landed
        __syncthreads();  // everyone's have; the stage refilled below was last read one K step ago
        if (ks + STAGES - 1 < steps) issue(ks + STAGES - 1, (ks + STAGES - 1) % STAGES);
        cp_async_commit();
        const int st = ks % STAGES;
#pragma unroll
        for (int kk = 0; kk < SK; kk += 16) {
          uint32_t af[2][4];
#pragma unroll
          for (int mi = 0; mi < 2; ++mi)
            ldmatrix_x4(af[mi], &xs(st)[wm * 32 + mi * 16 + (lane & 15)][kk + (lane >> 4) * 8], false);
#pragma unroll
          for (int i = 0; i < NL; ++i) {
            int b = wn + 4 * i;
            if constexpr (LORAKERN_FUSED_BLOCK_BRANCH) {
              if (!(b_live >> i & 1u)) continue;  // warp-uniform
            } else {
              b = (b_live >> i & 1u) ? b : 0;  // a select, not a branch
            }
            // A rows as the (k, n) operand: matrices (n 0-7 | 8-15) x (k 0-7 | 8-15) -> {b0, b1} of n8 tiles 0, 1
            uint32_t bq[4];
            ldmatrix_x4(bq, &as(st)[b * 16 + (lane & 7) + ((lane >> 4) << 3)][kk + ((lane >> 3) & 1) * 8], false);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint32_t bb[2] = {bq[2 * h], bq[2 * h + 1]};
#pragma unroll
              for (int mi = 0; mi < 2; ++mi) mma_16816<T>(acc[i][mi][h], af[mi], bb, acc[i][mi][h]);
            }
          }
        }
      }
    };
    if constexpr (LORAKERN_FUSED_BLOCK_BRANCH) {
      k_loop(std::integral_constant<int, kBlocksPerWarp>{});
    } else {
      static_assert(kBlocksPerWarp == 4, "the block counts below");
      switch ((C + 63) / 64) {  // block-uniform: every barrier of the K loop is the same one for all warps
        case 1: k_loop(std::integral_constant<int, 1>{}); break;
        case 2: k_loop(std::integral_constant<int, 2>{}); break;
        case 3: k_loop(std::integral_constant<int, 3>{}); break;
        default: k_loop(std::integral_constant<int, 4>{}); break;
      }
    }
    cp_async_wait<0>();  // only empty groups are left
    __syncthreads();     // every warp is done with the ring: the Y terms and the expand stages reuse it

    // ---- 3 (prologue). the group's first out chunks stream in while the Y terms are written
    const int c_begin = chunk_s[s0], c_end = chunk_s[s1];
    auto issue_chunk = [&](int c, int buf) {
      const int s = slice_of(c), n0 = (c - chunk_s[s]) * BN;
      const int n_i = static_cast<int>(p.n_sizes[s]);
      const T* B = reinterpret_cast<const T*>(p.b_ptrs[s]) + n0;
      const int64_t sb = p.b_strides[s];
      for (int i = tid; i < rank16 * (BN / 8); i += kThreads) {  // B rows below the rank, zeros to rank16
        const int j = i / (BN / 8), n = (i % (BN / 8)) * 8;
        const bool ok = j < rank && n0 + n < n_i;
        cp_async16(&bs(buf)[j][n], ok ? B + rows_s[j] * sb + n : B, ok);
      }
      const T* Oc = O + p.offsets[s] + n0;
      for (int i = tid; i < BM * (BN / 8); i += kThreads) {  // the out chunk (rows of the tile, columns below N_i)
        const int m = i / (BN / 8), n = (i % (BN / 8)) * 8;
        if (m < len && n0 + n < n_i) cp_async16(&ot(buf)[m][n], Oc + tok_s[m] * p.so_t + n, true);
      }
    };
#pragma unroll
    for (int c = 0; c < OSTAGES - 1; ++c) {
      if (c_begin + c < c_end) issue_chunk(c_begin + c, c);
      cp_async_commit();
    }

    // ---- 2. Y -> terms of T in shared memory (fp16: divided by a power of two first)
    float Sc = 1.f, inv_S = 1.f;
    if constexpr (kScaled) {
      float amax = 0.f;  // live blocks only (a dead block's accumulators hold block 0's products, or zeros)
#pragma unroll
      for (int i = 0; i < kBlocksPerWarp; ++i)
        if (b_live >> i & 1u)
#pragma unroll
          for (int e = 0; e < kAccBlock; ++e) amax = fmaxf(amax, fabsf(acc_flat[i * kAccBlock + e]));
      amax = block_max<kThreads / 32>(amax, wmax_s);  // (rewritten by the next group, after its barriers)
      int e = 0;
      frexpf(amax, &e);  // amax < 2^e
      if (e > 14) {
        Sc = ldexpf(1.f, e - 14);
        inv_S = ldexpf(1.f, 14 - e);
      }
    }
#pragma unroll
    for (int i = 0; i < kBlocksPerWarp; ++i) {
      const int b = wn + 4 * i;
      if (!(b_live >> i & 1u)) continue;
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {  // rows g, g + 8: columns 2q, 2q + 1 as a pair
            const int m = wm * 32 + mi * 16 + g + 8 * hr, c = b * 16 + h * 8 + 2 * q;
            Pair<T> hi, lo, lo2;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float v = acc[i][mi][h][2 * hr + e] * inv_S;  // a power of two: exact
              hi.v[e] = Num<T>::from_f(v);
              const float r1 = seg::term_rest(v, hi.v[e]);
              lo.v[e] = Num<T>::from_f(r1);
              lo2.v[e] = Num<T>::from_f(r1 - Num<T>::to_f(lo.v[e]));
            }
            store_pair(&yt(0)[m * L.ldy + c], hi);
            store_pair(&yt(1)[m * L.ldy + c], lo);
            if constexpr (kTerms == 3) store_pair(&yt(2)[m * L.ldy + c], lo2);
          }
    }

    // ---- 3. expand, chunk by chunk
    const float scale = scale0 * Sc;
    for (int c = c_begin; c < c_end; ++c) {
      cp_async_wait<OSTAGES - 2>();
      __syncthreads();  // chunk c landed for every thread (and, at the first, the Y terms are written); the buffer
                        // refilled below was last read (computed and written back) in the previous iteration
      if (c + OSTAGES - 1 < c_end) issue_chunk(c + OSTAGES - 1, (c - c_begin + OSTAGES - 1) % OSTAGES);
      cp_async_commit();
      const int buf = (c - c_begin) % OSTAGES, s = slice_of(c), n0 = (c - chunk_s[s]) * BN;
      const int n_i = static_cast<int>(p.n_sizes[s]);
      if (fm * 16 >= len || n0 + fn * 64 >= n_i) continue;  // warp-uniform: nothing of this warp's part is stored
      float oacc[8][4];
#pragma unroll
      for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) oacc[t][e] = 0.f;
      const int ycol = (s - s0) * rank16 + (lane >> 4) * 8;
      for (int kk = 0; kk < rank16; kk += 16) {
        uint32_t a[kTerms][4];
#pragma unroll
        for (int t = 0; t < kTerms; ++t)
          ldmatrix_x4(a[t], &yt(t)[(fm * 16 + (lane & 15)) * L.ldy + ycol + kk], false);
#pragma unroll
        for (int f = 0; f < 4; ++f) {
          uint32_t bq[4];
          ldmatrix_x4(bq, &bs(buf)[kk + (lane & 15)][fn * 64 + f * 16 + (lane >> 4) * 8], true);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t bb[2] = {bq[2 * h], bq[2 * h + 1]};
#pragma unroll
            for (int t = 0; t < kTerms; ++t) mma_16816<T>(oacc[2 * f + h], a[t], bb, oacc[2 * f + h]);
          }
        }
      }
      // lane: rows g, g + 8 and columns 2q, 2q + 1 of each n8 tile, added in place (this warp's part only), the
      // column pair as one 32-bit access
#pragma unroll
      for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          Pair<T> o = load_pair(&ot(buf)[fm * 16 + g + 8 * hr][fn * 64 + t * 8 + 2 * q]);
          o.v[0] = Num<T>::from_f(Num<T>::to_f(o.v[0]) + scale * oacc[t][2 * hr]);
          o.v[1] = Num<T>::from_f(Num<T>::to_f(o.v[1]) + scale * oacc[t][2 * hr + 1]);
          store_pair(&ot(buf)[fm * 16 + g + 8 * hr][fn * 64 + t * 8 + 2 * q], o);
        }
      __syncwarp();
      T* Oc = O + p.offsets[s] + n0;
#pragma unroll
      for (int v = 0; v < 4; ++v) {  // the warp's 16 x 64 part: 128 vectors of 8
        const int i = lane + 32 * v, m = fm * 16 + i / 8, n = fn * 64 + (i % 8) * 8;
        if (m < len && n0 + n < n_i) {
          Vec<T, true> val;
          load_vec_rw(val, &ot(buf)[m][n]);
          store_vec(Oc + tok_s[m] * p.so_t + n, val);
        }
      }
    }
  }
  cp_async_wait<0>();  // only empty groups remain; nothing in flight when the CTA exits
}

// Dynamic shared memory of the fused kernel for a page table `max_rank` wide, ring configuration `config` (an
// index into kFusedConfigs) and groups of `cols` rank columns (a multiple of 16, from max_rank rounded up to 16 to
// 256); 0: not supported.
template <typename T>
int segment_fused_smem_t(int max_rank, int config, int cols) {
  if (config < 0 || config >= kNumFusedConfigs) return 0;
  const segf::FusedLayout<T> L(max_rank, kFusedConfigs[config].stages, kFusedConfigs[config].ostages, cols);
  return L.supported() ? L.bytes : 0;
}

template <typename T, int C>
cudaError_t launch_segment_fused(const DenseParams& p, int bytes, cudaStream_t stream) {
  constexpr FusedConfig kC = kFusedConfigs[C];
  return launch_kernel_smem(segment_fused_kernel<T, kC.stages, kC.ostages>, dim3(p.num_tiles), dim3(segf::kThreads),
                            bytes, stream, p);
}

// mode 1: shrink into a zeroed y (`k_split` >= 1 CTAs per tile's K); mode 2: expand from y; mode 3: fused
// (shrink + expand, no y; `k_split` = the ring configuration, an index into kFusedConfigs).
template <typename T>
cudaError_t launch_dense_segment(const DenseParams& p, int mode, int k_split, cudaStream_t stream) {
  if (p.num_tiles <= 0 || p.num_slices <= 0) return cudaSuccess;
  if (p.max_rank <= 0) return mode >= 1 && mode <= 3 ? cudaSuccess : cudaErrorInvalidValue;  // rank 0: no work
  if (mode == 1) {
    const int r_tiles = (p.max_rank + seg::BR - 1) / seg::BR;
    dim3 grid(p.num_tiles, p.num_slices, r_tiles * max(k_split, 1));
    return launch_kernel_smem(segment_shrink_kernel<T>, grid, dim3(seg::kSegThreads), seg::ShrinkSmem<T>::kBytes,
                              stream, p, max(k_split, 1));
  } else if (mode == 2) {
    dim3 grid(p.num_tiles, p.num_slices, (p.max_n + seg::BN - 1) / seg::BN);
    return launch_kernel_smem(segment_expand_kernel<T>, grid, dim3(seg::kSegThreads), seg::ExpandSmem<T>::kBytes,
                              stream, p);
  } else if (mode == 3) {
    const int bytes = segment_fused_smem_t<T>(p.max_rank, k_split, p.seg_cols);
    if (bytes <= 0 || p.num_slices > segf::kMaxSlices) return cudaErrorInvalidValue;
    static_assert(kNumFusedConfigs == 3, "one launch per configuration");
    if (k_split == 0) return launch_segment_fused<T, 0>(p, bytes, stream);
    if (k_split == 1) return launch_segment_fused<T, 1>(p, bytes, stream);
    return launch_segment_fused<T, 2>(p, bytes, stream);
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
