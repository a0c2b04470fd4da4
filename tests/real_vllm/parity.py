"""Emulator-vs-vLLM parity: send the same requests to two pods, diff the answers field by field.

`collect(url, events)` sends a fixed set of requests (completions and chat, plain and
streamed, error cases, `/v1/models`, `/tokenize`, `/detokenize`, `/health`, `/ping`,
`/metrics`) and gathers the KV-event batches they caused; `diff_surfaces(vllm, emulator)`
compares two such collections and returns `Row(field, vllm, emulator)`s. Values that
legitimately differ (ids, timestamps, generated text and token ids of a random model, engine
hashes, fingerprints, paths) are compared by type only (`VOLATILE`); everything else by
value, including the order of object keys. Metrics are compared by family: type, label names
and, for enumerated labels (`reason`, `source`, ...), label values.

Run as a script to print the full table against pods a `python -m tests.real_vllm.vllm_pods
--describe FILE` process keeps up (an emulator pod is started in-process):

    python -m tests.real_vllm.parity --fleet FILE [--all]

`KNOWN_DIFFERENCES` are the rows the emulator keeps on purpose (README: "Emulator vs vLLM");
the parity tests fail on any other row.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

MODEL = "tiny"


@dataclass(frozen=True, slots=True)
class Row:
    """One difference: where, what vLLM showed, what the emulator showed."""

    field: str
    vllm: str
    emulator: str


# ----------------------------------------------------------------------------- diffing
#: Paths (fnmatch patterns over `surface.key[].key`) whose values differ legitimately:
#: compared by type only.
VOLATILE = (
    "*.id",
    "*.created",
    "*.system_fingerprint",
    "*.choices[].text",
    "*.message.content",
    "*.delta.content",
    "*.token_ids",
    "*.prompt_token_ids",
    # vLLM's root is the model path it loaded.
    "models.body.data[].root",
    "events.ts",
    "events.events[].block_hashes",
    "events.events[].parent_block_hash",
    # pydantic's own wording of a validation error (the type, param and code are compared).
    "error_bad_json*.error.message",
    "error_bad_json*.error.param",
    "error_wrong_type*.error.message",
    "version.body.version",
)


def shape(value: Any) -> str:
    """A value's JSON type as the table shows it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes):
        return "bytes"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=repr) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _volatile(path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, pat) for pat in VOLATILE)


def diff_json(vllm: Any, emu: Any, path: str) -> list[Row]:
    """Rows where `emu` differs from `vllm`: missing/extra/reordered keys, other types, other
    values (outside `VOLATILE`), other list lengths."""
    rows: list[Row] = []
    if _volatile(path):
        if shape(vllm) != shape(emu):
            rows.append(Row(path, shape(vllm), shape(emu)))
        return rows
    if isinstance(vllm, dict) and isinstance(emu, dict):
        for key in vllm:
            if key not in emu:
                rows.append(Row(f"{path}.{key}", shape(vllm[key]), "(absent)"))
        for key in emu:
            if key not in vllm:
                rows.append(Row(f"{path}.{key}", "(absent)", shape(emu[key])))
        common_v = [k for k in vllm if k in emu]
        common_e = [k for k in emu if k in vllm]
        if common_v != common_e:
            rows.append(Row(f"{path} (key order)", ",".join(common_v), ",".join(common_e)))
        for key in common_v:
            rows += diff_json(vllm[key], emu[key], f"{path}.{key}")
        return rows
    if isinstance(vllm, list | tuple) and isinstance(emu, list | tuple):
        if len(vllm) != len(emu):
            rows.append(Row(f"{path} (length)", str(len(vllm)), str(len(emu))))
        for a, b in zip(vllm, emu, strict=False):
            rows += diff_json(a, b, f"{path}[]")
        return rows
    if shape(vllm) != shape(emu):
        rows.append(Row(path, f"{shape(vllm)} {_show(vllm, 40)}", f"{shape(emu)} {_show(emu, 40)}"))
    elif vllm != emu:
        rows.append(Row(path, _show(vllm), _show(emu)))
    return rows


def dedupe(rows: list[Row]) -> list[Row]:
    """One row per field (repeated list items give the same row many times)."""
    seen: set[Row] = set()
    out = []
    for r in rows:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


#: Labels whose values are an enumeration worth comparing (the rest: names only).
ENUM_LABELS = frozenset({"reason", "source", "sleep_state", "finished_reason"})


