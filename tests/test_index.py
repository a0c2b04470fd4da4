"""BlockIndex against a brute-force model: writes, longest prefix, LRU/TTL bounds, pod slots."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from router.blocks import token_block_keys
from router.index import DEFAULT_TIER_WEIGHTS, BlockIndex, Tier

PODS = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000"]
pods = st.sampled_from(PODS)
tiers = st.sampled_from(list(Tier))
small_keys = st.lists(st.integers(0, 40), max_size=12)


def reference_longest_prefix(
    held: dict[str, dict[int, Tier]], keys: Sequence[int], weights: Sequence[float]
) -> dict[str, float]:
    """Per pod, the tier-weighted count of leading keys it holds without a gap."""
    out: dict[str, float] = {}
    for pod, blocks in held.items():
        total = 0.0
        for key in keys:
            tier = blocks.get(key)
            if tier is None:
                break
            total += weights[tier]
        if total:
            out[pod] = total
    return out


def assert_same_scores(got: dict[str, float], want: dict[str, float]) -> None:
    assert got.keys() == want.keys()
    for pod, score in want.items():
        assert got[pod] == pytest.approx(score)


# ------------------------------------------------------------------- model-based writes
class IndexVsModel(RuleBasedStateMachine):
    """Every write applied to a BlockIndex and to plain dicts; reads must agree."""

    def __init__(self) -> None:
        super().__init__()
        self.index = BlockIndex()
        self.held: dict[str, dict[int, Tier]] = {}
        self.engine: dict[str, dict[Hashable, int]] = {}

    @rule(pod=pods, keys=small_keys, tier=tiers)
    def add(self, pod: str, keys: list[int], tier: Tier) -> None:
        self.index.add_blocks(pod, keys, tier=tier)
        blocks = self.held.setdefault(pod, {})
        for key in keys:
            blocks[key] = tier
        self.engine.setdefault(pod, {})

    @rule(pod=pods, keys=st.lists(st.integers(0, 40), max_size=6, unique=True), tier=tiers)
    def add_with_engine_hashes(self, pod: str, keys: list[int], tier: Tier) -> None:
        hashes = [f"e{k}" for k in keys]
        self.index.add_blocks(pod, keys, engine_hashes=hashes, tier=tier)
        blocks = self.held.setdefault(pod, {})
        for key in keys:
            blocks[key] = tier
        self.engine.setdefault(pod, {}).update(zip(hashes, keys, strict=True))

    @rule(pod=pods, keys=small_keys)
    def remove_keys(self, pod: str, keys: list[int]) -> None:
        self.index.remove_keys(pod, keys)
        for key in keys:
            self.held.get(pod, {}).pop(key, None)

    @rule(pod=pods, hashes=st.lists(st.integers(0, 40).map(lambda k: f"e{k}"), max_size=6))
    def remove_engine_hashes(self, pod: str, hashes: list[str]) -> None:
        known = 0
        for h in hashes:
            key = self.engine.get(pod, {}).pop(h, None)
            if key is not None:
                self.held[pod].pop(key, None)
                known += 1
        assert self.index.remove_engine_hashes(pod, hashes) == known

    @rule(pod=pods)
    def clear_pod(self, pod: str) -> None:
        self.index.clear_pod(pod)
        if pod in self.held:
            self.held[pod] = {}
            self.engine[pod] = {}

    @rule(pod=pods)
    def drop_pod(self, pod: str) -> None:
        self.index.drop_pod(pod)
        self.held.pop(pod, None)
        self.engine.pop(pod, None)

    @precondition(lambda self: bool(self.held))
    @rule()
    def remove_everything(self) -> None:
        for pod, blocks in self.held.items():
            self.index.remove_keys(pod, list(blocks))
            blocks.clear()
        assert len(self.index) == 0 and self.index.entry_count() == 0

    @rule(query=small_keys)
    def longest_prefix_matches_reference(self, query: list[int]) -> None:
        want = reference_longest_prefix(self.held, query, DEFAULT_TIER_WEIGHTS)
        assert_same_scores(self.index.longest_prefix(query), want)

    @rule(pod=pods, hash_key=st.integers(0, 40))
    def engine_key_matches(self, pod: str, hash_key: int) -> None:
        want = self.engine.get(pod, {}).get(f"e{hash_key}")
        assert self.index.engine_key(pod, f"e{hash_key}") == want

    @invariant()
    def counts_agree(self) -> None:
        assert self.index.entry_count() == sum(len(b) for b in self.held.values())
        distinct = set().union(*self.held.values()) if self.held else set()
        assert len(self.index) == len(distinct)
        for pod in PODS:
            assert self.index.pod_block_count(pod) == len(self.held.get(pod, {}))
        assert sorted(self.index.pods()) == sorted(self.held)

    @invariant()
    def holders_agree(self) -> None:
        for key in range(41):
            want = sorted((pod, b[key]) for pod, b in self.held.items() if key in b)
            assert sorted(self.index.holders(key)) == want


TestIndexAgainstModel = IndexVsModel.TestCase
TestIndexAgainstModel.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


# -------------------------------------------------------- longest prefix on random fleets
@st.composite
def fleets(draw: st.DrawFn) -> tuple[BlockIndex, dict[str, dict[int, Tier]], list[list[int]]]:
    """Chains that share prefixes (a trie of token runs), held in pieces by random pods."""
    trunk = draw(st.lists(st.integers(0, 50), min_size=4, max_size=40))
    chains = []
    for _ in range(draw(st.integers(1, 4))):
        cut = draw(st.integers(0, len(trunk)))
        tail = draw(st.lists(st.integers(0, 50), max_size=30))
        chains.append(token_block_keys(trunk[:cut] + tail, 4))
    weights = draw(
        st.tuples(st.just(1.0), st.floats(0.1, 1.0), st.floats(0.1, 1.0)) | st.just((1, 0.8, 0.5))
    )
    index = BlockIndex(tier_weights=weights)
    held: dict[str, dict[int, Tier]] = {}
    for pod in draw(st.lists(pods, min_size=1, max_size=4, unique=True)):
        for chain in draw(st.lists(st.sampled_from(chains), max_size=3)):
            # A leading run of the chain (what an engine caches), sometimes with a hole.
            n = draw(st.integers(0, len(chain)))
            piece = chain[:n]
            if piece and draw(st.booleans()):
                del piece[draw(st.integers(0, len(piece) - 1))]
            tier = draw(tiers)
            index.add_blocks(pod, piece, tier=tier)
            blocks = held.setdefault(pod, {})
            for key in piece:
                blocks[key] = tier
    return index, held, chains


@settings(max_examples=120, deadline=None)
@given(fleet=fleets())
def test_longest_prefix_equals_brute_force_on_random_fleets(
    fleet: tuple[BlockIndex, dict[str, dict[int, Tier]], list[list[int]]],
) -> None:
    index, held, chains = fleet
    for chain in chains:
        want = reference_longest_prefix(held, chain, index.tier_weights)
        assert_same_scores(index.longest_prefix(chain), want)


def test_longest_prefix_stops_at_first_gap() -> None:
    index = BlockIndex()
    index.add_blocks("a", [1, 2, 4, 5])
    index.add_blocks("b", [1, 2, 3])
    assert index.longest_prefix([1, 2, 3, 4, 5]) == {"a": 2.0, "b": 3.0}


def test_longest_prefix_needs_the_first_block() -> None:
    index = BlockIndex()
    index.add_blocks("a", [2, 3, 4])
    assert index.longest_prefix([1, 2, 3, 4]) == {}
    assert index.longest_prefix([]) == {}


def test_longest_prefix_weights_lower_tiers() -> None:
    index = BlockIndex(tier_weights=(1.0, 0.5, 0.25))
    index.add_blocks("a", [1, 2])
    index.add_blocks("a", [3], tier=Tier.CPU)
    index.add_blocks("a", [4], tier=Tier.DISK)
    assert index.longest_prefix([1, 2, 3, 4]) == {"a": pytest.approx(2.75)}
    index.add_blocks("a", [3])  # promoted back to GPU
    assert index.longest_prefix([1, 2, 3, 4]) == {"a": pytest.approx(3.25)}


# ----------------------------------------------------------------------- LRU capacity, TTL
def test_capacity_evicts_a_chain_from_its_tail() -> None:
    index = BlockIndex(capacity_per_pod=3)
    index.add_blocks("a", [1, 2, 3], now=1.0)
    index.add_blocks("a", [4], now=2.0)
    assert sorted(index.holders(k)[0][1] for k in (1, 2, 4)) == [Tier.GPU] * 3
    assert index.holders(3) == []
    assert index.longest_prefix([1, 2, 3]) == {"a": 2.0}
    assert index.pod_block_count("a") == 3 and len(index) == 3


def test_touch_refreshes_a_block_so_eviction_skips_it() -> None:
    index = BlockIndex(capacity_per_pod=3)
    index.add_blocks("a", [1, 2, 3], now=1.0)
    index.touch("a", [3], now=2.0)
    index.add_blocks("a", [4], now=3.0)
    assert index.holders(3) == [("a", Tier.GPU)]
    assert index.holders(2) == []


def test_readding_a_block_refreshes_it() -> None:
    index = BlockIndex(capacity_per_pod=2)
    index.add_blocks("a", [1, 2])
    index.add_blocks("a", [1])
    index.add_blocks("a", [3])
    assert index.holders(1) and not index.holders(2)


def test_capacity_is_per_pod() -> None:
    index = BlockIndex(capacity_per_pod=2)
    index.add_blocks("a", [1, 2])
    index.add_blocks("b", [3, 4, 5])
    assert index.pod_block_count("a") == 2 and index.pod_block_count("b") == 2
    assert index.holders(5) == []


@settings(max_examples=80, deadline=None)
@given(
    capacity=st.integers(1, 6),
    writes=st.lists(st.tuples(st.booleans(), pods, small_keys), max_size=20),
)
def test_capacity_keeps_exactly_the_most_recent_blocks(
    capacity: int, writes: list[tuple[bool, str, list[int]]]
) -> None:
    index = BlockIndex(capacity_per_pod=capacity)
    lru: dict[str, OrderedDict[int, None]] = {}
    for t, (is_touch, pod, keys) in enumerate(writes):
        order = lru.setdefault(pod, OrderedDict()) if not is_touch else lru.get(pod)
        if is_touch:
            index.touch(pod, keys, now=float(t))
            for key in reversed(keys):
                if order is not None and key in order:
                    order.move_to_end(key)
            continue
        index.add_blocks(pod, keys, now=float(t))
        assert order is not None
        for key in reversed(keys):
            order[key] = None
            order.move_to_end(key)
        while len(order) > capacity:
            order.popitem(last=False)
    for pod, order in lru.items():
        assert index.pod_block_count(pod) == len(order) <= capacity
        for key in order:
            assert pod in {p for p, _ in index.holders(key)}


def test_expire_drops_blocks_idle_longer_than_the_ttl() -> None:
    index = BlockIndex(ttl_s=10.0)
    index.add_blocks("a", [1, 2], now=0.0)
    index.add_blocks("a", [3], now=5.0)
    index.add_blocks("b", [1], now=8.0)
    index.touch("a", [2], now=9.0)
    assert index.expire(now=12.0) == 1  # a's block 1 (idle since 0)
    assert index.longest_prefix([1, 2, 3]) == {"b": 1.0}
    assert index.holders(2) == [("a", Tier.GPU)]
    assert index.expire(now=16.0) == 1  # a's block 3 (idle since 5)
    assert index.expire(now=100.0) == 2
    assert len(index) == 0 and index.entry_count() == 0


def test_expire_without_ttl_keeps_everything() -> None:
    index = BlockIndex()
    index.add_blocks("a", [1], now=0.0)
    assert index.expire(now=1e9) == 0 and index.holders(1)


# ------------------------------------------------------------------------ pods and slots
def test_drop_pod_frees_its_slot_and_reuse_does_not_leak_old_bits() -> None:
    index = BlockIndex()
    index.add_blocks("a", [1, 2, 3], tier=Tier.CPU)
    index.add_blocks("b", [1])
    index.drop_pod("a")
    assert index.pods() == ["b"]
    index.add_blocks("c", [9])  # takes a's freed slot
    assert index._pods["c"].slot == 0
    assert index.longest_prefix([1, 2, 3]) == {"b": 1.0}
    assert index.holders(2) == [] and index.holders(1) == [("b", Tier.GPU)]
    assert index.longest_prefix([9]) == {"c": 1.0}
    assert index._lower_tier == {}


def test_clear_pod_keeps_the_pod_but_forgets_its_blocks_and_hashes() -> None:
    index = BlockIndex()
    index.add_blocks("a", [1, 2], engine_hashes=[101, 102])
    index.add_blocks("b", [1, 2])
    index.clear_pod("a")
    assert index.pods() == ["a", "b"]
    assert index.engine_key("a", 101) is None
    assert index.longest_prefix([1, 2]) == {"b": 2.0}
    assert index.entry_count() == 2


def test_remove_engine_hashes_drops_the_mapped_blocks() -> None:
    index = BlockIndex()
    index.add_blocks("a", [11, 12, 13], engine_hashes=["h1", "h2", "h3"])
    assert index.engine_key("a", "h2") == 12
    assert index.remove_engine_hashes("a", ["h3", "h2", "unknown"]) == 2
    assert index.longest_prefix([11, 12, 13]) == {"a": 1.0}
    assert index.engine_key("a", "h2") is None
    assert index.remove_engine_hashes("nobody", ["h1"]) == 0


def test_engine_hashes_of_another_length_are_refused_without_a_trace() -> None:
    index = BlockIndex()
    with pytest.raises(ValueError, match="differ in length"):
        index.add_blocks("a", [1, 2], engine_hashes=["h1"])
    assert len(index) == 0 and index.pods() == []


def test_operations_on_unknown_pods_are_no_ops() -> None:
    index = BlockIndex()
    index.touch("x", [1], now=1.0)
    index.remove_keys("x", [1])
    index.clear_pod("x")
    index.drop_pod("x")
    assert index.engine_key("x", 1) is None
    assert index.pods() == [] and index.pod_block_count("x") == 0


@pytest.mark.parametrize(
    ("medium", "tier"),
    [
        (None, Tier.GPU),
        ("GPU", Tier.GPU),
        ("cuda", Tier.GPU),
        ("CPU", Tier.CPU),
        ("cpu", Tier.CPU),
        ("DRAM", Tier.CPU),
        ("disk", Tier.DISK),
        ("NVME", Tier.DISK),
    ],
)
def test_tier_from_medium(medium: str | None, tier: Tier) -> None:
    assert Tier.from_medium(medium) is tier


# ------------------------------------------------------------------ pending entries
class PendingVsModel(RuleBasedStateMachine):
    """Confirmed writes, pending inserts, releases, expiry and confirmations against dicts.

    The model: `held` (confirmed, with tier) and, per pod, a refcount of pending keys; a key
    is never both confirmed and pending on one pod.
    """

    def __init__(self) -> None:
        super().__init__()
        self.index = BlockIndex()
        self.held: dict[str, dict[int, Tier]] = {}
        self.pend: dict[str, dict[int, int]] = {}
        self.entries: list[tuple[object, str, tuple[int, ...]]] = []
        self.now = 0.0

    def _unpend(self, pod: str, keys: Sequence[int]) -> None:
        refs = self.pend.get(pod, {})
        for key in keys:
            refs.pop(key, None)

    @rule(pod=pods, keys=small_keys, tier=tiers)
    def confirm(self, pod: str, keys: list[int], tier: Tier) -> None:
        self.index.add_blocks(pod, keys, tier=tier)
        self._unpend(pod, keys)
        blocks = self.held.setdefault(pod, {})
        for key in keys:
            blocks[key] = tier

    @rule(pod=pods, keys=small_keys, ttl=st.floats(0.5, 5.0))
    def add_pending(self, pod: str, keys: list[int], ttl: float) -> None:
        entry = self.index.add_pending(pod, keys, self.now + ttl)
        todo = tuple(k for k in keys if k not in self.held.get(pod, {}))
        if not todo:
            assert entry is None
            return
        assert entry is not None
        refs = self.pend.setdefault(pod, {})
        for key in todo:
            refs[key] = refs.get(key, 0) + 1
        self.entries.append((entry, pod, todo))

    def _release(self, i: int) -> None:
        _, pod, todo = self.entries.pop(i)
        refs = self.pend.get(pod, {})
        for key in todo:
            n = refs.get(key)
            if n is None:
                continue
            if n > 1:
                refs[key] = n - 1
            else:
                del refs[key]

    @precondition(lambda self: bool(self.entries))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.entries) - 1))
        self.index.release_pending(self.entries[i][0])  # type: ignore[arg-type]
        self._release(i)

    @precondition(lambda self: bool(self.entries))
    @rule(data=st.data(), shift=st.floats(-3.0, 3.0))
    def move_expiry(self, data: st.DataObject, shift: float) -> None:
        entry = self.entries[data.draw(st.integers(0, len(self.entries) - 1))][0]
        self.index.set_pending_expiry(entry, max(self.now, entry.expires_at + shift))  # type: ignore[attr-defined]

    @rule(dt=st.floats(0.0, 3.0))
    def advance(self, dt: float) -> None:
        self.now += dt
        due = [i for i, (e, _, _) in enumerate(self.entries) if e.expires_at <= self.now]  # type: ignore[attr-defined]
        assert self.index.expire_pending(self.now) == len(due)
        for i in reversed(due):
            self._release(i)

    @rule(pod=pods, keys=small_keys)
    def remove_keys(self, pod: str, keys: list[int]) -> None:
        self.index.remove_keys(pod, keys)
        for key in keys:
            self.held.get(pod, {}).pop(key, None)

    @rule(pod=pods)
    def drop_pod(self, pod: str) -> None:
        self.index.drop_pod(pod)
        self.held.pop(pod, None)
        self.pend.pop(pod, None)
        self.entries = [x for x in self.entries if x[1] != pod]

    @rule(query=small_keys)
    def longest_prefix_counts_pending_as_gpu(self, query: list[int]) -> None:
        union: dict[str, dict[int, Tier]] = {}
        for pod in set(self.held) | set(self.pend):
            blocks = dict(self.held.get(pod, {}))
            for key in self.pend.get(pod, {}):
                blocks.setdefault(key, Tier.GPU)
            union[pod] = blocks
        want = reference_longest_prefix(union, query, DEFAULT_TIER_WEIGHTS)
        assert_same_scores(self.index.longest_prefix(query), want)

    @invariant()
    def confirmed_counts_ignore_pending(self) -> None:
        for pod in PODS:
            assert self.index.pod_block_count(pod) == len(self.held.get(pod, {}))
            assert self.index.pending_count(pod) == len(self.pend.get(pod, {}))
        for key in range(41):
            want = sorted((pod, b[key]) for pod, b in self.held.items() if key in b)
            assert sorted(self.index.holders(key)) == want


TestPendingAgainstModel = PendingVsModel.TestCase
TestPendingAgainstModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_pending_prefix_is_matched_until_events_confirm_it() -> None:
    index = BlockIndex()
    chain = token_block_keys(list(range(64)), 16)
    entry = index.add_pending("a", chain, expires_at=10.0)
    assert entry is not None
    assert index.longest_prefix(chain) == {"a": 4.0}
    assert index.pod_block_count("a") == 0 and index.pending_count("a") == 4
    index.add_blocks("a", chain[:2])  # the engine stored the first two blocks
    assert index.pending_count("a") == 2 and index.pod_block_count("a") == 2
    assert index.longest_prefix(chain) == {"a": 4.0}
    index.release_pending(entry)  # the rest never came (the request failed)
    assert index.longest_prefix(chain) == {"a": 2.0}
    assert index.pending_count() == 0


def test_pending_entry_expires_and_a_shared_key_outlives_one_holder() -> None:
    index = BlockIndex()
    first = index.add_pending("a", [1, 2, 3], expires_at=5.0)
    second = index.add_pending("a", [1, 2], expires_at=20.0)
    assert first is not None and second is not None
    index.set_pending_expiry(first, 2.0)  # its prefill ran: events are due within the TTL
    assert index.expire_pending(1.9) == 0
    assert index.expire_pending(2.0) == 1
    assert index.longest_prefix([1, 2, 3]) == {"a": 2.0}  # 1 and 2 still pending for `second`
    index.set_pending_expiry(second, 30.0)  # extended: survives its first heap slot
    assert index.expire_pending(25.0) == 0
    assert index.expire_pending(30.0) == 1
    assert index.longest_prefix([1, 2, 3]) == {}


def test_pending_skips_confirmed_blocks_and_leaves_with_the_pod() -> None:
    index = BlockIndex()
    index.add_blocks("a", [1, 2])
    assert index.add_pending("a", [1, 2], expires_at=1.0) is None
    assert index.add_pending("b", [1, 2, 3], expires_at=1.0) is not None
    stale = index.add_pending("b", [7], expires_at=1.0)
    index.drop_pod("b")
    assert index.pending_count() == 0
    assert index.longest_prefix([1, 2, 3]) == {"a": 2.0}
    # The pod comes back under the same endpoint: an entry of its old life touches nothing.
    fresh = index.add_pending("b", [7], expires_at=9.0)
    assert stale is not None and fresh is not None
    assert index.release_pending(stale) is False
    assert index.expire_pending(1.0) == 0
    assert index.longest_prefix([7]) == {"b": 1.0}
