// lorakern: dense gather kernels for __nv_bfloat16 (see dense_instantiate.cuh).
#include "dense_instantiate.cuh"
LORAKERN_DENSE_ENTRY(dense_gather_bf16, __nv_bfloat16)
LORAKERN_SEGMENT_ENTRY(dense_segment_bf16, dense_segment_ctas_bf16, dense_segment_fused_smem_bf16, __nv_bfloat16)
