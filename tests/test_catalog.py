"""AdapterCatalog: build, persist, reopen, lookups (hash index with collision handling), directory scans,
corrupt index files, and the pool resolving ids through a catalog."""

import io
import os

import numpy as np
import pytest
import torch

from lorakern.pool import (AdapterCatalog, AdapterFileError, AdapterMismatchError, AdapterPool, CatalogBuilder,
                           CatalogError, PoolCapacityError, PoolLayout, UnknownAdapterError, adapter_blob,
                           save_peft_dir)
from lorakern.pool import catalog as catalog_mod
from lorakern.pool._progress import Progress

TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _columns(n, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"org{i % 97}/adapter-{i:06d}" for i in range(n)]
    paths = [f"packs/pack{i % 5}.bin" for i in range(n)]
    ranks = rng.integers(1, 65, n)
    targets = rng.integers(0, 16, n).astype(np.uint64)
    dtypes = ["bfloat16" if i % 3 else "float16" for i in range(n)]
    revisions = [f"rev{i % 4}" if i % 2 else "" for i in range(n)]
    offsets = rng.integers(0, 2**40, n)
    lengths = rng.integers(1, 2**30, n)
    return ids, paths, ranks, targets, dtypes, revisions, offsets, lengths


def _build(path, n, seed=0, progress=False):
    ids, paths, ranks, targets, dtypes, revisions, offsets, lengths = _columns(n, seed)
    cat = AdapterCatalog.build(path, ids, paths, ranks, target_names=TARGETS, targets=targets, dtypes=dtypes,
                               revisions=revisions, offsets=offsets, lengths=lengths, progress=progress)
    return cat, (ids, paths, ranks, targets, dtypes, revisions, offsets, lengths)


def test_build_lookup_reopen(tmp_path):
    n = 5000
    cat, (ids, paths, ranks, targets, dtypes, revisions, offsets, lengths) = _build(tmp_path / "c.lkcat", n)
    for c in (cat, AdapterCatalog.open(tmp_path / "c.lkcat")):
        assert len(c) == n and c.target_names == TARGETS
        for i in list(range(0, n, 97)) + [n - 1]:
            e = c.entry(ids[i])
            assert (e.adapter_id, e.kind, e.path, e.offset, e.length, e.rank, e.targets, e.dtype, e.revision) == (
                ids[i], "blob", paths[i], int(offsets[i]), int(lengths[i]), int(ranks[i]), int(targets[i]),
                dtypes[i], revisions[i])
            assert c.targets(ids[i]) == [t for k, t in enumerate(TARGETS) if int(targets[i]) >> k & 1]
            assert ids[i] in c and c.rank(ids[i]) == int(ranks[i])
        idx = c.indices(ids + ["absent", "org1/adapter-9999999", ""])
        assert (idx[:n] >= 0).all() and len(set(idx[:n].tolist())) == n and (idx[n:] == -1).all()
        assert [c.index(a) for a in ids[:50]] == idx[:50].tolist()
        assert "absent" not in c and c.index("absent") == -1 and 3 not in c
        with pytest.raises(UnknownAdapterError, match="adapter 'absent': not in the catalog") as ei:
            c.entry("absent")
        assert isinstance(ei.value, KeyError)
    assert sorted(cat.ids()) == sorted(ids)
    hashes = cat.column["hash"]
    assert (np.diff(hashes.astype(np.float64)) >= 0).all()


def test_hash_collisions_are_resolved(tmp_path, monkeypatch):
    """With a hash of 4 values, every lookup walks a run of colliding entries and still finds the right one."""
    weak = lambda b: (b[-1] % 4) if b else 0  # noqa: E731
    monkeypatch.setattr(catalog_mod, "hash_id", weak)
    monkeypatch.setattr(catalog_mod, "_hash_many", lambda enc: np.array([weak(b) for b in enc], dtype="<u8"))
    ids = [f"id{i}" for i in range(200)]
    cat = AdapterCatalog.build(tmp_path / "w.lkcat", ids, ["d"] * 200, list(range(1, 201)))
    assert len(set(cat.column["hash"].tolist())) <= 4
    for i, a in enumerate(ids):
        assert cat.rank(a) == i + 1
    assert cat.indices(ids + ["id999"]).tolist()[-1] == -1
    with pytest.raises(CatalogError, match="duplicate adapter id 'id7'"):
        AdapterCatalog.build(tmp_path / "w2.lkcat", ids + ["id7"], ["d"] * 201, [1] * 201)


