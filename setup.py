"""Build script. The Python package installs everywhere; the CUDA extension ``lorakern._C`` (csrc/, built with
nvcc through ninja by tools/cuda_build.py) is added whenever a CUDA toolkit is found and LORAKERN_SKIP_CUDA is not
set. Without nvcc the install still works: the torch and triton backends need no compiled code."""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
import cuda_build  # noqa: E402


class NvccBuildExt(build_ext):
    def build_extension(self, ext):
        if ext.name != "lorakern._C":
            return super().build_extension(ext)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "lorakern_C"
        print(f"lorakern: building the CUDA extension for sm_{', sm_'.join(cuda_build.archs())}", flush=True)
        text = cuda_build.build(out, build_dir, log=build_dir / "build.log")
        for w in cuda_build.ptxas_warnings(text):
            print(f"lorakern: {w}", flush=True)


def _extensions():
    if os.environ.get("LORAKERN_SKIP_CUDA", "0") == "1":
        print("lorakern: LORAKERN_SKIP_CUDA=1: not building the CUDA extension", flush=True)
        return []
    if cuda_build.find_nvcc() is None:
        print("lorakern: no CUDA toolkit (nvcc) found: installing without the CUDA extension", flush=True)
        return []
    return [Extension("lorakern._C", sources=[])]


setup(ext_modules=_extensions(), cmdclass={"build_ext": NvccBuildExt})
