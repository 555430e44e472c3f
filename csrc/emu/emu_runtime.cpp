// lorakern: the runtime of the CPU emulation of CUDA (see cuda_emu.h): fibers, barriers, warp rendezvous, errors.
//
// A launch runs its blocks one after another. A block's threads are fibers on the calling OS thread. Warps advance
// independently (run_block): the scheduler picks a warp (forward, reverse or seeded-random order), runs its lanes
// until each reaches a barrier, a warp rendezvous or its end, lets the warp go on past a rendezvous all its lanes
// reached, and releases __syncthreads once every thread is there. Anything else (threads of a block waiting at
// different __syncthreads, a warp collective some lanes skip or exited from) is reported as an error, never a hang. Fiber switches are a few instructions on x86-64 (a hand-written switch saving the callee-
// saved registers and the FP control words) and ucontext elsewhere.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cuda_emu.h"

// The fiber switch: hand-written on x86-64 (no system call), ucontext elsewhere (or with -DLK_EMU_UCONTEXT).
#if defined(__x86_64__) && !defined(LK_EMU_UCONTEXT)
#define LK_EMU_ASM_SWITCH 1
#else
#define LK_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

// Under AddressSanitizer (the emulator's memcheck build, tests/test_cuda_emulator.py) every stack switch is
// announced, so ASan knows which stack is live and reports out-of-bounds accesses of the kernels, not of fibers.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define LK_ASAN 1
#else
#define LK_ASAN 0
#endif