def test_duplicates_and_bad_input_leave_the_index_untouched(tmp_path):
    p = tmp_path / "c.lkcat"
    _build(p, 100)
    before = p.read_bytes()
    with pytest.raises(CatalogError, match="duplicate adapter id 'x'"):
        AdapterCatalog.build(p, ["x", "y", "x"], ["a", "b", "c"], [1, 2, 3])
    assert p.read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    with pytest.raises(ValueError, match="ranks"):
        AdapterCatalog.build(p, ["x"], ["a"], [70000])
    with pytest.raises(ValueError, match="unknown target 'lm_head'"):
        CatalogBuilder(TARGETS).add("x", "a", rank=1, targets=["lm_head"])
    with pytest.raises(ValueError, match="dtype"):
        CatalogBuilder().add("x", "a", rank=1, dtype="int4")
    with pytest.raises(TypeError, match=r"adapter_ids\[0\]"):
        CatalogBuilder().add_many([3], ["a"], [1])
    with pytest.raises(ValueError, match="paths: 1 values for 2"):
        CatalogBuilder().add_many(["a", "b"], ["a"], [1, 2])
    assert p.read_bytes() == before


def _damage(p, kind):
    data = bytearray(p.read_bytes())
    if kind == "magic":
        data[:4] = b"XXXX"
    elif kind == "truncated":
        data = data[:len(data) - 100]
    elif kind == "header_json":
        data[20:40] = b"\xff" * 20
    elif kind == "header_len":
        data[8:16] = (10**12).to_bytes(8, "little")
    elif kind == "empty":
        data = bytearray()
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["magic", "truncated", "header_json", "header_len", "empty"])
def test_corrupt_index(tmp_path, kind):
    p = tmp_path / "c.lkcat"
    _build(p, 300)
    _damage(p, kind)
    with pytest.raises(CatalogError) as ei:
        AdapterCatalog.open(p)
    assert isinstance(ei.value, ValueError) and "c.lkcat" in str(ei.value)


def test_missing_index():
    with pytest.raises(CatalogError, match="not found"):
        AdapterCatalog.open("/nonexistent/x.lkcat")


def test_empty_catalog(tmp_path):
    cat = AdapterCatalog.build(tmp_path / "e.lkcat", [], [], np.zeros(0, np.int64))
    assert len(cat) == 0 and "a" not in cat and cat.indices(["a"]).tolist() == [-1]
    assert len(AdapterCatalog.open(tmp_path / "e.lkcat")) == 0


def _lay():
    return PoolLayout.llama(2, 16, 24, 2, 1, head_dim=8)


def _mods(g, r, projs=("q_proj", "v_proj", "down_proj")):
    shapes = {"q_proj": (16, 16), "v_proj": (16, 8), "down_proj": (24, 16), "o_proj": (16, 16)}
    sub = {"q_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn", "down_proj": "mlp"}
    out = {}
    for layer in range(2):
        for p in projs:
            K, N = shapes[p]
            out[f"model.layers.{layer}.{sub[p]}.{p}"] = (torch.randn(r, K, generator=g).bfloat16(),
                                                          torch.randn(N, r, generator=g).bfloat16())
    return out


