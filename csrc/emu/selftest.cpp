// lorakern: kernels that check the CPU emulator itself (tests/test_cuda_emulator.py builds this into a module).
// Each is a small CUDA kernel with a known right answer or a known defect the emulator must report.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "lorakern/common.cuh"
#include <mma.h>

namespace py = pybind11;
using lorakern::launch_kernel;

namespace {

// Neighbour exchange through shared memory; SYNC=false is a race the emulator's schedules must expose.
template <bool SYNC>
__global__ void neighbour(float* out) {
  __shared__ float s[64];
  LORAKERN_SHARED_TRACK(s);
  const int t = threadIdx.x;
  s[t] = float(t) + 100.f * blockIdx.x;
  if constexpr (SYNC) __syncthreads();
  out[blockIdx.x * 64 + t] = s[(t + 1) % 64];
}

__global__ void divergent_barrier(float*) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void early_exit_then_barrier(float* out) {
  __shared__ float s[256];
  LORAKERN_SHARED_TRACK(s);
  if (threadIdx.x >= 128) return;  // whole warps exit: allowed, they count as arrived
  s[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = s[127 - threadIdx.x];
}

__global__ void warp_sum(float* out) {
  out[threadIdx.x] = lorakern::warp_sum(float(threadIdx.x & 31) + 32.f * (threadIdx.x >> 5));
}

// An inclusive prefix sum over each warp by __shfl_up_sync (lanes below the offset keep their value).
__global__ void warp_prefix(float* out) {
  float v = float((threadIdx.x & 31) + 1) + 100.f * (threadIdx.x >> 5);
  for (int o = 1; o < 32; o <<= 1) {
    const float u = __shfl_up_sync(0xffffffffu, v, o);
    if (static_cast<int>(threadIdx.x & 31) >= o) v += u;
  }
  out[threadIdx.x] = v;
}

__global__ void shuffle_after_lanes_exit(float* out) {
  if ((threadIdx.x & 31) >= 16) return;
  out[threadIdx.x] = lorakern::warp_sum(1.f);
}

__global__ void shuffle_vs_barrier(float* out) {
  if ((threadIdx.x & 31) < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = lorakern::warp_sum(1.f);
  }
}

__global__ void misaligned_vector(float* out) {
  lorakern::Vec<float, true> v;
  lorakern::load_vec(v, out + 1);  // 4-byte aligned only
  out[0] = v.v[0];
}

// C[16x16] = A[16x16] @ B[16x16] through WMMA: A row-major, B col-major (as the segment shrink reads it).
__global__ void wmma_16(const __half* a, const __half* b_colmajor, float* c) {
  using namespace nvcuda;
  __shared__ __align__(128) __half as[16 * 16];
  __shared__ __align__(128) __half bs[16 * 16];
  __shared__ __align__(128) float cs[16 * 16];
  LORAKERN_SHARED_TRACK(as);
  LORAKERN_SHARED_TRACK(bs);
  for (int i = threadIdx.x; i < 256; i += 32) { as[i] = a[i]; bs[i] = b_colmajor[i]; }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 1.f);
  wmma::load_matrix_sync(fa, as, 16);
  wmma::load_matrix_sync(fb, bs, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(cs, fc, 16, wmma::mem_row_major);
  __syncwarp();
  for (int i = threadIdx.x; i < 256; i += 32) c[i] = cs[i];
}

// D[16x16] = A[16x16] @ B[16x16] + 1 through ldmatrix (.x4; B [k][n] through .trans) and two mma.sync m16n8k16
// (bf16), stored by the PTX accumulator layout: lane (g, q) holds rows g, g + 8, columns 2q, 2q + 1 of each n8 tile.
__global__ void mma_16(const __nv_bfloat16* a, const __nv_bfloat16* b_kn, float* d) {
  __shared__ __align__(128) __nv_bfloat16 as[16 * 16];
  __shared__ __align__(128) __nv_bfloat16 bs[16 * 16];
  LORAKERN_SHARED_TRACK(as);
  LORAKERN_SHARED_TRACK(bs);
  for (int i = threadIdx.x; i < 256; i += 32) { as[i] = a[i]; bs[i] = b_kn[i]; }
  __syncwarp();
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  uint32_t fa[4], fb[4];
  lorakern::ldmatrix_x4(fa, &as[(lane & 15) * 16 + (lane >> 4) * 8], false);
  lorakern::ldmatrix_x4(fb, &bs[(lane & 15) * 16 + (lane >> 4) * 8], true);
  for (int t = 0; t < 2; ++t) {
    float c[4] = {1.f, 1.f, 1.f, 1.f};
    const uint32_t bb[2] = {fb[2 * t], fb[2 * t + 1]};
    lorakern::mma_16816<__nv_bfloat16>(c, fa, bb, c);
    for (int h = 0; h < 2; ++h)
      for (int e = 0; e < 2; ++e) d[(g + 8 * h) * 16 + t * 8 + 2 * q + e] = c[2 * h + e];
  }
}

// cp.async of 16 bytes into shared memory, read back with (WAIT) or without the wait: the emulator must show the
// poison in the second case.
template <bool WAIT>
__global__ void cp_async_read(const float* src, float* out) {
  __shared__ __align__(16) float s[4];
  LORAKERN_SHARED_TRACK(s);
  lorakern::cp_async16(s, src, true);
  lorakern::cp_async_commit();
  if constexpr (WAIT) lorakern::cp_async_wait<0>();
  for (int i = 0; i < 4; ++i) out[i] = s[i];
}

py::tuple result(cudaError_t e, const std::vector<float>& v) {
  return py::make_tuple(e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e)), v);
}

