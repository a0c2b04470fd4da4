"""KV transfer link between a prefill pod and a decode pod (NIXL over EFA/RDMA, modelled).

Owns one link's timing: a fixed latency plus bytes over bandwidth, with transfers on the same
link serialised (a link moves one request's blocks at a time at full bandwidth). The decode
engine reserves the link when it admits a request whose prompt KV lives on a prefill pod.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class KVLink:
    """Defaults: 2 ms and 25 GB/s per pod pair (EFA-like, as in the llm-d/AWS P/D setup)."""

    latency_s: float = 0.002
    bandwidth_Bps: float = 25e9
    busy_until: float = 0.0
    bytes_moved: float = 0.0
    transfers: int = 0

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.bandwidth_Bps <= 0:
            raise ValueError("KVLink needs latency_s ≥ 0 and bandwidth_Bps > 0")

    def transfer_time(self, nbytes: float) -> float:
        """Seconds to move `nbytes` on an idle link (0 bytes costs nothing: no round trip)."""
        if nbytes <= 0:
            return 0.0
        return self.latency_s + nbytes / self.bandwidth_Bps

    def reserve(self, now: float, nbytes: float) -> float:
        """Book a transfer starting no earlier than `now`; returns its completion time."""
        if nbytes <= 0:
            return now
        start = max(now, self.busy_until)
        self.busy_until = start + nbytes / self.bandwidth_Bps
        self.bytes_moved += nbytes
        self.transfers += 1
        return self.busy_until + self.latency_s
