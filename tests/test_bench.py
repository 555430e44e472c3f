"""The benchmark harness (lorakern/bench): baselines against the reference, the bytes model, the results files,
the table, and ``python -m lorakern bench --quick`` end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CUDA_RUNS, HAS_CUDA
from lorakern import reference
from lorakern.bench import baselines as B
from lorakern.bench import cases as C
from lorakern.bench import harness as H
from lorakern.workloads import make_lora, make_slots

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ baselines
def _problem(seed, T, K, n_sizes, ranks, mix, pool, none_frac=0.0, gap=0):
    g = torch.Generator().manual_seed(seed)
    lora = make_lora(pool, K, n_sizes, ranks, dtype=torch.float32, generator=g)
    slots = make_slots(mix, T, pool, none_frac=none_frac, generator=g)
    x = torch.randn(T, K, generator=g)
    offs, acc = [], 0
    for n in n_sizes:  # slices separated by `gap` untouched columns
        offs.append(acc)
        acc += n + gap
    out = torch.randn(T, acc, generator=g)
    return lora, slots, x, out, offs


def _ref(lora, slots, x, out, offs):
    exp = out.double().clone()
    reference.add_lora(exp, x.double(), [a.double() for a in lora.lora_a], [b.double() for b in lora.lora_b],
                       lora.page_table, lora.ranks, lora.scales, slots, offs)
    return exp


PROBLEMS = [
    # seed, T, K, n_sizes, ranks, mix, pool, none_frac, gap
    (0, 16, 64, (48,), 8, "distinct", 16, 0.0, 0),
    (1, 37, 100, (72, 24, 24), "1-16", "uniform", 9, 0.25, 0),  # odd sizes, mixed ranks, -1 tokens
    (2, 50, 96, (40, 8), [0, 3, 16, 1, 7], "zipf:1.5", 5, 0.1, 5),  # a rank-0 adapter, gaps between slices
    (3, 20, 32, (16,), 4, "identical", 3, 0.0, 0),
    (4, 1, 32, (16, 16), 5, "skewed", 4, 0.0, 0),
]


@pytest.mark.parametrize("name", sorted(B.BASELINES))
@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize("problem", PROBLEMS, ids=[f"p{p[0]}" for p in PROBLEMS])
def test_baseline_matches_reference(name, prepared, problem):
    seed, T, K, n_sizes, ranks, mix, pool, none_frac, gap = problem
    lora, slots, x, out, offs = _problem(seed, T, K, n_sizes, ranks, mix, pool, none_frac, gap)
    exp = _ref(lora, slots, x, out, offs)
    bl = B.BASELINES[name]
    got = out.clone()
    prep = None
    if prepared:
        prep = bl.prepare(got, x, lora.lora_a, lora.lora_b, lora.page_table, lora.ranks, lora.scales, slots)
    res = bl.fn(got, x, lora.lora_a, lora.lora_b, lora.page_table, lora.ranks, lora.scales, slots,
                slice_offsets=offs, prepared=prep)
    assert res is got
    assert torch.isfinite(got).all()
    # fp32 against fp64: a few ulps of the largest term (|terms| ~ 10 here)
    torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-4)
    # tokens without an adapter and columns outside every slice: untouched, bit for bit
    none = slots < 0
    assert torch.equal(got[none], out[none])
    covered = torch.zeros(out.shape[1], dtype=torch.bool)
    for o, n in zip(offs, n_sizes):
        covered[o:o + n] = True
    assert torch.equal(got[:, ~covered], out[:, ~covered])


def test_baselines_single_tensor_slices():
    lora, slots, x, out, offs = _problem(5, 12, 32, (24,), 4, "uniform", 6)
    exp = _ref(lora, slots, x, out, offs)
    for name in B.BASELINES:
        got = out.clone()
        B.BASELINES[name].fn(got, x, lora.lora_a[0], lora.lora_b[0], lora.page_table, lora.ranks, lora.scales,
                             slots)
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("peer", sorted(B.PEERS))
def test_peers_refuse_cpu_with_reason(peer):
    lora, slots, x, out, offs = _problem(0, 4, 32, (16,), 4, "distinct", 4)
    with pytest.raises(B.Unavailable, match="CUDA"):
        B.make_peer(peer, out, x, lora.lora_a, lora.lora_b, lora.page_table, lora.ranks, lora.scales, slots)


# ------------------------------------------------------------------------------------------------ bytes model
def test_bytes_model_hand_computed():
    # tokens 0,0,1,-1,2 -> T_lora = 4; distinct adapters {0,1,2} of ranks 2,3,4 -> R = 9; K = 5; slices N = 3, 2
    slots = torch.tensor([0, 0, 1, -1, 2])
    ranks = torch.tensor([2, 3, 4, 7], dtype=torch.int32)  # slot 3 is in the pool but unused
    K, n_sizes, e = 5, (3, 2), 2
    # e*(S*R*K + R*sum(N) + T_lora*K + 2*T_lora*sum(N)) = 2*(2*9*5 + 9*5 + 4*5 + 2*4*5) = 390; page table 4*9
    assert H.add_lora_bytes(slots, ranks, K, n_sizes, e, meta=False) == 390
    assert H.add_lora_bytes(slots, ranks, K, n_sizes, e) == 390 + 36
    # shrink: e*(S*R*K + T_lora*K) + 4*S*T*max_rank = 2*(90 + 20) + 4*2*5*4 = 380
    assert H.lora_shrink_bytes(slots, ranks, K, 2, 4, e, meta=False) == 380
    assert H.lora_shrink_bytes(slots, ranks, K, 2, 4, e) == 416
    # expand: 4*S*sum_t r(t) + e*(R*sum(N) + 2*T_lora*sum(N)) = 4*2*(2+2+3+4) + 2*(45 + 40) = 88 + 170
    assert H.lora_expand_bytes(slots, ranks, n_sizes, e, meta=False) == 258
    assert H.lora_expand_bytes([0, 0, 1, -1, 2], [2, 3, 4, 7], n_sizes, e) == 294


def test_bytes_model_no_lora_tokens():
    assert H.add_lora_bytes([-1, -1], [4], 8, (8,), 2) == 0


# ------------------------------------------------------------------------------------------------ timing
def test_measure_cpu_stats():
    calls = []
    t = H.measure(lambda: calls.append(1), device="cpu", warmup=2, reps=7, budget_s=None)
    assert t.reps == 7 and len(calls) == 9
    assert 0 <= t.p20_us <= t.median_us <= t.p80_us


def test_l2_flush_mode(monkeypatch):
    """LORAKERN_BENCH_FLUSH picks how the L2 is flushed between timed calls (write by default, or read), refuses
    anything else by name, and is recorded with the run."""
    monkeypatch.delenv("LORAKERN_BENCH_FLUSH", raising=False)
    assert H.flush_mode() == "write"
    buf = torch.ones(64, dtype=torch.uint8)
    H._flush(buf, "write")
    assert int(buf.sum()) == 0
    buf.fill_(1)
    H._flush(buf, "read")
    assert int(buf.sum()) == 64  # read only
    monkeypatch.setenv("LORAKERN_BENCH_FLUSH", "read")
    assert H.flush_mode() == "read"
    assert H.environment("cpu")["l2_flush"] == "read"
    monkeypatch.setenv("LORAKERN_BENCH_FLUSH", "evict")
    with pytest.raises(ValueError, match="LORAKERN_BENCH_FLUSH"):
        H.flush_mode()


def test_measure_budget_cuts_reps_but_keeps_minimum():
    import time

    t = H.measure(lambda: time.sleep(0.01), device="cpu", warmup=1, reps=1000, budget_s=0.05, min_reps=3)
    assert t.reps == 3
    assert t.median_us >= 9000


def test_quantiles():
    assert H._quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert H._quantile([0.0, 10.0], 0.2) == pytest.approx(2.0)


def test_peak_copy_cpu_positive():
    assert H.peak_copy_gbps("cpu", nbytes=4 << 20, reps=3) > 0


# ------------------------------------------------------------------------------------------------ results files
def _rows():
    common = dict(op="add_lora", workload="distinct", dtype=torch.bfloat16, T=256, K=4096, N=[4096, 1024, 1024],
                  ranks="16", adapters=256, nbytes=10_000_000, case="decode-qkv")
    t = H.Timing(median_us=100.0, p20_us=90.0, p80_us=110.0, reps=10)
    return [
        H.make_row(backend="torch", timing=t, peak_gbps=1000.0, **common),
        H.make_row(backend="peft-loop", timing=H.Timing(400.0, 380.0, 420.0, 10), peak_gbps=1000.0, **common),
        H.skipped_row(backend="vllm", reason="vllm not importable (ModuleNotFoundError)", **common),
    ]


def test_row_values():
    r = _rows()[0]
    assert tuple(r)[: len(H.ROW_KEYS)] == H.ROW_KEYS
    assert r["gbps"] == pytest.approx(100.0)  # 1e7 B / 100 us
    assert r["pct_peak"] == pytest.approx(10.0)
    assert r["N"] == [4096, 1024, 1024] and r["slices"] == 3 and r["dtype"] == "bfloat16"
    s = _rows()[2]
    assert s["median_us"] is None and s["gbps"] is None and s["skipped"].startswith("vllm")


def test_results_writer_contract(tmp_path):
    env = H.environment("cpu")
    doc = H.results_doc(_rows(), env=env, peak_copy_gbps=1000.0, tests={"passed": 3, "failed": 0, "skipped": 1})
    jp, mp = H.write_results(doc, tmp_path / "res")
    assert jp.exists() and mp.exists()
    assert re.fullmatch(r"cpu-\d{8}-([0-9a-f]{4,40}|unknown)\.json", jp.name), jp.name
    assert mp.name == jp.name[:-5] + ".md"
    got = json.loads(jp.read_text())
    for k in ("device", "commit", "date", "torch", "triton", "cuda", "peak_copy_gbps", "tests", "rows"):
        assert k in got, k
    assert got["device"] == "cpu" and got["torch"] == torch.__version__
    assert got["tests"] == {"passed": 3, "failed": 0, "skipped": 1}
    assert len(got["rows"]) == 3
    for row in got["rows"]:
        assert set(H.ROW_KEYS) <= set(row)
    md = mp.read_text()
    assert "| op | backend | workload |" in md and "peft-loop" in md and "vllm not importable" in md
    # counts recorded later (gpu_check.sh) rewrite both files
    H.update_tests(jp, 10, 1, 2, scope="all")
    again = json.loads(jp.read_text())
    assert again["tests"] == {"passed": 10, "failed": 1, "skipped": 2} and again["tests_scope"] == "all"
    assert again["rows"] == got["rows"]
    assert "passed 10, failed 1, skipped 2" in mp.read_text()


def test_results_doc_default_tests():
    doc = H.results_doc([], env=H.environment("cpu"), peak_copy_gbps=None)
    assert doc["tests"] == {"passed": None, "failed": None, "skipped": None}


def test_sanitize_device_name():
    assert H.sanitize_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert H.sanitize_name("NVIDIA H200") == "nvidia-h200"
    assert H.sanitize_name("  / ") == "unknown"
    assert H.device_label("cpu") == "cpu"


def test_table_ratio_and_skips():
    text = H.format_table(_rows(), peak_gbps=1000.0)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["op", "backend", "workload"]
    peft = next(l for l in lines if "peft-loop" in l)
    # "vs lk" is followed by graph us, kernel us, kernel % peak: 400 us / 100 us of the lorakern torch row
    assert peft.split()[-4] == "4.00"
    torch_line = next(l for l in lines if l.startswith("add_lora  torch "))
    assert torch_line.split()[-4] == "1.00"
    assert "vllm (1 row): vllm not importable" in text
    assert "1000.0 GB/s" in text


# ------------------------------------------------------------------------------------------------ run_case
def test_run_case_never_fakes_numbers(monkeypatch):
    """A baseline that raises and one that computes the wrong thing both become skipped rows with the reason."""

    def boom(out, x, *a, **k):
        raise RuntimeError("kernel not there")

    def wrong(out, x, *a, **k):
        out.add_(1.0)
        return out

    def prep(*a):
        return None

    monkeypatch.setitem(B.BASELINES, "boom", B.Baseline("boom", boom, prep))
    monkeypatch.setitem(B.BASELINES, "wrong", B.Baseline("wrong", wrong, prep))
    case = C.Case("t", "uniform", 8, 32, (16, 8), "4", 4, torch.float32)
    rows = C.run_case(case, "cpu", backends=("torch",), baselines=("boom", "wrong", "peft-loop"), peers=("vllm",),
                      timing=C.TimingConfig(1, 3, 1.0, 1), peak_gbps=10.0)
    by = {r["backend"]: r for r in rows}
    assert by["torch"]["median_us"] > 0 and by["peft-loop"]["median_us"] > 0
    assert by["boom"]["median_us"] is None and "kernel not there" in by["boom"]["skipped"]
    assert by["wrong"]["median_us"] is None and by["wrong"]["skipped"].startswith("wrong result")
    assert by["vllm"]["median_us"] is None and "CUDA" in by["vllm"]["skipped"]
    assert all(r["bytes"] == rows[0]["bytes"] > 0 for r in rows)


def test_backend_refusal_is_a_skipped_row():
    case = C.Case("t", "distinct", 4, 32, (16,), "4", 4, torch.float32)
    rows = C.run_case(case, "cpu", backends=("cuda",), baselines=(), peers=(), timing=C.TimingConfig(1, 2, 1.0, 1))
    assert len(rows) == 1 and rows[0]["backend"] == "cuda"
    assert rows[0]["median_us"] is None and rows[0]["skipped"]


@pytest.mark.skipif(not CUDA_RUNS or HAS_CUDA, reason="needs the CPU emulator of the CUDA kernels")
def test_forced_path_variants_are_rows_of_their_own(monkeypatch):
    """``cuda-gather`` / ``cuda-segment`` / ``cuda-fused`` (and the triton ones): the backend with its path (and
    segment kernels) forced, checked and timed as rows of their own; the plain backend after them runs with the
    path left to the plan again, and the caller's settings are back afterwards."""
    monkeypatch.setenv("LORAKERN_CUDA_EMULATE", "1")
    monkeypatch.delenv("LORAKERN_TRITON_PATH", raising=False)
    monkeypatch.delenv("LORAKERN_CUDA_SEGMENT", raising=False)
    case = C.Case("t", "zipf:1.5", 24, 32, (16, 8), "4", 4, torch.float16)
    seen, modes = [], []
    from lorakern import cuda_backend

    real = cuda_backend._use_segment
    monkeypatch.setattr(cuda_backend, "_use_segment", lambda info, *a: seen.append(info[2]) or real(info, *a))
    real_mode = cuda_backend._segment_mode
    monkeypatch.setattr(cuda_backend, "_segment_mode", lambda *a: modes.append(real_mode(*a)) or modes[-1])
    rows = C.run_case(case, "cpu", backends=("cuda-segment", "cuda-fused", "cuda"), baselines=(), peers=(),
                      timing=C.TimingConfig(0, 1, 1.0, 1))
    assert [r["backend"] for r in rows] == ["cuda-segment", "cuda-fused", "cuda"]
    assert all(r["median_us"] is not None and "emulator" in (r.get("note") or "") for r in rows), rows
    assert 1 in seen and seen[-1] == 0  # segment forced first, then the plan's choice (gather at 6 tokens/adapter)
    assert "split" in modes and "fused" in modes
    assert "LORAKERN_TRITON_PATH" not in os.environ and "LORAKERN_CUDA_SEGMENT" not in os.environ


