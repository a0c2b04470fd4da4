"""The command-line faces: `kvroute proxy` serves until SIGTERM, `kvroute loadgen` reports,
`kvroute demo --json` prints its contract and leaves no process behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import httpx

from router.loadgen import LoadSettings, run_load, tokens_to_text
from router.sim.traces import trace_workload
from router.sim.workloads import make_workload

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _cli(*args: str, **kw: object) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router.cli", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, **kw,
    )  # fmt: skip


async def test_proxy_command_serves_until_sigterm(pods, tmp_path):
    config = tmp_path / "router.yaml"
    config.write_text(
        "pods:\n" + "".join(f"  - {{endpoint: '{p.endpoint}', models: [m]}}\n" for p in pods)
    )
    port = _free_port()
    proc = await _cli("proxy", "--config", str(config), "--port", str(port))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            # Up to 30 s: on a loaded shared machine the interpreter alone takes seconds.
            for _ in range(600):
                try:
                    if (await client.get("/ready")).status_code == 200:
                        break
                except httpx.HTTPError:
                    await asyncio.sleep(0.05)
            r = await client.post(
                "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2}
            )
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "tok tok "
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 10)
    assert code == 0


async def test_proxy_command_rejects_a_bad_config_with_its_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("pods: []\nproxyy: {}\n")
    proc = await _cli("proxy", "--config", str(config))
    _out, err = await proc.communicate()
    assert proc.returncode == 2 and b"bad.yaml:2: unknown field 'proxyy'" in err


async def test_loadgen_replays_chat_sessions_with_the_real_replies(pods, proxy):
    workload = make_workload("multi-turn", num_requests=12, seed=3, min_turns=3, max_turns=3)
    async with proxy(pods) as (_app, client):
        settings = LoadSettings(base_url=str(client.base_url), model="m", concurrency=4)
        report = await run_load(workload, settings)
    summary = report.summary()
    assert summary["requests"] == 12 and summary["failed"] == 0
    assert summary["ttft_p50_s"] > 0 and summary["output_tokens"] > 0
    later = [r for p in pods for r in p.received if len(r.body["messages"]) == 3]
    assert later, "later turns carry the history"
    for rec in later:
        assert rec.body["messages"][1]["role"] == "assistant"
        assert rec.body["messages"][1]["content"].startswith("tok ")


def test_tokens_become_one_pseudo_word_each_and_equal_prefixes_stay_equal():
    a = tokens_to_text([1, 2, 3, 4])
    b = tokens_to_text([1, 2, 3, 9])
    assert len(a.split()) == 4 and a[: a.rindex(" ")] == b[: b.rindex(" ")]


async def test_demo_json_contract_and_cleanup():
    proc = await _cli(
        "demo", "--json", "--requests", "24", "--concurrency", "4", "--speedup", "25",
        start_new_session=True,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 80)
    assert proc.returncode == 0, err.decode()[-2000:]
    doc = json.loads(out)
    for name in ("round_robin", "cache_aware"):
        for key in ("requests", "failed", "hit_rate", "ttft_p50_s", "ttft_p95_s",
                    "output_tokens_per_s"):  # fmt: skip
            assert key in doc[name]
        assert doc[name]["requests"] == 24 and doc[name]["failed"] == 0
    assert doc["cache_aware"]["hit_rate"] > doc["round_robin"]["hit_rate"]
    # Nothing of the demo's process group survives it.
    try:
        os.killpg(proc.pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive


async def test_loadgen_replays_a_mooncake_trace_open_loop_as_token_prompts(pods, proxy, tmp_path):
    trace = tmp_path / "trace.jsonl"
    lines = [
        {"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]},
        {"timestamp": 10, "input_length": 700, "output_length": 3, "hash_ids": [1, 3]},
        {"timestamp": 20, "input_length": 100, "output_length": 3, "hash_ids": [4]},
    ]
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    workload = trace_workload(trace)
    async with proxy(pods) as (_app, client):
        settings = LoadSettings(
            base_url=str(client.base_url),
            model="m",
            api="completions",
            rate=50.0,
            concurrency=None,
        )
        summary = (await run_load(workload, settings)).summary()
    assert summary["requests"] == 3 and summary["failed"] == 0
    prompts = [r.body["prompt"] for p in pods for r in p.received]
    assert sorted(len(x) for x in prompts) == [100, 600, 700]
    assert all(isinstance(t, int) for x in prompts for t in x)
