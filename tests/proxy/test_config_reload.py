"""Config reload of `kvroute proxy` (router/config_reload.py, router/proxy/reload.py) against
emulated pods: live swaps, refused files, what needs a restart, the metrics."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest

from router.config import load_config
from router.emulator.fleet import EmulatedFleet
from router.proxy.app import ProxyApp, RunningServer
from router.proxy.settings import ProxySettings

ROUND_ROBIN = """
plugins:
  - type: round-robin-picker
schedulingProfiles:
  - name: rr
    plugins: [{pluginRef: round-robin-picker}]
"""
CACHE_AWARE = """
plugins:
  - type: prefix-cache-scorer
  - type: max-score-picker
schedulingProfiles:
  - name: cache
    plugins:
      - {pluginRef: prefix-cache-scorer, weight: 3}
      - {pluginRef: max-score-picker}
"""


def _write(path: Path, fleet: EmulatedFleet, plugins: str, extra: str = "") -> None:
    pods = "".join(f"  - {{endpoint: '{p.endpoint}', models: ['{p.model}']}}\n" for p in fleet.pods)
    path.write_text(
        f"pods:\n{pods}prefix_index: {{mode: approximate}}\nproxy: {{retries: 1}}\n{plugins}{extra}"
    )


@pytest.fixture(autouse=True)
def _restore_logging():
    """A reload that changes `logging:` sets the process's logging up again: undo it."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
    root.setLevel(level)


