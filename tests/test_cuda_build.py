"""The CUDA extension compiles with nvcc for every default arch, with no ptxas spill or local-memory warning, and
its binding agrees with the Python packing — checked on a machine without a GPU (CI). Numerics of the CUDA
kernels are checked by the GPU tests (``-m gpu``)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import cuda_build  # noqa: E402

needs_nvcc = pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="nvcc not installed")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "_C.so"
    text = cuda_build.build(out, out.parent / "obj")
    return out, text


@needs_nvcc
def test_every_cu_compiles_without_spills(built):
    out, text = built
    assert out.exists()
    n_units = len(cuda_build.sources())
    assert n_units >= 4 and text.count("nvcc ") >= n_units
    for arch in cuda_build.archs():
        assert f"sm_{arch}" in text  # ptxas ran for every arch of the default list
    assert "Compiling entry function" in text
    warnings = cuda_build.ptxas_warnings(text)
    assert not warnings, "ptxas warnings (spills / local memory):\n" + "\n".join(warnings)


@needs_nvcc
def test_decode_shrink_issues_its_loads_together(built):
    """The decode kernel's shrink issues several 16-byte loads before using them, on every arch (tools/sass_check.py:
    a branch per unrolled step once made it one A load per warp at a time, the likely cause of its latency-bound
    ~72 % of the copy bandwidth), and the fused segment kernel's K loops have no branch among their ldmatrix and
    mma (a branch per column block once kept one block's ldmatrix from overlapping the previous block's mma); read
    from the machine code, no GPU needed."""
    import sass_check

    if sass_check.find_cuobjdump() is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or the triton wheel)")
    out, _ = built
    lines, ok = sass_check.report(out)
    assert ok, "\n".join(lines)
    kernels = len(sass_check.DECODE_KERNELS) + len(sass_check.FUSED_KERNELS)
    assert len(lines) == kernels * len(cuda_build.archs())  # each kernel on every arch
    assert all("4 K loop(s)" in ln for ln in lines if ln.startswith("fused")), lines  # one per block count


@needs_nvcc
def test_extension_imports_without_gpu_and_matches_packing(built):
    out, _ = built
    spec = importlib.util.spec_from_file_location("_C", out)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    assert ext.supports_dense_ops()
    assert ext.archs().split(",") == cuda_build.archs()
    from lorakern.cuda_backend import _DENSE_FIELDS, _fields

    assert ext.num_fields == len(_DENSE_FIELDS)
    # num_tiles = 0: the launcher returns before any CUDA call, so this runs without a GPU
    ext.dense_gather(_fields({}), 1, 0, 1, True, 0)
    with pytest.raises(ValueError, match="fields"):
        ext.dense_gather(_fields({})[:-1], 1, 0, 1, True, 0)
    with pytest.raises(ValueError, match="topk"):
        ext.dense_gather(_fields({"topk": 0}), 1, 3, 1, True, 0)


def test_vector_path_alignment_rules():
    import torch

    from lorakern.cuda_backend import _vec_ok

    a = torch.empty(64, 128, dtype=torch.bfloat16)
    assert _vec_ok(2, [a])
    assert not _vec_ok(2, [a[:, 1:]])          # misaligned base
    assert not _vec_ok(2, [a[:, :100]])        # width not a multiple of 8 elements
    assert not _vec_ok(2, [a.t()])             # inner stride != 1
    assert not _vec_ok(2, [a], offsets=[4])    # slice offset not a multiple of 8
    assert _vec_ok(4, [torch.empty(8, 12)])    # fp32: 4 per vector


def test_relative_output_lands_where_asked(tmp_path, monkeypatch):
    """ninja runs in the build folder: a relative output path (or build folder) is resolved against the caller's
    working directory first, not the build folder (a relative output once landed inside the build folder)."""
    monkeypatch.chdir(tmp_path)
    ninja_file = cuda_build._write_ninja(Path("obj"), Path("out/_C_emu.so"), "c++", [], "c++ -shared",
                                         [str(cuda_build.CSRC / "bindings.cpp")])
    text = ninja_file.read_text()
    assert ninja_file == (tmp_path / "obj" / "build.ninja")
    assert f"build {tmp_path / 'out' / '_C_emu.so'}: link" in text.replace("$ ", " ").replace("$:", ":")
    assert str(tmp_path / "obj" / "bindings.cpp.o") in text.replace("$ ", " ").replace("$:", ":")


def test_sweep_variants_are_well_formed_macro_sets(monkeypatch):
    """Every variant bench/sweep_variants.sh (and tools/variant_check.py --all) builds is a set of LORAKERN_* macros
    the build accepts, and each macro is one the kernel headers define a default for."""
    import variant_check

    variants = variant_check.sweep_variants()
    assert {"seg-mma", "gather-xsmem", "gather-prefetch", "seg-bf16-2terms", "seg-fused-s4",
            "seg-fused-s8", "seg-fused-o4", "gather-guarded", "gather-2cta", "gather-early-out"} <= set(variants)
    assert "seg-fused" not in variants  # run-time settings only: the default build
    headers = "".join((cuda_build.CSRC / "include" / "lorakern" / h).read_text()
                      for h in ("dense_segment.cuh", "dense_gather.cuh", "dense_dispatch.h"))
    for name, defs in variants.items():
        monkeypatch.setenv("LORAKERN_NVCC_DEFINES", defs)
        flags = cuda_build.defines()
        assert flags, name
        for f in flags:
            assert f"#ifndef {f[2:].split('=')[0]}" in headers, (name, f)
    monkeypatch.setenv("LORAKERN_NVCC_DEFINES", "NOT_OURS=1")
    with pytest.raises(ValueError, match="LORAKERN_NVCC_DEFINES"):
        cuda_build.defines()
