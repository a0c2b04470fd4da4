"""P/D KV transfer, NIXL-style: prefill pods pin blocks, decode pods pull them.

Prefill side (`PinnedTransfers`): a request that came with
`kv_transfer_params.do_remote_decode` finishes after its first token with its blocks pinned
(the engine's prefill role). They stay pinned until the decode pod says it has pulled them
(`POST /kv/release` on the side channel) or `kv_pin_timeout_s` passes (then they are freed
and counted as expired). The answer's `kv_transfer_params` name this pod's engine id, the
pinned block ids and the side channel's host and port, as vLLM's NixlConnector does.

Decode side (`KVPuller`): for a request with `do_remote_prefill`, ask the prefill pod's side
channel (`POST /kv/pull`) whether the blocks are still there and which block keys they hold.
If they are, the engine pulls the blocks it does not already cache over the pair's `KVLink`
(latency + bytes / bandwidth, transfers on one link serialised), caches them (BlockStored
events) and decodes; the side channel is told to release them when the pull completes. If the
transfer is unknown, expired, unreachable or holds other tokens, the request is prefilled
locally and the reason counted.

The side channel is plain HTTP on its own port (vLLM's NIXL side channel is also separate
from the API port); its JSON bodies are this emulator's own protocol.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from router.sim.transfer import KVLink

log = logging.getLogger(__name__)

#: Ids of transfers that expired, remembered so a late pull says "expired" (not "unknown").
_EXPIRED_MEMORY = 4096


@dataclass(slots=True)
class _Pin:
    block_ids: list[int]
    block_keys: list[int]
    handle: asyncio.TimerHandle | None = None


class PinnedTransfers:
    """Prefill side: finished requests whose blocks wait for their decode pod."""

    def __init__(
        self,
        release: Callable[[str], bool],
        timeout_wall_s: float,
        on_expired: Callable[[str], None] = lambda _rid: None,
    ) -> None:
        self._release = release
        self._timeout = timeout_wall_s
        self._on_expired = on_expired
        self._pins: dict[str, _Pin] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pins)

    def add(self, request_id: str, block_ids: list[int], block_keys: list[int]) -> None:
        loop = asyncio.get_running_loop()
        pin = _Pin(block_ids, block_keys)
        pin.handle = loop.call_later(self._timeout, self._expire, request_id)
        self._pins[request_id] = pin

    def pull(self, request_id: str, block_ids: list[int] | None) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) for a decode pod's pull request."""
        pin = self._pins.get(request_id)
        if pin is None:
            if request_id in self._expired:
                return 410, {"error": f"transfer {request_id} expired; its blocks were freed"}
            return 404, {"error": f"no pinned transfer {request_id}"}
        if block_ids is not None and list(block_ids) != pin.block_ids:
            return 409, {"error": f"transfer {request_id} holds other block ids"}
        return 200, {"block_keys": pin.block_keys, "num_blocks": len(pin.block_ids)}

    def release(self, request_id: str) -> bool:
        pin = self._pins.pop(request_id, None)
        if pin is None:
            return False
        if pin.handle is not None:
            pin.handle.cancel()
        self._release(request_id)
        return True

    def close(self) -> None:
        for rid in list(self._pins):
            self.release(rid)

    def _expire(self, request_id: str) -> None:
        pin = self._pins.pop(request_id, None)
        if pin is None:
            return
        self._release(request_id)
        self._expired[request_id] = None
        while len(self._expired) > _EXPIRED_MEMORY:
            self._expired.popitem(last=False)
        log.info("kv transfer %s expired before its decode pod pulled it", request_id)
        self._on_expired(request_id)


@dataclass(frozen=True, slots=True)
class PullGrant:
    source: str  # "host:port" of the prefill pod's side channel
    link: KVLink
    block_keys: list[int]


class KVPuller:
    """Decode side: checks transfers with prefill pods and owns one `KVLink` per prefill pod."""

    def __init__(self, latency_s: float, bandwidth_Bps: float, timeout_s: float = 2.0) -> None:
        self._latency = latency_s
        self._bandwidth = bandwidth_Bps
        self._client = httpx.AsyncClient(timeout=timeout_s)
        self._links: dict[str, KVLink] = {}
        #: engine request id → (source, remote request id), for the release after the pull.
        self._pending: dict[str, tuple[str, str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def link(self, source: str) -> KVLink:
        link = self._links.get(source)
        if link is None:
            link = self._links[source] = KVLink(self._latency, self._bandwidth)
        return link

    async def check(self, params: dict[str, Any]) -> tuple[PullGrant | None, str]:
        """Ask the prefill pod about a transfer: (grant, "") or (None, fallback reason)."""
        host, port = params.get("remote_host"), params.get("remote_port")
        rid = params.get("remote_request_id")
        if not isinstance(host, str) or not isinstance(port, int) or not isinstance(rid, str):
            return None, "missing"
        source = f"{host}:{port}"
        body = {
            "remote_engine_id": params.get("remote_engine_id"),
            "remote_request_id": rid,
            "remote_block_ids": params.get("remote_block_ids"),
        }
        try:
            resp = await self._client.post(f"http://{source}/kv/pull", json=body)
        except httpx.HTTPError as exc:
            log.info("kv pull from %s failed: %r", source, exc)
            return None, "unreachable"
        if resp.status_code == 410:
            return None, "expired"
        if resp.status_code != 200:
            return None, "missing"
        keys = resp.json().get("block_keys")
        if not isinstance(keys, list):
            return None, "missing"
        return PullGrant(source, self.link(source), keys), ""

    def expect(self, engine_id: str, source: str, remote_request_id: str) -> None:
        self._pending[engine_id] = (source, remote_request_id)

    def forget(self, engine_id: str) -> None:
        self._pending.pop(engine_id, None)

    def pulled(self, engine_id: str) -> None:
        """The engine finished pulling `engine_id`'s blocks: let the prefill pod free them."""
        entry = self._pending.pop(engine_id, None)
        if entry is None:
            return
        task = asyncio.get_running_loop().create_task(self._release(*entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, source: str, remote_request_id: str) -> None:
        try:
            await self._client.post(
                f"http://{source}/kv/release", json={"remote_request_id": remote_request_id}
            )
        except httpx.HTTPError as exc:
            log.info("kv release to %s failed (its pin will time out): %r", source, exc)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await self._client.aclose()
