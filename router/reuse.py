"""Prefix reuse, decomposed: tokens *available*, *captured* by routing, *delivered* by engines.

Per model and pod, counted in prompt tokens:

- prompt: the prompts routed (the pod that prefills: the prefill pod in P/D, else the target);
- available: the longest cached prefix any pod held at decision time (the best pod's match in
  the scheduler's default index) — what routing *could* have reused;
- captured: the cached prefix of the pod routing chose — what routing *did* reuse;
- delivered: what the engine says it served from its cache.

The gaps name the culprit: routing (available − captured: a better pod existed) and the
engine (captured − delivered: blocks evicted between the decision and the prefill, or an index
that was wrong).

Delivered has two sources, never both for the same pod at once. The rule, per pod: until one
of its responses carries `usage.prompt_tokens_details.cached_tokens`, delivered comes from the
scrapes (vLLM's default: the details are off unless the engine runs with
`--enable-prompt-tokens-details`); from that response on, the responses alone (a response
without details then counts 0: vLLM leaves them out when nothing was cached) and the scrapes
are ignored. The switching response adds only what the scrapes have not already counted since
the pod's last pick, so one request is never counted twice (concurrent requests on that pod
make the figure approximate by at most their own hits).

Every figure is in the router's prompt tokens, so the rates and gaps compare like with like:
the engine counts in its own tokens, which differ from the router's in character mode (an
estimate) and by the chat template. A response's `cached_tokens` is scaled by the request's
router prompt tokens over the response's `prompt_tokens`. A scrape gives the engine's hit
fraction over the interval (growth of `vllm:prefix_cache_hits_total` over that of
`vllm:prefix_cache_queries_total`), applied to the prompt tokens the router sent the pod since
the last scrape that saw the engine take new prompts (a prompt routed just before a scrape is
often scheduled after it). Scraped hits are the engine's: they include requests other routers
sent to the pod, which only makes the fraction theirs too.

Plain Python and dict additions on the request path; `ReuseCollector` turns the counts into
Prometheus families when Prometheus scrapes, and `report()` is the `/debug/reuse` JSON.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

#: The order of `ReuseCounts` figures in reports.
_FIGURES = ("prompt", "available", "captured", "delivered")


@dataclass(slots=True)
class ReuseCounts:
    """Token totals of one (model, pod)."""

    prompt: int = 0
    #: The best pod's match for the requests this pod got (per pod: the routing gap there).
    available: int = 0
    captured: int = 0
    delivered: int = 0
    requests: int = 0


@dataclass(slots=True)
class _EngineHits:
    """Per pod: the last scraped counters, prompts not yet matched by them, and the source."""

    hits: float | None = None
    queries: float | None = None
    #: True once a response of the pod carried `cached_tokens`: scrapes no longer count.
    from_responses: bool = False
    #: Model → router prompt tokens sent since the engine last took new prompts.
    unscraped: dict[str, int] = field(default_factory=dict)
    #: Delivered from scrapes since the pod was last picked (what the switching response has).
    since_pick: int = 0


class ReuseLedger:
    """The counts of one face, per (model, pod)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], ReuseCounts] = {}
        self._hits: dict[str, _EngineHits] = {}

    # ------------------------------------------------------------------ updates
    def on_decision(
        self, model: str, pod: str, prompt_tokens: int, available: int, captured: int
    ) -> None:
        """A request routed: `pod` prefills it (the prefill pod, else the target)."""
        c = self._counts.get((model, pod))
        if c is None:
            c = self._counts[(model, pod)] = ReuseCounts()
        c.requests += 1
        c.prompt += prompt_tokens
        c.available += available
        c.captured += captured
        h = self._engine(pod)
        h.since_pick = 0
        if not h.from_responses:
            h.unscraped[model] = h.unscraped.get(model, 0) + prompt_tokens

    def on_usage(
        self, model: str, pod: str, usage: dict[str, Any] | None, prompt_tokens: int
    ) -> None:
        """A response of `pod` ended; `usage` as the response carried it (or None);
        `prompt_tokens`: the request's, as the router counted them."""
        if not usage:
            return
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if not isinstance(cached, int) or isinstance(cached, bool):
            cached = None
        h = self._engine(pod)
        if not h.from_responses:
            if cached is None:
                return
            h.from_responses = True
            h.unscraped.clear()
            already = h.since_pick  # the part the scrapes already counted
        else:
            already = 0
        if cached is None or cached <= 0:
            return
        engine_prompt = usage.get("prompt_tokens")
        if isinstance(engine_prompt, int) and engine_prompt > 0 and prompt_tokens > 0:
            cached = round(cached * prompt_tokens / engine_prompt)
        if prompt_tokens > 0:
            cached = min(cached, prompt_tokens)
        if cached - already > 0:
            self._add_delivered(model, pod, cached - already)

    def on_engine_counters(self, pod: str, hits: float | None, queries: float | None) -> None:
        """A scrape of `pod` read `vllm:prefix_cache_hits_total` and `_queries_total` (None
        when the page lacks one). The first reading is the baseline; a smaller one is a
        restarted engine (counting from zero)."""
        if hits is None or queries is None:
            return
        h = self._engine(pod)
        last_h, last_q = h.hits, h.queries
        h.hits, h.queries = hits, queries
        if last_h is None or last_q is None or h.from_responses:
            return
        restarted = hits < last_h or queries < last_q
        grown_h = hits if restarted else hits - last_h
        grown_q = queries if restarted else queries - last_q
        if grown_q <= 0:
            return  # the engine took no new prompt: what we sent is still to come
        fraction = min(1.0, max(0.0, grown_h / grown_q))
        for model, tokens in h.unscraped.items():
            delivered = round(fraction * tokens)
            if delivered > 0:
                self._add_delivered(model, pod, delivered)
                h.since_pick += delivered
        h.unscraped.clear()

    def forget_pod(self, pod: str) -> None:
        """The pod left the fleet: drop its scrape baseline (its totals stay counted)."""
        self._hits.pop(pod, None)

    def _engine(self, pod: str) -> _EngineHits:
        h = self._hits.get(pod)
        if h is None:
            h = self._hits[pod] = _EngineHits()
        return h

    def _add_delivered(self, model: str, pod: str, tokens: int) -> None:
        c = self._counts.get((model, pod))
        if c is None:
            c = self._counts[(model, pod)] = ReuseCounts()
        c.delivered += tokens

    # ------------------------------------------------------------------ reads
    def counts(self) -> dict[tuple[str, str], ReuseCounts]:
        """(model, pod) → totals (live objects: read, do not change)."""
        return self._counts

    def available_by_model(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (model, _pod), c in self._counts.items():
            out[model] = out.get(model, 0) + c.available
        return out

    def delivered_source(self, pod: str) -> str:
        h = self._hits.get(pod)
        return "responses" if h is not None and h.from_responses else "scrapes"

    def report(self) -> dict[str, Any]:
        """The `/debug/reuse` JSON: per model and per pod, the totals, rates and gaps."""
        models: dict[str, dict[str, Any]] = {}
        for (model, pod), c in sorted(self._counts.items()):
            m = models.setdefault(model, {"totals": ReuseCounts(), "pods": {}})
            t: ReuseCounts = m["totals"]
            for name in (*_FIGURES, "requests"):
                setattr(t, name, getattr(t, name) + getattr(c, name))
            m["pods"][pod] = {**_figures(c), "delivered_source": self.delivered_source(pod)}
        return {
            "rule": (
                "delivered per pod: the engine's scraped hit fraction (prefix_cache_hits / "
                "prefix_cache_queries growth) times the prompt tokens routed there, until one "
                "of its responses carries usage.prompt_tokens_details.cached_tokens, then its "
                "responses only; all in the router's prompt tokens"
            ),
            "models": {
                model: {**_figures(m["totals"]), "pods": m["pods"]} for model, m in models.items()
            },
        }


def _figures(c: ReuseCounts) -> dict[str, Any]:
    p = c.prompt

    def rate(n: int) -> float | None:
        return round(n / p, 6) if p else None

    return {
        "requests": c.requests,
        "prompt_tokens": p,
        "available_tokens": c.available,
        "captured_tokens": c.captured,
        "delivered_tokens": c.delivered,
        "rates": {
            "available": rate(c.available),
            "captured": rate(c.captured),
            "delivered": rate(c.delivered),
        },
        "gaps": {
            "routing_tokens": c.available - c.captured,
            "engine_tokens": c.captured - c.delivered,
            "routing": rate(c.available - c.captured),
            "engine": rate(c.captured - c.delivered),
        },
    }


class ReuseCollector(Collector):
    """`kvroute_prompt_tokens_total{model,pod}`, `kvroute_prefix_tokens_available_total{model}`,
    `kvroute_prefix_tokens_captured_total{model,pod}`, `kvroute_prefix_tokens_delivered_total
    {model,pod}`, computed from a `ReuseLedger` when Prometheus scrapes."""

    def __init__(self, ledger: ReuseLedger) -> None:
        self._ledger = ledger

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[CounterMetricFamily]:
        mp = ["model", "pod"]
        prompt = CounterMetricFamily(
            "kvroute_prompt_tokens", "Prompt tokens routed, by model and prefilling pod", labels=mp
        )
        available = CounterMetricFamily(
            "kvroute_prefix_tokens_available",
            "Prompt tokens some pod held as a cached prefix at decision time (the best pod's "
            "match): reuse available",
            labels=["model"],
        )
        captured = CounterMetricFamily(
            "kvroute_prefix_tokens_captured",
            "Prompt tokens the chosen (prefilling) pod held as a cached prefix: reuse captured "
            "by routing",
            labels=mp,
        )
        delivered = CounterMetricFamily(
            "kvroute_prefix_tokens_delivered",
            "Prompt tokens the engine served from its cache (response cached_tokens, else the "
            "engine's scraped prefix-cache hit fraction): reuse delivered",
            labels=mp,
        )
        for (model, pod), c in self._ledger.counts().items():
            prompt.add_metric([model, pod], c.prompt)
            captured.add_metric([model, pod], c.captured)
            delivered.add_metric([model, pod], c.delivered)
        for model, tokens in self._ledger.available_by_model().items():
            available.add_metric([model], tokens)
        yield from (prompt, available, captured, delivered)
