// lorakern: the gather path of the dense LoRA ops (DESIGN.md §1, §5) as torch-free templates.
//
// One CTA per (work tile, slice) — or m_split * n_split CTAs when the tiles alone would leave SMs idle, each
// with a share of the tile's token passes and of the columns (the shrink is then repeated per column share; its
// A rows come from L2). A work tile is up to 16 sorted tokens of one adapter (the LoRAPlan's tile list:
// rows of (start, length, slot), length 0 = exit, so a fixed grid replays correctly in a CUDA graph with any mix).
// The CTA processes its tokens MT at a time:
//
//   shrink  (K -> r): warp w takes rank rows j = w, w + NW, ... < rank (the slot's REAL rank), reads the row of A
//           through the page table with 16-byte vector loads strided over K by the 32 lanes (several loads in
//           flight per lane), multiplies with the MT tokens' x, reduces across the warp: y[m][j] in fp32.
//   expand  (r -> N): every thread takes 16-byte column chunks of N, loops over the real rank reading B's rank
//           rows (B stored transposed: row j = column j of B), accumulates MT x V fp32 values, and adds them into
//           `out` once (read, add, round once, write).
//
// MODE: FUSED keeps the rank-r intermediate in shared memory (one launch, shrink + expand, all slices via
// gridDim.y); SHRINK writes it to `y` (float32 [S, T, max_rank]); EXPAND reads it from `y`. MOE is FUSED over
// (token, expert) pairs for add_lora_moe: a tile is pairs of one (adapter, expert) group (key = slot * E + e), the
// expert selects where the rank rows start, each pair has its own x row, out row and routing weight.
// Page-table entries at or beyond a slot's rank are never read.
#pragma once

#include "lorakern/common.cuh"
#include "lorakern/dense_dispatch.h"

// Tuning macros (compile time; the defaults are the measured configuration except GUARDED_SHRINK and DECODE_CTAS,
// session 8, untimed; bench/sweep_variants.sh times the others on a GPU by rebuilding with LORAKERN_NVCC_DEFINES):
//   LORAKERN_GATHER_X_SMEM        1: in the decode instantiation (fused, MT = 1) each pass's x row is staged in
//                                 shared memory (dynamic, K x 2 bytes up to 32 KB; registers capped for 3 CTAs per
//                                 SM) and the shrink reads x from there instead of L1/L2 (on the H100 the decode
//                                 kernel's L2 traffic nearly equals its DRAM traffic); 0 = off
//   LORAKERN_GATHER_PREFETCH      1: a CTA that expands first asks L2 for its B rows and its tokens' out rows
//                                 (prefetch.global.L2, one per 128-byte line of its columns) right after reading
//                                 the page table, so that the expand's loads and the out read-modify-write hit L2
//                                 while the shrink streams A (Nsight Compute, decode: 77 %
//                                 of warp time waits on global loads; this adds bytes in flight at no register
//                                 cost); 0 = off
//   LORAKERN_GATHER_GUARDED_SHRINK 1: the shrink's inner loop skips a pass's missing tokens with a branch, as up
//                                 to session 7 (which kept ptxas from issuing the unrolled steps' loads
//                                 together); 0 = no branch (their sums are computed from token 0's x row and
//                                 never stored)
//   LORAKERN_GATHER_DECODE_CTAS   CTAs per SM the decode instantiation's registers are capped for: 3 (<= 80
//                                 registers, 4 A loads in flight per lane) or 2 (110, 8 loads)
//   LORAKERN_GATHER_EARLY_OUT     1: at one token per pass (decode, MoE decode), the expand reads each column
//                                 chunk's out vector before its rank loop, so that the read's latency hides behind
//                                 the B loads instead of following them (one exposed DRAM round trip per chunk);
//                                 0 = off
// Timed on the H100 and removed: two column chunks per thread in the expand (10-15 % slower), two rank rows per
// warp sharing each x load in the shrink (decode 3 % slower, rank 128 2 % faster).
#ifndef LORAKERN_GATHER_X_SMEM
#define LORAKERN_GATHER_X_SMEM 0
#endif
#ifndef LORAKERN_GATHER_PREFETCH
#define LORAKERN_GATHER_PREFETCH 0
#endif
#ifndef LORAKERN_GATHER_GUARDED_SHRINK
#define LORAKERN_GATHER_GUARDED_SHRINK 0
#endif
#ifndef LORAKERN_GATHER_DECODE_CTAS
#define LORAKERN_GATHER_DECODE_CTAS 3
#endif
#ifndef LORAKERN_GATHER_EARLY_OUT
#define LORAKERN_GATHER_EARLY_OUT 0
#endif

