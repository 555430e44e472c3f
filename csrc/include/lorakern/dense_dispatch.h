// lorakern: host-side entry of the dense gather kernels, torch-free. Implemented per dtype in csrc/dense/*.cu.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace lorakern {

// Rank limit of the dense kernels (page-table width, max_rank), exported as lorakern._C.max_rank and declared by
// the Python backend: vLLM's largest max_lora_rank. The gather kernel sizes its shared rank arrays by it; the
// split segment kernels take any rank (rank tiles of 64); the fused one takes up to 256 (the host checks).
constexpr int kMaxRank = 512;

// The fused segment kernel's rings (dense_segment.cuh), as (K ring depth, out-chunk ring depth) configurations, in
// the host's order of preference: the first whose layout fits the device's shared memory at the widest group of
// slices (lorakern._C.segment_fused_configs, segment_fused_smem). Tuning macros (LORAKERN_NVCC_DEFINES):
//   LORAKERN_FUSED_DEEP_STAGES (6), LORAKERN_FUSED_STAGES (4), LORAKERN_FUSED_OSTAGES (3): the configurations are
//   (DEEP_STAGES, OSTAGES), (STAGES, OSTAGES), (STAGES, 2); DEEP_STAGES 0 (or <= STAGES) = no deep ring.
// One CTA per SM must keep enough x in flight by itself: a K ring d deep has d - 1 K steps (8 KB of x each) in
// flight, 40 KB at 6 against 24 KB at 4 (an H100 SM's share of the copy bandwidth times ~1.5 us of loaded latency
// is ~34 KB); the out ring has OSTAGES - 1 chunks (16 KB of out each) in flight. Not yet timed.
#ifndef LORAKERN_FUSED_STAGES
#define LORAKERN_FUSED_STAGES 4
#endif
#ifndef LORAKERN_FUSED_DEEP_STAGES
#define LORAKERN_FUSED_DEEP_STAGES 6
#endif
#ifndef LORAKERN_FUSED_OSTAGES
#define LORAKERN_FUSED_OSTAGES 3
#endif
struct FusedConfig {
  int stages, ostages;
};
constexpr int kNumFusedConfigs = 3;
constexpr FusedConfig kFusedConfigs[kNumFusedConfigs] = {
    {LORAKERN_FUSED_DEEP_STAGES > LORAKERN_FUSED_STAGES ? LORAKERN_FUSED_DEEP_STAGES : LORAKERN_FUSED_STAGES,
     LORAKERN_FUSED_OSTAGES},
    {LORAKERN_FUSED_STAGES, LORAKERN_FUSED_OSTAGES},
    {LORAKERN_FUSED_STAGES, 2}};
static_assert(LORAKERN_FUSED_STAGES >= 2 && LORAKERN_FUSED_OSTAGES >= 2, "fused rings");

struct DenseParams {
  const void* x;            // [T, K] (FUSED, SHRINK)
  int64_t sx_t, sx_k;
  const int64_t* a_ptrs;    // device table [S]: data pointer of each slice's lora_a [rows, K]
  const int64_t* a_strides; // [S] row stride (elements)
  const int64_t* b_ptrs;    // [S] lora_b [rows, N_i]
  const int64_t* b_strides; // [S]
  const int64_t* n_sizes;   // [S] N_i
  const int64_t* offsets;   // [S] column offset of slice i in out
  const int32_t* page_table;  // [num_slots, max_rank]
  int64_t s_pt;
  const int32_t* ranks;     // [num_slots]
  const float* scales;      // [num_slots] or nullptr (= 1.0)
  const int32_t* tiles;     // [num_tiles, 3] (start, length, slot)
  const int32_t* token_ids; // [T] tokens sorted by slot
  float* y;                 // [S, T, max_rank] (SHRINK writes, EXPAND reads)
  int64_t sy_s, sy_t, sy_r;
  void* out;                // [T, >= max(off_i + N_i)] (FUSED, EXPAND)
  int64_t so_t, so_n;
  int num_tiles, num_slices, K;
  int max_rank;             // page_table width
  int max_n;                // max_i N_i
  // Gather kernel, few tiles (grid z = m_split * n_split CTAs per (tile, slice)): CTA z runs the tile's token
  // passes z % m_split, z % m_split + m_split, ... and the column chunk z / m_split of n_split equal chunks
  // (multiples of the vector width). 1 and 1 = one CTA does the whole tile. SHRINK: n_split must be 1.
  int m_split;
  // MoE (add_lora_moe, gather kernel with MOE = true): tiles hold key = slot * E + expert, token_ids hold pair
  // ids p = t * topk + k; x row of a pair: t * sx_t + k * sx_p (sx_p = 0: x shared by the token's experts), out
  // row: t * so_t + k * so_p; expert e's rows start e * a_e_strides[i] (b_e_strides[i]) elements into slice i.
  int E, topk;
  int64_t sx_p, so_p;
  const int64_t* a_e_strides;  // [S]
  const int64_t* b_e_strides;  // [S]
  const float* topk_w;         // [T, topk] float32 or nullptr (= 1.0)
  int64_t sw_t, sw_k;
  int n_split;
  // Fused segment kernel (dense_segment mode 3): rank columns per group of slices (a multiple of 16, >= max_rank
  // rounded up to 16, <= 256), chosen by the host with its shared-memory layout (segment_fused_smem).
  int seg_cols;
  // Sizes of the slot and row spaces (page_table rows; lora_a / lora_b rows). Kernels never trust a slot or a
  // page-table entry beyond them: the host checks values, but not while a CUDA graph is captured, so a replay can
  // bring anything. A tile of a slot >= num_slots does nothing; an out-of-range row id reads row 0 instead
  // (a wrong result, never an out-of-bounds read).
  int num_slots, num_rows;
};

