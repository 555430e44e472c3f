// lorakern._C: the Python binding of the CUDA backend. Torch-free (pybind11 + raw pointers + a stream handle), so
// it builds against any torch, including a CPU-only one, and imports on a machine without a GPU. Only exports:
// the checks and the dispatch live in lorakern/cuda_backend.py and csrc/include/lorakern/.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "lorakern/dense_dispatch.h"
#include "lorakern/grouping.h"

namespace py = pybind11;

#ifndef LORAKERN_ARCHS
#define LORAKERN_ARCHS "unknown"
#endif
// The same binding is compiled for the CPU emulation of the kernels (csrc/emu/, module lorakern._C_emu).
#ifdef LORAKERN_EMU
#define LORAKERN_MODULE _C_emu
#else
#define LORAKERN_MODULE _C
#endif

namespace {

template <typename P>
P ptr(int64_t v) { return reinterpret_cast<P>(static_cast<uintptr_t>(v)); }

// Field order of `a` (all int64), documented in lorakern/cuda_backend.py (_DENSE_FIELDS).
constexpr size_t kFields = 41;

lorakern::DenseParams unpack(const std::vector<int64_t>& a) {
  if (a.size() != kFields) throw std::invalid_argument("expected " + std::to_string(kFields) + " fields");
  lorakern::DenseParams p{};
  size_t i = 0;
  p.x = ptr<const void*>(a[i++]);
  p.sx_t = a[i++]; p.sx_k = a[i++];
  p.a_ptrs = ptr<const int64_t*>(a[i++]); p.a_strides = ptr<const int64_t*>(a[i++]);
  p.b_ptrs = ptr<const int64_t*>(a[i++]); p.b_strides = ptr<const int64_t*>(a[i++]);
  p.n_sizes = ptr<const int64_t*>(a[i++]); p.offsets = ptr<const int64_t*>(a[i++]);
  p.page_table = ptr<const int32_t*>(a[i++]); p.s_pt = a[i++];
  p.ranks = ptr<const int32_t*>(a[i++]);
  p.scales = ptr<const float*>(a[i++]);
  p.tiles = ptr<const int32_t*>(a[i++]);
  p.token_ids = ptr<const int32_t*>(a[i++]);
  p.y = ptr<float*>(a[i++]);
  p.sy_s = a[i++]; p.sy_t = a[i++]; p.sy_r = a[i++];
  p.out = ptr<void*>(a[i++]);
  p.so_t = a[i++]; p.so_n = a[i++];
  p.num_tiles = static_cast<int>(a[i++]);
  p.num_slices = static_cast<int>(a[i++]);
  p.K = static_cast<int>(a[i++]);
  p.max_rank = static_cast<int>(a[i++]);
  p.max_n = static_cast<int>(a[i++]);
  p.m_split = static_cast<int>(a[i++]);
  p.E = static_cast<int>(a[i++]);
  p.topk = static_cast<int>(a[i++]);
  p.sx_p = a[i++]; p.so_p = a[i++];
  p.a_e_strides = ptr<const int64_t*>(a[i++]); p.b_e_strides = ptr<const int64_t*>(a[i++]);
  p.topk_w = ptr<const float*>(a[i++]);
  p.sw_t = a[i++]; p.sw_k = a[i++];
  p.n_split = static_cast<int>(a[i++]);
  p.seg_cols = static_cast<int>(a[i++]);
  p.num_slots = static_cast<int>(a[i++]);
  p.num_rows = static_cast<int>(a[i++]);
  if (p.E < 1 || p.topk < 1) throw std::invalid_argument("E and topk must be >= 1");
  if (p.m_split < 1 || p.n_split < 1) throw std::invalid_argument("m_split and n_split must be >= 1");
  return p;
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("lorakern ") + what + ": " + cudaGetErrorString(err));
}

void dense_gather(const std::vector<int64_t>& a, int dtype, int mode, int mt, bool vec, int64_t stream) {
  check(lorakern::dense_gather(unpack(a), static_cast<lorakern::DType>(dtype), mode, mt, vec,
                               ptr<cudaStream_t>(stream)), "dense_gather");
}

void dense_segment(const std::vector<int64_t>& a, int dtype, int mode, int k_split, int64_t stream) {
  check(lorakern::dense_segment(unpack(a), static_cast<lorakern::DType>(dtype), mode, k_split,
                                ptr<cudaStream_t>(stream)), "dense_segment");
}

// Field order of `a` (all int64): lorakern/grouping.py (GROUP_FIELDS).
constexpr size_t kGroupFields = 29;