def metric_families(text: str) -> dict[str, dict[str, Any]]:
    """`/metrics` text → family name → {type, labels (names), values (of ENUM_LABELS)}."""
    out: dict[str, dict[str, Any]] = {}
    for fam in text_string_to_metric_families(text):
        # vLLM's multiprocess registry shows each counter's `_created` as a gauge family of
        # its own; those are creation timestamps, not metrics anyone reads.
        if not fam.name.startswith("vllm:") or fam.name.endswith("_created"):
            continue
        labels: set[str] = set()
        values: dict[str, set[str]] = {}
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            for k, v in s.labels.items():
                if k in ("le", "quantile"):
                    continue
                labels.add(k)
                if k in ENUM_LABELS:
                    values.setdefault(k, set()).add(v)
        out[fam.name] = {"type": fam.type, "labels": labels, "values": values}
    return out


def diff_metrics(vllm_text: str, emu_text: str) -> list[Row]:
    a, b = metric_families(vllm_text), metric_families(emu_text)
    rows = []
    for name, fam in a.items():
        other = b.get(name)
        if other is None:
            rows.append(Row(f"metrics.{name}", fam["type"], "(absent)"))
            continue
        if fam["type"] != other["type"]:
            rows.append(Row(f"metrics.{name} type", fam["type"], other["type"]))
        if fam["labels"] != other["labels"]:
            rows.append(
                Row(
                    f"metrics.{name} labels",
                    ",".join(sorted(fam["labels"] - other["labels"])) or "-",
                    "missing: "
                    + (",".join(sorted(fam["labels"] - other["labels"])) or "-")
                    + "; extra: "
                    + (",".join(sorted(other["labels"] - fam["labels"])) or "-"),
                )
            )
        for label, vals in fam["values"].items():
            theirs = other["values"].get(label, set())
            if vals != theirs:
                rows.append(
                    Row(
                        f"metrics.{name} {label} values",
                        ",".join(sorted(vals)),
                        ",".join(sorted(theirs)) or "(none)",
                    )
                )
    for name, fam in b.items():
        if name not in a:
            rows.append(Row(f"metrics.{name}", "(absent)", fam["type"]))
    return rows


def diff_surfaces(vllm: dict[str, Any], emu: dict[str, Any]) -> list[Row]:
    """Rows over every surface two `collect` results share (metrics by family)."""
    rows: list[Row] = []
    for surface, value in vllm.items():
        if surface not in emu:
            rows.append(Row(surface, "collected", "(not collected)"))
            continue
        if surface == "metrics":
            rows += diff_metrics(value, emu[surface])
        else:
            rows += diff_json(value, emu[surface], surface)
    return dedupe(rows)


#: Rows the emulator keeps on purpose, with the reason (also in README "Emulator vs vLLM").
KNOWN_DIFFERENCES: dict[str, str] = {
    "metrics.vllm:estimated_flops_per_gpu": "MFU estimates need the real model's layer shapes",
    "metrics.vllm:estimated_read_bytes_per_gpu": "MFU estimates need the real model's shapes",
    "metrics.vllm:estimated_write_bytes_per_gpu": "MFU estimates need the real model's shapes",
    "metrics.vllm:iteration_tokens_total": "per-step token counts are not observed per step",
}


def unexplained(rows: list[Row]) -> list[Row]:
    return [r for r in rows if not any(r.field.startswith(k) for k in KNOWN_DIFFERENCES)]


def table(rows: list[Row], title: str = "") -> str:
    """A Markdown table (field | vLLM | emulator), known differences marked."""
    lines = [f"### {title}"] if title else []
    lines += ["| field | vLLM 0.32 | emulator |", "|---|---|---|"]
    for r in rows:
        known = next((v for k, v in KNOWN_DIFFERENCES.items() if r.field.startswith(k)), None)
        note = f" (kept: {known})" if known else ""
        cells = [c.replace("|", "\\|") for c in (r.field, r.vllm, r.emulator + note)]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append("| (no difference) | | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- requests
def prompt_words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(10**6)}" for _ in range(n))


def sse(text: str) -> list[Any]:
    out: list[Any] = []
    for event in text.split("\n\n"):
        if not event.strip():
            continue
        assert event.startswith("data: "), event[:80]
        payload = event[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


@dataclass
class EventSink:
    """A SUB socket that receives one pod's KV-event batches (bound or connected)."""

    endpoint: str
    bind: bool
    ctx: zmq.asyncio.Context = field(default_factory=zmq.asyncio.Context)
    sock: zmq.asyncio.Socket | None = None

    def open(self) -> None:
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.LINGER, 0)
        if self.bind:
            self.sock.bind(self.endpoint)
        else:
            self.sock.connect(self.endpoint)

    async def drain(self, quiet_s: float = 0.5) -> list[list[bytes]]:
        assert self.sock is not None
        out = []
        while await self.sock.poll(int(quiet_s * 1000)):
            out.append(await self.sock.recv_multipart())
        return out

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.ctx.term()


