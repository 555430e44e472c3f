// lorakern: the launcher of the MoE pair-grouping kernel (moe_group.cuh; host entry in moe_group.h).
#include "lorakern/moe_group.cuh"

namespace lorakern {

int moe_group_smem(int pairs) {
  return pairs < 1 || pairs > kMoeGroupMaxPairs ? 0 : moeg::smem_bytes(moeg::padded(pairs));
}

cudaError_t moe_group(const MoeGroupParams& p, cudaStream_t stream) {
  const int64_t pairs = static_cast<int64_t>(p.T) * p.topk;
  if (p.T < 1 || p.topk < 1 || pairs > kMoeGroupMaxPairs || p.n_rows < 1 || p.n_rows > pairs || p.block_m < 1 ||
      p.E < 1 || p.num_slots < 0 || static_cast<int64_t>(p.num_slots) * p.E >= moeg::kSentinel || !p.slots ||
      !p.ids || !p.pair_ids || !p.tiles || !p.count)
    return cudaErrorInvalidValue;
  return launch_kernel_smem(moe_group_kernel, dim3(1), dim3(moeg::kThreads),
                            moe_group_smem(static_cast<int>(pairs)), stream, p);
}

}  // namespace lorakern
