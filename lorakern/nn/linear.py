r"""LoRA linear modules over an :class:`~lorakern.pool.AdapterPool`, driven by one shared per-batch context.

Three pieces::

    LoRAContext            which adapter slot each token of the current batch uses; builds ONE LoRAPlan per batch
         │                 (per forward) and hands the same plan to every module of the model
         ├── LoRALinear         wraps an nn.Linear:  out = base(x);  add_lora(out, x, <its slice(s)>, plan)  in place
         ├── MergedLoRALinear   a fused projection (q|k|v, gate|up in one nn.Linear): every slice in ONE add_lora
         └── SliceGroup         separate nn.Linear modules that share their input (Llama's q_proj, k_proj, v_proj):
                                the first one called runs one add_lora for all slices, the others reuse its result

Shapes: ``x [..., K]`` (``[T, K]``, ``[B, S, K]``, ...) — leading dims are flattened to tokens ``T``; the plan
must cover exactly those ``T`` tokens (the context derives it from the input's shape, see
:meth:`LoRAContext.plan_for`).

Cost when a batch uses no adapter (outside any adapter context, or every entry ``None``): one attribute check
per module — no plan, no op call, no allocation; the output is the base linear's, bit for bit.

Autograd: the modules are for inference. The LoRA part is added in place by a custom op without a backward
formula: gradients flow to the base layer and its input as if there were no LoRA.

Example (a custom model; :func:`lorakern.attach` does all of this for Hugging Face models)::

    pool = AdapterPool(layout, max_rows=256, max_slots=16, max_rank=32, dtype=torch.float32)
    ctx = LoRAContext(pool, backend="torch")
    model.q = LoRALinear(model.q, ctx, layer=0, target="q")
    with pool.wave(["alice", None]) as slots:          # one adapter per sequence
        ctx.set_sequence_slots(slots)
        y = model(x)                                    # x [2, S, K]: tokens of sequence b use slots[b]
        ctx.set_sequence_slots(None)
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from lorakern import ops as _ops
from lorakern.plan import LoRAPlan, ranks_on

__all__ = ["LoRAContext", "LoRALinear", "MergedLoRALinear", "SliceGroup", "derive_token_slots"]

_INT = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def derive_token_slots(seq_slots: torch.Tensor, lead_shape: Sequence[int], *, cu_seqlens=None,
                       position_ids=None) -> torch.Tensor:
    """Per-token slots ``int32 [T]`` (``T = prod(lead_shape)``) from one slot per sequence ``seq_slots [n]``.

    Rules, in order:

    1. padded batch: ``lead_shape = (n, S, ...)`` — sequence ``b`` is row ``b``; its slot is broadcast over the
       row (prefill ``[n, S]`` and KV-cache decode ``[n, 1]`` alike; padding tokens get the row's slot, which is
       harmless since they are masked); ``(k·n, S, ...)`` — each sequence's ``k`` rows consecutive, as
       ``generate`` expands a batch for beam search or ``num_return_sequences`` (unless ``cu_seqlens`` is given);
    2. one token per sequence: ``lead_shape = (n,)`` (an engine's flattened decode batch);
    3. packed (varlen): ``cu_seqlens [n + 1]`` (cumulative lengths, ``cu_seqlens[-1] == T``), or
       ``position_ids [B, S]`` where a position that is not the previous one plus 1 starts a new sequence
       (the rule of Hugging Face's packed-sequence masks); sequences are numbered row by row.

    Raises ``ValueError`` naming the mismatch when none applies.
    """
    n = int(seq_slots.numel())
    lead = tuple(int(d) for d in lead_shape)
    T = math.prod(lead)
    dev = seq_slots.device
    s32 = seq_slots.to(torch.int32)
    if len(lead) >= 2 and lead[0] == n:
        return s32.repeat_interleave(T // n if n else 0)
    if len(lead) >= 2 and n and lead[0] % n == 0 and cu_seqlens is None:
        return s32.repeat_interleave(T // n)  # rows expanded k-fold per sequence (beams, num_return_sequences)
    if len(lead) == 1 and lead[0] == n:
        return s32
    if cu_seqlens is not None:
        cu = torch.as_tensor(cu_seqlens).to(device=dev, dtype=torch.int64).flatten()
        if cu.numel() != n + 1:
            raise ValueError(f"cu_seqlens: {cu.numel()} entries for {n} sequences (expected {n + 1})")
        lengths = cu[1:] - cu[:-1]
        total = int(cu[-1] - cu[0])
        if total != T or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens: covers {total} tokens, but the input has {T} (shape {lead})")
        return s32.repeat_interleave(lengths)
    if position_ids is not None:
        pos = torch.as_tensor(position_ids).to(dev)
        if pos.numel() != T:
            raise ValueError(f"position_ids: has {pos.numel()} entries, but the input has {T} tokens (shape {lead})")
        pos = pos.reshape(-1, lead[-1] if lead else 1) if pos.dim() != 2 else pos
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
        seq_idx = torch.cumsum(starts.flatten().to(torch.int64), 0) - 1
        found = int(seq_idx[-1]) + 1 if T else 0
        if found != n:
            raise ValueError(f"position_ids: the packed input holds {found} sequences (a position that is not the "
                             f"previous one + 1 starts one), but {n} adapters were given")
        return s32[seq_idx]
    raise ValueError(f"the batch has {n} sequence(s) (one adapter entry each), but the input has shape {lead}: "
                     f"expected [{n}, S, ...] (padded), [{n}, ...] (one token per sequence), or packed tokens with "
                     f"cu_seqlens / position_ids; engines can give per-token slots instead (token_slots)")


class LoRAContext:
    """The current batch's adapter assignment, shared by every LoRA module of a model.

    Two ways to say which adapter each token uses:

    * :meth:`set_sequence_slots` — one pool slot per sequence (``-1`` = none); the per-token slots are derived
      from each input's shape (:func:`derive_token_slots`) with packing information from :meth:`begin_forward`;
    * :meth:`set_token_slots` — explicit per-token pool slots ``[T]`` (or ``[B, S]``), or a ready
      :class:`~lorakern.LoRAPlan` (static plans included, for CUDA graphs): the engine-facing form.

    Plans are built lazily, once per batch: the first module that runs builds it, every other module of the same
    forward reuses it (cached by the input's leading shape). :meth:`begin_forward` — called by a pre-hook on the
    model — starts a new batch.

    Attributes ``plans_built`` and ``lora_calls`` count plan builds and op calls (for tests and the demo).
    """

    def __init__(self, pool, backend: str = "auto"):
        self.pool = pool
        self.backend = backend
        self.active = False  # the one check a module makes when no adapter is in use
        self._seq_slots: Optional[torch.Tensor] = None
        self._token: Optional[object] = None  # tensor [T] or LoRAPlan (engine form)
        self._packing: dict = {}
        self._plans: Dict[Tuple[int, ...], LoRAPlan] = {}
        self._groups: List["SliceGroup"] = []
        self.plans_built = 0
        self.lora_calls = 0

    # ------------------------------------------------------------------ assignment
    def set_sequence_slots(self, slots: Optional[torch.Tensor], *, any_adapter: Optional[bool] = None) -> None:
        """One pool slot per sequence (``-1`` = base model), or ``None`` to clear. ``any_adapter=False`` (known on
        the host, e.g. every entry was ``None``) skips all LoRA work without reading ``slots``."""
        self._reset()
        if slots is None:
            return
        slots = self._check_slots("slots", slots)
        if slots.dim() != 1:
            raise ValueError(f"slots: expected one slot per sequence [n], got shape {tuple(slots.shape)}")
        self._seq_slots = slots.to(self.pool.device, torch.int32)
        if any_adapter is None:
            any_adapter = bool((self._seq_slots >= 0).any())
        self.active = bool(any_adapter)

    def set_token_slots(self, slots, *, any_adapter: Optional[bool] = None) -> None:
        """Explicit per-token pool slots: an integer tensor ``[T]`` / ``[B, S]`` (``-1`` = none) or a
        :class:`~lorakern.LoRAPlan`; ``None`` clears. The plan is built once and reused by every forward until
        changed; an input whose token count differs raises ``ValueError``."""
        self._reset()
        if slots is None:
            return
        if isinstance(slots, LoRAPlan):
            self._token = slots
            self.active = True if any_adapter is None else bool(any_adapter)
            return
        slots = self._check_slots("slots", slots)
        self._token = slots.reshape(-1).to(self.pool.device, torch.int32)
        if any_adapter is None:
            any_adapter = bool((self._token >= 0).any())
        self.active = bool(any_adapter)

    def clear(self) -> None:
        self._reset()

    def snapshot(self) -> tuple:
        """The assignment (to restore it after a nested context)."""
        return (self._seq_slots, self._token, self.active, self._packing)

    def restore(self, state: tuple) -> None:
        self._reset()
        self._seq_slots, self._token, self.active, self._packing = state

    def _reset(self) -> None:
        self.active = False
        self._seq_slots = None
        self._token = None
        self._packing = {}
        self._plans.clear()
        for g in self._groups:
            g.clear()

    @staticmethod
    def _check_slots(name, slots) -> torch.Tensor:
        if not isinstance(slots, torch.Tensor):
            slots = torch.as_tensor(slots)
        if slots.dtype not in _INT:
            raise TypeError(f"{name}: expected an integer tensor of pool slots, got {slots.dtype}")
        return slots

    # ------------------------------------------------------------------ per forward
    def begin_forward(self, *, cu_seqlens=None, position_ids=None) -> None:
        """A new batch starts: drop the previous forward's plans and record packing information (sequence
        assignment only; the engine form keeps its plan)."""
        if self._seq_slots is None:
            return
        self._plans.clear()
        self._packing = {"cu_seqlens": cu_seqlens, "position_ids": position_ids}

    def plan_for(self, x: torch.Tensor) -> Optional[LoRAPlan]:
        """The plan for an input ``x [..., K]`` of the current batch, or ``None`` when no token uses an adapter."""
        if not self.active:
            return None
        lead = tuple(x.shape[:-1])
        plan = self._plans.get(lead)
        if plan is not None:
            return plan
        T = math.prod(lead)
        if self._token is not None:
            tok = self._token
            n = tok.num_tokens if isinstance(tok, LoRAPlan) else tok.numel()
            if n != T:
                raise ValueError(f"token slots: {n} given, but the input has {T} tokens (shape {tuple(x.shape)})")
            if not isinstance(tok, LoRAPlan):  # built once, whatever the inputs' leading shapes
                self._token = tok = LoRAPlan.from_slots(tok, ranks_on(getattr(self.pool, "ranks", None), tok))
                self.plans_built += 1
            plan = tok
        else:
            slots = derive_token_slots(self._seq_slots, lead, **self._packing)
            ranks = ranks_on(getattr(self.pool, "ranks", None), slots)  # tiles in descending rank order
            if torch.compiler.is_compiling():
                # a dynamic plan reads its statistics back to the host (a graph break per module under
                # torch.compile); a static one sizes its grids from T alone
                plan = LoRAPlan.static(T, slots.device).update(slots, ranks)
            else:
                plan = LoRAPlan.from_slots(slots, ranks)
            self.plans_built += 1
        self._plans[lead] = plan
        return plan


def _version(x: torch.Tensor) -> int:
    """``x._version``; inference tensors have none (they cannot be modified in place outside inference mode)."""
    try:
        return x._version
    except RuntimeError:
        return -2


def _flat(x: torch.Tensor, out: torch.Tensor):
    """``x [..., K]`` and ``out [..., N]`` as ``[T, K]`` / ``[T, N]`` (``out`` viewed, never copied)."""
    x2 = x.reshape(-1, x.shape[-1])
    out2 = out.view(-1, out.shape[-1])
    return x2, out2


class LoRALinear(nn.Module):
    """An ``nn.Linear`` plus the LoRA of one slice (or all slices) of a pool target.

    ``forward(x)``: ``out = base_layer(x)``; if the context has a plan for ``x``, then in place
    ``out += scale[s] * (x @ A[s].T) @ B[s].T`` through :func:`lorakern.ops.add_lora` with that plan.

    Parameters
    ----------
    base_layer : nn.Linear
        The wrapped layer (kept as a submodule; its parameters are untouched).
    context : LoRAContext
        Shared by every LoRA module of the model.
    layer, target : int, str
        Where this module's rank rows are in ``context.pool`` (``pool.lora_a(layer, target)``).
    slice_index : int, optional
        The slice of the target this layer computes (``q_proj`` = slice 0 of ``qkv_proj``); ``None`` = every
        slice (the output is their concatenation, see :class:`MergedLoRALinear`).
    group : SliceGroup, optional
        Share one op call with the other slices of the target (their layers must be called with the same input
        tensor, as Llama's q/k/v and gate/up are); see :class:`SliceGroup`.
    """

    def __init__(self, base_layer: nn.Linear, context: LoRAContext, layer: int, target: str,
                 slice_index: Optional[int] = None, group: Optional["SliceGroup"] = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer: expected a torch.nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.context = context
        self.layer, self.target, self.slice_index = int(layer), target, slice_index
        pool = context.pool
        a, b = pool.lora_a(self.layer, target), pool.lora_b(self.layer, target)
        K = a[0].shape[-1]
        if K != base_layer.in_features:
            raise ValueError(f"base_layer: in_features={base_layer.in_features}, but target {target!r} has K={K}")
        if slice_index is None:
            self._a, self._b = list(a), list(b)
        else:
            if not 0 <= slice_index < len(a):
                raise ValueError(f"slice_index: {slice_index} out of range for target {target!r} with {len(a)} "
                                 f"slices")
            self._a, self._b = [a[slice_index]], [b[slice_index]]
        n_total = sum(t.shape[-1] for t in self._b)
        if n_total != base_layer.out_features:
            what = "the slices' widths sum to" if slice_index is None else f"slice {slice_index} has N ="
            raise ValueError(f"base_layer: out_features={base_layer.out_features}, but {what} {n_total} in target "
                             f"{target!r}")
        if group is not None and slice_index is None:
            raise ValueError("group: only a single-slice LoRALinear can share a SliceGroup")
        self.group = group
        if group is not None:
            group.check_member(self)

    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)
    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def extra_repr(self) -> str:
        s = "" if self.slice_index is None else f", slice={self.slice_index}"
        g = ", grouped" if self.group is not None else ""
        return f"layer={self.layer}, target={self.target!r}{s}{g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        ctx = self.context
        if not ctx.active:
            return out
        plan = ctx.plan_for(x)
        if plan is None:
            return out
        if self.group is not None:
            return self.group.apply(self.slice_index, x, out, plan)
        x2, out2 = _flat(x, out)
        pool = ctx.pool
        ctx.lora_calls += 1
        _ops.add_lora(out2, x2, self._a, self._b, pool.page_table, pool.ranks, pool.scales, plan,
                      backend=ctx.backend)
        return out


class MergedLoRALinear(LoRALinear):
    """A fused projection: one ``nn.Linear`` whose output is the concatenation of a target's slices (``q|k|v``,
    ``gate|up``), each slice with its own LoRA A and B; ONE :func:`~lorakern.ops.add_lora` call covers every slice
    (the kernels read ``x`` once and run all slices in one launch).

    :meth:`from_linears` builds one from separate layers (concatenating their weights), for models and engines
    that keep projections fused."""

    def __init__(self, base_layer: nn.Linear, context: LoRAContext, layer: int, target: str):
        super().__init__(base_layer, context, layer, target, slice_index=None)

    @classmethod
    def from_linears(cls, linears: Sequence[nn.Linear], context: LoRAContext, layer: int,
                     target: str) -> "MergedLoRALinear":
        """Fuse ``linears`` (same ``in_features``, all with or all without bias) into one base layer."""
        ls = list(linears)
        if not ls or any(not isinstance(l, nn.Linear) for l in ls):
            raise TypeError("linears: expected a non-empty sequence of torch.nn.Linear")
        K = ls[0].in_features
        if any(l.in_features != K for l in ls):
            raise ValueError(f"linears: in_features differ ({[l.in_features for l in ls]})")
        has_bias = {l.bias is not None for l in ls}
        if len(has_bias) != 1:
            raise ValueError("linears: all must have a bias or none")
        w = ls[0].weight
        fused = nn.Linear(K, sum(l.out_features for l in ls), bias=has_bias.pop(), device=w.device, dtype=w.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([l.weight for l in ls]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([l.bias for l in ls]))
        return cls(fused, context, layer, target)


class SliceGroup:
    """Separate linear layers that share one input and form one pool target (Llama's ``q_proj``/``k_proj``/
    ``v_proj`` → ``qkv_proj``): ONE :func:`~lorakern.ops.add_lora` per forward for all of them.

    The first member called with an input ``x`` computes every slice's LoRA into a buffer ``[T, sum N_i]``; the
    other members, called with the same tensor (same object, unmodified), add their columns of it. A member
    called with any other input computes its own slice alone, so a model that does not share the input is still
    correct. Why: fewer op calls (one per target instead of one per slice: on the CPU each call of the torch
    backend costs per-adapter Python work; on the GPU one launch and one read of ``x`` instead of several), at the
    price of one zero-filled buffer and one add per slice. Rounding: the LoRA part is rounded to the output dtype
    once before it is added (as PEFT does), instead of being added in fp32.
    """

    def __init__(self, context: LoRAContext, layer: int, target: str):
        self.context, self.layer, self.target = context, int(layer), target
        pool = context.pool
        self._a, self._b = pool.lora_a(self.layer, target), pool.lora_b(self.layer, target)
        widths = [t.shape[-1] for t in self._b]
        self.offsets = [sum(widths[:i]) for i in range(len(widths))]
        self.widths = widths
        self.width = sum(widths)
        self.members = 0
        context._groups.append(self)
        self.clear()

    def check_member(self, m: LoRALinear) -> None:
        if m.context is not self.context or m.layer != self.layer or m.target != self.target:
            raise ValueError("group: the member's context, layer and target must be the group's")
        self.members += 1

    def clear(self) -> None:
        self._x = self._plan = self._delta = None
        self._ver = -1
        self._pending: set = set()

    def apply(self, i: int, x: torch.Tensor, out: torch.Tensor, plan: LoRAPlan) -> torch.Tensor:
        ctx = self.context
        pool = ctx.pool
        x2, out2 = _flat(x, out)
        # under torch.compile every slice takes its own call: the shared delta is state kept across module calls
        # and checked by the input's version counter, which the tracer cannot guard on (a graph break per slice)
        compiling = torch.compiler.is_compiling()
        hit = (not compiling and self._x is x and self._ver == _version(x) and self._plan is plan
               and i in self._pending)
        if not hit:
            if self.members < 2 or compiling:  # nothing to share: the plain single-slice call, no buffer
                ctx.lora_calls += 1
                _ops.add_lora(out2, x2, [self._a[i]], [self._b[i]], pool.page_table, pool.ranks, pool.scales, plan,
                              backend=ctx.backend)
                return out
            delta = torch.zeros(x2.shape[0], self.width, dtype=out.dtype, device=out.device)
            ctx.lora_calls += 1
            _ops.add_lora(delta, x2, self._a, self._b, pool.page_table, pool.ranks, pool.scales, plan,
                          backend=ctx.backend)
            self._x, self._ver, self._plan, self._delta = x, _version(x), plan, delta
            self._pending = set(range(len(self.widths)))
        off, n = self.offsets[i], self.widths[i]
        out2.add_(self._delta[:, off:off + n])
        self._pending.discard(i)
        if not self._pending:
            self.clear()  # every slice consumed: release the input and the buffer
        return out
