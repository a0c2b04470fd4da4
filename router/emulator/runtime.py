"""PodRuntime: one pod's parts (engine, driver, tokenizer, metrics, events, faults, P/D) and
the request preparation the HTTP routes share.

`prepare` turns a parsed request into engine work: the prompts (a completions batch gives
several), token ids, the output plan of every choice (`n` per prompt), the P/D role's changes
(a prefill pod runs one token and pins; a decode pod pulls), and the checks vLLM makes (context
length, sampling fields). Errors are `RequestError`s with vLLM's 400 wording where it has one.
`prepare_async` is the same with long prompts tokenized in the pod's tokenizer process when
`settings.tokenize_process` is on (router/emulator/tokenize_process.py), off the step loop.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from router.blocks import token_block_keys
from router.emulator import errors as vllm_errors
from router.emulator.driver import EngineDriver, Generation, Job
from router.emulator.faults import FaultState
from router.emulator.kv_transfer import KVPuller, PinnedTransfers
from router.emulator.metrics import PodMetrics
from router.emulator.output import OutputRequest, plan_output
from router.emulator.settings import EmulatorSettings
from router.emulator.tokenize_process import MIN_CHARS, TokenizeProcess
from router.emulator.tokenizer import EmulatorTokenizer, load_tokenizer
from router.events.publisher import KVEventPublisher
from router.events.types import KVEvent
from router.pods import Role
from router.request import ChatTemplate, RequestError, RoutingRequest
from router.sim.engine import Engine, EngineConfig, SimRequest
from router.sim.latency import LatencyModel, Profile, load_profile

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Prepared:
    """A request turned into engine work, plus what its answer needs."""

    req: RoutingRequest
    job: Job
    chat: bool
    #: Prompt tokens per prompt of the batch (usage counts each prompt once).
    prompt_tokens: list[int]
    #: Prompt text per choice, for completions `echo`.
    echo_text: list[str]
    include_usage: bool = False
    continuous_usage: bool = False
    #: Prefill role: pin the blocks for a decode pod and answer with kv_transfer_params.
    pin_for_decode: bool = False
    #: Decode side: the remote-prefill params to act on (None = local prefill).
    remote_prefill: dict[str, Any] | None = None
    block_keys: dict[str, list[int]] = field(default_factory=dict)
    created: int = 0
    #: `finish_job` ran (pins registered or freed).
    closed: bool = False


class PodRuntime:
    def __init__(self, settings: EmulatorSettings) -> None:
        self.settings = settings
        self.profile: Profile = load_profile(settings.profile)
        self.model = settings.model or self.profile.model.name
        self.adapters = frozenset(settings.lora_adapters)
        self.role = Role(settings.role)
        self.tokenizer: EmulatorTokenizer = load_tokenizer(settings.tokenizer)
        self.chat_template = (
            ChatTemplate.from_tokenizer_config(settings.chat_template)
            if settings.chat_template
            else ChatTemplate.beside_tokenizer(settings.tokenizer)
        )
        overrides: dict[str, Any] = {
            "role": self.role,
            "seed": settings.seed,
            "max_num_seqs": settings.max_num_seqs,
            "max_num_batched_tokens": settings.max_num_batched_tokens,
        }
        if settings.num_gpu_blocks is not None:
            overrides["num_gpu_blocks"] = settings.num_gpu_blocks
        if settings.block_size is not None:
            overrides["block_size"] = settings.block_size
        self.engine_config = EngineConfig.from_profile(self.profile, **overrides)
        self.tokenize_process = TokenizeProcess(
            settings.tokenizer, self.engine_config.block_size, settings.seed
        )
        self.engine = Engine(
            "emulator",
            self.engine_config,
            LatencyModel(self.profile),
            # The cache records events only if a sink exists when it is built.
            on_events=(lambda ev, ts: self.driver.on_engine_events(ev, ts))
            if settings.events_enabled
            else None,
        )
        self.faults = FaultState(settings.faults, settings.seed)
        self.publisher: KVEventPublisher | None = None
        self.metrics = PodMetrics(
            self.engine,
            self.model,
            max_loras=settings.max_loras,
            old_names=settings.old_metric_names,
            waiting_extra=lambda: self.delayed,
        )
        self.driver = EngineDriver(
            self.engine,
            speedup=settings.speedup,
            lookahead_wall_s=settings.lookahead_wall_s,
            max_lag_wall_s=settings.max_lag_wall_s,
            precise_timers=settings.precise_timers,
            publish=self._publish,
            on_kv_pulled=self._kv_pulled,
            observer=self.metrics,
        )
        self.metrics.lag_jumps = lambda: self.driver.lag_jumps
        self.pins = PinnedTransfers(
            self.driver.release,
            settings.kv_pin_timeout_s / settings.speedup,
            on_expired=lambda _rid: self.metrics.kv_pins_expired.inc(),
        )
        self.puller = KVPuller(settings.kv_link_latency_s, settings.kv_link_bandwidth_gbps * 1e9)
        #: NIXL engine id of this pod (fresh per process, as vLLM's).
        self.engine_uuid = str(uuid.uuid4())
        self.host = settings.host
        self.port = settings.port
        self.side_port = settings.side_channel_port
        #: Requests held back by a latency-spike fault (reported as waiting).
        self.delayed = 0
        self._ids = itertools.count()

    # ------------------------------------------------------------------ events
    def attach_publisher(self, publisher: KVEventPublisher) -> None:
        self.publisher = publisher

    def _publish(self, events: list[KVEvent]) -> None:
        pub = self.publisher
        if pub is None:
            return
        if self.faults.drop_event_batch():
            self.metrics.faults.labels("drop_kv_events").inc()
            pub.drop_next(1)
        pub.publish(events)

    def _kv_pulled(self, engine_id: str) -> None:
        self.metrics.kv_pulls.inc()
        self.puller.pulled(engine_id)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def served_models(self) -> list[str]:
        return [self.model, *sorted(self.adapters)]

    def close(self) -> None:
        """Stop the tokenizer process (the pod is stopping)."""
        self.tokenize_process.close()

    # ------------------------------------------------------------------ requests
    async def prepare_async(self, req: RoutingRequest) -> Prepared:
        """`prepare`, with prompts of `MIN_CHARS` or more tokenized and keyed in the tokenizer
        process while the event loop keeps running the engine's steps."""
        self._check_model(req)
        done: dict[int, tuple[np.ndarray, list[int]]] = {}
        for i, (text, ids) in enumerate(_prompts(req)):
            if (
                self.settings.tokenize_process
                and ids is None
                and text is not None
                and len(text) >= MIN_CHARS
            ):
                got = await self.tokenize_process.tokenize(
                    text, req.segments, req.kind == "chat", req.lora_adapter
                )
                if got is not None:
                    done[i] = got
        return self.prepare(req, done)

    def _check_model(self, req: RoutingRequest) -> None:
        if req.model != self.model and req.model not in self.adapters:
            raise vllm_errors.unknown_model(req.model, [self.model])

    def prepare(
        self,
        req: RoutingRequest,
        tokenized: dict[int, tuple[np.ndarray, list[int]]] | None = None,
    ) -> Prepared:
        """`tokenized`: (token ids, block keys) of prompts already tokenized, by position."""
        body = req.body
        self._check_model(req)
        chat = req.kind == "chat"
        n = _int_field(body, "n", 1, low=1)
        want_stop = _stop_field(body)
        stop_ids = tuple(_int_list(body, "stop_token_ids"))
        ignore_eos = _bool_field(body, "ignore_eos", False)
        min_tokens = _int_field(body, "min_tokens", 0, low=0)
        seed = body.get("seed")
        if seed is not None and (type(seed) is not int):
            raise RequestError(400, f"'seed' must be an integer, got {seed!r}")
        echo = (not chat) and _bool_field(body, "echo", False)
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise RequestError(400, "'stream_options' must be an object")
        opts = opts or {}
        if opts and not req.stream:
            raise RequestError(400, "Stream options can only be defined when `stream=True`.")
        ktp = body.get("kv_transfer_params")
        if ktp is not None and not isinstance(ktp, dict):
            raise RequestError(400, "'kv_transfer_params' must be an object")

        prompts = _prompts(req)
        s = self.settings
        pin = self.role == Role.PREFILL and bool(ktp and ktp.get("do_remote_decode"))
        remote = ktp if ktp and ktp.get("do_remote_prefill") and self.role != Role.PREFILL else None
        if remote is not None and (len(prompts) > 1 or n > 1):
            raise RequestError(400, "remote prefill (kv_transfer_params) needs one prompt, n=1")
        job = Job(req.request_id)
        prep = Prepared(
            req,
            job,
            chat,
            [],
            [],
            include_usage=bool(opts.get("include_usage")),
            continuous_usage=bool(opts.get("continuous_usage_stats")),
            pin_for_decode=pin,
            remote_prefill=remote,
            created=int(time.time()),
        )
        for position, (text, given) in enumerate(prompts):
            ids: list[int] | np.ndarray
            keys: list[int] | None = None
            if given is not None:
                ids = given
            elif tokenized and position in tokenized:
                ids, keys = tokenized[position]
            else:
                ids = self.tokenizer.encode_prompt(text or "", req.segments, chat)
            if len(ids) == 0:
                raise RequestError(400, "the prompt is empty after tokenization")
            max_tokens = req.max_tokens
            room = s.max_model_len - len(ids)
            if max_tokens is None:
                max_tokens = min(
                    s.default_max_tokens_chat if chat else s.default_max_tokens_completions,
                    max(room, 1),
                )
            if max_tokens < 1:
                raise vllm_errors.max_tokens_too_small(max_tokens)
            if len(ids) > s.max_model_len:
                raise vllm_errors.prompt_too_long(s.max_model_len, len(ids), text is not None)
            # vLLM 0.32 clamps max_tokens to the room left instead of refusing.
            max_tokens = min(max_tokens, max(room, 1))
            if self.role == Role.PREFILL:
                max_tokens = 1  # the engine's prefill role samples one token
            prep.prompt_tokens.append(len(ids))
            want = OutputRequest(max_tokens, want_stop, stop_ids, ignore_eos, min_tokens, seed)
            if keys is None:
                keys = token_block_keys(
                    ids, self.engine_config.block_size, s.seed, req.lora_adapter
                )
            for _ in range(n):
                index = len(job.generations)
                plan = plan_output(
                    self.tokenizer,
                    ids,
                    text,
                    want,
                    mode=s.output_mode,
                    length=s.output_length,
                    pod_seed=s.seed,
                    choice=index,
                )
                engine_id = f"{req.request_id}-{next(self._ids)}"
                sim = SimRequest(
                    engine_id,
                    ids,
                    plan.num_tokens,
                    lora=req.lora_adapter,
                    block_keys=list(keys),
                    output_token_ids=plan.token_ids,
                )
                prep.block_keys[engine_id] = keys
                job.generations.append(Generation(engine_id, index, plan, sim, job))
                prep.echo_text.append(
                    (text if text is not None else "".join(self.tokenizer.piece(t) for t in ids))
                    if echo
                    else ""
                )
        return prep

    async def attach_remote_prefill(self, prep: Prepared) -> None:
        """Decode side: check the transfer; on success the engine pulls, else local prefill."""
        params = prep.remote_prefill
        if params is None:
            return
        gen = prep.job.generations[0]
        grant, reason = await self.puller.check(params)
        if grant is not None and grant.block_keys != prep.block_keys[gen.engine_id]:
            grant, reason = None, "mismatch"
        if grant is None:
            self.metrics.remote_prefill_fallbacks.labels(reason).inc()
            log.info(
                "request %s: remote prefill unavailable (%s); prefilling locally",
                prep.req.request_id,
                reason,
            )
            prep.remote_prefill = None
            return
        gen.sim.kv_link = grant.link
        gen.sim.kv_source = grant.source
        self.puller.expect(gen.engine_id, grant.source, str(params["remote_request_id"]))

    def finish_job(self, prep: Prepared) -> dict[str, Any] | None:
        """After every choice finished: pin for the decode pod (prefill role) and return the
        kv_transfer_params of the answer, or free the blocks a plain request left pinned."""
        if self.role != Role.PREFILL or prep.closed:
            return None
        prep.closed = True
        params = None
        for gen in prep.job.generations:
            if gen.finished is None:
                continue
            if not prep.pin_for_decode:
                self.driver.release(gen.engine_id)
                continue
            block_ids = self.engine.pinned_blocks(gen.engine_id)
            self.pins.add(gen.engine_id, block_ids, prep.block_keys[gen.engine_id])
            params = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_block_ids": block_ids,
                "remote_engine_id": self.engine_uuid,
                "remote_request_id": gen.engine_id,
                "remote_host": self.host,
                "remote_port": self.side_port,
                "tp_size": self.profile.tp,
            }
        return params

    def abandon(self, prep: Prepared) -> None:
        """The client went away: drop whatever the engine still runs for this request."""
        for gen in prep.job.generations:
            if gen.finished is None:
                self.driver.abort(gen)
                self.puller.forget(gen.engine_id)
        self.finish_job(prep)


