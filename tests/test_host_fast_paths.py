"""The host-side fast paths of the eager ops give what the plain code gives: the same launches, results and errors.

An eager decode call's host time is Python, so the per-call work has short cuts: the weights' 16-byte-vector
eligibility read from their cached slice table (lorakern._tables.SliceTables), add_lora's launch fields packed
without keyword dictionaries (cuda_backend._packer), validation loops that build argument names only for an
error, and a cheaper direct_ok. Each is checked here against the plain code it replaces (kept here as the
reference where the library no longer has it), over cases that pass and cases that fail."""

import pytest
import torch
from conftest import CUDA_RUNS

from lorakern import _tables, cuda_backend
from lorakern.ops import _dispatch
from lorakern.ops import _validate as V
from lorakern.ops import lora as L


@pytest.fixture
def fresh_tables(monkeypatch):
    monkeypatch.setattr(_tables, "_TABLES", type(_tables._TABLES)())
    monkeypatch.setattr(_tables, "_PINNED", set())


def _weight_cases():
    """(name, weights, offsets): 16-byte-vector eligible or not, for one reason at a time."""
    buf = torch.empty(64, 136, dtype=torch.bfloat16)  # row stride 136: a multiple of 8, 4 and 2 elements
    odd = torch.empty(64, 130, dtype=torch.bfloat16)  # row stride 130: a multiple of 2 only
    return [
        ("aligned", [buf[:, :128], buf[:, :64]], [0, 128]),
        ("offset not a multiple of 8", [buf[:, :128], buf[:, :64]], [0, 132]),
        ("misaligned base", [buf[:, :128], buf[:, 1:65]], [0, 128]),
        ("width 100", [buf[:, :100]], [0]),
        ("width 6", [buf[:, :6]], [0]),
        ("row stride 130", [odd[:, :128]], [0]),
        ("inner stride 136", [buf.t()[:, :64]], [0]),
        ("stride-0 rows", [torch.empty(1, 64, dtype=torch.bfloat16).expand(8, 64)], [0]),
        ("no rows", [torch.empty(0, 64, dtype=torch.bfloat16)], [0]),
        ("3-D (not in the key: checked on the tensors)", [torch.empty(4, 8, 16, dtype=torch.bfloat16)], [0]),
        ("3-D, last size 12", [torch.empty(4, 8, 12, dtype=torch.bfloat16)], [0]),
    ]


@pytest.mark.parametrize("case", _weight_cases(), ids=lambda c: c[0])
def test_vector_eligibility_from_the_slice_table_is_the_tensors(case, fresh_tables):
    """The cached facts give _vec_ok's answer for every element size (one table, several dtypes: the element size
    is not in the key, so the table keeps what every size needs), with and without offsets."""
    _, ws, offs = case
    for offsets in (None, offs):
        tables = _tables.slice_tables(ws, offsets)
        assert isinstance(tables, tuple) and len(tables) == 4  # what Triton's callers unpack
        for elsize in (1, 2, 4, 8):
            want = cuda_backend._vec_ok(elsize, ws, offsets or ())
            assert cuda_backend._slices_vec_ok(elsize, tables, ws, offsets or ()) == want, (elsize, offsets)


