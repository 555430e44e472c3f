"""lorakern.layout: stacked (vLLM / SGLang) layout <-> rank rows (DESIGN.md §2). Random inputs every run."""

from __future__ import annotations

import random

import pytest
import torch

from lorakern.layout import RankRows, rows_to_stacked, stacked_to_rows
from lorakern.workloads import make_lora

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture
def gen():
    seed = random.randrange(2**31)
    print(f"seed={seed}")  # shown on failure
    return torch.Generator().manual_seed(seed)


def rand(g, *shape, dtype=torch.float32):
    """Random values bounded away from zero, so that a zero in an output can only come from padding."""
    t = torch.randn(*shape, generator=g)
    t = t + torch.where(t >= 0, 0.25, -0.25)
    return t.to(dtype)


def make_stacked(g, n, r_max, K, n_sizes, dtype=torch.float32):
    a = [rand(g, n, r_max, K, dtype=dtype) for _ in n_sizes]
    b = [rand(g, n, N, r_max, dtype=dtype) for N in n_sizes]
    return a, b


def mixed_ranks(g, n, r_max):
    """Ranks 0..r_max, including 0, 1 and r_max."""
    r = torch.randint(0, r_max + 1, (n,), generator=g)
    r[0], r[1 % n], r[2 % n] = 0, 1, r_max
    return r


def check_packed(rr: RankRows, a, b, ranks, pad_value=-1):
    """``rr`` holds adapter s at rows [off_s, off_s + r_s), bit-exact; page-table padding is ``pad_value``."""
    rk = [int(v) for v in ranks]
    assert rr.ranks.dtype == torch.int32 and rr.page_table.dtype == torch.int32
    assert rr.ranks.tolist() == rk
    assert rr.num_rows == sum(rk)
    off = 0
    for s, r in enumerate(rk):
        assert rr.page_table[s, :r].tolist() == list(range(off, off + r))
        assert (rr.page_table[s, r:] == pad_value).all()
        for i in range(len(a)):
            assert torch.equal(rr.lora_a[i][off:off + r], a[i][s, :r])
            assert torch.equal(rr.lora_b[i][off:off + r], b[i][s, :, :r].T)
        off += r


def check_stacked(out_a, out_b, a, b, ranks, max_rank):
    """Outputs equal the inputs on the live region (bit-exact) and are zero beyond each rank."""
    for i in range(len(a)):
        n, _, K = a[i].shape
        assert out_a[i].shape == (n, max_rank, K) and out_a[i].dtype == a[i].dtype
        assert out_b[i].shape == (n, b[i].shape[1], max_rank) and out_b[i].dtype == b[i].dtype
        for s, r in enumerate(int(v) for v in ranks):
            assert torch.equal(out_a[i][s, :r], a[i][s, :r])
            assert torch.equal(out_b[i][s, :, :r], b[i][s, :, :r])
            assert (out_a[i][s, r:] == 0).all() and (out_b[i][s, :, r:] == 0).all()


def adapter_rows(lora, page_table, ranks, s):
    return lora[page_table[s, : int(ranks[s])].long()]


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_stacked_rows_stacked(gen, dtype):
    n, r_max, K, n_sizes = 13, 16, 24, [40, 8, 17]
    a, b = make_stacked(gen, n, r_max, K, n_sizes, dtype)
    ranks = mixed_ranks(gen, n, r_max)
    rr = stacked_to_rows(a, b, ranks)
    assert [t.shape for t in rr.lora_a] == [(int(ranks.sum()), K)] * 3
    assert [t.shape[1] for t in rr.lora_b] == n_sizes
    assert all(t.dtype == dtype for t in rr.lora_a + rr.lora_b)
    check_packed(rr, a, b, ranks)
    out_a, out_b = rows_to_stacked(rr.lora_a, rr.lora_b, rr.page_table, rr.ranks)
    check_stacked(out_a, out_b, a, b, ranks, r_max)


def test_mixed_ranks_1_to_128_with_rank_0(gen):
    n, r_max, K = 48, 128, 8
    a, b = make_stacked(gen, n, r_max, K, [12, 5])
    ranks = torch.randint(1, r_max + 1, (n,), generator=gen)
    ranks[torch.randperm(n, generator=gen)[:5]] = 0
    ranks[7] = 1
    ranks[11] = 128
    rr = stacked_to_rows(a, b, ranks.tolist())  # ranks as a list of ints
    check_packed(rr, a, b, ranks)
    check_stacked(*rows_to_stacked(rr.lora_a, rr.lora_b, rr.page_table, rr.ranks), a, b, ranks, r_max)


