"""Command line: ``python -m lorakern <command>`` (also the ``lorakern`` console script).

Commands:

* ``bench`` — time ``add_lora`` on named adapter mixes for each lorakern backend and the baselines; print the
  table and record the run (``bench --quick`` for the small CPU shapes). See :mod:`lorakern.bench.run`.
* ``demo`` — attach lorakern to a small Llama, load 64 PEFT adapters, serve mixed batches (prefill and decode),
  check every sequence against its adapter applied alone, print the table. See :mod:`lorakern.demo`.
* ``plot`` — PNG plots of a recorded run (:mod:`lorakern.bench.plot`).
* ``targets`` — issue #3's performance targets checked against a recorded run (:mod:`lorakern.bench.targets`).
* ``testlog`` — counts, failures and the slowest tests of a test run's log, even of a run cut short
  (:mod:`lorakern.bench.testlog`).

Each command lives in its own module and contributes its arguments and its ``main(args)`` here; a new command
(e.g. ``demo``) is one more entry in :data:`_COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def _bench_module():
    from lorakern.bench import run

    return run


def _plot_module():
    from lorakern.bench import plot

    return plot


def _targets_module():
    from lorakern.bench import targets

    return targets


def _testlog_module():
    from lorakern.bench import testlog

    return testlog


def _demo_module():
    from lorakern import demo

    return demo


#: name -> (help line, loader of a module with ``add_arguments(parser)`` and ``main(args) -> int``)
_COMMANDS = {
    "bench": ("time add_lora against the baselines and record the run (--quick: small CPU shapes)", _bench_module),
    "plot": ("PNG plots (GB/s, %% of peak vs batch size) of a recorded run; needs matplotlib", _plot_module),
    "targets": ("the performance targets of issue #3 (decode, prefill, mixed ranks, vs Triton) on a recorded run",
                _targets_module),
    "testlog": ("counts, failures and slowest tests of a test log (LORAKERN_TEST_LOG), even of a cut run",
                _testlog_module),
    "demo": ("serve mixed batches of 64 PEFT adapters on a small Llama, check each against its adapter alone",
             _demo_module),
}


def build_parser() -> argparse.ArgumentParser:
    from lorakern import __version__

    p = argparse.ArgumentParser(
        prog="lorakern",
        description="lorakern: kernels for batched heterogeneous LoRA over a paged rank-row adapter layout.",
        epilog="Example: python -m lorakern bench --quick",
    )
    p.add_argument("--version", action="version", version=f"lorakern {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (help_line, loader) in _COMMANDS.items():
        mod = loader()
        sp = sub.add_parser(name, help=help_line, description=(mod.__doc__ or help_line).strip().split("\n\n")[0])
        mod.add_arguments(sp)
        sp.set_defaults(_main=mod.main)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_main", None) is None:
        parser.print_help()
        return 2
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
