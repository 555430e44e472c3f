"""The test log (LORAKERN_TEST_LOG) and the resume of a cut run (LORAKERN_TESTS_DONE): lorakern.bench.testlog and
the hooks of tests/conftest.py, run end to end in a pytest subprocess on a planted suite."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorakern.__main__ import main as cli
from lorakern.bench import testlog

TESTS = Path(__file__).resolve().parent

# every outcome: a pass, a failure, a skip (in the call and in a fixture), an xfail, an xpass, a setup error and a
# teardown error after a pass
PLANTED = '''
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("setup fails")

@pytest.fixture
def bad_teardown():
    yield
    raise RuntimeError("teardown fails")

@pytest.fixture
def skipper():
    pytest.skip("from a fixture")

def test_pass(): pass
def test_fail(): assert 1 == 2
def test_skip(): pytest.skip("no")
def test_skip_fixture(skipper): pass
@pytest.mark.xfail(reason="known")
def test_xfail(): assert 0
@pytest.mark.xfail(reason="known", strict=False)
def test_xpass(): pass
def test_error(broken): pass
def test_teardown_error(bad_teardown): pass
@pytest.mark.parametrize("n", [1, 2, 3])
def test_param(n): assert n
'''
EXPECTED = {
    "test_pass": "passed", "test_fail": "failed", "test_skip": "skipped", "test_skip_fixture": "skipped",
    "test_xfail": "xfailed", "test_xpass": "xpassed", "test_error": "error", "test_teardown_error": "error",
    "test_param[1]": "passed", "test_param[2]": "passed", "test_param[3]": "passed",
}


def _run_planted(tmp_path: Path, *args: str, suite: str = PLANTED, **env) -> subprocess.CompletedProcess:
    """pytest on a planted suite (``suite``: the test file's text, written at the first call in ``tmp_path``), in a
    directory whose conftest loads the hooks of tests/conftest.py."""
    d = tmp_path / "suite"
    if not d.exists():
        d.mkdir()
        (d / "conftest.py").write_text(textwrap.dedent(f'''
            import importlib.util
            spec = importlib.util.spec_from_file_location("lorakern_tests_conftest", {str(TESTS / "conftest.py")!r})
            m = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(m)
            pytest_runtest_logreport = m.pytest_runtest_logreport
            pytest_collection_modifyitems = m.pytest_collection_modifyitems
            pytest_report_collectionfinish = m.pytest_report_collectionfinish
        '''))
        (d / "test_planted.py").write_text(suite)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("LORAKERN_TEST", "PYTEST_"))}
    e.update(env)
    # (the outer run's PYTEST_XDIST_WORKER must not make the inner one a worker)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, str(d)], cwd=d,
                          env=e, capture_output=True, text=True, timeout=300)


def test_log_of_every_outcome_and_resume(tmp_path):
    log = tmp_path / "log.tsv"
    r = _run_planted(tmp_path, LORAKERN_TEST_LOG=str(log))
    assert r.returncode == 1, r.stdout + r.stderr  # the planted failures
    entries = testlog.read(log)
    got = {k.split("::", 1)[1]: o for k, (o, _) in entries.items()}
    assert got == EXPECTED
    assert len(log.read_text().splitlines()) == len(EXPECTED)  # one line per test, none twice
    assert all(s >= 0 for _, s in entries.values())
    # junit's counting: error = failed, xfailed = skipped, xpassed = passed
    assert testlog.counts(entries) == (5, 3, 3)

    # resume: a log naming some tests deselects exactly those
    part = tmp_path / "part.tsv"
    part.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                            if "test_param" in line or "test_pass" in line))
    log2 = tmp_path / "log2.tsv"
    r = _run_planted(tmp_path, LORAKERN_TEST_LOG=str(log2), LORAKERN_TESTS_DONE=str(part))
    assert "4 deselected" in r.stdout, r.stdout
    assert "7 left to run" in r.stdout, r.stdout
    ran = {k.split("::", 1)[1] for k in testlog.read(log2)}
    assert ran == set(EXPECTED) - {"test_pass", "test_param[1]", "test_param[2]", "test_param[3]"}
    # the two logs together are the whole run
    assert testlog.read(part, log2).keys() == entries.keys()

    # a complete log leaves nothing to run
    r = _run_planted(tmp_path, LORAKERN_TESTS_DONE=str(log))
    assert r.returncode == 5 and "11 deselected" in r.stdout, r.stdout  # 5: no tests ran


def test_log_under_xdist_has_each_test_once(tmp_path):
    """With pytest-xdist (as on the lent GPU machine) the workers' hooks see the reports too: only the controller
    writes."""
    pytest.importorskip("xdist")
    log = tmp_path / "log.tsv"
    r = _run_planted(tmp_path, "-n", "2", LORAKERN_TEST_LOG=str(log))
    assert r.returncode == 1, r.stdout + r.stderr
    assert len(log.read_text().splitlines()) == len(EXPECTED)
    assert {k.split("::", 1)[1]: o for k, (o, _) in testlog.read(log).items()} == EXPECTED
    r = _run_planted(tmp_path, "-n", "2", LORAKERN_TESTS_DONE=str(log))
    assert r.returncode == 5, r.stdout + r.stderr  # every worker deselected everything


def _rep(nodeid, when, outcome, duration=0.5, xfail=False):
    r = SimpleNamespace(nodeid=nodeid, when=when, duration=duration, passed=outcome == "passed",
                        failed=outcome == "failed", skipped=outcome == "skipped")
    if xfail:
        r.wasxfail = "reason"
    return r


def test_recorder_sums_phases_and_writes_at_teardown(tmp_path):
    rec = testlog.Recorder(tmp_path / "sub" / "log.tsv")
    assert rec.report(_rep("t.py::a", "setup", "passed", 0.25)) is None
    assert rec.report(_rep("t.py::a", "call", "passed", 1.5)) is None
    assert not rec.path.exists()  # nothing until the test ends
    assert rec.report(_rep("t.py::a", "teardown", "passed", 0.25)) == "passed\t2.000\tt.py::a\n"
    # interleaved tests (xdist's controller sees reports of many workers) are kept apart
    rec.report(_rep("t.py::b", "setup", "passed"))
    rec.report(_rep("t.py::c", "setup", "failed"))
    rec.report(_rep("t.py::b", "call", "failed"))
    rec.report(_rep("t.py::c", "teardown", "passed"))
    rec.report(_rep("t.py::b", "teardown", "failed"))  # a failed call stays "failed", not "error"
    assert testlog.read(rec.path) == {"t.py::a": ("passed", 2.0), "t.py::c": ("error", 1.0),
                                      "t.py::b": ("failed", 1.5)}


def test_log_of_a_crashed_xdist_worker(tmp_path):
    """End to end with pytest-xdist: a test that takes its worker down is logged as failed, the others as run."""
    pytest.importorskip("xdist")
    log = tmp_path / "log.tsv"
    r = _run_planted(tmp_path, "-n", "2", LORAKERN_TEST_LOG=str(log),
                     suite="import os\ndef test_ok(): pass\ndef test_crash(): os._exit(3)\ndef test_after(): pass\n")
    assert "crashed" in r.stdout, r.stdout + r.stderr
    assert {k.split("::", 1)[1]: o for k, (o, _) in testlog.read(log).items()} == {
        "test_ok": "passed", "test_crash": "failed", "test_after": "passed"}


def test_recorder_logs_a_test_whose_worker_crashed(tmp_path):
    """pytest-xdist reports a test whose worker died (a GPU fault takes the process down) once, with when "???"
    and no teardown: it is logged as failed, so a resumed run does not count it as never run."""
    rec = testlog.Recorder(tmp_path / "log.tsv")
    rec.report(_rep("t.py::a", "setup", "passed", 0.5))
    assert rec.report(_rep("t.py::a", "???", "failed", 0.0)) == "failed\t0.500\tt.py::a\n"
    assert not rec._open


def test_recorder_is_silent_in_xdist_workers(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    assert not testlog.Recorder.is_controller()
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert testlog.Recorder.is_controller()


def test_read_tolerates_a_torn_last_line_and_later_lines_win(tmp_path):
    p = tmp_path / "log.tsv"
    p.write_text("failed\t1.0\tt.py::a\npassed\t0.1\tt.py::b\nbogus\t1\tt.py::c\npassed\tx\tt.py::d\npassed\t0.2\tt.p")
    q = tmp_path / "log2.tsv"
    q.write_text("passed\t3.0\tt.py::a\n")
    assert testlog.read(p) == {"t.py::a": ("failed", 1.0), "t.py::b": ("passed", 0.1)}  # "t.p" was torn
    assert testlog.read(p, q)["t.py::a"] == ("passed", 3.0)
    assert testlog.read(tmp_path / "missing.tsv") == {}


def test_summary_and_cli(tmp_path, capsys):
    p = tmp_path / "log.tsv"
    p.write_text("passed\t1.0\ttests/a.py::x\nfailed\t9.0\ttests/a.py::y\nskipped\t0.0\ttests/b.py::z\n"
                 "error\t2.5\ttests/b.py::w\n")
    e = testlog.read(p)
    assert testlog.slowest(e, 2) == [(9.0, "failed", "tests/a.py::y"), (2.5, "error", "tests/b.py::w")]
    assert testlog.by_file(e) == [(10.0, 2, "tests/a.py"), (2.5, 2, "tests/b.py")]
    assert cli(["testlog", str(p), "--counts"]) == 0
    assert capsys.readouterr().out.strip() == "1 2 1"
    assert cli(["testlog", str(p), "--slowest", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 tests logged: 1 passed, 2 failed, 1 skipped; 12 s" in out
    assert "failed  tests/a.py::y" in out and "error   tests/b.py::w" in out
    assert "slowest 1:" in out and "9.00 s" in out and "tests/a.py::x" not in out.split("per file:")[0].split(
        "slowest")[1]
    assert cli(["testlog", str(tmp_path / "nope.tsv")]) == 2
    assert "no such log" in capsys.readouterr().out


def test_cli_records_counts_into_a_run(tmp_path, capsys):
    import json
    import shutil

    recorded = TESTS.parent / "bench" / "results" / "nvidia-h100-80gb-hbm3-20261122-3a57e06.json"
    run = tmp_path / "run.json"
    shutil.copy(recorded, run)
    p = tmp_path / "log.tsv"
    p.write_text("passed\t1.0\ta::x\npassed\t1.0\ta::y\nxfailed\t0.1\ta::z\nerror\t0.1\ta::w\n")
    assert cli(["testlog", str(p), "--record", str(run)]) == 0
    doc = json.loads(run.read_text())
    assert doc["tests"] == {"passed": 2, "failed": 1, "skipped": 1} and doc["tests_scope"] == "all"
    assert doc["rows"] == json.loads(recorded.read_text())["rows"]  # nothing else touched
    assert "- tests (all): passed 2, failed 1, skipped 1" in run.with_suffix(".md").read_text()
