"""Mutation check of the CUDA kernels' tests: every listed defect, planted in a copy of the repository and run on
the CPU emulator (lorakern._C_emu), must make the emulated cuda-backend tests fail. A mutation that survives
means the tests cannot see that kind of bug.

    python tools/kernel_mutations.py            # all mutations (~3-4 minutes on 2 cores)
    python tools/kernel_mutations.py 3 11       # only these

Needs the CUDA toolkit's headers and a host C++ compiler (as the emulator build does); no GPU.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
G = "csrc/include/lorakern/dense_gather.cuh"
S = "csrc/include/lorakern/dense_segment.cuh"
D = "csrc/include/lorakern/dense_dispatch.h"
GR = "csrc/include/lorakern/grouping.cuh"

#: (what, file, original text, planted defect)
MUTATIONS = [
    ("gather: no barrier after the page-table read", G, "  __syncthreads();\n#if LORAKERN_GATHER_PREFETCH",
     "\n#if LORAKERN_GATHER_PREFETCH"),
    ("gather: expand reads one rank row too many", G, "for (int j = 0; j < rank; ++j) {",
     "for (int j = 0; j <= rank && j < kMaxRank; ++j) {"),
    ("gather: shrink skips the last rank row", G, "for (int j = warp; j < rank; j += kWarps) {",
     "for (int j = warp; j < rank - 1; j += kWarps) {"),
    ("gather: no barrier before y_s is rewritten", G, "    __syncthreads();  // y_s is rewritten by the next pass\n",
     "\n"),
    ("gather: last token of a pass dropped", G, "const int mt = min(MT, len - m0);",
     "const int mt = min(MT, len - m0) - (len - m0 > MT ? 0 : 1);"),
    ("gather: scale ignored", G, "const float scale = p.scales ? p.scales[slot] : 1.0f;", "const float scale = 1.0f;"),
    ("gather: slice offset ignored", G, "T* o = O + orow[m] + (off + n) * p.so_n;",
     "T* o = O + orow[m] + n * p.so_n; (void)off;"),
    ("segment: shrink trusts out-of-range row ids", S,
     "rows_s[i] = i < nr ? checked_row(p.page_table[slot * p.s_pt + r0 + i], p.num_rows) : -1;",
     "rows_s[i] = i < nr ? p.page_table[slot * p.s_pt + r0 + i] : -1;"),
    ("segment: expand reads y past the rank", S, "const bool in_rank = rc + tid % RK < rank;",
     "const bool in_rank = rc + tid % RK < p.max_rank;"),
    ("segment: no lo term of the fp32 intermediate", S, "        wmma::mma_sync(acc[f], fl, fb, acc[f]);\n", ""),
    ("segment: split-K partial sums stored, not added", S,
     "if (k_split > 1) atomicAdd(dst, ys[m][j]); else *dst = ys[m][j];", "*dst = ys[m][j];"),
    ("segment: shrink reads a ring stage before the barrier", S,
     "    __syncthreads();  // step's stage complete for every thread", "    // (no barrier)"),
    ("segment: shrink waits for one K step too few", S, "cp_async_wait<STAGES - 2>();\n    __syncthreads();  // step's",
     "cp_async_wait<STAGES - 1>();\n    __syncthreads();  // step's"),
    ("segment: expand rank step past the rank rows of B", S, "const bool ok = rc + j < rank && n0 + c < n_i;",
     "const bool ok = n0 + c < n_i;"),
    ("segment: expand waits for B only at the first two steps", S,
     "if (step < 2) cp_async_wait<2>(); else cp_async_wait<1>();", "cp_async_wait<2>();"),
    ("segment: expand refills a B buffer before the barrier", S,
     "    __syncthreads();  // the y terms and this B buffer are rewritten next", "    // (no barrier)"),
    ("segment: expand epilogue without waiting for the out tile", S,
     "  cp_async_wait<0>();\n  __syncthreads();\n  const float scale", "  __syncthreads();\n  const float scale"),
    ("segment: no warp barrier after a fragment is staged", S,
     "mem_row_major);\n    __syncwarp();", "mem_row_major);"),
    ("segment: no barrier after the accumulator store", S,
     "wmma::store_matrix_sync(&ys[fm * 16][(fn0 + f) * 16], acc[f], LDY, wmma::mem_row_major);\n  __syncthreads();",
     "wmma::store_matrix_sync(&ys[fm * 16][(fn0 + f) * 16], acc[f], LDY, wmma::mem_row_major);"),
    ("segment: epilogue writes rows past the segment", S, "if (m < len && n0 + c < n_i) {",
     "if (tok_s[m] >= 0 || n0 + c < n_i) {"),
    ("segment: last K step skipped", S, "for (int step = 0; step < steps; ++step) {",
     "for (int step = 0; step + 1 < steps; ++step) {"),
    ("segment: fp16 scale set once, never grown", S, "if (e > 14 && ldexpf(1.f, e - 14) > S) {",
     "if (e > 14 && S == 1.f) {"),
    ("segment: fp16 y split unscaled", S, "const float v = kScaled ? yv[l] * inv_S : yv[l];", "const float v = yv[l];"),
    ("moe: B rows of expert 0 for every expert", G, "+ (kMoe ? expert * p.b_e_strides[sl] : 0);", ";"),
    ("moe: routing weight ignored", G, "wt[m] = scale * (p.topk_w && m < mt ? p.topk_w[t * p.sw_t + k * p.sw_k] : 1.0f);",
     "wt[m] = scale; (void)k;"),
    ("moe: x row of the token, not of the pair", G, "xrow[m] = t * p.sx_t + k * p.sx_p;", "xrow[m] = t * p.sx_t;"),
    ("gather: column chunk one vector short", G, "n_hi = min(n_i, n_lo + chunk);", "n_hi = min(n_i, n_lo + chunk - W);"),
    ("gather: a pass's missing token's shrink stored (token 0's y row)", G,
     "if (m < mt) p.y[sl * p.sy_s + tok[m] * p.sy_t + j * p.sy_r] = s;",
     "p.y[sl * p.sy_s + tok[m] * p.sy_t + j * p.sy_r] = s;"),
    ("gather: a pass's missing token's delta added (token 0's out row)", G,
     "          if (m < mt) {\n            T* o = O + orow[m]", "          {\n            T* o = O + orow[m]"),
    ("gather: token passes not strided by m_split", G, "m0 += MT * p.m_split) {", "m0 += MT) {"),
    ("fused: Y terms written over the ring before every warp left it", S,
     "  __syncthreads();     // every warp is done with the ring", "  // (no barrier)"),
    ("fused: shrink B operand matrices in the A operand's order", S,
     "&as(st)[b * 16 + (lane & 7) + ((lane >> 4) << 3)][kk + ((lane >> 3) & 1) * 8]",
     "&as(st)[b * 16 + (lane & 15)][kk + (lane >> 4) * 8]"),
    ("fused: the last column block of a group skipped", S, "if ((wn + 4 * i) * 16 < C) b_live",
     "if ((wn + 4 * i) * 16 + 16 < C) b_live"),
    ("fused: shrink waits for one K step too few", S, "cp_async_wait<STAGES - 2>();  // this thread's copies",
     "cp_async_wait<STAGES - 1>();  // this thread's copies"),
    ("fused: shrink reads a ring stage before the barrier", S, "    __syncthreads();  // everyone's have;",
     "    // (no barrier)"),
    ("fused: last K step skipped", S, "for (int ks = 0; ks < steps; ++ks) {", "for (int ks = 0; ks + 1 < steps; ++ks) {"),
    ("fused: the K loop instantiated for too few column blocks per warp", S, "switch ((C + 63) / 64) {",
     "switch (C / 64 > 0 ? C / 64 : 1) {"),
    ("fused: expand waits for one chunk too few", S, "cp_async_wait<OSTAGES - 2>();", "cp_async_wait<OSTAGES - 1>();"),
    ("fused: out chunk refilled before the barrier", S,
     "    __syncthreads();  // chunk c landed for every thread", "    // (no barrier)"),
    ("fused: no warp barrier before the write-back", S,
     "      __syncwarp();\n      T* Oc = O + p.offsets[s] + n0;", "      T* Oc = O + p.offsets[s] + n0;"),
    ("fused: only the hi term of Y", S,
     "for (int t = 0; t < kTerms; ++t) mma_16816<T>(oacc[2 * f + h], a[t], bb, oacc[2 * f + h]);",
     "for (int t = 0; t < 1; ++t) mma_16816<T>(oacc[2 * f + h], a[t], bb, oacc[2 * f + h]);"),
    ("fused: fp16 Y split unscaled", S, "const float v = acc[i][mi][h][2 * hr + e] * inv_S;",
     "const float v = acc[i][mi][h][2 * hr + e]; (void)inv_S;"),
    ("fused: write-back of rows past the tile", S,
     "        if (m < len && n0 + n < n_i) {\n          Vec<T, true> val;",
     "        if (tok_s[m] >= -1 && n0 + n < n_i) {\n          Vec<T, true> val;"),
    ("fused: every group shrinks the first slices", S, "s = s0 + c / rank16, j = c % rank16;",
     "s = c / rank16, j = c % rank16; (void)s0;"),
    ("fused: a group starts before the previous one's expand is done", S,
     "    if (s0 > 0) {  // the previous group's expand", "    if (false) {  // the previous group's expand"),
    ("fused: B rows past the rank loaded", S, "const bool ok = j < rank && n0 + n < n_i;",
     "const bool ok = n0 + n < n_i;"),
    ("fused: the (4, 3) ring configuration launches the (6, 3) kernel", S,
     "if (k_split == 1) return launch_segment_fused<T, 1>(p, bytes, stream);",
     "if (k_split == 1) return launch_segment_fused<T, 0>(p, bytes, stream);"),
    ("fused: the shallowest ring configuration never launched", S,
     "    return launch_segment_fused<T, 2>(p, bytes, stream);", "    return launch_segment_fused<T, 1>(p, bytes, stream);"),
    ("every kernel: a slot past the page table runs", D,
     "if (slot < 0 || slot >= p.num_slots || p.num_rows <= 0) return 0;", "if (slot < 0 || p.num_rows <= 0) return 0;"),
    ("gather: rank not capped at max_rank", G, "const int rank = min(slot_rank(p, slot), kMaxRank);",
     "const int rank = slot_rank(p, slot) > 0 ? min(p.ranks[slot], kMaxRank) : 0;"),
    ("grouping: sort not stable (item index not in the composite)", GR,
     "c = (static_cast<unsigned long long>(static_cast<uint32_t>(key)) << 32) | static_cast<uint32_t>(i);",
     "c = (static_cast<unsigned long long>(static_cast<uint32_t>(key)) << 32) | static_cast<uint32_t>(P - 1 - i);"),
    ("grouping: the sentinel group gets tiles", GR,
     "if (s < nseg && key_of(comp[seg[s]]) != kSentinel) n =", "if (s < nseg) n ="),
    ("grouping: a segment's last tile one item too long", GR,
     "len = min(bm, seg[lo + 1] - seg[lo] - local);", "len = min(bm, seg[lo + 1] - seg[lo] - local + 1);"),
    ("grouping: rows reordered without the barrier between reads and writes", GR,
     "  __syncthreads();  // every source row is read before any is overwritten\n", "\n"),
    ("grouping: scan misses the warp totals of later warps", GR,
     "before += w < warp ? warp_tot[w] : 0;", "before += w + 1 < warp ? warp_tot[w] : 0;"),
    ("grouping: a plan's no-LoRA segment keeps the sentinel as its slot", GR,
     "p.seg_keys[s] = key == kSentinel ? -1 : key;", "p.seg_keys[s] = key;"),
    ("grouping: a plan's segment starts past the segments not reset", GR,
     "p.seg_starts[s] = s <= nseg ? seg[s] : P;", "p.seg_starts[s] = s <= nseg ? seg[s] : nseg;"),
    ("grouping: the second work list rewrites the scan array while the first's rows read it", GR,
     "    __syncthreads();  // the previous list's rows no longer read `work`\n", "\n"),
    ("grouping: a plan's LoRA token count includes the no-LoRA tokens", GR,
     "p.stats[1] = tail ? seg[nseg - 1] : P;", "p.stats[1] = P;"),
    ("grouping: the smallest slot reduced over one warp only", GR,
     "  for (int w = 1; w < kWarps; ++w) r = op(r, warp_tot[w]);", "  for (int w = 1; w < 1; ++w) r = op(r, warp_tot[w]);"),
]

TESTS = ["tests/test_ops_lora.py", "tests/test_moe.py", "tests/test_grouping.py", "-k", "cuda and not 2048"]


def copy_repo(work: Path) -> None:
    """The repository's tracked and untracked-not-ignored files, as they are in the working tree, into ``work``."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, work / f)


