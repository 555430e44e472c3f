"""Random adapter pools and adapter mixes, named as in the literature (Punica): shared by tests and benchmarks.

Mixes (``make_slots``):

* ``identical`` — every token uses adapter 0;
* ``distinct``  — token ``t`` uses adapter ``t`` (as many adapters as tokens);
* ``uniform``   — adapters drawn uniformly;
* ``zipf:a``    — adapter ``k`` drawn with probability proportional to ``1 / (k+1)^a`` (e.g. ``zipf:1.5``);
* ``skewed``    — half the tokens on adapter 0, the rest uniform over the others.

``none_frac`` turns that fraction of tokens into ``-1`` (no LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["MIXES", "make_slots", "RandomLoRA", "make_lora", "parse_ranks"]

MIXES = ("identical", "distinct", "uniform", "zipf:1.5", "skewed")


def make_slots(
    mix: str,
    num_tokens: int,
    num_adapters: int,
    *,
    none_frac: float = 0.0,
    generator: Optional[torch.Generator] = None,
    device="cpu",
) -> torch.Tensor:
    """int32 ``slots [num_tokens]`` drawn from ``mix`` over adapters ``0 .. num_adapters-1``."""
    T, n, g = int(num_tokens), int(num_adapters), generator
    if n <= 0:
        raise ValueError(f"num_adapters: must be >= 1, got {n}")
    if mix not in ("identical", "distinct", "uniform", "skewed") and not mix.startswith("zipf"):
        raise ValueError(f"mix: unknown {mix!r}; expected one of {MIXES} (any zipf:<a>)")
    if T == 0:
        return torch.zeros(0, dtype=torch.int32, device=device)
    if mix == "identical":
        s = torch.zeros(T, dtype=torch.int64)
    elif mix == "distinct":
        s = torch.arange(T) % n
    elif mix == "uniform":
        s = torch.randint(0, n, (T,), generator=g)
    elif mix.startswith("zipf"):
        a = float(mix.split(":", 1)[1]) if ":" in mix else 1.5
        p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** a
        s = torch.multinomial(p / p.sum(), T, replacement=True, generator=g)
    elif mix == "skewed":
        s = torch.randint(1, max(n, 2), (T,), generator=g) % n
        s[torch.rand(T, generator=g) < 0.5] = 0
    else:
        raise ValueError(f"mix: unknown {mix!r}; expected one of {MIXES} (any zipf:<a>)")
    if none_frac > 0:
        s[torch.rand(T, generator=g) < none_frac] = -1
    return s.to(torch.int32).to(device)


def parse_ranks(spec, num_adapters: int, generator=None) -> list[int]:
    """Ranks for ``num_adapters`` adapters: an int (fixed), ``"lo-hi"`` (uniform in range) or a list (cycled)."""
    if isinstance(spec, int):
        return [spec] * num_adapters
    if isinstance(spec, str) and "-" in spec:
        lo, hi = (int(v) for v in spec.split("-"))
        return torch.randint(lo, hi + 1, (num_adapters,), generator=generator).tolist()
    if isinstance(spec, str):
        return [int(spec)] * num_adapters
    spec = list(spec)
    return [int(spec[i % len(spec)]) for i in range(num_adapters)]


@dataclass
class RandomLoRA:
    """A random rank-row pool (DESIGN.md §2) for one target with ``len(n_sizes)`` slices."""

    lora_a: list  # per slice [num_rows, K]
    lora_b: list  # per slice [num_rows, N_i]
    page_table: torch.Tensor  # int32 [num_slots, max_rank]
    ranks: torch.Tensor  # int32 [num_slots]
    scales: torch.Tensor  # float32 [num_slots]

    @property
    def num_slots(self) -> int:
        return self.page_table.shape[0]

    @property
    def max_rank(self) -> int:
        return self.page_table.shape[1]

    def args(self):
        """``(lora_a, lora_b, page_table, ranks, scales)`` in the ops' argument order."""
        return self.lora_a, self.lora_b, self.page_table, self.ranks, self.scales


def make_lora(
    num_adapters: int,
    K: int,
    n_sizes: Sequence[int],
    ranks,
    *,
    max_rank: Optional[int] = None,
    dtype=torch.float32,
    device="cpu",
    generator: Optional[torch.Generator] = None,
    interleave: bool = True,
    spare_rows: int = 3,
    poison_unused: bool = True,
) -> RandomLoRA:
    """A random pool: adapter ``s`` gets exactly ``ranks[s]`` rows; ``interleave`` shuffles row ids so that the
    rows of different slots interleave; ``poison_unused`` fills page-table entries beyond each rank with
    out-of-range ids (a kernel that reads them fails loudly) and the spare rows with NaN/large values."""
    g = generator
    rk = parse_ranks(ranks, num_adapters, g)
    mr = max(max(rk), 1) if max_rank is None else int(max_rank)
    total = sum(rk)
    num_rows = total + spare_rows
    perm = torch.randperm(num_rows, generator=g) if interleave else torch.arange(num_rows)
    pt = torch.full((num_adapters, mr), num_rows + 7 if poison_unused else 0, dtype=torch.int32)
    off = 0
    for s, r in enumerate(rk):
        pt[s, :r] = perm[off : off + r].to(torch.int32)
        off += r
    spare = perm[total:]

    def rows(n):
        w = torch.randn(num_rows, n, generator=g, dtype=torch.float32) / max(n, 1) ** 0.25
        if poison_unused and spare.numel():
            w[spare] = float("nan")
        return w.to(dtype).to(device)

    lora_a = [rows(K) for _ in n_sizes]
    lora_b = [rows(n) for n in n_sizes]
    scales = (0.5 + torch.rand(num_adapters, generator=g)).to(torch.float32)
    return RandomLoRA(lora_a, lora_b, pt.to(device), torch.tensor(rk, dtype=torch.int32, device=device),
                      scales.to(device))
