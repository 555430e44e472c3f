"""Adapter sources: PEFT directories, safetensors blobs (a whole file or a byte range of a packed file) and
in-memory tensors, each read into :class:`AdapterWeights` — the adapter normalised to a pool's layout — and packed
into host rank-row records (:func:`pack_record`).

PEFT semantics (``adapter_config.json``):

* ``r``, ``lora_alpha``: a module's scale is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), where ``r``
  and ``alpha`` are the module's own — ``rank_pattern`` / ``alpha_pattern`` override them per module, matched as
  PEFT does (a key matches a module whose name ends with it on a dot boundary; the key may be a regex).
* The adapter occupies ``max(r_module)`` rank rows; a module of lower rank is zero-padded (its extra rows hold
  zeros in A and B, so they add nothing). One slot has one scale: the slot gets the most common module scale and
  every other module's ratio to it is folded into that module's B rows (computed in float32, rounded once to the
  pool dtype; exact when the ratio is a power of two).
* Unsupported, rejected with :class:`AdapterFormatError`: DoRA (``use_dora``), LoRA biases (``lora_bias``),
  non-LoRA PEFT types, and any tensor that is not a ``lora_A`` / ``lora_B`` weight (``modules_to_save``,
  trained biases, embeddings).

Safetensors files are parsed and checked here (header length, JSON, dtypes, shapes, byte ranges against the file
size) before any tensor is built, so a truncated or corrupt file gives :class:`AdapterFormatError` with the
reason, never a crash or a half-read adapter.

Packed MoE adapters. A MoE target takes, per module, ``A: [E, r, K]`` and ``B: [E, N, r]`` (per-expert weights
stacked on a leading expert dim) from in-memory sources, or one PEFT module per expert through an ``{expert}``
pattern. A dedicated packed on-disk format (one tensor per layer, projection and A|B, MinT's packing) plugs in
as another :class:`AdapterSource` whose ``read`` returns those stacked tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from lorakern.pool.errors import (AdapterDtypeError, AdapterFileError, AdapterFormatError, AdapterMismatchError)
from lorakern.pool.spec import PoolLayout, RowFormat

__all__ = [
    "AdapterWeights",
    "AdapterSource",
    "PeftDir",
    "SafetensorsBlob",
    "TensorAdapter",
    "as_source",
    "pack_record",
    "read_safetensors",
    "read_safetensors_header",
    "save_peft_dir",
    "adapter_blob",
    "peft_weights",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BLOB_CONFIG_KEY = "adapter_config"  # safetensors __metadata__ key holding the PEFT config of a blob

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KEY_RX = re.compile(r"(?P<mod>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")
_PEFT_PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------------ safetensors
@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int  # byte offset from the start of the data section
    end: int


def _parse_header(aid, data, what: str, size: Optional[int] = None) -> Tuple[Dict[str, TensorInfo], dict, int]:
    """(tensor infos, metadata, data-section start) of a safetensors payload; every byte range checked.

    ``data`` holds at least the header; ``size`` is the payload's whole length (default ``len(data)``)."""
    size = len(data) if size is None else size
    if size < 8 or len(data) < 8:
        raise AdapterFormatError(aid, f"{what}: truncated: {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", bytes(data[0:8]))
    if n > size - 8:
        raise AdapterFormatError(aid, f"{what}: truncated: the header claims {n} bytes, but only {size - 8} follow "
                                      f"the length field")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(aid, f"{what}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(aid, f"{what}: corrupt safetensors header (a JSON {type(header).__name__}, "
                                      f"not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise AdapterFormatError(aid, f"{what}: corrupt safetensors header (__metadata__ is not an object)")
    start = 8 + n
    avail = size - start
    infos = {}
    for name, d in header.items():
        try:
            dt = d["dtype"]
            shape = tuple(int(s) for s in d["shape"])
            b, e = (int(v) for v in d["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise AdapterFormatError(aid, f"{what}: corrupt safetensors header (entry {name!r} lacks a valid "
                                          f"dtype, shape or data_offsets)") from None
        if dt not in _ST_DTYPES:
            raise AdapterFormatError(aid, f"{what}: tensor {name!r} has unsupported safetensors dtype {dt!r}")
        if any(s < 0 for s in shape) or b < 0 or e < b:
            raise AdapterFormatError(aid, f"{what}: corrupt safetensors header (tensor {name!r}: shape {shape}, "
                                          f"data_offsets [{b}, {e}])")
        dtype = _ST_DTYPES[dt]
        need = math.prod(shape) * dtype.itemsize
        if e - b != need:
            raise AdapterFormatError(aid, f"{what}: corrupt safetensors header (tensor {name!r} of shape {shape} "
                                          f"and dtype {dt} needs {need} bytes, data_offsets span {e - b})")
        if e > avail:
            raise AdapterFormatError(aid, f"{what}: truncated: tensor {name!r} ends at byte {e} of the data "
                                          f"section, which has only {avail} bytes")
        infos[name] = TensorInfo(dtype, shape, b, e)
    return infos, meta, start


def _read_bytes(aid, path: Path, offset: int = 0, length: Optional[int] = None) -> bytearray:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if length is None:
                length = size - offset
            if offset + length > size:
                raise AdapterFormatError(aid, f"{path}: truncated: expected {length} bytes at offset {offset}, the "
                                              f"file has {size} bytes")
            buf = bytearray(length)
            f.seek(offset)
            got = f.readinto(buf)
            if got != length:
                raise AdapterFormatError(aid, f"{path}: truncated: read {got} of {length} bytes")
            return buf
    except FileNotFoundError:
        raise AdapterFileError(aid, f"file not found: {path}") from None
    except IsADirectoryError:
        raise AdapterFileError(aid, f"{path} is a directory, expected a file") from None
    except PermissionError as e:
        raise AdapterFileError(aid, f"cannot read {path}: {e.strerror}") from None
    except OSError as e:
        if isinstance(e, AdapterFileError):
            raise
        raise AdapterFileError(aid, f"cannot read {path}: {e}") from None


def read_safetensors(aid, data: Union[bytes, bytearray, memoryview], what: str = "safetensors"
                     ) -> Tuple[Dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of a safetensors payload, after checking its header against its size.

    Tensors view ``data`` when it is a writable buffer and the tensor is aligned, else they are copies."""
    mv = memoryview(data)
    infos, meta, start = _parse_header(aid, mv, what)
    writable = not mv.readonly
    out = {}
    for name, ti in infos.items():
        nbytes = ti.end - ti.begin
        esize = ti.dtype.itemsize
        off = start + ti.begin
        if nbytes == 0:
            out[name] = torch.empty(ti.shape, dtype=ti.dtype)
            continue
        if writable and off % esize == 0:
            t = torch.frombuffer(mv, dtype=ti.dtype, count=nbytes // esize, offset=off)
        else:
            t = torch.frombuffer(bytearray(mv[off:off + nbytes]), dtype=ti.dtype)
        out[name] = t.view(ti.shape)
    return out, meta


def read_safetensors_header(path, aid=None) -> Tuple[Dict[str, TensorInfo], dict]:
    """``(tensor infos, metadata)`` of a safetensors file, reading only its header (for catalog builds)."""
    path = Path(path)
    aid = str(path) if aid is None else aid
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise AdapterFormatError(aid, f"{path}: truncated: {len(head)} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise AdapterFormatError(aid, f"{path}: truncated: the header claims {n} bytes, the file has "
                                              f"{size - 8} after the length field")
            hdr = f.read(n)
    except FileNotFoundError:
        raise AdapterFileError(aid, f"file not found: {path}") from None
    except IsADirectoryError:
        raise AdapterFileError(aid, f"{path} is a directory, expected a file") from None
    infos, meta, _ = _parse_header(aid, head + hdr, str(path), size=size)
    return infos, meta


# ------------------------------------------------------------------------------------------------ weights
@dataclass
class AdapterWeights:
    """An adapter normalised to a layout.

    ``modules[(layer, target, slice)] = (A, B, scale)``: dense ``A [r_m, K]``, ``B [N_i, r_m]``; packed MoE
    ``A [E, r_m, K]``, ``B [E, N_i, r_m]``; ``scale`` is the module's own (``alpha / r`` as PEFT computes it).
    ``rank`` is the largest ``r_m``; ``scale`` the slot scale chosen by :func:`choose_scale`.
    """

    adapter_id: object
    modules: Dict[Tuple[str, int, int], Tuple[torch.Tensor, torch.Tensor, float]]
    rank: int = 0
    scale: float = 1.0
    dtype: Optional[torch.dtype] = None  # the source's dtype (the widest float seen)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.rank = max((a.shape[-2] for a, _, _ in self.modules.values()), default=0)
        self.scale = choose_scale(s for _, _, s in self.modules.values())

    @property
    def targets(self) -> set:
        return {t for (_, t, _) in self.modules}


def choose_scale(scales) -> float:
    """The slot scale: the most common non-zero module scale (ties → the larger), or 0.0 when all are zero."""
    c = Counter(float(s) for s in scales if float(s) != 0.0)
    if not c:
        return 0.0
    return max(c.items(), key=lambda kv: (kv[1], abs(kv[0])))[0]


class _Collector:
    """Checks modules against the layout as they are added; builds :class:`AdapterWeights`."""

    def __init__(self, aid, layout: PoolLayout):
        self.aid, self.layout = aid, layout
        self.dense: Dict[tuple, tuple] = {}
        self.experts: Dict[tuple, Dict[int, tuple]] = {}
        self.dtypes = set()

    def _check_float(self, name, t):
        if not isinstance(t, torch.Tensor):
            raise AdapterFormatError(self.aid, f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT:
            raise AdapterDtypeError(self.aid, f"{name}: dtype {str(t.dtype).replace('torch.', '')} is not a floating "
                                              f"dtype (float16, bfloat16, float32, float64)")
        self.dtypes.add(t.dtype)

    def add(self, name: str, key: tuple, A, B, scale: float):
        aid, L = self.aid, self.layout
        layer, target, sl = key[0], key[1], key[2]
        spec = L.specs.get(target)
        if spec is None:
            raise AdapterMismatchError(aid, f"module {name!r}: unknown target {target!r}; the layout has "
                                            f"{list(L.target_names)}")
        if not isinstance(layer, int) or not L.has(layer, target):
            raise AdapterMismatchError(aid, f"module {name!r}: layer {layer} has no target {target!r} (the layout "
                                            f"has {L.num_layers} layers; {target!r} is in "
                                            f"{'all' if spec.layers is None else list(spec.layers)})")
        if not isinstance(sl, int) or not 0 <= sl < spec.num_slices:
            raise AdapterMismatchError(aid, f"module {name!r}: slice {sl} out of range for target {target!r} with "
                                            f"{spec.num_slices} slices")
        self._check_float(f"module {name!r}: A", A)
        self._check_float(f"module {name!r}: B", B)
        if not math.isfinite(scale):
            raise AdapterFormatError(aid, f"module {name!r}: scale {scale} is not finite")
        N = spec.n_sizes[sl]
        per_expert = len(key) == 4
        if spec.is_moe and not per_expert:
            E = spec.num_experts
            if A.dim() != 3 or B.dim() != 3:
                raise AdapterMismatchError(aid, f"module {name!r}: MoE target {target!r} takes A [E, r, K] and "
                                                f"B [E, N, r], got shapes {tuple(A.shape)} and {tuple(B.shape)}")
            if A.shape[0] != E or B.shape[0] != E:
                raise AdapterMismatchError(aid, f"module {name!r}: {A.shape[0]} / {B.shape[0]} experts, target "
                                                f"{target!r} has E={E}")
        else:
            if A.dim() != 2 or B.dim() != 2:
                raise AdapterMismatchError(aid, f"module {name!r}: expected A [r, K] and B [N, r], got shapes "
                                                f"{tuple(A.shape)} and {tuple(B.shape)}")
            if per_expert:
                e = key[3]
                if not spec.is_moe or not 0 <= e < spec.num_experts:
                    raise AdapterMismatchError(aid, f"module {name!r}: expert {e} out of range for target "
                                                    f"{target!r} with {spec.num_experts} experts")
        r = A.shape[-2]
        if A.shape[-1] != spec.K:
            raise AdapterMismatchError(aid, f"module {name!r}: A has K={A.shape[-1]} (shape {tuple(A.shape)}), "
                                            f"target {target!r} has K={spec.K}")
        if B.shape[-2] != N:
            raise AdapterMismatchError(aid, f"module {name!r}: B has N={B.shape[-2]} (shape {tuple(B.shape)}), "
                                            f"slice {sl} of target {target!r} has N={N}")
        if B.shape[-1] != r:
            raise AdapterFormatError(aid, f"module {name!r}: A has rank {r} but B has rank {B.shape[-1]}")
        if r == 0:
            raise AdapterFormatError(aid, f"module {name!r}: rank 0")
        if per_expert:
            slot = self.experts.setdefault(key[:3], {})
            if key[3] in slot or key[:3] in self.dense:
                raise AdapterFormatError(aid, f"module {name!r}: given twice")
            slot[key[3]] = (A, B, float(scale))
        else:
            if key in self.dense or key in self.experts:
                raise AdapterFormatError(aid, f"module {name!r}: given twice")
            self.dense[key] = (A, B, float(scale))

    def finish(self) -> AdapterWeights:
        mods = dict(self.dense)
        for key, per in self.experts.items():
            spec = self.layout.specs[key[1]]
            E, K, N = spec.num_experts, spec.K, spec.n_sizes[key[2]]
            r = max(a.shape[0] for a, _, _ in per.values())
            s0 = choose_scale(s for _, _, s in per.values())
            dts = {t.dtype for a, b, _ in per.values() for t in (a, b)}
            dt = dts.pop() if len(dts) == 1 else torch.float32  # keep the source dtype when it is uniform
            A = torch.zeros(E, r, K, dtype=dt)
            B = torch.zeros(E, N, r, dtype=dt)
            for e, (a, b, s) in per.items():
                A[e, :a.shape[0]] = a
                B[e, :, :b.shape[1]] = b if s == s0 or s0 == 0.0 else b.float() * (s / s0)
            mods[key] = (A, B, s0)
        if not mods:
            raise AdapterFormatError(self.aid, "the adapter has no LoRA module")
        dt = max(self.dtypes, key=lambda d: torch.finfo(d).bits) if self.dtypes else None
        return AdapterWeights(self.aid, mods, dtype=dt)


def _rx_key_match(key: str, name: str) -> bool:
    try:
        return re.match(rf"(.*\.)?({key})$", name) is not None
    except re.error:
        return name == key or name.endswith("." + key)


def _pattern_value(pattern: Mapping, name: str, default):
    for key, v in pattern.items():
        if _rx_key_match(key, name):
            return v
    return default


def _check_config(aid, config) -> dict:
    if not isinstance(config, dict):
        raise AdapterFormatError(aid, f"{CONFIG_NAME}: expected a JSON object, got {type(config).__name__}")
    pt = config.get("peft_type", "LORA")
    if str(pt).upper() != "LORA":
        raise AdapterFormatError(aid, f"{CONFIG_NAME}: peft_type {pt!r} is not LORA")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterFormatError(aid, f"{CONFIG_NAME}: 'r' must be a positive int, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterFormatError(aid, f"{CONFIG_NAME}: 'lora_alpha' must be a number, got {alpha!r}")
    for k in ("rank_pattern", "alpha_pattern"):
        v = config.get(k) or {}
        if not isinstance(v, dict):
            raise AdapterFormatError(aid, f"{CONFIG_NAME}: {k!r} must be an object, got {type(v).__name__}")
    if config.get("use_dora"):
        raise AdapterFormatError(aid, f"{CONFIG_NAME}: DoRA adapters (use_dora) are not supported")
    if config.get("lora_bias"):
        raise AdapterFormatError(aid, f"{CONFIG_NAME}: LoRA biases (lora_bias) are not supported")
    return config


def peft_weights(aid, config: dict, tensors: Mapping[str, torch.Tensor], layout: PoolLayout) -> AdapterWeights:
    """Normalise a PEFT LoRA adapter (its config and its state dict) to ``layout``; see the module docstring."""
    cfg = _check_config(aid, config)
    r0, alpha0 = cfg["r"], float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        m = _KEY_RX.fullmatch(k)
        if m is None:
            raise AdapterFormatError(aid, f"unsupported tensor {k!r}: only lora_A / lora_B weights of linear modules "
                                          f"are supported (no modules_to_save, biases or embeddings)")
        mod = m.group("mod")
        if mod.startswith(_PEFT_PREFIX):
            mod = mod[len(_PEFT_PREFIX):]
        ab = pairs.setdefault(mod, {})
        if m.group("ab") in ab:
            raise AdapterFormatError(aid, f"module {mod!r}: lora_{m.group('ab')} given twice")
        ab[m.group("ab")] = t
    col = _Collector(aid, layout)
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise AdapterFormatError(aid, f"module {mod!r}: {missing} is missing")
        key = layout.match(mod)
        if key is None:
            hint = "" if layout.modules else " (the layout has no module name patterns: pass modules=...)"
            raise AdapterMismatchError(aid, f"module {mod!r} matches no target of the layout{hint}")
        A, B = ab["A"], ab["B"]
        r_cfg = _pattern_value(rank_pat, mod, r0)
        a_cfg = float(_pattern_value(alpha_pat, mod, alpha0))
        if A.dim() == 2 and A.shape[0] != r_cfg:
            raise AdapterFormatError(aid, f"module {mod!r}: the config gives rank {r_cfg}, lora_A has shape "
                                          f"{tuple(A.shape)}")
        scale = a_cfg / math.sqrt(r_cfg) if rslora else a_cfg / r_cfg
        col.add(mod, key, A, B, scale)
    return col.finish()


# ------------------------------------------------------------------------------------------------ sources
class AdapterSource:
    """Where one adapter's weights come from. Subclasses implement :meth:`read`.

    ``rank_hint`` (optional): the rank, when known without reading (from a catalog) — lets the pool reject a
    wave that cannot fit before any disk read.
    """

    rank_hint: Optional[int] = None

    def read(self, adapter_id, layout: PoolLayout) -> AdapterWeights:  # pragma: no cover - interface
        raise NotImplementedError

    def token(self):
        """A value that changes when the source's content may have changed (host-cache validation)."""
        return id(self)


class PeftDir(AdapterSource):
    """A PEFT adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``."""

    def __init__(self, path, rank_hint: Optional[int] = None):
        self.path = Path(path)
        self.rank_hint = rank_hint

    def __repr__(self):
        return f"PeftDir({str(self.path)!r})"

    def token(self):
        try:
            st = (self.path / WEIGHTS_NAME).stat()
            sc = (self.path / CONFIG_NAME).stat()
            return (str(self.path), st.st_mtime_ns, st.st_size, sc.st_mtime_ns)
        except OSError:
            return (str(self.path), None)

    def read_config(self, aid) -> dict:
        p = self.path
        if not p.is_dir():
            raise AdapterFileError(aid, f"adapter directory not found: {p}")
        try:
            text = (p / CONFIG_NAME).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise AdapterFileError(aid, f"{CONFIG_NAME} not found in {p}") from None
        except OSError as e:
            raise AdapterFileError(aid, f"cannot read {p / CONFIG_NAME}: {e}") from None
        try:
            return json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterFormatError(aid, f"{CONFIG_NAME}: invalid JSON ({e})") from None

    def read(self, adapter_id, layout: PoolLayout) -> AdapterWeights:
        cfg = self.read_config(adapter_id)
        wp = self.path / WEIGHTS_NAME
        if not wp.exists() and (self.path / "adapter_model.bin").exists():
            raise AdapterFormatError(adapter_id, f"{self.path}: only {WEIGHTS_NAME} is supported (found "
                                                 f"adapter_model.bin, a pickle)")
        data = _read_bytes(adapter_id, wp)
        tensors, _ = read_safetensors(adapter_id, data, str(wp))
        return peft_weights(adapter_id, cfg, tensors, layout)


class SafetensorsBlob(AdapterSource):
    """A safetensors payload — a whole file, or ``length`` bytes at ``offset`` of a packed file — whose
    ``__metadata__["adapter_config"]`` holds the PEFT config as JSON (see :func:`adapter_blob`)."""

    def __init__(self, path, offset: int = 0, length: Optional[int] = None, rank_hint: Optional[int] = None):
        self.path, self.offset, self.length = Path(path), int(offset), None if length is None else int(length)
        self.rank_hint = rank_hint

    def __repr__(self):
        return f"SafetensorsBlob({str(self.path)!r}, offset={self.offset}, length={self.length})"

    def token(self):
        try:
            st = self.path.stat()
            return (str(self.path), self.offset, self.length, st.st_mtime_ns, st.st_size)
        except OSError:
            return (str(self.path), self.offset, None)

    def read(self, adapter_id, layout: PoolLayout) -> AdapterWeights:
        what = f"{self.path}[{self.offset}:{'' if self.length is None else self.offset + self.length}]"
        data = _read_bytes(adapter_id, self.path, self.offset, self.length)
        tensors, meta = read_safetensors(adapter_id, data, what)
        raw = meta.get(BLOB_CONFIG_KEY)
        if raw is None:
            raise AdapterFormatError(adapter_id, f"{what}: no {BLOB_CONFIG_KEY!r} in the safetensors metadata")
        try:
            cfg = json.loads(raw)
        except (json.JSONDecodeError, TypeError) as e:
            raise AdapterFormatError(adapter_id, f"{what}: invalid adapter_config JSON in metadata ({e})") from None
        return peft_weights(adapter_id, cfg, tensors, layout)


class TensorAdapter(AdapterSource):
    """An adapter from in-memory tensors.

    Parameters
    ----------
    tensors : mapping
        Key: a PEFT module name (mapped through ``layout.modules``), or ``(layer, target, slice)``, or
        ``(layer, target, slice, expert)``. Value: ``(A, B)`` or ``(A, B, module_scale)``; dense ``A [r, K]``,
        ``B [N, r]``; a ``(layer, moe_target, slice)`` key takes packed ``A [E, r, K]``, ``B [E, N, r]``.
    scale : float, default 1.0
        Scale of every module that gives none (ignored when ``alpha`` is given).
    alpha, use_rslora : optional
        PEFT-style: a module's scale is ``alpha / r_m`` (``alpha / sqrt(r_m)``).
    """

    def __init__(self, tensors: Mapping, *, scale: float = 1.0, alpha: Optional[float] = None,
                 use_rslora: bool = False):
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors: expected a mapping of module → (A, B), got {type(tensors).__name__}")
        self.tensors = dict(tensors)
        self.scale, self.alpha, self.use_rslora = float(scale), alpha, bool(use_rslora)

    def __repr__(self):
        return f"TensorAdapter({len(self.tensors)} modules)"

    def read(self, adapter_id, layout: PoolLayout) -> AdapterWeights:
        col = _Collector(adapter_id, layout)
        for k, v in self.tensors.items():
            if isinstance(k, str):
                key = layout.match(k)
                if key is None:
                    hint = "" if layout.modules else " (the layout has no module name patterns: pass modules=...)"
                    raise AdapterMismatchError(adapter_id, f"module {k!r} matches no target of the layout{hint}")
                name = k
            elif isinstance(k, tuple) and len(k) in (3, 4):
                key, name = k, str(k)
            else:
                raise AdapterFormatError(adapter_id, f"module key {k!r}: expected a module name or (layer, target, "
                                                     f"slice[, expert])")
            if not isinstance(v, (tuple, list)) or len(v) not in (2, 3):
                raise AdapterFormatError(adapter_id, f"module {name!r}: expected (A, B) or (A, B, scale)")
            A, B = v[0], v[1]
            if len(v) == 3:
                s = float(v[2])
            elif self.alpha is not None:
                r = A.shape[-2] if isinstance(A, torch.Tensor) and A.dim() >= 2 else 1
                s = self.alpha / math.sqrt(r) if self.use_rslora else self.alpha / r
            else:
                s = self.scale
            col.add(name, key, A, B, s)
        return col.finish()


def as_source(src) -> AdapterSource:
    """An :class:`AdapterSource` from a source, a path (PEFT directory, packed MoE directory, or a
    ``.safetensors`` blob file) or a mapping of tensors."""
    if isinstance(src, AdapterSource):
        return src
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        from lorakern.pool.packed import PackedAdapter, is_packed_dir  # the packed format (lorakern/pool/packed.py)

        if is_packed_dir(p):
            return PackedAdapter(p)
        return SafetensorsBlob(p) if p.suffix == ".safetensors" else PeftDir(p)
    if isinstance(src, Mapping):
        return TensorAdapter(src)
    raise TypeError(f"source: expected an AdapterSource, a path or a mapping of tensors, got {type(src).__name__}")


# ------------------------------------------------------------------------------------------------ packing
def pack_record(w: AdapterWeights, fmt: RowFormat, *, pin: bool = False, strict_dtype: bool = False
                ) -> torch.Tensor:
    """The adapter's ``rank`` rank rows as host records ``[rank, row_elems]`` in ``fmt.dtype`` (pinned when
    ``pin``): the bytes the pool copies to its row buffer. Targets and padding the adapter lacks are zeros."""
    dtype = fmt.dtype
    if strict_dtype:
        for key, (A, B, _) in w.modules.items():
            if A.dtype != dtype or B.dtype != dtype:
                raise AdapterDtypeError(w.adapter_id, f"module {key}: dtype {str(A.dtype).replace('torch.', '')} "
                                                      f"differs from the pool's {str(dtype).replace('torch.', '')} "
                                                      f"(strict_dtype=True)")
    rec = torch.empty(w.rank, fmt.row_elems, dtype=dtype, pin_memory=pin)
    rec.view(_BITS[rec.element_size()]).numpy().fill(0)  # single-threaded (see host_copy)
    s0 = w.scale
    for (layer, target, sl), (A, B, s) in w.modules.items():
        r = A.shape[-2]
        ao, al = fmt.a_range(layer, target, sl)
        bo, bl = fmt.b_range(layer, target, sl)
        if s != s0 and s0 != 0.0:
            acc = torch.float64 if B.dtype == torch.float64 else torch.float32
            B = B.to(acc) * (s / s0)
        if A.dim() == 2:
            host_copy(rec[:r, ao:ao + al], A)
            host_copy(rec[:r, bo:bo + bl], B.t())
        else:  # packed MoE: A [E, r, K] -> rows [r, E, K]; B [E, N, r] -> rows [r, E, N]
            E = A.shape[0]
            host_copy(rec[:r, ao:ao + al].view(r, E, A.shape[2]), A.permute(1, 0, 2))
            host_copy(rec[:r, bo:bo + bl].view(r, E, B.shape[1]), B.permute(2, 0, 1))
    return rec


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for host tensors, with a single-threaded numpy copy of the raw bits when no cast is
    needed. Why: an adapter is many ~100 KB strided copies; torch splits each over its intra-op threads, and on a
    busy host (the loader runs beside compute) those threads stall — measured here, on 2 shared cores, 6 us vs.
    up to 20 ms for the same 45k-element bf16 copy."""
    if (src.dtype != dst.dtype or src.device.type != "cpu" or dst.device.type != "cpu"
            or src.element_size() not in _BITS):
        dst.copy_(src)
        return
    it = _BITS[src.element_size()]
    np.copyto(dst.view(it).numpy(), src.view(it).numpy())


# ------------------------------------------------------------------------------------------------ writers
def _peft_config(r: int, lora_alpha: float, target_modules, use_rslora=False, rank_pattern=None,
                 alpha_pattern=None) -> dict:
    return {
        "peft_type": "LORA", "r": int(r), "lora_alpha": lora_alpha, "use_rslora": bool(use_rslora),
        "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {}),
        "target_modules": sorted(target_modules), "bias": "none", "use_dora": False, "lora_dropout": 0.0,
    }


def _peft_state(modules: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    out = {}
    for name, (A, B) in modules.items():
        out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous()
        out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous()
    return out


def save_peft_dir(path, modules: Mapping[str, Tuple[torch.Tensor, torch.Tensor]], *, r: int, lora_alpha: float,
                  use_rslora: bool = False, rank_pattern=None, alpha_pattern=None) -> Path:
    """Write ``modules`` (module name → ``(A [r_m, K], B [N, r_m])``) as a PEFT directory, in PEFT's own file
    format (``base_model.model.<name>.lora_A.weight`` keys, the config fields PEFT reads)."""
    from safetensors.torch import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    targets = {n.rsplit(".", 1)[-1] for n in modules}
    cfg = _peft_config(r, lora_alpha, targets, use_rslora, rank_pattern, alpha_pattern)
    save_file(_peft_state(modules), str(p / WEIGHTS_NAME), metadata={"format": "pt"})
    (p / CONFIG_NAME).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return p


def adapter_blob(modules: Mapping[str, Tuple[torch.Tensor, torch.Tensor]], *, r: int, lora_alpha: float,
                 use_rslora: bool = False, rank_pattern=None, alpha_pattern=None) -> bytes:
    """One adapter as a self-describing safetensors payload (PEFT keys, config JSON in ``__metadata__``), to be
    written alone or concatenated into a packed file read by :class:`SafetensorsBlob` with an offset."""
    from safetensors.torch import save

    targets = {n.rsplit(".", 1)[-1] for n in modules}
    cfg = _peft_config(r, lora_alpha, targets, use_rslora, rank_pattern, alpha_pattern)
    return save(_peft_state(modules), metadata={BLOB_CONFIG_KEY: json.dumps(cfg), "format": "pt"})
