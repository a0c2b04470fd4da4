"""`sglang-cache-aware`: sglang-router's cache_aware rules, through a real Scheduler."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.request import RoutingRequest, parse_request
from router.scheduler import Scheduler
from scorers.base import ParameterError
from scorers.sglang_cache_aware import CharRadixTree, SglangCacheAwareScorer, routing_text
from tests.scorers.conftest import ENDPOINTS, scheduler_with

A, B, C = ENDPOINTS


def plugin(sched: Scheduler) -> SglangCacheAwareScorer:
    p = sched.plugins["sglang-cache-aware"]
    assert isinstance(p, SglangCacheAwareScorer)
    return p


def text_req(text: str) -> RoutingRequest:
    return RoutingRequest(model="m", prompt=text, body={"model": "m", "prompt": text})


def route(sched: Scheduler, text: str, now: float = 0.0) -> str:
    d = sched.schedule(text_req(text), now=now)
    sched.on_pick(d, now)
    return d.target


def set_loads(sched: Scheduler, **loads: int) -> None:
    for ep, name in zip(ENDPOINTS, "abc", strict=True):
        sched.registry[ep].inflight_requests = loads.get(name, 0)


def test_defaults_are_sglang_router_cli_defaults() -> None:
    p = plugin(scheduler_with("sglang-cache-aware"))
    assert (p.cache_threshold, p.balance_abs_threshold, p.balance_rel_threshold) == (0.3, 64, 1.5)
    assert (p.eviction_interval_secs, p.max_tree_size) == (60.0, 2**26)
    assert (p.tie_break, p.low_match) == ("last", "min-load")


def test_imbalanced_fleet_goes_least_loaded_and_still_inserts_the_text() -> None:
    sched = scheduler_with("sglang-cache-aware", {"tie_break": "first"})
    text = "hello world, a long shared system prompt"
    assert route(sched, text) == A  # all idle: the first candidate
    # 70 in flight vs 0 is imbalanced (70 - 0 > 64 and 70 > 1.5 * 0).
    set_loads(sched, a=70, b=3, c=0)
    assert route(sched, text) == C  # least loaded, despite the full match on a
    tree = plugin(sched).trees[("both", "m")]
    # The imbalanced branch inserted the full text for the pod it chose.
    assert tree.root.children["h"].tenants.keys() == {A, C}
    assert tree.tenant_chars[C] == len(text)


@pytest.mark.parametrize(
    ("hi", "lo", "imbalanced"),
    [
        (65, 1, False),  # difference 64 is not > 64
        (100, 40, False),  # difference 60
        (200, 134, False),  # 200 is not > 1.5 * 134 = 201
        (200, 133, True),  # 200 > 199.5 and 67 > 64
        (66, 1, True),
    ],
)
def test_imbalance_needs_both_strict_thresholds(hi: int, lo: int, imbalanced: bool) -> None:
    sched = scheduler_with("sglang-cache-aware", pods=ENDPOINTS[:2])
    route(sched, "the shared prefix of every request in this test")  # cold: least loaded (a)
    owner = plugin(sched).trees[("both", "m")].prefix_match("the shared", 0.0)[1]
    other = B if owner == A else A
    sched.registry[owner].inflight_requests = hi
    sched.registry[other].inflight_requests = lo
    target = route(sched, "the shared prefix of every request in this test, again")
    assert target == (other if imbalanced else owner)


def test_match_above_threshold_follows_the_tree_without_a_load_tie_break() -> None:
    sched = scheduler_with("sglang-cache-aware", {"tie_break": "first"})
    assert route(sched, "abcdefghij") == A  # all idle: the first candidate
    set_loads(sched, a=30, b=0, c=0)  # busier, but balanced (30 - 0 <= 64)
    assert route(sched, "abcdefghijKLMN") == A  # 10 / 14 matched > 0.3


def test_match_at_threshold_is_a_miss_and_goes_least_loaded() -> None:
    sched = scheduler_with("sglang-cache-aware", {"tie_break": "first"})
    assert route(sched, "abc") == A
    set_loads(sched, a=1, b=0, c=0)
    # "abc" of "abcdefghij": 3 / 10 = 0.3, not > 0.3.
    assert route(sched, "abcdefghij") == B
    # 4 / 10 > 0.3 ("abcd" now matches on b, the last text inserted with that prefix).
    set_loads(sched, a=0, b=5, c=0)
    tree = plugin(sched).trees[("both", "m")]
    assert tree.prefix_match("abcdXXXXXX", 0.0)[0] == 4


def test_default_tie_break_takes_the_last_idle_pod_like_the_binary() -> None:
    sched = scheduler_with("sglang-cache-aware")
    last = sched.registry.all()[-1].endpoint
    assert route(sched, "a cold prompt nobody sent before") == last


def test_random_tie_break_spreads_cold_requests_over_idle_pods() -> None:
    sched = scheduler_with("sglang-cache-aware", {"tie_break": "random"})
    targets = set()
    for i in range(40):
        d = sched.schedule(text_req(f"{i:03d} cold prompt"), now=0.0)  # no pick: loads stay 0
        targets.add(d.target)
    assert targets == set(ENDPOINTS)


def test_smallest_tree_variant_picks_the_pod_with_fewest_characters() -> None:
    sched = scheduler_with(
        "sglang-cache-aware", {"low_match": "smallest-tree", "tie_break": "first"}
    )
    assert route(sched, "x" * 50) == A
    assert route(sched, "y" * 30) == B
    assert route(sched, "z" * 10) == C
    assert route(sched, "w" * 10) == C  # c holds 10 characters, the fewest


def test_unknown_matched_pod_falls_back_to_first_candidate_without_insert() -> None:
    sched = scheduler_with("sglang-cache-aware", {"tie_break": "first"})
    tree = plugin(sched).trees.setdefault(("both", "m"), CharRadixTree())
    tree.insert("gone pod's long prefix", "10.9.9.9:8000", 0.0)
    assert route(sched, "gone pod's long prefix and more") == A
    assert "10.9.9.9:8000" not in tree.tenant_chars  # left the fleet: dropped from the tree
    assert A not in tree.tenant_chars  # the fallback does not insert


def test_removed_pod_leaves_the_tree() -> None:
    sched = scheduler_with("sglang-cache-aware", {"tie_break": "first"})
    route(sched, "abcdefgh")
    sched.registry.remove(A)
    tree = plugin(sched).trees[("both", "m")]
    assert tree.prefix_match("abcdefgh", 0.0) == (0, None)
    assert not tree.root.children


def test_eviction_drops_least_recently_used_leaves_per_pod_by_characters() -> None:
    tree = CharRadixTree()
    tree.insert("aaaa1111", "p", 0.0)
    tree.insert("aaaa2222", "p", 1.0)
    tree.insert("aaaa3333", "q", 0.5)
    assert tree.tenant_chars == {"p": 12, "q": 8}
    tree.evict(10)
    # p's oldest leaf ("1111", t=0) goes; its shared "aaaa" node stays; q (8 <= 10) untouched.
    assert tree.tenant_chars == {"p": 8, "q": 8}
    assert tree.prefix_match("aaaa1111", 5.0)[0] == 4
    assert tree.prefix_match("aaaa2222", 5.0) == (8, "p")
    assert tree.prefix_match("aaaa3333", 5.0) == (8, "q")
    tree.evict(3)
    assert tree.tenant_chars == {"p": 0, "q": 0}
    assert not tree.root.children


def test_eviction_walks_up_to_parents_that_become_leaves() -> None:
    tree = CharRadixTree()
    tree.insert("abcdef", "p", 0.0)
    tree.insert("abcxyz", "p", 1.0)  # splits "abc" | "def", "xyz"
    tree.evict(0)
    assert tree.tenant_chars["p"] == 0
    assert not tree.root.children


def test_scheduler_runs_eviction_every_interval() -> None:
    now = [0.0]
    sched = scheduler_with(
        "sglang-cache-aware",
        {"eviction_interval_secs": 60, "max_tree_size": 5, "tie_break": "first"},
        clock=lambda: now[0],
    )
    route(sched, "abcdefghij", now=0.0)
    tree = plugin(sched).trees[("both", "m")]
    assert tree.tenant_chars[A] == 10
    route(sched, "zzz", now=59.0)  # before the interval: nothing evicted
    assert tree.tenant_chars[A] == 10
    route(sched, "zzz", now=61.0)
    assert tree.tenant_chars[A] <= 5


def test_chat_text_is_message_contents_joined_by_spaces() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look at"},
                    {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    {"type": "text", "text": "this."},
                ],
            },
            {"role": "assistant", "content": "A cat.", "reasoning_content": "It is furry."},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "Sure?"},
        ],
    }
    req = parse_request(body, "/v1/chat/completions")
    assert routing_text(req) == "You are terse. Look at this. A cat. It is furry. Sure?"


def test_completion_text_joins_prompt_lists_and_token_ids() -> None:
    req = parse_request({"model": "m", "prompt": ["one", "two"]}, "/v1/completions")
    assert routing_text(req) == "one two"
    req = parse_request({"model": "m", "prompt": [11, 22, 33]}, "/v1/completions")
    assert routing_text(req) == "11 22 33"


def test_conversation_turns_stick_to_one_pod_through_the_hooks() -> None:
    # Random ties: only the tree keeps the turns together on an idle fleet.
    sched = scheduler_with("sglang-cache-aware", {"tie_break": "random"})
    msgs = [{"role": "system", "content": "Long system prompt " * 10}]
    targets = []
    for turn in range(5):
        msgs = [*msgs, {"role": "user", "content": f"question {turn}"}]
        req = parse_request({"model": "m", "messages": msgs}, "/v1/chat/completions")
        d = sched.schedule(req, now=float(turn))
        sched.on_pick(d, float(turn))
        targets.append(d.target)
        assert sched.registry[d.target].inflight_requests == 1
        sched.on_complete(d, None, float(turn) + 0.5)
        msgs = [*msgs, {"role": "assistant", "content": f"answer {turn}"}]
    assert len(set(targets)) == 1


def test_bad_parameters_are_errors_naming_them() -> None:
    with pytest.raises(ParameterError, match="cache_threshold"):
        scheduler_with("sglang-cache-aware", {"cache_threshold": 2.0})
    with pytest.raises(ParameterError, match="tie_break"):
        scheduler_with("sglang-cache-aware", {"tie_break": "sideways"})
    with pytest.raises(ParameterError, match="known"):
        scheduler_with("sglang-cache-aware", {"cache-threshold": 0.5})


def _nodes(tree: CharRadixTree) -> list:
    out, stack = [], [tree.root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


def _check_invariants(tree: CharRadixTree) -> None:
    for t, chars in tree.tenant_chars.items():
        assert chars == sum(len(n.text) for n in _nodes(tree) if t in n.tenants and n.parent)
    for node in _nodes(tree):
        if node.parent is not None:
            assert node.text and node.parent.children[node.text[0]] is node
            # A tenant recorded on a node is recorded on the whole path above it.
            assert node.tenants.keys() <= node.parent.tenants.keys()
            assert node.tenants or node.children  # no empty leaves are kept


_texts = st.lists(
    st.tuples(st.sampled_from("pq"), st.text(alphabet="ab", min_size=1, max_size=12)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(inserts=_texts, query=st.text(alphabet="ab", max_size=14), limit=st.integers(0, 30))
def test_tree_matches_the_longest_inserted_prefix_and_evicts_to_the_limit(
    inserts: list[tuple[str, str]], query: str, limit: int
) -> None:
    tree = CharRadixTree()
    for i, (tenant, text) in enumerate(inserts):
        tree.insert(text, tenant, float(i))
    _check_invariants(tree)

    def common(a: str, b: str) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    matched, tenant = tree.prefix_match(query, 100.0)
    assert matched == max(common(query, text) for _, text in inserts)
    if matched:
        # The tenant returned holds the whole matched prefix.
        assert any(t == tenant and common(query, s) >= matched for t, s in inserts)
    tree.evict(limit)
    _check_invariants(tree)
    assert all(c <= limit for c in tree.tenant_chars.values())
