"""Connect mode across processes: an emulated pod whose PUB connects to a router's bound SUB
delivers every batch, from the first one on (no ZMQ slow-joiner loss), and the config
`emulate fleet --events-connect ADDR` writes makes the router bind that SUB."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
import zmq
import zmq.asyncio

from router.config import load_config
from router.emulator.fleet import EmulatedFleet
from router.events.decode import decode_batch
from router.events.publisher import KVEventPublisher
from router.events.types import BlockStored
from router.proxy.app import ProxyApp, RunningServer
from router.proxy.settings import ProxySettings
from tests.emulator.conftest import MODEL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _pod_process(events_connect: str) -> tuple[asyncio.subprocess.Process, dict]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router.emulator", "pod", "--port", "0",
        "--events-connect", events_connect, "--events-topic", "kv@{endpoint}@{model}",
        "--speedup", "50", "--num-gpu-blocks", "4096", "--tokenizer", "builtin",
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        while True:
            line = await proc.stdout.readline()
            assert line, "pod exited before its ready line"
            if line.startswith(b"{"):
                info = json.loads(line)
                if info.get("event") == "ready":
                    return proc, info


@pytest.mark.parametrize("attempt", range(3))
async def test_connecting_pod_delivers_its_first_batches_to_a_sub_in_another_process(
    attempt: int,
) -> None:
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.setsockopt(zmq.LINGER, 0)
    sub.bind("tcp://127.0.0.1:0")
    endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)
    proc, info = await _pod_process(endpoint)
    prompts = [list(range(1000 * (i + 1), 1000 * (i + 1) + 32)) for i in range(5)]
    try:
        # Five different prompts at once after ready, as the failing check did: zero may be
        # lost (every batch is held until the subscription has reached the pod's PUB).
        async with httpx.AsyncClient(base_url=f"http://{info['endpoint']}", timeout=20) as c:
            for p in prompts:
                body = {"model": MODEL, "prompt": p, "max_tokens": 1}
                assert (await c.post("/v1/completions", json=body)).status_code == 200
        stored: list[list[int]] = []
        seqs: list[int] = []
        topics: set[bytes] = set()
        async with asyncio.timeout(10):
            while len(stored) < len(prompts):
                topic, seq, payload = await sub.recv_multipart()
                topics.add(topic)
                seqs.append(int.from_bytes(seq, "big"))
                for ev in decode_batch(payload).events:
                    if isinstance(ev, BlockStored):
                        stored.append(ev.token_ids)
    finally:
        proc.terminate()
        await proc.wait()
        sub.close()
        ctx.term()
    assert seqs == list(range(len(seqs))), seqs  # from seq 0, no gap
    assert stored == prompts
    assert topics == {f"kv@{info['endpoint']}@{MODEL}".encode()}


def test_publisher_without_subscriber_stops_holding_after_the_wait() -> None:
    """Nobody listening: after `wait_for_subscriber_s` batches go out (and are lost) as a
    vLLM PUB's would, instead of piling up."""
    addr = f"tcp://127.0.0.1:{_free_port()}"
    with KVEventPublisher(addr, bind=False, wait_for_subscriber_s=0.2) as pub:
        pub.publish([])
        assert not pub.subscribed
        deadline = time.monotonic() + 5
        while not pub.subscribed:
            assert time.monotonic() < deadline, "publisher kept holding batches"
            time.sleep(0.02)
        assert pub.publish([]) == 1


async def test_fleet_config_with_events_connect_makes_the_router_bind_and_hear_every_pod(
    tmp_path: Path,
) -> None:
    addr = f"tcp://127.0.0.1:{_free_port()}"
    path = tmp_path / "fleet.yaml"
    async with EmulatedFleet(2, events="connect", events_connect=addr, speedup=50) as fleet:
        fleet.write_config(path)
        config = load_config(path)
        assert config.events is not None
        assert (config.events.mode, config.events.endpoint) == ("bind", addr)
        assert config.blocks.mode == "tokens"
        app = ProxyApp(config, ProxySettings(health_interval_s=0.2))
        async with RunningServer(app), httpx.AsyncClient(timeout=20) as c:
            sub = app.feeds.subscriber
            assert sub is not None
            for i, pod in enumerate(fleet.pods):
                body = {"model": pod.model, "prompt": f"fleet pod {i} " * 40, "max_tokens": 1}
                assert (await c.post(f"{pod.url}/v1/completions", json=body)).status_code == 200
            async with asyncio.timeout(10):
                while not all(sub.feed_state(p.endpoint).batches for p in fleet.pods):
                    await asyncio.sleep(0.05)
    for pod in config.pods:
        assert pod.kv_events_endpoint is None  # the pods connect; the router binds
