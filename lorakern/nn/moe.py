r"""LoRA for a fused-experts MoE block, with the deltas where engines put them.

A MoE block (Qwen3-MoE, Mixtral, DeepSeek's routed experts) routes each token to ``top_k`` of ``E`` experts; an
expert is a gated MLP ``down(act(gate(x)) * up(x))``; the block's output is the routing-weighted sum over the
token's experts. Fused-experts implementations (vLLM, SGLang, transformers >= 5) keep every expert's weights in
two 3-D tensors and never materialise per-expert ``nn.Linear`` modules, so a LoRA cannot wrap a linear layer; it
goes into the fused computation instead, through :func:`lorakern.ops.add_lora_moe`:

* **gate_up**, before the activation: ``gu[t, k] = x[t] @ W_gu[e].T`` ``[T, top_k, 2I]``, then
  ``add_lora_moe(gu, x, topk_ids, [A_gate, A_up], [B_gate, B_up], ...)`` — slices gate (columns ``0:I``) and up
  (``I:2I``), ``x [T, H]`` shared by the token's experts;
* **down**, before the weighted sum: ``d[t, k] = w[t, k] · h[t, k] @ W_down[e].T`` ``[T, top_k, H]`` with
  ``h = act(gate) * up`` ``[T, top_k, I]``, then ``add_lora_moe(d, h, topk_ids, A_down, B_down, ...,
  topk_weights=w)`` — ``x`` per pair, routed weights applied to the delta as to the base; finally ``sum_k d[t, k]``.

This equals running, for every token, its adapter's merged experts ``W_e + scale · B_e @ A_e`` (the parity the
tests check against :func:`merged_experts`).

Weight layout (transformers >= 5, :class:`MoEExperts` here): ``gate_up_proj [E, 2I, H]`` (gate rows first, then
up), ``down_proj [E, H, I]``, ``act_fn``. LoRA rank rows: the packed pool layout of DESIGN.md §2 —
``lora_a [rows, E, K]``, ``lora_b [rows, E, N]`` per slice (:class:`MoELoRA`, or an
:class:`~lorakern.pool.AdapterPool` with MoE targets through :meth:`MoELoRA.from_pool`).

Pieces:

* :class:`MoEConfig`, :class:`MoERouter`, :class:`MoEExperts`, :class:`MoEBlock` — a minimal reference MoE
  (softmax router, top-k, optional renormalisation, SiLU-gated experts) for tests, with transformers' layout.
* :class:`LoRAMoEExperts` — wraps any experts module of that layout (this package's, transformers'
  ``Qwen3MoeExperts`` / ``MixtralExperts`` / ``Qwen2MoeExperts`` ...) and applies one adapter per token.
* :func:`attach_moe_lora` — wraps every fused-experts module of a (Hugging Face) model in place and feeds it
  the batch's plan from a shared :class:`~lorakern.nn.LoRAContext`.

Which adapter each token uses: ``forward(..., slots=)`` (per-token slots ``[T]`` or a
:class:`~lorakern.LoRAPlan`), else :meth:`LoRAMoEExperts.set_slots`, else the ``context`` — its plan for the
block's *input* (``[B, S, H]``, before the block flattens it) is taken by a forward pre-hook on the parent block
that :func:`attach_moe_lora` installs, so sequence-level slots work as for the linear modules. With no adapter in
the batch the wrapped module's own forward runs: the output is the base model's, bit for bit.

Inference only: the LoRA part is added in place by a custom op without a backward formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorakern.ops import add_lora_moe
from lorakern.plan import LoRAPlan

__all__ = ["MoEConfig", "MoERouter", "MoEExperts", "MoEBlock", "MoELoRA", "LoRAMoEExperts", "attach_moe_lora",
           "merged_experts", "check_experts_layout"]


# ------------------------------------------------------------------------------------------------ reference MoE
@dataclass(frozen=True)
class MoEConfig:
    """Sizes of one MoE block (defaults: tiny, for tests; Qwen3-30B-A3B is hidden 2048, moe_intermediate 768,
    128 experts, top-8, normalised top-k probabilities)."""

    hidden_size: int = 32
    moe_intermediate_size: int = 16
    num_experts: int = 8
    top_k: int = 2
    norm_topk_prob: bool = True


class MoERouter(nn.Module):
    """``softmax(x @ W.T)`` in float32, top-k, optionally renormalised over the top-k (Qwen3's
    ``norm_topk_prob``). Returns ``(logits [T, E], weights [T, k] in x's dtype, ids int64 [T, k])``."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.top_k, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor):
        logits = F.linear(x, self.weight)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        probs = torch.softmax(logits, dim=-1, dtype=acc)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return logits, w.to(x.dtype), ids


class MoEExperts(nn.Module):
    """``E`` SiLU-gated experts in transformers' fused layout: ``gate_up_proj [E, 2I, H]`` (gate rows, then up),
    ``down_proj [E, H, I]``. ``forward(x [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` =
    ``sum_k w[t, k] · down_e(silu(gate_e(x[t])) * up_e(x[t]))``, one expert at a time (readable, not fast)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in torch.unique(top_k_index).tolist():
            k, t = torch.where(top_k_index.t() == e)  # pairs ordered by (k, t), as transformers' eager loop
            gate, up = F.linear(x[t], self.gate_up_proj[e]).chunk(2, dim=-1)
            h = F.linear(self.act_fn(gate) * up, self.down_proj[e])
            out.index_add_(0, t, (h * top_k_weights[t, k, None]).to(out.dtype))
        return out


class MoEBlock(nn.Module):
    """Router + experts: ``forward(x [..., H]) -> [..., H]``, flattening the leading dims to tokens (as
    transformers' sparse MoE blocks do)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = MoERouter(cfg)
        self.experts = MoEExperts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        _, w, ids = self.gate(x2)
        return self.experts(x2, ids, w).reshape(x.shape)


def merged_experts(experts: nn.Module, gate_up, down, scale: float) -> MoEExperts:
    """A copy of ``experts`` with one adapter merged: ``W_e + scale · B_e @ A_e`` for every expert — the oracle of
    the parity tests. ``gate_up = (A_gate, B_gate, A_up, B_up)`` and ``down = (A_down, B_down)`` with ``A [E, r, K]``
    and ``B [E, N, r]`` (``None`` = the adapter lacks that projection)."""
    E, I2, H = experts.gate_up_proj.shape
    I = I2 // 2
    cfg = MoEConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E)
    m = MoEExperts(cfg).to(experts.gate_up_proj.dtype)
    m.act_fn = experts.act_fn
    with torch.no_grad():
        gu = experts.gate_up_proj.detach().clone()
        dn = experts.down_proj.detach().clone()
        for j, (A, B) in enumerate(((gate_up[0], gate_up[1]), (gate_up[2], gate_up[3]))):
            if A is not None:
                gu[:, j * I:(j + 1) * I] += scale * torch.bmm(B.to(gu.dtype), A.to(gu.dtype))
        if down is not None and down[0] is not None:
            dn += scale * torch.bmm(down[1].to(dn.dtype), down[0].to(dn.dtype))
        m.gate_up_proj.copy_(gu)
        m.down_proj.copy_(dn)
    return m


# ------------------------------------------------------------------------------------------------ LoRA
@dataclass
class MoELoRA:
    """The rank rows of one MoE layer's LoRA: ``gate_up_a`` / ``gate_up_b`` two slices (gate, up) of
    ``[rows, E, H]`` / ``[rows, E, I]``; ``down_a`` / ``down_b`` one slice ``[rows, E, I]`` / ``[rows, E, H]``;
    the shared ``page_table``, ``ranks``, ``scales``."""

    gate_up_a: List[torch.Tensor]
    gate_up_b: List[torch.Tensor]
    down_a: List[torch.Tensor]
    down_b: List[torch.Tensor]
    page_table: torch.Tensor
    ranks: torch.Tensor
    scales: Optional[torch.Tensor]

    @classmethod
    def from_pool(cls, pool, layer: int, gate_up_target: str = "experts.w13",
                  down_target: str = "experts.w2") -> "MoELoRA":
        """Views of an :class:`~lorakern.pool.AdapterPool`'s packed MoE targets (they never move, so the result
        stays valid while adapters come and go)."""
        a1, b1 = pool.lora_a(layer, gate_up_target), pool.lora_b(layer, gate_up_target)
        a2, b2 = pool.lora_a(layer, down_target), pool.lora_b(layer, down_target)
        return cls(list(a1), list(b1), list(a2), list(b2), pool.page_table, pool.ranks, pool.scales)


def check_experts_layout(experts: nn.Module) -> None:
    """Raise ``TypeError`` (with the reason) unless ``experts`` has the fused layout this module handles:
    3-D ``gate_up_proj [E, 2I, H]`` (gate then up, concatenated), ``down_proj [E, H, I]``, ``act_fn``, no biases,
    no per-expert norm (transformers' ``use_experts_implementation`` flags, when present)."""
    name = type(experts).__name__
    gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.dim() != 3 or dn.dim() != 3:
        raise TypeError(f"experts: {name} has no fused 3-D gate_up_proj / down_proj parameters")
    flags = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
             "has_post_expert_norm": False}
    for f, want in flags.items():
        if hasattr(experts, f) and bool(getattr(experts, f)) != want:
            raise TypeError(f"experts: {name} has {f}={getattr(experts, f)}; LoRAMoEExperts handles the layout "
                            f"{flags}")
    E, I2, H = gu.shape
    if I2 % 2 or tuple(dn.shape) != (E, H, I2 // 2):
        raise TypeError(f"experts: {name} has gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dn.shape)}; "
                        f"expected [E, 2I, H] and [E, H, I]")
    if not callable(getattr(experts, "act_fn", None)):
        raise TypeError(f"experts: {name} has no act_fn")


class LoRAMoEExperts(nn.Module):
    """A fused-experts module plus one LoRA adapter per token on gate, up and down (see the module docstring).

    Parameters
    ----------
    experts : nn.Module
        transformers' layout (:func:`check_experts_layout`); kept as a submodule, its parameters untouched.
    lora : MoELoRA, optional
        The rank rows; default: from ``context.pool`` at ``layer`` (targets ``gate_up_target``, ``down_target``).
    context : LoRAContext, optional
        Anything with ``active``, ``plan_for(x)``, ``backend`` (and ``pool``): the shared per-batch assignment.
    backend : str, default "auto"
        Used when there is no context.
    """

    def __init__(self, experts: nn.Module, lora: Optional[MoELoRA] = None, *, context=None,
                 layer: Optional[int] = None, gate_up_target: str = "experts.w13", down_target: str = "experts.w2",
                 backend: str = "auto"):
        super().__init__()
        check_experts_layout(experts)
        self.experts = experts
        self.context = context
        if lora is None:
            if context is None or layer is None:
                raise ValueError("lora: give the rank rows (MoELoRA), or a context with a pool and the layer")
            lora = MoELoRA.from_pool(context.pool, layer, gate_up_target, down_target)
        E, I2, H = experts.gate_up_proj.shape
        I = I2 // 2
        for name, ts, want in (("gate_up_a", lora.gate_up_a, (E, H)), ("gate_up_b", lora.gate_up_b, (E, I)),
                               ("down_a", lora.down_a, (E, I)), ("down_b", lora.down_b, (E, H))):
            n = 2 if name.startswith("gate_up") else 1
            if len(ts) != n or any(t.dim() != 3 or tuple(t.shape[1:]) != want for t in ts):
                raise ValueError(f"lora.{name}: expected {n} tensor(s) [rows, {want[0]}, {want[1]}], got "
                                 f"{[tuple(t.shape) for t in ts]}")
        self.lora = lora
        self.layer = layer
        self.backend = backend
        self._slots = None  # set_slots(...)
        self._hook_plan = None  # from the parent block's pre-hook (attach_moe_lora)

    num_experts = property(lambda self: self.experts.gate_up_proj.shape[0])

    def set_slots(self, slots) -> None:
        """Per-token slots ``[T]`` (``-1`` = none) or a :class:`~lorakern.LoRAPlan` for the next forwards;
        ``None`` clears."""
        self._slots = slots

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.num_experts}"

    def _current(self, slots):
        if slots is not None:
            return slots
        if self._slots is not None:
            return self._slots
        ctx = self.context
        if ctx is not None and getattr(ctx, "active", False):
            return self._hook_plan
        return None

    @staticmethod
    def _any_adapter(slots) -> bool:
        if isinstance(slots, LoRAPlan):
            return slots.stats is None or slots.stats.lora_tokens > 0
        return bool((slots >= 0).any())

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                slots=None) -> torch.Tensor:
        s = self._current(slots)
        if s is None or not self._any_adapter(s):
            return self.experts(hidden_states, top_k_index, top_k_weights)
        ex, L = self.experts, self.lora
        backend = getattr(self.context, "backend", self.backend) if self.context is not None else self.backend
        x = hidden_states
        T, H = x.shape
        k = top_k_index.shape[1]
        W1, W2 = ex.gate_up_proj, ex.down_proj
        I = W1.shape[1] // 2
        # Base expert compute in transformers' eager order (experts ascending, pairs by (k, t) within an expert,
        # index_add in expert order), so tokens without an adapter get its output bit for bit.
        groups = [(e, *torch.where(top_k_index.t() == e)) for e in torch.unique(top_k_index).tolist()]
        gu = x.new_empty(T, k, 2 * I)
        for e, j, t in groups:  # base gate_up of every (token, expert) pair
            gu[t, j] = F.linear(x[t], W1[e])
        # LoRA delta of gate and up, before the activation
        add_lora_moe(gu, x, top_k_index, L.gate_up_a, L.gate_up_b, L.page_table, L.ranks, L.scales, s,
                     backend=backend)
        gate, up = gu.split(I, dim=-1)
        h = ex.act_fn(gate) * up  # [T, k, I]
        w = top_k_weights
        d = x.new_empty(T, k, H)
        for e, j, t in groups:  # base down, routed weight applied per pair
            d[t, j] = F.linear(h[t, j], W2[e]) * w[t, j, None]
        # LoRA delta of down, before the weighted sum (the routed weight applied to the delta as to the base)
        add_lora_moe(d, h, top_k_index, L.down_a, L.down_b, L.page_table, L.ranks, L.scales, s,
                     topk_weights=w if w.dtype in (torch.float32, x.dtype) else w.float(), backend=backend)
        if self.context is not None and hasattr(self.context, "lora_calls"):
            self.context.lora_calls += 2
        out = torch.zeros_like(x)
        for e, j, t in groups:  # the routed sum
            out.index_add_(0, t, d[t, j].to(out.dtype))
        return out


