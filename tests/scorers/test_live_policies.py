"""The peer policies' live configs behind the real proxy, against emulated vLLM pods (separate
processes speaking vLLM's API and publishing KV events): a multi-turn conversation stays on one
pod, as each peer's procedure intends, and every decision is explained."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import yaml

from router.config import parse_config
from router.emulator.fleet import EmulatedFleet
from router.proxy.app import ProxyApp, RunningServer
from router.proxy.settings import ProxySettings

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "policies"
SETTINGS = ProxySettings(health_interval_s=0.05, first_byte_timeout_s=5)
POLICIES = ("sglang-cache-aware", "vllm-kv-aware", "dynamo-kv-cost", "llm-d-precise")


def _live_config(name: str, fleet: EmulatedFleet) -> str:
    """The shipped config of `name`, with the fleet's pods and block keying put in."""
    doc = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    doc.update(fleet.config())
    return yaml.safe_dump(doc, sort_keys=False)


async def _conversation(app: ProxyApp, model: str, name: str) -> list[str]:
    """Four turns of one chat through the proxy; the pod each turn was sent to."""
    messages = [{"role": "system", "content": f"{name}: you answer briefly. " * 40}]
    picks = []
    async with (
        RunningServer(app) as server,
        httpx.AsyncClient(base_url=server.url, timeout=20) as client,
    ):
        for turn in range(4):
            messages.append({"role": "user", "content": f"question number {turn}"})
            body = {"model": model, "messages": messages, "max_tokens": 4}
            r = await client.post(
                "/v1/chat/completions", json=body, headers={"x-kvroute-debug": "1"}
            )
            assert r.status_code == 200, (name, r.text)
            picks.append(json.loads(r.headers["x-kvroute-decision"])["pick"])
            answer = r.json()["choices"][0]["message"]["content"]
            messages.append({"role": "assistant", "content": answer})
    return picks


async def test_each_peer_config_keeps_a_conversation_on_one_pod() -> None:
    async with EmulatedFleet(pods=3, speedup=50, events="bind") as fleet:
        endpoints = {p.endpoint for p in fleet.pods}
        for name in POLICIES:
            app = ProxyApp(parse_config(_live_config(name, fleet)), SETTINGS)
            picks = await _conversation(app, fleet.pods[0].model, name)
            assert len(set(picks)) == 1 and picks[0] in endpoints, (name, picks)
