"""Which HTTP client should the proxy use to talk to pods? Measured, not assumed.

Method: a zero-latency pod (benchmarks/zero_latency_pod.py) in one process; a minimal FastAPI
forwarder on uvicorn (uvloop, httptools) in another, reading the body and POSTing it to the pod
with the client under test, then returning the pod's body; a closed-loop aiohttp load at
concurrency 32 (and 1 for latency) from this process. Each variant runs `--runs` times
(median reported); "direct" hits the pod with no forwarder, as the ceiling of the rig.

Variants: `httpx` (httpx.AsyncClient, keep-alive pool of 256), `httpx-defaults` (its default
pool), `aiohttp` (one ClientSession with a keep-alive TCPConnector of 256).

Result on the 2-core dev machine (3 interleaved runs of 3 s, median; "SSE" = a streamed answer
relayed chunk by chunk; CPU = the forwarder process's CPU time per request at c=32, which does
not depend on what else the machine runs). The proxy uses aiohttp because of it:

    client             c32 req/s   c1 p50 ms    vs httpx  CPU us/req   SSE req/s  SSE CPU us
    direct                12,015       0.209                              12,531
    httpx                    282       1.839       1.00x        3820         637        1632
    httpx-defaults           426       1.465       1.51x        2429         594        1753
    aiohttp                3,256       0.566      11.52x         250       2,672         361

Rig notes: the forwarder's listening socket gets TCP_NODELAY (accepted sockets inherit it;
uvicorn does not set it on a socket it is handed), else every keep-alive response waits out a
delayed ACK (~44 ms). Any failed request aborts the run: a forwarder answering 422 would
otherwise look fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_load import Child, closed_loop, cpu_seconds, python

HERE = Path(__file__).resolve().parent
BODY = json.dumps({"model": "m", "prompt": "hello " * 20, "max_tokens": 1}).encode()
STREAM_BODY = json.dumps({"model": "m", "prompt": "hello " * 20, "stream": True}).encode()
CLIENTS = ("httpx", "httpx-defaults", "aiohttp")


def _forwarder_app(kind: str, upstream: str):
    import contextlib

    state: dict = {}
    url = f"http://{upstream}/v1/completions"
    headers = {"content-type": "application/json"}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        if kind == "httpx":
            import httpx

            state["c"] = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=256)
            )
        elif kind == "httpx-defaults":
            import httpx

            # httpx's default pool keeps only 20 idle connections: at c=32 the rest are
            # opened and closed per request.
            state["c"] = httpx.AsyncClient()
        else:
            import aiohttp

            state["c"] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, limit_per_host=256)
            )
        yield
        await state["c"].close() if kind == "aiohttp" else await state["c"].aclose()

    app = FastAPI(lifespan=lifespan)

    if kind != "aiohttp":

        @app.post("/v1/completions")
        async def fwd_httpx(request: Request) -> Response:
            r = await state["c"].post(url, content=await request.body(), headers=headers)
            return Response(r.content, r.status_code, media_type="application/json")

        @app.post("/stream")
        async def stream_httpx(request: Request) -> Response:
            client = state["c"]
            req = client.build_request("POST", url, content=await request.body(), headers=headers)
            r = await client.send(req, stream=True)

            async def chunks():
                try:
                    async for chunk in r.aiter_raw():
                        yield chunk
                finally:
                    await r.aclose()

            return StreamingResponse(chunks(), media_type="text/event-stream")

    else:

        @app.post("/v1/completions")
        async def fwd_aiohttp(request: Request) -> Response:
            body = await request.body()
            async with state["c"].post(url, data=body, headers=headers) as r:
                data = await r.read()
                return Response(data, r.status, media_type="application/json")

        @app.post("/stream")
        async def stream_aiohttp(request: Request) -> Response:
            r = await state["c"].post(url, data=await request.body(), headers=headers)

            async def chunks():
                try:
                    async for chunk in r.content.iter_any():
                        yield chunk
                finally:
                    r.release()

            return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


def _serve_forwarder(kind: str, upstream: str) -> None:
    import socket

    import uvicorn

    sock = socket.socket()
    # Accepted sockets inherit TCP_NODELAY; uvicorn does not set it on a socket it is handed.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        _forwarder_app(kind, upstream),
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    print("ready", port, flush=True)
    asyncio.run(server.serve(sockets=[sock]))


async def _measure(
    url: str, stream_url: str, seconds: float, pid: int | None
) -> tuple[float, float, float, float, float]:
    """(c32 requests/s, c1 p50 ms, forwarder CPU us per request during the c32 run, the same
    two for streamed answers)."""

    async def c32(target: str, body: bytes) -> tuple[float, float]:
        cpu0 = cpu_seconds(pid) if pid else 0.0
        run = await closed_loop(target, body, 32, seconds=seconds)
        if run.failed:
            raise SystemExit(f"{run.failed} of {run.requests} requests to {target} failed")
        cpu_us = (cpu_seconds(pid) - cpu0) / max(1, run.requests) * 1e6 if pid else 0.0
        return run.rps, cpu_us

    rps, cpu_us = await c32(url, BODY)
    c1 = await closed_loop(url, BODY, 1, count=1000)
    if c1.failed:
        raise SystemExit(f"{c1.failed} of {c1.requests} requests to {url} failed")
    stream_rps, stream_cpu_us = await c32(stream_url, STREAM_BODY)
    return rps, c1.percentile_ms(50), cpu_us, stream_rps, stream_cpu_us


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve-forwarder", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_forwarder:
        _serve_forwarder(args.serve_forwarder, args.upstream)
        return 0
    pod = Child(python(str(HERE / "zero_latency_pod.py")))
    upstream = f"127.0.0.1:{pod.ready[0]}"
    kinds = ("direct", *CLIENTS)
    samples: dict[str, list[tuple[float, ...]]] = {k: [] for k in kinds}
    try:
        # Interleaved (A B C A B C ...) so a noisy neighbour hits every variant alike.
        for _ in range(args.runs):
            for kind in kinds:
                fwd = None
                if kind == "direct":
                    url = stream_url = f"http://{upstream}/v1/completions"
                else:
                    fwd = Child(python(__file__, "--serve-forwarder", kind, "--upstream", upstream))
                    url = f"http://127.0.0.1:{fwd.ready[0]}/v1/completions"
                    stream_url = f"http://127.0.0.1:{fwd.ready[0]}/stream"
                try:
                    pid = fwd.proc.pid if fwd is not None else None
                    samples[kind].append(asyncio.run(_measure(url, stream_url, args.seconds, pid)))
                finally:
                    if fwd is not None:
                        fwd.stop()
    finally:
        pod.stop()
    results = {
        kind: {
            "rps_c32": round(statistics.median(x[0] for x in rows), 1),
            "p50_ms_c1": round(statistics.median(x[1] for x in rows), 3),
            "cpu_us_per_request": round(statistics.median(x[2] for x in rows), 1),
            "stream_rps_c32": round(statistics.median(x[3] for x in rows), 1),
            "stream_cpu_us_per_request": round(statistics.median(x[4] for x in rows), 1),
        }
        for kind, rows in samples.items()
    }
    base = results["httpx"]["rps_c32"]
    for kind in CLIENTS:
        results[kind]["vs_httpx"] = round(results[kind]["rps_c32"] / base, 2) if base else 0.0
    if args.json:
        print(json.dumps(results))
    else:
        head = ("client", "c32 req/s", "c1 p50 ms", "vs httpx", "CPU us/req", "SSE req/s",
                "SSE CPU us")  # fmt: skip
        print(f"{head[0]:<16}" + "".join(f"{h:>12}" for h in head[1:]))
        for kind, r in results.items():
            vs = f"{r['vs_httpx']:.2f}x" if "vs_httpx" in r else ""
            fwd = kind != "direct"
            cells = [
                f"{r['rps_c32']:,.0f}",
                f"{r['p50_ms_c1']:.3f}",
                vs,
                f"{r['cpu_us_per_request']:.0f}" if fwd else "",
                f"{r['stream_rps_c32']:,.0f}",
                f"{r['stream_cpu_us_per_request']:.0f}" if fwd else "",
            ]
            print(f"{kind:<16}" + "".join(f"{c:>12}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
