"""KVEventSubscriber: receives vLLM KV events over ZMQ and feeds them to a `KVEventIngester`.

Owns the transport: sockets, topics, and sequence tracking per stream (a stream is one topic in
bind mode, one (pod, topic) in connect mode). For each message it only checks the sequence and
queues the payload; decoding and applying happen in the ingester's own task, in slices.

Sequence rules (vLLM numbers batches 0, 1, 2, ... per publisher):
- first message of a stream: accepted whatever its seq (we joined mid-stream);
- seq == expected: accepted;
- seq > expected (a gap): with a replay endpoint for the pod, ask it for [expected, ...] over
  a DEALER (`[b"", start]`) while holding live messages back; whatever the replay cannot
  cover — buffer overrun, timeout, no replay endpoint — makes the pod's index unknown: it is
  cleared and marked rebuilding, and applying continues from the live stream;
- seq < expected: the publisher restarted (its seq went back), same reset.

Replay answers come in vLLM 0.32's form — after the DEALER's empty delimiter, the live
stream's three frames `[topic, seq, payload]`, ended by `[b"", END_OF_REPLAY, b""]` — or in
the two-frame form `[seq, payload]` / `[END_OF_REPLAY, b""]` of older releases (and of
kvroute's publisher before it followed 0.32).

Warm start (`warm_start = True`, set by a face before `start()`; `kvroute serve` does): for
every pod with a replay endpoint (at `start()`, or when added later) the subscriber asks for
the replay buffer from seq 0 and applies it before any live batch of that pod (live batches
are held meanwhile, those the replay covered dropped), so a restarted router knows what the
pods already cache instead of starting from an empty index. A short buffer (the oldest
batches gone) still helps: stores it lacks are unknown, never wrong.

Per pod it keeps what an operator needs to see a silent feed (`feed_state`): when the last
live batch arrived, its sequence number and, in connect mode, whether the TCP connection to
the pod's PUB is up. `pod_restarted` forgets a pod's sequence and clears its blocks when
something else (health, metrics) shows the engine restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from router.events.ingest import EventStats, KVEventIngester
from router.events.publisher import END_OF_REPLAY
from router.events.settings import EventsSettings
from router.pods import PodRegistry

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Stream:
    pod: str
    expected: int | None = None
    replay: asyncio.Task[str | None] | None = None
    held: list[tuple[int, bytes]] = field(default_factory=list)
    #: Set when we gave up on the replay ourselves (as opposed to shutdown cancelling it).
    abandoned: bool = False


@dataclass(slots=True)
class FeedState:
    """What the subscriber last heard from one pod (live batches only, not replays)."""

    #: Monotonic time of the last live batch (None = none yet).
    last_event_at: float | None = None
    #: Wall-clock time of the same batch (compared with an engine's process start time).
    last_event_wall: float | None = None
    last_seq: int | None = None
    batches: int = 0
    #: Connect mode: the TCP connection to the pod's PUB is up. Bind mode: None (one SUB
    #: socket serves every pod; ZMQ does not say which peer is which).
    connected: bool | None = None


def parse_topic(topic: bytes) -> tuple[str, str | None] | None:
    """`kv@<pod>@<model>` → (pod, model); None when no pod can be read from it."""
    try:
        text = topic.decode()
    except UnicodeDecodeError:
        return None
    parts = text.split("@", 2)
    if len(parts) < 2 or not parts[1]:
        return None
    return parts[1], parts[2] if len(parts) > 2 and parts[2] else None


class KVEventSubscriber:
    """Bind mode: pods connect to us. Connect mode: we connect to each pod (`add_pod`)."""

    def __init__(
        self,
        ingester: KVEventIngester,
        settings: EventsSettings | None = None,
        *,
        context: zmq.asyncio.Context | None = None,
        resolve_pod: Callable[[str], str | None] | None = None,
    ) -> None:
        """`resolve_pod` maps a topic's pod id (bind mode) to the registry's pod name; returning
        None drops the message (e.g. a pod discovery does not know, or one that was removed)."""
        self.ingester = ingester
        self.settings = settings or ingester.settings
        self.stats: EventStats = ingester.stats
        self._own_ctx = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._resolve = resolve_pod
        self._streams: dict[tuple[str | None, bytes], _Stream] = {}
        self._replay_endpoints: dict[str, str] = {}
        self._pod_sockets: dict[str, tuple[zmq.asyncio.Socket, asyncio.Task[None]]] = {}
        self._bound: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: Model each pod announced in its topic (bind mode).
        self.models: dict[str, str] = {}
        #: The address actually bound in bind mode (resolves port 0 / wildcards).
        self.endpoint: str | None = None
        self._feeds: dict[str, FeedState] = {}
        self._monitors: dict[str, tuple[zmq.asyncio.Socket, asyncio.Task[None]]] = {}
        self._started = False
        #: Apply each pod's replay buffer at start (see the module docstring).
        self.warm_start = False
        #: Warm-start replays in flight, the live batches held meanwhile, and the seq the
        #: pod's live stream continues from once one finished.
        self._warming: dict[str, asyncio.Task[int | None]] = {}
        self._warm_held: dict[str, list[tuple[_Stream, int, bytes]]] = {}
        self._warm_next: dict[str, int] = {}

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._started = True
        self._tasks.append(asyncio.create_task(self.ingester.run(), name="kv-ingest"))
        for pod, replay_ep in self._replay_endpoints.items():
            self._begin_warm(pod, replay_ep)
        if self.settings.mode == "bind":
            sock = self._sub_socket(self.settings.topic_filter)
            sock.bind(self.settings.endpoint)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._bound = sock
            self._tasks.append(asyncio.create_task(self._receive(sock, None), name="kv-sub"))

    async def close(self) -> None:
        """Stop every task, then close every socket (and the context if we made it)."""
        tasks = [*self._tasks, *(task for _, task in self._pod_sockets.values())]
        tasks += [task for _, task in self._monitors.values()]
        tasks += [s.replay for s in self._streams.values() if s.replay is not None]
        tasks += list(self._warming.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        for pod in list(self._pod_sockets):
            self._close_pod_socket(pod)
        if self._bound is not None:
            self._bound.close(0)
            self._bound = None
        if self._own_ctx:
            self._ctx.term()

    async def __aenter__(self) -> KVEventSubscriber:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- pods
    def add_pod(
        self, pod: str, endpoint: str | None = None, replay_endpoint: str | None = None
    ) -> None:
        """Register a pod: its PUB `endpoint` (connect mode: we connect to it) and/or its
        replay endpoint (either mode). Re-adding with a new endpoint reconnects."""
        if replay_endpoint is None:
            self._replay_endpoints.pop(pod, None)
        else:
            known = self._replay_endpoints.get(pod)
            self._replay_endpoints[pod] = replay_endpoint
            if self._started and known != replay_endpoint:
                self._begin_warm(pod, replay_endpoint)
        if endpoint is None:
            return
        if self.settings.mode != "connect":
            raise ValueError("a PUB endpoint per pod is for connect mode; bind mode gets topics")
        current = self._pod_sockets.get(pod)
        if current is not None:
            if current[0].getsockopt_string(zmq.LAST_ENDPOINT) == endpoint:
                return
            self._close_pod_socket(pod)
        sock = self._sub_socket("")
        self._watch_connection(pod, sock)
        sock.connect(endpoint)
        task = asyncio.create_task(self._receive(sock, pod), name=f"kv-sub-{pod}")
        self._pod_sockets[pod] = (sock, task)

    def remove_pod(self, pod: str) -> None:
        """Stop listening to `pod` and drop everything known about it, index entries included."""
        self._close_pod_socket(pod)
        self._replay_endpoints.pop(pod, None)
        warming = self._warming.pop(pod, None)
        if warming is not None:
            warming.cancel()
        self._warm_held.pop(pod, None)
        self._warm_next.pop(pod, None)
        for key in [k for k, s in self._streams.items() if s.pod == pod]:
            stream = self._streams.pop(key)
            if stream.replay is not None:
                stream.replay.cancel()
        self.models.pop(pod, None)
        self._feeds.pop(pod, None)
        self.ingester.forget_pod(pod)

    def attach(self, registry: PodRegistry) -> None:
        """Pods that leave the registry leave the index (and connect mode stops listening)."""
        registry.on_remove(self.remove_pod)

    def sync_pods(self, registry: PodRegistry) -> None:
        """Follow the registry's KV-event endpoints (call after discovery changes it).

        Connect mode listens to every pod with `kv_events_endpoint` and stops listening to
        pods that no longer have one; both modes take `kv_replay_endpoint`. Pods are named
        by their registry endpoint."""
        wanted: set[str] = set()
        for pod in registry:
            events_ep = pod.kv_events_endpoint if self.settings.mode == "connect" else None
            if events_ep is not None:
                wanted.add(pod.endpoint)
            self.add_pod(pod.endpoint, events_ep, pod.kv_replay_endpoint)
        for name in [p for p in self._pod_sockets if p not in wanted]:
            self.remove_pod(name)

    def _close_pod_socket(self, pod: str) -> None:
        monitor = self._monitors.pop(pod, None)
        if monitor is not None:
            monitor[1].cancel()
        entry = self._pod_sockets.pop(pod, None)
        if entry is not None:
            sock, task = entry
            task.cancel()
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            sock.close(0)
        if monitor is not None:
            monitor[0].close(0)

    def _watch_connection(self, pod: str, sock: zmq.asyncio.Socket) -> None:
        """Connect mode: follow the socket's TCP connection to the pod (ZMQ socket monitor)."""
        state = self.feed_state(pod)
        state.connected = False
        mon = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        task = asyncio.create_task(self._follow_monitor(mon, state), name=f"kv-mon-{pod}")
        self._monitors[pod] = (mon, task)

    async def _follow_monitor(self, mon: zmq.asyncio.Socket, state: FeedState) -> None:
        while True:
            try:
                frames = await mon.recv_multipart()
            except zmq.ZMQError:
                return
            event = parse_monitor_message(frames)["event"]
            if event == zmq.EVENT_CONNECTED:
                state.connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                state.connected = False

    # ---------------------------------------------------------------- feed state
    def feed_state(self, pod: str) -> FeedState:
        state = self._feeds.get(pod)
        if state is None:
            state = self._feeds[pod] = FeedState()
        return state

    def pod_restarted(self, pod: str, reason: str) -> None:
        """The engine behind `pod` restarted (its cache is empty): clear its blocks, forget its
        sequence (the new engine counts from 0) and any replay in flight."""
        for stream in [s for s in self._streams.values() if s.pod == pod]:
            if stream.replay is not None:
                task, stream.replay = stream.replay, None
                task.cancel()
            stream.held = []
            stream.abandoned = False
            stream.expected = None
        self.ingester.reset_pod(pod, reason)

    def _sub_socket(self, topic_filter: str) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self.settings.rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, topic_filter.encode())
        return sock

    # ---------------------------------------------------------------- receiving
    async def _receive(self, sock: zmq.asyncio.Socket, pod: str | None) -> None:
        streams = self._streams
        while True:
            try:
                frames = await sock.recv_multipart()
            except zmq.ZMQError:
                if sock.closed:
                    return
                raise
            if len(frames) != 3 or len(frames[1]) != 8:
                self.stats.malformed_messages += 1
                continue
            topic, seq_bytes, payload = frames
            stream = streams.get((pod, topic))
            if stream is None:
                stream = self._new_stream(pod, topic)
                if stream is None:
                    continue
            self.on_message(stream, int.from_bytes(seq_bytes, "big"), payload)

    def _new_stream(self, socket_pod: str | None, topic: bytes) -> _Stream | None:
        pod = socket_pod
        if pod is None:
            parsed = parse_topic(topic)
            if parsed is None:
                self.stats.malformed_messages += 1
                return None
            pod_id, model = parsed
            pod = self._resolve(pod_id) if self._resolve is not None else pod_id
            if pod is None:
                self.stats.unknown_pods += 1
                return None
            if model is not None:
                self.models[pod] = model
        stream = self._streams[(socket_pod, topic)] = _Stream(pod)
        return stream

    def on_message(self, stream: _Stream, seq: int, payload: bytes) -> None:
        """Sequence check for one live message, then queue it (or hold it during a replay)."""
        state = self.feed_state(stream.pod)
        state.last_event_at = time.monotonic()
        state.last_event_wall = time.time()
        state.last_seq = seq
        state.batches += 1
        self._on_message(stream, seq, payload)

    def _on_message(self, stream: _Stream, seq: int, payload: bytes) -> None:
        held = self._warm_held.get(stream.pod)
        if held is not None:
            held.append((stream, seq, payload))
            if len(held) > self.settings.max_held_during_replay:
                self._warming[stream.pod].cancel()
            return
        if stream.expected is None and (warm := self._warm_next.get(stream.pod)) is not None:
            if seq < warm:
                return  # the warm-start replay delivered it
            del self._warm_next[stream.pod]
            stream.expected = warm
        if stream.replay is not None:
            stream.held.append((seq, payload))
            if len(stream.held) > self.settings.max_held_during_replay and not stream.abandoned:
                stream.abandoned = True
                stream.replay.cancel()
            return
        expected = stream.expected
        if expected is None or seq == expected:
            stream.expected = seq + 1
            self.ingester.submit(stream.pod, seq, payload)
        elif seq > expected:
            self.stats.gaps += 1
            replay_ep = self._replay_endpoints.get(stream.pod) if self.settings.replay else None
            if replay_ep is None:
                self._restart_stream(stream, seq, payload, f"gap: expected {expected}, got {seq}")
                return
            stream.held.append((seq, payload))
            self._start_replay(stream, replay_ep)
        else:
            self.stats.seq_resets += 1
            self._restart_stream(
                stream, seq, payload, f"publisher restarted: seq {seq} after {expected - 1}"
            )

    def _restart_stream(self, stream: _Stream, seq: int, payload: bytes, reason: str) -> None:
        self.ingester.reset_pod(stream.pod, reason)
        stream.expected = seq + 1
        self.ingester.submit(stream.pod, seq, payload)

    # ---------------------------------------------------------------- warm start
    def _begin_warm(self, pod: str, endpoint: str) -> None:
        if not (self.warm_start and self.settings.replay) or pod in self._warming:
            return
        task = asyncio.create_task(self._warm_start(pod, endpoint), name=f"kv-warm-{pod}")
        self._warming[pod] = task
        self._warm_held[pod] = []
        task.add_done_callback(lambda t: self._warm_done(pod, t))

    async def _warm_start(self, pod: str, endpoint: str) -> int | None:
        """Apply the pod's replay buffer from seq 0; returns the seq after the last batch."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        nxt: int | None = None
        try:
            sock.connect(endpoint)
            await sock.send_multipart((b"", (0).to_bytes(8, "big")))
            timeout_ms = int(self.settings.replay_timeout_s * 1000)
            while await sock.poll(timeout_ms):
                frames = await sock.recv_multipart()
                if frames and frames[0] == b"":
                    frames = frames[1:]
                if len(frames) == 3:  # vLLM 0.32: [topic, seq, payload]; older: [seq, payload]
                    frames = frames[1:]
                if len(frames) != 2 or len(frames[0]) != 8:
                    self.stats.malformed_messages += 1
                    continue
                if frames[0] == END_OF_REPLAY:
                    return nxt
                seq = int.from_bytes(frames[0], "big")
                if nxt is not None and seq < nxt:
                    continue
                nxt = seq + 1
                self.stats.replayed_batches += 1
                self.ingester.submit(pod, seq, frames[1])
            log.info("kv events: warm-start replay from %s timed out", endpoint)
            return nxt
        finally:
            sock.close(0)

    async def warmed(self, timeout_s: float) -> bool:
        """Wait (up to `timeout_s`) for the warm-start replays in flight; True if all ended."""
        tasks = list(self._warming.values())
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        return not pending

    def _warm_done(self, pod: str, task: asyncio.Task[int | None]) -> None:
        if self._warming.get(pod) is not task:
            return
        del self._warming[pod]
        held = self._warm_held.pop(pod, [])
        nxt = None if task.cancelled() or task.exception() is not None else task.result()
        if nxt is not None:
            self._warm_next[pod] = nxt
            log.info("kv events: pod %s warm-started from its replay buffer (to seq %d)", pod, nxt)
        for stream, seq, payload in held:
            self._on_message(stream, seq, payload)

    # ---------------------------------------------------------------- replay
    def _start_replay(self, stream: _Stream, endpoint: str) -> None:
        self.stats.replays += 1
        task = asyncio.create_task(self._replay(stream, endpoint))
        stream.replay = task
        task.add_done_callback(lambda t: self._replay_done(stream, t))

    async def _replay(self, stream: _Stream, endpoint: str) -> str | None:
        """Fetch [expected, ...] from the pod's replay socket; returns why it fell short."""
        start = stream.expected
        assert start is not None
        failure: str | None = None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(endpoint)
            await sock.send_multipart((b"", start.to_bytes(8, "big")))
            timeout_ms = int(self.settings.replay_timeout_s * 1000)
            while True:
                if not await sock.poll(timeout_ms):
                    return f"replay from {endpoint} timed out"
                frames = await sock.recv_multipart()
                if frames and frames[0] == b"":
                    frames = frames[1:]
                # vLLM 0.32: [topic, seq, payload]; older: [seq, payload].
                if len(frames) == 3:
                    frames = frames[1:]
                if len(frames) != 2 or len(frames[0]) != 8:
                    self.stats.malformed_messages += 1
                    continue
                if frames[0] == END_OF_REPLAY:
                    return failure
                seq = int.from_bytes(frames[0], "big")
                if failure is not None or seq < stream.expected:
                    continue
                if seq > stream.expected:
                    failure = f"replay starts at {seq}, needed {stream.expected}"
                    continue
                stream.expected = seq + 1
                self.stats.replayed_batches += 1
                self.ingester.submit(stream.pod, seq, frames[1])
        finally:
            sock.close(0)

    def _replay_done(self, stream: _Stream, task: asyncio.Task[str | None]) -> None:
        if stream.replay is not task:
            return
        if task.cancelled():
            if not stream.abandoned:
                return  # shutdown or pod removal
            failure: str | None = f"replay abandoned after {len(stream.held)} held batches"
        elif task.exception() is not None:
            failure = f"replay failed: {task.exception()!r}"
        else:
            failure = task.result()
        self._finish_replay(stream, failure)

    def _finish_replay(self, stream: _Stream, failure: str | None) -> None:
        stream.replay = None
        stream.abandoned = False
        held, stream.held = stream.held, []
        expected = stream.expected
        if failure is None and held and expected is not None and held[0][0] > expected:
            failure = f"replay ended before {expected}, live stream is at {held[0][0]}"
        if failure is not None:
            self.stats.replay_failures += 1
            if held:
                first_seq, first_payload = held[0]
                self._restart_stream(stream, first_seq, first_payload, failure)
                held = held[1:]
            else:
                self.ingester.reset_pod(stream.pod, failure)
        for seq, payload in held:
            if stream.expected is not None and seq < stream.expected:
                continue  # the replay already delivered it
            self._on_message(stream, seq, payload)
