"""Plots of a recorded run (lorakern.bench.plot): the series are read from the contract's rows; PNGs are written."""

import json

import pytest

from lorakern.bench.plot import plot_results, series


def _doc():
    rows = []
    for backend, scale in (("triton", 1.0), ("torch-gather-bmm", 0.3)):
        for T in (1, 16, 64, 256):
            for wl in ("distinct", "zipf:1.5"):
                g = scale * 100 * T ** 0.5
                rows.append(dict(op="add_lora", backend=backend, workload=wl, dtype="bfloat16", T=T, K=4096,
                                 N=[4096], slices=1, ranks="16", adapters=T, median_us=10.0, p20_us=9.0,
                                 p80_us=11.0, bytes=int(g * 1e4), gbps=g, pct_peak=g / 30, case="sweep"))
    rows.append(dict(op="add_lora", backend="vllm", workload="distinct", dtype="bfloat16", T=1, K=4096, N=[4096],
                     slices=1, ranks="16", adapters=1, median_us=None, p20_us=None, p80_us=None, bytes=0,
                     gbps=None, pct_peak=None, case="sweep", skipped=True, note="vllm not importable"))
    rows.append(dict(rows[0], case="decode-qkv", T=256))
    return {"device": "test-gpu", "commit": "abc1234", "date": "2026-11-22", "peak_copy_gbps": 3000.0,
            "rows": rows}


def test_series_groups_timed_rows_by_workload_and_backend():
    s = series(_doc())
    assert set(s) == {"distinct", "zipf:1.5"}
    assert set(s["distinct"]) == {"triton", "torch-gather-bmm"}  # the skipped peer row is left out
    assert [p[0] for p in s["distinct"]["triton"]] == [1, 16, 64, 256]
    assert all(p[0] != 256 or p[1] == pytest.approx(1600.0) for p in s["distinct"]["triton"])


def test_plot_writes_one_png_per_workload(tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "test-gpu-20261122-abc1234.json"
    src.write_text(json.dumps(_doc()))
    paths = plot_results(src)
    assert len(paths) == 2
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_plot_without_rows_is_a_clear_error(tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "empty.json"
    src.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no timed rows"):
        plot_results(src)
