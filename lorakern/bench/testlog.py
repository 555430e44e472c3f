"""A test run's log, one line per finished test, written as the tests finish (``python -m lorakern testlog LOG``).

The lent GPU machine stops a call after 10 minutes, and pytest writes its junit file and its ``--durations`` table
only at the end of a session, so a run cut by that limit used to come back with neither counts nor the names of the
slow tests (the whole suite reached 95 % in 530 s on an H100 and said nothing about where the time went). With
``LORAKERN_TEST_LOG=<file>`` the test session (``tests/conftest.py``) appends a line per test as it finishes::

    <outcome>\\t<seconds, setup + call + teardown>\\t<node id>

so a cut run still tells what ran, what failed and what was slow. ``LORAKERN_TESTS_DONE=<file>`` (a log of an
earlier run) deselects the tests that file names, so a next call runs only the rest of the suite, and the two logs
together are the whole run (``bench/gpu_check.sh``: ``TESTS_DONE=``). Outcomes: ``passed``, ``failed``, ``error``
(setup or teardown failed), ``skipped``, ``xfailed``, ``xpassed``; in the counts, as in junit, ``error`` is a
failure, ``xfailed`` a skip and ``xpassed`` a pass.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

__all__ = ["OUTCOMES", "Recorder", "read", "counts", "slowest", "by_file", "format_summary", "add_arguments",
           "main"]

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
_COUNT_AS = {"passed": "passed", "xpassed": "passed", "failed": "failed", "error": "failed", "skipped": "skipped",
             "xfailed": "skipped"}


class Recorder:
    """Turns pytest's per-phase reports into one log line per test (written when its teardown is reported).

    Under pytest-xdist every report reaches the controller, whose hook calls :meth:`report`; the workers' own
    hooks must not (``is_controller``), or each line would be written twice."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        self._open: Dict[str, list] = {}  # node id -> [outcome or None, seconds]

    @staticmethod
    def is_controller() -> bool:
        return "PYTEST_XDIST_WORKER" not in os.environ

    def report(self, rep) -> Optional[str]:
        """Feed one ``TestReport``; returns the line written when this report ends its test, else None."""
        st = self._open.setdefault(rep.nodeid, [None, 0.0])
        st[1] += float(getattr(rep, "duration", 0.0) or 0.0)
        xfail = hasattr(rep, "wasxfail")
        if rep.when == "setup":
            if rep.failed:
                st[0] = "error"
            elif rep.skipped:
                st[0] = "xfailed" if xfail else "skipped"
        elif rep.when == "call":
            if rep.skipped:
                st[0] = "xfailed" if xfail else "skipped"
            elif rep.failed:
                st[0] = "failed"
            else:
                st[0] = "xpassed" if xfail else "passed"
        elif rep.when == "teardown":
            if rep.failed and st[0] in (None, "passed", "skipped", "xfailed", "xpassed"):
                st[0] = "error"
        else:  # pytest-xdist's report of a test whose worker died under it (when "???"): no teardown follows
            st[0] = "failed"
        if rep.when in ("setup", "call"):
            return None
        outcome, seconds = self._open.pop(rep.nodeid)
        line = f"{outcome or 'error'}\t{seconds:.3f}\t{rep.nodeid}\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(line)
        return line


def read(*paths) -> Dict[str, Tuple[str, float]]:
    """node id -> (outcome, seconds) over the logs, in order (a later line for the same test wins). A missing file
    reads as empty; a malformed line, or a last line without its newline (a run killed mid-write), is skipped."""
    out: Dict[str, Tuple[str, float]] = {}
    for p in paths:
        try:
            text = Path(p).read_text()
        except FileNotFoundError:
            continue
        lines = text.split("\n")
        lines.pop()  # "" after the last newline, or a torn last line (a run killed mid-write): never a whole entry
        for line in lines:
            parts = line.split("\t", 2)
            if len(parts) != 3 or parts[0] not in OUTCOMES:
                continue
            try:
                seconds = float(parts[1])
            except ValueError:
                continue
            out[parts[2]] = (parts[0], seconds)
    return out


def counts(entries: Dict[str, Tuple[str, float]]) -> Tuple[int, int, int]:
    """(passed, failed, skipped), as junit counts them (error = failed, xfailed = skipped, xpassed = passed)."""
    n = {"passed": 0, "failed": 0, "skipped": 0}
    for outcome, _ in entries.values():
        n[_COUNT_AS[outcome]] += 1
    return n["passed"], n["failed"], n["skipped"]


def slowest(entries: Dict[str, Tuple[str, float]], n: int = 25) -> list:
    """The ``n`` slowest tests: [(seconds, outcome, node id)], slowest first."""
    return sorted(((s, o, k) for k, (o, s) in entries.items()), key=lambda t: (-t[0], t[2]))[:n]


def by_file(entries: Dict[str, Tuple[str, float]]) -> list:
    """[(seconds, tests, file)] summed per test file, slowest first."""
    acc = defaultdict(lambda: [0.0, 0])
    for k, (_, s) in entries.items():
        a = acc[k.split("::", 1)[0]]
        a[0] += s
        a[1] += 1
    return sorted(((s, c, f) for f, (s, c) in acc.items()), key=lambda t: (-t[0], t[2]))


def format_summary(entries: Dict[str, Tuple[str, float]], n_slowest: int = 25,
                   failures: Iterable[str] = ()) -> str:
    p, f, s = counts(entries)
    total = sum(sec for _, sec in entries.values())
    lines = [f"{len(entries)} tests logged: {p} passed, {f} failed, {s} skipped; {total:.0f} s of test time "
             f"(summed over workers)"]
    bad = sorted(k for k, (o, _) in entries.items() if _COUNT_AS[o] == "failed")
    if bad:
        lines.append("failed:")
        lines += [f"  {entries[k][0]:7s} {k}" for k in bad]
    if n_slowest:
        lines.append(f"slowest {min(n_slowest, len(entries))}:")
        lines += [f"  {sec:8.2f} s  {o:7s} {k}" for sec, o, k in slowest(entries, n_slowest)]
        lines.append("per file:")
        lines += [f"  {sec:8.1f} s  {c:5d} tests  {fn}" for sec, c, fn in by_file(entries)]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("logs", type=Path, nargs="+", help="test logs (LORAKERN_TEST_LOG), read in order")
    p.add_argument("--slowest", type=int, default=25, help="how many of the slowest tests to list (default 25)")
    p.add_argument("--record", type=Path, default=None, metavar="RUN.json",
                   help="write the counts into a results JSON (tests_scope 'all'; only for a complete suite)")
    p.add_argument("--counts", action="store_true", help="print only 'passed failed skipped'")


def main(args: argparse.Namespace) -> int:
    missing = [str(p) for p in args.logs if not Path(p).is_file()]
    if missing:
        print(f"testlog: no such log: {', '.join(missing)}")
        return 2
    entries = read(*args.logs)
    if args.counts:
        print(*counts(entries))
        return 0
    print(format_summary(entries, args.slowest))
    if args.record is not None:
        from lorakern.bench.harness import update_tests

        update_tests(args.record, *counts(entries), scope="all")
        print(f"recorded the counts in {args.record}")
    return 0
