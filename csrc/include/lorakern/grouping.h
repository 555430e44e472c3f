// lorakern: host-side entry of the grouping kernel (grouping.cuh), torch-free: a LoRAPlan's fill and the MoE op's
// (token, expert) pair grouping, each in one launch.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace lorakern {

// Items (tokens of a plan, T x topk pairs of the MoE op) one launch can group: the sort runs in one CTA's shared
// memory (64 KB at this size). More: the host groups them with torch ops, where the ops' own kernels dominate.
constexpr int kGroupMaxItems = 4096;
constexpr int kGroupMaxBlocks = 2;  // work lists (block sizes) one launch writes

// Item p = t * topk + k gets the key slot * E + e: 0x7fffffff (last) when the slot is outside [0, num_slots) or e
// outside [0, E); slots and ids are taken as int32 first, as the torch code does (lorakern/plan.py,
// lorakern/moe_grouping.py). Outputs, bit for bit those of the torch code:
//   order[p]          the items stably sorted by key (a plan's token_ids, the MoE op's pair ids);
//   seg_starts etc.   (optional, a plan's) per segment of equal keys in key order: its first sorted position, its
//                     key (-1 for the 0x7fffffff segment), its size; entries past the segments: items, -1, 0;
//                     num_segments[0] the segments, the 0x7fffffff one included;
//   tiles[b]          [n_rows, 3] (start, length, key): blocks of at most block_m[b] sorted items of one key, the
//                     0x7fffffff key excepted, in key order, then rows (0, 0, empty_key); count[b][0] (optional)
//                     the rows used. With ranks (num_ranks > 0) each list is then stably reordered by descending
//                     work, the unused rows last (lorakern.plan.order_tiles): the rank of slot key / E (clamped
//                     to [0, num_ranks), the rank to [0, 2^16]), times the length with work_times_length.
struct GroupParams {
  const void* slots;  // [T] int32 or int64 (slots_i64), stride s_slots
  const void* ids;    // [T, topk] int32 or int64 (ids_i64), strides s_t, s_k; nullptr: expert 0 for every item
  const int32_t* ranks;  // [num_ranks] or nullptr
  int64_t s_slots, s_t, s_k;
  int slots_i64, ids_i64;
  int T, topk, E, num_slots, num_ranks;
  int work_times_length, empty_key, n_rows, num_blocks;
  int block_m[kGroupMaxBlocks];
  int32_t* order;                    // [T * topk]
  int32_t* seg_starts;               // [T * topk + 1] or nullptr (then seg_keys, seg_counts, num_segments too)
  int32_t* seg_keys;                 // [T * topk]
  int32_t* seg_counts;               // [T * topk]
  int32_t* num_segments;             // [1]
  int32_t* tiles[kGroupMaxBlocks];   // [n_rows, 3]
  int32_t* count[kGroupMaxBlocks];   // [1] or nullptr
  // (optional, a dynamic plan's statistics, one host read) [5 + num_blocks]: segments of keys below 0x7fffffff,
  // their items, the largest of their sizes (0 if none), the largest such key (-1 if none), the smallest slot
  // read, then each work list's rows used
  int32_t* stats;
};

// Shared memory (bytes) of one launch over `items` items; 0 outside [1, kGroupMaxItems].
int group_smem(int items);
// cudaErrorInvalidValue for items outside [1, kGroupMaxItems], n_rows outside [1, items], num_blocks outside
// [1, kGroupMaxBlocks], a block_m < 1, keys that could reach 0x7fffffff (num_slots * E above it), or a missing
// output pointer.
cudaError_t group(const GroupParams& p, cudaStream_t stream);

}  // namespace lorakern
