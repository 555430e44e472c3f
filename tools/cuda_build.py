"""Build of the optional CUDA extension ``lorakern._C`` with nvcc through ninja (used by setup.py and by the CI
compile test). Torch-free: pybind11 + the CUDA runtime (linked statically), so it builds against any torch,
including a CPU-only one, and imports without a GPU.

Environment:
  LORAKERN_SKIP_CUDA=1         do not build the extension (torch and triton backends only)
  LORAKERN_CUDA_ARCHS          semicolon/comma list, default "80;89;90a" (sm_80, sm_89, sm_90a)
  CUDA_HOME / CUDA_PATH        toolkit root (default: the nvcc on PATH, then /usr/local/cuda)
  LORAKERN_NVCC_THREADS        nvcc --threads (default 1)
  LORAKERN_NVCC_DEFINES        extra -D definitions for nvcc and the emulation build, space-separated (the kernels'
                               tuning macros, e.g. "LORAKERN_SEG_STAGES=3"; bench/sweep_segment.sh)
  LORAKERN_SKIP_CUDA_EMU=1     do not build ``lorakern._C_emu``, the same kernels compiled with the host C++
                               compiler for the CPU emulator (csrc/emu/; needs only the toolkit's headers)
  CXX                          host compiler of the emulation build (default c++)
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


def find_cuda_tool(name: str):
    """A CUDA toolkit program (``nvcc``, ``cuobjdump``): under $CUDA_HOME or $CUDA_PATH, on the PATH, or in
    /usr/local/cuda; None if none."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / name).exists():
            return str(Path(home) / "bin" / name)
    found = shutil.which(name)
    if found:
        return found
    if (Path("/usr/local/cuda/bin") / name).exists():
        return str(Path("/usr/local/cuda/bin") / name)
    return None


def find_nvcc():
    return find_cuda_tool("nvcc")