namespace lorakern {

constexpr int kThreads = 256;   // 8 warps
constexpr int kWarps = kThreads / 32;

enum class Mode : int { kFused = 0, kShrink = 1, kExpand = 2, kMoe = 3 };

// DenseParams: see dense_dispatch.h

// Registers sized for 2 CTAs per SM (<= 128), except the decode instantiation (MT = 1, vectors, fused): capped for
// LORAKERN_GATHER_DECODE_CTAS = 3 CTAs per SM (<= 80 registers; always 3 with x staging), the occupancy it had when
// it was measured. Until session 8 it reached 80 registers by itself, because a branch in the shrink's inner loop
// kept ptxas from issuing more than one A load per warp at a time; without the branch it would take 110 registers
// (2 CTAs per SM) for 8 loads in flight per lane, and at the cap of 80 it keeps 4 (sm_90a SASS). The sweep times
// both (gather-2cta: 2 CTAs per SM). Sized for 4 CTAs (<= 64 registers), the old decode kernel was timed on an
// H100 (256 x 256 distinct, r = 16, qkv): 68.9 us against 68.3 us at 3, so that was dropped.
template <typename T, int MT, bool VEC, Mode MODE>
constexpr int gather_min_ctas(bool xs) {
  return xs ? 3 : (MT == 1 && VEC && MODE == Mode::kFused) ? LORAKERN_GATHER_DECODE_CTAS : 2;
}

template <typename T, int MT, bool VEC, Mode MODE, bool XS = false>
__global__ void __launch_bounds__(kThreads, (gather_min_ctas<T, MT, VEC, MODE>(XS)))
    dense_gather_kernel(const DenseParams p) {
  using V = Vec<T, VEC>;
  constexpr int W = V::N;
  static_assert(!XS || (MT == 1 && VEC && MODE == Mode::kFused), "x staging: the decode instantiation only");
  T* xs = nullptr;  // XS: the pass's x row in dynamic shared memory
  if constexpr (XS) {
    LORAKERN_DYNAMIC_SMEM(xs_raw);
    xs = reinterpret_cast<T*>(xs_raw);
  }
  __shared__ float y_s[MT][kMaxRank];
  __shared__ int32_t rows_s[kMaxRank];  // the slot's rank rows (page-table entries are int32)
  LORAKERN_SHARED_TRACK(y_s);
  LORAKERN_SHARED_TRACK(rows_s);

  constexpr bool kMoe = MODE == Mode::kMoe;
  constexpr bool kFusedLike = MODE == Mode::kFused || kMoe;
  constexpr bool kEarlyOut = LORAKERN_GATHER_EARLY_OUT && MT == 1;
  const int tile = blockIdx.x, sl = blockIdx.y;
  const int start = p.tiles[3 * tile], len = p.tiles[3 * tile + 1], key = p.tiles[3 * tile + 2];
  if (len <= 0 || key < 0) return;
  const int slot = kMoe ? key / p.E : key;
  const int64_t expert = kMoe ? key % p.E : 0;
  // 0 for a slot outside the page table; a rank above its width (only in a CUDA-graph replay: the host's value
  // checks cannot run there) computes at max_rank, never reading past the slot's page-table row
  const int rank = min(slot_rank(p, slot), kMaxRank);
  if (rank <= 0) return;

  // few tiles: this CTA's share of the tile's token passes and of the columns (DenseParams::m_split, n_split)
  const int zm = static_cast<int>(blockIdx.z) % p.m_split, zn = static_cast<int>(blockIdx.z) / p.m_split;
  if (zm * MT >= len) return;
  const int n_i = MODE == Mode::kShrink ? 0 : static_cast<int>(p.n_sizes[sl]);  // SHRINK has no N (no table)
  int n_lo = 0, n_hi = n_i;
  if (MODE != Mode::kShrink && p.n_split > 1) {
    const int chunk = ((n_i + p.n_split - 1) / p.n_split + W - 1) / W * W;  // a multiple of the vector width
    n_lo = zn * chunk;
    n_hi = min(n_i, n_lo + chunk);
    if (n_lo >= n_hi) return;
  }

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int j = tid; j < rank; j += kThreads)  // (j < rank only)
    rows_s[j] = static_cast<int32_t>(checked_row(p.page_table[slot * p.s_pt + j], p.num_rows));