namespace lk_emu {

uint3 g_thread_idx, g_block_idx;
dim3 g_block_dim, g_grid_dim;

namespace {

enum State { kReady, kAtBlock, kAtWarp, kDone };

constexpr size_t kStackBytes = 256 * 1024;

// A suspended context: the saved stack pointer (x86-64 switch) or a ucontext.
struct Ctx {
#if LK_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

struct Fiber {
  // its stack: allocated once, left uninitialised (pages are touched only as deep as a kernel goes)
  struct Stack {
    std::unique_ptr<char[]> mem;
    char* data() const { return mem.get(); }
    size_t size() const { return mem ? kStackBytes : 0; }
    bool empty() const { return !mem; }
  } stack;
  State state = kDone;
  int line = 0;  // the __syncthreads it waits at
  Ctx ctx;
  void* asan_fake = nullptr;
};

struct Launch {
  std::vector<Fiber> fibers;
  int current = -1;
  const std::function<void()>* body = nullptr;
  bool failed = false;
  std::string error;
  std::vector<uint64_t> slots;  // warp exchange slots, 32 per warp
  std::vector<float> scratch;   // 512 words per warp (WMMA results, mma.sync operands)
  Ctx sched;
  void* asan_fake = nullptr;             // the scheduler's
  const void* sched_bottom = nullptr;    // the scheduler's stack, learned by the first fiber switched to
  size_t sched_size = 0;
};

Launch g;
std::string g_last_error;
cudaError_t g_last_code = cudaSuccess;
std::vector<std::pair<void*, size_t>> g_shared;  // every __shared__ array seen, poisoned before each block
std::vector<unsigned char> g_dyn;                // dynamic shared memory of the current launch (+128 to align)
size_t g_dyn_bytes = 0;
unsigned char* g_dyn_base = nullptr;
struct PendingCopy {  // one cp.async not yet retired by its thread's wait_group
  unsigned char* dst;
  unsigned char data[16];
  int group;
};
std::vector<std::vector<PendingCopy>> g_cp;  // per thread of the block
std::vector<int> g_cp_open;                   // per thread: id of the group still open (= groups committed)
int g_order = 2;  // 0 forward, 1 reverse, 2 random (default: seeded, so every run is reproducible)
uint64_t g_seed = 0;

#if LK_EMU_ASM_SWITCH
// void lk_emu_switch(void** save_sp, void* load_sp): saves the callee-saved state on the current stack, stores
// the stack pointer in *save_sp, loads load_sp and restores the state saved there.
extern "C" void lk_emu_switch(void** save_sp, void* load_sp);
extern "C" void lk_emu_trampoline();
asm(R"(
.text
.p2align 4
.globl lk_emu_switch
.hidden lk_emu_switch
.type lk_emu_switch,@function
lk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size lk_emu_switch,.-lk_emu_switch

.p2align 4
.globl lk_emu_trampoline
.hidden lk_emu_trampoline
.type lk_emu_trampoline,@function
lk_emu_trampoline:
  call lk_emu_fiber_main
  ud2
.size lk_emu_trampoline,.-lk_emu_trampoline
)");
#endif

// Suspend into `save` and resume `load` (whose stack is [bottom, bottom + size) for ASan; `fake_save` null when
// the suspended stack is dead); after coming back, tell ASan with `*fake_restore`.
void swap(Ctx& save, Ctx& load, void** fake_save, const void* bottom, size_t size, void** fake_restore) {
#if LK_ASAN
  __sanitizer_start_switch_fiber(fake_save, bottom, size);
#else
  (void)fake_save, (void)bottom, (void)size, (void)fake_restore;
#endif
#if LK_EMU_ASM_SWITCH
  lk_emu_switch(&save.sp, load.sp);
#else
  swapcontext(&save.uc, &load.uc);
#endif
#if LK_ASAN
  __sanitizer_finish_switch_fiber(*fake_restore, nullptr, nullptr);
#endif
}

void to_scheduler() {
  Fiber& f = g.fibers[g.current];
  swap(f.ctx, g.sched, f.state == kDone ? nullptr : &f.asan_fake, g.sched_bottom, g.sched_size, &f.asan_fake);
}

void to_fiber(int i) {
  g.current = i;
  const unsigned bx = g_block_dim.x, by = g_block_dim.y;
  g_thread_idx = make_uint3(i % bx, (i / bx) % by, i / (bx * by));
  Fiber& f = g.fibers[i];
  swap(g.sched, f.ctx, &g.asan_fake, f.stack.data(), f.stack.size(), &g.asan_fake);
}

}  // namespace

extern "C" __attribute__((used)) void lk_emu_fiber_main() {
  Fiber& f = g.fibers[g.current];
#if LK_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g.sched_bottom, &g.sched_size);
#endif
  try {
    (*g.body)();
  } catch (const std::exception& e) {  // never unwind across a fiber boundary
    if (!g.failed) { g.failed = true; g.error = std::string("exception in a kernel: ") + e.what(); }
  }
  f.state = kDone;
  to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

namespace {

#if !LK_EMU_ASM_SWITCH
void fiber_entry_uc() { lk_emu_fiber_main(); }
#endif

void start_fiber(Fiber& f) {
  if (f.stack.empty()) f.stack.mem.reset(new char[kStackBytes]);
#if LK_ASAN
  ASAN_UNPOISON_MEMORY_REGION(f.stack.data(), f.stack.size());  // frames of an abandoned run may be left poisoned
#endif
  f.state = kReady;
  f.line = 0;
#if LK_EMU_ASM_SWITCH
  // Initial frame read by lk_emu_switch: [mxcsr|fpucw][r15 r14 r13 r12 rbx rbp][ret = trampoline][pad]; the
  // trampoline's call then runs with a 16-byte aligned stack.
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size()) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 80);
  std::memset(sp, 0, 80);
  const uint32_t mxcsr = 0x1F80, fpucw = 0x037F;
  std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, 2);
  sp[7] = reinterpret_cast<uint64_t>(&lk_emu_trampoline);
  f.ctx.sp = sp;
#else
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = f.stack.data();
  f.ctx.uc.uc_stack.ss_size = f.stack.size();
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, fiber_entry_uc, 0);
#endif
}

std::string where() {
  const auto t = g_thread_idx, b = g_block_idx;
  return " (block " + std::to_string(b.x) + "," + std::to_string(b.y) + "," + std::to_string(b.z) + " thread " +
         std::to_string(t.x) + "," + std::to_string(t.y) + "," + std::to_string(t.z) + ")";
}

// Warp w's lanes [lo, hi): release its warp rendezvous if every lane reached it. Returns 1 released, 0 nothing to
// release, -1 error (a rendezvous some lanes exited from).
int release_warp(int w, int n) {
  const int lo = 32 * w, hi = std::min(n, lo + 32);
  int at_warp = 0, done = 0;
  for (int i = lo; i < hi; ++i) {
    at_warp += g.fibers[i].state == kAtWarp;
    done += g.fibers[i].state == kDone;
  }
  if (at_warp == 0) return 0;
  if (at_warp == hi - lo) {
    for (int i = lo; i < hi; ++i) g.fibers[i].state = kReady;
    return 1;
  }
  if (at_warp + done == hi - lo) {
    g.failed = true;
    g.error = "warp collective in warp " + std::to_string(w) + " after some of its lanes exited";
    return -1;
  }
  return 0;
}