def cuda_include():
    """The toolkit's include directory (cuda_fp16.h, ...), or None."""
    nvcc = find_nvcc()
    roots = [Path(nvcc).resolve().parent.parent] if nvcc else []
    roots += [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    roots.append(Path("/usr/local/cuda"))
    for r in roots:
        if (r / "include" / "cuda_fp16.h").exists():
            return r / "include"
    return None


def archs() -> list:
    raw = os.environ.get("LORAKERN_CUDA_ARCHS", DEFAULT_ARCHS)
    out = [a.strip().replace("sm_", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not out:
        raise ValueError("LORAKERN_CUDA_ARCHS: empty")
    return out


def defines() -> list:
    """-D flags from LORAKERN_NVCC_DEFINES ("NAME=VALUE NAME2=VALUE2"), checked: NAME must be a LORAKERN_ macro."""
    out = []
    for d in os.environ.get("LORAKERN_NVCC_DEFINES", "").split():
        name = d.split("=", 1)[0]
        if not name.startswith("LORAKERN_") or not name.replace("_", "").isalnum():
            raise ValueError(f"LORAKERN_NVCC_DEFINES: {d!r} is not a LORAKERN_* macro definition")
        out.append(f"-D{d}")
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
        *defines(),
        "-I", str(CSRC / "include"), "-I", str(CSRC / "dense"),
        "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"],
    ] + gencode_flags(arch_list)


def _q(s: str) -> str:
    return s.replace(" ", "$ ").replace(":", "$:")


def _write_ninja(build_dir: Path, output: Path, compiler: str, flags: list, link: str, srcs: list) -> Path:
    """A build.ninja compiling each of ``srcs`` to an object with ``compiler`` and linking ``output``. Paths are
    made absolute: ninja runs in ``build_dir``, where a relative ``output`` would land."""
    build_dir = Path(build_dir).resolve()
    output = Path(output).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "ninja_required_version = 1.3",
        f"cc = {compiler}",
        f"flags = {' '.join(flags)}",
        "rule cc",
        "  command = $cc $flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = compile $in",
        "rule link",
        f"  command = {link} $in -o $out",
        "  description = link $out",
    ]
    objs = []
    for src in srcs:
        obj = build_dir / (Path(src).relative_to(CSRC).as_posix().replace("/", "_") + ".o")
        objs.append(_q(str(obj)))
        lines.append(f"build {_q(str(obj))}: cc {_q(src)}")
    lines.append(f"build {_q(str(output))}: link {' '.join(objs)}")
    path = build_dir / "build.ninja"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_ninja(build_dir: Path, output: Path, arch_list) -> Path:
    """The build.ninja of ``lorakern._C`` (nvcc, cudart linked statically)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    return _write_ninja(build_dir, output, nvcc, compile_flags(arch_list), "$cc -shared -cudart static", sources())


def emu_sources() -> list:
    """The emulation build: every kernel .cu (compiled as C++), the binding and the emulator runtime."""
    return sources() + [str(CSRC / "emu" / "emu_runtime.cpp")]


def emu_flags(include: Path) -> list:
    import pybind11

    return [
        "-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-x", "c++", "-DLORAKERN_EMU",
        "-fno-strict-aliasing",  # the kernels read 16-byte vectors through uint4 casts, as CUDA code does
        "-Wall", "-Wno-unknown-pragmas", "-Werror", *defines(),
        "-include", str(CSRC / "emu" / "cuda_emu.h"),
        "-I", str(CSRC / "include"), "-I", str(CSRC / "dense"), "-I", str(CSRC / "emu"), "-isystem", str(include),
        "-isystem", pybind11.get_include(), "-isystem", sysconfig.get_paths()["include"],
    ]


def _ninja(ninja_file: Path, build_dir: Path, jobs, log, what: str) -> str:
    ninja = shutil.which("ninja") or str(Path(sys.executable).parent / "ninja")
    cmd = [ninja, "-f", str(ninja_file), "-v"]
    if jobs:
        cmd += ["-j", str(jobs)]
    r = subprocess.run(cmd, cwd=build_dir, capture_output=True, text=True)
    text = r.stdout + r.stderr
    if log is not None:
        Path(log).write_text(text)
    if r.returncode != 0:
        raise RuntimeError(f"building {what} failed:\n{text[-6000:]}")
    return text


#: extra flags of the emulator's memcheck build: AddressSanitizer reports any out-of-bounds access of a kernel
ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1", "-Wno-maybe-uninitialized"]  # (pybind11 under ASan)


def build_emu(output: Path, build_dir: Path, jobs=None, log=None, srcs=None, extra=()) -> str:
    """Build ``lorakern._C_emu`` (the kernels on the CPU emulator) into ``output`` with the host compiler.

    ``srcs`` replaces :func:`emu_sources` (the emulator's own tests build csrc/emu/selftest.cpp this way);
    ``extra`` flags go to the compiler and the linker (e.g. :data:`ASAN_FLAGS`)."""
    include = cuda_include()
    if include is None:
        raise RuntimeError("the CUDA toolkit headers (cuda_fp16.h) were not found (set CUDA_HOME)")
    cxx = os.environ.get("CXX", "c++")
    ninja_file = _write_ninja(build_dir, output, cxx, emu_flags(include) + list(extra),
                              " ".join([cxx, "-shared", *extra]), srcs or emu_sources())
    return _ninja(ninja_file, build_dir, jobs, log, "lorakern._C_emu")


def build(output: Path, build_dir: Path, jobs=None, log=None) -> str:
    """Build the extension into ``output``; returns the compiler output (ptxas -v report included)."""
    arch_list = archs()
    ninja_file = write_ninja(build_dir, output, arch_list)
    return _ninja(ninja_file, build_dir, jobs, log, f"lorakern._C (archs {arch_list})")


def ptxas_warnings(text: str) -> list:
    """ptxas warnings (spills, local memory) in a build log: CI fails on any."""
    return [ln for ln in text.splitlines() if "ptxas" in ln.lower() and "warning" in ln.lower()]


if __name__ == "__main__":
    if len(sys.argv) > 2 or (len(sys.argv) == 2 and sys.argv[1].startswith("-")):
        print("usage: python tools/cuda_build.py [OUTPUT.so]   (default build/_C.so; objects and build.log beside "
              "it; environment: see the module docstring)", file=sys.stderr)
        sys.exit(2)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "_C.so"
    text = build(out, out.parent / "obj", log=out.parent / "build.log")
    warns = ptxas_warnings(text)
    print("\n".join(warns) if warns else f"built {out} for {archs()} with no ptxas warning")
    sys.exit(1 if warns else 0)
