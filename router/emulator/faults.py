"""FaultState: the faults a pod injects now, changed by flags at start or `POST /admin/faults`
(served only on the admin port a pod gets with `--admin-port`, never on its API port).

Per-request faults (error answers, latency spikes, stalls, mid-stream crashes) are drawn from
one seeded RNG so a test run is repeatable. KV-event faults act on the publisher: a drop rate,
or one-shot actions (lose the next N batches, restart the sequence at 0 like a restarted
engine). Refusing connections stops the API listener for a while (the admin port stays up
to end it early).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import msgspec

from router.emulator.settings import FaultSettings

#: One-shot actions accepted by `POST /admin/faults` besides the FaultSettings fields.
ACTIONS = (
    "drop_kv_events",
    "drop_kv_events_from_replay",
    "reset_kv_event_seq",
    "refuse_connections_s",
    "reset_prefix_cache",
)


class FaultUpdateError(ValueError):
    """A `POST /admin/faults` body that names an unknown field or holds a bad value."""


class FaultState:
    def __init__(self, settings: FaultSettings, seed: int = 0) -> None:
        self.settings = settings
        self._rng = random.Random(seed)

    def update(self, body: dict[str, Any]) -> tuple[FaultSettings, dict[str, Any]]:
        """Apply the FaultSettings fields of `body`; return the new settings and the actions."""
        known = {f.name for f in dataclasses.fields(FaultSettings)}
        unknown = sorted(set(body) - known - set(ACTIONS))
        if unknown:
            raise FaultUpdateError(
                f"unknown fault field(s) {', '.join(unknown)} (known: "
                f"{', '.join(sorted(known | set(ACTIONS)))})"
            )
        changes = {k: v for k, v in body.items() if k in known}
        try:
            merged = msgspec.convert(
                {**dataclasses.asdict(self.settings), **changes}, FaultSettings, strict=False
            )
        except (msgspec.ValidationError, ValueError) as exc:
            raise FaultUpdateError(str(exc)) from None
        self.settings = merged
        return merged, {k: v for k, v in body.items() if k in ACTIONS}

    def _draw(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

    def error_status(self) -> int | None:
        s = self.settings
        return s.error_status if self._draw(s.error_rate) else None

    def spike_s(self) -> float:
        s = self.settings
        return s.latency_spike_s if self._draw(s.latency_spike_rate) else 0.0

    def stall_s(self) -> float:
        s = self.settings
        return s.stall_s if self._draw(s.stall_rate) else 0.0

    def drop_event_batch(self) -> bool:
        return self._draw(self.settings.drop_kv_events_rate)
