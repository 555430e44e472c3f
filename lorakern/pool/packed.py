r"""The packed on-disk format for MoE-expert LoRA adapters (MinT's packing), converters, and its pool loader.

Why. A PEFT checkpoint of a MoE adapter holds one tensor per expert, projection and A|B: a rank-1 Qwen3-30B-A3B
adapter is 37,248 tensors (48 layers × 128 experts × gate/up/down × A/B, plus attention), 37,152 of them ≤ 4 KB.
Loading is then bound by the number of objects, not bytes. Packed, it is one tensor per (layer, projection, A|B)
holding every expert — 672 tensors — laid out exactly as the pool's packed rank rows (DESIGN.md §2), so loading is
a few large copies.

Format (version 1): a directory with two files.

``adapter_packed.safetensors`` — for every module (PEFT module path, e.g. ``base_model.model.model.layers.3.mlp.
experts.gate_proj`` — the per-expert path with its ``.{expert}`` component taken out)::

    <module>.lora_A   MoE [r, E, K]  (rank-major: row j = row j of every expert's A)   dense [r, K]
    <module>.lora_B   MoE [r, E, N]  (row j = column j of every expert's B)             dense [r, N]  (B transposed)

  in the adapter's own dtype (bit-exact with the per-expert source). Experts an adapter lacks are zeros.

``lorakern_packed.json`` — the index::

    {"format": "lorakern-packed-lora", "version": 1, "layout": "rank-major",
     "r": 16, "lora_alpha": 32, "num_experts": 128, "dtype": "bfloat16",
     "targets": ["down_proj", "gate_proj", "k_proj", ...],          # projection names present
     "peft_config": {...},                                           # the source's adapter_config.json, verbatim
     "modules": {"<module>": {"kind": "moe", "template": "<...experts.{expert}.gate_proj>", "r": 16, "K": 2048,
                              "N": 768, "E": 128, "scale": 2.0, "experts": null | [present expert ids],
                              "dtype": "bfloat16", "adapter_name": null},
                 "<module>": {"kind": "dense", "r": 16, "K": 2048, "N": 4096, "scale": 2.0, ...}}}

``scale`` is the module's PEFT scale (``alpha / r``, ``alpha / sqrt(r)`` with rsLoRA, ``rank_pattern`` /
``alpha_pattern`` applied), so a loader needs no PEFT logic. ``experts`` lists the experts present in the source
when some are missing (``null`` = all), which makes the round trip back to per-expert PEFT bit-exact: the same
keys, shapes, dtypes and bits, and the same ``adapter_config.json``.

API:

* :func:`pack_peft` / :func:`unpack_peft` — in memory, ``(config, state dict)`` ↔ ``(index, packed tensors)``;
* :func:`save_packed`, :func:`load_packed`, :func:`peft_to_packed` (PEFT dir → packed dir),
  :func:`packed_to_peft` (packed dir → PEFT dir);
* :class:`PackedAdapter` — an :class:`~lorakern.pool.AdapterSource`: one read of the file, the packed tensors
  viewed in place (no per-expert work), handed to the pool as ``A [E, r, K]`` / ``B [E, N, r]`` views whose
  permutation back to rank-major is contiguous, so packing the host record is one large copy per tensor;
  ``AdapterPool.register(id, "<packed dir>")`` picks it automatically;
* :func:`moe_pool_layout` — a :class:`~lorakern.pool.PoolLayout` for a Qwen3-MoE / Mixtral-style model
  (``qkv_proj``, ``o_proj`` dense; ``experts.w13`` = gate|up and ``experts.w2`` = down, packed) with the PEFT
  module patterns of the per-expert names (a packed module is matched through its ``template`` with expert 0).

Constraints of packing: every expert of one projection must share the rank, the scale and the dtype (a PEFT
``rank_pattern`` that gives experts of one projection different ranks cannot be packed; rejected with
``ValueError``).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

from lorakern.pool.errors import AdapterFileError, AdapterFormatError, AdapterMismatchError
from lorakern.pool.loaders import (_KEY_RX, _PEFT_PREFIX, AdapterSource, AdapterWeights, _check_config, _Collector,
                                   _pattern_value, _read_bytes, read_safetensors, read_safetensors_header,
                                   CONFIG_NAME, WEIGHTS_NAME)
from lorakern.pool.spec import LLAMA_MODULES, PoolLayout, TargetSpec

__all__ = ["PACKED_INDEX", "PACKED_WEIGHTS", "FORMAT", "VERSION", "EXPERT_PATTERN", "pack_peft", "unpack_peft",
           "save_packed", "load_packed", "read_packed_index", "peft_to_packed", "packed_to_peft", "is_packed_dir",
           "PackedAdapter", "moe_pool_layout", "MOE_MODULES"]

PACKED_INDEX = "lorakern_packed.json"
PACKED_WEIGHTS = "adapter_packed.safetensors"
FORMAT = "lorakern-packed-lora"
VERSION = 1
#: A per-expert module path: ``<pre>.experts.<e>.<post>`` (PEFT names of Qwen-MoE, Mixtral's ``block_sparse_moe.
#: experts.<e>.w1``, DeepSeek, ...). ``pre`` and ``post`` form the packed module name.
EXPERT_PATTERN = r"^(?P<pre>.*\.experts)\.(?P<expert>\d+)\.(?P<post>.+)$"

_DT_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

#: PEFT module patterns (per-expert names; packed modules match through their template) of a Qwen3-MoE-style
#: model onto :func:`moe_pool_layout`'s targets.
MOE_MODULES: Dict[str, Tuple[str, int]] = {
    **{p: d for p, d in LLAMA_MODULES.items() if d[0] in ("qkv_proj", "o_proj")},
    "layers.{layer}.mlp.experts.{expert}.gate_proj": ("experts.w13", 0),
    "layers.{layer}.mlp.experts.{expert}.up_proj": ("experts.w13", 1),
    "layers.{layer}.mlp.experts.{expert}.down_proj": ("experts.w2", 0),
}


def moe_pool_layout(num_layers: int, hidden_size: int, moe_intermediate_size: int, num_experts: int, *,
                    num_heads: Optional[int] = None, num_kv_heads: Optional[int] = None,
                    head_dim: Optional[int] = None) -> PoolLayout:
    """Targets of a Qwen3-MoE-style decoder: ``experts.w13`` (slices gate, up: ``K = hidden``, ``N = I``) and
    ``experts.w2`` (down: ``K = I``, ``N = hidden``), packed over ``num_experts``; plus ``qkv_proj`` and ``o_proj``
    when ``num_heads`` is given. Qwen3-30B-A3B: ``moe_pool_layout(48, 2048, 768, 128, num_heads=32,
    num_kv_heads=4, head_dim=128)``."""
    H, I, E = hidden_size, moe_intermediate_size, num_experts
    dense = {}
    mods = {k: v for k, v in MOE_MODULES.items() if v[0].startswith("experts.")}
    if num_heads is not None:
        kv = num_heads if num_kv_heads is None else num_kv_heads
        hd = H // num_heads if head_dim is None else head_dim
        dense = {"qkv_proj": TargetSpec(H, (num_heads * hd, kv * hd, kv * hd)),
                 "o_proj": TargetSpec(num_heads * hd, (H,))}
        mods = dict(MOE_MODULES)
    moe = {"experts.w13": TargetSpec(H, (I, I), num_experts=E), "experts.w2": TargetSpec(I, (H,), num_experts=E)}
    return PoolLayout(num_layers, dense, moe_targets=moe, modules=mods)


# ------------------------------------------------------------------------------------------------ in memory
def _module_scale(cfg: dict, mod: str, r: int) -> float:
    r_cfg = _pattern_value(cfg.get("rank_pattern") or {}, mod, cfg["r"])
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, mod, cfg.get("lora_alpha", 8)))
    if r_cfg != r:
        raise ValueError(f"module {mod!r}: the config gives rank {r_cfg}, lora_A has rank {r}")
    return alpha / math.sqrt(r_cfg) if cfg.get("use_rslora") else alpha / r_cfg


def pack_peft(config: Mapping, tensors: Mapping[str, torch.Tensor], *, num_experts: Optional[int] = None,
              expert_pattern: str = EXPERT_PATTERN) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """A per-expert PEFT adapter (its ``adapter_config.json`` dict and state dict) → ``(index, packed tensors)``.

    ``num_experts`` defaults to the largest expert id seen + 1 (give it when the highest experts may be absent).
    Raises ``ValueError`` for keys that are not LoRA weights, A without B, experts of one projection that differ
    in rank, scale, dtype or shape, and expert ids out of range."""
    cfg = _check_config("<pack_peft>", dict(config))
    erx = re.compile(expert_pattern)
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    adapter_names: Dict[str, Optional[str]] = {}
    for key, t in tensors.items():
        m = _KEY_RX.fullmatch(key)
        if m is None:
            raise ValueError(f"tensor {key!r}: not a lora_A / lora_B weight")
        mod, ab = m.group("mod"), m.group("ab")
        d = pairs.setdefault(mod, {})
        if ab in d:
            raise ValueError(f"module {mod!r}: lora_{ab} given twice")
        d[ab] = t
        adapter_names[mod] = m.group("adapter")
    groups: Dict[str, dict] = {}  # packed name -> {"template", "experts": {e: (A, B, scale)}, "adapter_name"}
    dense: Dict[str, tuple] = {}
    E_seen = 0
    for mod, d in pairs.items():
        if set(d) != {"A", "B"}:
            raise ValueError(f"module {mod!r}: lora_{'B' if 'A' in d else 'A'} is missing")
        A, B = d["A"], d["B"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"module {mod!r}: expected A [r, K] and B [N, r], got {tuple(A.shape)} and "
                             f"{tuple(B.shape)}")
        short = mod[len(_PEFT_PREFIX):] if mod.startswith(_PEFT_PREFIX) else mod
        scale = _module_scale(cfg, short, A.shape[0])
        m = erx.match(mod)
        if m is None:
            dense[mod] = (A, B, scale)
            continue
        e = int(m.group("expert"))
        name = f"{m.group('pre')}.{m.group('post')}"
        g = groups.setdefault(name, {"template": f"{m.group('pre')}.{{expert}}.{m.group('post')}", "experts": {},
                                     "adapter_name": adapter_names[mod]})
        g["experts"][e] = (A, B, scale)
        E_seen = max(E_seen, e + 1)
    E = E_seen if num_experts is None else int(num_experts)
    index = {"format": FORMAT, "version": VERSION, "layout": "rank-major", "r": int(cfg["r"]),
             "lora_alpha": cfg.get("lora_alpha", 8), "num_experts": E, "peft_config": dict(config), "modules": {}}
    out: Dict[str, torch.Tensor] = {}
    dtypes, targets = set(), set()
    for name, g in groups.items():
        ex = g["experts"]
        (A0, B0, s0) = next(iter(ex.values()))
        for e, (A, B, s) in ex.items():
            if not 0 <= e < E:
                raise ValueError(f"module {g['template']!r}: expert {e} out of range for num_experts={E}")
            if A.shape != A0.shape or B.shape != B0.shape or A.dtype != A0.dtype or B.dtype != A0.dtype or s != s0:
                raise ValueError(f"module {g['template']!r}: expert {e} differs from the others in rank, shape, "
                                 f"dtype or scale; a packed projection needs them equal")
        r, K = A0.shape
        N = B0.shape[0]
        pa = torch.zeros(r, E, K, dtype=A0.dtype)
        pb = torch.zeros(r, E, N, dtype=A0.dtype)
        for e, (A, B, _) in ex.items():
            pa[:, e] = A
            pb[:, e] = B.t()
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = pa, pb
        present = sorted(ex)
        index["modules"][name] = {"kind": "moe", "template": g["template"], "r": r, "K": K, "N": N, "E": E,
                                  "scale": s0, "experts": None if present == list(range(E)) else present,
                                  "dtype": _DT_NAMES.get(A0.dtype, str(A0.dtype)), "adapter_name": g["adapter_name"]}
        dtypes.add(A0.dtype)
        targets.add(name.rsplit(".", 1)[-1])
    for mod, (A, B, s) in dense.items():
        if A.dtype != B.dtype:
            raise ValueError(f"module {mod!r}: lora_A is {A.dtype}, lora_B is {B.dtype}")
        out[f"{mod}.lora_A"] = A.contiguous()
        out[f"{mod}.lora_B"] = B.t().contiguous()
        index["modules"][mod] = {"kind": "dense", "r": A.shape[0], "K": A.shape[1], "N": B.shape[0], "scale": s,
                                 "dtype": _DT_NAMES.get(A.dtype, str(A.dtype)), "adapter_name": adapter_names[mod]}
        dtypes.add(A.dtype)
        targets.add(mod.rsplit(".", 1)[-1])
    if not index["modules"]:
        raise ValueError("the adapter has no LoRA module")
    index["dtype"] = _DT_NAMES.get(dtypes.pop(), "mixed") if len(dtypes) == 1 else "mixed"
    index["targets"] = sorted(targets)
    return index, out


def _key(mod: str, ab: str, adapter_name: Optional[str]) -> str:
    return f"{mod}.lora_{ab}.{adapter_name}.weight" if adapter_name else f"{mod}.lora_{ab}.weight"


def unpack_peft(index: Mapping, tensors: Mapping[str, torch.Tensor]) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """``(index, packed tensors)`` → the per-expert PEFT ``(adapter_config dict, state dict)`` it was packed from
    (bit-exact: same keys, shapes, dtypes and bits; experts absent from the source stay absent)."""
    _check_index("<unpack_peft>", index)
    out: Dict[str, torch.Tensor] = {}
    for name, m in index["modules"].items():
        A, B = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        an = m.get("adapter_name")
        if m["kind"] == "dense":
            out[_key(name, "A", an)] = A.clone()
            out[_key(name, "B", an)] = B.t().contiguous()
            continue
        experts = m["experts"] if m["experts"] is not None else range(m["E"])
        for e in experts:
            mod = m["template"].replace("{expert}", str(e))
            out[_key(mod, "A", an)] = A[:, e].contiguous()
            out[_key(mod, "B", an)] = B[:, e].t().contiguous()
    return dict(index["peft_config"]), out


def _check_index(aid, index) -> None:
    if not isinstance(index, Mapping) or index.get("format") != FORMAT:
        raise AdapterFormatError(aid, f"{PACKED_INDEX}: not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise AdapterFormatError(aid, f"{PACKED_INDEX}: layout version {index.get('version')!r}, this lorakern "
                                      f"reads version {VERSION}")
    if not isinstance(index.get("modules"), Mapping) or not index["modules"]:
        raise AdapterFormatError(aid, f"{PACKED_INDEX}: no modules")


# ------------------------------------------------------------------------------------------------ files
def is_packed_dir(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / PACKED_INDEX).is_file()


def save_packed(path, index: Mapping, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write a packed adapter directory (``lorakern_packed.json`` + ``adapter_packed.safetensors``)."""
    from safetensors.torch import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(p / PACKED_WEIGHTS),
              metadata={"format": "pt", "lorakern": FORMAT, "version": str(VERSION)})
    (p / PACKED_INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
    return p


def read_packed_index(path, aid=None) -> dict:
    """The index of a packed directory (checked: format and version)."""
    p = Path(path)
    aid = str(p) if aid is None else aid
    try:
        text = (p / PACKED_INDEX).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AdapterFileError(aid, f"{PACKED_INDEX} not found in {p}") from None
    except OSError as e:
        raise AdapterFileError(aid, f"cannot read {p / PACKED_INDEX}: {e}") from None
    try:
        index = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(aid, f"{PACKED_INDEX}: invalid JSON ({e})") from None
    _check_index(aid, index)
    return index


def load_packed(path, aid=None) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """``(index, packed tensors)`` of a packed directory: one read of the weights file; tensors view its bytes."""
    p = Path(path)
    aid = str(p) if aid is None else aid
    index = read_packed_index(p, aid)
    data = _read_bytes(aid, p / PACKED_WEIGHTS)
    tensors, _ = read_safetensors(aid, data, str(p / PACKED_WEIGHTS))
    _check_listed(aid, index, {k: t.shape for k, t in tensors.items()})
    return index, tensors


def peft_to_packed(src, dst, *, num_experts: Optional[int] = None, expert_pattern: str = EXPERT_PATTERN) -> Path:
    """Convert a per-expert PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``) to a packed
    directory."""
    from safetensors.torch import load_file

    s = Path(src)
    cfg = json.loads((s / CONFIG_NAME).read_text(encoding="utf-8"))
    tensors = load_file(str(s / WEIGHTS_NAME))
    index, packed = pack_peft(cfg, tensors, num_experts=num_experts, expert_pattern=expert_pattern)
    return save_packed(dst, index, packed)


def packed_to_peft(src, dst) -> Path:
    """Convert a packed directory back to a per-expert PEFT directory (bit-exact with the original)."""
    from safetensors.torch import save_file

    index, packed = load_packed(src)
    cfg, tensors = unpack_peft(index, packed)
    d = Path(dst)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / WEIGHTS_NAME), metadata={"format": "pt"})
    (d / CONFIG_NAME).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return d


