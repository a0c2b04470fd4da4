"""Through a real Envoy: pod failure, the picker's live state feeds, health, metrics, shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import httpx
from echo_pod import MODEL
from envoy_stack import EnvoyStack, StackFactory, chat, pods_yaml, requires_envoy
from grpc_health.v1 import health_pb2, health_pb2_grpc

from envoy_extproc.server import EXT_PROC_SERVICE
from router.blocks import token_block_keys
from router.events.publisher import KVEventPublisher
from router.events.types import BlockStored

pytestmark = requires_envoy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def wait_for(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def health_status(s: EnvoyStack, service: str) -> int:
    assert s.picker.ports is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{s.picker.ports.health}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return resp.status


async def test_killed_pod_gets_503_then_traffic_moves_to_a_live_pod(
    envoy_stack: StackFactory,
) -> None:
    """Shipped retry policy: 1 retry on connect-failure/refused-stream/reset-before-request,
    which ORIGINAL_DST sends to the same (dead) address: the client sees a 503, the picker
    records the failure and ejects the pod (passive health); traffic moves."""
    prompt = "shared prefix for the dying pod " * 40
    async with envoy_stack() as s:
        r = await s.client.post("/v1/chat/completions", json=chat(prompt + "a"))
        victim = r.json()["served_by"]
        await s.pod(victim).stop()
        r = await s.client.post("/v1/chat/completions", json=chat(prompt + "b"))
        assert r.status_code == 503
        failed = s.decisions[-1]
        assert failed.target == victim
        assert failed._done
        assert s.picker.registry[victim].inflight_requests == 0
        errors = s.picker.metrics.registry.get_sample_value(
            "kvroute_request_errors_total", {"model": MODEL, "kind": "upstream_503"}
        )
        assert errors == 1
        await wait_for(lambda: not s.picker.registry[victim].healthy)
        r = await s.client.post("/v1/chat/completions", json=chat(prompt + "c"))
        assert r.status_code == 200
        assert r.json()["served_by"] != victim


async def test_passive_health_ejects_a_killed_pod_on_the_first_failure_and_readmits_it(
    envoy_stack: StackFactory,
) -> None:
    """The picker sees Envoy's 503 for the dead pod (tagged unreachable by the bootstrap) and
    ejects the pod at once, without waiting for the scraper; the client gets OpenAI error JSON
    and never the tag. Once the pod is back and its ejection over, it gets traffic again."""
    tail = "seed: 7\nscrape: {unhealthy_after: 1000}\nextproc: {outlier_base_ejection_s: 0.5}\n"
    prompt = "shared prefix for the dying pod " * 40
    async with envoy_stack(config_tail=tail) as s:
        assert s.picker.passive_health is not None
        r = await s.client.post("/v1/chat/completions", json=chat(prompt + "a"))
        victim = r.json()["served_by"]
        await s.pod(victim).stop()
        r = await s.client.post("/v1/chat/completions", json=chat(prompt + "b"))
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "upstream_unavailable"
        assert "x-kvroute-upstream-failure" not in r.headers
        # Ejected by the picker itself: the scraper would need 1000 failed scrapes.
        assert victim in s.picker.passive_health.ejected
        assert not s.picker.registry[victim].healthy
        for i in range(5):
            r = await s.client.post("/v1/chat/completions", json=chat(prompt + f"c{i}"))
            assert r.status_code == 200
            assert r.json()["served_by"] != victim
        await s.pod(victim).start()
        await wait_for(lambda: s.picker.registry[victim].healthy, 5)
        assert victim not in s.picker.passive_health.ejected
        # Back in the rotation: fresh prompts (the dying pod's prefix now lives elsewhere)
        # reach it again.
        served = set()
        for i in range(12):
            r = await s.client.post("/v1/chat/completions", json=chat(f"fresh prompt {i} " * 30))
            assert r.status_code == 200
            served.add(r.json()["served_by"])
        assert victim in served


async def test_one_pod_answering_500_is_not_ejected_by_a_single_request(
    envoy_stack: StackFactory,
) -> None:
    """A 5xx from the pod itself ejects only after several distinct requests in a row."""
    async with envoy_stack() as s:
        health = s.picker.passive_health
        assert health is not None
        r = await s.client.post("/v1/chat/completions", json=chat("pick a pod"))
        victim = r.json()["served_by"]
        for _ in range(3):  # the same request failing again is counted once
            health.record_failure(victim, 500, "one-bad-request", unreachable=False)
        assert victim not in health.ejected
        for i in range(health.outliers.policy.consecutive_5xx):
            health.record_failure(victim, 500, f"request-{i}", unreachable=False)
        assert victim in health.ejected
        assert not s.picker.registry[victim].healthy


async def test_graceful_shutdown_lets_an_open_stream_finish(envoy_stack: StackFactory) -> None:
    async with envoy_stack(chunk_interval_s=0.2) as s:
        assert await health_status(s, "readiness") == SERVING
        assert await health_status(s, EXT_PROC_SERVICE) == SERVING
        body = chat("long answer", stream=True)
        async with s.client.stream("POST", "/v1/chat/completions", json=body) as r:
            chunks = r.aiter_raw()
            first = await anext(chunks)
            assert b"served_by" in first
            stopping = asyncio.create_task(s.picker.stop(grace_s=5))
            await asyncio.sleep(0.1)
            assert not stopping.done()  # waiting for the open stream
            rest = b"".join([c async for c in chunks])
        assert rest.endswith(b"data: [DONE]\n\n")
        await stopping
        assert s.decisions[-1]._done
        # The picker is gone: Envoy (failure_mode_allow: false) refuses new requests.
        r = await s.client.post("/v1/chat/completions", json=chat("after"))
        assert r.status_code >= 500


async def test_readiness_is_not_serving_while_shutting_down(envoy_stack: StackFactory) -> None:
    async with envoy_stack(chunk_interval_s=0.3) as s:
        body = chat("slow", stream=True)
        async with s.client.stream("POST", "/v1/chat/completions", json=body) as r:
            chunks = r.aiter_raw()
            await anext(chunks)
            stopping = asyncio.create_task(s.picker.stop(grace_s=5))
            await asyncio.sleep(0.05)
            assert await health_status(s, "readiness") == NOT_SERVING
            assert await health_status(s, "liveness") == SERVING
            async for _ in chunks:
                pass
        await stopping


async def test_metrics_page_reports_requests_and_pool(envoy_stack: StackFactory) -> None:
    async with envoy_stack() as s:
        for i in range(3):
            await s.client.post("/v1/chat/completions", json=chat(f"m{i}"))
        assert s.picker.ports is not None
        async with httpx.AsyncClient() as c:
            page = (await c.get(f"http://127.0.0.1:{s.picker.ports.metrics}/metrics")).text
        assert (
            'kvroute_requests_total{model="test-model",profile="default",result="ok"} 3.0' in page
        )
        assert "kvroute_pool_ready_pods 3.0" in page
        assert "kvroute_scheduler_e2e_duration_seconds_count 3.0" in page
        assert "kvroute_scrapes_scrapes_ok_total" in page
        plugin = (
            "kvroute_scheduler_plugin_duration_seconds_count"
            '{kind="scorer",plugin="predicted-ttft-scorer",profile="default"} 3.0'
        )
        assert plugin in page


async def test_pods_removed_from_the_config_file_get_no_traffic(
    envoy_stack: StackFactory,
) -> None:
    async with envoy_stack() as s:
        keep = s.pods[:2]
        s.config_path.write_text(pods_yaml(keep) + "seed: 7\n")
        await wait_for(lambda: len(s.picker.registry) == 2, 5)
        for i in range(6):
            r = await s.client.post("/v1/chat/completions", json=chat(f"after reload {i}"))
            assert r.json()["served_by"] in {p.endpoint for p in keep}


def build_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(1000)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


async def test_kv_events_route_a_prefix_to_the_pod_that_reports_it(
    envoy_stack: StackFactory, tmp_path: Path
) -> None:
    """Pods name a KV-event endpoint: the picker subscribes (connect mode) and feeds the
    precise index; the pod whose events report a prompt's blocks gets that prompt."""
    tokenizer = build_tokenizer(tmp_path / "tok")
    pubs = [KVEventPublisher("tcp://127.0.0.1:*", bind=True) for _ in range(3)]
    tail = f"blocks: {{mode: tokens, block_size: 16, tokenizer_path: '{tokenizer}'}}\nseed: 7\n"
    fields = [{"kv_events_endpoint": pub.endpoint} for pub in pubs]
    tokens = list(range(100, 164))  # four full blocks of 16
    try:
        async with envoy_stack(config_tail=tail, pod_fields=fields) as s:
            assert s.picker.feeds.precise_index is not None
            holder = 2
            stored = BlockStored(
                block_hashes=[9001, 9002, 9003, 9004],
                parent_block_hash=None,
                token_ids=tokens,
                block_size=16,
            )
            keys = token_block_keys(tokens, 16)
            index = s.picker.feeds.precise_index

            def indexed() -> bool:
                pubs[holder].publish([stored])
                return index.longest_prefix(keys).get(s.pods[holder].endpoint) == 4

            await wait_for(indexed, 5)
            for i in range(3):
                body = {"model": MODEL, "prompt": [*tokens, 500 + i], "max_tokens": 4}
                r = await s.client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["served_by"] == s.pods[holder].endpoint
    finally:
        for pub in pubs:
            pub.close()


