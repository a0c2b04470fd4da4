"""P/D between a prefill and a decode emulator: pinned blocks, pulls over the side channel,
stored events on the decode pod, and local-prefill fallback when the transfer is gone."""

from __future__ import annotations

import asyncio

import httpx

from router.blocks import token_block_keys
from router.emulator.server import EmulatorPod
from tests.emulator.conftest import MODEL, until

PROMPT = list(range(300, 300 + 200))  # 12 full blocks + 8 tokens
PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def _metric(text: str, name: str, label: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _prefill(c: httpx.AsyncClient) -> dict:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": PREFILL_PARAMS,
    }
    r = await c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def test_decode_pulls_the_pinned_blocks_from_the_prefill_pod(start_pod) -> None:  # type: ignore[no-untyped-def]
    prefill: EmulatorPod = await start_pod(role="prefill")
    decode: EmulatorPod = await start_pod(role="decode")
    async with (
        httpx.AsyncClient(base_url=prefill.url) as pc,
        httpx.AsyncClient(base_url=decode.url) as dc,
    ):
        out = await _prefill(pc)
        ktp = out["kv_transfer_params"]
        assert ktp["do_remote_prefill"] is True and ktp["do_remote_decode"] is False
        assert ktp["remote_engine_id"] == prefill.runtime.engine_uuid
        assert ktp["remote_host"] == "127.0.0.1"
        assert ktp["remote_port"] == prefill.runtime.side_port
        assert ktp["tp_size"] == 1
        assert len(ktp["remote_block_ids"]) == 13  # 12 full blocks + the partial one
        assert out["usage"]["completion_tokens"] == 1
        assert len(prefill.runtime.pins) == 1
        used = (await pc.get("/metrics")).text
        assert _metric(used, "vllm:kv_cache_usage_perc") > 0  # pinned blocks stay allocated

        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "kv_transfer_params": ktp}
        r = await dc.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        text = (await dc.get("/metrics")).text
        assert _metric(text, "kvroute_emulator_kv_pulls_total") == 1
        assert _metric(text, "kvroute_emulator_remote_prefill_fallbacks_total") == 0
        # The decode pod computed no prompt blocks itself: it cached the pulled ones.
        assert decode.runtime.engine.prefix_hit_blocks(token_block_keys(PROMPT, 16)) == 12
        await until(lambda: len(prefill.runtime.pins) == 0, what="release after the pull")


async def test_expired_transfer_falls_back_to_local_prefill(start_pod) -> None:  # type: ignore[no-untyped-def]
    prefill: EmulatorPod = await start_pod(role="prefill", kv_pin_timeout_s=0.5)  # 10 ms wall
    decode: EmulatorPod = await start_pod(role="decode")
    async with (
        httpx.AsyncClient(base_url=prefill.url) as pc,
        httpx.AsyncClient(base_url=decode.url) as dc,
    ):
        ktp = (await _prefill(pc))["kv_transfer_params"]
        await until(lambda: len(prefill.runtime.pins) == 0, what="the pin to expire")
        assert _metric((await pc.get("/metrics")).text, "kvroute_emulator_kv_pins_expired") == 1
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "kv_transfer_params": ktp}
        r = await dc.post("/v1/completions", json=body)
        assert r.status_code == 200
        text = (await dc.get("/metrics")).text
        assert _metric(text, "kvroute_emulator_remote_prefill_fallbacks_total", "expired") == 1
        assert _metric(text, "kvroute_emulator_kv_pulls_total") == 0


async def test_unknown_or_unreachable_transfer_falls_back(start_pod) -> None:  # type: ignore[no-untyped-def]
    prefill: EmulatorPod = await start_pod(role="prefill")
    decode: EmulatorPod = await start_pod(role="decode")
    bogus = {
        "do_remote_prefill": True,
        "remote_engine_id": prefill.runtime.engine_uuid,
        "remote_block_ids": [1, 2],
        "remote_host": "127.0.0.1",
        "remote_port": prefill.runtime.side_port,
        "remote_request_id": "nope",
    }
    closed = dict(bogus, remote_port=1)
    async with httpx.AsyncClient(base_url=decode.url) as dc:
        for params in (bogus, closed, {"do_remote_prefill": True}):
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": params}
            assert (await dc.post("/v1/completions", json=body)).status_code == 200
        text = (await dc.get("/metrics")).text
    assert _metric(text, "kvroute_emulator_remote_prefill_fallbacks_total", "missing") == 2
    assert _metric(text, "kvroute_emulator_remote_prefill_fallbacks_total", "unreachable") == 1


async def test_plain_request_on_a_prefill_pod_does_not_leak_blocks(start_pod) -> None:  # type: ignore[no-untyped-def]
    prefill: EmulatorPod = await start_pod(role="prefill")
    async with httpx.AsyncClient(base_url=prefill.url) as pc:
        r = await pc.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT})
        assert r.status_code == 200 and r.json()["kv_transfer_params"] is None
        await asyncio.sleep(0.01)
        assert prefill.runtime.engine.metrics().used_blocks == 0