# ------------------------------------------------------------------------------------------------ pool source
def _check_listed(aid, index, shapes: Mapping[str, tuple]) -> None:
    """Every tensor the index lists is in the file, with the shape the index gives."""
    for name, m in index["modules"].items():
        for ab in ("A", "B"):
            k = f"{name}.lora_{ab}"
            want = ((m["r"], m["E"], m["K"] if ab == "A" else m["N"]) if m["kind"] == "moe"
                    else (m["r"], m["K"] if ab == "A" else m["N"]))
            if k not in shapes:
                raise AdapterFormatError(aid, f"{PACKED_WEIGHTS}: tensor {k!r} listed in the index is missing")
            if tuple(shapes[k]) != want:
                raise AdapterFormatError(aid, f"{PACKED_WEIGHTS}: tensor {k!r} has shape {tuple(shapes[k])}, the "
                                              f"index says {want}")


class PackedAdapter(AdapterSource):
    """A packed adapter directory as a pool source (``AdapterPool.register(id, PackedAdapter(path))``, or just
    the path).

    Two ways in, chosen by the pool:

    * :meth:`read_record` (the fast path, taken when the file's dtype is the pool's and every module has the slot
      scale — the usual case): reads the safetensors *header* only, checks every module against the layout
      without touching the data, then reads each packed tensor straight from the file into its segment of the
      host record with ONE ``preadv`` per tensor (rank row ``j`` of the tensor is contiguous in the file and lands
      in record row ``j``): 672 system calls and one pass over the bytes for a Qwen3-30B-A3B adapter, no parsing
      of per-expert objects, no intermediate buffer. Only the record's gaps (targets the adapter lacks, alignment
      padding) are zeroed.
    * :meth:`read` (generic): one read of the file, the packed tensors viewed in place and handed over as
      ``A [E, r, K]`` / ``B [E, N, r]`` views, packed by :func:`~lorakern.pool.loaders.pack_record` (casts the
      dtype and folds per-module scales when needed).
    """

    def __init__(self, path, rank_hint: Optional[int] = None):
        self.path = Path(path)
        self.rank_hint = rank_hint

    def __repr__(self):
        return f"PackedAdapter({str(self.path)!r})"

    def token(self):
        try:
            st = (self.path / PACKED_WEIGHTS).stat()
            si = (self.path / PACKED_INDEX).stat()
            return (str(self.path), st.st_mtime_ns, st.st_size, si.st_mtime_ns, si.st_size)
        except OSError:
            return (str(self.path), None)

    def _collect(self, aid, layout: PoolLayout, index: Mapping, tensors: Mapping[str, torch.Tensor]):
        """Every module checked against ``layout`` (:class:`_Collector`'s checks; ``tensors`` may be meta
        tensors). Returns ``(AdapterWeights, {(layer, target, slice): module name})``."""
        col = _Collector(aid, layout)
        keys = {}
        for name, m in index["modules"].items():
            A, B = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
            probe = m["template"].replace("{expert}", "0") if m["kind"] == "moe" else name
            if probe.startswith(_PEFT_PREFIX):
                probe = probe[len(_PEFT_PREFIX):]
            key = layout.match(probe)
            if key is None:
                hint = "" if layout.modules else " (the layout has no module name patterns: pass modules=...)"
                raise AdapterMismatchError(aid, f"module {name!r} matches no target of the layout{hint}")
            if m["kind"] == "moe":
                if len(key) != 4:
                    raise AdapterMismatchError(aid, f"module {name!r}: packed experts, but the layout maps it to "
                                                    f"the dense target {key[1]!r}")
                key = key[:3]
                col.add(name, key, A.permute(1, 0, 2), B.permute(1, 2, 0), float(m["scale"]))
            else:
                if len(key) != 3:
                    raise AdapterMismatchError(aid, f"module {name!r}: dense, but the layout maps it to the MoE "
                                                    f"target {key[1]!r}")
                col.add(name, key, A, B.t(), float(m["scale"]))
            keys[key] = name
        return col.finish(), keys

    def read(self, adapter_id, layout: PoolLayout) -> AdapterWeights:
        if not self.path.is_dir():
            raise AdapterFileError(adapter_id, f"packed adapter directory not found: {self.path}")
        index, tensors = load_packed(self.path, adapter_id)
        return self._collect(adapter_id, layout, index, tensors)[0]

    def read_record(self, adapter_id, layout: PoolLayout, fmt, *, pin: bool = False, strict_dtype: bool = False,
                    max_rank: Optional[int] = None):
        """``(record [rank, row_elems], rank, slot scale, targets)`` read straight from the file, or ``None``
        when the generic path is needed (a dtype cast, or per-module scales to fold)."""
        aid = adapter_id
        if not self.path.is_dir():
            raise AdapterFileError(aid, f"packed adapter directory not found: {self.path}")
        index = read_packed_index(self.path, aid)
        wp = self.path / PACKED_WEIGHTS
        infos, _ = read_safetensors_header(wp, aid)  # header checked against the file size
        _check_listed(aid, index, {k: i.shape for k, i in infos.items()})
        metas = {k: torch.empty(i.shape, dtype=i.dtype, device="meta") for k, i in infos.items()}
        w, keys = self._collect(aid, layout, index, metas)
        if max_rank is not None and w.rank > max_rank:
            raise AdapterMismatchError(aid, f"rank {w.rank} above the pool's max_rank={max_rank}")
        dtype = fmt.dtype
        if any(infos[f"{n}.lora_{ab}"].dtype != dtype for n in keys.values() for ab in "AB"):
            return None  # a cast: pack_record does it (and strict_dtype's check)
        if w.scale != 0.0 and any(float(index["modules"][n]["scale"]) != w.scale for n in keys.values()):
            return None  # per-module scales folded into B: pack_record does it
        esz = dtype.itemsize
        rec = _new_record(w.rank, fmt.row_elems, dtype, pin)
        raw = rec.view(torch.uint8).numpy()  # [rank, row_bytes]
        segs = []  # (rows written, offset, length) in elements
        try:
            f = open(wp, "rb")
        except OSError as e:
            raise AdapterFileError(aid, f"cannot read {wp}: {e}") from None
        with f:
            head = f.read(8)
            data_start = 8 + int.from_bytes(head, "little")
            fd = f.fileno()
            if hasattr(os, "posix_fadvise"):  # one readahead of the whole file: from disk, per-tensor preadv
                try:  # calls would otherwise each wait for a small synchronous read (measured: 210 -> 110 ms)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass
            for key, name in keys.items():
                for ab, (off, ln) in (("A", fmt.a_range(*key)), ("B", fmt.b_range(*key))):
                    info = infos[f"{name}.lora_{ab}"]
                    r_m = info.shape[0]
                    bufs = [memoryview(raw[j, off * esz:(off + ln) * esz]) for j in range(r_m)]
                    _preadv(aid, fd, bufs, data_start + info.begin, wp)
                    segs.append((r_m, off, ln))
        _zero_gaps(rec, segs)
        return rec, w.rank, w.scale, w.targets