def test_case_lists():
    quick = C.quick_cases()
    assert quick[0].T == min(c.T for c in quick) and len(quick[0].n_sizes) == 1
    assert {c.workload for c in quick} == {"distinct", "uniform", "zipf:1.5", "identical"}
    full = C.full_cases()
    assert any(c.name == "decode-qkv" and c.n_sizes == (4096, 1024, 1024) and c.T == 256 for c in full)
    assert all(c.dtype == torch.bfloat16 and (c.K == 4096 or c.name.endswith("qwen3moe")) for c in full)
    assert any(c.name == "decode-qkv-qwen3moe" and c.K == 2048 for c in full)


# ------------------------------------------------------------------------------------------------ CLI
def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_cli_help_lists_bench():
    r = subprocess.run([sys.executable, "-m", "lorakern", "--help"], capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "bench" in r.stdout


def test_cli_bench_quick_end_to_end(tmp_path):
    out = tmp_path / "results"
    r = subprocess.run(
        [sys.executable, "-m", "lorakern", "bench", "--quick", "--backends", "torch", "--out", str(out)],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, list(out.iterdir())
    doc = json.loads(files[0].read_text())
    assert doc["complete"] is True and doc["mode"] == "quick"
    assert doc["peak_copy_gbps"] > 0
    measured = [row for row in doc["rows"] if row["median_us"] is not None]
    backends = {row["backend"] for row in measured}
    assert {"torch", "torch-gather-bmm", "peft-loop"} <= backends
    assert {row["backend"] for row in doc["rows"]} <= {"torch", "torch-gather-bmm", "peft-loop", "vllm",
                                                      "flashinfer", "sglang"}
    assert len({(row["workload"], row["T"], row["slices"]) for row in measured}) == len(C.quick_cases())
    assert (out / (files[0].stem + ".md")).exists()
    assert "median us" in r.stdout and "peak copy bandwidth" in r.stdout
    assert "results written to" in r.stderr


def test_cli_rejects_unknown_backend(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lorakern", "bench", "--quick", "--backends", "nope", "--out",
                        str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode != 0 and "unknown backend nope" in (r.stderr + r.stdout)


@pytest.mark.gpu
def test_measure_kernels_splits_calls_at_the_flush():
    """Kernel timing: one sample per call, each the sum of that call's kernels (two here), flush excluded."""
    from lorakern.bench.harness import measure_kernels

    a = torch.randn(1 << 20, device="cuda")
    one = measure_kernels(lambda: a.mul_(1.0), device="cuda", reps=12)
    two = measure_kernels(lambda: (a.mul_(1.0), a.add_(0.0)), device="cuda", reps=12)
    assert one.reps == 12 and two.reps == 12
    assert 0 < one.median_us < two.median_us < 100 * one.median_us


@pytest.mark.gpu
def test_measure_kernels_read_flush_leaves_the_flush_out(monkeypatch):
    """LORAKERN_BENCH_FLUSH=read applies to the kernel time too (it used to flush by a 128 MiB copy whatever the
    mode): the 256 MiB read (~90 us on an H100) is not counted in a call of one small kernel, and two kernels
    still cost more than one."""
    from lorakern.bench.harness import measure_kernels

    monkeypatch.setenv("LORAKERN_BENCH_FLUSH", "read")
    a = torch.randn(1 << 16, device="cuda")
    one = measure_kernels(lambda: a.mul_(1.0), device="cuda", reps=12)
    two = measure_kernels(lambda: (a.mul_(1.0), a.add_(0.0)), device="cuda", reps=12)
    assert one.reps == 12 and two.reps == 12
    assert 0 < one.median_us < two.median_us < 40.0


def test_flush_records_mark_copies_and_drop_the_read_flush():
    """measure_kernels' records: a device-to-device copy marks each flush; the read flush's kernels (by name) are
    neither a flush nor part of a call; everything else is the call's."""
    from lorakern.bench.harness import flush_records, split_calls

    ev = [(0, "reduce_kernel<amax>", 90.0), (1, "Memcpy DtoD (Device -> Device)", 1.0), (2, "dense_gather_kernel", 5.0),
          (3, "FillFunc", 1.0), (4, "reduce_kernel<amax>", 90.0), (5, "Memcpy DtoD (Device -> Device)", 1.0),
          (6, "dense_gather_kernel", 7.0)]
    recs = flush_records(ev, frozenset({"reduce_kernel<amax>"}))
    assert recs == [(1, True, 1.0), (2, False, 5.0), (3, False, 1.0), (5, True, 1.0), (6, False, 7.0)]
    assert split_calls(recs) == [6.0, 7.0]
    assert split_calls(flush_records(ev)) == [96.0, 7.0]  # without the drop the read would count in a call


def test_kernel_time_splits_calls_at_each_flush():
    """measure_kernels' grouping: kernels between two flush copies are one call; out-of-order records sorted;
    records before the first flush ignored."""
    from lorakern.bench.harness import split_calls

    recs = [(5, False, 1.0), (0, False, 9.0), (1, True, 100.0), (2, False, 2.0), (3, False, 3.0), (4, True, 90.0),
            (6, True, 70.0), (7, True, 80.0), (8, False, 4.0)]
    assert split_calls(recs) == [5.0, 1.0, 0.0, 4.0]
    assert split_calls([(0, False, 1.0)]) == []


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_gpu_check_steps_stop_at_the_deadline(tmp_path):
    """bench/gpu_check.sh cuts every step to what is left before DEADLINE_S (the lent machine stops a call at 600 s,
    and only a packed $OUT comes back whole): a step that would run past it is skipped, logged, and the script
    still reaches its end (the packing) with a non-zero status. A fake python stands in for every step."""
    fake = tmp_path / "py"
    fake.write_text("#!/usr/bin/env bash\nsleep 1\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake), "SKIP_INSTALL": "1", "STEPS": "tune",
           "DEADLINE_S": "12", "PATH": os.environ.get("PATH", "")}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=60)
    log = (out / "gpu_check.log").read_text()
    assert r.returncode != 0, log
    assert re.search(r"=== versions: rc=0", log), log
    assert re.search(r"=== pytest-cuda: skipped, -?\d+s left of DEADLINE_S=12", log), log
    assert "=== done" in log or "done: exit status" in log, log


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_gpu_check_tests_step_logs_and_resumes(tmp_path):
    """STEPS=tests with TESTS_DONE (a cut call's tests-log.tsv): pytest gets LORAKERN_TESTS_DONE, the returned log is
    both calls' lines, and the counts recorded are the whole suite's. A fake pytest stands in for the suite (it
    writes two log lines and a junit file); everything else runs on the real python."""
    fake = tmp_path / "py"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1 $2" = "-m pytest" ]; then
    echo "done=${{LORAKERN_TESTS_DONE:-}} log=$LORAKERN_TEST_LOG" >> "{tmp_path}/pytest-calls"
    printf 'passed\\t1.5\\ttests/x.py::b\\nfailed\\t2.0\\ttests/x.py::c\\n' >> "$LORAKERN_TEST_LOG"
    for a in "$@"; do case "$a" in --junitxml=*) echo '<testsuite tests="2" failures="1" errors="0" skipped="0"/>' \\
        > "${{a#--junitxml=}}";; esac; done
    exit 1
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    prev = tmp_path / "prev-log.tsv"
    prev.write_text("passed\t3.0\ttests/x.py::a\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake), "SKIP_INSTALL": "1", "STEPS": "tests",
           "TESTS_DONE": str(prev), "PATH": os.environ.get("PATH", "")}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    log = (out / "gpu_check.log").read_text()
    assert r.returncode != 0, log  # the fake suite failed one test
    calls = (tmp_path / "pytest-calls").read_text()
    assert f"done={prev} log={out / 'tests-log.tsv'}" in calls, calls
    assert (out / "tests-log.tsv").read_text().splitlines() == [
        "passed\t3.0\ttests/x.py::a", "passed\t1.5\ttests/x.py::b", "failed\t2.0\ttests/x.py::c"]
    assert "resuming: 1 tests already run" in log, log
    assert "tests (full suite): passed failed skipped = 2 1 0" in log, log
    assert "3 tests logged: 2 passed, 1 failed, 0 skipped" in log, log
    assert "failed  tests/x.py::c" in log, log


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_sweep_variants_builds_first_once_per_macro_set(tmp_path):
    """bench/sweep_variants.sh makes every build before the first profile, BUILD_JOBS at a time and once per
    distinct set of macros, profiles each variant on its own build (with its run-time settings), skips a variant
    whose build failed, and puts the default build back at the end. A fake python stands in for the build (it
    writes the macros into the .so, and fails on one of them) and for the profile (it records which .so is
    installed)."""
    so = tmp_path / "site" / "_C.so"
    so.parent.mkdir()
    so.write_text("installed\n")
    calls = tmp_path / "calls"
    fake = tmp_path / "py"
    fake.write_text(f"""#!/usr/bin/env bash
case "$1" in
  -c) echo "{so}" ;;
  tools/cuda_build.py)
    echo "build-start $LORAKERN_NVCC_DEFINES" >> "{calls}"; sleep 1
    case "$LORAKERN_NVCC_DEFINES" in *EARLY_OUT*) echo "ptxas warning : spill"; exit 1;; esac
    mkdir -p "$(dirname "$2")"; echo "defs=$LORAKERN_NVCC_DEFINES" > "$2"
    echo "build-end $LORAKERN_NVCC_DEFINES" >> "{calls}" ;;
  bench/profile_add_lora.py)
    echo "profile $(cat "{so}") env=${{LORAKERN_CUDA_SEGMENT:-}}" >> "{calls}"
    for a in "$@"; do case "$prev" in --json) echo "[]" > "$a";; esac; prev="$a"; done ;;
  -) cat > /dev/null ;;
esac
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake), "BUILD_JOBS": "3", "PATH": os.environ.get("PATH", "")}
    r = subprocess.run(["bash", str(REPO / "bench" / "sweep_variants.sh"), "gather-guarded", "seg-fused",
                        "gather-early-out", "gather-2cta", "default"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = calls.read_text().splitlines()
    builds = [ln for ln in lines if ln.startswith("build-start")]
    # default, guarded, early-out, 2cta: seg-fused (no macros) and the second default reuse the default build
    assert sorted(builds) == sorted(["build-start ", "build-start LORAKERN_GATHER_GUARDED_SHRINK=1",
                                     "build-start LORAKERN_GATHER_EARLY_OUT=1",
                                     "build-start LORAKERN_GATHER_DECODE_CTAS=2"]), lines
    first_profile = next(i for i, ln in enumerate(lines) if ln.startswith("profile"))
    assert all(not ln.startswith("build") for ln in lines[first_profile:]), lines  # builds all came first
    assert [ln.split()[0] for ln in lines[:4]] == ["build-start"] * 3 + ["build-end"], lines  # 3 at a time
    assert [ln for ln in lines if ln.startswith("profile")] == [
        "profile defs=LORAKERN_GATHER_GUARDED_SHRINK=1 env=", "profile defs= env=fused",
        "profile defs=LORAKERN_GATHER_DECODE_CTAS=2 env=", "profile defs= env="], lines
    assert "build failed (or a ptxas warning)" in r.stdout, r.stdout
    assert "=== builds: 4 in" in r.stdout, r.stdout
    assert so.read_text() == "defs=\n"  # the default build put back


def test_sweep_summary_fits_the_decode_family(tmp_path):
    """bench/sweep_summary.py: the table, and per variant the line time = fixed + bytes / rate through its
    decode-family rows (here session 4's kernel times at ranks 8, 16, 128: 15.x us + 2.7 TB/s), none for a
    variant with a wrong decode row or with one rank only."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import sweep_summary as SS
    finally:
        sys.path.remove(str(REPO / "bench"))
    tail = " distinct T=256 K=4096 N=4096/1024/1024 r="

    def row(case, r, mb, us, wrong=""):
        return {"case": f"{case}{tail}{r}", "graph_us": us + 5.0, "bytes": int(mb * 1e6), "kernels": [["k", us]],
                "wrong": wrong}

    fam = [row("rank-8-qkv", 8, 83.894, 45.489), row("decode-qkv", 16, 159.4, 74.609),
           row("rank-128-qkv", 128, 1216.479, 461.944)]
    (tmp_path / "sweep-default.json").write_text(json.dumps(fam + [
        {"case": "prefill uniform T=8192 K=4096 N=4096 r=64", "graph_us": 192.5, "bytes": 218_107_904,
         "kernels": [["a", 55.8], ["b", 131.5]], "wrong": ""}]))
    (tmp_path / "sweep-bad.json").write_text(json.dumps([fam[0], row("decode-qkv", 16, 159.4, 60.0, "max err 3"),
                                                        ]))
    (tmp_path / "sweep-one.json").write_text(json.dumps([fam[1]]))
    fixed, rate, n = SS.fit(fam, "kernels")
    assert n == 3 and 14.0 < fixed < 17.0 and 2650 < rate < 2800, (fixed, rate)
    mixed = {"case": "mixed-ranks-qkv" + tail + "8-128", "graph_us": 321.4, "bytes": 642_776_284,
             "kernels": [["k", 316.39]], "wrong": ""}
    assert SS._family_case(mixed["case"]) is None  # not a point of the fit
    assert 24.0 < SS.excess(fam + [mixed], "kernels", SS.fit(fam, "kernels")) < 28.0
    assert SS.excess(fam, "kernels", SS.fit(fam, "kernels")) is None
    g_fixed, g_rate, _ = SS.fit(fam, "graph")
    assert abs(g_fixed - fixed - 5.0) < 1e-6 and abs(g_rate - rate) < 1e-6
    assert SS.fit([fam[0], row("decode-qkv", 16, 159.4, 60.0, "max err 3")], "kernels") is None
    assert SS.fit([fam[1]], "kernels") is None
    # the flushed median (profile_add_lora.py's kernel_us) wins over the one call's kernels; NaN falls back
    assert SS._kernel_us({**fam[0], "kernel_us": 44.0}) == 44.0
    assert SS._kernel_us({**fam[0], "kernel_us": float("nan")}) == 45.489
    text = SS.summary(str(tmp_path), ["default", "bad", "one", "missing"])
    assert "prefill uniform" in text and "187.3" in text and "WRONG max err 3" in text
    assert "missing              (no result)" in text
    fit_lines = [ln for ln in text.splitlines() if ln.split()[:1] in (["default"], ["bad"], ["one"])
                 and ln.split()[1] in ("kernels", "graph")]
    assert [ln.split()[:2] for ln in fit_lines] == [["default", "kernels"], ["default", "graph"]], text


def test_targets_fit_the_decode_family_of_the_recorded_h100_run():
    """`targets`' fit on session 4's recorded run (3a57e06): the cuda kernel time is 15.4 us + bytes at 2.72 TB/s
    (92 % of copy), so decode-qkv's 80 % needs the fixed part down to 8.5 us; the mixed-ranks batch runs 26 % over
    what its bytes predict."""
    from lorakern.bench import targets as TG

    doc = json.loads((REPO / "bench" / "results" / "nvidia-h100-80gb-hbm3-20261122-3a57e06.json").read_text())
    fits = TG.rank_fit(doc)
    k = next(f for f in fits if f["kind"] == "fit" and f["backend"] == "cuda" and f["time"] == "kernel")
    assert (k["fixed_us"], k["rate_pct"], k["fixed_for_80_us"], k["decode_us"]) == (15.4, 91.6, 8.5, 74.609), k
    assert k["ranks"] == ["8", "16", "64", "128"] and k["max_resid_pct"] < 2.0
    m = next(f for f in fits if f["kind"] == "predicted" and f["backend"] == "cuda" and f["time"] == "kernel")
    assert m["case"] == "mixed-ranks-qkv" and m["excess_pct"] == 25.8, m
    tri = next(f for f in fits if f["kind"] == "fit" and f["backend"] == "triton" and f["time"] == "kernel")
    assert tri["fixed_for_80_us"] < 0  # Triton's rate alone is below 80 %
    report = TG.format_report(doc, TG.check(doc))
    assert "| cuda | kernel | 8,16,64,128 | 15.4 | 2723.3 | 91.6 |" in report, report
    # a run without the family (or with two ranks only) prints no fit
    few = {**doc, "rows": [r for r in doc["rows"] if r["case"] in ("decode-qkv", "rank-8-qkv")]}
    assert TG.rank_fit(few) == [] and "decode family" not in TG.format_report(few, TG.check(few))


def test_targets_path_crossover_table():
    """`targets`' path table over the crossover-<m> cases: per family the fastest forced path at each mean tokens
    per adapter, the path today's rule (GATHER_MAX_MEAN_TOKENS = 16) takes, and a call to retune when they
    disagree; a family with one path row per case, or no crossover case, gives nothing."""
    from lorakern.bench import cases as C
    from lorakern.bench import targets as TG

    assert [c.name for c in C.full_cases() if c.name.startswith("crossover")] == [
        f"crossover-{m}" for m in C.CROSSOVER_MEANS]

    def row(case, backend, adapters, kernel_us):
        return {"case": case, "workload": "uniform", "backend": backend, "T": 1024, "adapters": adapters,
                "median_us": kernel_us + 10, "kernel_us": kernel_us, "bytes": 1}

    rows = []
    # cuda: gather wins up to 32 tokens per adapter (the rule switches at 16: disagrees at 32)
    for m, g, sg, fu in ((8, 20.0, 40.0, 45.0), (16, 30.0, 35.0, 33.0), (32, 38.0, 40.0, 39.0), (64, 60.0, 45.0, 41.0)):
        rows += [row(f"crossover-{m}", "cuda-gather", 1024 // m, g), row(f"crossover-{m}", "cuda-segment", 1024 // m, sg),
                 row(f"crossover-{m}", "cuda-fused", 1024 // m, fu), row(f"crossover-{m}", "cuda", 1024 // m, g)]
    # triton: one path only -> no comparison
    rows.append(row("crossover-8", "triton-gather", 128, 50.0))
    doc = {"device": "x", "commit": "c", "peak_copy_gbps": 3000.0, "rows": rows}
    res = TG.path_crossover(doc)
    paths = [d for d in res if d["kind"] == "path"]
    assert [(d["mean_tokens"], d["fastest"], d["rule"], d["agrees"]) for d in paths] == [
        (8.0, "gather", "gather", True), (16.0, "gather", "gather", True), (32.0, "gather", "segment", False),
        (64.0, "fused", "segment", True)]
    assert all(d["family"] == "cuda" for d in paths)
    (th,) = [d for d in res if d["kind"] == "threshold"]
    assert (th["family"], th["current"], th["largest_gather_win"], th["agrees"]) == ("cuda", 16, 32.0, False)
    report = TG.format_report(doc, TG.check(doc))
    assert "| cuda | crossover-32 | 32.0 | 38.0 | 40.0 | 39.0 | gather | segment | DISAGREES |" in report, report
    assert "retune GATHER_MAX_MEAN_TOKENS" in report
    assert TG.path_crossover({"rows": [r for r in rows if r["backend"] in ("cuda", "triton-gather")]}) == []


# ------------------------------------------------------------------------------------------------ targets
def test_targets_on_the_recorded_h100_run():
    """`python -m lorakern targets` on session 4's recorded run (3a57e06): the numbers the closing notes quoted."""
    from lorakern.bench import targets as TG

    doc = json.loads((REPO / "bench" / "results" / "nvidia-h100-80gb-hbm3-20261122-3a57e06.json").read_text())
    res = {(r["target"].split(":")[0], r["time"]): r for r in TG.check(doc) if r["kind"] == "target"}
    dec = res[("decode", "kernel")]
    assert (dec["backend"], dec["value"], dec["passed"], dec["vs_triton"]) == ("cuda", 71.9, False, 1.65)
    assert dec["vs_triton_passed"] is True
    pre = res[("prefill", "graph")]
    assert (pre["value"], pre["passed"], pre["vs_triton"], pre["vs_triton_passed"]) == (38.24, False, 1.34, False)
    mix = res[("mixed ranks", "kernel")]
    assert mix["value"] == round(68.4 / 85.7, 3) and mix["passed"] is False
    text = TG.format_report(doc, TG.check(doc))
    assert "| decode: >= 80 % of copy bandwidth | kernel | cuda | 71.90 | 80.00 | fail | 1.65 | PASS |" in text


def _row(case, backend, workload="distinct", kernel=None, pct=None, graph=None):
    return {"case": case, "backend": backend, "workload": workload, "median_us": 10.0, "skipped": None,
            "kernel_us": kernel, "kernel_pct_peak": pct, "graph_us": graph, "graph_pct_peak": pct, "pct_peak": pct}


def test_targets_pick_the_fastest_compiled_row_and_compare_tile_orders(tmp_path):
    from lorakern.bench import targets as TG

    doc = {"device": "dev", "commit": "abc", "peak_copy_gbps": 3000.0, "rows": [
        _row("decode-qkv", "cuda", kernel=60.0, pct=81.0), _row("decode-qkv", "triton", kernel=100.0, pct=48.0),
        _row("prefill", "cuda", "uniform", kernel=200.0, pct=35.0),
        _row("prefill", "cuda-fused", "uniform", kernel=90.0, pct=75.0),
        _row("prefill", "triton", "uniform", kernel=250.0, pct=28.0),
        _row("mixed-ranks-qkv", "cuda", kernel=260.0, pct=80.0, graph=270.0),
        _row("mixed-ranks-qkv-slot-order", "cuda", kernel=316.0, pct=66.0, graph=320.0),
        _row("rank-64-qkv", "cuda", kernel=240.0, pct=85.0)]}
    res = {(r["target"].split(":")[0], r["time"]): r for r in TG.check(doc) if r["kind"] == "target"}
    assert res[("decode", "kernel")]["passed"] and res[("decode", "kernel")]["vs_triton"] == round(100 / 60, 2)
    assert res[("prefill", "kernel")]["backend"] == "cuda-fused" and res[("prefill", "kernel")]["passed"]
    assert res[("prefill", "kernel")]["vs_triton"] == round(250 / 90, 2)
    assert res[("mixed ranks", "kernel")]["value"] == round(80 / 85, 3) and res[("mixed ranks", "kernel")]["passed"]
    assert res[("mixed ranks", "graph")]["passed"] is None  # no graph time in the reference case: not judged
    order = [r for r in TG.check(doc) if r["kind"] == "order"]
    assert [(r["case"], r["time"], r["speedup"]) for r in order] == [
        ("mixed-ranks-qkv", "kernel", round(316 / 260, 3)), ("mixed-ranks-qkv", "graph", round(320 / 270, 3))]
    p = tmp_path / "run.json"
    p.write_text(json.dumps(doc))
    r = subprocess.run([sys.executable, "-m", "lorakern", "targets", str(p)], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0 and "| mixed-ranks-qkv | cuda | kernel | 316.0 | 260.0 | 1.215 |" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lorakern", "targets", str(tmp_path / "missing.json")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "cannot read" in r.stdout
