// lorakern: the instantiation matrix of the dense gather kernels for one dtype (included by dense_<dtype>.cu, one
// small translation unit per dtype so that a 2-core build compiles them in parallel).
//   gather  fused, MoE: MT in {1, 4} x VEC in {true, false};  shrink, expand: MT = 4 x VEC in {true, false};
//   segment (fp16 / bf16 only): shrink, expand, fused.
#pragma once

#include "lorakern/dense_dispatch.h"
#include "lorakern/dense_gather.cuh"
#include "lorakern/dense_segment.cuh"

namespace lorakern {

template <typename T>
cudaError_t dense_gather_t(const DenseParams& p, int mode, int mt, bool vec, cudaStream_t s) {
  if (mode == 0) {
    if (mt == 1) return vec ? launch_dense_gather<T, 1, true, Mode::kFused>(p, s)
                            : launch_dense_gather<T, 1, false, Mode::kFused>(p, s);
    if (mt == 4) return vec ? launch_dense_gather<T, 4, true, Mode::kFused>(p, s)
                            : launch_dense_gather<T, 4, false, Mode::kFused>(p, s);
  } else if (mode == 1 && mt == 4) {
    return vec ? launch_dense_gather<T, 4, true, Mode::kShrink>(p, s)
               : launch_dense_gather<T, 4, false, Mode::kShrink>(p, s);
  } else if (mode == 2 && mt == 4) {
    return vec ? launch_dense_gather<T, 4, true, Mode::kExpand>(p, s)
               : launch_dense_gather<T, 4, false, Mode::kExpand>(p, s);
  } else if (mode == 3) {
    if (mt == 1) return vec ? launch_dense_gather<T, 1, true, Mode::kMoe>(p, s)
                            : launch_dense_gather<T, 1, false, Mode::kMoe>(p, s);
    if (mt == 4) return vec ? launch_dense_gather<T, 4, true, Mode::kMoe>(p, s)
                            : launch_dense_gather<T, 4, false, Mode::kMoe>(p, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lorakern

#define LORAKERN_DENSE_ENTRY(NAME, T)                                                              \
  namespace lorakern {                                                                             \
  cudaError_t NAME(const DenseParams& p, int mode, int mt, bool vec, cudaStream_t s) {             \
    return dense_gather_t<T>(p, mode, mt, vec, s);                                                 \
  }                                                                                                \
  }

#define LORAKERN_SEGMENT_ENTRY(NAME, CTAS, SMEM, T)                                                \
  namespace lorakern {                                                                             \
  cudaError_t NAME(const DenseParams& p, int mode, int k_split, cudaStream_t s) {                   \
    return launch_dense_segment<T>(p, mode, k_split, s);                                           \
  }                                                                                                \
  int CTAS(int mode) { return segment_ctas_per_sm_t<T>(mode); }                                    \
  int SMEM(int max_rank, int config, int cols) {                                                   \
    return segment_fused_smem_t<T>(max_rank, config, cols);                                        \
  }                                                                                                \
  }
