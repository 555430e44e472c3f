// lorakern: group_kernel — a LoRAPlan's fill, or the MoE op's (token, expert) pair grouping, in ONE launch of
// one CTA.
//
// lorakern/plan.py (LoRAPlan._fill) and lorakern/moe_grouping.py (group_pairs) build the same outputs from torch
// ops: ~126 for a plan (148 with ranks), ~90 for a grouping (76 without ranks), most of them a kernel launch or
// more on a GPU (a stable sort is several). A plan is built once per batch, a grouping once per MoE layer and
// step (a layer's routing is its own); eagerly that is Python and launch overhead in the hundreds of
// microseconds, in a CUDA graph as many nodes. The outputs here are the same bit for bit
// (tests/test_grouping.py), so either serves every backend.
//
// One CTA of 256 threads, everything in shared memory (NP = the item count rounded up to a power of two, >= 256):
//   1. composite keys (key << 32 | item) of the items, NP - P padding entries of all ones;
//   2. a bitonic sort of the composites (the item index in the low bits makes it stable);
//   3. segment starts -> an exclusive scan -> each segment's start (and a plan's segment arrays);
//   4. per work list: each segment's tile count (0 for the 0x7fffffff key) -> an exclusive scan -> its first tile
//      row; every tile row finds its segment by binary search and is written (unused rows too);
//   5. with ranks, per work list: composites (INT32_MAX - work) << 32 | row of the rows just written (read back
//      from global memory: a block's own writes are visible to it after a barrier), a second bitonic sort, and
//      the rows gathered into registers, then written in their new order.
#pragma once

#include <cstdint>

#include "lorakern/common.cuh"
#include "lorakern/grouping.h"

namespace lorakern {
namespace grp {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxPerThread = kGroupMaxItems / kThreads;  // rows a thread moves in the reordering
constexpr int32_t kSentinel = 0x7fffffff;

__host__ __device__ inline int padded(int n) {
  int np = kThreads;
  while (np < n) np <<= 1;
  return np;
}

// Shared memory of a launch over np (padded) items: composites, one int32 work array, the segment starts (+1).
__host__ __device__ inline int smem_bytes(int np) {
  return np * int(sizeof(unsigned long long)) + np * int(sizeof(int32_t)) + (np + 1) * int(sizeof(int32_t));
}

// Ascending bitonic sort of a[0 .. np) (np a power of two, >= kThreads) by the whole CTA.
__device__ inline void bitonic_sort(unsigned long long* a, int np) {
  for (int k = 2; k <= np; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < np; i += kThreads) {
        const int ixj = i ^ j;
        if (ixj > i) {
          const unsigned long long u = a[i], v = a[ixj];
          if ((u > v) == ((i & k) == 0)) {
            a[i] = v;
            a[ixj] = u;
          }
        }
      }
      __syncthreads();
    }
  }
}

// In-place exclusive prefix sum of a[0 .. np) (np a multiple of kThreads) by the whole CTA; returns the total to
// every thread. Each thread scans its own contiguous np / kThreads entries; the thread totals are scanned by warp
// shuffles and the warps' totals through `warp_tot` (kWarps ints). Ends with a barrier.
__device__ inline int block_exclusive_scan(int32_t* a, int np, int32_t* warp_tot) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int per = np / kThreads, base = tid * per;
  int own = 0;
  for (int c = 0; c < per; ++c) own += a[base + c];
  int incl = own;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  int before = 0, total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? warp_tot[w] : 0;
    total += warp_tot[w];
  }
  int run = before + incl - own;
  for (int c = 0; c < per; ++c) {
    const int v = a[base + c];
    a[base + c] = run;
    run += v;
  }
  __syncthreads();  // the scanned array is complete, and warp_tot may be rewritten by the next scan
  return total;
}

// op over v of every thread of the CTA, returned to every thread (op: min or max); `warp_tot` as the scan's.
// Starts after and ends with a barrier.
template <typename Op>
__device__ inline int block_reduce(int v, int32_t* warp_tot, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) warp_tot[warp] = v;
  __syncthreads();
  int r = warp_tot[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, warp_tot[w]);
  __syncthreads();  // warp_tot may be rewritten
  return r;
}

