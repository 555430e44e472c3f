"""The main job, ``python -m lorakern demo``: a reduced run in a subprocess passes its checks and prints the table;
a run whose pool is corrupted on purpose fails its checks and exits non-zero (the checks can fail)."""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

SMALL = ["--adapters", "8", "--batch", "4", "--batches", "2", "--prompt-len", "12", "--new-tokens", "3", "--reps", "1"]


def test_demo_reduced_run_passes():
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "lorakern", "demo", *SMALL], capture_output=True, text=True, env=env,
                       timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    # the CPU uses the torch backend, even under the interpreter; a GPU the fastest compiled one
    backend = "backend torch" if not torch.cuda.is_available() else ("backend cuda", "backend triton")
    assert any(b in out for b in ((backend,) if isinstance(backend, str) else backend)), out
    assert "8 adapters" in out
    for col in ("distinct", "base tok/s", "LoRA tok/s", "overhead", "max err", "check"):
        assert col in out
    rows = [l for l in out.splitlines() if l.lstrip().startswith(("1 ", "2 "))]
    assert len(rows) == 4 and all(" PASS" in l for l in rows), out
    assert "PASS: generate 4/4 equal" in out and out.rstrip().splitlines()[-1].startswith("result: PASS")
    assert "batch 1/2" in r.stderr and "checking 4 sequences" in r.stderr  # progress goes to stderr


def test_demo_detects_a_corrupted_adapter(tmp_path, capsys):
    from lorakern import demo

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    args = p.parse_args([*SMALL, "--batches", "1", "--corrupt", "--writer", "lorakern", "--keep", str(tmp_path)])
    threads = torch.get_num_threads()
    try:
        rc = demo.main(args)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL: logits err" in out and out.rstrip().splitlines()[-1].startswith("result: FAIL")
    assert len(list(tmp_path.glob("*/adapter_config.json"))) == 8  # --keep: lorakern's writer, PEFT's format


@pytest.mark.skipif(shutil.which("lorakern", path=os.path.dirname(sys.executable)) is None,
                    reason="the lorakern console script is not installed next to this python")
def test_console_script_has_demo():
    exe = shutil.which("lorakern", path=os.path.dirname(sys.executable))
    r = subprocess.run([exe, "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--adapters" in r.stdout and "--backend" in r.stdout