async def _until(predicate, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def test_a_reload_swaps_the_scheduler_and_in_flight_requests_finish_on_the_old_one(
    tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="router.config_reload")
    path = tmp_path / "router.yaml"
    async with EmulatedFleet(pods=2, speedup=20, events="none") as fleet:
        model = fleet.pods[0].model
        _write(path, fleet, ROUND_ROBIN)
        app = ProxyApp(load_config(path), config_path=path)
        async with (
            RunningServer(app) as server,
            httpx.AsyncClient(base_url=server.url, timeout=30) as client,
        ):
            old = app.scheduler
            assert list(old.profiles) == ["rr"]
            completed: list[tuple[str, str]] = []  # (scheduler, prompt) per completion hook

            def watch(name: str, sched) -> None:
                inner = sched.on_complete

                def on_complete(decision, usage=None, now=None) -> None:
                    completed.append((name, decision.request.prompt))
                    inner(decision, usage, now)

                sched.on_complete = on_complete

            watch("old", old)
            body = {"model": model, "prompt": "a long story", "max_tokens": 60, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as stream:
                chunks = stream.aiter_lines()
                first = await anext(chunks)
                assert first.startswith("data: ")
                # Mid-stream: the file changes to another policy, and SIGHUP applies it.
                _write(path, fleet, CACHE_AWARE)
                os.kill(os.getpid(), signal.SIGHUP)
                await _until(lambda: app.reloader.results["success"] == 1)
                assert app.scheduler is not old
                assert list(app.scheduler.profiles) == ["cache"]
                watch("new", app.scheduler)
                # The keyer and the record of picks carry over to the new scheduler.
                assert app.scheduler.approx_index is old.approx_index
                assert app.scheduler.keyer is old.keyer
                rest = [line async for line in chunks if line.startswith("data: ")]
                assert rest[-1] == "data: [DONE]"
            # The old scheduler's hooks settled the request: no charge is left anywhere.
            assert all(p.inflight_requests == 0 for p in app.registry.all())
            r = await client.post(
                "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}
            )
            assert r.status_code == 200
            # The stream decided before the reload completed on the old scheduler.
            assert completed == [("old", "a long story"), ("new", "hi")]
            metrics = (await client.get("/metrics")).text
    assert 'kvroute_config_reloads_total{result="success"} 1.0' in metrics
    assert f'kvroute_config_hash{{hash="{app.reloader.hash}"}} 1.0' in metrics
    lines = [r.getMessage() for r in caplog.records if r.name == "router.config_reload"]
    assert len(lines) == 1
    assert "config reload (SIGHUP)" in lines[0]
    assert "applied plugins, profiles" in lines[0]


async def test_an_invalid_file_is_refused_and_the_last_valid_config_kept(tmp_path, caplog):
    path = tmp_path / "router.yaml"
    async with EmulatedFleet(pods=1, speedup=50, events="none") as fleet:
        model = fleet.pods[0].model
        _write(path, fleet, ROUND_ROBIN)
        # Told (on its command line) to use profile rr.
        app = ProxyApp(load_config(path), ProxySettings(profile="rr"), config_path=path)
        async with (
            RunningServer(app) as server,
            httpx.AsyncClient(base_url=server.url, timeout=30) as client,
        ):
            before, hash_before = app.scheduler, app.reloader.hash
            _write(path, fleet, ROUND_ROBIN, "tracing: {endpoint: 'collector:4318'}\n")
            assert not app.reloader.reload("test")
            _write(path, fleet, ROUND_ROBIN, "x: 1\n")
            assert not app.reloader.reload("test")
            # The profile the proxy uses must still exist.
            _write(path, fleet, CACHE_AWARE)
            assert not app.reloader.reload("test")
            assert app.scheduler is before and app.reloader.hash == hash_before
            assert app.reloader.results == {"success": 0, "failure": 3}
            r = await client.post(
                "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}
            )
            assert r.status_code == 200
            metrics = (await client.get("/metrics")).text
    assert 'kvroute_config_reloads_total{result="failure"} 3.0' in metrics
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("tracing.endpoint 'collector:4318' is not an http(s) URL" in e for e in errors)
    assert any("unknown field 'x'" in e for e in errors)
    assert any("proxy.profile 'rr' is not among" in e for e in errors)


async def test_a_file_change_is_seen_and_fields_that_need_a_restart_are_named(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="router.config_reload")
    path = tmp_path / "router.yaml"
    async with EmulatedFleet(pods=1, speedup=50, events="none") as fleet:
        _write(path, fleet, ROUND_ROBIN)
        app = ProxyApp(load_config(path), config_path=path)
        async with RunningServer(app):
            settings, upstream = app.settings, app.upstream
            text = path.read_text().replace(
                "proxy: {retries: 1}",
                "proxy: {retries: 3, port: 9999, pool_per_pod: 8}\n"
                "scrape: {interval_s: 0.5}\nlogging: {level: warning}",
            )
            path.write_text(text)
            await _until(lambda: app.reloader.results["success"] == 1)
            assert app.settings.retries == 3
            assert app.settings.port == settings.port  # not applied: needs a restart
            assert app.settings.pool_per_pod == settings.pool_per_pod
            assert app.upstream is upstream
            assert app.forwarder.settings.retries == 3
            assert app.reloader.config.scrape.interval_s == 0.2  # kept as it was
            assert logging.getLogger().level == logging.WARNING
    line = next(r.getMessage() for r in caplog.records if r.name == "router.config_reload")
    assert "config reload (file changed)" in line
    assert "applied proxy.retries, logging.level" in line
    restart = line.split("restart needed for ")[1]
    for name in ("proxy.port", "proxy.pool_per_pod", "scrape.interval_s"):
        assert name in restart


async def test_sighup_to_the_supervisor_reloads_every_worker(tmp_path):
    path = tmp_path / "router.yaml"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with EmulatedFleet(pods=1, speedup=50, events="none") as fleet:
        _write(path, fleet, ROUND_ROBIN)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router.cli", "proxy", "--config", str(path),
            "--port", str(port), "--workers", "2",
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
                workers: set[str] = set()
                for _ in range(400):  # until both workers answered (fresh connections)
                    try:
                        r = await c.get("/ready", headers={"connection": "close"})
                        workers.add(r.headers["x-kvroute-worker"])
                    except httpx.HTTPError:
                        pass
                    if len(workers) == 2:
                        break
                    await asyncio.sleep(0.05)
                assert len(workers) == 2
                _write(path, fleet, CACHE_AWARE)
                proc.send_signal(signal.SIGHUP)
                reloaded: set[str] = set()
                for _ in range(400):
                    r = await c.get("/metrics", headers={"connection": "close"})
                    if 'kvroute_config_reloads_total{result="success"} 1.0' in r.text:
                        reloaded.add(r.headers["x-kvroute-worker"])
                    if reloaded == workers:
                        break
                    await asyncio.sleep(0.05)
                assert reloaded == workers
        finally:
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
            stderr = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    assert code == 0, stderr
    # One reload line per worker, each tagged with its worker's pid (SIGHUP, or the file
    # change its poll saw first: whichever came first reloaded it).
    lines = [line for line in stderr.splitlines() if "config reload (" in line]
    tags = {m.group(1) for line in lines if (m := re.search(r"\[worker pid (\d+)\]", line))}
    assert tags == workers and len(lines) == 2, stderr


def test_a_reload_rebuilds_the_shadow_policies_with_the_scheduler(tmp_path):
    path = tmp_path / "router.yaml"
    pods = "pods:\n  - {endpoint: '127.0.0.1:1', models: [m]}\n"
    path.write_text(pods + "shadow_policies: [round-robin]\n")
    app = ProxyApp(load_config(path), config_path=path)  # not started: nothing to serve
    assert app.scheduler.shadows is not None
    assert app.scheduler.shadows.names == ["round-robin"]
    path.write_text(pods + "shadow_policies: [round-robin, sglang-cache-aware]\n")
    assert app.reloader.reload("test")
    assert app.scheduler.shadows.names == ["round-robin", "sglang-cache-aware"]
    path.write_text(pods + "shadow_policies: [no-such-policy]\n")
    assert not app.reloader.reload("test")
    assert "no-such-policy" in app.reloader.last_error
    assert app.scheduler.shadows.names == ["round-robin", "sglang-cache-aware"]
