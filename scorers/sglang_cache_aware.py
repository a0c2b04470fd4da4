"""`sglang-cache-aware`: SGLang model gateway's (sgl-router) `cache_aware` policy, re-implemented.

A whole decision procedure, not a weighted score: the scorer gives the pod the procedure picks
1.0 and every other pod 0.0, so a profile of this scorer (weight 1) and `max-score-picker`
routes exactly as sglang-router would; the other pods follow as fallbacks in random order.
It learns only through the scheduler's hooks (`on_pick`), so the proxy, the ext_proc picker
and the simulator run it identically.

The procedure (sgl-router `src/policies/cache_aware.rs`, `src/policies/tree.rs`;
sgl-model-gateway `src/policies/cache_aware.rs`):

1. Load = the router's own requests in flight per pod (`Pod.inflight_requests`: +1 when the
   scheduler commits a pick, -1 when the response ends or fails), never scraped metrics.
2. Imbalanced when ``max_load - min_load > balance_abs_threshold`` AND
   ``max_load > balance_rel_threshold * min_load`` (both strict). Then the least-loaded pod;
   the request text is still inserted into the tree for it.
3. Otherwise match the request TEXT against one radix tree of characters shared by the pods
   of a (pool, model): ``match_rate = matched_chars / text_chars``. If
   ``match_rate > cache_threshold`` the pod holding the deepest matched node (the first
   tenant recorded there; no load tie-break), else the least-loaded pod. The full text is
   inserted for the chosen pod. A matched pod that is not a candidate (unhealthy, filtered
   out) sends the request to the first candidate without an insert, as sglang falls back to
   its first healthy worker; a matched pod that left the fleet is dropped from the tree.
4. Every `eviction_interval_secs` (0 = never), per pod, LRU leaves are dropped until the
   pod's character count is at most `max_tree_size`.

Request text is what sglang-router's `extract_text_for_routing` returns: completions = the
prompt (a list of prompts joined by spaces); chat = the message contents joined by spaces, no
chat template (text parts of a user message joined by spaces, an assistant message as
``content + " " + reasoning_content`` stripped, empty assistant messages skipped); token ids =
the ids in decimal joined by spaces (sglang's `/generate` with `input_ids`). The simulator's
requests carry only token ids, so there the tree holds ids as decimal text and
`max_tree_size` counts those characters (about 6 a token instead of about 4).

Parameters (the names and CLI defaults of sglang-router; `--cache-threshold` etc.):

- ``cache_threshold`` (0.3), ``balance_abs_threshold`` (64), ``balance_rel_threshold`` (1.5),
  ``eviction_interval_secs`` (60), ``max_tree_size`` (2**26 characters).
- ``tie_break`` (kvroute): among equally loaded pods, ``last`` (default: the last candidate
  in config order — what the sglang-router 0.3.2 binary does, measured: six unmatched chats
  sent one at a time to four idle workers all went to the fourth), ``first`` (Rust's
  `min_by_key`, as the readable sgl-router source of that lineage reads) or ``random`` (the
  newest sgl-model-gateway).
- ``low_match`` (kvroute): ``min-load`` (default; current releases) or ``smallest-tree`` (older
  releases: the pod with the fewest characters in the tree, `get_smallest_tenant`).

Where kvroute differs: the imbalance check sees the profile's candidates (healthy pods of the
model) where sglang also counts unhealthy workers' load; timestamps are the scheduler's clock
(virtual time in the simulator) instead of wall-clock milliseconds; eviction runs lazily at the
first request after each interval rather than on a background thread.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from router.pods import Pod
from router.request import RoutingRequest
from scorers.base import (
    DetailedScorer,
    LearningPlugin,
    ParameterError,
    PluginEnv,
    SchedulingContext,
    check_params,
)

if TYPE_CHECKING:
    from router.scheduler import Decision

TIE_BREAKS = ("last", "first", "random")
LOW_MATCH = ("min-load", "smallest-tree")


# ----------------------------------------------------------------------------- request text
def routing_text(req: RoutingRequest) -> str:
    """The text sglang-router routes on (see the module docstring)."""
    body = req.body
    if req.kind == "chat" and isinstance(body.get("messages"), list):
        return _chat_text(body["messages"])
    prompt = body.get("prompt") if body else None
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return " ".join(prompt)
    if req.prompt:
        return req.prompt
    if req.token_ids is not None:
        ids = req.token_ids
        return " ".join(map(str, ids.tolist() if hasattr(ids, "tolist") else ids))
    return ""


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
        return " ".join(texts)
    return None


def _chat_text(messages: list[Any]) -> str:
    parts: list[str] = []
    for msg in messages:
        if not isinstance(msg, dict):
            continue
        if msg.get("role") == "assistant":
            main = _content_text(msg.get("content")) or ""
            reasoning = msg.get("reasoning_content")
            reasoning = reasoning if isinstance(reasoning, str) else ""
            if main or reasoning:
                parts.append(f"{main} {reasoning}".strip())
            continue
        text = _content_text(msg.get("content"))
        if text is not None:
            parts.append(text)
    return " ".join(parts)


# ----------------------------------------------------------------------------- radix tree
@dataclass(eq=False, slots=True)
class _Node:
    text: str
    parent: _Node | None
    children: dict[str, _Node] = field(default_factory=dict)
    #: Tenant (pod endpoint) → last access time. Insertion order = the order tenants arrived.
    tenants: dict[str, float] = field(default_factory=dict)


def _shared_len(text: str, start: int, edge: str) -> int:
    """Length of the common prefix of text[start:] and edge (C-speed string compares)."""
    if text.startswith(edge, start):
        return len(edge)
    lo, hi = 0, min(len(edge), len(text) - start)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(edge[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


class CharRadixTree:
    """sgl-router's approximate tree: one character radix tree shared by several tenants.

    A tenant is recorded on every node of each text inserted for it; its size is the number
    of characters of the nodes it is recorded on.
    """

    def __init__(self) -> None:
        self.root = _Node("", None)
        self.tenant_chars: dict[str, int] = {}

    def insert(self, text: str, tenant: str, now: float) -> None:
        chars = self.tenant_chars
        chars.setdefault(tenant, 0)
        node = self.root
        node.tenants[tenant] = now
        i, n = 0, len(text)
        while i < n:
            child = node.children.get(text[i])
            if child is None:
                leaf = _Node(text[i:], node, tenants={tenant: now})
                node.children[text[i]] = leaf
                chars[tenant] += n - i
                return
            shared = _shared_len(text, i, child.text)
            if shared < len(child.text):
                # Split: node -> mid (shared part, same tenants) -> child (the rest).
                mid = _Node(child.text[:shared], node, tenants=dict(child.tenants))
                rest = child.text[shared:]
                child.text = rest
                child.parent = mid
                mid.children[rest[0]] = child
                node.children[text[i]] = mid
                child = mid
            if tenant not in child.tenants:
                chars[tenant] += len(child.text)
            child.tenants[tenant] = now
            i += shared
            node = child

    def prefix_match(self, text: str, now: float) -> tuple[int, str | None]:
        """(matched characters, the first tenant of the deepest matched node); refreshes that
        tenant's access time from the node up to the root, as sglang does."""
        node = self.root
        i, n = 0, len(text)
        while i < n:
            child = node.children.get(text[i])
            if child is None:
                break
            shared = _shared_len(text, i, child.text)
            i += shared
            node = child
            if shared < len(child.text):
                break
        tenant = next(iter(node.tenants), None)
        if tenant is not None:
            cur: _Node | None = node
            while cur is not None:
                cur.tenants[tenant] = now
                cur = cur.parent
        return i, tenant

    def smallest_tenant(self, among: Sequence[str]) -> str | None:
        best = None
        for t in among:
            c = self.tenant_chars.get(t, 0)
            if best is None or c < best[0]:
                best = (c, t)
        return best[1] if best else None

    def evict(self, max_size: int) -> None:
        """Per tenant over `max_size` characters, drop its least recently used leaves (a node
        where it is recorded and none of whose children records it) until it fits."""
        over = {t for t, c in self.tenant_chars.items() if c > max_size}
        if not over:
            return
        heap: list[tuple[float, int, str, _Node]] = []
        seq = 0
        stack = [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is self.root:
                continue
            for t, ts in node.tenants.items():
                if t in over and not any(t in c.tenants for c in node.children.values()):
                    heap.append((ts, seq, t, node))
                    seq += 1
        heapq.heapify(heap)
        chars = self.tenant_chars
        while heap:
            _, _, t, node = heapq.heappop(heap)
            if chars.get(t, 0) <= max_size or t not in node.tenants:
                continue
            del node.tenants[t]
            chars[t] -= len(node.text)
            parent = node.parent
            if not node.tenants and not node.children and parent is not None:
                del parent.children[node.text[0]]
            if (
                parent is not None
                and parent is not self.root
                and t in parent.tenants
                and not any(t in c.tenants for c in parent.children.values())
            ):
                heapq.heappush(heap, (parent.tenants[t], seq, t, parent))
                seq += 1

    def remove_tenant(self, tenant: str) -> None:
        """Forget `tenant` everywhere (the pod left the fleet); prune emptied nodes."""
        stack = [self.root]
        order: list[_Node] = []
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(node.children.values())
        for node in reversed(order):  # children before parents
            node.tenants.pop(tenant, None)
            parent = node.parent
            if parent is not None and not node.tenants and not node.children:
                del parent.children[node.text[0]]
        self.tenant_chars.pop(tenant, None)


# ----------------------------------------------------------------------------- the plugin
@dataclass(slots=True)
class _Pending:
    """What `score` decided for a request, applied at `on_pick` (dry runs change no tree)."""

    request: RoutingRequest
    text: str
    #: Tree key → whether the chosen pod gets the text inserted there.
    inserts: dict[tuple[str, str], bool]


@dataclass(frozen=True, slots=True)
class _Choice:
    index: int
    #: Whether the chosen pod gets the text inserted (not when falling back to the first
    #: candidate because the matched pod is not one).
    insert: bool
    match_rate: float = 0.0
    #: The tenant of the deepest matched node (None when nothing matched or imbalanced).
    tenant: str | None = None
    imbalanced: bool = False


class SglangCacheAwareScorer(DetailedScorer, LearningPlugin):
    _MAX_PENDING = 4096

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params(
            "sglang-cache-aware",
            params,
            {
                "cache_threshold": float,
                "balance_abs_threshold": int,
                "balance_rel_threshold": float,
                "eviction_interval_secs": float,
                "max_tree_size": int,
                "tie_break": str,
                "low_match": str,
            },
        )
        self.name = name
        self.registry = env.registry

        def get(key: str, default: Any) -> Any:
            v = params.get(key)
            return default if v is None else v

        self.cache_threshold = float(get("cache_threshold", 0.3))
        self.balance_abs_threshold = int(get("balance_abs_threshold", 64))
        self.balance_rel_threshold = float(get("balance_rel_threshold", 1.5))
        self.eviction_interval_secs = float(get("eviction_interval_secs", 60))
        self.max_tree_size = int(get("max_tree_size", 2**26))
        self.tie_break = get("tie_break", "last")
        self.low_match = get("low_match", "min-load")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ParameterError("sglang-cache-aware cache_threshold must be in [0, 1]")
        if self.eviction_interval_secs < 0 or self.max_tree_size < 0:
            raise ParameterError(
                "sglang-cache-aware eviction_interval_secs and max_tree_size must be >= 0"
            )
        if self.tie_break not in TIE_BREAKS:
            raise ParameterError(
                f"sglang-cache-aware tie_break must be one of {TIE_BREAKS}, got {self.tie_break!r}"
            )
        if self.low_match not in LOW_MATCH:
            raise ParameterError(
                f"sglang-cache-aware low_match must be one of {LOW_MATCH}, got {self.low_match!r}"
            )
        #: (pool role, model) → tree, as sgl-model-gateway keys trees by `pool::model`.
        self.trees: dict[tuple[str, str], CharRadixTree] = {}
        self._pending: dict[int, _Pending] = {}
        self._next_eviction: float | None = None
        env.registry.on_remove(self._drop_pod)

    # -- scoring ---------------------------------------------------------------------
    def score_details(
        self, ctx: SchedulingContext, pods: Sequence[Pod]
    ) -> tuple[list[float], list[dict[str, float]]]:
        """The scores and, per pod, its load and the branch taken (for `explain`)."""
        if not pods:
            return [], []
        self._maybe_evict(ctx.now)
        req = ctx.request
        key = (str(pods[0].role), req.model)
        tree = self.trees.get(key)
        if tree is None:
            tree = self.trees[key] = CharRadixTree()
        pending = self._pending.get(id(req))
        if pending is None or pending.request is not req:
            pending = _Pending(req, routing_text(req), {})
            if len(self._pending) >= self._MAX_PENDING:
                self._pending.clear()  # schedules never committed (dry runs)
            self._pending[id(req)] = pending
        choice = self.choose(ctx, pods, tree, pending.text)
        pending.inserts[key] = choice.insert
        out = [0.0] * len(pods)
        out[choice.index] = 1.0
        details = [
            {
                "inflight_requests": float(p.inflight_requests),
                "imbalanced": float(choice.imbalanced),
                "match_rate": choice.match_rate if p.endpoint == choice.tenant else 0.0,
            }
            for p in pods
        ]
        return out, details

    def choose(
        self, ctx: SchedulingContext, pods: Sequence[Pod], tree: CharRadixTree, text: str
    ) -> _Choice:
        """The procedure of the module docstring, for the candidates `pods`."""
        loads = [p.inflight_requests for p in pods]
        lo, hi = min(loads), max(loads)
        if hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold:
            return _Choice(self._least_loaded(ctx, loads), True, imbalanced=True)
        matched, tenant = tree.prefix_match(text, ctx.now) if text else (0, None)
        rate = matched / len(text) if text else 0.0
        if rate > self.cache_threshold:
            for i, p in enumerate(pods):
                if p.endpoint == tenant:
                    return _Choice(i, True, rate, tenant)
            if tenant is not None and tenant not in self.registry:
                tree.remove_tenant(tenant)
            return _Choice(0, False, rate, tenant)
        if self.low_match == "smallest-tree":
            smallest = tree.smallest_tenant([p.endpoint for p in pods])
            idx = next(i for i, p in enumerate(pods) if p.endpoint == smallest)
            return _Choice(idx, True, rate, tenant)
        return _Choice(self._least_loaded(ctx, loads), True, rate, tenant)

    def _least_loaded(self, ctx: SchedulingContext, loads: list[int]) -> int:
        lo = min(loads)
        ties = [i for i, v in enumerate(loads) if v == lo]
        if self.tie_break == "first" or len(ties) == 1:
            return ties[0]
        if self.tie_break == "last":
            return ties[-1]
        return ties[ctx.rng.randrange(len(ties))]

    # -- learning --------------------------------------------------------------------
    def on_pick(self, decision: Decision, now: float) -> None:
        req = decision.request
        pending = self._pending.pop(id(req), None)
        if pending is None or pending.request is not req:
            return
        for ep in {decision.target, decision.prefill} - {None}:
            pod = self.registry.get(ep)
            if pod is None:
                continue
            key = (str(pod.role), req.model)
            if not pending.inserts.get(key, True):
                continue
            tree = self.trees.get(key)
            if tree is None:
                tree = self.trees[key] = CharRadixTree()
            tree.insert(pending.text, ep, now)

    def _maybe_evict(self, now: float) -> None:
        if self.eviction_interval_secs <= 0:
            return
        if self._next_eviction is None:
            self._next_eviction = now + self.eviction_interval_secs
        elif now >= self._next_eviction:
            self.evict()
            self._next_eviction = now + self.eviction_interval_secs

    def evict(self) -> None:
        """One eviction cycle over every tree (what the interval timer runs)."""
        for tree in self.trees.values():
            tree.evict(self.max_tree_size)

    def _drop_pod(self, endpoint: str) -> None:
        for tree in self.trees.values():
            tree.remove_tenant(endpoint)