// Every thread is blocked: release the block barrier, or record why the block is stuck. False when stuck.
bool release_block(int n) {
  int at_block = 0, done = 0, line = -1;
  for (int i = 0; i < n; ++i) {
    const Fiber& f = g.fibers[i];
    if (f.state == kAtBlock) {
      if (line >= 0 && f.line != line) {
        g.failed = true;
        g.error = "divergent __syncthreads: threads wait at lines " + std::to_string(line) + " and " +
                  std::to_string(f.line);
        return false;
      }
      line = f.line;
      ++at_block;
    }
    done += f.state == kDone;
  }
  if (at_block > 0 && at_block + done == n) {
    for (int i = 0; i < n; ++i)
      if (g.fibers[i].state == kAtBlock) g.fibers[i].state = kReady;
    return true;
  }
  g.failed = true;
  g.error = "deadlock: a warp collective that some lanes of the warp never reach (they wait at __syncthreads)";
  return false;
}

// One block. Warps advance independently: the chosen warp runs its lanes until each blocks, and a warp whose
// lanes all reached a warp rendezvous goes on at once, so one warp can run far ahead of the others between two
// __syncthreads (as on a GPU). Which warp runs next, and the lane order within it, follow the schedule: forward
// (lowest first), reverse, or random. A read of shared memory another warp writes without a barrier in between
// therefore sees the NaN poison in some schedule.
void run_block(int n, std::mt19937_64& rng) {
  const int warps = (n + 31) / 32;
  std::vector<int> lanes(32), candidates;
  candidates.reserve(warps);
  while (!g.failed) {
    candidates.clear();
    for (int w = 0; w < warps; ++w) {
      bool ready = false;
      for (int i = 32 * w; i < std::min(n, 32 * w + 32); ++i) ready |= g.fibers[i].state == kReady;
      if (ready) candidates.push_back(w);
    }
    if (candidates.empty()) {
      bool all_done = true;
      for (int i = 0; i < n; ++i) all_done &= g.fibers[i].state == kDone;
      if (all_done || !release_block(n)) return;
      continue;
    }
    const int w = g_order == 0 ? candidates.front()
                : g_order == 1 ? candidates.back()
                               : candidates[std::uniform_int_distribution<size_t>(0, candidates.size() - 1)(rng)];
    const int lo = 32 * w, hi = std::min(n, lo + 32);
    lanes.resize(hi - lo);
    for (int k = 0; k < hi - lo; ++k) lanes[k] = g_order == 1 ? hi - 1 - k : lo + k;
    if (g_order == 2) std::shuffle(lanes.begin(), lanes.end(), rng);
    for (int i : lanes) {
      if (g.failed) return;
      if (g.fibers[i].state == kReady) to_fiber(i);
    }
    if (g.failed || release_warp(w, n) < 0) return;
  }
}

}  // namespace

void fail(const std::string& what) {
  if (!g.failed) {
    g.failed = true;
    g.error = what + where();
  }
  if (g.current < 0) std::abort();
  g.fibers[g.current].state = kDone;  // abandon this fiber: the scheduler stops the launch
  to_scheduler();
  std::abort();
}

void sync_block(int line) {
  Fiber& f = g.fibers[g.current];
  f.state = kAtBlock;
  f.line = line;
  to_scheduler();
}

void sync_warp() {
  g.fibers[g.current].state = kAtWarp;
  to_scheduler();
}

uint64_t& warp_slot(int lane) { return g.slots[(flat_tid() & ~31u) + lane]; }

float* warp_scratch() { return g.scratch.data() + 512 * (flat_tid() >> 5); }

void register_shared(void* p, size_t bytes) {
  g_shared.emplace_back(p, bytes);
  std::memset(p, 0xFF, bytes);
}

unsigned char* dynamic_smem() {
  if (g_dyn_bytes == 0) fail("dynamic shared memory used by a kernel launched without any");
  return g_dyn_base;
}