# ---------------------------------------------------------------------- body fields
def _prompts(req: RoutingRequest) -> list[tuple[str | None, list[int] | None]]:
    """(text, token ids) of each prompt; one of the two is None."""
    if req.kind == "chat":
        return [(req.prompt, None)]
    p = req.body.get("prompt")
    if isinstance(p, str):
        return [(p, None)]
    assert isinstance(p, list) and p  # parse_request checked
    if isinstance(p[0], str):
        return [(s, None) for s in p]
    if isinstance(p[0], list):
        out: list[tuple[str | None, list[int] | None]] = []
        for i, ids in enumerate(p):
            if not ids or any(type(t) is not int or t < 0 or t >= 1 << 32 for t in ids):
                raise RequestError(
                    400, f"'prompt[{i}]' must hold token ids (integers in [0, 2^32))"
                )
            out.append((None, ids))
        return out
    return [(None, p)]


def _int_field(body: dict[str, Any], name: str, default: int, low: int) -> int:
    v = body.get(name)
    if v is None:
        return default
    if type(v) is not int or v < low:
        raise RequestError(400, f"'{name}' must be an integer >= {low}, got {v!r}")
    return v


def _bool_field(body: dict[str, Any], name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(400, f"'{name}' must be a boolean, got {v!r}")
    return v


def _stop_field(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,) if v else ()
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(s for s in v if s)
    raise RequestError(400, f"'stop' must be a string or a list of strings, got {v!r}")


def _int_list(body: dict[str, Any], name: str) -> list[int]:
    v = body.get(name)
    if v is None:
        return []
    if not isinstance(v, list) or any(type(t) is not int for t in v):
        raise RequestError(400, f"'{name}' must be a list of integers, got {v!r}")
    return v
