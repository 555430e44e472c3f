// lorakern: the launcher of the grouping kernel (grouping.cuh; host entry in grouping.h).
#include "lorakern/grouping.cuh"

namespace lorakern {

int group_smem(int items) { return items < 1 || items > kGroupMaxItems ? 0 : grp::smem_bytes(grp::padded(items)); }

cudaError_t group(const GroupParams& p, cudaStream_t stream) {
  const int64_t items = static_cast<int64_t>(p.T) * p.topk;
  bool ok = p.T >= 1 && p.topk >= 1 && items <= kGroupMaxItems && p.n_rows >= 1 && p.n_rows <= items &&
            p.E >= 1 && p.num_slots >= 0 && static_cast<int64_t>(p.num_slots) * p.E <= grp::kSentinel &&
            p.num_blocks >= 1 && p.num_blocks <= kGroupMaxBlocks && p.slots && p.order &&
            (!p.seg_starts || (p.seg_keys && p.seg_counts && p.num_segments));
  for (int b = 0; ok && b < p.num_blocks; ++b) ok = p.block_m[b] >= 1 && p.tiles[b];
  if (!ok) return cudaErrorInvalidValue;
  return launch_kernel_smem(group_kernel, dim3(1), dim3(grp::kThreads), group_smem(static_cast<int>(items)), stream,
                            p);
}

}  // namespace lorakern