__device__ inline int32_t key_of(unsigned long long c) { return static_cast<int32_t>(c >> 32); }
__device__ inline int32_t low_of(unsigned long long c) { return static_cast<int32_t>(c & 0xffffffffull); }

}  // namespace grp

// Reorders tiles [n_rows, 3] by descending work (see GroupParams), stably, the unused rows last; `comp` is np
// entries of shared memory. Called by the whole CTA; starts and ends with a barrier.
__device__ inline void order_rows(const GroupParams& p, int32_t* tiles, unsigned long long* comp, int np) {
  using namespace grp;
  const int tid = threadIdx.x;
  __syncthreads();  // every row is written, and comp is free
  for (int r = tid; r < np; r += kThreads) {
    unsigned long long c = ~0ull;
    if (r < p.n_rows) {
      const int32_t len = tiles[3 * r + 1], key = tiles[3 * r + 2];
      int slot = key / p.E;
      slot = slot < 0 ? 0 : slot >= p.num_ranks ? p.num_ranks - 1 : slot;
      int32_t rank = p.ranks[slot];
      rank = rank < 0 ? 0 : rank > (1 << 16) ? (1 << 16) : rank;
      const int64_t w = len > 0 ? (p.work_times_length ? static_cast<int64_t>(rank) * len : rank) : -1;
      c = (static_cast<unsigned long long>(0x7fffffffll - w) << 32) | static_cast<uint32_t>(r);
    }
    comp[r] = c;
  }
  __syncthreads();
  bitonic_sort(comp, np);
  int32_t row[kMaxPerThread][3];
#pragma unroll
  for (int j = 0; j < kMaxPerThread; ++j) {
    const int r = tid + j * kThreads;
    if (r < p.n_rows) {
      const int src = low_of(comp[r]);
#pragma unroll
      for (int f = 0; f < 3; ++f) row[j][f] = tiles[3 * src + f];
    }
  }
  __syncthreads();  // every source row is read before any is overwritten
#pragma unroll
  for (int j = 0; j < kMaxPerThread; ++j) {
    const int r = tid + j * kThreads;
    if (r < p.n_rows)
#pragma unroll
      for (int f = 0; f < 3; ++f) tiles[3 * r + f] = row[j][f];
  }
  __syncthreads();
}

