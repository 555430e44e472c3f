#!/usr/bin/env python
"""Benchmark ``add_lora`` (the dense LoRA op) against the baselines — the script form of ``lorakern bench``.

    python bench/bench_add_lora.py --quick          # small CPU shapes, < 1 min on 2 cores
    python bench/bench_add_lora.py                  # GPU shapes (bf16, K = 4096): decode, prefill, mixed ranks,
                                                    # batch sweeps over distinct / uniform / zipf:1.5 / identical
    python bench/bench_add_lora.py --filter decode --backends triton torch --baselines torch-gather-bmm

Cases: lorakern/bench/cases.py. Harness (timing, bytes model, results files): lorakern/bench/harness.py.
Baselines: lorakern/bench/baselines.py. Results: bench/results/<device>-<YYYYMMDD>-<commit>.json and .md.
"""

import sys
from pathlib import Path

try:
    from lorakern.bench.run import cli
except ImportError:  # run from a checkout without installing: use the checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from lorakern.bench.run import cli

if __name__ == "__main__":
    sys.exit(cli())
