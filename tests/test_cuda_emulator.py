"""The CPU emulator of the CUDA kernels (csrc/emu/) checks what it claims to check.

Without a GPU the cuda backend's tests run the real kernel sources on this emulator (``LORAKERN_CUDA_EMULATE=1``),
so the emulator must (a) compute what CUDA computes and (b) report the defects it is meant to expose: races on
shared memory that a schedule order reveals, divergent barriers, warp collectives with missing lanes, misaligned
vector accesses. Each is shown here on a small kernel (csrc/emu/selftest.cpp) with a known answer or defect.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import HAS_CUDA

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import cuda_build  # noqa: E402

pytestmark = pytest.mark.skipif(cuda_build.cuda_include() is None, reason="no CUDA toolkit headers on this machine")


SELFTEST_SRCS = [str(ROOT / "csrc/emu/selftest.cpp"), str(ROOT / "csrc/emu/emu_runtime.cpp")]


def build_selftest(d: Path, extra=(), load=True):
    """Build csrc/emu/selftest.cpp (+ the runtime) into ``d``; the loaded module, or its path (``load=False``)."""
    import sysconfig

    out = d / ("emu_selftest" + sysconfig.get_config_var("EXT_SUFFIX"))
    cuda_build.build_emu(out, d / "obj_selftest", srcs=SELFTEST_SRCS, extra=extra)
    if not load:
        return out
    spec = importlib.util.spec_from_file_location("emu_selftest", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    return build_selftest(tmp_path_factory.mktemp("emu_selftest"))


ORDERS = {"forward": 0, "reverse": 1, "random": 2}


def test_ucontext_fallback_switch(tmp_path):
    """The portable fiber switch (ucontext: non-x86-64 hosts) behaves as the x86-64 one."""
    mod = build_selftest(tmp_path, extra=["-DLK_EMU_UCONTEXT"])
    assert mod.run("no_race")[0] == "" and mod.run("no_race")[1][:128] == expected_neighbour()
    assert mod.run("warp_sum")[1][:32] == [float(sum(range(32)))] * 32
    assert "divergent __syncthreads" in mod.run("divergent_barrier")[0]


def expected_neighbour():
    return [float((t + 1) % 64) + 100.0 * b for b in range(2) for t in range(64)]


@pytest.mark.parametrize("order", ORDERS)
def test_synchronised_exchange_is_right_in_every_order(selftest, order):
    err, out = selftest.run("no_race", ORDERS[order], 7)
    assert err == ""
    assert out[:128] == expected_neighbour()


def test_missing_barrier_is_exposed_by_some_order(selftest):
    """The race reads shared memory its neighbour has not written yet in at least one schedule: the unwritten
    shared memory is a NaN pattern, so the result is visibly wrong there."""
    wrong = []
    for name, order in ORDERS.items():
        err, out = selftest.run("race", order, 3)
        assert err == ""
        if out[:128] != expected_neighbour():
            wrong.append(name)
            assert any(v != v for v in out[:128]), "an unsynchronised read should see the NaN poison"
    assert wrong, "no schedule exposed the race"


def test_divergent_barrier_is_an_error(selftest):
    err, _ = selftest.run("divergent_barrier")
    assert "divergent __syncthreads" in err


def test_exited_warps_count_as_arrived(selftest):
    err, out = selftest.run("early_exit_then_barrier")
    assert err == ""
    assert out[:128] == [1.0] * 128


def test_warp_prefix_by_shfl_up(selftest):
    """__shfl_up_sync: lane l reads lane l - offset, lanes below the offset keep their own value (the MoE grouping
    kernel's block scan)."""
    err, out = selftest.run("warp_prefix")
    assert err == ""
    for w in range(2):
        vals = [float(l + 1) + 100.0 * w for l in range(32)]
        assert out[32 * w:32 * w + 32] == [sum(vals[:l + 1]) for l in range(32)]


def test_warp_sum(selftest):
    err, out = selftest.run("warp_sum")
    assert err == ""
    assert out[:32] == [float(sum(range(32)))] * 32
    assert out[32:64] == [float(sum(range(32)) + 32 * 32)] * 32


def test_shuffle_with_exited_lanes_is_an_error(selftest):
    err, _ = selftest.run("shuffle_after_lanes_exit")
    assert "some of its lanes exited" in err


def test_shuffle_while_other_lanes_wait_at_a_barrier_is_an_error(selftest):
    err, _ = selftest.run("shuffle_vs_barrier")
    assert "deadlock" in err or "divergent" in err


def test_misaligned_vector_access_is_an_error(selftest):
    err, _ = selftest.run("misaligned_vector")
    assert "misaligned address" in err and "16-byte" in err


def test_wmma_matches_a_float64_product(selftest):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(16, 16, generator=g).half().double()
    b = torch.randn(16, 16, generator=g).half().double()
    err, c = selftest.wmma(a.flatten().tolist(), b.t().contiguous().flatten().tolist())  # b column-major
    assert err == ""
    ref = a @ b + 1.0
    torch.testing.assert_close(torch.tensor(c, dtype=torch.float64).view(16, 16), ref, rtol=1e-5, atol=1e-5)


def test_ldmatrix_and_mma_sync_match_a_float64_product(selftest):
    """ldmatrix .x4 (.trans for B stored [k][n]) and mma.sync m16n8k16 in the emulator, through the PTX per-lane
    fragment layouts (the kernels' LORAKERN_SEG_MMA path stands on them)."""
    g = torch.Generator().manual_seed(6)
    a = torch.randn(16, 16, generator=g).bfloat16().double()
    b = torch.randn(16, 16, generator=g).bfloat16().double()
    err, d = selftest.mma(a.flatten().tolist(), b.flatten().tolist())
    assert err == ""
    ref = a @ b + 1.0
    torch.testing.assert_close(torch.tensor(d, dtype=torch.float64).view(16, 16), ref, rtol=1e-5, atol=1e-5)


def test_cp_async_lands_only_at_the_wait(selftest):
    err, out = selftest.run("cp_async_waited")
    assert err == "" and out[:4] == [1.0, 2.0, 3.0, 4.0]
    err, out = selftest.run("cp_async_unwaited")
    assert err == "" and all(v != v for v in out[:4])  # the NaN poison: the copy has not landed


# ------------------------------------------------------------------------------------------------ the real kernels
@pytest.mark.skipif(HAS_CUDA, reason="the emulator is for machines without a GPU")
def test_cuda_backend_on_cpu_needs_the_emulate_switch(monkeypatch):
    from lorakern.backends import BACKENDS, cuda_emulator, cuda_extension

    if isinstance(cuda_emulator(), str):
        pytest.skip(cuda_emulator())
    if isinstance(cuda_extension(), str):  # LORAKERN_SKIP_CUDA=1 builds: the refusal names the missing extension
        pytest.skip(cuda_extension())
    monkeypatch.delenv("LORAKERN_CUDA_EMULATE", raising=False)
    reasons = BACKENDS["cuda"].not_supported_reasons(torch.device("cpu"), torch.float16, 16)
    assert any("LORAKERN_CUDA_EMULATE" in r for r in reasons)
    monkeypatch.setenv("LORAKERN_CUDA_EMULATE", "1")
    assert BACKENDS["cuda"].not_supported_reasons(torch.device("cpu"), torch.float16, 16) == []


def _every_kernel(g):
    """One call of every op on the cuda backend (dense on both paths with split-K, shrink and expand apart, MoE
    with per-pair x and weights, both MLA sides), each on fresh outputs; returns the outputs as raw bits."""
    import lorakern
    from lorakern.workloads import make_lora, make_slots
    from test_mla import CASES as MLA_CASES, make_mla_case
    from test_moe import make_moe_lora, make_routing

    outs = []
    K, ns, dt = 1024, [64, 32], torch.bfloat16  # K = 1024 with few CTAs: split-K on (16 emulated SMs)
    pool = make_lora(6, K, ns, [16, 1, 64, 70, 8, 33], dtype=dt, generator=g)
    x = torch.randn(40, K, generator=g).to(dt)
    slots = make_slots("zipf:1.5", 40, 6, none_frac=0.1, generator=g)
    args = (pool.page_table, pool.ranks)
    for path in ("gather", "segment"):
        os.environ["LORAKERN_TRITON_PATH"] = path
        out = torch.zeros(40, sum(ns), dtype=dt)
        lorakern.ops.add_lora(out, x, pool.lora_a, pool.lora_b, *args, pool.scales, slots, backend="cuda")
        y = lorakern.ops.lora_shrink(x, pool.lora_a, *args, slots, backend="cuda")
        lorakern.ops.lora_expand(out, y, pool.lora_b, *args, pool.scales, slots, backend="cuda")
        outs += [out.view(torch.int16), y.view(torch.int32)]
    os.environ["LORAKERN_CUDA_SEGMENT"] = "fused"  # add_lora's fused segment kernel
    out = torch.zeros(40, sum(ns), dtype=dt)
    lorakern.ops.add_lora(out, x, pool.lora_a, pool.lora_b, *args, pool.scales, slots, backend="cuda")
    outs.append(out.view(torch.int16))
    # ranks past 128 (the limit is 512): both paths at max_rank 512, the fused kernel at 192 (224-column groups)
    for ranks, ns_hi in (([512, 3, 300], [40]), ([192, 3, 150], [40, 24])):
        hi = make_lora(3, 64, ns_hi, ranks, dtype=dt, generator=g)
        xh = torch.randn(20, 64, generator=g).to(dt)
        sh = make_slots("uniform", 20, 3, none_frac=0.1, generator=g)
        for path in ("gather", "segment"):
            os.environ["LORAKERN_TRITON_PATH"] = path
            out = torch.zeros(20, sum(ns_hi), dtype=dt)
            lorakern.ops.add_lora(out, xh, hi.lora_a, hi.lora_b, hi.page_table, hi.ranks, hi.scales, sh,
                                  backend="cuda")
            outs.append(out.view(torch.int16))
    os.environ.pop("LORAKERN_CUDA_SEGMENT", None)
    os.environ.pop("LORAKERN_TRITON_PATH", None)
    L = make_moe_lora(g, E=6, K=48, n_sizes=[24, 16], ranks=[3, 20, 1, 16], dtype=dt)
    ids, w = make_routing(g, 12, 3, 6)
    s = torch.randint(-1, 4, (12,), generator=g, dtype=torch.int32)
    out = torch.zeros(12, 3, 40, dtype=dt)
    xm = torch.randn(12, 3, 48, generator=g).to(dt)
    lorakern.ops.add_lora_moe(out, xm, ids, L.lora_a, L.lora_b, L.page_table, L.ranks, L.scales, s,
                              topk_weights=w, backend="cuda")
    outs.append(out.view(torch.int16))
    case = make_mla_case(g, dtype=dt, **MLA_CASES["odd_C72_Dn12_Dv20_H3"])
    Lm = case.lora
    q_lat = torch.zeros(case.T, case.H, case.C, dtype=dt)
    lorakern.ops.mla_absorbed_q(q_lat, torch.randn(case.T, case.H, case.Dn, generator=g).to(dt), case.a, case.b,
                                Lm.page_table, Lm.ranks, Lm.scales, case.slots_arg, backend="cuda")
    o = torch.zeros(case.T, case.H, case.Dv, dtype=dt)
    lorakern.ops.mla_absorbed_o(o, torch.randn(case.T, case.H, case.C, generator=g).to(dt), case.a, case.b,
                                Lm.page_table, Lm.ranks, Lm.scales, case.slots_arg, backend="cuda")
    outs += [q_lat.view(torch.int16), o.view(torch.int16)]
    return outs


@pytest.mark.skipif(HAS_CUDA, reason="the emulator is for machines without a GPU")
def test_kernels_agree_in_every_schedule(monkeypatch):
    """Every kernel (dense both paths with split-K, the fused segment kernel, shrink, expand, MoE, MLA q/o) gives
    the same bits whatever
    order the threads of a block run in — forward, reverse, three random schedules: no result depends on an
    unsynchronised shared-memory access."""
    from lorakern import cuda_backend
    from lorakern.backends import cuda_emulator

    emu = cuda_emulator()
    if isinstance(emu, str):
        pytest.skip(emu)
    monkeypatch.setenv("LORAKERN_CUDA_EMULATE", "1")
    monkeypatch.delenv("LORAKERN_TRITON_PATH", raising=False)
    monkeypatch.delenv("LORAKERN_CUDA_SEGMENT", raising=False)
    runs = []
    try:
        for order, seed in ((0, 0), (1, 0), (2, 0), (2, 1), (2, 2)):
            emu.set_schedule(order, seed)
            runs.append(_every_kernel(torch.Generator().manual_seed(11)))
    finally:
        emu.set_schedule(2, 0)
        os.environ.pop("LORAKERN_TRITON_PATH", None)
    assert cuda_backend._k_split(torch.device("cpu"), 12, 1024) > 1  # <= 3 tiles x 2 slices x 2 rank tiles
    for k, ref in enumerate(runs[0]):
        assert ref.abs().sum() > 0, k
        for r, run in enumerate(runs[1:], 1):
            assert torch.equal(run[k], ref), f"output {k} differs in schedule {r}"


def test_k_split_rule(monkeypatch):
    """The segment shrink's split-K (cuda_backend._k_split): ~22 K steps of 64 per CTA (3 splits at K = 4096, the
    H100's best), more when few tiles leave SMs idle (the fewest waves of resident CTAs per unit of work), none
    from 4 waves on; LORAKERN_CUDA_SEGMENT_K_SPLIT forces a value and refuses a non-positive one; none under
    torch.use_deterministic_algorithms(True)."""
    from lorakern import cuda_backend

    dev = torch.device("cuda", 7)  # a fake key: the rule reads only the two caches
    monkeypatch.delenv("LORAKERN_CUDA_SEGMENT_K_SPLIT", raising=False)
    monkeypatch.setitem(cuda_backend._SM_COUNT, dev, 132)
    monkeypatch.setitem(cuda_backend._SEG_CTAS, (dev, torch.bfloat16, cuda_backend._SHRINK), 3)
    assert cuda_backend._k_split(dev, 128, 4096) == 3     # one wave of 384
    assert cuda_backend._k_split(dev, 405, 4096) == 3     # prefill qkv: 155 -> 131 us measured
    assert cuda_backend._k_split(dev, 200, 4096) == 7     # 1400 CTAs fill 4 waves to 88 %
    assert cuda_backend._k_split(dev, 4 * 396, 4096) == 1  # enough waves: no split
    assert cuda_backend._k_split(dev, 128, 512) == 2      # few K steps: waves only, K chunks of at least 256
    assert cuda_backend._k_split(dev, 1, 4096) == 8       # at most 8
    assert cuda_backend._k_split(dev, 1, 64) == 1
    monkeypatch.setitem(cuda_backend._SEG_CTAS, (dev, torch.bfloat16, cuda_backend._SHRINK), 1)  # sm_89
    assert cuda_backend._k_split(dev, 128, 4096) == 3
    monkeypatch.setenv("LORAKERN_CUDA_SEGMENT_K_SPLIT", "5")
    assert cuda_backend._k_split(dev, 4 * 396, 4096) == 5
    assert cuda_backend._k_split(dev, 4 * 396, 128) == 2   # capped at K / 64
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:  # no atomics when torch is asked for deterministic algorithms, whatever else says
        assert cuda_backend._k_split(dev, 4 * 396, 4096) == 1
        monkeypatch.delenv("LORAKERN_CUDA_SEGMENT_K_SPLIT")
        assert cuda_backend._k_split(dev, 128, 4096) == 1
    finally:
        torch.use_deterministic_algorithms(was)
    monkeypatch.setenv("LORAKERN_CUDA_SEGMENT_K_SPLIT", "5")
    monkeypatch.setenv("LORAKERN_CUDA_SEGMENT_K_SPLIT", "0")
    with pytest.raises(ValueError, match="LORAKERN_CUDA_SEGMENT_K_SPLIT"):
        cuda_backend._k_split(dev, 1, 4096)


# ------------------------------------------------------------------------------------------------ memcheck
# The emulator built with AddressSanitizer is the CPU counterpart of compute-sanitizer's memcheck: every tensor is
# its own heap block with redzones, so a kernel reading or writing past any input or output is reported. It runs in
# a subprocess with libasan preloaded (ASan must be the first library loaded).
def _libasan():
    import shutil
    import subprocess

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None
    r = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = r.stdout.strip()
    return path if r.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


_MEMCHECK_SCRIPT = r'''
import importlib.util, os, sys
os.environ["LORAKERN_CUDA_EMULATE"] = "1"
spec = importlib.util.spec_from_file_location(sys.argv[2], sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
if sys.argv[2] == "emu_selftest":
    print(mod.out_of_bounds(37))
    sys.exit(0)
sys.modules["lorakern._C_emu"] = mod
sys.path.insert(0, sys.argv[3])
import torch
import conftest, test_ops_lora as T
import lorakern
assert lorakern.backends.cuda_emulator() is mod
n = 0
for name in sys.argv[4].split(","):
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for path in ("gather", "segment"):
            os.environ["LORAKERN_TRITON_PATH"] = path
            g = torch.Generator().manual_seed(n)
            case = T._case(name, dt, g)
            for op in ("add_lora", "lora_shrink", "lora_expand"):
                conftest.run_case(op, "cuda", case, g)
                n += 1
        os.environ["LORAKERN_CUDA_SEGMENT"] = "fused"  # add_lora's fused segment kernel
        conftest.run_case("add_lora", "cuda", T._case(name, dt, torch.Generator().manual_seed(n)), g)
        os.environ.pop("LORAKERN_CUDA_SEGMENT")
        n += 1
# the MoE mode (pairs, expert strides, routing weights) and the MLA ops on it (heads as experts, stride-0 views)
import test_moe, test_mla
for dt in (torch.float16, torch.bfloat16, torch.float32):
    for form in ("shared", "per_expert"):
        test_moe.test_moe_op("cuda", dt, form, torch.Generator().manual_seed(n))
        n += 1
    for name in ("mixed_ranks_0_64", "odd_C72_Dn12_Dv20_H3", "strided_views", "H12"):
        for op in ("q", "o"):
            test_mla.run(test_mla.make_mla_case(torch.Generator().manual_seed(n), dtype=dt, **test_mla.CASES[name]),
                         op, "cuda", torch.Generator().manual_seed(n))
            n += 1
print("memcheck runs:", n)
'''

MEMCHECK_CASES = ("ranks_1_to_128", "K100_N72", "slices_72_40_24", "slice_offsets_gaps", "mix_distinct",
                  "rank0_adapters", "T1", "K1024_split_k", "slots_static_plan_padded", "x_transposed",
                  "slices_3_rank_128", "slices_4_rank_64")


@pytest.fixture(scope="module")
def asan_build(tmp_path_factory):
    lib = _libasan()
    if lib is None:
        pytest.skip("no libasan for the host compiler")
    import sysconfig

    d = tmp_path_factory.mktemp("emu_asan")
    ext = sysconfig.get_config_var("EXT_SUFFIX")
    kernels = d / ("_C_emu" + ext)
    # with the gather kernel's L2 prefetches compiled in (LORAKERN_GATHER_PREFETCH, a tuning variant): the emulator
    # reads a byte at every prefetched address, and the variant adds accesses without changing any other, so this
    # build checks the default kernels' accesses and the prefetches' addresses
    # (unless LORAKERN_NVCC_DEFINES already sets it)
    prefetch = [] if "LORAKERN_GATHER_PREFETCH" in os.environ.get("LORAKERN_NVCC_DEFINES", "") else [
        "-DLORAKERN_GATHER_PREFETCH=1"]
    cuda_build.build_emu(kernels, d / "obj", extra=cuda_build.ASAN_FLAGS + prefetch)
    selft = build_selftest(d, extra=cuda_build.ASAN_FLAGS, load=False)  # loaded only with libasan preloaded
    script = d / "memcheck.py"
    script.write_text(_MEMCHECK_SCRIPT)
    return lib, kernels, selft, script


def _run_asan(asan_build, module, name, cases=""):
    import subprocess

    lib, _, _, script = asan_build
    env = dict(os.environ, LD_PRELOAD=lib, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=23",
               TRITON_INTERPRET="1", LORAKERN_CUDA_EMULATE="1")
    return subprocess.run([sys.executable, str(script), str(module), name, str(ROOT / "tests"), cases],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU, tests/test_cuda_sanitizer.py runs compute-sanitizer instead")
def test_memcheck_catches_an_out_of_bounds_read(asan_build):
    """Control: the ASan build does report a kernel reading one float past a heap buffer."""
    r = _run_asan(asan_build, asan_build[2], "emu_selftest")
    assert r.returncode == 23, r.stdout + r.stderr[-3000:]
    assert "heap-buffer-overflow" in r.stderr and "read_past_end" in r.stderr


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU, tests/test_cuda_sanitizer.py runs compute-sanitizer instead")
def test_memcheck_kernels_stay_in_bounds(asan_build):
    """Both paths of every dense op, three dtypes, the adversarial shapes, then the MoE op and the MLA ops: no
    access outside any tensor, and the results still match the float64 oracle."""
    r = _run_asan(asan_build, asan_build[1], "_C_emu", ",".join(MEMCHECK_CASES))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    assert f"memcheck runs: {len(MEMCHECK_CASES) * 3 * (2 * 3 + 1) + 3 * (2 + 4 * 2)}" in r.stdout
