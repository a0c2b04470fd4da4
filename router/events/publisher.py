"""KVEventPublisher: writes KV events exactly as a vLLM engine does (for the emulator and tests).

Wire contract (vLLM's ZMQ publisher):
- PUB socket, three frames per batch: topic (UTF-8), seq (8-byte big-endian, 0, 1, 2, ...),
  payload (msgpack `KVEventBatch`; array-form events by default, map-form events on request).
- Replay: a ROUTER socket (always bound). A request's last frame is the 8-byte start seq
  (DEALER clients send `[b"", start]`); the answer is, after the ROUTER envelope
  `[identity, b""]`, one `[topic, seq, payload]` per buffered batch with seq ≥ start — the
  live stream's three frames — then the end marker `[b"", (-1).to_bytes(8, signed), b""]`
  (vLLM 0.32's `_service_replay`; releases before it sent `[seq, payload]` and
  `[END, b""]`, which `KVEventSubscriber` still accepts). The last `buffer_steps` batches are
  kept.

Connecting PUB (`wait_for_subscriber_s`): ZMQ drops whatever a PUB sends before the peer's
subscription has reached it ("slow joiner"), so a pod that connects to a router's bound SUB
would lose its first batches, more or fewer depending on timing. With a wait, the socket is an
XPUB, which sees subscriptions arrive: batches are held (in order, up to `buffer_steps`) until a
subscription matching the topic has arrived, then sent; after the wait without any, they go
out as vLLM's would. Subscribers cannot tell an XPUB from a PUB.

`vllm_store_fields`: fill in what vLLM 0.32 writes for a plain decoder's single KV-cache group
when an event leaves it unset — `group_idx` 0, `kv_cache_spec_kind` "full_attention" and one
`extra_keys` entry per block (None, or `[lora_name]` for a LoRA's blocks).

Fault injection for tests: `drop_next` loses batches on the wire (optionally from the replay
buffer too), `restart` starts the sequence again at 0 like a restarted engine.

Thread-safe: `publish` may be called from any thread; a background thread serves replays and
notices subscriptions.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import msgspec.structs
import zmq

from router.events.types import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)

WireForm = Literal["array", "map"]

_encoder = msgspec.msgpack.Encoder()


def encode_batch(
    events: Sequence[KVEvent],
    ts: float,
    data_parallel_rank: int | None = None,
    wire_form: WireForm = "array",
) -> bytes:
    """msgpack payload of one batch: vLLM's array form, or the newer form (v0.28: each event a
    map with a "type" key, the batch still `[ts, events, dp_rank]`).

    Written field by field rather than from the structs in `types.py`: those default the
    optional fields so that decoding tolerates their absence, and msgspec's `omit_defaults`
    would then drop a trailing `None` lora_name/medium that vLLM always writes (vLLM declares
    `lora_id`, `medium`, `lora_name` without defaults; only newer extras such as `extra_keys`
    are omitted when unset). Consumers that check the arity, e.g. vllm-router's decoder,
    reject the shorter arrays.
    """
    if wire_form == "array":
        body: list[Any] = [ts, [_array_event(ev) for ev in events]]
        if data_parallel_rank is not None:
            body.append(data_parallel_rank)
        return _encoder.encode(body)
    if wire_form == "map":  # newer vLLM: map events, the batch still an array
        body = [ts, [_map_event(ev) for ev in events]]
        if data_parallel_rank is not None:
            body.append(data_parallel_rank)
        return _encoder.encode(body)
    raise ValueError(f"wire_form must be 'array' or 'map', got {wire_form!r}")


def _event_fields(ev: KVEvent) -> tuple[str, list[Any], list[Any]]:
    """(tag, fields vLLM always writes, optional trailing fields) in declaration order."""
    if isinstance(ev, BlockStored):
        always = [
            ev.block_hashes,
            ev.parent_block_hash,
            ev.token_ids,
            ev.block_size,
            ev.lora_id,
            ev.medium,
            ev.lora_name,
        ]
        optional = [
            ev.extra_keys,
            ev.group_idx,
            ev.kv_cache_spec_kind,
            ev.kv_cache_spec_sliding_window,
        ]
        return "BlockStored", always, optional
    if isinstance(ev, BlockRemoved):
        return "BlockRemoved", [ev.block_hashes, ev.medium], [ev.group_idx]
    if isinstance(ev, AllBlocksCleared):
        return "AllBlocksCleared", [], []
    raise TypeError(f"not a KV event: {type(ev).__name__}")


_FIELD_NAMES = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
        "group_idx",
        "kv_cache_spec_kind",
        "kv_cache_spec_sliding_window",
    ),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}


def _array_event(ev: KVEvent) -> list[Any]:
    tag, always, optional = _event_fields(ev)
    out = [tag, *always]
    # Positional: a None before a set field stays (as vLLM's encoder writes it).
    while optional and optional[-1] is None:
        optional.pop()
    out.extend(optional)
    return out


def _map_event(ev: KVEvent) -> dict[str, Any]:
    tag, always, optional = _event_fields(ev)
    out: dict[str, Any] = {"type": tag}
    names = _FIELD_NAMES[tag]
    out.update(zip(names, always, strict=False))
    for name, value in zip(names[len(always) :], optional, strict=True):
        if value is not None:
            out[name] = value
    return out


def with_vllm_fields(ev: KVEvent) -> KVEvent:
    """`ev` with the single-group fields vLLM 0.32 writes for a plain decoder (see the module
    docstring); fields already set are kept."""
    if isinstance(ev, BlockStored):
        changes: dict[str, Any] = {}
        if ev.group_idx is None:
            changes["group_idx"] = 0
        if ev.kv_cache_spec_kind is None:
            changes["kv_cache_spec_kind"] = "full_attention"
        if ev.extra_keys is None:
            entry = [ev.lora_name] if ev.lora_name else None
            changes["extra_keys"] = [entry] * len(ev.block_hashes)
        return msgspec.structs.replace(ev, **changes) if changes else ev
    if isinstance(ev, BlockRemoved) and ev.group_idx is None:
        return msgspec.structs.replace(ev, group_idx=0)
    return ev


def vllm_binds(endpoint: str) -> bool:
    """vLLM's rule for its PUB endpoint: a wildcard address binds, a concrete one connects.

    Bind is the stable side (a fixed address others dial); a pod that publishes to a central
    subscriber (llm-d: `tcp://router:5557`) connects, a pod that serves its own events binds
    `tcp://*:5557`. IPC and inproc addresses are bound.
    """
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KVEventPublisher:
    def __init__(
        self,
        endpoint: str,
        *,
        topic: str = "",
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        wire_form: WireForm = "array",
        data_parallel_rank: int | None = None,
        bind: bool | None = None,
        context: zmq.Context | None = None,
        wait_for_subscriber_s: float = 0.0,
        vllm_store_fields: bool = False,
    ) -> None:
        """`bind=None` follows vLLM's rule (`vllm_binds`); tests pass True to bind 127.0.0.1.
        `wait_for_subscriber_s` > 0: hold batches until a subscriber has subscribed (see the
        module docstring)."""
        if wire_form not in ("array", "map"):
            raise ValueError(f"wire_form must be 'array' or 'map', got {wire_form!r}")
        if buffer_steps <= 0:
            raise ValueError("buffer_steps must be > 0")
        self.topic = topic.encode()
        self.wire_form: WireForm = wire_form
        self.data_parallel_rank = data_parallel_rank
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._lock = threading.Lock()
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._drop_wire = 0
        self._drop_buffer = 0
        self.vllm_store_fields = vllm_store_fields
        self._wait_s = wait_for_subscriber_s
        #: A subscription matching the topic has arrived (always True for a plain PUB).
        self.subscribed = wait_for_subscriber_s <= 0
        self._held: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._held_since: float | None = None
        self._pub = self._ctx.socket(zmq.XPUB if wait_for_subscriber_s > 0 else zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        if vllm_binds(endpoint) if bind is None else bind:
            self._pub.bind(endpoint)
        else:
            self._pub.connect(endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
        self.replay_endpoint: str | None = None
        self._replay: zmq.Socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if replay_endpoint is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        if self._replay is not None or not self.subscribed:
            self._thread = threading.Thread(
                target=self._serve_replays, name="kv-replay", daemon=True
            )
            self._thread.start()

    @property
    def next_seq(self) -> int:
        return self._seq

    def publish(self, events: Sequence[KVEvent], ts: float | None = None) -> int:
        """Send one batch; returns its sequence number."""
        if self.vllm_store_fields:
            events = [with_vllm_fields(ev) for ev in events]
        payload = encode_batch(
            events, time.time() if ts is None else ts, self.data_parallel_rank, self.wire_form
        )
        return self.publish_payload(payload)

    def publish_payload(self, payload: bytes) -> int:
        """Send an already encoded (or deliberately malformed) payload as the next batch."""
        with self._lock:
            seq = self._seq
            self._seq += 1
            if self._drop_buffer:
                self._drop_buffer -= 1
            else:
                self._buffer.append((seq, payload))
            if self._drop_wire:
                self._drop_wire -= 1
            elif not self.subscribed and not self._check_subscribed():
                self._held.append((seq, payload))
                if self._held_since is None:
                    self._held_since = time.monotonic()
            else:
                self._send(seq, payload)
        return seq

    def _send(self, seq: int, payload: bytes) -> None:
        # Reading EVENTS makes libzmq process pending subscriptions first; without it the
        # first batch after a subscriber joins a connecting PUB is filtered out.
        self._pub.getsockopt(zmq.EVENTS)
        self._pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))

    def _check_subscribed(self) -> bool:
        """(lock held, XPUB) Read pending subscription messages; on the first one matching the
        topic, or once the wait is over, send what was held and return True."""
        while True:
            try:
                msg = self._pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if msg[:1] == b"\x01" and self.topic.startswith(msg[1:]):
                self.subscribed = True
        waited = self._held_since is not None and time.monotonic() - self._held_since
        if not self.subscribed and waited and waited >= self._wait_s:
            self.subscribed = True  # nobody came: send as vLLM would (and lose them)
        if self.subscribed:
            while self._held:
                self._send(*self._held.popleft())
        return self.subscribed

    def drop_next(self, n: int = 1, *, from_replay: bool = False) -> None:
        """Lose the next `n` batches on the wire (and from the replay buffer if `from_replay`)."""
        with self._lock:
            self._drop_wire += n
            if from_replay:
                self._drop_buffer += n

    def restart(self) -> None:
        """Behave like a restarted engine: sequence back to 0, replay buffer empty."""
        with self._lock:
            self._seq = 0
            self._buffer.clear()

    def _serve_replays(self) -> None:
        sock = self._replay
        poller = zmq.Poller()
        if sock is not None:
            poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not self.subscribed:
                with self._lock:
                    self._check_subscribed()
            if sock is None:
                self._stop.wait(0.01)
                continue
            if not poller.poll(10 if not self.subscribed else 50):
                continue
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            if len(frames) < 2 or len(frames[-1]) != 8:
                continue  # not a replay request; vLLM ignores these too
            client = frames[0]
            start = int.from_bytes(frames[-1], "big")
            with self._lock:
                batches = [(s, p) for s, p in self._buffer if s >= start]
            for s, p in batches:
                sock.send_multipart((client, b"", self.topic, s.to_bytes(8, "big"), p))
            sock.send_multipart((client, b"", b"", END_OF_REPLAY, b""))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(zmq.ZMQError):
            self._pub.close(0)
            if self._replay is not None:
                self._replay.close(0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> KVEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
