"""What an idle `kvroute proxy` logs at the default level (target: nothing after start-up).

Starts `--pods` emulated pods (`router.emulator.fleet.EmulatedFleet`, KV events on), writes
their config, starts `kvroute proxy` on it as a child process at its default log level, waits
until `/ready` answers 200 (start-up is over), then lets it idle for `--seconds` while it
scrapes every pod every `--scrape-interval` seconds (the default 0.2 s: 5 Hz), and prints every
log line the proxy wrote after start-up, then how many. Exits 1 when there is any.

    python benchmarks/idle_logs.py [--pods 4] [--seconds 60] [--scrape-interval 0.2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import free_port

from router.emulator.fleet import EmulatedFleet


async def idle_log_lines(
    pods: int, seconds: float, scrape_interval_s: float | None, extra_config: dict | None = None
) -> tuple[list[str], list[str]]:
    """(start-up lines, lines after start-up) of an idle proxy in front of `pods` pods."""
    async with EmulatedFleet(pods=pods, speedup=50) as fleet:
        doc = fleet.config()
        if scrape_interval_s is not None:
            doc["scrape"] = {"interval_s": scrape_interval_s}
        doc.update(extra_config or {})
        with tempfile.TemporaryDirectory(prefix="kvroute-idle-") as tmp:
            config = Path(tmp) / "router.yaml"
            config.write_text(yaml.safe_dump(doc, sort_keys=False))
            port = free_port()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "router.cli",
                "proxy",
                "--config",
                str(config),
                "--port",
                str(port),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            lines: list[str] = []
            reader = asyncio.create_task(_read_lines(proc, lines))
            try:
                await _until_ready(f"http://127.0.0.1:{port}/ready", proc)
                # Lines written before /ready answered are start-up; give the pipe a moment.
                await asyncio.sleep(0.2)
                startup = len(lines)
                await asyncio.sleep(seconds)
                after = lines[startup:]
                return lines[:startup], list(after)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader


async def _read_lines(proc: asyncio.subprocess.Process, out: list[str]) -> None:
    assert proc.stderr is not None
    async for raw in proc.stderr:
        out.append(raw.decode("utf-8", "replace").rstrip("\n"))


async def _until_ready(url: str, proc: asyncio.subprocess.Process, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"the proxy exited with code {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the proxy was not ready within {timeout_s:g} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60.0, help="idle window after start-up")
    ap.add_argument(
        "--scrape-interval", type=float, default=None, help="scrape.interval_s (default 0.2)"
    )
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    startup, after = asyncio.run(idle_log_lines(args.pods, args.seconds, args.scrape_interval))
    if args.json:
        print(json.dumps({"startup_lines": startup, "idle_lines": after}))
    else:
        print(f"{len(startup)} log lines during start-up:")
        for line in startup:
            print(f"  {line}")
        print(f"{len(after)} log lines in {args.seconds:g} s idle with {args.pods} pods:")
        for line in after:
            print(f"  {line}")
    return 1 if after else 0


if __name__ == "__main__":
    sys.exit(main())
