"""Shadow policies on the proxy against emulated pods: the debug header carries them and
`/metrics` exports the `kvroute_shadow_*` families."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from router.config import parse_config
from router.emulator.fleet import EmulatedFleet
from router.proxy.app import ProxyApp, RunningServer
from router.proxy.settings import ProxySettings

SETTINGS = ProxySettings(health_interval_s=0.05, first_byte_timeout_s=5)
ROUND_ROBIN = """
plugins: [{type: round-robin-picker}]
schedulingProfiles: [{name: default, plugins: [{pluginRef: round-robin-picker}]}]
shadow_policies: [round-robin, llm-d-default, sglang-cache-aware]
"""


def _samples(text: str) -> dict[tuple[str, str | None], float]:
    return {
        (s.name, s.labels.get("policy")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


async def test_shadow_picks_in_the_debug_header_and_metrics_on_emulated_pods() -> None:
    async with EmulatedFleet(pods=3, speedup=50, events="none") as fleet:
        pods = "".join(
            f"  - {{endpoint: '{p.endpoint}', models: ['{p.model}']}}\n" for p in fleet.pods
        )
        config = parse_config(f"pods:\n{pods}scrape: {{interval_s: 0.1}}\n{ROUND_ROBIN}")
        app = ProxyApp(config, SETTINGS)
        model = fleet.pods[0].model
        messages = [{"role": "system", "content": "a long shared system prompt " * 40}]
        headers = []
        async with (
            RunningServer(app) as server,
            httpx.AsyncClient(base_url=server.url, timeout=20) as client,
        ):
            for turn in range(4):  # one conversation: each turn extends the last prompt
                messages.append({"role": "user", "content": f"question {turn} " * 10})
                r = await client.post(
                    "/v1/chat/completions",
                    json={"model": model, "messages": messages, "max_tokens": 4},
                    headers={"x-kvroute-debug": "1"},
                )
                assert r.status_code == 200, r.text
                messages.append(r.json()["choices"][0]["message"])
                headers.append(json.loads(r.headers["x-kvroute-decision"]))
            samples = _samples((await client.get("/metrics")).text)

        for h in headers:
            shadows = {s["policy"]: s for s in h["shadows"]}
            assert list(shadows) == ["round-robin", "llm-d-default", "sglang-cache-aware"]
            # The same policy with its own cursor, from the same start: it agrees.
            assert shadows["round-robin"]["pick"] == h["pick"] and shadows["round-robin"]["agrees"]
        # Round-robin moved the conversation on every turn; the prefix-aware shadow would have
        # kept it on the pod holding it (the record of live picks says where that is).
        assert len({h["pick"] for h in headers}) == 3
        later = [{s["policy"]: s for s in h["shadows"]}["llm-d-default"] for h in headers[1:]]
        assert all(s["captured_tokens"] > 0 for s in later)
        for policy in ("round-robin", "llm-d-default", "sglang-cache-aware"):
            assert samples[("kvroute_shadow_requests_total", policy)] == 4
        assert samples[("kvroute_shadow_pick_agreement_total", "round-robin")] == 4
        assert samples[("kvroute_shadow_prefix_tokens_captured_total", "llm-d-default")] == sum(
            s["captured_tokens"] for s in later
        )
        assert samples[("kvroute_shadow_prompt_tokens_total", "llm-d-default")] > 0
        assert ("kvroute_shadow_live_prefix_tokens_captured_total", None) in samples