__global__ void __launch_bounds__(grp::kThreads, 1) group_kernel(const GroupParams p) {
  using namespace grp;
  LORAKERN_DYNAMIC_SMEM(smem);
  __shared__ int32_t warp_tot[kWarps];
  LORAKERN_SHARED_TRACK(warp_tot);
  const int P = p.T * p.topk, np = padded(P), tid = threadIdx.x;
  unsigned long long* comp = reinterpret_cast<unsigned long long*>(smem);
  int32_t* work = reinterpret_cast<int32_t*>(smem + np * sizeof(unsigned long long));
  int32_t* seg = work + np;  // [np + 1]: each segment's first sorted position, then P

  // 1. composites. Slots and expert ids are taken as int32 first (as the torch code does).
  int32_t min_slot = 0x7fffffff;
  for (int i = tid; i < np; i += kThreads) {
    unsigned long long c = ~0ull;
    if (i < P) {
      const int t = i / p.topk, k = i % p.topk;
      const int32_t s = p.slots_i64 ? static_cast<int32_t>(static_cast<const int64_t*>(p.slots)[t * p.s_slots])
                                    : static_cast<const int32_t*>(p.slots)[t * p.s_slots];
      min_slot = min(min_slot, s);
      int32_t e = 0;
      if (p.ids) {
        const int64_t io = t * p.s_t + k * p.s_k;
        e = p.ids_i64 ? static_cast<int32_t>(static_cast<const int64_t*>(p.ids)[io])
                      : static_cast<const int32_t*>(p.ids)[io];
      }
      const bool live = s >= 0 && s < p.num_slots && e >= 0 && e < p.E;
      const int32_t key = live ? s * p.E + e : kSentinel;
      c = (static_cast<unsigned long long>(static_cast<uint32_t>(key)) << 32) | static_cast<uint32_t>(i);
    }
    comp[i] = c;
  }
  __syncthreads();

  // 2. stable sort by key
  bitonic_sort(comp, np);

  // 3. segments
  auto is_start = [&](int i) { return i < P && (i == 0 || key_of(comp[i]) != key_of(comp[i - 1])); };
  for (int i = tid; i < np; i += kThreads) {
    if (i < P) p.order[i] = low_of(comp[i]);
    work[i] = is_start(i) ? 1 : 0;
  }
  __syncthreads();
  const int nseg = block_exclusive_scan(work, np, warp_tot);  // work[i] = segment of start i
  for (int i = tid; i < P; i += kThreads)
    if (is_start(i)) seg[work[i]] = i;
  if (tid == 0) seg[nseg] = P;
  __syncthreads();
  if (p.seg_starts) {
    for (int s = tid; s <= P; s += kThreads) {
      p.seg_starts[s] = s <= nseg ? seg[s] : P;
      if (s < P) {
        const int32_t key = s < nseg ? key_of(comp[seg[s]]) : kSentinel;
        p.seg_keys[s] = key == kSentinel ? -1 : key;
        p.seg_counts[s] = s < nseg ? seg[s + 1] - seg[s] : 0;
      }
    }
    if (tid == 0) p.num_segments[0] = nseg;
  }
  if (p.stats) {  // (every thread takes part in the reductions)
    int largest = 0;
    for (int s = tid; s < nseg; s += kThreads)
      if (key_of(comp[seg[s]]) != kSentinel) largest = max(largest, seg[s + 1] - seg[s]);
    largest = block_reduce(largest, warp_tot, [](int a, int b) { return max(a, b); });
    min_slot = block_reduce(min_slot, warp_tot, [](int a, int b) { return min(a, b); });
    if (tid == 0) {
      const bool tail = key_of(comp[seg[nseg - 1]]) == kSentinel;  // the keys at or above it sort last
      const int live = nseg - (tail ? 1 : 0);
      p.stats[0] = live;
      p.stats[1] = tail ? seg[nseg - 1] : P;
      p.stats[2] = largest;
      p.stats[3] = live > 0 ? key_of(comp[seg[live - 1]]) : -1;
      p.stats[4] = min_slot;
    }
  }

  // 4. the work lists
  for (int b = 0; b < p.num_blocks; ++b) {
    const int bm = p.block_m[b];
    int32_t* tiles = p.tiles[b];
    __syncthreads();  // the previous list's rows no longer read `work`
    for (int s = tid; s < np; s += kThreads) {
      int n = 0;
      if (s < nseg && key_of(comp[seg[s]]) != kSentinel) n = (seg[s + 1] - seg[s] + bm - 1) / bm;
      work[s] = n;
    }
    __syncthreads();
    const int total = block_exclusive_scan(work, np, warp_tot);  // work[s] = first tile row of segment s
    for (int r = tid; r < p.n_rows; r += kThreads) {
      int32_t start = 0, len = 0, key = p.empty_key;
      if (r < total) {
        int lo = 0, hi = nseg - 1;  // the last segment whose first row is <= r (it has tiles: r < its end)
        while (lo < hi) {
          const int mid = (lo + hi + 1) >> 1;
          if (work[mid] <= r) lo = mid; else hi = mid - 1;
        }
        const int local = (r - work[lo]) * bm;
        start = seg[lo] + local;
        len = min(bm, seg[lo + 1] - seg[lo] - local);
        key = key_of(comp[seg[lo]]);
      }
      tiles[3 * r] = start;
      tiles[3 * r + 1] = len;
      tiles[3 * r + 2] = key;
    }
    if (tid == 0 && p.count[b]) p.count[b][0] = total;
    if (tid == 0 && p.stats) p.stats[5 + b] = total;
  }

  // 5. descending work, stable, unused rows last
  if (p.ranks == nullptr || p.num_ranks <= 0) return;
  for (int b = 0; b < p.num_blocks; ++b) order_rows(p, p.tiles[b], comp, np);
}

}  // namespace lorakern
