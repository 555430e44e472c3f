// lorakern: host-side entry of the MoE pair-grouping kernel (moe_group.cuh), torch-free.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace lorakern {

// Pairs (T x topk) one launch can group: the sort runs in one CTA's shared memory (64 KB at this size). More
// pairs: the host groups them with torch ops (lorakern/moe_grouping.py), where the op's own kernel dominates.
constexpr int kMoeGroupMaxPairs = 4096;

// What lorakern.moe_grouping.group_pairs computes, in one launch: pair p = t * topk + k gets the key
// slot * E + e (0x7fffffff when the slot is -1 or outside [0, num_slots), or e outside [0, E)); pair_ids are the
// pairs stably sorted by key; tiles rows are (start, length, key) blocks of at most block_m sorted pairs of one
// key in key order, the sentinel key excepted, then rows (0, 0, 0) up to n_rows; count[0] = the tiles used. With
// ranks (num_ranks > 0) the rows are then stably reordered by descending work, rank x length, the unused rows
// last (lorakern.plan.order_tiles: a key's slot key / E, clamped to [0, num_ranks), its rank clamped to
// [0, 2^16]).
struct MoeGroupParams {
  const void* slots;       // [T] int32 or int64 (slots_i64), stride s_slots
  const void* ids;         // [T, topk] int32 or int64 (ids_i64), strides s_t, s_k
  const int32_t* ranks;    // [num_ranks] or nullptr
  int64_t s_slots, s_t, s_k;
  int slots_i64, ids_i64;
  int T, topk, E, num_slots, num_ranks, block_m, n_rows;
  int32_t* pair_ids;       // [T * topk]
  int32_t* tiles;          // [n_rows, 3]
  int32_t* count;          // [1]
};

// Shared memory (bytes) of one launch for `pairs` pairs; 0 when more than kMoeGroupMaxPairs.
int moe_group_smem(int pairs);
// cudaErrorInvalidValue for pairs outside [1, kMoeGroupMaxPairs], n_rows outside [1, pairs], block_m < 1, or
// num_slots * E at or above the sentinel key.
cudaError_t moe_group(const MoeGroupParams& p, cudaStream_t stream);

}  // namespace lorakern
