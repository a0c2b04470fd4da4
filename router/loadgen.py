"""`kvroute loadgen`: replay a workload against any OpenAI-compatible server, timed client-side.

Sends the simulation's workloads (`router/sim/workloads.py`) or a Mooncake trace as plain
OpenAI requests, streaming, and measures what a client sees: time to first token (first chunk
with content), time per output token after it, end-to-end latency, and output tokens per
second. Speaks only the public API, so it drives kvroute, a single vLLM, or a peer router.

How a workload becomes requests:
- `--api chat`: each session is one conversation. A first turn is one user message holding the
  arrival's tokens as text; a later turn appends the assistant's actual reply to the previous
  turn (as a real chat client does) and a user message with the tokens the workload added.
- `--api completions`: the prompt is the arrival's tokens, as token ids (`--prompt tokens`,
  the default) or as text.
Token ids become text through a fixed table of 4-letter pseudo-words (one piece each for a
BPE-like tokenizer), so equal token prefixes give equal text prefixes.

Pacing: closed loop (`--concurrency N`: N requests outstanding) or open loop (`--rate R`: the
workload's Poisson arrival times at R requests/s). Either way a session's turn waits for the
previous turn's answer (plus its think time in the closed loop).

Pacing error, measured so a benchmark can tell whether the client kept up: each request's send
lag (sent − when it was due: its scheduled time, or its previous turn's answer plus think time,
whichever is later; in the closed loop also when a worker took it up), and the event loop's own
lag, sampled every `LOOP_PROBE_S` by a thread that posts a callback to the loop and times how
late it runs against the probe's schedule (what a response chunk or a timer waits too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec
import numpy as np

from router.loadgen_http import ConnectionPool, HttpError, Origin, request_bytes
from router.loop_lag import LoopLagProbe
from router.sim.traces import trace_workload
from router.sim.workloads import WORKLOADS, Arrival, Workload, make_workload

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
#: 4-letter pseudo-words: token id t ↦ _WORDS[t % len(_WORDS)].
_WORDS = [a + b + c + d for a in _CONSONANTS for b in _VOWELS for c in _CONSONANTS for d in _VOWELS]
_WORD_ARRAY = np.array(_WORDS, dtype=object)


#: A stream event's JSON (msgspec: ~4x json.loads on vLLM's chunks, one per token).
_decode_event = msgspec.json.Decoder().decode

#: A request body's JSON (msgspec: a 200 KB prompt in ~0.1 ms, several times json.dumps).
_encode_body = msgspec.json.Encoder().encode

#: Interval of the event-loop lag probe (seconds).
LOOP_PROBE_S = 0.005
#: How long before a request is due its timer fires (see `sleep_until`).
WAKE_EARLY_S = 0.0015
#: How long before an open loop's request is due it is built (seconds).
PREPARE_AHEAD_S = 0.02
#: An open loop's schedule starts this long after the run does (seconds): its first burst,
#: due as the run started, left ~2 ms late, the harness's own lag p99 on a Mooncake trace.
OPEN_LOOP_LEAD_S = 0.1
#: Text rendered before a run starts, at most (characters; ~5 a token).
PRERENDER_CHARS = 256 << 20


def tokens_to_text(token_ids: np.ndarray | list[int]) -> str:
    """Pseudo-words standing for the token ids. Vectorised: it runs on the load generator's
    event loop before a request is stamped sent (a 39k-token prompt: ~70 ms as a Python
    loop, ~2 ms so)."""
    ids = np.asarray(token_ids, dtype=np.int64) % len(_WORDS)
    return " ".join(_WORD_ARRAY[ids].tolist())


@dataclass(slots=True)
class RequestResult:
    index: int
    ok: bool
    status: int
    sent_at: float
    ttft_s: float | None = None
    e2e_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None
    #: perf_counter() when the request was due to be sent (see the module docstring).
    due_at: float | None = None

    @property
    def send_lag_s(self) -> float | None:
        return None if self.due_at is None else max(0.0, self.sent_at - self.due_at)

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(slots=True)
class LoadSettings:
    base_url: str
    model: str
    api: str = "chat"
    prompt: str = "tokens"
    concurrency: int | None = 8
    rate: float | None = None
    timeout_s: float = 300.0
    #: Closed loop: scale the workload's think times (0 = send the next turn at once).
    think_scale: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    #: Cap on max_tokens sent (None = the workload's output length).
    max_tokens_cap: int | None = None
    #: Keep-alive connections to open before the timed run (and, in an open loop, to keep
    #: idle: see `router/loadgen_http.py`), so requests do not pay for TCP connects: opened
    #: as the run's first burst arrived, ten connections were most of the run's send lag
    #: p99 (a Mooncake burst's last request 2.8 ms late). None: as many as the run has
    #: requests out at once at first (a closed loop's `concurrency`, an open loop's
    #: `largest_burst`).
    warm_connections: int | None = 0


@dataclass(slots=True)
class LoadReport:
    results: list[RequestResult]
    wall_s: float
    #: Event-loop lag samples (seconds) over the run.
    loop_lags: list[float] = field(default_factory=list)
    #: Stopped early (`LoadGenerator.stop`, e.g. on SIGTERM): `results` holds the requests
    #: that finished; `planned` is how many the workload had.
    interrupted: bool = False
    planned: int | None = None

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.results if r.ok]
        ttft = np.array([r.ttft_s for r in ok if r.ttft_s is not None])
        tpot = np.array([t for r in ok if (t := r.tpot_s) is not None])
        e2e = np.array([r.e2e_s for r in ok])
        out_tokens = sum(r.output_tokens for r in ok)

        def pct(a: np.ndarray, q: float) -> float | None:
            return round(float(np.percentile(a, q)), 6) if len(a) else None

        send_lag = np.array([x for r in self.results if (x := r.send_lag_s) is not None])
        loop_lag = np.array(self.loop_lags)

        def ms(a: np.ndarray, q: float) -> float | None:
            return round(float(np.percentile(a, q)) * 1000, 3) if len(a) else None

        partial = {"interrupted": True, "planned": self.planned} if self.interrupted else {}
        return {
            **partial,
            "requests": len(self.results),
            "failed": len(self.results) - len(ok),
            "duration_s": round(self.wall_s, 3),
            "requests_per_s": round(len(ok) / self.wall_s, 3) if self.wall_s else 0.0,
            "ttft_p50_s": pct(ttft, 50),
            "ttft_p95_s": pct(ttft, 95),
            "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50),
            "e2e_p50_s": pct(e2e, 50),
            "output_tokens": out_tokens,
            "output_tokens_per_s": round(out_tokens / self.wall_s, 2) if self.wall_s else 0.0,
            "errors": _error_kinds(self.results),
            "send_lag_p50_ms": ms(send_lag, 50),
            "send_lag_p99_ms": ms(send_lag, 99),
            "loop_lag_p50_ms": ms(loop_lag, 50),
            "loop_lag_p99_ms": ms(loop_lag, 99),
        }


def _error_kinds(results: list[RequestResult]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = f"{r.status}" if r.status else (r.error or "error").split(":")[0]
            out[key] = out.get(key, 0) + 1
    return out


class LoadGenerator:
    def __init__(self, workload: Workload, settings: LoadSettings) -> None:
        self.workload = workload
        self.settings = settings
        self.arrivals = workload.arrivals
        self._done: list[asyncio.Event] = [asyncio.Event() for _ in self.arrivals]
        self._finished_at: list[float] = [0.0] * len(self.arrivals)
        #: Chat history after each turn (messages including the assistant's reply).
        self._history: dict[int, list[dict[str, str]]] = {}
        self.results: list[RequestResult | None] = [None] * len(self.arrivals)
        self._work: asyncio.Future[None] | None = None
        self._stopped = False
        #: Each chat request's new text, rendered before the run (see `_prerender`).
        self._texts: list[str | None] = [None] * len(self.arrivals)
        self._headers = {**settings.headers, "Content-Type": "application/json"}

    def stop(self) -> None:
        """End the run now (from the loop's thread, e.g. a signal handler): requests in
        flight are abandoned, and `run` returns the report of those that finished."""
        self._stopped = True
        if self._work is not None:
            self._work.cancel()

    def _new_tokens(self, a: Arrival) -> np.ndarray:
        """The tokens request `a` adds to its session: all of them on a first turn, the
        new user message after the previous turn's prompt and answer otherwise."""
        if a.prev < 0:
            return a.token_ids
        prev = self.arrivals[a.prev]
        return a.token_ids[len(prev.token_ids) + len(prev.output_token_ids) :]

    def _prerender(self) -> None:
        """Render every chat request's new text now, while nothing is timed, up to
        `PRERENDER_CHARS` of text: a Mooncake prompt rendered on the event loop at send time
        cost ~5.6 ms (tens of ms for the longest), which every request in flight then waited
        for and counted in the harness's own lag."""
        if self.settings.api != "chat":
            return
        budget = PRERENDER_CHARS
        for a in self.arrivals:
            new = self._new_tokens(a)
            budget -= 5 * len(new)  # 4-letter words and a space
            if budget < 0:
                return
            self._texts[a.index] = tokens_to_text(new)

    async def run(self) -> LoadReport:
        s = self.settings
        self._prerender()
        pool = ConnectionPool(s.timeout_s)
        try:
            warm = self._connections_wanted() if s.warm_connections is None else s.warm_connections
            if warm > 0:
                # Kept topped up in an open loop, whose requests out at once keep growing
                # when the server falls behind; a closed loop's never exceed its concurrency.
                with contextlib.suppress(OSError, TimeoutError, ValueError):
                    await pool.warm(s.base_url, warm, keep=s.rate is not None)
            probe = LoopLagProbe(asyncio.get_running_loop(), LOOP_PROBE_S)
            start = time.perf_counter()
            if s.rate is not None:
                # Time 0 of the schedule a little ahead, so the first burst is not due while
                # the loop is still starting every request's task and building the first.
                start += OPEN_LOOP_LEAD_S
                self._work = asyncio.ensure_future(self._open_loop(pool, start))
            else:
                self._work = asyncio.ensure_future(self._closed_loop(pool, s.concurrency or 1))
            if self._stopped:
                self._work.cancel()
            try:
                await self._work
            except asyncio.CancelledError:
                if not self._stopped:
                    raise
            finally:
                lags = probe.stop()
            wall = time.perf_counter() - start
        finally:
            await pool.close()
        done = [r for r in self.results if r is not None]
        return LoadReport(done, wall, lags, self._stopped, len(self.arrivals))

    def _connections_wanted(self) -> int:
        if self.settings.rate is None:
            return self.settings.concurrency or 1
        return largest_burst([a.time_s for a in self.arrivals if a.prev < 0])

    async def _closed_loop(self, pool: ConnectionPool, concurrency: int) -> None:
        queue: asyncio.Queue[Arrival] = asyncio.Queue()
        for a in self.arrivals:
            queue.put_nowait(a)

        async def worker() -> None:
            while not queue.empty():
                a = queue.get_nowait()
                due = await self._after_prev(
                    a, self.settings.think_scale * a.think_s, time.perf_counter()
                )
                await self._one(pool, a, due)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def _open_loop(self, pool: ConnectionPool, start: float) -> None:
        assert self.settings.rate is not None
        # The workload's own times are at its own rate: rescale to ours.
        total = self.arrivals[-1].time_s if self.arrivals else 0.0
        scale = (len(self.arrivals) / self.settings.rate) / total if total > 0 else 0.0

        async def launch(a: Arrival) -> None:
            due = start + a.time_s * scale
            # Woken a little early, so the request is built before it is due.
            await asyncio.sleep(max(0.0, due - time.perf_counter() - PREPARE_AHEAD_S))
            due = await self._after_prev(a, 0.0, due)
            await self._one(pool, a, due)

        await asyncio.gather(*(launch(a) for a in self.arrivals))

    async def _after_prev(self, a: Arrival, think_s: float, due: float) -> float:
        """Wait for the previous turn's answer; the time `a` is due then (with think time)."""
        if a.prev >= 0:
            await self._done[a.prev].wait()
            due = max(due, self._finished_at[a.prev] + think_s)
        return due

    # ---------------------------------------------------------------- one request
    def _base_url(self, a: Arrival) -> str:
        """Where request `a` goes: the settings' server (a subclass may spread requests)."""
        return self.settings.base_url

    def _body(self, a: Arrival) -> tuple[str, dict[str, Any]]:
        s = self.settings
        max_tokens = (
            a.output_len if s.max_tokens_cap is None else min(a.output_len, s.max_tokens_cap)
        )
        common = {
            "model": s.model,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        if s.api == "completions":
            prompt: Any = (
                a.token_ids.tolist() if s.prompt == "tokens" else tokens_to_text(a.token_ids)
            )
            return "/v1/completions", {**common, "prompt": prompt}
        text = self._texts[a.index]
        if text is None:
            text = tokens_to_text(self._new_tokens(a))
        else:
            self._texts[a.index] = None  # sent once: keep memory to what is still to send
        history = self._history.get(a.prev, []) if a.prev >= 0 else []
        messages = [*history, {"role": "user", "content": text}]
        return "/v1/chat/completions", {**common, "messages": messages, "user": a.session}

    async def _one(self, pool: ConnectionPool, a: Arrival, due: float) -> None:
        """Build request `a`, send it when it is due, and record what the client saw."""
        path, body = self._body(a)
        url = self._base_url(a).rstrip("/")
        result = RequestResult(a.index, False, 0, 0.0, due_at=due)
        text: list[str] = []
        chunks = 0
        try:
            origin = Origin.of(url)
            target = urlsplit(url).path + path
            data = request_bytes("POST", origin, target, _encode_body(body), self._headers)
            await sleep_until(due)
            sent = result.sent_at = time.perf_counter()
            async with pool.send(origin, data) as r:
                result.status = r.status
                if r.status != 200:
                    result.error = (await r.read()).decode(errors="replace")[:300]
                else:
                    async for line in sse_lines(r.iter_chunks()):
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = _decode_event(line[6:])
                        if "error" in event:
                            result.error = json.dumps(event["error"])[:300]
                            break
                        piece = _content(event)
                        if piece:
                            if result.ttft_s is None:
                                result.ttft_s = time.perf_counter() - sent
                            chunks += 1
                            text.append(piece)
                        usage = event.get("usage")
                        if usage:
                            result.output_tokens = usage.get("completion_tokens", 0)
                            result.prompt_tokens = usage.get("prompt_tokens")
                    else:
                        result.ok = True
        except (HttpError, TimeoutError, msgspec.DecodeError, OSError, ValueError) as e:
            result.error = f"{type(e).__name__}: {e}"
        if not result.sent_at:
            result.sent_at = time.perf_counter()
        result.e2e_s = time.perf_counter() - result.sent_at
        if result.ok and not result.output_tokens:
            result.output_tokens = chunks
        self.results[a.index] = result
        if body.get("messages") is not None:
            reply = "".join(text)
            self._history[a.index] = [*body["messages"], {"role": "assistant", "content": reply}]
            if a.prev >= 0:
                self._history.pop(a.prev, None)
        self._finished_at[a.index] = time.perf_counter()
        self._done[a.index].set()


def largest_burst(times_s: Sequence[float], window_s: float = 0.01) -> int:
    """The most arrival times within any `window_s` (an open loop's connections in use at
    once when its requests are short next to the gaps between bursts)."""
    ordered = sorted(times_s)
    best = lo = 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] > window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def sleep_until(due: float) -> None:
    """Return at `due` (a `time.perf_counter()` time), within tens of microseconds.

    asyncio's timers wake up to a millisecond late (the selector's timeout is whole
    milliseconds, rounded up), which was most of the load generator's median send lag: sleep
    to `WAKE_EARLY_S` before, then yield to the loop until the time has come (other tasks
    run meanwhile; the loop is not held)."""
    wait = due - time.perf_counter() - WAKE_EARLY_S
    if wait > 0:
        await asyncio.sleep(wait)
    while time.perf_counter() < due:
        await asyncio.sleep(0)


async def sse_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The lines of an SSE body from its chunks as they arrive, split anywhere (any length:
    a stream reader's own line reader refuses lines over its buffer limit)."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        if b"\n" not in chunk:
            continue
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode()
    if pending:
        yield pending.rstrip(b"\r").decode()


def _content(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    delta = c.get("delta")
    if delta is not None:
        return delta.get("content") or delta.get("reasoning_content") or ""
    return c.get("text") or ""


async def run_load(
    workload: Workload, settings: LoadSettings, stop_on: tuple[int, ...] = ()
) -> LoadReport:
    """Run the load; the signals in `stop_on` (e.g. SIGTERM) end it early with the report of
    what finished (main thread only)."""
    gen = LoadGenerator(workload, settings)
    loop = asyncio.get_running_loop()
    for sig in stop_on:
        loop.add_signal_handler(sig, gen.stop)
    try:
        return await gen.run()
    finally:
        for sig in stop_on:
            loop.remove_signal_handler(sig)


# --------------------------------------------------------------------------- CLI
def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Side-by-side columns, one per run (name → summary)."""
    fields = [
        ("requests", "requests", "{:d}"),
        ("failed", "failed", "{:d}"),
        ("hit_rate", "prefix cache hit rate", "{:.1%}"),
        ("ttft_p50_s", "TTFT p50 (s)", "{:.3f}"),
        ("ttft_p95_s", "TTFT p95 (s)", "{:.3f}"),
        ("tpot_p50_s", "TPOT p50 (ms)", "ms"),
        ("e2e_p50_s", "latency p50 (s)", "{:.3f}"),
        ("output_tokens_per_s", "output tokens/s", "{:,.0f}"),
        ("requests_per_s", "requests/s", "{:.2f}"),
    ]
    names = list(rows)
    width = max(14, *(len(n) + 2 for n in names))
    lines = [f"{'':<24}" + "".join(f"{n:>{width}}" for n in names)]
    for key, label, fmt in fields:
        if not any(key in r for r in rows.values()):
            continue
        cells = []
        for n in names:
            v = rows[n].get(key)
            if v is None:
                cells.append("-")
            elif fmt == "ms":
                cells.append(f"{v * 1000:.1f}")
            else:
                cells.append(fmt.format(v))
        lines.append(f"{label:<24}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "loadgen",
        help="replay a workload against an OpenAI-compatible server and time it client-side",
    )
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--model", required=True)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workload", default="multi-turn", choices=sorted(WORKLOADS))
    src.add_argument("--trace", help="a Mooncake JSONL trace instead of a workload")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--concurrency", type=int, default=None)
    pace.add_argument("--rate", type=float, default=None, help="open loop, requests/s")
    p.add_argument("--api", choices=("chat", "completions"), default="chat")
    p.add_argument(
        "--prompt",
        choices=("tokens", "text"),
        default="tokens",
        help="completions prompts as token ids or text",
    )
    p.add_argument("--max-tokens-cap", type=int, default=None)
    p.add_argument(
        "--think-scale",
        type=float,
        default=0.0,
        help="closed loop: fraction of the workload's think time to wait",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a workload parameter (numbers parsed as JSON)",
    )
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def _overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set wants FIELD=VALUE, got {item!r}")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def run(args: argparse.Namespace) -> int:
    try:
        if args.trace:
            workload = trace_workload(args.trace, limit=args.requests, seed=args.seed)
        else:
            workload = make_workload(
                args.workload, num_requests=args.requests, seed=args.seed, **_overrides(args.set)
            )
        headers = {}
        for h in args.header:
            name, sep, value = h.partition(":")
            if not sep:
                raise ValueError(f"--header wants NAME:VALUE, got {h!r}")
            headers[name.strip()] = value.strip()
    except (ValueError, OSError) as e:
        print(f"kvroute loadgen: {e}", file=sys.stderr)
        return 2
    concurrency = args.concurrency if args.concurrency or args.rate else 8
    settings = LoadSettings(
        base_url=args.url,
        model=args.model,
        api=args.api,
        prompt=args.prompt,
        concurrency=concurrency,
        rate=args.rate,
        think_scale=args.think_scale,
        headers=headers,
        max_tokens_cap=args.max_tokens_cap,
    )
    with contextlib.suppress(KeyboardInterrupt):
        stop_on = (signal.SIGTERM, signal.SIGINT)
        report = asyncio.run(run_load(workload, settings, stop_on))
        summary = report.summary()
        if report.interrupted:
            print(
                f"kvroute loadgen: stopped by a signal; the summary covers the "
                f"{summary['requests']} of {report.planned} requests that finished",
                file=sys.stderr,
            )
        if args.json:
            print(json.dumps(summary), flush=True)
        else:
            print(f"{workload.name}: {workload.description}")
            print(format_table({"result": summary}), flush=True)
        if report.interrupted:
            return 130
        return 0 if summary["failed"] == 0 else 1
    return 130