def test_single_tensor_and_default_ranks(gen):
    n, r_max, K, N = 5, 6, 7, 9
    a, b = make_stacked(gen, n, r_max, K, [N])
    rr = stacked_to_rows(a[0], b[0])  # one slice as bare tensors; ranks=None: all r_max
    assert isinstance(rr.lora_a, list) and len(rr.lora_a) == 1
    assert rr.page_table.shape == (n, r_max) and rr.ranks.tolist() == [r_max] * n
    check_packed(rr, a, b, [r_max] * n)
    out_a, out_b = rows_to_stacked(rr.lora_a[0], rr.lora_b[0], rr.page_table, rr.ranks)
    check_stacked(out_a, out_b, a, b, [r_max] * n, r_max)


def test_vllm_4d_form_matches_3d(gen):
    n, r_max, K, n_sizes = 9, 8, 16, [16, 4]
    a, b = make_stacked(gen, n, r_max, K, n_sizes, torch.bfloat16)
    ranks = mixed_ranks(gen, n, r_max).to(torch.int32)
    r3 = stacked_to_rows(a, b, ranks)
    r4 = stacked_to_rows([t.unsqueeze(1) for t in a], [t.unsqueeze(1) for t in b], ranks)
    assert torch.equal(r3.page_table, r4.page_table) and torch.equal(r3.ranks, r4.ranks)
    for x, y in zip(r3.lora_a + r3.lora_b, r4.lora_a + r4.lora_b):
        assert torch.equal(x, y)
    # mixed forms per tensor are fine too
    r_mix = stacked_to_rows([a[0].unsqueeze(1), a[1]], [b[0], b[1].unsqueeze(1)], ranks)
    assert all(torch.equal(x, y) for x, y in zip(r3.lora_b, r_mix.lora_b))