async def _join(client: httpx.AsyncClient, sink: EventSink, timeout_s: float = 60.0) -> None:
    """Send fresh small prompts until a batch arrives (a SUB joins a PUB asynchronously)."""
    deadline = time.monotonic() + timeout_s
    seed = 10_000
    while True:
        seed += 1
        body = {"model": MODEL, "prompt": prompt_words(60, seed), "max_tokens": 1}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        if await sink.drain(0.3):
            await sink.drain(0.3)
            return
        if time.monotonic() > deadline:
            raise AssertionError("no KV-event batch arrived from the pod")


def _decode_frames(frames: list[list[bytes]]) -> list[Any]:
    out = []
    for f in frames:
        out.append(
            {
                "frames": len(f),
                "seq_bytes": len(f[1]) if len(f) > 1 else None,
                "batch": msgspec.msgpack.decode(f[-1]),
            }
        )
    return out


def _events_view(frames: list[list[bytes]]) -> dict[str, Any]:
    """The first batch holding a BlockStored, as a comparable object: frame count, the
    batch's wire form (`[ts, [events], data_parallel_rank]`) by position, the events as sent
    (a map or an array each)."""
    for d in _decode_frames(frames):
        batch = d["batch"]
        if not isinstance(batch, list):
            return {"frames": d["frames"], "batch_form": shape(batch), "batch": batch}
        events = batch[1] if len(batch) > 1 else []
        if any(
            (isinstance(e, dict) and e.get("type") == "BlockStored")
            or (isinstance(e, list) and e and e[0] == "BlockStored")
            for e in events
        ):
            return {
                "frames": d["frames"],
                "seq_bytes": d["seq_bytes"],
                "batch_form": f"array of {len(batch)}",
                "ts": batch[0],
                "events": events,
                "data_parallel_rank": batch[2] if len(batch) > 2 else "(absent)",
            }
    return {"frames": None}


def _sse_view(chunks: list[Any]) -> dict[str, Any]:
    """A stream by role: first chunk, a middle one, the last content chunk, the usage chunk,
    the end marker, and how many content chunks (one per token in vLLM)."""
    done = chunks[-1] if chunks else None
    body = [c for c in chunks if isinstance(c, dict)]
    usage = [c for c in body if not c.get("choices")]
    content = [c for c in body if c.get("choices")]
    return {
        "content_chunks": len(content),
        "first": content[0] if content else None,
        "middle": content[1] if len(content) > 2 else None,
        "last": content[-1] if content else None,
        "usage": usage[-1] if usage else None,
        "done": done,
    }


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


async def collect(url: str, sink: EventSink, nonce: int) -> dict[str, Any]:
    """Everything compared, from one pod (the sink must already receive its batches).
    `nonce` seeds the event prompt: the same for both pods, new per comparison, so the
    prompt's blocks are not in the (long-lived) vLLM pod's cache yet."""
    # About 100 tokens (plus BOS): 3 full blocks of 32; 3 output tokens complete no block.
    event_prompt = prompt_words(20, nonce)
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120.0) as c:
        await _join(c, sink)

        async def js(name: str, method: str, path: str, **kw: Any) -> None:
            r = await c.request(method, path, **kw)
            out[name] = {
                "status": r.status_code,
                "content_type": r.headers.get("content-type"),
                "body": r.json() if r.content else None,
            }

        cmpl = {"model": MODEL, "prompt": event_prompt, "max_tokens": 3, "ignore_eos": True}
        await js("completion", "POST", "/v1/completions", json=cmpl)
        out["events"] = _events_view(await sink.drain())
        chat = {"model": MODEL, "messages": CHAT, "max_tokens": 3, "ignore_eos": True}
        await js("chat", "POST", "/v1/chat/completions", json=chat)
        stream = {"stream": True, "stream_options": {"include_usage": True}}
        for name, path, body in (
            ("completion_stream", "/v1/completions", {**cmpl, "prompt": "Once upon a time"}),
            ("chat_stream", "/v1/chat/completions", chat),
        ):
            r = await c.post(path, json={**body, **stream})
            out[name] = {
                "status": r.status_code,
                "content_type": r.headers.get("content-type"),
                **_sse_view(sse(r.text)),
            }
        over = prompt_words(2100, 3)
        errors = {
            "error_unknown_model": ("/v1/completions", {"model": "nope", "prompt": "hi"}),
            "error_unknown_model_chat": (
                "/v1/chat/completions",
                {"model": "nope", "messages": CHAT},
            ),
            "error_over_length": ("/v1/completions", {**cmpl, "prompt": over}),
            "error_over_length_chat": (
                "/v1/chat/completions",
                {**chat, "messages": [{"role": "user", "content": over}]},
            ),
            "error_wrong_type": ("/v1/completions", {**cmpl, "max_tokens": "five"}),
            "error_wrong_type_chat": ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}),
            "error_max_tokens_zero": ("/v1/completions", {**cmpl, "max_tokens": 0}),
            "error_missing_prompt": ("/v1/completions", {"model": MODEL}),
        }
        for name, (path, body) in errors.items():
            await js(name, "POST", path, json=body)
        for name, path in (
            ("error_bad_json", "/v1/completions"),
            ("error_bad_json_chat", "/v1/chat/completions"),
        ):
            hdr = {"content-type": "application/json"}
            await js(name, "POST", path, content=b"{not json", headers=hdr)
        await js("models", "GET", "/v1/models")
        await js("tokenize", "POST", "/tokenize", json={"model": MODEL, "prompt": "hello world"})
        await js("tokenize_chat", "POST", "/tokenize", json={"model": MODEL, "messages": CHAT})
        await js("detokenize", "POST", "/detokenize", json={"model": MODEL, "tokens": [5, 6, 7]})
        await js("version", "GET", "/version")
        for name, path in (("health", "/health"), ("ping", "/ping")):
            r = await c.get(path)
            out[name] = {"status": r.status_code, "body": r.text}
        out["metrics"] = (await c.get("/metrics")).text
    return out


