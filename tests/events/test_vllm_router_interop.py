"""Interop: vllm-router (PyPI, Rust — written by others) consumes our publisher's KV events.

Set-up, all on 127.0.0.1: two stand-in workers (http.server threads) that answer `/health`,
`/v1/models`, vLLM's `/v1/completions/render` (prompt → token ids with a tiny WordLevel
tokenizer built here) and `/v1/completions` (answering with their own name); one
`KVEventPublisher` per worker, bound; `vllm-router --policy kv_aware --kv-event-source
WORKER=tcp://...` connecting to them. We publish `BlockStored` for a prompt's tokens on one
worker and check the router sends that prompt there — and, after `BlockRemoved`, elsewhere.

vllm-router 0.1.17 accepts only the newer vLLM wire form (events as maps with a "type" key in
an array batch) and rejects the older array-form events ("KV event must be a tagged map"), so
the publisher runs with `wire_form="map"`; our subscriber accepts both.

Skipped when the `vllm-router` binary is not installed (`pip install vllm-router`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from router.events.publisher import KVEventPublisher
from router.events.types import BlockRemoved, BlockStored

VLLM_ROUTER = shutil.which("vllm-router")
pytestmark = pytest.mark.skipif(VLLM_ROUTER is None, reason="vllm-router is not installed")

BLOCK = 16


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(4000)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return tok


class StandInWorker:
    """A vLLM stand-in that renders prompts to token ids and records completions it serves."""

    def __init__(self, name: str, tokenizer) -> None:
        self.name = name
        self.served: list[str] = []
        worker = self

        class Handler(BaseHTTPRequestHandler):
            def _json(self, obj: object) -> None:
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path.startswith("/v1/models"):
                    self._json({"object": "list", "data": [{"id": "tiny", "object": "model"}]})
                else:
                    self._json({"status": "ok"})

            def do_POST(self) -> None:
                req = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                if self.path == "/v1/completions/render":
                    ids = tokenizer.encode(req["prompt"]).ids
                    self._json([{"token_ids": ids, "sampling_params": {}, "request_id": "r"}])
                    return
                worker.served.append(req.get("prompt", ""))
                self._json(
                    {
                        "id": "cmpl",
                        "object": "text_completion",
                        "model": req.get("model"),
                        "choices": [{"index": 0, "text": worker.name, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                )

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def complete(router_url: str, prompt: str) -> str:
    req = urllib.request.Request(
        f"{router_url}/v1/completions",
        data=json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 1}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["choices"][0]["text"]


class Fleet:
    def __init__(self, tmp: Path) -> None:
        self.tok = build_tokenizer(tmp / "tiny-model")
        self.workers = {n: StandInWorker(n, self.tok) for n in ("A", "B")}
        self.pubs = {
            n: KVEventPublisher("tcp://127.0.0.1:*", bind=True, wire_form="map")
            for n in self.workers
        }
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = tmp / "vllm-router.log"
        cmd = [
            str(VLLM_ROUTER),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--policy",
            "kv_aware",
            "--kv-event-block-size",
            str(BLOCK),
            "--kv-event-model",
            str(tmp / "tiny-model"),
            "--log-level",
            "debug",
            "--worker-urls",
            *(w.url for w in self.workers.values()),
        ]
        for n, w in self.workers.items():
            cmd += ["--kv-event-source", f"{w.url}={self.pubs[n].endpoint}"]
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in close())
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.hashes = iter(range(1, 1 << 40))
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vllm-router exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"vllm-router not healthy:\n{self.log_tail()}")

    def log_tail(self) -> str:
        self.log.flush()
        return "".join(self.log_path.read_text().splitlines(keepends=True)[-20:])

    def prompt(self, seed: int, words: int = 70) -> tuple[str, list[int]]:
        text = " ".join(f"w{(seed * 131 + i * 7) % 3999 + 1}" for i in range(words))
        return text, self.tok.encode(text).ids

    def store(self, worker: str, ids: list[int]) -> list[int]:
        n = len(ids) // BLOCK
        hashes = [next(self.hashes) for _ in range(n)]
        self.pubs[worker].publish([BlockStored(hashes, None, ids[: n * BLOCK], BLOCK, None, "GPU")])
        return hashes

    def wait_subscribed(self) -> None:
        """Until each worker's events demonstrably reach the router (ZMQ joins asynchronously).

        Each probe uses a fresh prompt, so a probe routed before its events arrived (and the
        router's speculative entries for it) cannot affect later prompts."""
        seed = 10_000
        for name in self.workers:
            deadline = time.monotonic() + 10
            while True:
                seed += 1
                text, ids = self.prompt(seed)
                self.store(name, ids)
                time.sleep(0.05)
                if complete(self.url, text) == name:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"events for {name} never reached vllm-router")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        for pub in self.pubs.values():
            pub.close()
        for w in self.workers.values():
            w.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.close()


def test_vllm_router_routes_to_the_worker_our_events_say_holds_the_prefix(fleet: Fleet) -> None:
    fleet.wait_subscribed()
    for seed, worker in ((1, "B"), (2, "A"), (3, "B"), (4, "A")):
        text, ids = fleet.prompt(seed)
        fleet.store(worker, ids)
        time.sleep(0.05)
        assert complete(fleet.url, text) == worker, fleet.log_tail()


def test_vllm_router_applies_our_block_removed(fleet: Fleet) -> None:
    fleet.wait_subscribed()
    text, ids = fleet.prompt(7)
    fleet.store("A", ids[: 2 * BLOCK])  # A holds 2 blocks of the prefix
    fleet.store("B", ids)  # B holds all 4
    time.sleep(0.05)
    assert complete(fleet.url, text) == "B", fleet.log_tail()
    text2, ids2 = fleet.prompt(8)
    fleet.store("A", ids2[: 2 * BLOCK])
    b2 = fleet.store("B", ids2)
    fleet.pubs["B"].publish([BlockRemoved([b2[0]], "GPU")])  # B loses the first block
    time.sleep(0.05)
    assert complete(fleet.url, text2) == "A", fleet.log_tail()