def test_non_contiguous_inputs(gen):
    n, r_max, K, N = 6, 8, 10, 12
    a_t = rand(gen, n, K, r_max).transpose(1, 2)  # [n, r_max, K], non-contiguous
    b_t = rand(gen, n, r_max, N).transpose(1, 2)  # [n, N, r_max], non-contiguous
    ranks = mixed_ranks(gen, n, r_max)
    rr = stacked_to_rows(a_t, b_t, ranks)
    assert all(t.is_contiguous() for t in rr.lora_a + rr.lora_b)
    check_packed(rr, [a_t], [b_t], ranks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_stacked_rows_on_interleaved_pool(gen, dtype):
    # make_lora: shuffled row ids, out-of-range ids beyond each rank, NaN spare rows
    pool = make_lora(20, 32, [48, 16, 24], "0-24", max_rank=24, dtype=dtype, generator=gen)
    assert (pool.page_table >= pool.lora_a[0].shape[0]).any()  # garbage entries really are there
    out_a, out_b = rows_to_stacked(pool.lora_a, pool.lora_b, pool.page_table, pool.ranks)
    for t in out_a + out_b:
        assert not t.isnan().any()  # spare (NaN) rows never copied
    rr = stacked_to_rows(out_a, out_b, pool.ranks)
    assert rr.num_rows == int(pool.ranks.sum())
    for s in range(pool.num_slots):
        for i in range(3):
            assert torch.equal(adapter_rows(rr.lora_a[i], rr.page_table, rr.ranks, s),
                               adapter_rows(pool.lora_a[i], pool.page_table, pool.ranks, s))
            assert torch.equal(adapter_rows(rr.lora_b[i], rr.page_table, rr.ranks, s),
                               adapter_rows(pool.lora_b[i], pool.page_table, pool.ranks, s))


def test_rows_to_stacked_own_interleaved_pool_with_garbage(gen):
    n, W, K, n_sizes = 30, 16, 12, [20, 7]
    ranks = mixed_ranks(gen, n, W).to(torch.int32)
    num_rows = int(ranks.sum()) + 11
    perm = torch.randperm(num_rows, generator=gen)
    # garbage beyond each rank: -1, huge ids, ids past the end of the pool
    pt = torch.randint(-(2**31), 2**31 - 1, (n, W), generator=gen, dtype=torch.int64).to(torch.int32)
    pt[::3] = -1
    off = 0
    for s, r in enumerate(ranks.tolist()):
        pt[s, :r] = perm[off:off + r].to(torch.int32)
        off += r
    lora_a = [rand(gen, num_rows, K) for _ in n_sizes]
    lora_b = [rand(gen, num_rows, N) for N in n_sizes]
    out_a, out_b = rows_to_stacked(lora_a, lora_b, pt, ranks)
    for s, r in enumerate(ranks.tolist()):
        rows = pt[s, :r].long()
        for i in range(len(n_sizes)):
            assert torch.equal(out_a[i][s, :r], lora_a[i][rows])
            assert torch.equal(out_b[i][s, :, :r], lora_b[i][rows].T)
            assert (out_a[i][s, r:] == 0).all() and (out_b[i][s, :, r:] == 0).all()
    # int64 page table and list ranks are accepted too
    out_a2, out_b2 = rows_to_stacked(lora_a, lora_b, pt.long(), ranks.tolist())
    assert all(torch.equal(x, y) for x, y in zip(out_a + out_b, out_a2 + out_b2))


def test_max_rank_larger_than_r_max(gen):
    n, r_max, K, n_sizes = 7, 8, 16, [10, 3]
    a, b = make_stacked(gen, n, r_max, K, n_sizes, torch.float16)
    ranks = mixed_ranks(gen, n, r_max)
    rr = stacked_to_rows(a, b, ranks, max_rank=20)
    assert rr.page_table.shape == (n, 20) and rr.max_rank == 20
    check_packed(rr, a, b, ranks)
    out_a, out_b = rows_to_stacked(rr.lora_a, rr.lora_b, rr.page_table, rr.ranks)
    check_stacked(out_a, out_b, a, b, ranks, 20)  # default: the page-table width
    out_a, out_b = rows_to_stacked(rr.lora_a, rr.lora_b, rr.page_table, rr.ranks, max_rank=33)
    check_stacked(out_a, out_b, a, b, ranks, 33)
    out_a, out_b = rows_to_stacked(rr.lora_a, rr.lora_b, rr.page_table, rr.ranks, max_rank=r_max)
    check_stacked(out_a, out_b, a, b, ranks, r_max)


def test_max_rank_below_r_max_but_above_ranks(gen):
    n, r_max, K = 6, 16, 8
    a, b = make_stacked(gen, n, r_max, K, [5])
    ranks = torch.randint(0, 5, (n,), generator=gen)
    rr = stacked_to_rows(a, b, ranks, max_rank=5, pad_value=123456)
    assert rr.page_table.shape == (n, 5)
    check_packed(rr, a, b, ranks, pad_value=123456)


def test_zero_adapters_and_all_rank_zero(gen):
    a, b = make_stacked(gen, 0, 4, 6, [3])
    rr = stacked_to_rows(a, b, [])
    assert rr.num_rows == 0 and rr.page_table.shape == (0, 4) and rr.lora_b[0].shape == (0, 3)
    out_a, out_b = rows_to_stacked(rr.lora_a, rr.lora_b, rr.page_table, rr.ranks)
    assert out_a[0].shape == (0, 4, 6) and out_b[0].shape == (0, 3, 4)

    a, b = make_stacked(gen, 5, 4, 6, [3])
    rr = stacked_to_rows(a, b, torch.zeros(5, dtype=torch.int32))
    assert rr.num_rows == 0 and (rr.page_table == -1).all()
    out_a, out_b = rows_to_stacked(rr.lora_a, rr.lora_b, rr.page_table, rr.ranks)
    assert (out_a[0] == 0).all() and (out_b[0] == 0).all() and out_a[0].shape == (5, 4, 6)


def test_many_adapters(gen):
    n, r_max, K, N = 10_000, 16, 8, 8
    a, b = make_stacked(gen, n, r_max, K, [N])
    ranks = torch.randint(0, r_max + 1, (n,), generator=gen)
    rr = stacked_to_rows(a, b, ranks)
    assert rr.num_rows == int(ranks.sum())
    out_a, out_b = rows_to_stacked(rr.lora_a, rr.lora_b, rr.page_table, rr.ranks)
    live = torch.arange(r_max)[None, :] < ranks[:, None]
    assert torch.equal(out_a[0][live], a[0][live]) and (out_a[0][~live] == 0).all()
    live_b = live[:, None, :].expand(n, N, r_max)
    assert torch.equal(out_b[0][live_b], b[0][live_b]) and (out_b[0][~live_b] == 0).all()


def test_semantics_match_stacked_math(gen):
    n, r_max, K, n_sizes, T = 11, 32, 64, [48, 20], 5
    a, b = make_stacked(gen, n, r_max, K, n_sizes)
    ranks = mixed_ranks(gen, n, r_max)
    ranks[3] = r_max
    rr = stacked_to_rows(a, b, ranks)
    # also through a shuffled pool: relocate every row, then read via the new page table
    perm = torch.randperm(rr.num_rows, generator=gen)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(rr.num_rows)
    pt = rr.page_table.clone()
    live = torch.arange(r_max)[None, :] < ranks[:, None]
    pt[live] = inv[pt[live].long()].to(torch.int32)
    shuffled_a = [t[perm] for t in rr.lora_a]
    shuffled_b = [t[perm] for t in rr.lora_b]
    # float64 math: the test is about which rows hold what, so rounding (different BLAS paths for the strided
    # stacked views and the gathered rows) must not be able to make it flaky
    x = rand(gen, T, K).double()
    for s in range(n):
        r = int(ranks[s])
        for i in range(len(n_sizes)):
            want = x @ a[i][s, :r].double().T @ b[i][s, :, :r].double().T
            for la, lb, p in ((rr.lora_a, rr.lora_b, rr.page_table), (shuffled_a, shuffled_b, pt)):
                rows = p[s, :r].long()
                got = x @ la[i][rows].double().T @ lb[i][rows].double()
                assert got.shape == (T, n_sizes[i])
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
                if r == 0:
                    assert (got == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device(gen):
    n, r_max, K, n_sizes = 64, 32, 40, [24, 8]
    a, b = make_stacked(gen, n, r_max, K, n_sizes, torch.bfloat16)
    ranks = mixed_ranks(gen, n, r_max)
    a_c, b_c = [t.cuda() for t in a], [t.cuda() for t in b]
    rr = stacked_to_rows(a_c, b_c, ranks)  # CPU ranks, CUDA weights
    assert all(t.is_cuda for t in rr.lora_a + rr.lora_b + [rr.page_table, rr.ranks])
    out_a, out_b = rows_to_stacked(rr.lora_a, rr.lora_b, rr.page_table, rr.ranks)
    check_stacked([t.cpu() for t in out_a], [t.cpu() for t in out_b], a, b, ranks, r_max)


# ------------------------------------------------------------------------------------------------ errors
def _stk(g, n=4, r_max=4, K=6, n_sizes=(5, 3), dtype=torch.float32):
    return make_stacked(g, n, r_max, K, list(n_sizes), dtype)


def _rows(g, num_rows=10, K=6, n_sizes=(5, 3), n=4, W=4):
    lora_a = [rand(g, num_rows, K) for _ in n_sizes]
    lora_b = [rand(g, num_rows, N) for N in n_sizes]
    ranks = torch.tensor([1, 2, 0, 1], dtype=torch.int32)
    perm = torch.randperm(num_rows, generator=g)
    pt = torch.full((n, W), num_rows + 5, dtype=torch.int32)  # out of range beyond each rank
    pt[0, :1], pt[1, :2], pt[3, :1] = perm[0:1], perm[1:3], perm[3:4]
    return lora_a, lora_b, pt, ranks


def _raises(exc, names, fn, *args, **kwargs):
    with pytest.raises(exc) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    assert any(msg.startswith(name + ":") for name in names), msg
    return msg


# stacked_to_rows: TypeError
def test_s2r_non_float_weights(gen):
    a, b = _stk(gen)
    _raises(TypeError, ["lora_a[1]"], stacked_to_rows, [a[0], a[1].to(torch.int32)], b)
    _raises(TypeError, ["lora_b"], stacked_to_rows, a[0], b[0].to(torch.int64))


def test_s2r_slices_of_different_dtypes(gen):
    a, b = _stk(gen)
    _raises(TypeError, ["lora_a[1]"], stacked_to_rows, [a[0], a[1].half()], b)
    _raises(TypeError, ["lora_b[0]"], stacked_to_rows, a, [b[0].bfloat16(), b[1]])


def test_s2r_non_integer_ranks(gen):
    a, b = _stk(gen)
    _raises(TypeError, ["ranks"], stacked_to_rows, a, b, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    _raises(TypeError, ["ranks"], stacked_to_rows, a, b, [1.5, 2, 3, 4])
    _raises(TypeError, ["ranks"], stacked_to_rows, a, b, torch.ones(4, dtype=torch.bool))


def test_s2r_bad_lists_and_options(gen):
    a, b = _stk(gen)
    _raises(TypeError, ["lora_a"], stacked_to_rows, [], b)
    _raises(TypeError, ["lora_b"], stacked_to_rows, a, "b")
    _raises(TypeError, ["max_rank"], stacked_to_rows, a, b, max_rank=4.0)
    _raises(TypeError, ["pad_value"], stacked_to_rows, a, b, pad_value=-1.0)
    _raises(ValueError, ["pad_value"], stacked_to_rows, a, b, pad_value=2**40)


# stacked_to_rows: ValueError
def test_s2r_a_b_disagree_on_n(gen):
    a, b = _stk(gen)
    _raises(ValueError, ["lora_b[1]"], stacked_to_rows, a, [b[0], b[1][:3]])
    _raises(ValueError, ["lora_a[1]"], stacked_to_rows, [a[0], a[1][:3]], b)


def test_s2r_a_b_disagree_on_r_max(gen):
    a, b = _stk(gen)
    _raises(ValueError, ["lora_b[0]"], stacked_to_rows, a, [b[0][:, :, :3], b[1]])
    _raises(ValueError, ["lora_a[1]"], stacked_to_rows, [a[0], a[1][:, :3]], b)


def test_s2r_slice_count_mismatch(gen):
    a, b = _stk(gen)
    _raises(ValueError, ["lora_b"], stacked_to_rows, a, b[:1])
    _raises(ValueError, ["lora_b"], stacked_to_rows, a[0], b)


def test_s2r_k_differs_between_slices(gen):
    a, b = _stk(gen)
    _raises(ValueError, ["lora_a[1]"], stacked_to_rows, [a[0], a[1][:, :, :5]], b)


def test_s2r_rank_above_r_max(gen):
    a, b = _stk(gen)
    msg = _raises(ValueError, ["ranks"], stacked_to_rows, a, b, [1, 5, 2, 0])
    assert "5" in msg and "r_max" in msg


def test_s2r_negative_rank(gen):
    a, b = _stk(gen)
    msg = _raises(ValueError, ["ranks"], stacked_to_rows, a, b, torch.tensor([1, 2, -1, 0]))
    assert "-1" in msg


def test_s2r_ranks_wrong_shape(gen):
    a, b = _stk(gen)
    _raises(ValueError, ["ranks"], stacked_to_rows, a, b, [1, 2, 3])
    _raises(ValueError, ["ranks"], stacked_to_rows, a, b, torch.ones(4, 1, dtype=torch.int32))


def test_s2r_max_rank_below_largest_rank(gen):
    a, b = _stk(gen)
    _raises(ValueError, ["max_rank"], stacked_to_rows, a, b, [1, 3, 2, 0], max_rank=2)
    _raises(ValueError, ["max_rank"], stacked_to_rows, a, b, max_rank=3)  # ranks=None: all r_max=4
    _raises(ValueError, ["max_rank"], stacked_to_rows, a, b, [0, 0, 0, 0], max_rank=-1)


def test_s2r_wrong_dims(gen):
    a, b = _stk(gen)
    _raises(ValueError, ["lora_a[0]"], stacked_to_rows, [a[0][0], a[1]], b)
    _raises(ValueError, ["lora_b[1]"], stacked_to_rows, a, [b[0], b[1].unsqueeze(1).expand(-1, 2, -1, -1)])
    _raises(ValueError, ["lora_a"], stacked_to_rows, a[0][None, None], b[0])


# rows_to_stacked: TypeError
def test_r2s_non_float_weights(gen):
    la, lb, pt, rk = _rows(gen)
    _raises(TypeError, ["lora_a[0]"], rows_to_stacked, [la[0].to(torch.int32), la[1]], lb, pt, rk)
    _raises(TypeError, ["lora_b[1]"], rows_to_stacked, la, [lb[0], lb[1].to(torch.int16)], pt, rk)


def test_r2s_slices_of_different_dtypes(gen):
    la, lb, pt, rk = _rows(gen)
    _raises(TypeError, ["lora_a[1]"], rows_to_stacked, [la[0], la[1].double()], lb, pt, rk)
    _raises(TypeError, ["lora_b[0]"], rows_to_stacked, la, [lb[0].half(), lb[1]], pt, rk)


def test_r2s_non_integer_page_table_and_ranks(gen):
    la, lb, pt, rk = _rows(gen)
    _raises(TypeError, ["page_table"], rows_to_stacked, la, lb, pt.float(), rk)
    _raises(TypeError, ["ranks"], rows_to_stacked, la, lb, pt, rk.float())
    _raises(TypeError, ["ranks"], rows_to_stacked, la, lb, pt, [1, 2.5, 0, 1])
    _raises(TypeError, ["max_rank"], rows_to_stacked, la, lb, pt, rk, max_rank="4")


# rows_to_stacked: ValueError
def test_r2s_num_rows_mismatch(gen):
    la, lb, pt, rk = _rows(gen)
    _raises(ValueError, ["lora_b[1]"], rows_to_stacked, la, [lb[0], lb[1][:9]], pt, rk)
    _raises(ValueError, ["lora_a[1]"], rows_to_stacked, [la[0], la[1][:9]], lb, pt, rk)


def test_r2s_k_differs_between_slices(gen):
    la, lb, pt, rk = _rows(gen)
    _raises(ValueError, ["lora_a[1]"], rows_to_stacked, [la[0], la[1][:, :5]], lb, pt, rk)


def test_r2s_slice_count_mismatch(gen):
    la, lb, pt, rk = _rows(gen)
    _raises(ValueError, ["lora_b"], rows_to_stacked, la, lb[:1], pt, rk)


def test_r2s_wrong_dims(gen):
    la, lb, pt, rk = _rows(gen)
    _raises(ValueError, ["lora_a[0]"], rows_to_stacked, [la[0][None], la[1]], lb, pt, rk)
    _raises(ValueError, ["page_table"], rows_to_stacked, la, lb, pt.flatten(), rk)
    _raises(ValueError, ["ranks"], rows_to_stacked, la, lb, pt, rk[:3])


def test_r2s_rank_above_page_table_width(gen):
    la, lb, pt, rk = _rows(gen)
    msg = _raises(ValueError, ["ranks"], rows_to_stacked, la, lb, pt[:, :2], torch.tensor([1, 3, 0, 1]))
    assert "3" in msg


def test_r2s_negative_rank(gen):
    la, lb, pt, rk = _rows(gen)
    _raises(ValueError, ["ranks"], rows_to_stacked, la, lb, pt, [1, -2, 0, 1])


def test_r2s_max_rank_below_largest_rank(gen):
    la, lb, pt, rk = _rows(gen)
    _raises(ValueError, ["max_rank"], rows_to_stacked, la, lb, pt, rk, max_rank=1)


def test_r2s_live_row_id_out_of_range(gen):
    la, lb, pt, rk = _rows(gen)
    for bad in (-1, 10, 2**31 - 1):
        p = pt.clone()
        p[1, 1] = bad  # slot 1 has rank 2: entry 1 is live
        msg = _raises(ValueError, ["page_table"], rows_to_stacked, la, lb, p, rk)
        assert "slot 1" in msg and str(bad) in msg
    p = pt.clone()
    p[1, 2:] = -1  # beyond rank: fine
    p[2, :] = 2**31 - 1  # rank 0: fine
    rows_to_stacked(la, lb, p, rk)


def test_module_docstring_picture(gen):
    """The pool drawn in lorakern.layout's docstring: ranks 2, 4, 1 interleaved in 7 rows."""
    K, N = 5, 3
    pt = torch.tensor([[3, 5, -1, -1], [0, 2, 6, 1], [4, -1, -1, -1]], dtype=torch.int32)
    ranks = torch.tensor([2, 4, 1], dtype=torch.int32)
    lora_a, lora_b = rand(gen, 7, K), rand(gen, 7, N)
    (A,), (B,) = rows_to_stacked(lora_a, lora_b, pt, ranks)
    for row, (s, j) in enumerate([(1, 0), (1, 3), (1, 1), (0, 0), (2, 0), (0, 1), (1, 2)]):
        assert torch.equal(A[s, j], lora_a[row]) and torch.equal(B[s, :, j], lora_b[row])
    assert int((A != 0).any(-1).sum()) == 7  # 12 stacked rows, 5 of them padding
