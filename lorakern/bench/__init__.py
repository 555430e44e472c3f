"""Benchmarks for lorakern's ops (DESIGN.md §6): shared harness, baselines, named cases.

* :mod:`lorakern.bench.harness` — timing (CUDA events + L2 flush, or ``perf_counter`` on the CPU), the measured
  copy bandwidth, the bytes-moved model of each op, result rows in the §6 contract shape and their JSON/Markdown
  writer, the stdout table.
* :mod:`lorakern.bench.baselines` — what other systems do, implemented for real: ``torch-gather-bmm`` (pad to
  ``max_rank`` and batch two ``bmm``), ``peft-loop`` (a Python loop over adapters) and peer kernels (vLLM,
  FlashInfer, SGLang) when they are importable.
* :mod:`lorakern.bench.cases` — the benchmark cases (quick CPU shapes, GPU shapes), named by adapter mix as in the
  literature, and the loop that turns a case into rows.
* :mod:`lorakern.bench.run` — ``python -m lorakern bench``.

The package is importable from an installed lorakern, so the CLI works outside the repository.
"""

from lorakern.bench.harness import (  # noqa: F401
    Timing,
    measure,
    peak_copy_gbps,
    add_lora_bytes,
    lora_shrink_bytes,
    lora_expand_bytes,
    make_row,
    skipped_row,
    write_results,
    format_table,
)

__all__ = [
    "Timing",
    "measure",
    "peak_copy_gbps",
    "add_lora_bytes",
    "lora_shrink_bytes",
    "lora_expand_bytes",
    "make_row",
    "skipped_row",
    "write_results",
    "format_table",
]
