"""Run ``add_lora`` once per selected case for one backend (for Nsight Compute; a tuning aid). E.g.

    ncu --kernel-name regex:segment_expand --launch-count 1 --section SpeedOfLight python bench/ncu_case.py \\
        --filter "prefill uniform"
"""

from __future__ import annotations

import argparse
import sys

import torch

from lorakern.bench import cases as C


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filter", nargs="*", default=[], help="substrings of case labels (any matches)")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--calls", type=int, default=2)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("ncu_case: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    for case in C.full_cases():
        if args.filter and not any(f in case.label for f in args.filter):
            continue
        inp = C._build(case, dev)
        out = inp.out0.clone()
        for name, fn, why, _ in C._implementations(case, inp, out, dev, [args.backend], (), (), False, False):
            if fn is None:
                print(f"{case.label}: {name} skipped: {why}")
                continue
            for _ in range(args.calls):
                fn()
            torch.cuda.synchronize()
            print(f"{case.label}: {name} ran {args.calls} calls", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
