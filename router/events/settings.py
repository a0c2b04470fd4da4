"""EventsSettings: how kvroute receives and applies vLLM KV events (the `events` config section).

Block size and seed are not here: the ingester takes them from the router's `BlockConfig`, so
keys computed from events always equal keys computed from prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class EventsSettings:
    #: "bind": one SUB socket binds `endpoint` and every pod's PUB connects to it (llm-d's
    #: convention; pod and model come from topics `kv@<pod>@<model>`). "connect": one SUB
    #: socket per pod connects to the PUB endpoint the pod binds (pod given by discovery).
    mode: Literal["bind", "connect"] = "bind"
    endpoint: str = "tcp://*:5557"
    #: Topic prefix subscribed to in bind mode. Connect mode subscribes to every topic (vLLM's
    #: default topic is empty), since the socket already says which pod is talking.
    topic_filter: str = "kv@"
    #: Ask a pod's replay endpoint (when known) for batches lost in a sequence gap.
    replay: bool = True
    replay_timeout_s: float = 2.0
    #: Live batches held back while a replay is in flight; more than this abandons the replay.
    max_held_during_replay: int = 10_000
    #: Batches queued per pod before applying; beyond this the queue is dropped and the pod is
    #: rebuilt from later events (an overflow loses events just like a gap does).
    max_queued_batches_per_pod: int = 1_000
    #: Round-robin fairness: batches applied per pod per turn.
    batches_per_turn: int = 4
    #: Longest stretch spent applying before yielding to the event loop.
    slice_budget_ms: float = 2.0
    rcvhwm: int = 100_000
    #: A pod whose events could not be decoded is logged at most once per interval.
    decode_error_log_interval_s: float = 60.0
    #: How long a pod stays marked "rebuilding" after its index was cleared for lost events
    #: (or until it reports AllBlocksCleared, which makes our view exact again).
    rebuild_window_s: float = 60.0
    #: A feed is "silent" when the engine's own counters (`/metrics` prefix-cache queries minus
    #: hits: tokens it computed) grew by `silent_after_blocks` blocks and no batch arrived for
    #: `silent_after_s` since — events were due and did not come (an events-only outage).
    silent_after_s: float = 5.0
    silent_after_blocks: int = 2

    def __post_init__(self) -> None:
        if self.mode not in ("bind", "connect"):
            raise ValueError(f"events.mode must be 'bind' or 'connect', got {self.mode!r}")
        for name in (
            "replay_timeout_s",
            "max_held_during_replay",
            "max_queued_batches_per_pod",
            "batches_per_turn",
            "slice_budget_ms",
            "rcvhwm",
            "silent_after_s",
            "silent_after_blocks",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"events.{name} must be > 0, got {getattr(self, name)!r}")