namespace {
bool in_shared(const void* p, size_t n) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (g_dyn_base && c >= g_dyn_base && c + n <= g_dyn_base + g_dyn_bytes) return true;
  for (auto& r : g_shared) {
    const auto* b = static_cast<const unsigned char*>(r.first);
    if (c >= b && c + n <= b + r.second) return true;
  }
  return false;
}
}  // namespace

bool is_shared(const void* p, size_t bytes) { return in_shared(p, bytes); }

void cp_async16(void* dst, const void* src, bool valid) {
  check_align(dst, 16, "cp.async destination");
  if (!in_shared(dst, 16)) fail("cp.async destination is not shared memory");
  PendingCopy c;
  c.dst = static_cast<unsigned char*>(dst);
  if (valid) {
    check_align(src, 16, "cp.async source");
    std::memcpy(c.data, src, 16);
  } else {
    std::memset(c.data, 0, 16);
  }
  const int t = static_cast<int>(flat_tid());
  c.group = g_cp_open[t];
  g_cp[t].push_back(c);
  std::memset(dst, 0xFF, 16);  // in flight: whoever reads it before the wait sees the poison
}

void cp_async_commit() { ++g_cp_open[flat_tid()]; }

void cp_async_wait(int n) {
  const int t = static_cast<int>(flat_tid());
  auto& v = g_cp[t];
  const int limit = g_cp_open[t] - n;  // groups with a smaller id are retired
  size_t keep = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i].group < limit) {
      std::memcpy(v[i].dst, v[i].data, 16);
    } else {
      v[keep++] = v[i];
    }
  }
  v.resize(keep);
}

int launch(dim3 grid, dim3 block, const std::function<void()>& body, int dynamic_smem_bytes) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n <= 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    g_last_code = cudaErrorInvalidConfiguration;
    g_last_error = "invalid launch configuration";
    return 1;
  }
  if (static_cast<int>(g.fibers.size()) < n) g.fibers.resize(n);
  g.slots.assign(((n + 31) / 32) * 32, 0);
  g.scratch.assign(((n + 31) / 32) * 512, 0.f);
  g.body = &body;
  g.failed = false;
  g.error.clear();
  g_last_error.clear();
  g_block_dim = block;
  g_grid_dim = grid;
  if (dynamic_smem_bytes < 0 || dynamic_smem_bytes > 227 * 1024) {
    g_last_code = cudaErrorInvalidValue;
    g_last_error = "dynamic shared memory size out of range";
    return 1;
  }
  g_dyn_bytes = static_cast<size_t>(dynamic_smem_bytes);
  g_dyn.assign(g_dyn_bytes + 128, 0xFF);
  g_dyn_base = g_dyn_bytes ? reinterpret_cast<unsigned char*>(
                                 (reinterpret_cast<uintptr_t>(g_dyn.data()) + 127) & ~uintptr_t(127))
                           : nullptr;
  g_cp.assign(n, {});
  g_cp_open.assign(n, 0);
  std::mt19937_64 rng(g_seed);
  for (unsigned bz = 0; bz < grid.z && !g.failed; ++bz)
    for (unsigned by = 0; by < grid.y && !g.failed; ++by)
      for (unsigned bx = 0; bx < grid.x && !g.failed; ++bx) {
        g_block_idx = make_uint3(bx, by, bz);
        for (auto& s : g_shared) std::memset(s.first, 0xFF, s.second);
        if (g_dyn_base) std::memset(g_dyn_base, 0xFF, g_dyn_bytes);
        for (int i = 0; i < n; ++i) {
          g_cp[i].clear();
          g_cp_open[i] = 0;
        }
        for (int i = 0; i < n; ++i) start_fiber(g.fibers[i]);
        run_block(n, rng);
      }
  g.current = -1;
  g.body = nullptr;
  g_dyn_bytes = 0;
  g_dyn_base = nullptr;
  if (g.failed) {
    g_last_code = cudaErrorLaunchFailure;
    g_last_error = "lorakern CUDA emulator: " + g.error;
    return 1;
  }
  return 0;
}

cudaError_t last_error() {
  const cudaError_t e = g_last_code;
  g_last_code = cudaSuccess;
  return e;
}

const char* error_string(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  if (!g_last_error.empty()) return g_last_error.c_str();
  return e == cudaErrorInvalidValue ? "invalid argument" : "unspecified launch failure";
}

void set_schedule(int order, uint64_t seed) {
  g_order = order;
  g_seed = seed;
}

}  // namespace lk_emu