py::tuple run(const std::string& name, int order, int seed) {
  lk_emu::set_schedule(order, seed);
  std::vector<float> out(256, 0.f);
  cudaError_t e = cudaSuccess;
  if (name == "race") e = launch_kernel(neighbour<false>, dim3(2), dim3(64), nullptr, out.data());
  else if (name == "no_race") e = launch_kernel(neighbour<true>, dim3(2), dim3(64), nullptr, out.data());
  else if (name == "divergent_barrier") e = launch_kernel(divergent_barrier, dim3(1), dim3(64), nullptr, out.data());
  else if (name == "early_exit_then_barrier")
    e = launch_kernel(early_exit_then_barrier, dim3(1), dim3(256), nullptr, out.data());
  else if (name == "warp_sum") e = launch_kernel(warp_sum, dim3(1), dim3(64), nullptr, out.data());
  else if (name == "warp_prefix") e = launch_kernel(warp_prefix, dim3(1), dim3(64), nullptr, out.data());
  else if (name == "shuffle_after_lanes_exit")
    e = launch_kernel(shuffle_after_lanes_exit, dim3(1), dim3(32), nullptr, out.data());
  else if (name == "shuffle_vs_barrier") e = launch_kernel(shuffle_vs_barrier, dim3(1), dim3(32), nullptr, out.data());
  else if (name == "misaligned_vector") e = launch_kernel(misaligned_vector, dim3(1), dim3(1), nullptr, out.data());
  else if (name == "cp_async_waited" || name == "cp_async_unwaited") {
    alignas(16) static const float src[4] = {1.f, 2.f, 3.f, 4.f};
    e = name == "cp_async_waited" ? launch_kernel(cp_async_read<true>, dim3(1), dim3(1), nullptr, src, out.data())
                                  : launch_kernel(cp_async_read<false>, dim3(1), dim3(1), nullptr, src, out.data());
  }
  else throw std::invalid_argument("unknown self-test kernel " + name);
  lk_emu::set_schedule(2, 0);
  return result(e, out);
}

py::tuple wmma_product(const std::vector<float>& a, const std::vector<float>& b_colmajor) {
  std::vector<__half> ah(256), bh(256);
  for (int i = 0; i < 256; ++i) { ah[i] = __float2half_rn(a.at(i)); bh[i] = __float2half_rn(b_colmajor.at(i)); }
  std::vector<float> c(256);
  const cudaError_t e = launch_kernel(wmma_16, dim3(1), dim3(32), nullptr,
                                      static_cast<const __half*>(ah.data()), static_cast<const __half*>(bh.data()),
                                      c.data());
  return result(e, c);
}

py::tuple mma_product(const std::vector<float>& a, const std::vector<float>& b_kn) {
  std::vector<__nv_bfloat16> ah(256), bh(256);
  for (int i = 0; i < 256; ++i) { ah[i] = __float2bfloat16_rn(a.at(i)); bh[i] = __float2bfloat16_rn(b_kn.at(i)); }
  std::vector<float> d(256);
  const cudaError_t e = launch_kernel(mma_16, dim3(1), dim3(32), nullptr, static_cast<const __nv_bfloat16*>(ah.data()),
                                      static_cast<const __nv_bfloat16*>(bh.data()), d.data());
  return result(e, d);
}

__global__ void read_past_end(const float* p, int n, float* out) { out[0] = p[n]; }

// Reads one element past a heap buffer of n floats: under the memcheck (ASan) build this must be reported.
float out_of_bounds(int n) {
  std::unique_ptr<float[]> buf(new float[n]());
  float out = 0.f;
  launch_kernel(read_past_end, dim3(1), dim3(1), nullptr, static_cast<const float*>(buf.get()), n, &out);
  return out;
}

}  // namespace

PYBIND11_MODULE(emu_selftest, m) {
  m.def("run", &run, py::arg("name"), py::arg("order") = 2, py::arg("seed") = 0);
  m.def("wmma", &wmma_product);
  m.def("mma", &mma_product);
  m.def("out_of_bounds", &out_of_bounds);
}