def _new_record(rank: int, row_elems: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialised host record (pinned when ``pin``, from torch's caching host allocator); every element is
    then read or zeroed. Unpinned records come from numpy, whose allocator advises transparent huge pages for
    large arrays: first-touching a fresh 100 MB buffer then costs 5.7 ms on this 2-core VM instead of 38 ms with
    ``torch.empty`` (4 KiB page faults at ~1.5 µs each) — more than the copy into it."""
    if pin:
        return torch.empty(rank, row_elems, dtype=dtype, pin_memory=True)
    import numpy as np

    n = rank * row_elems * dtype.itemsize
    return torch.from_numpy(np.empty(n, dtype=np.uint8)).view(dtype).view(rank, row_elems)


def _preadv(aid, fd: int, bufs, offset: int, path) -> None:
    """Fill ``bufs`` (consecutive in the file from ``offset``) with one ``preadv`` per 1024 buffers (IOV_MAX)."""
    for i in range(0, len(bufs), 1024):
        chunk = bufs[i:i + 1024]
        want = sum(b.nbytes for b in chunk)
        if hasattr(os, "preadv"):
            got = os.preadv(fd, chunk, offset)
        else:  # pragma: no cover - platforms without preadv
            got = 0
            for b in chunk:
                data = os.pread(fd, b.nbytes, offset + got)
                b[:len(data)] = data
                got += len(data)
                if len(data) < b.nbytes:
                    break
        if got != want:
            raise AdapterFormatError(aid, f"{path}: truncated: read {got} of {want} bytes at offset {offset}")
        offset += want


def _zero_gaps(rec: torch.Tensor, segs) -> None:
    """Zero every element of the record that no segment wrote: rank rows are grouped by how many segments reach
    them (a module of rank r_m writes rows 0..r_m-1), and each group's gaps are filled with one slice each."""
    R, W = rec.shape
    if R == 0:
        return
    raw = rec.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[rec.element_size()]).numpy()
    bounds = sorted({r for r, _, _ in segs if r < R} | {0, R})
    for j0, j1 in zip(bounds, bounds[1:]):
        spans = sorted((o, o + n) for r, o, n in segs if r > j0)
        pos = 0
        for a, b in spans:
            if a > pos:
                raw[j0:j1, pos:a] = 0
            pos = max(pos, b)
        if pos < W:
            raw[j0:j1, pos:W] = 0