def main(argv) -> int:
    sys.path.insert(0, str(ROOT / "tools"))
    import cuda_build

    ext = sysconfig.get_config_var("EXT_SUFFIX")
    survivors = []
    with tempfile.TemporaryDirectory(prefix="lorakern-mut-") as tmp:
        work = Path(tmp) / "repo"
        copy_repo(work)
        for i, (what, rel, old, new) in enumerate(MUTATIONS):
            if argv and str(i) not in argv:
                continue
            path = work / rel
            orig = path.read_text()
            if orig.count(old) != 1:
                print(f"[{i}] {what}: the original text is not found exactly once (update MUTATIONS)")
                survivors.append(what)
                continue
            path.write_text(orig.replace(old, new))
            try:
                cuda_build.CSRC = work / "csrc"
                so = work / "lorakern" / f"_C_emu{ext}"
                try:
                    cuda_build.build_emu(so, Path(tmp) / f"obj{i}")
                except RuntimeError as e:
                    print(f"[{i}] {what}: the mutant does not compile ({str(e).splitlines()[-2:]})")
                    survivors.append(what)
                    continue
                t = time.time()
                r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
                                   cwd=work, capture_output=True, text=True)
                failed = [ln for ln in r.stdout.splitlines() if ln.startswith("FAILED")]
                verdict = ("caught: " + (failed[0][7:] if failed else f"crashed (rc {r.returncode})")
                           if r.returncode != 0 else "SURVIVED")
                print(f"[{i}] {what}: {verdict} ({time.time() - t:.0f} s)", flush=True)
                if r.returncode == 0:
                    survivors.append(what)
            finally:
                path.write_text(orig)
    print(f"{len(survivors)} mutation(s) survived" + (": " + "; ".join(survivors) if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
