// lorakern: dense gather kernels for float (see dense_instantiate.cuh).
#include "dense_instantiate.cuh"
LORAKERN_DENSE_ENTRY(dense_gather_f32, float)