void group(const std::vector<int64_t>& a, int64_t stream) {
  if (a.size() != kGroupFields) throw std::invalid_argument("expected " + std::to_string(kGroupFields) + " fields");
  lorakern::GroupParams p{};
  size_t i = 0;
  p.slots = ptr<const void*>(a[i++]); p.s_slots = a[i++]; p.slots_i64 = static_cast<int>(a[i++]);
  p.ids = ptr<const void*>(a[i++]); p.s_t = a[i++]; p.s_k = a[i++]; p.ids_i64 = static_cast<int>(a[i++]);
  p.ranks = ptr<const int32_t*>(a[i++]); p.num_ranks = static_cast<int>(a[i++]);
  p.T = static_cast<int>(a[i++]); p.topk = static_cast<int>(a[i++]); p.E = static_cast<int>(a[i++]);
  p.num_slots = static_cast<int>(a[i++]); p.work_times_length = static_cast<int>(a[i++]);
  p.empty_key = static_cast<int>(a[i++]); p.n_rows = static_cast<int>(a[i++]);
  p.num_blocks = static_cast<int>(a[i++]);
  for (int b = 0; b < lorakern::kGroupMaxBlocks; ++b) p.block_m[b] = static_cast<int>(a[i++]);
  p.order = ptr<int32_t*>(a[i++]);
  p.seg_starts = ptr<int32_t*>(a[i++]); p.seg_keys = ptr<int32_t*>(a[i++]); p.seg_counts = ptr<int32_t*>(a[i++]);
  p.num_segments = ptr<int32_t*>(a[i++]);
  for (int b = 0; b < lorakern::kGroupMaxBlocks; ++b) p.tiles[b] = ptr<int32_t*>(a[i++]);
  for (int b = 0; b < lorakern::kGroupMaxBlocks; ++b) p.count[b] = ptr<int32_t*>(a[i++]);
  p.stats = ptr<int32_t*>(a[i++]);
  check(lorakern::group(p, ptr<cudaStream_t>(stream)), "group");
}

}  // namespace

PYBIND11_MODULE(LORAKERN_MODULE, m) {
#ifdef LORAKERN_EMU
  m.doc() = "lorakern CUDA kernels compiled for the CPU emulator (csrc/emu): same sources, host pointers, for tests";
  m.def("set_schedule", &lk_emu::set_schedule, py::arg("order"), py::arg("seed") = 0,
        "order in which a block's threads run between barriers: 0 forward, 1 reverse, 2 random(seed)");
  m.attr("emulated") = true;
#else
  m.doc() = "lorakern CUDA kernels (torch-free binding: raw pointers and a stream handle)";
  m.attr("emulated") = false;
#endif
  m.def("dense_gather", &dense_gather, py::arg("fields"), py::arg("dtype"), py::arg("mode"), py::arg("mt"),
        py::arg("vec"), py::arg("stream"));
  m.def("dense_segment", &dense_segment, py::arg("fields"), py::arg("dtype"), py::arg("mode"), py::arg("k_split"),
        py::arg("stream"));
  m.def("segment_ctas_per_sm", [](int dtype, int mode) {
        return lorakern::dense_segment_ctas_per_sm(static_cast<lorakern::DType>(dtype), mode);
      }, py::arg("dtype"), py::arg("mode"),
        "CTAs of the segment kernel (mode 1 shrink, 2 expand) that fit on one SM of the current device; 0: unknown");
  m.def("segment_fused_smem", [](int dtype, int max_rank, int config, int cols) {
        return lorakern::dense_segment_fused_smem(static_cast<lorakern::DType>(dtype), max_rank, config, cols);
      }, py::arg("dtype"), py::arg("max_rank"), py::arg("config"), py::arg("cols"),
        "dynamic shared memory (bytes) of the fused segment kernel (mode 3) at a ring configuration (an index into "
        "segment_fused_configs) and rank columns per group of slices; 0: not supported");
  m.def("segment_fused_configs", []() {
        std::vector<std::pair<int, int>> v;
        for (const auto& c : lorakern::kFusedConfigs) v.emplace_back(c.stages, c.ostages);
        return v;
      }, "the fused segment kernel's ring configurations, (K ring depth, out-chunk ring depth), in the host's order "
         "of preference (the first whose layout fits the device)");
  m.def("max_smem_per_block", []() {
#ifdef LORAKERN_EMU
        return 227 * 1024;  // the emulator's limit (an H100's)
#else
        int dev = 0, v = 0;
        if (cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
          (void)cudaGetLastError();
          return 0;
        }
        return v;
#endif
      }, "the current device's opt-in shared memory per block (bytes; 0: unknown)");
  m.def("group", &group, py::arg("fields"), py::arg("stream"),
        "a LoRAPlan's fill or the MoE op's pair grouping in one launch (lorakern/grouping.py)");
  m.attr("group_max_items") = lorakern::kGroupMaxItems;
  m.def("supports_dense_ops", []() { return true; });
  m.def("archs", []() { return std::string(LORAKERN_ARCHS); });
  m.attr("max_rank") = lorakern::kMaxRank;
  m.attr("num_fields") = kFields;
}
