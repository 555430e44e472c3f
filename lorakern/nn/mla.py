"""A minimal reference MLA attention (DeepSeek-V2/V3) with LoRA on every projection, in two equivalent forms.

Shapes (``B`` sequences of ``L`` tokens, ``T = B·L``; names as in DeepSeek's config)::

    hidden                [B, L, hidden_size]
    q_a_proj              hidden_size -> q_lora_rank            (then q_a_layernorm, an RMSNorm)
    q_b_proj              q_lora_rank -> H·(Dn + Dr)            (or q_proj: hidden_size -> H·(Dn + Dr)
                                                                 when q_lora_rank is None)
    kv_a_proj_with_mqa    hidden_size -> C + Dr                 compressed kv c [C] (then kv_a_layernorm)
                                                                 and one rope key k_pe [Dr] shared by all heads
    kv_b_proj             C -> H·(Dn + Dv)                      read per head as [k_nope (Dn) | v (Dv)]
    o_proj                H·Dv -> hidden_size

with ``H = num_heads``, ``C = kv_lora_rank``, ``Dn = qk_nope_head_dim``, ``Dr = qk_rope_head_dim``,
``Dv = v_head_dim``. RoPE (rotate-half form) is applied to ``q_pe`` and ``k_pe`` at positions ``0 .. L-1``; the
attention is causal within each sequence with softmax scale ``(Dn + Dr) ** -0.5``.

Two paths, selected by ``absorbed``:

* **prefill** (``absorbed=False``) — ``kv_b_proj`` materialises per-head ``k_nope`` and ``v`` for every token; its
  LoRA is a plain linear (:func:`lorakern.ops.add_lora`), like every other projection.
* **absorbed decode** (``absorbed=True``) — what engines do at decode: the cache holds only ``c`` and ``k_pe``;
  ``W_UK`` is absorbed into the query (``q_latent = q_nope @ W_UK^h``, scores ``q_latent · c + q_pe · k_pe``) and
  ``W_UV`` into the output (``out = o_latent @ W_UV^h.T``, with ``o_latent = softmax · c``). The kv_b_proj LoRA
  follows through :func:`lorakern.ops.mla_absorbed_q` and :func:`lorakern.ops.mla_absorbed_o`. Here every query
  position runs the decode computation against the causal prefix, so both paths give the same output (to
  rounding) for the whole sequence.

Adapters. ``slots [B]`` gives each sequence one adapter slot (``-1`` = none), as a serving engine does per request:
within a sequence the key of token ``t'`` carries ``t'``'s kv_b_proj adapter in the prefill form but the query's
adapter in the absorbed form, so the two agree only when a sequence keeps one adapter. The LoRA weights
(:class:`MLALoRA`) are in rank-row form (DESIGN.md §2) with one page table, ranks and scales shared by all five
projections; a single :class:`lorakern.LoRAPlan` built per batch serves every op call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakern.ops import add_lora, mla_absorbed_o, mla_absorbed_q
from lorakern.plan import LoRAPlan, ranks_on

__all__ = ["MLAConfig", "MLAAttention", "MLALoRA", "RMSNorm", "apply_rope", "PROJECTIONS"]


@dataclass(frozen=True)
class MLAConfig:
    """Sizes of one MLA layer (defaults: a tiny layer for tests; DeepSeek-V3 is hidden 7168, H 128, q_lora_rank
    1536, kv_lora_rank 512, Dn 128, Dr 64, Dv 128)."""

    hidden_size: int = 64
    num_heads: int = 4
    q_lora_rank: Optional[int] = 48
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def projections(self) -> dict:
        """``{name: (in_features, out_features)}`` of the LoRA-able projections."""
        H, Dn, Dr, Dv, C = (self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim,
                            self.kv_lora_rank)
        p = {}
        if self.q_lora_rank is None:
            p["q_proj"] = (self.hidden_size, H * (Dn + Dr))
        else:
            p["q_a_proj"] = (self.hidden_size, self.q_lora_rank)
            p["q_b_proj"] = (self.q_lora_rank, H * (Dn + Dr))
        p["kv_a_proj_with_mqa"] = (self.hidden_size, C + Dr)
        p["kv_b_proj"] = (C, H * (Dn + Dv))
        p["o_proj"] = (H * Dv, self.hidden_size)
        return p


PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · weight``, computed in float32 (float64 for float64 inputs)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(acc)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(acc)).to(x.dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE over the last dim of ``x [B, L, D]`` or ``x [B, L, heads, D]``, at ``positions [L]``."""
    D = x.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64, device=x.device) / D)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]  # [L, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(acc)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(acc)
    if x.dim() == 4:
        cos, sin = cos[:, None, :], sin[:, None, :]
    xf = x.to(acc)
    x1, x2 = xf[..., : D // 2], xf[..., D // 2:]
    rot = torch.cat([-x2, x1], -1)
    return (xf * cos + rot * sin).to(x.dtype)


@dataclass
class MLALoRA:
    """LoRA weights of one MLA layer in rank-row form (DESIGN.md §2), one row space for all projections.

    ``lora_a[name]: [rows, in_features]`` and ``lora_b[name]: [rows, out_features]`` for each adapted projection
    (a projection absent from the dicts has no LoRA); ``page_table int32 [num_slots, max_rank]``, ``ranks int32
    [num_slots]``, ``scales float32 [num_slots]`` are shared: slot ``s``'s rank rows are the same row ids in every
    projection's tensors. For kv_b_proj, ``lora_b`` columns are ``[H, Dn + Dv]`` per row, as the MLA ops read it.
    """

    lora_a: dict
    lora_b: dict
    page_table: torch.Tensor
    ranks: torch.Tensor
    scales: Optional[torch.Tensor]

    @property
    def num_slots(self) -> int:
        return self.page_table.shape[0]

    @classmethod
    def random(cls, config: MLAConfig, ranks: Sequence[int], *, generator: Optional[torch.Generator] = None,
               max_rank: Optional[int] = None, dtype=torch.float32, device="cpu",
               targets: Optional[Sequence[str]] = None, zero_b: bool = False, spare_rows: int = 3,
               poison_unused: bool = True) -> "MLALoRA":
        """Random adapters of the given ``ranks`` (one slot each) on ``targets`` (default: every projection).

        Row ids are shuffled so that slots interleave; with ``poison_unused`` page-table entries beyond each rank
        are out of range and spare rows are NaN (reading them would show). ``zero_b`` makes every B zero (a fresh
        PEFT adapter: A random, B = 0), so the adapter must leave the output exactly unchanged."""
        g = generator
        rk = [int(r) for r in ranks]
        mr = max(max(rk, default=1), 1) if max_rank is None else int(max_rank)
        total = sum(rk)
        num_rows = total + spare_rows
        perm = torch.randperm(num_rows, generator=g)
        pt = torch.full((len(rk), mr), num_rows + 7 if poison_unused else 0, dtype=torch.int32)
        off = 0
        for s, r in enumerate(rk):
            pt[s, :r] = perm[off: off + r].to(torch.int32)
            off += r
        spare = perm[total:]
        projs = config.projections()
        names = list(projs) if targets is None else list(targets)
        lora_a, lora_b = {}, {}
        for name in names:
            if name not in projs:
                raise ValueError(f"targets: {name!r} is not a projection of this config ({list(projs)})")
            k, n = projs[name]
            a = torch.randn(num_rows, k, generator=g, dtype=torch.float64) / k ** 0.5
            b = torch.randn(num_rows, n, generator=g, dtype=torch.float64) * 0.1
            if zero_b:
                b.zero_()
            if poison_unused and spare.numel():
                a[spare] = float("nan")
                b[spare] = float("nan")
            lora_a[name] = a.to(dtype).to(device)
            lora_b[name] = b.to(dtype).to(device)
        scales = (0.5 + torch.rand(len(rk), generator=g)).to(torch.float32)
        return cls(lora_a, lora_b, pt.to(device), torch.tensor(rk, dtype=torch.int32, device=device),
                   scales.to(device))


class MLAAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention, reduced to what the LoRA paths need (no KV-cache manager,
    no YaRN scaling, no tensor parallelism). Parameters are named as in DeepSeek's checkpoints."""

    def __init__(self, config: MLAConfig):
        super().__init__()
        c = config
        self.config = c
        H, Dn, Dr, Dv, C = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, H * (Dn + Dr), bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, H * (Dn + Dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, C + Dr, bias=False)
        self.kv_a_layernorm = RMSNorm(C, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(C, H * (Dn + Dv), bias=False)
        self.o_proj = nn.Linear(H * Dv, c.hidden_size, bias=False)

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> "MLAAttention":
        """Random weights (std 1/sqrt(fan_in)) and norm gains near 1, drawn from ``generator``."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                w = torch.randn(mod.weight.shape, generator=generator, dtype=torch.float64) / mod.in_features ** 0.5
                mod.weight.copy_(w.to(mod.weight.dtype))
            elif isinstance(mod, RMSNorm):
                w = 1.0 + 0.1 * torch.randn(mod.weight.shape, generator=generator, dtype=torch.float64)
                mod.weight.copy_(w.to(mod.weight.dtype))
        return self

    # ------------------------------------------------------------------------------------------ pieces
    def _proj(self, name: str, x: torch.Tensor, lora: Optional[MLALoRA], plan, backend: str) -> torch.Tensor:
        """``x @ W.T`` plus, when ``lora`` adapts ``name``, ``add_lora`` for every token with an adapter."""
        y = F.linear(x, getattr(self, name).weight)
        if lora is not None and name in lora.lora_a:
            add_lora(y, x, lora.lora_a[name], lora.lora_b[name], lora.page_table, lora.ranks, lora.scales, plan,
                     backend=backend)
        return y

    def forward(self, hidden: torch.Tensor, slots: Optional[torch.Tensor] = None, *,
                lora: Optional[MLALoRA] = None, absorbed: bool = False, backend: str = "auto") -> torch.Tensor:
        """``hidden [B, L, hidden_size]`` → ``[B, L, hidden_size]``.

        ``slots``: int ``[B]``, the adapter slot of each sequence (``-1`` = none); needed when ``lora`` is given.
        ``absorbed``: run the absorbed decode form instead of the prefill form. ``backend``: for the LoRA ops."""
        c = self.config
        H, Dn, Dr, Dv, C = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        Bsz, L, _ = hidden.shape
        T = Bsz * L
        x = hidden.reshape(T, c.hidden_size)
        plan = None
        if lora is not None:
            if slots is None or slots.shape != (Bsz,):
                raise ValueError(f"slots: expected an int tensor [B]=({Bsz},) (one adapter per sequence) with lora, "
                                 f"got {None if slots is None else tuple(slots.shape)}")
            # one plan, every op call; its tiles in descending rank order
            plan = LoRAPlan.from_slots(slots.to(torch.int32).repeat_interleave(L), ranks_on(lora.ranks, slots))

        def proj(name, inp):
            return self._proj(name, inp, lora, plan, backend)

        # queries: [T, H, Dn + Dr]
        if c.q_lora_rank is None:
            q = proj("q_proj", x)
        else:
            q = proj("q_b_proj", self.q_a_layernorm(proj("q_a_proj", x)))
        q = q.view(T, H, Dn + Dr)
        q_nope, q_pe = q[..., :Dn], q[..., Dn:]  # strided views, as in engines
        # compressed kv and the shared rope key
        kv_a = proj("kv_a_proj_with_mqa", x)
        c_kv = self.kv_a_layernorm(kv_a[:, :C])  # [T, C]
        k_pe = kv_a[:, C:]  # [T, Dr]
        pos = torch.arange(L, device=hidden.device)
        q_pe = apply_rope(q_pe.reshape(Bsz, L, H, Dr), pos, c.rope_theta)  # [B, L, H, Dr]
        k_pe = apply_rope(k_pe.reshape(Bsz, L, Dr), pos, c.rope_theta)  # [B, L, Dr]

        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        causal = torch.ones(L, L, dtype=torch.bool, device=hidden.device).tril()
        scale = (Dn + Dr) ** -0.5
        s_pe = torch.einsum("blhr,bmr->bhlm", q_pe.to(acc), k_pe.to(acc))

        def softmax(scores):
            return torch.softmax((scores * scale).masked_fill(~causal, float("-inf")), dim=-1)

        if not absorbed:
            kv = proj("kv_b_proj", c_kv).view(Bsz, L, H, Dn + Dv)
            k_nope, v = kv[..., :Dn], kv[..., Dn:]
            s = torch.einsum("blhd,bmhd->bhlm", q_nope.reshape(Bsz, L, H, Dn).to(acc), k_nope.to(acc)) + s_pe
            o = torch.einsum("bhlm,bmhd->blhd", softmax(s), v.to(acc)).to(hidden.dtype)  # [B, L, H, Dv]
        else:
            w = self.kv_b_proj.weight.view(H, Dn + Dv, C)
            w_uk, w_uv = w[:, :Dn, :], w[:, Dn:, :]  # [H, Dn, C], [H, Dv, C]
            # q_latent[t, h] = q_nope[t, h] @ W_UK^h (+ the kv_b_proj LoRA, absorbed): a [T, H, C] view of [H, T, C]
            q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
            if lora is not None and "kv_b_proj" in lora.lora_a:
                mla_absorbed_q(q_latent, q_nope, lora.lora_a["kv_b_proj"], lora.lora_b["kv_b_proj"],
                               lora.page_table, lora.ranks, lora.scales, plan, backend=backend)
            c_b = c_kv.reshape(Bsz, L, C).to(acc)
            s = torch.einsum("blhc,bmc->bhlm", q_latent.reshape(Bsz, L, H, C).to(acc), c_b) + s_pe
            o_latent = torch.einsum("bhlm,bmc->blhc", softmax(s), c_b).to(hidden.dtype).reshape(T, H, C)
            # out[t, h] = o_latent[t, h] @ W_UV^h.T (+ the kv_b_proj LoRA, absorbed): a [T, H, Dv] view of [H, T, Dv]
            out = torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
            if lora is not None and "kv_b_proj" in lora.lora_a:
                mla_absorbed_o(out, o_latent, lora.lora_a["kv_b_proj"], lora.lora_b["kv_b_proj"],
                               lora.page_table, lora.ranks, lora.scales, plan, backend=backend)
            o = out
        y = proj("o_proj", o.reshape(T, H * Dv))
        return y.view(Bsz, L, c.hidden_size)
