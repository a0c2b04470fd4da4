"""The proxy against real emulator pods (separate processes speaking vLLM's API): a client,
pod faults injected through the emulator's admin port, and the P/D two-phase flow."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai

from router.config import parse_config
from router.emulator.fleet import EmulatedFleet
from router.proxy.app import ProxyApp, RunningServer
from router.proxy.settings import ProxySettings

SETTINGS = ProxySettings(health_interval_s=0.05, first_byte_timeout_s=5)
PD_PLUGINS = """
plugins:
  - type: pd-profile-handler
    parameters: {threshold: 0}
  - type: decode-filter
  - type: prefill-filter
  - type: max-score-picker
schedulingProfiles:
  - name: decode
    plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker}]
  - name: prefill
    plugins: [{pluginRef: prefill-filter}, {pluginRef: max-score-picker}]
"""


def _config(fleet: EmulatedFleet, extra: str = "") -> str:
    pods = "".join(
        f"  - {{endpoint: '{p.endpoint}', role: {p.role}, models: ['{p.model}']}}\n"
        for p in fleet.pods
    )
    return f"pods:\n{pods}prefix_index: {{mode: approximate}}\nscrape: {{interval_s: 0.1}}\n{extra}"


async def _until(predicate, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def test_emulated_pods_serve_clients_and_their_faults_are_handled():
    async with EmulatedFleet(pods=2, speedup=50, events="none", admin=True) as fleet:
        model = fleet.pods[0].model
        app = ProxyApp(parse_config(_config(fleet)), SETTINGS)
        async with (
            RunningServer(app) as server,
            httpx.AsyncClient(base_url=server.url, timeout=20) as client,
            openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as oai,
        ):
            chat = await oai.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi there"}], max_tokens=8
            )
            assert chat.usage.completion_tokens == 8
            stream = await oai.completions.create(
                model=model, prompt="once upon a time", max_tokens=6, stream=True
            )
            assert "".join([c.choices[0].text async for c in stream if c.choices])

            # Every pod breaks its streams after 2 tokens: the client's stream ends in an
            # error event, and service resumes once the fault is cleared.
            for p in fleet.pods:
                await client.post(f"{p.admin_url}/admin/faults", json={"crash_after_tokens": 2})
            body = {"model": model, "prompt": "tell me a story", "max_tokens": 12, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                events = [x async for x in r.aiter_lines() if x.startswith("data: ")]
            assert "error" in json.loads(events[-2][6:])
            for p in fleet.pods:
                await client.post(f"{p.admin_url}/admin/faults", json={"crash_after_tokens": 0})

            async def all_healthy() -> bool:
                return all(app.registry.get(p.endpoint).healthy for p in fleet.pods)

            await _until(all_healthy)

            # One pod answers 503 to everything: requests are retried on the other one.
            bad = fleet.pods[0]
            await client.post(f"{bad.admin_url}/admin/faults", json={"error_rate": 1.0})
            for _ in range(4):
                r = await client.post("/v1/completions", json={**body, "stream": False})
                assert r.status_code == 200
            await client.post(f"{bad.admin_url}/admin/faults", json={"error_rate": 0.0})


async def test_two_phase_prefill_then_decode_on_emulated_pd_pods():
    async with EmulatedFleet(pods=2, pd=(1, 1), speedup=50, events="none") as fleet:
        model = fleet.pods[0].model
        app = ProxyApp(parse_config(_config(fleet, PD_PLUGINS)), SETTINGS)
        prompt = "a long shared document about routing " * 60
        async with (
            RunningServer(app) as server,
            httpx.AsyncClient(base_url=server.url, timeout=20) as client,
        ):
            r = await client.post(
                "/v1/completions",
                json={"model": model, "prompt": prompt, "max_tokens": 5},
                headers={"x-kvroute-debug": "1"},
            )
            assert r.status_code == 200, r.text
            decision = json.loads(r.headers["x-kvroute-decision"])
            prefill = next(p for p in fleet.pods if p.role == "prefill")
            decode = next(p for p in fleet.pods if p.role == "decode")
            assert decision["prefill"] == prefill.endpoint and decision["pick"] == decode.endpoint
            assert r.json()["usage"]["completion_tokens"] == 5
            metrics = (await client.get("/metrics")).text
            assert 'kvroute_proxy_pd_requests_total{outcome="two_phase"} 1.0' in metrics
            pod_metrics = (await client.get(f"{decode.url}/metrics")).text
            # The decode pod pulled the prompt's KV from the prefill pod.
            assert "kvroute_emulator_kv_pulls_total 1.0" in pod_metrics


async def test_kv_events_steer_requests_to_the_pod_that_cached_the_prompt():
    async with EmulatedFleet(pods=2, speedup=50, events="bind") as fleet:
        # The fleet's own config: KV-event endpoints, token blocks on the pods' tokenizer.
        app = ProxyApp(parse_config(fleet.config_yaml() + "scrape: {interval_s: 0.1}\n"), SETTINGS)
        assert app.feeds.precise_index is not None
        model = fleet.pods[0].model
        warm = fleet.pods[1]
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "a long shared system prompt " * 80}],
            "max_tokens": 2,
        }
        async with (
            RunningServer(app) as server,
            httpx.AsyncClient(base_url=server.url, timeout=20) as client,
        ):
            # Warm one pod behind the proxy's back: only its KV events can tell the router.
            assert (await client.post(f"{warm.url}/v1/chat/completions", json=body)).is_success

            async def indexed() -> bool:
                return app.feeds.precise_index.pod_block_count(warm.endpoint) > 0

            await _until(indexed)
            r = await client.post(
                "/v1/chat/completions", json=body, headers={"x-kvroute-debug": "1"}
            )
            decision = json.loads(r.headers["x-kvroute-decision"])
        assert r.status_code == 200
        assert decision["pick"] == warm.endpoint
        assert max(p["hit"] for p in decision["top"]) > 0.9
