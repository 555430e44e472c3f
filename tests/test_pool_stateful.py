"""Stateful property test of AdapterPool: random load / acquire / release / evict / reload / pin / unpin
sequences against a simple model (LRU order, ranks, pins, waves in flight, current weights of each adapter).

After every step: the pool's resident set and LRU order equal the model's; every resident adapter's rows are
bit-exact (its A and B where it has them, zeros for padding and missing targets) as seen through the ops' views;
no two adapters share a row; page-table tails and free slots are cleared; occupancy adds up. Every operation
the model says must fail raises a typed error and leaves the pool exactly as it was (bookkeeping and rows), and
every operation it says must succeed does."""

from collections import Counter, OrderedDict

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lorakern.pool import (AdapterError, AdapterInUseError, AdapterPool, AdapterStateError, HostCache,
                           PoolCapacityError, PoolError, PoolLayout, TargetSpec, TensorAdapter)

LAYOUT = PoolLayout(2, {"qkv": TargetSpec(6, (6, 2, 2)), "o": TargetSpec(6, (5,))},
                    moe_targets={"w13": TargetSpec(6, (3, 3), num_experts=2, layers=(1,))})
MAX_ROWS, MAX_SLOTS, MAX_RANK = 12, 4, 6
GOOD = [f"a{i}" for i in range(7)]
BAD = ["bad_rank", "bad_shape", "ghost"]  # rank above max_rank, wrong K, never registered
IDS = GOOD + BAD
VIEWS = [(layer, t, i) for layer in range(2) for t in LAYOUT.target_names if LAYOUT.has(layer, t)
         for i in range(LAYOUT.specs[t].num_slices)]


def weights(g, rank, targets):
    """(layer, target, slice) → (A, B); module ranks vary below the adapter's rank (zero-padded in the pool)."""
    out = {}
    for layer, t, i in VIEWS:
        if t not in targets:
            continue
        spec = LAYOUT.specs[t]
        r = rank if (layer + i) % 2 == 0 else max(1, rank - 1)
        n = spec.n_sizes[i]
        if spec.is_moe:
            out[(layer, t, i)] = (torch.randn(2, r, 6, generator=g), torch.randn(2, n, r, generator=g))
        else:
            out[(layer, t, i)] = (torch.randn(r, 6, generator=g), torch.randn(n, r, generator=g))
    return out


def expected_views(w, rank):
    """What each (layer, target, slice) view must hold in the adapter's ``rank`` rows, in VIEWS order."""
    exp = []
    for layer, t, i in VIEWS:
        spec = LAYOUT.specs[t]
        n = spec.n_sizes[i]
        if spec.is_moe:
            a, b = torch.zeros(rank, 2, 6), torch.zeros(rank, 2, n)
        else:
            a, b = torch.zeros(rank, 6), torch.zeros(rank, n)
        if (layer, t, i) in w:
            A, B = w[(layer, t, i)]
            r = A.shape[-2]
            if spec.is_moe:
                a[:r], b[:r] = A.permute(1, 0, 2), B.permute(2, 0, 1)
            else:
                a[:r], b[:r] = A, B.T
        exp.append((a, b))
    return exp


class PoolMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.g = torch.Generator().manual_seed(1234)
        self.version = Counter()
        rec_bytes = 3 * 4 * 64  # a few small records: the host cache evicts too
        self.pool = AdapterPool(LAYOUT, max_rows=MAX_ROWS, max_slots=MAX_SLOTS, max_rank=MAX_RANK,
                                dtype=torch.float32, host_cache=HostCache(rec_bytes * 40))
        self.rank, self.scale, self.exp = {}, {}, {}
        for k, a in enumerate(GOOD):
            self._set_weights(a, rank=1 + k % MAX_RANK)
        self.pool.register("bad_rank", TensorAdapter(weights(self.g, MAX_RANK + 1, {"o"})))
        bad = weights(self.g, 2, {"o"})
        bad[(0, "o", 0)] = (torch.randn(2, 7, generator=self.g), bad[(0, "o", 0)][1])
        self.pool.register("bad_shape", TensorAdapter(bad))
        # model
        self.lru = OrderedDict()  # id -> rank, least recently used first
        self.pins = Counter()
        self.flight = Counter()
        self.waves = []

    def _set_weights(self, a, rank, replace=False):
        k = self.version[a]
        self.version[a] += 1
        targets = {"qkv", "o", "w13"} if (int(a[1:]) + k) % 3 else {"qkv"}  # some adapters lack targets
        w = weights(self.g, rank, targets)
        self.rank[a], self.scale[a] = rank, 0.5 + 0.25 * (int(a[1:]) % 3)
        self.exp[a] = expected_views(w, rank)
        self.pool.register(a, TensorAdapter(w, scale=self.scale[a]), replace=replace)

    # ------------------------------------------------------------------ model helpers
    def _fits(self, uniq):
        if any(a not in GOOD for a in uniq if a not in self.lru):
            return False, None
        if len(uniq) > MAX_SLOTS:
            return False, None
        missing = [a for a in uniq if a not in self.lru]
        need_rows = sum(self.rank[a] for a in missing)
        free_rows = MAX_ROWS - sum(self.lru.values())
        free_slots = MAX_SLOTS - len(self.lru)
        victims = []
        for a, r in self.lru.items():
            if free_rows >= need_rows and free_slots >= len(missing):
                break
            if self.pins[a] or self.flight[a] or a in uniq:
                continue
            victims.append(a)
            free_rows += r
            free_slots += 1
        if free_rows < need_rows or free_slots < len(missing):
            return False, None
        return True, (victims, missing)

    def _commit(self, uniq, plan):
        victims, missing = plan
        for a in victims:
            del self.lru[a]
        for a in missing:
            self.lru[a] = self.rank[a]
        for a in uniq:
            self.lru.move_to_end(a)

    def _snap(self):
        return self.pool._state(), self.pool.rows.clone()

    def _unchanged(self, snap):
        state, rows = snap
        assert self.pool._state() == state
        assert torch.equal(self.pool.rows, rows)

    def _admit(self, ids, call):
        uniq = list(dict.fromkeys(a for a in ids if a is not None))
        ok, plan = self._fits(uniq)
        snap = self._snap()
        if ok:
            result = call(ids)
            self._commit(uniq, plan)
            return True, uniq, result
        with pytest.raises(PoolError) as ei:
            call(ids)
        assert isinstance(ei.value, (PoolCapacityError, AdapterError))
        if isinstance(ei.value, AdapterError):
            assert ei.value.adapter_id in BAD
        self._unchanged(snap)
        return False, uniq, None

    # ------------------------------------------------------------------ rules
    @rule(ids=st.lists(st.sampled_from(IDS + [None]), max_size=6))
    def acquire(self, ids):
        ok, uniq, slots = self._admit(ids, self.pool.acquire)
        if ok:
            for a in uniq:
                self.flight[a] += 1
            self.waves.append(uniq)
            assert slots.tolist() == [-1 if a is None else self.pool.slot_of(a) for a in ids]

    @rule(ids=st.lists(st.sampled_from(GOOD + BAD), min_size=1, max_size=4))
    def load(self, ids):
        self._admit(ids, self.pool.load)

    @precondition(lambda self: self.waves)
    @rule(data=st.data())
    def release(self, data):
        i = data.draw(st.integers(0, len(self.waves) - 1))
        uniq = self.waves.pop(i)
        self.pool.release(uniq)
        for a in uniq:
            self.flight[a] -= 1

    @rule(a=st.sampled_from(GOOD))
    def release_not_in_flight(self, a):
        if self.flight[a]:
            return
        snap = self._snap()
        with pytest.raises(AdapterStateError):
            self.pool.release([a])
        self._unchanged(snap)

    @rule(a=st.sampled_from(IDS))
    def pin(self, a):
        ok, _, _ = self._admit([a], lambda ids: self.pool.pin(ids[0]))
        if ok:
            self.pins[a] += 1

    @rule(a=st.sampled_from(GOOD))
    def unpin(self, a):
        if self.pins[a]:
            self.pool.unpin(a)
            self.pins[a] -= 1
        else:
            snap = self._snap()
            with pytest.raises(AdapterStateError):
                self.pool.unpin(a)
            self._unchanged(snap)

    @rule(a=st.sampled_from(GOOD))
    def evict(self, a):
        if a not in self.lru:
            assert self.pool.evict(a) is False
        elif self.pins[a] or self.flight[a]:
            snap = self._snap()
            with pytest.raises(AdapterInUseError):
                self.pool.evict(a)
            self._unchanged(snap)
        else:
            assert self.pool.evict(a) is True
            del self.lru[a]

    @rule(a=st.sampled_from(GOOD), rank=st.integers(1, MAX_RANK))
    def reload_new_weights(self, a, rank):
        if a in self.lru and (self.pins[a] or self.flight[a]):
            snap = self._snap()
            with pytest.raises(AdapterInUseError):
                self.pool.register(a, TensorAdapter({}), replace=True)
            self._unchanged(snap)
            return
        self._set_weights(a, rank, replace=True)
        self.lru.pop(a, None)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def pool_matches_model(self):
        pool = self.pool
        assert pool.resident_ids() == list(self.lru)
        pt, rk, sc = pool.page_table.tolist(), pool.ranks.tolist(), pool.scales.tolist()
        used_rows, used_slots = set(), set()
        for a, r in self.lru.items():
            slot = pool.slot_of(a)
            assert slot not in used_slots
            used_slots.add(slot)
            assert rk[slot] == r == self.rank[a] and sc[slot] == self.scale[a]
            rows = pt[slot][:r]
            assert all(0 <= x < MAX_ROWS for x in rows) and all(x == -1 for x in pt[slot][r:])
            assert not used_rows & set(rows), f"{a} shares a row with another adapter"
            used_rows |= set(rows)
            assert sorted(rows) == sorted(pool.rows_of(a).tolist())
            idx = torch.tensor(rows)
            for (layer, t, i), (ea, eb) in zip(VIEWS, self.exp[a]):
                assert torch.equal(pool.lora_a(layer, t)[i][idx], ea), (a, layer, t, i, "A")
                assert torch.equal(pool.lora_b(layer, t)[i][idx], eb), (a, layer, t, i, "B")
            assert pool.is_pinned(a) == bool(self.pins[a]) and pool.in_flight(a) == self.flight[a]
        for s in set(range(MAX_SLOTS)) - used_slots:
            assert rk[s] == 0 and sc[s] == 0.0 and all(x == -1 for x in pt[s])
        stats = pool.stats()
        assert stats.rows_used == len(used_rows) == sum(self.lru.values())
        assert stats.slots_used == len(self.lru)
        assert all(a in self.lru for a in self.pins if self.pins[a])
        assert all(a in self.lru for a in self.flight if self.flight[a])


TestPoolStateful = PoolMachine.TestCase
TestPoolStateful.settings = settings(max_examples=100, stateful_step_count=40, deadline=None, database=None,
                                     suppress_health_check=[HealthCheck.too_slow])