// A page-table entry as a row id the kernels may read: an out-of-range one (a replayed graph's) becomes row 0.
__host__ __device__ inline int64_t checked_row(int32_t r, int num_rows) { return r >= 0 && r < num_rows ? r : 0; }

// A slot's rank as every kernel computes with it: 0 (skip the tile) for a slot outside the page table or an empty
// row space, and never above the page table's width max_rank (a replayed graph's ranks are unchecked; above it the
// fused segment kernel would loop over empty slice groups forever).
__host__ __device__ inline int slot_rank(const DenseParams& p, int slot) {
  if (slot < 0 || slot >= p.num_slots || p.num_rows <= 0) return 0;
  const int r = p.ranks[slot];
  return r < p.max_rank ? r : p.max_rank;
}

enum class DType : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

// mode: 0 fused (shrink + expand), 1 shrink, 2 expand, 3 fused MoE (add_lora_moe); mt: tokens per pass (1 or 4;
// 1 only for the fused modes);
// vec: 16-byte vector loads (the caller checked alignment). Returns cudaErrorInvalidValue for a combination that
// was not instantiated.
cudaError_t dense_gather_f16(const DenseParams& p, int mode, int mt, bool vec,
                             cudaStream_t stream);
cudaError_t dense_gather_bf16(const DenseParams& p, int mode, int mt, bool vec,
                             cudaStream_t stream);
cudaError_t dense_gather_f32(const DenseParams& p, int mode, int mt, bool vec,
                             cudaStream_t stream);

// Tensor-core segment path (dense_segment.cuh), fp16 / bf16 only: mode 1 shrink (k_split >= 1), 2 expand, 3 fused
// (shrink + expand in one CTA per tile, no y; k_split = its ring configuration, an index into kFusedConfigs).
cudaError_t dense_segment_f16(const DenseParams& p, int mode, int k_split, cudaStream_t stream);
cudaError_t dense_segment_bf16(const DenseParams& p, int mode, int k_split, cudaStream_t stream);
// CTAs of the segment kernel of `mode` that fit on one SM of the current device (0: unknown).
int dense_segment_ctas_f16(int mode);
int dense_segment_ctas_bf16(int mode);
// Dynamic shared memory of the fused segment kernel (mode 3) for a page table max_rank wide, ring configuration
// `config` (0, 1, 2: an index into kFusedConfigs above, the host's order of preference) and groups of `cols` rank
// columns; 0 when that layout is not supported (no such configuration, cols outside [max_rank rounded up to 16,
// 256] or not a multiple of 16).
int dense_segment_fused_smem_f16(int max_rank, int config, int cols);
int dense_segment_fused_smem_bf16(int max_rank, int config, int cols);
inline int dense_segment_fused_smem(DType dt, int max_rank, int config, int cols) {
  return dt == DType::kF16    ? dense_segment_fused_smem_f16(max_rank, config, cols)
         : dt == DType::kBF16 ? dense_segment_fused_smem_bf16(max_rank, config, cols)
                              : 0;
}
inline int dense_segment_ctas_per_sm(DType dt, int mode) {
  return dt == DType::kF16 ? dense_segment_ctas_f16(mode) : dt == DType::kBF16 ? dense_segment_ctas_bf16(mode) : 0;
}

inline cudaError_t dense_segment(const DenseParams& p, DType dt, int mode, int k_split, cudaStream_t stream) {
  switch (dt) {
    case DType::kF16: return dense_segment_f16(p, mode, k_split, stream);
    case DType::kBF16: return dense_segment_bf16(p, mode, k_split, stream);
    default: return cudaErrorInvalidValue;
  }
}

inline cudaError_t dense_gather(const DenseParams& p, DType dt, int mode, int mt, bool vec,
                                cudaStream_t stream) {
  switch (dt) {
    case DType::kF16: return dense_gather_f16(p, mode, mt, vec, stream);
    case DType::kBF16: return dense_gather_bf16(p, mode, mt, vec, stream);
    case DType::kF32: return dense_gather_f32(p, mode, mt, vec, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lorakern
