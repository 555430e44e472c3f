"""Build script. The Python package installs everywhere; the CUDA extension ``lorakern._C`` (csrc/, built with
nvcc through ninja by tools/cuda_build.py) is added whenever a CUDA toolkit is found and LORAKERN_SKIP_CUDA is not
set. Without nvcc the install still works: the torch and triton backends need no compiled code. The same kernel
sources are also compiled with the host C++ compiler into ``lorakern._C_emu`` (csrc/emu/: the CPU emulator behind
``LORAKERN_CUDA_EMULATE=1``, used by the tests on machines without a GPU) whenever the toolkit's headers are found
and LORAKERN_SKIP_CUDA_EMU is not set."""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
import cuda_build  # noqa: E402


class NvccBuildExt(build_ext):
    def build_extension(self, ext):
        if ext.name not in ("lorakern._C", "lorakern._C_emu"):
            return super().build_extension(ext)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        if ext.name == "lorakern._C_emu":
            # optional (tests of the cuda backend without a GPU): a failed build is reported, not fatal
            print("lorakern: building the CPU emulation of the CUDA kernels (lorakern._C_emu)", flush=True)
            try:
                cuda_build.build_emu(out, Path(self.build_temp).resolve() / "lorakern_C_emu")
            except Exception as e:  # noqa: BLE001
                print(f"lorakern: WARNING: the CPU emulation was not built ({str(e)[-2000:]}); without a GPU the "
                      "cuda backend's tests will be skipped", flush=True)
                out.write_bytes(b"")  # an empty file: setuptools finds its output, Python fails to import it
            return
        build_dir = Path(self.build_temp).resolve() / "lorakern_C"
        print(f"lorakern: building the CUDA extension for sm_{', sm_'.join(cuda_build.archs())}", flush=True)
        text = cuda_build.build(out, build_dir, log=build_dir / "build.log")
        for w in cuda_build.ptxas_warnings(text):
            print(f"lorakern: {w}", flush=True)


def _extensions():
    exts = []
    if os.environ.get("LORAKERN_SKIP_CUDA", "0") == "1":
        print("lorakern: LORAKERN_SKIP_CUDA=1: not building the CUDA extension", flush=True)
    elif cuda_build.find_nvcc() is None:
        print("lorakern: no CUDA toolkit (nvcc) found: installing without the CUDA extension", flush=True)
    else:
        exts.append(Extension("lorakern._C", sources=[]))
    # The same kernels for the CPU emulator (LORAKERN_CUDA_EMULATE=1, tests): needs only the toolkit's headers.
    if os.environ.get("LORAKERN_SKIP_CUDA_EMU", "0") == "1":
        print("lorakern: LORAKERN_SKIP_CUDA_EMU=1: not building the CPU emulation of the kernels", flush=True)
    elif cuda_build.cuda_include() is None:
        print("lorakern: no CUDA headers found: installing without the CPU emulation of the kernels", flush=True)
    else:
        exts.append(Extension("lorakern._C_emu", sources=[]))
    return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": NvccBuildExt})