def emulator_settings(tokenizer: str, events_endpoint: str, max_model_len: int) -> Any:
    """An emulator pod configured like the fixture's vLLM pods (model name, tokenizer, block
    size 32, context length), publishing KV events on `events_endpoint` (bound)."""
    from router.emulator.settings import EmulatorSettings

    names = {f.name for f in dataclasses.fields(EmulatorSettings)}
    extra: dict[str, Any] = {"block_size": 32} if "block_size" in names else {}
    return EmulatorSettings(
        port=0,
        model=MODEL,
        tokenizer=tokenizer,
        max_model_len=max_model_len,
        speedup=50.0,
        num_gpu_blocks=4096,
        events_bind=events_endpoint,
        **extra,
    )


@contextlib.asynccontextmanager
async def emulator_pod(tokenizer: str, max_model_len: int) -> AsyncIterator[tuple[Any, EventSink]]:
    from router.emulator.server import EmulatorPod

    pod = EmulatorPod(emulator_settings(tokenizer, "tcp://127.0.0.1:0", max_model_len))
    async with pod:
        assert pod.kv_events_endpoint is not None
        sink = EventSink(pod.kv_events_endpoint, bind=False)
        sink.open()
        try:
            yield pod, sink
        finally:
            sink.close()


async def compare(
    vllm_url: str,
    vllm_sink: EventSink,
    tokenizer: str,
    max_model_len: int,
    log: Callable[[str], None] = print,
) -> tuple[list[Row], dict[str, Any], dict[str, Any]]:
    nonce = random.randrange(10**9)
    real = await collect(vllm_url, vllm_sink, nonce)
    async with emulator_pod(tokenizer, max_model_len) as (pod, sink):
        emu = await collect(pod.url, sink, nonce)
    return diff_surfaces(real, emu), real, emu


def main() -> None:
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fleet", type=Path, required=True, help="a vllm_pods --describe file")
    ap.add_argument("--dump", type=Path, help="write both collections as JSON here")
    args = ap.parse_args()
    doc = json.loads(args.fleet.read_text())
    pod = doc["pods"][0]
    if doc["router_events_endpoint"]:
        sink = EventSink(doc["router_events_endpoint"], bind=True)
    else:
        sink = EventSink(pod["events_endpoint"].replace("*", "127.0.0.1"), bind=False)
    sink.open()
    tokenizer = str(Path(doc["model_dir"]) / "tokenizer.json")
    try:
        rows, real, emu = asyncio.run(
            compare(f"http://127.0.0.1:{pod['port']}", sink, tokenizer, 2048)
        )
    finally:
        sink.close()
    if args.dump:
        args.dump.write_text(json.dumps({"vllm": real, "emulator": emu}, indent=1, default=repr))
    print(table(rows, f"emulator vs vLLM: {len(rows)} rows, {len(unexplained(rows))} unexplained"))


if __name__ == "__main__":
    main()