async def test_a_restarted_picker_routes_warm_prefixes_to_their_pods_from_the_replay_buffers(
    envoy_stack: StackFactory, tmp_path: Path
) -> None:
    """The pods cached six prefixes before this picker started (as if it had just been
    restarted): it reads their replay buffers on start, so each prefix goes back to its pod
    with no new KV event."""
    tokenizer = build_tokenizer(tmp_path / "tok")
    pubs = [
        KVEventPublisher("tcp://127.0.0.1:*", bind=True, replay_endpoint="tcp://127.0.0.1:*")
        for _ in range(3)
    ]
    # Prefix only: these short prompts would otherwise go where the load model prefers.
    tail = (
        f"blocks: {{mode: tokens, block_size: 16, tokenizer_path: '{tokenizer}'}}\nseed: 7\n"
        "plugins: [{type: single-profile-handler}, {type: prefix-cache-scorer},"
        " {type: max-score-picker}]\n"
        "schedulingProfiles: [{name: default, plugins: [{pluginRef: prefix-cache-scorer},"
        " {pluginRef: max-score-picker}]}]\n"
    )
    fields = [
        {"kv_events_endpoint": pub.endpoint, "kv_replay_endpoint": str(pub.replay_endpoint)}
        for pub in pubs
    ]
    prefixes = [list(range(100 + 64 * i, 164 + 64 * i)) for i in range(6)]  # 4 blocks each
    holders = [i % 3 for i in range(6)]
    try:
        for i, (tokens, holder) in enumerate(zip(prefixes, holders, strict=True)):
            stored = BlockStored(
                block_hashes=[9000 + 10 * i + j for j in range(4)],
                parent_block_hash=None,
                token_ids=tokens,
                block_size=16,
            )
            pubs[holder].publish([stored])
        async with envoy_stack(config_tail=tail, pod_fields=fields) as s:
            sub = s.picker.feeds.subscriber
            assert sub is not None
            assert sub.stats.replayed_batches == 6
            for i, (tokens, holder) in enumerate(zip(prefixes, holders, strict=True)):
                body = {"model": MODEL, "prompt": [*tokens, 900 + i], "max_tokens": 4}
                r = await s.client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["served_by"] == s.pods[holder].endpoint, i
    finally:
        for pub in pubs:
            pub.close()
