r"""What a pool holds: the targets of a model (:class:`TargetSpec`, :class:`PoolLayout`), how PEFT module names map
onto them, and how one rank row is laid out in memory (:class:`RowFormat`).

A *target* is one LoRA-adapted projection of every layer, with one or more *slices* that share the input ``x``
(``qkv_proj``: slices q, k, v of widths ``(N_q, N_kv, N_kv)``). A *MoE target* is packed (DESIGN.md §2): every
rank row holds that rank component for all ``E`` experts, ``lora_a [rows, E, K]``, ``lora_b [rows, E, N_i]``.

Module names. PEFT names a module by its path in the base model (``model.layers.3.self_attn.k_proj``, saved as
``base_model.model.model.layers.3.self_attn.k_proj.lora_A.weight``). ``PoolLayout.modules`` maps name *patterns*
to ``(target, slice)``; a pattern is a dotted path with the placeholders ``{layer}`` (required) and ``{expert}``
(MoE targets: one PEFT module per expert, stacked into the packed rows on load). A pattern matches any name that
ends with it on a dot boundary, so ``layers.{layer}.self_attn.k_proj`` matches the PEFT key above.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["TargetSpec", "PoolLayout", "RowFormat", "ModuleKey", "LLAMA_MODULES"]

#: ``(layer, target, slice)``, or ``(layer, target, slice, expert)`` for one expert of a MoE target.
ModuleKey = Tuple

#: PEFT module patterns of Llama-style models (Llama, Mistral, Qwen2, ...) onto the fused targets of
#: :meth:`PoolLayout.llama`.
LLAMA_MODULES: Dict[str, Tuple[str, int]] = {
    "layers.{layer}.self_attn.q_proj": ("qkv_proj", 0),
    "layers.{layer}.self_attn.k_proj": ("qkv_proj", 1),
    "layers.{layer}.self_attn.v_proj": ("qkv_proj", 2),
    "layers.{layer}.self_attn.o_proj": ("o_proj", 0),
    "layers.{layer}.mlp.gate_proj": ("gate_up_proj", 0),
    "layers.{layer}.mlp.up_proj": ("gate_up_proj", 1),
    "layers.{layer}.mlp.down_proj": ("down_proj", 0),
}


def _pos_int(name: str, v, allow_zero: bool = False) -> int:
    if isinstance(v, bool):
        raise TypeError(f"{name}: expected an int, got bool")
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}") from None
    if i < (0 if allow_zero else 1):
        raise ValueError(f"{name}: must be >= {0 if allow_zero else 1}, got {i}")
    return i


@dataclass(frozen=True)
class TargetSpec:
    """One LoRA target of every (or some) layer(s).

    Parameters
    ----------
    K : int
        Input width (``x: [T, K]``), shared by the slices.
    n_sizes : sequence of int
        Output width ``N_i`` of each slice.
    num_experts : int, default 0
        ``0`` for a dense target; ``E >= 1`` for a packed MoE target (``lora_a [rows, E, K]``, ``lora_b [rows, E,
        N_i]``). Only allowed in ``PoolLayout(moe_targets=...)``.
    layers : sequence of int, optional
        The layers that have this target (e.g. MoE layers only); ``None`` = every layer.
    """

    K: int
    n_sizes: Tuple[int, ...]
    num_experts: int = 0
    layers: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        object.__setattr__(self, "K", _pos_int("K", self.K))
        ns = self.n_sizes
        if isinstance(ns, int) and not isinstance(ns, bool):
            ns = (ns,)
        ns = tuple(_pos_int("n_sizes", n) for n in ns)
        if not ns:
            raise ValueError("n_sizes: a target needs at least one slice")
        object.__setattr__(self, "n_sizes", ns)
        object.__setattr__(self, "num_experts", _pos_int("num_experts", self.num_experts, allow_zero=True))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({_pos_int("layers", v, True) for v in self.layers})))

    @property
    def num_slices(self) -> int:
        return len(self.n_sizes)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def _compile_pattern(pattern: str) -> re.Pattern:
    if "{layer}" not in pattern:
        raise ValueError(f"modules: pattern {pattern!r} has no {{layer}} placeholder")
    parts = re.split(r"(\{layer\}|\{expert\})", pattern)
    rx = []
    for p in parts:
        if p == "{layer}":
            rx.append(r"(?P<layer>\d+)")
        elif p == "{expert}":
            rx.append(r"(?P<expert>\d+)")
        else:
            if "{" in p or "}" in p:
                raise ValueError(f"modules: pattern {pattern!r}: only {{layer}} and {{expert}} are placeholders")
            rx.append(re.escape(p))
    return re.compile(r"(?:.*\.)?" + "".join(rx))


class PoolLayout:
    """The targets of a model, described once for every layer.

    Parameters
    ----------
    num_layers : int
    targets : mapping of str to TargetSpec
        Dense targets, e.g. ``{"qkv_proj": TargetSpec(4096, (4096, 1024, 1024)), "o_proj": TargetSpec(4096,
        (4096,))}``.
    moe_targets : mapping of str to TargetSpec, optional
        Packed MoE targets (each with ``num_experts >= 1``), e.g. ``{"experts.w13": TargetSpec(2048, (768, 768),
        num_experts=128)}``.
    modules : mapping of str to (str, int), optional
        PEFT module name pattern → ``(target, slice)``; see the module docstring. Needed to load adapters by
        module name (PEFT directories, in-memory dicts keyed by name); tuples ``(layer, target, slice)`` always
        work.

    The order of the targets (dense first, then MoE, each in insertion order) defines the bit of each target in
    a catalog's target bitmask; at most 64 targets.
    """

    def __init__(self, num_layers: int, targets: Mapping[str, TargetSpec],
                 moe_targets: Optional[Mapping[str, TargetSpec]] = None,
                 modules: Optional[Mapping[str, Tuple[str, int]]] = None):
        self.num_layers = _pos_int("num_layers", num_layers)
        specs: Dict[str, TargetSpec] = {}
        for kind, group in (("targets", targets or {}), ("moe_targets", moe_targets or {})):
            if not isinstance(group, Mapping):
                raise TypeError(f"{kind}: expected a mapping of target name to TargetSpec, got {type(group).__name__}")
            for name, spec in group.items():
                if not isinstance(name, str) or not name:
                    raise TypeError(f"{kind}: target names must be non-empty strings, got {name!r}")
                if not isinstance(spec, TargetSpec):
                    raise TypeError(f"{kind}[{name!r}]: expected a TargetSpec, got {type(spec).__name__}")
                if name in specs:
                    raise ValueError(f"{kind}[{name!r}]: target defined twice")
                if kind == "targets" and spec.is_moe:
                    raise ValueError(f"targets[{name!r}]: num_experts={spec.num_experts}; put MoE targets in "
                                     f"moe_targets")
                if kind == "moe_targets" and not spec.is_moe:
                    raise ValueError(f"moe_targets[{name!r}]: num_experts must be >= 1 for a packed MoE target")
                if spec.layers is not None and spec.layers and spec.layers[-1] >= self.num_layers:
                    raise ValueError(f"{kind}[{name!r}]: layer {spec.layers[-1]} out of range for "
                                     f"num_layers={self.num_layers}")
                specs[name] = spec
        if not specs:
            raise ValueError("targets: a layout needs at least one target")
        if len(specs) > 64:
            raise ValueError(f"targets: {len(specs)} targets, at most 64 (one bit each in a catalog's bitmask)")
        self.specs: Dict[str, TargetSpec] = specs
        self.target_names: Tuple[str, ...] = tuple(specs)
        self.target_bit: Dict[str, int] = {n: i for i, n in enumerate(self.target_names)}
        self.modules: Dict[str, Tuple[str, int]] = {}
        self._patterns = []
        for pat, dest in (modules or {}).items():
            if (not isinstance(dest, (tuple, list)) or len(dest) != 2 or not isinstance(dest[0], str)
                    or isinstance(dest[1], bool) or not isinstance(dest[1], int)):
                raise TypeError(f"modules[{pat!r}]: expected (target, slice), got {dest!r}")
            t, s = dest
            if t not in specs:
                raise ValueError(f"modules[{pat!r}]: unknown target {t!r}; the layout has {list(specs)}")
            if not 0 <= s < specs[t].num_slices:
                raise ValueError(f"modules[{pat!r}]: slice {s} out of range for target {t!r} with "
                                 f"{specs[t].num_slices} slices")
            rx = _compile_pattern(pat)
            if specs[t].is_moe != ("{expert}" in pat):
                raise ValueError(f"modules[{pat!r}]: an {{expert}} placeholder is required for MoE targets and "
                                 f"allowed only there")
            self.modules[pat] = (t, s)
            self._patterns.append((rx, t, s))
        self._match_cache: Dict[str, Optional[ModuleKey]] = {}

    # ---------------------------------------------------------------------------------------------- factories
    @classmethod
    def llama(cls, num_layers: int, hidden_size: int, intermediate_size: int, num_heads: int,
              num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
              targets: Sequence[str] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")) -> "PoolLayout":
        """The fused targets of a Llama-style decoder (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``)
        with :data:`LLAMA_MODULES` as the PEFT name map. ``targets`` picks a subset."""
        kv = num_heads if num_kv_heads is None else num_kv_heads
        hd = hidden_size // num_heads if head_dim is None else head_dim
        all_specs = {
            "qkv_proj": TargetSpec(hidden_size, (num_heads * hd, kv * hd, kv * hd)),
            "o_proj": TargetSpec(num_heads * hd, (hidden_size,)),
            "gate_up_proj": TargetSpec(hidden_size, (intermediate_size, intermediate_size)),
            "down_proj": TargetSpec(intermediate_size, (hidden_size,)),
        }
        unknown = [t for t in targets if t not in all_specs]
        if unknown:
            raise ValueError(f"targets: unknown {unknown}; choose from {list(all_specs)}")
        specs = {t: all_specs[t] for t in targets}
        mods = {p: d for p, d in LLAMA_MODULES.items() if d[0] in specs}
        return cls(num_layers, specs, modules=mods)

    # ---------------------------------------------------------------------------------------------- queries
    def has(self, layer: int, target: str) -> bool:
        """Whether ``layer`` has ``target``."""
        spec = self.specs.get(target)
        if spec is None or not 0 <= layer < self.num_layers:
            return False
        return spec.layers is None or layer in spec.layers

    def layers_of(self, target: str) -> Tuple[int, ...]:
        spec = self.specs[target]
        return tuple(range(self.num_layers)) if spec.layers is None else spec.layers

    def match(self, name: str) -> Optional[ModuleKey]:
        """``(layer, target, slice)`` (``(layer, target, slice, expert)`` for a MoE pattern) of a PEFT module path,
        or ``None`` if no pattern matches. Results are cached (module paths recur across adapters)."""
        try:
            return self._match_cache[name]
        except KeyError:
            pass
        key = None
        for rx, t, s in self._patterns:
            m = rx.fullmatch(name)
            if m is not None:
                layer = int(m.group("layer"))
                key = (layer, t, s, int(m.group("expert"))) if self.specs[t].is_moe else (layer, t, s)
                break
        if len(self._match_cache) < 1_000_000:
            self._match_cache[name] = key
        return key

    def targets_mask(self, targets) -> int:
        """Bitmask of a set of target names (bit ``i`` = ``target_names[i]``)."""
        m = 0
        for t in targets:
            m |= 1 << self.target_bit[t]
        return m

    def __repr__(self) -> str:
        return f"PoolLayout(num_layers={self.num_layers}, targets={self.specs})"

    def __eq__(self, other) -> bool:
        return (isinstance(other, PoolLayout) and self.num_layers == other.num_layers
                and self.specs == other.specs and self.modules == other.modules)

    __hash__ = None  # mutable cache inside; compare by value


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class _Segment:
    a_offs: Tuple[int, ...]
    b_offs: Tuple[int, ...]
    E: int  # 1 for a dense target
    K: int
    n_sizes: Tuple[int, ...]


class RowFormat:
    r"""Where each layer's, target's and slice's part of one rank row lies in the pool's row buffer.

    The pool keeps all rank rows in ONE tensor ``rows: [num_rows, row_elems]``. Rank row ``j`` of an adapter is a
    single record holding, for every layer, target and slice, row ``j`` of its A and column ``j`` of its B::

        record (one rank row, row_elems elements, 16-byte aligned segments)
        ┌──────────── layer 0 ─────────────────────────────────┬──── layer 1 ──── ... ┐
        │ qkv: A_q│A_k│A_v  B_q  │ B_k │ B_v │ o: A_o │ B_o │ … │ qkv: ...            │
        └─────────────────────────────────────────────────────────────────────────────┘
         A segment: K elements (E·K for a MoE target: row j of each expert's A, expert-major)
         B segment: N_i elements (E·N_i for MoE)

    ``lora_a(layer, target)[i]`` is the view ``rows[:, a_off : a_off + K]`` (``[num_rows, K]``, row stride
    ``row_elems``, unit column stride) — exactly the DESIGN.md §2 tensors, as strided views. Loading or evicting an
    adapter therefore moves ``r`` whole records: one copy per run of consecutive row ids, instead of one per
    layer, target and slice (S-LoRA's unified paging taken to whole-model rows, MinT's "few large copies").
    Kernels index rows with 64-bit offsets (the Triton kernels do), since ``row_id * row_elems`` can exceed 2^31.

    In a record, the A segments of a target's slices come first (all share ``K``), then its B segments. Every
    segment starts on a 16-byte boundary (vector loads); segments are padded with zeros.
    """

    ALIGN_BYTES = 16

    def __init__(self, layout: PoolLayout, dtype: torch.dtype):
        self.layout = layout
        self.dtype = dtype
        esize = dtype.itemsize
        align = max(1, self.ALIGN_BYTES // esize)
        self.segments: Dict[Tuple[int, str], _Segment] = {}
        off = 0
        for layer in range(layout.num_layers):
            for name, spec in layout.specs.items():
                if not layout.has(layer, name):
                    continue
                E = max(spec.num_experts, 1)
                a_offs = []
                for _ in spec.n_sizes:
                    a_offs.append(off)
                    off = _round_up(off + E * spec.K, align)
                b_offs = []
                for n in spec.n_sizes:
                    b_offs.append(off)
                    off = _round_up(off + E * n, align)
                self.segments[(layer, name)] = _Segment(tuple(a_offs), tuple(b_offs), E, spec.K, spec.n_sizes)
        self.row_elems = max(off, align)
        self.row_bytes = self.row_elems * esize

    def a_range(self, layer: int, target: str, slice_: int) -> Tuple[int, int]:
        """``(offset, length)`` of slice ``slice_``'s A segment in a record."""
        seg = self.segments[(layer, target)]
        return seg.a_offs[slice_], seg.E * seg.K

    def b_range(self, layer: int, target: str, slice_: int) -> Tuple[int, int]:
        seg = self.segments[(layer, target)]
        return seg.b_offs[slice_], seg.E * seg.n_sizes[slice_]

    def views(self, rows: torch.Tensor, layer: int, target: str) -> Tuple[list, list]:
        """Per-slice ``lora_a`` / ``lora_b`` views into ``rows [num_rows, row_elems]``."""
        seg = self.segments[(layer, target)]
        a, b = [], []
        for i, n in enumerate(seg.n_sizes):
            ao, al = self.a_range(layer, target, i)
            bo, bl = self.b_range(layer, target, i)
            va, vb = rows[:, ao:ao + al], rows[:, bo:bo + bl]
            if self.layout.specs[target].is_moe:
                va, vb = va.unflatten(1, (seg.E, seg.K)), vb.unflatten(1, (seg.E, n))
            a.append(va)
            b.append(vb)
        return a, b
