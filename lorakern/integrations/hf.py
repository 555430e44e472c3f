r"""Hugging Face transformers / PEFT integration: :func:`attach` and :class:`LoRAModel`.

``attach(model, target_modules=[...], max_rank=..., max_adapters=...)`` (contract) wraps the matched
``nn.Linear`` modules of a model in place with :class:`~lorakern.nn.LoRALinear` and builds an
:class:`~lorakern.pool.AdapterPool` whose layout mirrors them. Then::

    lm = lorakern.attach(model, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], max_rank=64,
                         max_adapters=32)
    a = lm.load_adapter("adapters/alice")              # a PEFT directory (or the id of an attached catalog)
    b = lm.load_adapter("adapters/bob")
    with lm.adapters([a, None, b]):                    # one entry per sequence of the batch
        logits = model(input_ids).logits               # [3, S, V]: row 0 with alice, row 1 base, row 2 bob
        ids = model.generate(input_ids, attention_mask=mask, max_new_tokens=16)
    lm.export_adapter(a, "out/alice")                  # back to PEFT format

Layout. Matched modules are grouped by their name with the layer index taken out (``model.layers.{layer}.
self_attn.q_proj``); each group is a pool target of every layer that has it. Layers that Llama-style models keep
separate but that share their input — ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj`` under one
parent — become ONE target with several slices (``qkv_proj``, ``gate_up_proj``: the names and order of
:meth:`PoolLayout.llama`), so an adapter takes one allocation of rank rows for all of them and, with
``fuse=True``, one op call per layer computes every slice (:class:`~lorakern.nn.SliceGroup`). The PEFT module
name patterns of the layout are the wrapped modules' own paths, so PEFT directories load by name.

Token slots. Inside ``adapters([...])`` a pre-hook on the model starts a new batch at every forward; the first
LoRA module derives per-token slots from the input's shape (:func:`~lorakern.nn.linear.derive_token_slots`:
padded ``[B, S]``, KV-cache decode ``[B, 1]``, packed inputs through ``cu_seqlens`` / ``cu_seq_lens_q`` or
``position_ids`` passed to the model) and builds one :class:`~lorakern.LoRAPlan` that every module reuses.
Engines that own the batching give explicit per-token pool slots (or a prebuilt plan) with :meth:`LoRAModel.
token_slots`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from lorakern.nn.linear import LoRAContext, LoRALinear, SliceGroup
from lorakern.pool import AdapterPool, PoolLayout, TargetSpec
from lorakern.pool.errors import UnknownAdapterError
from lorakern.pool.loaders import AdapterSource, as_source

__all__ = ["attach", "LoRAModel", "FUSED_GROUPS", "match_target_modules"]

#: Separate projections that share their input and are fused into one multi-slice target (name, members).
FUSED_GROUPS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("gate_up_proj", ("gate_proj", "up_proj")),
)

_LAYER_RX = re.compile(r"^(?:(?P<pre>.*?)\.)?(?P<layer>\d+)\.(?P<rest>.+)$")
_PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------- matching
def match_target_modules(model: nn.Module, target_modules) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of the modules ``target_modules`` selects, as PEFT matches it: a regex string must match
    the whole name; a list of names matches a module whose name equals one or ends with ``"." + name``;
    ``"all-linear"`` selects every ``nn.Linear`` except the output layer."""
    named = [(n, m) for n, m in model.named_modules() if n]
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            return [(n, m) for n, m in named if isinstance(m, nn.Linear) and m is not out_emb
                    and n.rsplit(".", 1)[-1] not in ("lm_head",)]
        try:
            rx = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules: invalid regex {target_modules!r} ({e})") from None
        return [(n, m) for n, m in named if rx.fullmatch(n)]
    try:
        keys = list(target_modules)
    except TypeError:
        raise TypeError(f"target_modules: expected a list of module names or a regex string, got "
                        f"{type(target_modules).__name__}") from None
    if not keys or any(not isinstance(k, str) or not k for k in keys):
        raise ValueError(f"target_modules: expected a non-empty list of module names, got {target_modules!r}")
    return [(n, m) for n, m in named if any(n == k or n.endswith("." + k) for k in keys)]


