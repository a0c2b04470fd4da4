"""EmulatorSettings and FaultSettings: everything one emulated pod can be told.

Times are emulated seconds (scaled by `speedup` to wall time) unless the name says `wall`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

OutputMode = Literal["random", "echo"]
OutputLength = Literal["max", "random"]


@dataclass(frozen=True, slots=True)
class FaultSettings:
    """Faults a pod injects (flags at start, `POST /admin/faults` on the admin port)."""

    #: Fraction of generation requests answered with `error_status` at once.
    error_rate: float = 0.0
    error_status: int = 503
    #: Fraction of generation requests delayed by `latency_spike_s` (wall) before the engine.
    latency_spike_rate: float = 0.0
    latency_spike_s: float = 1.0
    #: Break every stream (connection dropped, no `[DONE]`) after this many tokens; 0 = never.
    crash_after_tokens: int = 0
    #: With `crash_after_tokens`: exit the whole process instead of dropping one connection.
    crash_exits_process: bool = False
    #: Fraction of requests that stop sending after their first token for `stall_s` (wall).
    stall_rate: float = 0.0
    stall_s: float = 30.0
    #: Fraction of KV-event batches lost on the wire.
    drop_kv_events_rate: float = 0.0
    #: `/health` answers 503.
    unhealthy: bool = False
    #: `GET /metrics` answers 500 (a broken exporter) while the API keeps serving.
    metrics_error: bool = False

    def __post_init__(self) -> None:
        for name in ("error_rate", "latency_spike_rate", "stall_rate", "drop_kv_events_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"faults.{name} must be in [0, 1], got {value!r}")
        if self.error_status not in (500, 502, 503, 504, 429):
            raise ValueError(f"faults.error_status must be 429 or 5xx, got {self.error_status!r}")
        if self.latency_spike_s < 0 or self.stall_s < 0 or self.crash_after_tokens < 0:
            raise ValueError("faults: latency_spike_s, stall_s, crash_after_tokens must be >= 0")


@dataclass(frozen=True, slots=True)
class EmulatorSettings:
    host: str = "127.0.0.1"
    #: HTTP port of the OpenAI API (0 = a free port, reported on the ready line).
    port: int = 8000
    role: Literal["both", "prefill", "decode"] = "both"
    profile: str = "llama-3.1-8b-h100"
    #: Served model name (default: the profile's Hugging Face model name).
    model: str | None = None
    lora_adapters: tuple[str, ...] = ()
    max_loras: int = 4
    #: Emulated seconds per wall second (10 = ten times faster than the modelled GPU).
    speedup: float = 1.0
    seed: int = 0
    #: A Hugging Face tokenizer.json (or a directory holding one); None = built-in tokenizer.
    tokenizer: str | None = None
    #: tokenizer_config.json (or its directory) whose chat template renders chat prompts;
    #: None = the one beside `tokenizer`, if any.
    chat_template: str | None = None
    max_model_len: int = 131_072
    #: vLLM's --enable-prompt-tokens-details: usage carries `prompt_tokens_details:
    #: {cached_tokens}` when the engine found some of the prompt cached (left out when none
    #: was). Off by default, as in vLLM: usage then has `"prompt_tokens_details": null`.
    enable_prompt_tokens_details: bool = False
    #: Engine overrides (None = the profile's / vLLM's default).
    num_gpu_blocks: int | None = None
    #: Tokens per KV block (vLLM's --block-size; None = the profile's).
    block_size: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    output_mode: OutputMode = "random"
    #: "max": every request generates max_tokens (unless a stop string hits); "random": without
    #: `ignore_eos`, an EOS comes at a seeded uniform length in [min_tokens or 1, max_tokens].
    output_length: OutputLength = "max"
    default_max_tokens_completions: int = 16
    default_max_tokens_chat: int = 256
    # --- KV events
    #: PUB endpoint to connect to (a router's bound SUB), e.g. tcp://127.0.0.1:5557.
    events_connect: str | None = None
    #: PUB endpoint to bind, e.g. tcp://127.0.0.1:5557 (port 0 = free port).
    events_bind: str | None = None
    #: ROUTER endpoint to bind for replays (default with events: tcp://<host>:0).
    events_replay: str | None = None
    #: Topic of every batch; vLLM's default is empty. `{endpoint}` and `{model}` are filled in
    #: once the pod has bound its port: llm-d's convention is "kv@{endpoint}@{model}", which a
    #: router that binds one SUB for all pods needs to tell the pods apart.
    events_topic: str = ""
    #: "map" is vLLM 0.32's form (each event a map with a "type" key); "array" older releases'.
    events_wire_form: Literal["array", "map"] = "map"
    events_buffer_steps: int = 10_000
    #: With `events_connect`: batches are held until the router's SUB has subscribed, at most
    #: this long after the first one (a connecting PUB drops what it sends before: ZMQ's
    #: slow joiner); then they go out (and are lost if still nobody listens), as vLLM's do.
    events_connect_wait_s: float = 10.0
    #: Tokenize prompts of `tokenize_process.MIN_CHARS` or more in a child process (as vLLM's
    #: API server tokenizes apart from its engine core), so they never delay the pod's steps.
    #: Off by default: it costs a process per pod; the fair live benchmark turns it on.
    tokenize_process: bool = False
    # --- P/D
    #: Port of the KV side channel (P/D pulls between pods; 0 = free port).
    side_channel_port: int = 0
    # --- admin
    #: Port of the admin app (`GET|POST /admin/faults`); None = no admin surface at all,
    #: 0 = a free port. Never the API port: a router forwards clients there.
    admin_port: int | None = None
    #: How long a prefill pod keeps a finished request's blocks for its decode pod.
    kv_pin_timeout_s: float = 480.0
    kv_link_latency_s: float = 0.002
    kv_link_bandwidth_gbps: float = 25.0
    # --- metrics
    #: Also expose the deprecated names (vllm:gpu_cache_usage_perc, ...).
    old_metric_names: bool = False
    # --- driver
    #: How far ahead of the wall clock engine steps are computed (wall seconds).
    lookahead_wall_s: float = 0.002
    #: How far the engine clock may fall behind the wall clock before it jumps (wall seconds).
    max_lag_wall_s: float = 0.05
    #: Finish each timed wait with a short blocking sleep (asyncio timers are 1 ms coarse).
    precise_timers: bool = True
    faults: FaultSettings = field(default_factory=FaultSettings)

    def __post_init__(self) -> None:
        if self.role not in ("both", "prefill", "decode"):
            raise ValueError(f"role must be both, prefill or decode, got {self.role!r}")
        if self.speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {self.speedup!r}")
        if self.events_connect and self.events_bind:
            raise ValueError("give either events_connect or events_bind, not both")
        if self.output_mode not in ("random", "echo"):
            raise ValueError(f"output_mode must be random or echo, got {self.output_mode!r}")
        if self.output_length not in ("max", "random"):
            raise ValueError(f"output_length must be max or random, got {self.output_length!r}")
        if self.kv_pin_timeout_s <= 0 or self.kv_link_bandwidth_gbps <= 0:
            raise ValueError("kv_pin_timeout_s and kv_link_bandwidth_gbps must be > 0")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size!r}")
        try:
            self.events_topic.format(endpoint="h:1", model="m")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"events_topic {self.events_topic!r}: only {{endpoint}} and {{model}} can be "
                f"filled in ({exc!r})"
            ) from None
        if self.events_connect_wait_s < 0:
            raise ValueError(
                f"events_connect_wait_s must be >= 0, got {self.events_connect_wait_s!r}"
            )
        if self.events_wire_form not in ("array", "map"):
            raise ValueError(
                f"events_wire_form must be 'array' or 'map', got {self.events_wire_form!r}"
            )
        if self.max_model_len < 1 or self.max_loras < 1:
            raise ValueError("max_model_len and max_loras must be >= 1")
        if self.admin_port and self.admin_port in (self.port, self.side_channel_port):
            raise ValueError(
                f"admin_port {self.admin_port} must differ from the API and side-channel "
                "ports (a router forwards clients to the API port)"
            )

    @property
    def events_enabled(self) -> bool:
        return bool(self.events_connect or self.events_bind)
