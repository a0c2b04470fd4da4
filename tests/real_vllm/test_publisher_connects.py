"""vLLM's publisher in connect mode, on real pods: each pod's `--kv-events-config` names the
router's SUB address (a concrete `tcp://127.0.0.1:PORT`, no `*`: vLLM then connects its PUB
instead of binding it), the router binds that SUB (`events: {mode: bind}`, llm-d's
convention), and batches of every pod arrive, attributed by topic `kv@<pod>@<model>`."""

from __future__ import annotations

import json

import httpx
import zmq

from tests.real_vllm.conftest import unique_text, wait_for
from tests.real_vllm.test_precise_routing import router_keys
from tests.real_vllm.vllm_pods import MODEL_NAME, VllmFleet


async def test_pods_connecting_their_pub_deliver_batches_to_the_bound_sub(
    real_proxy, vllm_fleet: VllmFleet
) -> None:
    assert vllm_fleet.router_events_endpoint is not None
    for pod in vllm_fleet.pods:
        cmd = pod.command()
        config = json.loads(cmd[cmd.index("--kv-events-config") + 1])
        assert config["endpoint"] == vllm_fleet.router_events_endpoint
        assert "*" not in config["endpoint"] and config["publisher"] == "zmq"
    async with real_proxy() as (app, _client):
        sub = app.feeds.subscriber
        assert sub is not None and sub.settings.mode == "bind"
        assert sub.endpoint == vllm_fleet.router_events_endpoint
        assert sub._bound is not None and sub._bound.type == zmq.SUB
        assert not sub._pod_sockets  # one bound socket, no per-pod connections
        index = app.feeds.precise_index
        async with httpx.AsyncClient(timeout=120) as direct:
            for pod in vllm_fleet.pods:
                before = sub.feed_state(pod.endpoint).batches
                body = {"model": MODEL_NAME, "prompt": unique_text(70), "max_tokens": 1}
                r = await direct.post(f"{pod.url}/v1/completions", json=body)
                assert r.status_code == 200, r.text
                keys = router_keys(app, "/v1/completions", body)
                await wait_for(
                    lambda p=pod, k=keys: index.longest_prefix(k).get(p.endpoint, 0) == len(k),
                    30,
                    f"{pod.endpoint}'s blocks",
                )
                assert sub.feed_state(pod.endpoint).batches > before
                # Attributed by the topic alone: the pod id and model name it carries.
                assert sub.models[pod.endpoint] == MODEL_NAME
                assert index.longest_prefix(keys) == {pod.endpoint: float(len(keys))}
        assert sub.stats.unknown_pods == 0 and sub.stats.malformed_messages == 0