@dataclass
class _Family:
    """Modules with one name pattern (``pre.{layer}.rest``) — one slice of a target."""

    pre: str
    rest: str
    K: int
    N: int
    modules: Dict[int, Tuple[str, nn.Linear]]  # layer -> (name, module)

    @property
    def pattern(self) -> str:
        return (f"{self.pre}." if self.pre else "") + "{layer}." + self.rest

    @property
    def parent(self) -> str:
        return self.rest.rsplit(".", 1)[0] if "." in self.rest else ""

    @property
    def leaf(self) -> str:
        return self.rest.rsplit(".", 1)[-1]


def _families(matched: Sequence[Tuple[str, nn.Module]]) -> List[_Family]:
    fams: "OrderedDict[Tuple[str, str], _Family]" = OrderedDict()
    for name, mod in matched:
        if isinstance(mod, LoRALinear) or name.endswith(".base_layer") or ".base_layer." in name:
            raise RuntimeError(f"target_modules: {name!r} is already wrapped by lorakern (attach once per model; "
                               f"LoRAModel.detach() restores the original modules)")
        if type(mod) is not nn.Linear:
            raise TypeError(f"target_modules: module {name!r} is a {type(mod).__name__}; lorakern wraps "
                            f"torch.nn.Linear modules only")
        m = _LAYER_RX.match(name)
        if m is None:
            raise ValueError(f"target_modules: module {name!r} has no layer index in its name (e.g. "
                             f"'layers.3.'); lorakern pools per-layer modules — exclude it from target_modules")
        pre, layer, rest = m.group("pre") or "", int(m.group("layer")), m.group("rest")
        key = (pre, rest)
        f = fams.get(key)
        if f is None:
            f = fams[key] = _Family(pre, rest, mod.in_features, mod.out_features, {})
        elif (f.K, f.N) != (mod.in_features, mod.out_features):
            raise ValueError(f"target_modules: modules {f.pattern!r} have different shapes across layers "
                             f"({f.K}x{f.N} and {mod.in_features}x{mod.out_features} at {name!r}); one pool target "
                             f"needs one shape")
        f.modules[layer] = (name, mod)
    return list(fams.values())


def _targets(fams: List[_Family], fuse_groups: bool = True) -> "OrderedDict[str, List[_Family]]":
    """Target name → its families (slices), in model order; fused groups by :data:`FUSED_GROUPS`."""
    used = set()
    groups: List[Tuple[str, List[_Family]]] = []
    by_key = {(f.pre, f.parent, f.leaf): f for f in fams}
    for f in fams:
        if id(f) in used:
            continue
        placed = False
        if fuse_groups:
            for gname, members in FUSED_GROUPS:
                if f.leaf not in members:
                    continue
                ms = [by_key.get((f.pre, f.parent, leaf)) for leaf in members]
                if (all(m is not None for m in ms) and len({m.K for m in ms}) == 1
                        and len({tuple(sorted(m.modules)) for m in ms}) == 1):
                    groups.append((gname, ms))
                    used.update(id(m) for m in ms)
                    placed = True
                break
        if not placed:
            groups.append((f.leaf, [f]))
            used.add(id(f))
    # unique names: the short name when it is unique, else qualified by the module path around the layer index
    count: Dict[str, int] = {}
    for n, _ in groups:
        count[n] = count.get(n, 0) + 1
    out: "OrderedDict[str, List[_Family]]" = OrderedDict()
    for n, ms in groups:
        f = ms[0]
        out[n if count[n] == 1 else ".".join(p for p in (f.pre, f.parent, n) if p)] = ms
    return out


