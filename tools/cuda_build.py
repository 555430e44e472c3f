"""Build of the optional CUDA extension ``lorakern._C`` with nvcc through ninja (used by setup.py and by the CI
compile test). Torch-free: pybind11 + the CUDA runtime (linked statically), so it builds against any torch,
including a CPU-only one, and imports without a GPU.

Environment:
  LORAKERN_SKIP_CUDA=1         do not build the extension (torch and triton backends only)
  LORAKERN_CUDA_ARCHS          semicolon/comma list, default "80;89;90a" (sm_80, sm_89, sm_90a)
  CUDA_HOME / CUDA_PATH        toolkit root (default: the nvcc on PATH, then /usr/local/cuda)
  LORAKERN_NVCC_THREADS        nvcc --threads (default 1)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;89;90a"
PTXAS_FLAGS = "-v,--warn-on-spills,--warn-on-local-memory-usage"


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda/bin/nvcc"
    return None


def archs() -> list:
    raw = os.environ.get("LORAKERN_CUDA_ARCHS", DEFAULT_ARCHS)
    out = [a.strip().replace("sm_", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not out:
        raise ValueError("LORAKERN_CUDA_ARCHS: empty")
    return out


def gencode_flags(arch_list) -> list:
    flags = []
    for a in arch_list:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def sources() -> list:
    """Every translation unit of the extension: the .cu kernels files and the binding."""
    return sorted(str(p) for p in CSRC.rglob("*.cu")) + [str(CSRC / "bindings.cpp")]


def compile_flags(arch_list) -> list:
    import pybind11

    return [
        "-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr",
        "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
        f"-Xptxas={PTXAS_FLAGS}",
        f"--threads={os.environ.get('LORAKERN_NVCC_THREADS', '1')}",
        "'-DLORAKERN_ARCHS=\"" + ",".join(arch_list) + "\"'",
        "-I", str(CSRC / "include"), "-I", str(CSRC / "dense"),
        "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"],
    ] + gencode_flags(arch_list)


def _q(s: str) -> str:
    return s.replace(" ", "$ ").replace(":", "$:")


def write_ninja(build_dir: Path, output: Path, arch_list) -> Path:
    """A build.ninja compiling each source to an object and linking ``output`` (a Python extension)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = " ".join(compile_flags(arch_list))
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {nvcc}",
        f"flags = {flags}",
        "rule nvcc",
        "  command = $nvcc $flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule link",
        "  command = $nvcc -shared -cudart static $in -o $out",
        "  description = link $out",
    ]
    objs = []
    for src in sources():
        obj = build_dir / (Path(src).relative_to(CSRC).as_posix().replace("/", "_") + ".o")
        objs.append(_q(str(obj)))
        lines.append(f"build {_q(str(obj))}: nvcc {_q(src)}")
    lines.append(f"build {_q(str(output))}: link {' '.join(objs)}")
    path = build_dir / "build.ninja"
    path.write_text("\n".join(lines) + "\n")
    return path


def build(output: Path, build_dir: Path, jobs=None, log=None) -> str:
    """Build the extension into ``output``; returns the compiler output (ptxas -v report included)."""
    arch_list = archs()
    ninja_file = write_ninja(build_dir, output, arch_list)
    ninja = shutil.which("ninja") or str(Path(sys.executable).parent / "ninja")
    cmd = [ninja, "-f", str(ninja_file), "-v"]
    if jobs:
        cmd += ["-j", str(jobs)]
    r = subprocess.run(cmd, cwd=build_dir, capture_output=True, text=True)
    text = r.stdout + r.stderr
    if log is not None:
        Path(log).write_text(text)
    if r.returncode != 0:
        raise RuntimeError(f"building lorakern._C failed (archs {arch_list}):\n{text[-6000:]}")
    return text


def ptxas_warnings(text: str) -> list:
    """ptxas warnings (spills, local memory) in a build log: CI fails on any."""
    return [ln for ln in text.splitlines() if "ptxas" in ln.lower() and "warning" in ln.lower()]


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "_C.so"
    text = build(out, out.parent / "obj", log=out.parent / "build.log")
    warns = ptxas_warnings(text)
    print("\n".join(warns) if warns else f"built {out} for {archs()} with no ptxas warning")
    sys.exit(1 if warns else 0)
