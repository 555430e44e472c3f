"""docs/pool.md's end-to-end example runs as written (catalog → pool → plan → add_lora)."""

import os
import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "pool.md"


def test_pool_md_end_to_end_example_runs(tmp_path, monkeypatch):
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## End to end"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, str(DOC), "exec"), ns)
    pool = ns["pool"]
    assert pool.stats().resident == 2 and pool.stats().in_flight == 0
    assert os.path.exists(tmp_path / "adapters.lkcat")
