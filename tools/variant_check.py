"""Emulator check of the kernels' compile-time tuning variants (docs/cuda.md, "Tuning macros"): for each set of
LORAKERN_NVCC_DEFINES, build lorakern._C_emu with it in a copy of the repository and run the emulated cuda-backend
suites there (the tests of tools/kernel_mutations.py). A variant that breaks a result fails here, before any GPU
time is spent timing it.

    python tools/variant_check.py "LORAKERN_SEG_MMA=1" "LORAKERN_GATHER_X_SMEM=1"
    python tools/variant_check.py --all      # every variant of bench/sweep_variants.sh (~1 minute each, 2 cores)

Needs the CUDA toolkit's headers and a host C++ compiler (as the emulator build does); no GPU. Exit status 1 when
a variant fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import cuda_build  # noqa: E402
from kernel_mutations import TESTS, copy_repo  # noqa: E402


def sweep_variants() -> dict:
    """name -> defines, from the `add NAME "DEFINES" KIND ["ENV"]` lines of bench/sweep_variants.sh (variants
    without defines, the default among them, excluded: they are the default build)."""
    text = (ROOT / "bench" / "sweep_variants.sh").read_text()
    return {m[1]: m[2] for m in re.finditer(r'^add (\S+) "([^"]*)" \w+(?: "[^"]*")?$', text, re.M) if m[2]}


def check(defines: str, tmp: Path, tag: str) -> bool:
    work = tmp / f"repo-{tag}"
    copy_repo(work)
    so = work / "lorakern" / f"_C_emu{sysconfig.get_config_var('EXT_SUFFIX')}"
    env = dict(os.environ, LORAKERN_NVCC_DEFINES=defines)
    build = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; sys.path.insert(0, 'tools'); "
                            f"import cuda_build as c; c.build_emu(Path({str(so)!r}), Path({str(tmp / ('obj-' + tag))!r}))"],
                           cwd=work, env=env, capture_output=True, text=True)
    if build.returncode != 0 or not so.exists():
        print(f"{defines}: the emulator does not build\n{(build.stdout + build.stderr)[-2000:]}", flush=True)
        return False
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=work,
                       capture_output=True, text=True)
    where = subprocess.run([sys.executable, "-c", "import lorakern.backends as b; print(b.cuda_emulator().__file__)"],
                           cwd=work, capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(work)):
        print(f"{defines}: the suites loaded another emulator ({where}); not a check of the variant", flush=True)
        return False
    summary = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    failed = [ln for ln in r.stdout.splitlines() if ln.startswith("FAILED")]
    print(f"{defines}: {'ok' if r.returncode == 0 else 'FAILED'}: {summary}", flush=True)
    for ln in failed[:10]:
        print(f"    {ln}")
    return r.returncode == 0


def main(argv) -> int:
    if not argv:
        print(__doc__)
        return 2
    sets = list(sweep_variants().values()) if argv == ["--all"] else argv
    for d in sets:  # refuse a malformed set before any build
        os.environ["LORAKERN_NVCC_DEFINES"] = d
        cuda_build.defines()
    os.environ.pop("LORAKERN_NVCC_DEFINES", None)
    ok = True
    with tempfile.TemporaryDirectory(prefix="lorakern-var-") as tmp:
        for i, d in enumerate(sets):
            ok &= check(d, Path(tmp), str(i))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
