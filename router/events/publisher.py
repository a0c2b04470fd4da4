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

Fault injection for tests: `drop_next` loses batches on the wire (optionally from the replay
buffer too), `restart` starts the sequence again at 0 like a restarted engine.

Thread-safe: `publish` may be called from any thread; a background thread serves replays.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
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
    ) -> None:
        """`bind=None` follows vLLM's rule (`vllm_binds`); tests pass True to bind 127.0.0.1."""
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
        self._pub = self._ctx.socket(zmq.PUB)
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
            self._thread = threading.Thread(
                target=self._serve_replays, name="kv-replay", daemon=True
            )
            self._thread.start()

    @property
    def next_seq(self) -> int:
        return self._seq

    def publish(self, events: Sequence[KVEvent], ts: float | None = None) -> int:
        """Send one batch; returns its sequence number."""
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
            else:
                # Reading EVENTS makes libzmq process pending subscriptions first; without it
                # the first batch after a subscriber joins a connecting PUB is filtered out.
                self._pub.getsockopt(zmq.EVENTS)
                self._pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
        return seq

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
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
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
