// lorakern: dense gather kernels for __half (see dense_instantiate.cuh).
#include "dense_instantiate.cuh"
LORAKERN_DENSE_ENTRY(dense_gather_f16, __half)
LORAKERN_SEGMENT_ENTRY(dense_segment_f16, dense_segment_ctas_f16, dense_segment_fused_smem_f16, __half)
