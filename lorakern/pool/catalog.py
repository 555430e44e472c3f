r"""AdapterCatalog: adapter id → where its weights live, rank, targets, dtype, revision — for up to millions of
adapters, in compact columns with one index file that reopens by memory-mapping.

In memory and on disk a catalog is a handful of arrays (no Python object per adapter). Entry ``i`` is the
``i``-th adapter added; every per-entry column is in that order::

    id_off    uint64 [n+1]   id i is id_bytes[id_off[i] : id_off[i+1]]
    id_bytes  uint8  [...]   every id, UTF-8, concatenated (the string table)
    kind      uint8  [n]     0 = PEFT directory, 1 = safetensors blob (a file, or a byte range of a packed file)
    path_idx  uint32 [n]     index into the path table (paths are deduplicated: a packed file is stored once)
    offset    uint64 [n]     byte offset of a blob in its file (0 for directories)
    length    uint64 [n]     byte length of a blob (0 = to the end of the file)
    rank      uint16 [n]
    targets   uint64 [n]     bitmask over ``target_names`` (bit i = target_names[i]); 0 = unknown
    dtype     uint8  [n]     code into ``DTYPES`` (255 = unknown)
    rev_idx   uint32 [n]     index into the revision table (deduplicated)
    hash      uint64 [n]     the hash index: 64-bit BLAKE2b of every id, sorted ...
    order     uint32 [n]     ... and the entry each sorted hash belongs to
    path_off, path_bytes, rev_off, rev_bytes            the two small string tables

Lookup: hash the id, binary-search ``hash``, then compare the stored id bytes of ``order[pos]`` across the run of
equal hashes — so a 64-bit collision costs one extra comparison and never returns the wrong adapter.

Index file: ``b"LKCATLG\x01"``, a little-endian uint64 header length, a JSON header (format version, count,
target names, each column's dtype / offset / length, the file size), then each column 64-byte aligned.
:meth:`AdapterCatalog.open` checks the header against the file and maps the columns with ``mmap`` (no copy, so
reopening costs milliseconds whatever the size). A file is written to a temporary name and renamed into place, so
a failed build leaves any previous index untouched. Relative paths resolve against the index file's directory.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from lorakern.pool._progress import Progress
from lorakern.pool.errors import CatalogError, UnknownAdapterError

__all__ = ["AdapterCatalog", "CatalogBuilder", "CatalogEntry", "DTYPES", "hash_id"]

MAGIC = b"LKCATLG\x01"
FORMAT_VERSION = 1
KIND_DIR, KIND_BLOB = 0, 1
KINDS = ("peft_dir", "blob")
#: dtype codes of the ``dtype`` column
DTYPES = ("float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2")
_DTYPE_CODE = {n: i for i, n in enumerate(DTYPES)}
_UNKNOWN_DTYPE = 255
_ALIGN = 64
_CHUNK = 65536

_COLUMNS = (  # name, dtype, length: "n", "n+1" or "var"
    ("hash", "<u8", "n"), ("order", "<u4", "n"), ("id_off", "<u8", "n+1"), ("id_bytes", "u1", "var"),
    ("kind", "u1", "n"), ("path_idx", "<u4", "n"), ("offset", "<u8", "n"), ("length", "<u8", "n"),
    ("rank", "<u2", "n"), ("targets", "<u8", "n"), ("dtype", "u1", "n"), ("rev_idx", "<u4", "n"),
    ("path_off", "<u8", "p+1"), ("path_bytes", "u1", "var"), ("rev_off", "<u8", "v+1"), ("rev_bytes", "u1", "var"),
)


def hash_id(b: bytes) -> int:
    """The catalog's 64-bit hash of an id's UTF-8 bytes (BLAKE2b, 8-byte digest, little-endian)."""
    return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")


def _hash_many(encoded: Sequence[bytes]) -> np.ndarray:
    h = hashlib.blake2b
    return np.frombuffer(b"".join([h(b, digest_size=8).digest() for b in encoded]), dtype="<u8").copy()


@dataclass(frozen=True)
class CatalogEntry:
    """One catalog entry, materialised on demand."""

    adapter_id: str
    kind: str  # "peft_dir" | "blob"
    path: str  # as stored (relative paths resolve against the index file's directory)
    offset: int
    length: int  # 0 = to the end of the file
    rank: int
    targets: int  # bitmask over the catalog's target_names
    dtype: Optional[str]
    revision: str


def _string_table(strings: Sequence[bytes]):
    lens = np.fromiter((len(s) for s in strings), dtype=np.uint64, count=len(strings))
    off = np.zeros(len(strings) + 1, dtype="<u8")
    np.cumsum(lens, out=off[1:])
    return off, np.frombuffer(b"".join(strings), dtype=np.uint8)


class CatalogBuilder:
    """Collects entries, then :meth:`write` sorts, checks and writes the index file.

    ``target_names`` fixes the meaning of the ``targets`` bitmask (e.g. ``layout.target_names``).
    """

    def __init__(self, target_names: Sequence[str] = ()):
        self.target_names = tuple(target_names)
        if len(self.target_names) > 64:
            raise ValueError(f"target_names: {len(self.target_names)} names, at most 64")
        self._bit = {n: i for i, n in enumerate(self.target_names)}
        self._id_bytes = bytearray()
        self._id_len: List[np.ndarray] = []
        self._hash: List[np.ndarray] = []
        self._n = 0
        self._kind: List[np.ndarray] = []
        self._path_idx: List[np.ndarray] = []
        self._offset: List[np.ndarray] = []
        self._length: List[np.ndarray] = []
        self._rank: List[np.ndarray] = []
        self._targets: List[np.ndarray] = []
        self._dtype: List[np.ndarray] = []
        self._rev_idx: List[np.ndarray] = []
        self._paths: Dict[str, int] = {}
        self._revs: Dict[str, int] = {"": 0}

    def __len__(self) -> int:
        return self._n

    def _mask(self, targets) -> int:
        if targets is None:
            return 0
        if isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
            if not 0 <= int(targets) < 2**64:
                raise ValueError(f"targets: bitmask {targets} out of range for uint64")
            return int(targets)
        m = 0
        for t in targets:
            if t not in self._bit:
                raise ValueError(f"targets: unknown target {t!r}; the catalog's target_names are "
                                 f"{list(self.target_names)}")
            m |= 1 << self._bit[t]
        return m

    @staticmethod
    def _dtype_code(d) -> int:
        if d is None:
            return _UNKNOWN_DTYPE
        name = str(d).replace("torch.", "")
        if name not in _DTYPE_CODE:
            raise ValueError(f"dtype: unknown {d!r}; expected one of {DTYPES} or None")
        return _DTYPE_CODE[name]

    def _intern(self, table: Dict[str, int], s: str) -> int:
        i = table.get(s)
        if i is None:
            i = table[s] = len(table)
        return i

    def add(self, adapter_id: str, path, *, rank: int, targets=None, dtype=None, revision: str = "",
            offset: Optional[int] = None, length: Optional[int] = None) -> None:
        """One entry. ``path`` is a PEFT directory, or a safetensors blob file when ``offset`` is given or the name
        ends in ``.safetensors`` (then ``length`` bytes at ``offset``; ``length=None`` → to the end)."""
        self.add_many([adapter_id], [path], [rank], targets=None if targets is None else [targets],
                      dtypes=[dtype], revisions=[revision], offsets=None if offset is None else [offset],
                      lengths=None if length is None else [length])

    def add_many(self, adapter_ids: Sequence[str], paths, ranks, *, targets=None, dtypes=None, revisions=None,
                 offsets=None, lengths=None, progress: Optional[bool] = False) -> None:
        """Many entries at once (columns as sequences or arrays; ``paths`` may repeat — a packed file;
        ``dtypes`` and ``revisions`` may be one str for all)."""
        n = len(adapter_ids)
        for name, col in (("paths", paths), ("ranks", ranks), ("targets", targets), ("dtypes", dtypes),
                          ("revisions", revisions), ("offsets", offsets), ("lengths", lengths)):
            if col is not None and not isinstance(col, str) and len(col) != n:
                raise ValueError(f"{name}: {len(col)} values for {n} adapter_ids")
        for i, a in enumerate(adapter_ids):
            if not isinstance(a, str) or not a:
                raise TypeError(f"adapter_ids[{i}]: expected a non-empty str, got {a!r}")
        rk = np.asarray(ranks)
        if rk.dtype.kind not in "iu" or (n and (rk.min() < 0 or rk.max() > 65535)):
            raise ValueError("ranks: expected integers in [0, 65535]")
        path_idx = np.empty(n, dtype="<u4")
        kind = np.empty(n, dtype="u1")
        intern = self._intern
        for i, p in enumerate(paths):
            ps = os.fspath(p)
            path_idx[i] = intern(self._paths, ps)
            kind[i] = KIND_BLOB if (offsets is not None or ps.endswith(".safetensors")) else KIND_DIR
        off = np.zeros(n, "<u8") if offsets is None else np.asarray(offsets, dtype="<u8")
        ln = np.zeros(n, "<u8") if lengths is None else np.asarray(
            [0 if v is None else v for v in lengths] if not isinstance(lengths, np.ndarray) else lengths, dtype="<u8")
        if targets is None:
            tg = np.zeros(n, "<u8")
        elif isinstance(targets, np.ndarray) and targets.dtype.kind in "iu":
            tg = targets.astype("<u8")
        else:
            tg = np.array([self._mask(t) for t in targets], dtype="<u8")
        if dtypes is None:
            dt = np.full(n, _UNKNOWN_DTYPE, "u1")
        elif isinstance(dtypes, str):
            dt = np.full(n, self._dtype_code(dtypes), "u1")
        else:
            dt = np.array([self._dtype_code(d) for d in dtypes], dtype="u1")
        if revisions is None:
            rv = np.zeros(n, "<u4")
        elif isinstance(revisions, str):
            rv = np.full(n, intern(self._revs, revisions), "<u4")
        else:
            rv = np.array([intern(self._revs, str(r)) for r in revisions], dtype="<u4")
        # ids: encoded, hashed and appended to the string table chunk by chunk (no per-id object is kept)
        lens, hashes = np.empty(n, "<u8"), np.empty(n, "<u8")
        with Progress(n, "catalog: hashing ids", enabled=progress) as bar:
            for s in range(0, n, _CHUNK):
                enc = [a.encode("utf-8") for a in adapter_ids[s:s + _CHUNK]]
                hashes[s:s + len(enc)] = _hash_many(enc)
                lens[s:s + len(enc)] = [len(b) for b in enc]
                self._id_bytes += b"".join(enc)
                bar.update(len(enc))
        self._id_len.append(lens)
        self._hash.append(hashes)
        self._n += n
        self._kind.append(kind)
        self._path_idx.append(path_idx)
        self._offset.append(off)
        self._length.append(ln)
        self._rank.append(rk.astype("<u2"))
        self._targets.append(tg)
        self._dtype.append(dt)
        self._rev_idx.append(rv)

    def write(self, path, *, progress: Optional[bool] = None) -> "AdapterCatalog":
        """Sort the hash index, reject duplicate ids, write the index file atomically, and open it."""
        path = Path(path)
        n = self._n
        hashes = np.concatenate(self._hash) if self._hash else np.zeros(0, "<u8")
        id_off = np.zeros(n + 1, dtype="<u8")
        if n:
            np.cumsum(np.concatenate(self._id_len), out=id_off[1:])
        id_bytes = np.frombuffer(self._id_bytes, dtype=np.uint8) if self._id_bytes else np.zeros(0, np.uint8)
        order = np.argsort(hashes, kind="stable")
        hs = hashes[order]
        # duplicates: equal ids have equal hashes, so they sit in runs of equal hashes
        raw = self._id_bytes
        o = id_off

        def id_of(i):
            return bytes(raw[o[i]:o[i + 1]])

        for i in np.flatnonzero(hs[1:] == hs[:-1]).tolist():
            j = i  # compare sorted entry i+1 with every earlier member of its run
            b = id_of(order[i + 1])
            while j >= 0 and hs[j] == hs[i + 1]:
                if id_of(order[j]) == b:
                    raise CatalogError(f"duplicate adapter id {b.decode('utf-8')!r}", path)
                j -= 1

        def cat(parts, dtype):
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

        path_off, path_bytes = _string_table([p.encode("utf-8") for p in self._paths])
        rev_off, rev_bytes = _string_table([r.encode("utf-8") for r in self._revs])
        cols = {
            "hash": hs, "order": order.astype("<u4"), "id_off": id_off, "id_bytes": id_bytes,
            "kind": cat(self._kind, "u1"), "path_idx": cat(self._path_idx, "<u4"),
            "offset": cat(self._offset, "<u8"), "length": cat(self._length, "<u8"),
            "rank": cat(self._rank, "<u2"), "targets": cat(self._targets, "<u8"), "dtype": cat(self._dtype, "u1"),
            "rev_idx": cat(self._rev_idx, "<u4"),
            "path_off": path_off, "path_bytes": path_bytes, "rev_off": rev_off, "rev_bytes": rev_bytes,
        }
        _write_index(path, cols, n, self.target_names, progress)
        return AdapterCatalog.open(path)


def _write_index(path: Path, cols: Dict[str, np.ndarray], n: int, target_names, progress) -> None:
    meta = {"format": "lorakern-catalog", "version": FORMAT_VERSION, "count": n, "hash": "blake2b-64",
            "target_names": list(target_names), "columns": {}}
    # Two passes: the header's own length shifts the columns; pad it to a fixed size once it stabilises.
    hdr_len = 4096
    while True:
        off = _align(len(MAGIC) + 8 + hdr_len)
        for name, dt, _ in _COLUMNS:
            a = cols[name]
            meta["columns"][name] = {"dtype": dt, "offset": off, "count": int(a.shape[0])}
            off = _align(off + a.nbytes)
        meta["file_size"] = off
        raw = json.dumps(meta, separators=(",", ":")).encode("utf-8")
        if len(raw) <= hdr_len:
            raw = raw + b" " * (hdr_len - len(raw))
            break
        hdr_len = _align(len(raw) + 1024)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f, Progress(len(_COLUMNS), f"catalog {path.name}: writing", enabled=progress) as bar:
            f.write(MAGIC)
            f.write(struct.pack("<Q", hdr_len))
            f.write(raw)
            for name, dt, _ in _COLUMNS:
                c = meta["columns"][name]
                f.write(b"\0" * (c["offset"] - f.tell()))
                a = np.ascontiguousarray(cols[name], dtype=dt)
                f.write(memoryview(a).cast("B"))
                bar.update(1)
            f.write(b"\0" * (meta["file_size"] - f.tell()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class AdapterCatalog:
    """A memory-mapped catalog index. Build one with :class:`CatalogBuilder`, :meth:`build` or :meth:`scan`;
    reopen it with :meth:`open`.

    Lookups: ``catalog.index(id)`` (``-1`` if absent), ``catalog.indices(ids)`` (vectorised), ``id in catalog``,
    ``catalog[id]`` / ``catalog.entry(id)`` → :class:`CatalogEntry`, ``catalog.source(id)`` → the loader
    source with the rank as a hint (what :class:`~lorakern.pool.AdapterPool` calls). Read-only.
    """

    def __init__(self, path: Path, mm, meta: dict, arrays: Dict[str, np.ndarray]):
        self.path = path
        self._mm = mm
        self._meta = meta
        self.target_names = tuple(meta["target_names"])
        self._n = int(meta["count"])
        self._a = arrays
        self.root = path.parent
        # memoryviews for scalar lookups: bisect and slicing on them avoid numpy's per-call overhead
        self._hash_mv = memoryview(arrays["hash"]).cast("B").cast("Q")
        self._order_mv = memoryview(arrays["order"]).cast("B").cast("I")
        self._id_off_mv = memoryview(arrays["id_off"]).cast("B").cast("Q")
        self._id_mv = memoryview(arrays["id_bytes"]).cast("B")
        self._path_off_mv = memoryview(arrays["path_off"]).cast("B").cast("Q")
        self._path_mv = memoryview(arrays["path_bytes"]).cast("B")
        self._rev_off_mv = memoryview(arrays["rev_off"]).cast("B").cast("Q")
        self._rev_mv = memoryview(arrays["rev_bytes"]).cast("B")

    # ------------------------------------------------------------------------------------------ build / open
    @classmethod
    def build(cls, path, adapter_ids: Sequence[str], paths, ranks, *, target_names: Sequence[str] = (),
              targets=None, dtypes=None, revisions=None, offsets=None, lengths=None,
              progress: Optional[bool] = None) -> "AdapterCatalog":
        """Build an index from columns (see :meth:`CatalogBuilder.add_many`) and open it."""
        b = CatalogBuilder(target_names)
        b.add_many(adapter_ids, paths, ranks, targets=targets, dtypes=dtypes, revisions=revisions, offsets=offsets,
                   lengths=lengths, progress=progress)
        return b.write(path, progress=progress)

    @classmethod
    def scan(cls, root, path, *, layout=None, progress: Optional[bool] = None, relative: bool = True
             ) -> "AdapterCatalog":
        """Index every PEFT adapter directory under ``root`` (id = its path relative to ``root``, with ``/``).

        Reads each ``adapter_config.json`` (rank = the largest of ``r`` and ``rank_pattern``) and only the header
        of ``adapter_model.safetensors`` (dtype; with a ``layout``, the targets bitmask through its module map).
        A directory that cannot be read raises the loader's typed error naming it; nothing is written."""
        from lorakern.pool.loaders import CONFIG_NAME, WEIGHTS_NAME, _KEY_RX, _PEFT_PREFIX, read_safetensors_header

        root = Path(root)
        path = Path(path)
        dirs = sorted(Path(d) for d, _, files in os.walk(root) if CONFIG_NAME in files)
        b = CatalogBuilder(layout.target_names if layout is not None else ())
        base = path.parent.resolve()
        with Progress(len(dirs), f"catalog {path.name}: scanning {root}", enabled=progress) as bar:
            for d in dirs:
                aid = d.relative_to(root).as_posix()
                if aid == ".":
                    aid = d.name
                try:
                    cfg = json.loads((d / CONFIG_NAME).read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    from lorakern.pool.errors import AdapterFormatError
                    raise AdapterFormatError(aid, f"{d / CONFIG_NAME}: {e}") from None
                infos, _ = read_safetensors_header(d / WEIGHTS_NAME, aid)
                rank = 0
                dts = set()
                mask = 0
                for k, ti in infos.items():
                    m = _KEY_RX.fullmatch(k)
                    if m is None:
                        continue
                    if m.group("ab") == "A" and len(ti.shape) == 2:
                        rank = max(rank, ti.shape[0])
                    dts.add(str(ti.dtype).replace("torch.", ""))
                    if layout is not None:
                        mod = m.group("mod")
                        mod = mod[len(_PEFT_PREFIX):] if mod.startswith(_PEFT_PREFIX) else mod
                        key = layout.match(mod)
                        if key is not None:
                            mask |= 1 << layout.target_bit[key[1]]
                if not rank:
                    rank = max([int(cfg.get("r", 0) or 0)] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()])
                dtype = dts.pop() if len(dts) == 1 and next(iter(dts), None) in _DTYPE_CODE else None
                p = d.resolve()
                ps = os.path.relpath(p, base) if relative else str(p)
                b.add(aid, ps, rank=rank, targets=mask, dtype=dtype, revision=str(cfg.get("revision") or ""))
                bar.update(1)
        return b.write(path, progress=progress)

    @classmethod
    def open(cls, path) -> "AdapterCatalog":
        """Map an index file; checks its header against the file (:class:`CatalogError` if missing, truncated or
        corrupt)."""
        path = Path(path)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise CatalogError("index file not found", path) from None
        except OSError as e:
            raise CatalogError(f"cannot open: {e}", path) from None
        with f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
                raise CatalogError("not a lorakern catalog index (bad magic)", path)
            (hl,) = struct.unpack("<Q", head[len(MAGIC):])
            if hl > size - len(head):
                raise CatalogError(f"truncated: the header claims {hl} bytes, the file has {size}", path)
            try:
                meta = json.loads(f.read(hl).decode("utf-8"))
                n = int(meta["count"])
                cols = meta["columns"]
                fsize = int(meta["file_size"])
                meta["target_names"] = list(meta.get("target_names", []))
            except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
                raise CatalogError(f"corrupt header ({type(e).__name__}: {e})", path) from None
            if meta.get("version") != FORMAT_VERSION:
                raise CatalogError(f"format version {meta.get('version')!r}, this reader knows {FORMAT_VERSION}",
                                   path)
            if size < fsize:
                raise CatalogError(f"truncated: {size} bytes, the header says {fsize}", path)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        arrays = {}
        try:
            counts = {"n": n, "n+1": n + 1}
            for name, dt, ln in _COLUMNS:
                c = cols[name]
                cnt, off = int(c["count"]), int(c["offset"])
                if c["dtype"] != dt:
                    raise CatalogError(f"column {name!r} has dtype {c['dtype']!r}, expected {dt!r}", path)
                if ln in counts and cnt != counts[ln]:
                    raise CatalogError(f"column {name!r} has {cnt} entries, expected {counts[ln]}", path)
                nbytes = cnt * np.dtype(dt).itemsize
                if off < 0 or off + nbytes > size:
                    raise CatalogError(f"truncated: column {name!r} ends at byte {off + nbytes}, the file has "
                                       f"{size}", path)
                arrays[name] = np.frombuffer(mm, dtype=dt, count=cnt, offset=off) if cnt else np.zeros(0, dt)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CatalogError):
                raise
            raise CatalogError(f"corrupt header ({type(e).__name__}: {e})", path) from None
        for a, b, what in (("path_off", "path_bytes", "path"), ("rev_off", "rev_bytes", "revision"),
                           ("id_off", "id_bytes", "id")):
            o = arrays[a]
            if o.size and (int(o[0]) != 0 or int(o[-1]) != arrays[b].size):
                raise CatalogError(f"corrupt {what} string table", path)
        if n and (int(arrays["order"].max()) >= n or int(arrays["path_idx"].max()) >= arrays["path_off"].size - 1
                  or int(arrays["rev_idx"].max()) >= arrays["rev_off"].size - 1):
            raise CatalogError("corrupt column: a path or revision index out of range", path)
        return cls(path, mm, meta, arrays)

    def close(self) -> None:
        """Release the mapping (the catalog is unusable afterwards)."""
        for k in ("_hash_mv", "_order_mv", "_id_off_mv", "_id_mv", "_path_off_mv", "_path_mv", "_rev_off_mv", "_rev_mv"):
            v = getattr(self, k, None)
            if v is not None:
                v.release()
        self._a = {}
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # arrays still exported elsewhere; the map goes with them
                pass
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------ lookups
    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes of the index file (all of it is mapped, none of it copied)."""
        return int(self._meta["file_size"])

    def _id_at(self, i: int) -> bytes:
        return bytes(self._id_mv[self._id_off_mv[i]:self._id_off_mv[i + 1]])

    def index(self, adapter_id: str) -> int:
        """Entry index of ``adapter_id`` (its position in build order), ``-1`` if absent."""
        if not isinstance(adapter_id, str):
            raise TypeError(f"adapter_id: expected a str, got {type(adapter_id).__name__}")
        b = adapter_id.encode("utf-8")
        h = hash_id(b)
        hv, order = self._hash_mv, self._order_mv
        p = bisect.bisect_left(hv, h)
        n = self._n
        idm, off = self._id_mv, self._id_off_mv
        while p < n and hv[p] == h:
            i = order[p]
            if idm[off[i]:off[i + 1]] == b:
                return i
            p += 1
        return -1

    def indices(self, adapter_ids: Sequence[str]) -> np.ndarray:
        """int64 entry indices of many ids (``-1`` for absent ones), with a vectorised search."""
        enc = [a.encode("utf-8") for a in adapter_ids]
        h = _hash_many(enc)
        pos = np.searchsorted(self._a["hash"], h, side="left") if self._n else np.zeros(len(enc), np.int64)
        out = np.full(len(enc), -1, dtype=np.int64)
        hv, order, idm, off, n = self._hash_mv, self._order_mv, self._id_mv, self._id_off_mv, self._n
        for k, (p, hk, b) in enumerate(zip(pos.tolist(), h.tolist(), enc)):
            while p < n and hv[p] == hk:
                i = order[p]
                if idm[off[i]:off[i + 1]] == b:
                    out[k] = i
                    break
                p += 1
        return out

    def __contains__(self, adapter_id) -> bool:
        return isinstance(adapter_id, str) and self.index(adapter_id) >= 0

    def _require(self, adapter_id) -> int:
        i = self.index(adapter_id)
        if i < 0:
            raise UnknownAdapterError(adapter_id, f"not in the catalog {str(self.path)!r}")
        return i

    def entry(self, adapter_id: str) -> CatalogEntry:
        """The entry of ``adapter_id`` (:class:`UnknownAdapterError` if absent)."""
        return self.entry_at(self._require(adapter_id))

    __getitem__ = entry

    def entry_at(self, i: int) -> CatalogEntry:
        a = self._a
        dt = int(a["dtype"][i])
        return CatalogEntry(
            adapter_id=self._id_at(i).decode("utf-8"), kind=KINDS[int(a["kind"][i])],
            path=_table_at(self._path_off_mv, self._path_mv, int(a["path_idx"][i])), offset=int(a["offset"][i]), length=int(a["length"][i]),
            rank=int(a["rank"][i]), targets=int(a["targets"][i]),
            dtype=DTYPES[dt] if dt < len(DTYPES) else None,
            revision=_table_at(self._rev_off_mv, self._rev_mv, int(a["rev_idx"][i])))

    def rank(self, adapter_id: str) -> int:
        return int(self._a["rank"][self._require(adapter_id)])

    def targets(self, adapter_id: str) -> List[str]:
        """Names of the targets the adapter has (from the bitmask; empty if unknown)."""
        m = int(self._a["targets"][self._require(adapter_id)])
        return [t for i, t in enumerate(self.target_names) if m >> i & 1]

    def ids(self) -> Iterable[str]:
        """Every id, in build order. One string at a time: no list of a million strings."""
        for i in range(self._n):
            yield self._id_at(i).decode("utf-8")

    def resolve(self, p: str) -> Path:
        pp = Path(p)
        return pp if pp.is_absolute() else self.root / pp

    def source(self, adapter_id: str):
        """The loader source of an adapter (rank given as a hint): a PeftDir or a SafetensorsBlob."""
        from lorakern.pool.loaders import PeftDir, SafetensorsBlob

        e = self.entry(adapter_id)
        p = self.resolve(e.path)
        if e.kind == "peft_dir":
            return PeftDir(p, rank_hint=e.rank or None)
        return SafetensorsBlob(p, e.offset, e.length or None, rank_hint=e.rank or None)

    @property
    def column(self) -> Dict[str, np.ndarray]:
        """The raw columns (read-only arrays over the mapping)."""
        return dict(self._a)

    def __repr__(self) -> str:
        return f"AdapterCatalog({str(self.path)!r}, {self._n} adapters, {self.nbytes / 2**20:.1f} MiB)"


def _table_at(off, data, i: int) -> str:
    return bytes(data[off[i]:off[i + 1]]).decode("utf-8")