  const T* A = reinterpret_cast<const T*>(p.a_ptrs[sl]) + (kMoe ? expert * p.a_e_strides[sl] : 0);
  const int64_t sa = p.a_strides[sl];
  const T* B = reinterpret_cast<const T*>(p.b_ptrs[sl]) + (kMoe ? expert * p.b_e_strides[sl] : 0);
  const int64_t sb = p.b_strides[sl];
  const int64_t off = p.offsets[sl];
  const float scale = p.scales ? p.scales[slot] : 1.0f;
  const T* X = reinterpret_cast<const T*>(p.x);
  T* O = reinterpret_cast<T*>(p.out);
  __syncthreads();
#if LORAKERN_GATHER_PREFETCH
  if constexpr (MODE != Mode::kShrink) {  // before the passes, where few registers are live
    // A span of w elements from a 16-byte-aligned start touches at most ceil(w / kLine) + 1 lines of 128 bytes:
    // prefetch c = 0 at the span's first element, c >= 1 at the c-th line boundary after it, clamped to the
    // span's last element (a repeated prefetch of the last line where the span touches fewer). Every address is
    // an element of the span.
    constexpr int kLine = 128 / int(sizeof(T));  // elements per 128-byte line
    const int w = n_hi - n_lo, lines = (w + kLine - 1) / kLine + 1;
    auto line_elem = [&](const T* first, int c) -> int {  // element offset of the c-th address in the span
      if (c == 0) return 0;
      const int lead = static_cast<int>((reinterpret_cast<uintptr_t>(first) & 127) / sizeof(T));
      return min(c * kLine - lead, w - 1);
    };
    for (int i = tid; i < rank * lines; i += kThreads) {
      const int j = i / lines, c = i - j * lines;
      const T* first = B + rows_s[j] * sb + n_lo;
      prefetch_l2(first + line_elem(first, c));
    }
    for (int i = tid; i < len * lines; i += kThreads) {  // the out rows of this CTA's passes' tokens
      const int m = i / lines, c = i - m * lines;
      if ((m / MT) % p.m_split != zm) continue;
      const int64_t t = p.token_ids[start + m];
      const int64_t row = kMoe ? (t / p.topk) * p.so_t + (t % p.topk) * p.so_p : t * p.so_t;
      const T* first = O + row + (off + n_lo) * p.so_n;
      prefetch_l2(first + static_cast<int64_t>(p.so_n == 1 ? line_elem(first, c) : min(c * kLine, w - 1)) * p.so_n);
    }
  }
#endif

  for (int m0 = zm * MT; m0 < len; m0 += MT * p.m_split) {
    const int mt = min(MT, len - m0);
    int64_t tok[MT];  // token (pair for MoE) ids
    int64_t xrow[MT], orow[MT];
    float wt[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      tok[m] = m < mt ? p.token_ids[start + m0 + m] : 0;
      if constexpr (kMoe) {
        const int64_t t = tok[m] / p.topk, k = tok[m] % p.topk;
        xrow[m] = t * p.sx_t + k * p.sx_p;
        orow[m] = t * p.so_t + k * p.so_p;
        wt[m] = scale * (p.topk_w && m < mt ? p.topk_w[t * p.sw_t + k * p.sw_k] : 1.0f);
      } else {
        xrow[m] = tok[m] * p.sx_t;
        orow[m] = tok[m] * p.so_t;
        wt[m] = scale;
      }
    }

    if constexpr (XS) {  // the previous pass's readers of xs are behind its closing barrier
      for (int k = tid * W; k < p.K; k += kThreads * W) {
        V v;
        load_vec(v, X + xrow[0] + k);
        store_vec(xs + k, v);
      }
      __syncthreads();
    }
    if constexpr (MODE != Mode::kExpand) {
      // ---- shrink: y[m][j] = x[tok_m] . A[row_j], warps over the real rank, lanes over K
      for (int j = warp; j < rank; j += kWarps) {
        const T* a = A + rows_s[j] * sa;
        float acc[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m] = 0.f;
        // No branch on m < mt in here: a pass's missing tokens (m >= mt, only in a tile's last pass) read token
        // 0's x row (tok[m] = 0 above; a valid row) and their sums are never stored. A branch per unrolled step
        // made each step its own basic block, so ptxas issued one A load per warp at a time (sm_90a SASS of the
        // decode kernel: load, convert, FMA, next load) instead of the unrolled steps' loads together.
        // LORAKERN_GATHER_GUARDED_SHRINK=1 restores the branch (for timing the two side by side).
#pragma unroll (MT == 1 ? 8 : 2)
        for (int k = lane * W; k < p.K; k += 32 * W) {
          V av;
          load_vec(av, a + k);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            if (LORAKERN_GATHER_GUARDED_SHRINK && m >= mt) continue;
            V xv;
            if constexpr (XS) {
              xv = *reinterpret_cast<const V*>(xs + k);
            } else {
              load_vec(xv, X + xrow[m] + k * p.sx_k);
            }
#pragma unroll
            for (int e = 0; e < W; ++e) acc[m] += Num<T>::to_f(xv.v[e]) * Num<T>::to_f(av.v[e]);
          }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float s = warp_sum(acc[m]);
          if (lane == 0) {
            if constexpr (kFusedLike) {
              y_s[m][j] = s;
            } else {
              if (m < mt) p.y[sl * p.sy_s + tok[m] * p.sy_t + j * p.sy_r] = s;
            }
          }
        }
      }
    } else {
#pragma unroll
      for (int m = 0; m < MT; ++m)  // unrolled over m: tok[] stays in registers
        for (int j = tid; j < rank; j += kThreads)
          y_s[m][j] = m < mt ? p.y[sl * p.sy_s + tok[m] * p.sy_t + j * p.sy_r] : 0.f;
    }