def test_vector_eligibility_follows_the_key_never_the_tensor_object(fresh_tables):
    """The key (pointers, full strides, widths, offsets) determines the cached facts, so a tensor whose metadata
    changes in place gets another entry and the answer for its new layout; two tensor objects with one layout share
    the entry and its (right) answer."""
    w = torch.empty(16, 64, dtype=torch.bfloat16)
    t_aligned = _tables.slice_tables([w])
    assert cuda_backend._slices_vec_ok(2, t_aligned, [w])
    assert _tables.slice_tables([w[:]]) is t_aligned  # another object, same layout: same entry

    storage = torch.empty(2 * 16 * 64 + 16, dtype=torch.bfloat16).untyped_storage()
    w.set_(storage, 1, (16, 64), (64, 1))  # in place: base 2 bytes off 16-byte alignment
    t_moved = _tables.slice_tables([w])
    assert t_moved is not t_aligned
    assert not cuda_backend._slices_vec_ok(2, t_moved, [w]) and not cuda_backend._vec_ok(2, [w])

    w.set_(storage, 8, (16, 64), (64, 1))  # aligned again
    t_back = _tables.slice_tables([w])
    assert cuda_backend._slices_vec_ok(2, t_back, [w])

    # inner stride 2: pointer, row stride and width as t_back's (what the table itself holds), yet no vector
    # access; the key's full strides tell it apart
    w.set_(storage, 8, (16, 64), (64, 2))
    t_strided = _tables.slice_tables([w])
    assert t_strided is not t_back and torch.equal(t_strided[1], t_back[1]) and torch.equal(t_strided[0], t_back[0])
    assert not cuda_backend._slices_vec_ok(2, t_strided, [w]) and not cuda_backend._vec_ok(2, [w])

    w.set_(storage, 8, (16, 60), (64, 1))  # 60 wide: 4-element vectors only
    t_narrow = _tables.slice_tables([w])
    assert t_narrow is not t_back
    assert not cuda_backend._slices_vec_ok(2, t_narrow, [w]) and cuda_backend._slices_vec_ok(4, t_narrow, [w])


def test_slice_tables_content(fresh_tables):
    """The tables hold what they always did; the extra facts describe them."""
    buf = torch.empty(8, 48)
    ws = [buf[:, :16], buf[:, 16:40]]
    tables = _tables.slice_tables(ws, [0, 16])
    assert tables[0].tolist() == [w.data_ptr() for w in ws]
    assert tables[1].tolist() == [48, 48] and tables[2].tolist() == [16, 24] and tables[3].tolist() == [0, 16]
    assert tables.data_ptrs == tuple(t.data_ptr() for t in tables) and tables.widths == (16, 24)
    assert _tables.slice_tables(ws)[3].tolist() == [0, 0]


def test_packed_fields_are_the_keyword_fields():
    names = ("K", "x", "m_split", "num_rows", "seg_cols")
    pack = cuda_backend._packer(names)
    values = (512, 12345, 3, 4096, 64)
    assert pack(values) == cuda_backend._fields(dict(zip(names, values)))
    assert pack(values) == [dict(zip(names, values)).get(n, cuda_backend._FIELD_DEFAULTS.get(n, 0))
                            for n in cuda_backend._DENSE_FIELDS]
    for bad in (("x", "x"), ("x", "no_such_field")):
        with pytest.raises(ValueError):
            cuda_backend._packer(bad)


@pytest.mark.skipif(not CUDA_RUNS, reason="the cuda backend does not run here")
@pytest.mark.parametrize("aligned", [True, False])
def test_add_lora_gather_launch_is_the_keyword_launch(aligned, monkeypatch):
    """add_lora's gather launch (packed without dictionaries) carries exactly the fields, dtype, mode, tokens per
    pass, vector flag and stream that the keyword-argument launch (_call with _common) would."""
    monkeypatch.setenv("LORAKERN_CUDA_EMULATE", "1")
    monkeypatch.delenv("LORAKERN_CUDA_SEGMENT", raising=False)
    log = []

    class Recorder:
        def __init__(self, ext):
            self.ext = ext

        def dense_gather(self, *args):
            log.append(args)

        def __getattr__(self, name):
            return getattr(self.ext, name)

    real_ext = cuda_backend._ext
    monkeypatch.setattr(cuda_backend, "_ext", lambda device: Recorder(real_ext(device)))
    g = torch.Generator().manual_seed(0)
    T, K, ns, rows = 6, 64 if aligned else 60, [32, 16], 40
    x = torch.randn(T, K, generator=g).bfloat16()
    out = torch.randn(T, sum(ns), generator=g).bfloat16()
    lora_a = [torch.randn(rows, K, generator=g).bfloat16() for _ in ns]
    lora_b = [torch.randn(rows, n, generator=g).bfloat16() for n in ns]
    page_table = torch.arange(rows, dtype=torch.int32).view(5, 8)
    ranks = torch.tensor([8, 3, 0, 8, 1], dtype=torch.int32)
    scales = torch.rand(5, generator=g)
    token_ids = torch.arange(T, dtype=torch.int32)
    tiles = torch.zeros(8, dtype=torch.int32)
    offs, info = [0, 32], [3, 1, 0, 4, 2]
    cuda_backend.add_lora(out, x, lora_a, lora_b, page_table, ranks, scales, token_ids, tiles, tiles, offs, info)
    (got,) = log

    a_tab, sa_tab, _, _ = _tables.slice_tables(lora_a)
    b_tab, sb_tab, n_tab, off_tab = _tables.slice_tables(lora_b, offs)
    vec = cuda_backend._vec_ok(2, [x, out, *lora_a, *lora_b], offs)
    assert vec == aligned
    mt = cuda_backend._tokens_per_pass(info)
    ms, n_split = cuda_backend._gather_splits(x.device, info[0] * 2, mt, info, 32, 8 if vec else 1)
    fields = cuda_backend._fields(dict(
        m_split=ms, n_split=n_split, x=x.data_ptr(), sx_t=x.stride(0), sx_k=x.stride(1), a_ptrs=a_tab.data_ptr(),
        a_strides=sa_tab.data_ptr(), b_ptrs=b_tab.data_ptr(), b_strides=sb_tab.data_ptr(), n_sizes=n_tab.data_ptr(),
        offsets=off_tab.data_ptr(), out=out.data_ptr(), so_t=out.stride(0), so_n=out.stride(1), K=K,
        **cuda_backend._common(page_table, ranks, scales, tiles, token_ids, info[0], 2, rows)))
    assert got == (fields, cuda_backend._DTYPES[torch.bfloat16], cuda_backend._FUSED, mt, vec, 0)
    assert type(got[0]) is list and all(type(v) is int for v in got[0])