def test_scan_peft_dirs_and_load_through_pool(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "adapters"
    save_peft_dir(root / "team-a" / "style", _mods(g, 4), r=4, lora_alpha=8)
    save_peft_dir(root / "team-a" / "tone", _mods(g, 2, ("o_proj",)), r=2, lora_alpha=2)
    save_peft_dir(root / "solo", _mods(g, 8), r=4, lora_alpha=4, rank_pattern={"q_proj": 8, "v_proj": 8,
                                                                              "down_proj": 8})
    lay = _lay()
    (tmp_path / "idx").mkdir()
    cat = AdapterCatalog.scan(root, tmp_path / "idx" / "a.lkcat", layout=lay, progress=True)
    err = capsys.readouterr().err
    assert "scanning" in err and "100.0%" in err
    assert sorted(cat.ids()) == ["solo", "team-a/style", "team-a/tone"]
    e = cat.entry("team-a/style")
    assert e.kind == "peft_dir" and e.rank == 4 and e.dtype == "bfloat16"
    assert set(cat.targets("team-a/style")) == {"qkv_proj", "down_proj"} and cat.targets("team-a/tone") == ["o_proj"]
    assert cat.rank("solo") == 8 and not os.path.isabs(e.path)
    # reopen from elsewhere: relative paths resolve against the index file
    cat2 = AdapterCatalog.open(tmp_path / "idx" / "a.lkcat")
    pool = AdapterPool(lay, max_rows=16, max_slots=3, max_rank=8, dtype=torch.float32, catalog=cat2)
    slots = pool.acquire(["team-a/style", "solo", None])
    assert slots.tolist()[2] == -1 and pool.ranks[slots[1]].item() == 8
    with pytest.raises(UnknownAdapterError, match="'nope'"):
        pool.acquire(["nope"])


def test_pool_uses_catalog_hints_before_reading(tmp_path):
    """Ranks from the catalog reject a wave (rank too high, or too many rows) before any file is read: the
    entries point at directories that do not exist, and the errors are about rank and capacity, not files."""
    lay = _lay()
    cat = AdapterCatalog.build(tmp_path / "h.lkcat", ["huge", "r6a", "r6b", "ghost"],
                               ["nowhere/huge", "nowhere/a", "nowhere/b", "nowhere/g"], [64, 6, 6, 2])
    pool = AdapterPool(lay, max_rows=10, max_slots=4, max_rank=16, dtype=torch.float32, catalog=cat)
    snap = pool._state()
    with pytest.raises(AdapterMismatchError, match="'huge': rank 64 above the pool's max_rank=16"):
        pool.acquire(["huge"])
    with pytest.raises(PoolCapacityError, match="needs at least 12 rows"):
        pool.acquire(["r6a", "r6b"])
    assert pool._state() == snap
    with pytest.raises(AdapterFileError, match="'ghost': adapter directory not found"):
        pool.acquire(["ghost"])
    assert pool._state() == snap


def test_blob_entries_in_a_packed_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    blobs = [adapter_blob(_mods(g, r), r=r, lora_alpha=r) for r in (1, 3, 5)]
    pack = tmp_path / "pack.bin"
    offs, pos = [], 0
    with open(pack, "wb") as f:
        for b in blobs:
            offs.append(pos)
            f.write(b)
            pos += len(b)
    cat = AdapterCatalog.build(tmp_path / "p.lkcat", ["b1", "b3", "b5"], ["pack.bin"] * 3, [1, 3, 5],
                               offsets=offs, lengths=[len(b) for b in blobs])
    assert cat.entry("b3").kind == "blob" and cat.entry("b3").offset == offs[1]
    pool = AdapterPool(_lay(), max_rows=12, max_slots=3, max_rank=8, dtype=torch.float32, catalog=cat)
    pool.load(["b1", "b3", "b5"])
    assert sorted(pool.ranks.tolist()) == [1, 3, 5]
    # a wrong length (truncated blob) is a format error naming the adapter
    bad = AdapterCatalog.build(tmp_path / "bad.lkcat", ["b3"], ["pack.bin"], [3], offsets=[offs[1]],
                               lengths=[len(blobs[1]) - 10])
    p2 = AdapterPool(_lay(), max_rows=12, max_slots=3, max_rank=8, dtype=torch.float32, catalog=bad)
    with pytest.raises(ValueError, match="adapter 'b3': .*truncated"):
        p2.load(["b3"])


def test_progress_bar_lines():
    s = io.StringIO()
    with Progress(100, "work", enabled=True, stream=s) as p:
        for _ in range(10):
            p.update(10)
    out = s.getvalue()
    assert out.count("\n") >= 4 and "work: |" in out and "100/100" in out
    s2 = io.StringIO()
    with Progress(10, "quiet", stream=s2) as p:  # auto: not a terminal → silent
        p.update(10)
    assert s2.getvalue() == ""