    if constexpr (MODE != Mode::kShrink) {
      __syncthreads();
      // ---- expand: out[tok_m, off + n] += scale * sum_j y[m][j] * B[row_j, n], threads over N chunks
      for (int n = n_lo + tid * W; n < n_hi; n += kThreads * W) {
        float acc[MT][W];
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int e = 0; e < W; ++e) acc[m][e] = 0.f;
        V ov_early;  // LORAKERN_GATHER_EARLY_OUT, MT = 1 (whose pass always has its token): out read up front
        if constexpr (kEarlyOut) load_vec_rw(ov_early, O + orow[0] + (off + n) * p.so_n);
#pragma unroll (MT == 1 ? 8 : 2)
        for (int j = 0; j < rank; ++j) {
          V bv;
          load_vec(bv, B + rows_s[j] * sb + n);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const float yv = y_s[m][j];
#pragma unroll
            for (int e = 0; e < W; ++e) acc[m][e] += yv * Num<T>::to_f(bv.v[e]);
          }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < mt) {
            T* o = O + orow[m] + (off + n) * p.so_n;
            V ov;
            if constexpr (kEarlyOut) {
              ov = ov_early;
            } else {
              load_vec_rw(ov, o);
            }
#pragma unroll
            for (int e = 0; e < W; ++e) ov.v[e] = Num<T>::from_f(Num<T>::to_f(ov.v[e]) + wt[m] * acc[m][e]);
            store_vec(o, ov);
          }
        }
      }
    }
    __syncthreads();  // y_s is rewritten by the next pass
  }
}

// Host launcher: raw pointers in, cudaError_t out.
template <typename T, int MT, bool VEC, Mode MODE>
cudaError_t launch_dense_gather(const DenseParams& p, cudaStream_t stream) {
  if (p.num_tiles <= 0 || p.num_slices <= 0) return cudaSuccess;
  if (p.m_split < 1 || p.n_split < 1 || (MODE == Mode::kShrink && p.n_split != 1)) return cudaErrorInvalidValue;
  if (p.max_rank < 0 || p.max_rank > kMaxRank) return cudaErrorInvalidValue;
  dim3 grid(static_cast<unsigned>(p.num_tiles), static_cast<unsigned>(p.num_slices),
            static_cast<unsigned>(p.m_split * p.n_split));
#if LORAKERN_GATHER_X_SMEM
  if constexpr (MT == 1 && VEC && MODE == Mode::kFused) {  // (the MoE one spills at 3 CTAs per SM)
    const int bytes = p.K * int(sizeof(T));
    if (bytes <= 32 * 1024)
      return launch_kernel_smem(dense_gather_kernel<T, MT, VEC, MODE, true>, grid, dim3(kThreads), bytes, stream, p);
  }
#endif
  return launch_kernel(dense_gather_kernel<T, MT, VEC, MODE>, grid, dim3(kThreads), stream, p);
}

}  // namespace lorakern