# ------------------------------------------------------------------------------------------------ validation
def _check_rows_reference(name, rows, dtype, width, wname):
    """check_rows as it was: every check, with its name, for every slice."""
    return V.check_rows(name, rows, dtype, width, wname, fast=False)


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as e:  # noqa: BLE001 (the type and message are what is compared)
        return (type(e), str(e))


def test_check_rows_is_the_plain_loop():
    bf, f32 = torch.bfloat16, torch.float32
    good = torch.empty(8, 16, dtype=bf)
    variants = [good, torch.empty(8, 16, dtype=f32), torch.empty(8, 16, dtype=torch.int32),
                torch.empty(8, 12, dtype=bf), torch.empty(9, 16, dtype=bf), torch.empty(8, 16, 1, dtype=bf),
                torch.empty(8, dtype=bf), "a string", torch.empty(0, 16, dtype=bf)]
    seen = set()
    for first in variants:
        for second in variants:
            for dtype in (bf, f32, None, torch.int32):
                for width in (16, None):
                    for rows in ([first], [first, second], [good, first, second]):
                        want = _outcome(_check_rows_reference, "lora_a", rows, dtype, width, "K")
                        assert _outcome(V.check_rows, "lora_a", rows, dtype, width, "K") == want
                        seen.add(want[0])
    assert {"ok", TypeError, ValueError} <= seen


def _resolve_offsets_reference(widths, out_cols):
    offs, acc = [], 0
    for w in widths:
        offs.append(acc)
        acc += w
    spans = sorted(zip(offs, widths))
    for (o, w) in spans:
        if o < 0 or o + w > out_cols:
            raise ValueError(
                f"slice_offsets: slice at offset {o} with width {w} does not fit in out's {out_cols} columns")
    for (o1, w1), (o2, _) in zip(spans, spans[1:]):
        if o1 + w1 > o2:
            raise ValueError(f"slice_offsets: slices at offsets {o1} (width {w1}) and {o2} overlap")
    return offs


def test_default_offsets_are_the_checked_running_sum():
    for widths in ([8], [8, 0, 4], [0, 0], [0, 8], [5, -2, 4], [4, -8, 8], []):
        for out_cols in (0, 4, 10, 12, 13, 100):
            want = _outcome(_resolve_offsets_reference, widths, out_cols)
            assert _outcome(V.resolve_offsets, None, widths, out_cols) == want, (widths, out_cols)