# ---------------------------------------------------------------------------------------------- attach
def attach(model: nn.Module, target_modules, max_rank: int, max_adapters: int, dtype: Optional[torch.dtype] = None,
           device=None, *, max_rows: Optional[int] = None, backend: str = "auto", catalog=None,
           host_cache=1 << 30, fuse: bool = True) -> "LoRAModel":
    """Wrap ``model``'s ``target_modules`` in place for batched heterogeneous LoRA (contract).

    Parameters
    ----------
    model : nn.Module
        A Hugging Face transformers model (Llama, Qwen2/3, Mistral, ... — any model whose targets are
        ``nn.Linear`` modules with a layer index in their path) or any ``nn.Module``.
    target_modules : list of str or str
        As PEFT's ``target_modules``: module names matched as suffixes on a dot boundary
        (``["q_proj", "v_proj"]``), a regex matched against the whole name, or ``"all-linear"``.
    max_rank : int
        Largest adapter rank the pool accepts.
    max_adapters : int
        Adapter slots: the most distinct adapters resident at once (and in one batch).
    dtype, device : optional
        Of the pool; default the wrapped modules' weight dtype and device (LoRA weights must match the
        activations' dtype).
    max_rows : int, optional
        Pool capacity in rank rows; default ``max_adapters * max_rank`` (every slot can hold a max-rank adapter).
    backend : str, default "auto"
        Backend of :func:`lorakern.ops.add_lora` (``auto | cuda | triton | torch``); settable later
        (``lora_model.backend = "torch"``).
    catalog : AdapterCatalog, optional
        Lets :meth:`LoRAModel.load_adapter` take catalog ids.
    host_cache : int or HostCache
        Host cache budget of the pool in bytes.
    fuse : bool, default True
        One op call for the slices of a fused group (q/k/v, gate/up); ``False`` calls the op once per module.

    Returns
    -------
    LoRAModel
        Holds the model (modified in place), its pool and the shared :class:`~lorakern.nn.LoRAContext`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise RuntimeError("model: already attached (call LoRAModel.detach() first)")
    matched = match_target_modules(model, target_modules)
    if not matched:
        raise ValueError(f"target_modules: {target_modules!r} matches no module of the model")
    fams = _families(matched)
    targets = _targets(fams)
    num_layers = 1 + max(layer for f in fams for layer in f.modules)
    specs, patterns = {}, {}
    for tname, ms in targets.items():
        layers = tuple(sorted(ms[0].modules))
        specs[tname] = TargetSpec(ms[0].K, tuple(m.N for m in ms),
                                  layers=None if layers == tuple(range(num_layers)) else layers)
        for i, m in enumerate(ms):
            patterns[m.pattern] = (tname, i)
    layout = PoolLayout(num_layers, specs, modules=patterns)
    first = matched[0][1]
    dtype = first.weight.dtype if dtype is None else dtype
    device = first.weight.device if device is None else torch.device(device)
    max_rank, max_adapters = int(max_rank), int(max_adapters)
    rows = max_adapters * max_rank if max_rows is None else int(max_rows)
    pool = AdapterPool(layout, max_rows=rows, max_slots=max_adapters, max_rank=max_rank, dtype=dtype,
                       device=device, host_cache=host_cache, catalog=catalog)
    ctx = LoRAContext(pool, backend=backend)
    wrapped: "OrderedDict[str, LoRALinear]" = OrderedDict()
    originals: Dict[str, nn.Linear] = {}
    for tname, ms in targets.items():
        for layer in sorted(ms[0].modules):
            group = SliceGroup(ctx, layer, tname) if fuse and len(ms) > 1 else None
            for i, f in enumerate(ms):
                name, mod = f.modules[layer]
                w = LoRALinear(mod, ctx, layer, tname, slice_index=i, group=group)
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, w)
                wrapped[name] = w
                originals[name] = mod
    return LoRAModel(model, pool, ctx, wrapped, originals)


# ---------------------------------------------------------------------------------------------- LoRAModel
class LoRAModel:
    """A model with lorakern LoRA modules attached (see :func:`attach`).

    Attribute access falls through to the wrapped model (``lm.generate(...)``, ``lm.config``), and calling it
    calls the model. Outside :meth:`adapters` / :meth:`token_slots` the model computes exactly the base model,
    bit for bit.
    """

    def __init__(self, model: nn.Module, pool: AdapterPool, context: LoRAContext,
                 wrapped: "OrderedDict[str, LoRALinear]", originals: Dict[str, nn.Linear]):
        self.model = model
        self.pool = pool
        self.context = context
        self.modules = wrapped
        self._originals = originals
        self._handles: Dict[str, object] = {}  # handle -> source description (path / catalog id)
        self._hook = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    # ------------------------------------------------------------------ plumbing
    @property
    def layout(self) -> PoolLayout:
        return self.pool.layout

    @property
    def backend(self) -> str:
        return self.context.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.context.backend = value

    def __getattr__(self, name):
        if name in ("model", "pool", "context", "modules", "_originals", "_handles", "_hook"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"LoRAModel({type(self.model).__name__}, {len(self.modules)} modules, targets "
                f"{list(self.layout.target_names)}, {self.pool!r})")

    def _pre_hook(self, module, args, kwargs):
        ctx = self.context
        if ctx.active:
            cu = kwargs.get("cu_seqlens")
            if cu is None:
                cu = kwargs.get("cu_seq_lens_q")
            ctx.begin_forward(cu_seqlens=cu, position_ids=kwargs.get("position_ids"))
        return None

    # ------------------------------------------------------------------ adapters
    @property
    def handles(self) -> List[str]:
        """Handles of the adapters loaded with :meth:`load_adapter`."""
        return list(self._handles)

    def load_adapter(self, path_or_id, name: Optional[str] = None) -> str:
        """Make an adapter available; returns its handle (its id in :attr:`pool`, a ``str``).

        ``path_or_id``: a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``), a
        ``.safetensors`` blob with the config in its metadata, an :class:`~lorakern.pool.AdapterSource`, or the
        id of an adapter in the pool's catalog. ``name`` defaults to the path as given (or the catalog id).

        A file is read and checked against the layout now (errors are typed :class:`~lorakern.pool.AdapterError`
        s naming it) and kept in the host cache; it takes device rows when a batch first uses it. Loading the same
        path under the same name again returns the same handle.
        """
        pool = self.pool
        src = None
        if isinstance(path_or_id, AdapterSource):
            if name is None:
                raise ValueError("name: required when loading an AdapterSource")
            src, desc = path_or_id, repr(path_or_id)
        elif isinstance(path_or_id, (str, os.PathLike)):
            s = os.fspath(path_or_id)
            cat = pool.catalog
            if cat is not None and s in cat and not os.path.exists(s):
                if name is None or name == s:
                    self._handles[s] = f"catalog:{s}"
                    return s
                src, desc = cat.source(s), f"catalog:{s}"
            elif os.path.exists(s):
                src, desc = as_source(s), os.path.abspath(s)
            else:
                where = " or in the pool's catalog" if cat is not None else " (and the pool has no catalog)"
                raise UnknownAdapterError(name or s, f"no adapter directory or file at {s!r}{where}")
        else:
            raise TypeError(f"path_or_id: expected a path, a catalog id or an AdapterSource, got "
                            f"{type(path_or_id).__name__}")
        handle = name if name is not None else os.fspath(path_or_id)
        if not isinstance(handle, str) or not handle:
            raise TypeError(f"name: expected a non-empty str, got {handle!r}")
        if handle in self._handles:
            if self._handles[handle] == desc:
                return handle
            raise ValueError(f"name: {handle!r} is already loaded from {self._handles[handle]} (unload_adapter it "
                             f"first, or pick another name)")
        pool.register(handle, src, replace=pool.is_registered(handle))
        try:
            pool.prefetch_host([handle])  # read and check now: errors name the adapter
        except Exception:
            pool.unregister(handle)
            raise
        self._handles[handle] = desc
        return handle

    def unload_adapter(self, handle: str) -> None:
        """Forget an adapter: drop it from the pool and the host cache (it must not be in use)."""
        if handle not in self._handles:
            raise UnknownAdapterError(handle, "not loaded with load_adapter")
        if self.pool.is_registered(handle):
            self.pool.unregister(handle)
        else:
            self.pool.invalidate(handle)
        del self._handles[handle]

    @contextlib.contextmanager
    def adapters(self, handles: Sequence) -> Iterator[torch.Tensor]:
        """Run every forward inside with one adapter per sequence: ``handles[b]`` for sequence ``b`` (``None`` =
        the base model). Admits the adapters into the pool (loading what is missing, evicting idle ones) and holds
        them until the block ends. Yields the pool slots ``int32 [n]``. Contexts nest (the inner one wins)."""
        keys = self.pool.adapter_keys(handles)
        any_adapter = any(k is not None for k in keys)
        slots = self.pool.acquire(keys) if any_adapter else torch.full((len(keys),), -1, dtype=torch.int32,
                                                                        device=self.pool.device)
        ctx = self.context
        prev = ctx.snapshot()
        try:
            ctx.set_sequence_slots(slots, any_adapter=any_adapter)
            yield slots
        finally:
            ctx.restore(prev)
            if any_adapter:
                self.pool.release(keys)

    @contextlib.contextmanager
    def token_slots(self, slots) -> Iterator[None]:
        """Engine form: explicit per-token pool slots (``int [T]`` or ``[B, S]``, ``-1`` = none) or a prebuilt
        :class:`~lorakern.LoRAPlan` (static plans too, for CUDA graphs) for every forward inside. The engine owns
        residency: slots come from :meth:`acquire` (``pool.acquire``) and stay valid until :meth:`release`."""
        ctx = self.context
        prev = ctx.snapshot()
        try:
            ctx.set_token_slots(slots)
            yield
        finally:
            ctx.restore(prev)

    def set_token_slots(self, slots) -> None:
        """:meth:`token_slots` without a context (``None`` clears): for an engine's step loop."""
        self.context.set_token_slots(slots)

    def acquire(self, handles: Sequence) -> torch.Tensor:
        """``pool.acquire``: admit adapters, hold them in flight, return their pool slots (``None`` → ``-1``)."""
        return self.pool.acquire(handles)

    def release(self, handles: Sequence) -> None:
        self.pool.release(handles)

    # ------------------------------------------------------------------ export
    def export_adapter(self, handle: str, path) -> Path:
        """Write an adapter held by the pool as a PEFT directory (``adapter_config.json`` +
        ``adapter_model.safetensors``), loadable by ``peft.PeftModel.from_pretrained`` on the base model.

        What is written is what the pool computes with: per wrapped module ``A [r_m, K]`` and ``B [N, r_m]`` in the
        pool dtype, ``lora_alpha = scale * r`` (so PEFT's ``alpha / r`` is the slot's scale, folded ratios
        included), module ranks below the slot's rank restored from their zero padding through ``rank_pattern``
        and ``alpha_pattern``; modules the adapter does not have (all-zero rows) are left out."""
        from safetensors.torch import save_file

        pool = self.pool
        if handle not in pool:
            pool.load([handle])
        slot = pool.slot_of(handle)
        r = int(pool.ranks[slot])
        rows = pool.page_table[slot, :r].long()
        scale = float(pool.scales[slot])
        tensors, rank_pattern, alpha_pattern, names = {}, {}, {}, []
        for pat, (target, sl) in self.layout.modules.items():
            for layer in self.layout.layers_of(target):
                A = pool.lora_a(layer, target)[sl][rows].detach().cpu()  # [r, K]
                Bt = pool.lora_b(layer, target)[sl][rows].detach().cpu()  # [r, N]
                nz = ((A != 0).any(dim=1) | (Bt != 0).any(dim=1)).nonzero()
                if nz.numel() == 0:
                    continue
                rm = int(nz.max()) + 1
                name = pat.format(layer=layer)
                names.append(name)
                tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = A[:rm].contiguous()
                tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = Bt[:rm].t().contiguous()
                if rm != r:
                    rank_pattern[name] = rm
                    alpha_pattern[name] = scale * rm
        if not tensors:
            raise ValueError(f"handle: adapter {handle!r} has no non-zero module to export")
        base = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        cfg = {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "r": r,
            "lora_alpha": scale * r, "use_rslora": False, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "target_modules": sorted(names), "bias": "none", "use_dora": False,
            "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True,
        }
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(p / "adapter_model.safetensors"), metadata={"format": "pt"})
        (p / "adapter_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        return p

    # ------------------------------------------------------------------ detach
    def detach(self) -> nn.Module:
        """Put the original ``nn.Linear`` modules back, remove the hook; returns the model."""
        self.context.clear()
        for name, orig in self._originals.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, orig)
        self._hook.remove()
        self._originals = {}
        self.modules = OrderedDict()
        return self.model