def _experts_pre_hook(wrapper: LoRAMoEExperts):
    def hook(module, args, kwargs):
        ctx = wrapper.context
        wrapper._hook_plan = None
        if ctx is None or not ctx.active:
            return None
        x = args[0] if args else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor):
            wrapper._hook_plan = ctx.plan_for(x)  # the block's input [B, S, H]: sequence slots resolve here
        return None
    return hook


def attach_moe_lora(model: nn.Module, context, *, gate_up_target: str = "experts.w13",
                    down_target: str = "experts.w2", layer_of=None) -> List[LoRAMoEExperts]:
    """Wrap, in place, every fused-experts submodule named ``experts`` of ``model`` (transformers' Qwen3-MoE,
    Mixtral, Qwen2-MoE, ... or :class:`MoEBlock`) in a :class:`LoRAMoEExperts` reading ``context.pool``'s packed
    MoE targets of its layer, and give it the batch's plan through a pre-hook on its parent block.

    ``layer_of(name) -> int``: the layer of a module path (default: the number after ``layers.``; a model with
    a single block uses layer 0). Returns the wrappers. Experts modules of another layout raise ``TypeError``."""
    import re

    rx = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    found = []
    for name, mod in list(model.named_modules()):
        child = getattr(mod, "experts", None)
        if not isinstance(child, nn.Module) or isinstance(child, (LoRAMoEExperts, nn.ModuleList)):
            continue
        if not isinstance(getattr(child, "gate_up_proj", None), torch.Tensor):
            continue
        if layer_of is not None:
            layer = int(layer_of(name))
        else:
            m = rx.search(name + ".")
            layer = int(m.group(1)) if m else 0
        found.append((mod, child, layer))
    wrappers = []
    for parent, child, layer in found:
        w = LoRAMoEExperts(child, context=context, layer=layer, gate_up_target=gate_up_target,
                           down_target=down_target)
        parent.experts = w
        parent.register_forward_pre_hook(_experts_pre_hook(w), with_kwargs=True)
        wrappers.append(w)
    return wrappers