def _as_slices_reference(name, value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    raise TypeError(f"{name}: expected a tensor or a non-empty sequence of tensors, got {type(value).__name__}")


def test_as_slices_and_on_device():
    t = torch.empty(2)
    for value in (t, [t, t], (t,), [], [t, 1], (1,), (t, None), 3, "ab", None):
        got, want = _outcome(V.as_slices, "lora_a", value), _outcome(_as_slices_reference, "lora_a", value)
        if want[0] == "ok":
            assert got[0] == "ok" and type(got[1]) is list and len(got[1]) == len(want[1])
            assert all(a is b for a, b in zip(got[1], want[1]))
        else:
            assert got == want
    meta = torch.empty(2, device="meta")
    cpu = torch.device("cpu")
    assert V.on_device(cpu, t, None, t) and not V.on_device(cpu, t, meta) and V.on_device(cpu)


def test_device_errors_still_name_the_argument():
    """The ops build the argument names only when a device differs; the error is the one check_device raises."""
    x = torch.randn(3, 16)
    out = torch.zeros(3, 24)
    lora_a = [torch.randn(4, 16), torch.randn(4, 16)]
    lora_b = [torch.randn(4, 8), torch.randn(4, 16, device="meta")]
    pt = torch.zeros(2, 2, dtype=torch.int32)
    ranks = torch.zeros(2, dtype=torch.int32)
    slots = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^lora_b\[1\]: on meta, but x is on cpu; all arguments must share"):
        L.add_lora(out, x, lora_a, lora_b, pt, ranks, None, slots, backend="torch")
    with pytest.raises(ValueError, match=r"^ranks: on meta, but x is on cpu"):
        L.add_lora(out, x, lora_a, lora_b[:1] * 2, pt, ranks.to("meta"), None, slots, backend="torch")
    with pytest.raises(ValueError, match=r"^lora_a\[0\]: on meta"):
        L.lora_shrink(x, [lora_a[0].to("meta"), lora_a[1]], pt, ranks, slots, backend="torch")
    y = torch.zeros(2, 3, 2)
    with pytest.raises(ValueError, match=r"^lora_b\[1\]: on meta, but x is on cpu"):
        L.lora_expand(out, y, lora_b, pt, ranks, None, slots, backend="torch")


# ------------------------------------------------------------------------------------------------ dispatch
def _direct_ok_reference(args) -> bool:
    """direct_ok's argument loop as it was (the mode checks before it are unchanged)."""
    grad = torch.is_grad_enabled()
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor):
                if type(t) not in _dispatch._PLAIN or (grad and t.requires_grad):
                    return False
    return True


class _Sub(torch.Tensor):
    pass


def test_direct_ok_is_the_plain_loop(monkeypatch):
    monkeypatch.setattr(_dispatch, "FORCE_OP", False)
    plain = torch.empty(2)
    param = torch.nn.Parameter(torch.empty(2))  # requires grad
    frozen = torch.nn.Parameter(torch.empty(2), requires_grad=False)
    leaf = torch.empty(2, requires_grad=True)
    sub = torch.empty(2).as_subclass(_Sub)
    items = [plain, param, frozen, leaf, sub, 3, None, "cuda", [plain, 1], [plain, leaf], (plain, sub), [[sub]], [],
             [1, 2], ()]
    cases = [(a,) for a in items] + [(plain, a, plain) for a in items] + [(a, b) for a in items for b in items]
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for args in cases:
                assert _dispatch.direct_ok(args) == _direct_ok_reference(args), (grad, args)
    with torch.no_grad():
        assert _dispatch.direct_ok((plain, [plain, leaf], 3))
    assert not _dispatch.direct_ok((plain, [plain, leaf], 3)) and not _dispatch.direct_ok(([sub],))


def test_kernels_are_looked_up_per_call(monkeypatch):
    """The backend's module is kept after the first import; its function is still read per call (a test that
    replaces cuda_backend.add_lora is heard)."""
    L._kernels("cuda", "add_lora")

    def marker(*args):
        return None

    monkeypatch.setattr(cuda_backend, "add_lora", marker)
    assert L._kernels("cuda", "add_lora") is marker
    with pytest.raises(RuntimeError, match="backend 'nope' has no implementation"):
        L._kernels("nope", "add_lora")
