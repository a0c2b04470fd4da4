"""OpenAI request bodies → `RoutingRequest`.

Owns the parse of `/v1/completions` and `/v1/chat/completions` bodies into the plain data the
scheduler routes on, the chat rendering that turns messages into the prompt text the engine
will see (`ChatTemplate`, or a plain rendering without one), and the one error type every face
maps to an HTTP answer. No I/O beyond reading a tokenizer config once at start-up.

Choices worth knowing:
- A completions `prompt` that is a batch (a list of strings, or a list of token-id lists) is
  routed on its first element, as a whole batch goes to one pod; `batch_size` says how many.
- Non-text chat content parts (images, audio, files...) become a marker
  `<|image:{xxh3 of the part's canonical JSON}|>` in the prompt, so equal images give equal
  blocks and different images diverge there.
- vLLM's body `priority` means "lower runs earlier"; ours (GAIE's) means "negative is shed
  first", so the body value enters negated. The priority header uses our convention directly.
- Text parts of one message are joined with "\\n", as vLLM does for string-format templates.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import OrderedDict
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from typing import Any, Literal

import msgspec
import xxhash
from jinja2 import TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

RequestKind = Literal["completions", "chat", "other"]
#: Answered by the router itself (the union of the pods' models), never sent to a pod.
MODELS_PATH = "/v1/models"
#: What the path policy says: route to a pod, or answer the model list.
PathAction = Literal["route", "models"]


class RequestError(Exception):
    """A request the router refuses; faces turn it into an OpenAI-shaped error response.

    `status` is the HTTP status (400 bad body, 404 unknown model, 413 too large, 429 shed,
    503 no pod); `code` a short machine-readable reason.
    """

    def __init__(
        self, status: int, message: str, code: str = "invalid_request", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        #: The body field at fault, when there is one (vLLM's `param`).
        self.param = param

    @property
    def error_type(self) -> str:
        if self.status == 429:
            return "rate_limit_error"
        if self.status >= 500:
            return "server_error"
        if self.status == 404:
            return "not_found_error"
        return "invalid_request_error"

    def to_json(self) -> dict[str, Any]:
        """OpenAI's error shape: {"error": {"message", "type", "code"}}."""
        return {"error": {"message": self.message, "type": self.error_type, "code": self.code}}


@dataclass(slots=True)
class RoutingRequest:
    model: str
    #: The prompt as the engine will see it (chat bodies rendered through the chat template).
    prompt: str
    #: `prompt` cut at message boundaries; "".join(segments) == prompt. Lets the tokenizer
    #: cache reuse the tokens of a conversation's earlier turns.
    segments: tuple[str, ...] = ()
    #: Token ids when the body gave them (completions with a token-list prompt).
    token_ids: list[int] | None = None
    max_tokens: int | None = None
    stream: bool = False
    session_key: str | None = None
    #: The LoRA adapter the request asks for (the `model` field names an adapter).
    lora_adapter: str | None = None
    request_id: str = ""
    kind: RequestKind = "completions"
    #: Negative = sheddable first under saturation (GAIE's criticality, as an int).
    priority: int = 0
    arrival: float = 0.0
    #: The parsed JSON body, for faces that forward or rewrite it.
    body: dict[str, Any] = field(default_factory=dict)
    #: Block keys, filled once by the scheduler's keyer and reused by every scorer.
    block_keys: list[int] | None = None
    #: Prompts in a completions batch; routing uses the first, the pod gets them all.
    batch_size: int = 1
    #: Prompt length in tokens once known (token ids given, or the keyer tokenized the prompt).
    token_count: int | None = None
    #: Seconds the keyer spent tokenizing and keying the prompt (`TokenizeWorker.prepare`).
    tokenize_s: float | None = None

    @property
    def sheddable(self) -> bool:
        return self.priority < 0


@dataclass(frozen=True)
class RequestSettings:
    """Header names and limits of the request parse (YAML section `request`)."""

    session_header: str = "x-session-id"
    max_body_bytes: int = 16 * 1024 * 1024
    #: "sheddable" → -1, "standard" → 0, "critical" → 1, or an integer.
    priority_header: str = "x-kvroute-priority"
    request_id_header: str = "x-request-id"
    #: The only paths a face sends to pods (exact match, query string ignored, POST). The
    #: router answers `GET /v1/models` itself and every other path with 404.
    routed_paths: tuple[str, ...] = ("/v1/completions", "/v1/chat/completions")
    #: Body fields only the router or the sidecar may set (they steer traffic inside the
    #: fleet); faces remove them from client bodies. A name also matches the same entry of
    #: `vllm_xargs` (vLLM merges both into one set of request arguments); "a.b" names key b
    #: of object a.
    strip_fields: tuple[str, ...] = ("kv_transfer_params",)

    def __post_init__(self) -> None:
        for p in self.routed_paths:
            if not p.startswith("/") or "?" in p or p == MODELS_PATH:
                raise ValueError(
                    f"request.routed_paths: {p!r} must be a path starting with '/', without a "
                    f"query, and not {MODELS_PATH} (the router answers that one)"
                )
        for name in self.strip_fields:
            if not name or any(not part for part in name.split(".")):
                raise ValueError(f"request.strip_fields: {name!r} is not a field name")


_DEFAULT_SETTINGS = RequestSettings()
_NAMED_PRIORITIES = {"sheddable": -1, "standard": 0, "critical": 1}
_OPAQUE_PART_KINDS = {
    "image_url": "image",
    "input_image": "image",
    "image": "image",
    "image_embeds": "image",
    "input_audio": "audio",
    "audio_url": "audio",
    "video_url": "video",
    "file": "file",
    "input_file": "file",
}
_json_decode = msgspec.json.Decoder().decode
_canonical_json = msgspec.json.Encoder(order="sorted").encode
_xxh3 = xxhash.xxh3_64_intdigest


# --------------------------------------------------------------------------- chat rendering
class _GenerationBlock(Extension):
    """transformers' `{% generation %}` marks assistant text for training masks; we render
    its body as is."""

    tags = {"generation"}  # noqa: RUF012 (jinja2's own class attribute)

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`: like Jinja's, but keeps non-ASCII text and takes json options."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


_jinja = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
)
_jinja.filters["tojson"] = _tojson
_jinja.globals["raise_exception"] = _raise_exception
_jinja.globals["strftime_now"] = _strftime_now

#: A message prefix the template refuses to render on its own (never a cut).
_REFUSED = (-1, -1, 0)


class ChatTemplate:
    """A Hugging Face chat template (Jinja) rendered the way `transformers` and vLLM render it.

    The environment is sandboxed and immutable; templates get `raise_exception`,
    `strftime_now`, a `tojson` that keeps non-ASCII text, `bos_token`/`eos_token` from the
    tokenizer config, and a pass-through `{% generation %}` block. Not thread-safe: the
    remembered message-prefix renderings are shared by every call (one event loop).
    """

    def __init__(
        self,
        template: str | Mapping[str, str],
        bos_token: str = "",
        eos_token: str = "",
        cut_cache_entries: int = 8192,
    ) -> None:
        named = {"default": template} if isinstance(template, str) else dict(template)
        if "default" not in named:
            raise ValueError("a chat template set needs a 'default' template")
        try:
            self._templates = {name: _jinja.from_string(src) for name, src in named.items()}
        except TemplateError as e:
            raise ValueError(f"chat template does not compile: {e}") from e
        self.bos_token = bos_token
        self.eos_token = eos_token
        #: hash of (context, messages[:k]) → (chars, bytes, xxh3 of the bytes) of its
        #: rendering without generation prompt, so a conversation's next turn renders only
        #: its new messages.
        self._cuts: OrderedDict[int, tuple[int, int, int]] = OrderedDict()
        self._cut_cache_entries = cut_cache_entries

    @classmethod
    def from_tokenizer_config(cls, path: str | os.PathLike[str]) -> ChatTemplate:
        """Load from a `tokenizer_config.json` (or the model directory holding it).

        Newer checkpoints keep the template in `chat_template.jinja` beside the config; that
        file is used when the config has no `chat_template`.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer_config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        template: Any = config.get("chat_template")
        if template is None:
            sidecar = os.path.join(os.path.dirname(path), "chat_template.jinja")
            if not os.path.exists(sidecar):
                raise ValueError(f"{path} has no chat_template (and no chat_template.jinja)")
            with open(sidecar, encoding="utf-8") as f:
                template = f.read()
        elif isinstance(template, list):
            # transformers' form for several named templates: [{"name", "template"}].
            template = {t["name"]: t["template"] for t in template}
        return cls(
            template,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
        )

    @classmethod
    def beside_tokenizer(cls, tokenizer_path: str | None) -> ChatTemplate | None:
        """The chat template of the `tokenizer_config.json` next to a `tokenizer.json`, if any.

        This is how every face (and the emulator) finds the template for the configured
        tokenizer, so all render chats the same way. None when there is none.
        """
        if not tokenizer_path:
            return None
        base = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
        config = os.path.join(base, "tokenizer_config.json")
        if not os.path.exists(config):
            return None
        try:
            return cls.from_tokenizer_config(config)
        except ValueError:
            return None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[Any] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text for `messages`. Template errors come out as `RequestError(400)`."""
        context = dict(template_kwargs or ())
        context.update(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        try:
            return self._templates[self._name(tools)].render(context)
        except TemplateError as e:
            raise RequestError(400, f"chat template rejected the messages: {e}") from e
        except Exception as e:  # a template tripping over odd input (None + str, ...)
            raise RequestError(
                400, f"chat template failed on the messages: {type(e).__name__}: {e}"
            ) from e

    def render_segments(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[Any] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[str, tuple[str, ...]]:
        """The prompt and its cut at message boundaries.

        The rendering of messages[:k] without generation prompt marks a cut when it is a
        prefix of the prompt (and longer than the previous cut). A template that renders a
        conversation's end differently from its middle loses just those cuts; at worst the
        prompt is one segment. Renderings of message prefixes seen before are remembered by
        length and hash (and checked against this prompt), so turn N+1 of a conversation
        costs about three renderings, not N+3.
        """
        prompt = self.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            template_kwargs=template_kwargs,
        )
        data = memoryview(prompt.encode())
        h = _xxh3(_canonical_bytes([self._name(tools), tools, template_kwargs], "tools"))
        cuts = [0]
        for k in range(1, len(messages) + 1):
            h = _xxh3(_canonical_bytes(messages[k - 1], f"messages[{k - 1}]"), seed=h)
            known = self._cuts.get(h)
            if known is not None:
                self._cuts.move_to_end(h)
                if known is _REFUSED:
                    continue
                if _is_cut(known, cuts[-1], data):
                    cuts.append(known[0])
                    continue
                # Not a prefix this time (or stale, e.g. a template that prints the date).
            try:
                partial = self.render(
                    messages[:k],
                    add_generation_prompt=False,
                    tools=tools,
                    template_kwargs=template_kwargs,
                )
            except RequestError:  # e.g. a template that insists on ending with a user turn
                self._remember_cut(h, _REFUSED)
                continue
            raw = partial.encode()
            cut = (len(partial), len(raw), _xxh3(raw))
            self._remember_cut(h, cut)
            if _is_cut(cut, cuts[-1], data):
                cuts.append(cut[0])
        if cuts[-1] != len(prompt):
            cuts.append(len(prompt))
        segments = tuple(prompt[a:b] for a, b in pairwise(cuts))
        return prompt, segments

    def _name(self, tools: list[Any] | None) -> str:
        return "tool_use" if tools and "tool_use" in self._templates else "default"

    def _remember_cut(self, key: int, cut: tuple[int, int, int]) -> None:
        self._cuts[key] = cut
        self._cuts.move_to_end(key)
        if len(self._cuts) > self._cut_cache_entries:
            self._cuts.popitem(last=False)


def _is_cut(cut: tuple[int, int, int], after: int, prompt_bytes: memoryview) -> bool:
    """Does a rendering of (chars, bytes, hash) start the prompt and end after char `after`?"""
    chars, nbytes, digest = cut
    return chars > after and nbytes <= len(prompt_bytes) and _xxh3(prompt_bytes[:nbytes]) == digest


def _token_text(token: Any) -> str:
    """tokenizer_config.json spells special tokens as a string or an AddedToken dict."""
    if isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    return ""


def render_plain(
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[Any] | None = None,
) -> tuple[str, tuple[str, ...]]:
    """The rendering used without a chat template, one segment per message.

    `<|tools|>\\n{tools JSON}\\n` when tools are given, then `<|{role}|>\\n{content}\\n` per
    message (tool calls appended as canonical JSON), then `<|assistant|>\\n`. Not what any
    model sees; it only has to put equal conversations on equal blocks.
    """
    segments: list[str] = []
    if tools:
        segments.append(f"<|tools|>\n{_canonical_bytes(tools, 'tools').decode()}\n")
    for i, m in enumerate(messages):
        text = m["content"]
        calls = m.get("tool_calls")
        if calls:
            calls_json = _canonical_bytes(calls, f"messages[{i}].tool_calls").decode()
            text = f"{text}\n{calls_json}" if text else calls_json
        segments.append(f"<|{m['role']}|>\n{text}\n")
    if add_generation_prompt:
        segments.append("<|assistant|>\n")
    return "".join(segments), tuple(segments)


# --------------------------------------------------------------------------------- policy
def path_action(
    method: str, path: str, settings: RequestSettings = _DEFAULT_SETTINGS
) -> PathAction:
    """The path policy every face applies before anything reaches a pod.

    `POST` on one of `settings.routed_paths` → "route"; `GET`/`HEAD /v1/models` → "models"
    (the router answers). Raises `RequestError` 405 for another method on those paths and 404
    for every other path, so a client cannot reach a pod's metrics, admin or fault endpoints.
    """
    p = path.split("?", 1)[0]
    if p in settings.routed_paths:
        if method != "POST":
            raise RequestError(405, f"{p} accepts POST only, not {method}", "method_not_allowed")
        return "route"
    if p == MODELS_PATH:
        if method not in ("GET", "HEAD"):
            raise RequestError(405, f"{p} accepts GET only, not {method}", "method_not_allowed")
        return "models"
    known = ", ".join([*settings.routed_paths, MODELS_PATH])
    raise RequestError(404, f"no route for path '{p}' (served: {known})", "unknown_path")


def strip_router_fields(body: dict[str, Any], names: Sequence[str]) -> list[str]:
    """Remove the router-only fields `names` from a client body, in place; return what was
    removed (dotted names, e.g. "vllm_xargs.kv_transfer_params"), empty when nothing was.

    Costs a few dict lookups when the body holds none of them, so faces call it on every
    request and re-encode the body only when it returns something.
    """
    removed: list[str] = []
    xargs = body.get("vllm_xargs")
    for name in names:
        if "." in name:
            *parents, leaf = name.split(".")
            node: Any = body
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and leaf in node:
                del node[leaf]
                removed.append(name)
            continue
        if name in body:
            del body[name]
            removed.append(name)
        if isinstance(xargs, dict) and name in xargs:
            del xargs[name]
            removed.append(f"vllm_xargs.{name}")
    return removed


# --------------------------------------------------------------------------------- parsing
def parse_request(
    raw: bytes | str | dict[str, Any],
    path: str,
    headers: Mapping[str, str] | None = None,
    settings: RequestSettings = _DEFAULT_SETTINGS,
    chat_template: ChatTemplate | None = None,
    adapters: Container[str] = frozenset(),
    now: float = 0.0,
) -> RoutingRequest:
    """Turn an OpenAI completions or chat body into a `RoutingRequest`.

    Raises `RequestError`: 404 for a path other than (/v1)/completions or
    (/v1)/chat/completions, 413 for a body over `settings.max_body_bytes`, 400 for bad JSON
    or a missing or ill-typed field (the message names the field).
    """
    kind = _kind_of_path(path, settings.routed_paths)
    body = _decode_body(raw, settings.max_body_bytes)
    hdrs = {k.lower(): v for k, v in headers.items()} if headers else {}

    model = body.get("model")
    if model is None:
        raise _field_error("model", "is required", code="missing_field")
    if not isinstance(model, str) or not model:
        raise _field_error("model", "must be a non-empty string")

    if kind == "chat":
        prompt, segments = _chat_prompt(body, chat_template)
        token_ids = None
        batch_size = 1
        max_tokens = _opt_count(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _opt_count(body, "max_tokens")
    elif kind == "completions":
        prompt, token_ids, batch_size = _completion_prompt(body)
        segments = (prompt,) if prompt else ()
        max_tokens = _opt_count(body, "max_tokens")
    else:  # a path the config routes too (e.g. /v1/embeddings): route on `input` if usable
        prompt, token_ids, batch_size = _other_prompt(body)
        segments = (prompt,) if prompt else ()
        max_tokens = _opt_count(body, "max_tokens")

    stream = body.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise _field_error("stream", "must be a boolean")

    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _field_error("user", "must be a string")
    session_key = hdrs.get(settings.session_header.lower()) or user or None

    request_id = hdrs.get(settings.request_id_header.lower()) or uuid.uuid4().hex

    return RoutingRequest(
        model=model,
        prompt=prompt,
        segments=segments,
        token_ids=token_ids,
        max_tokens=max_tokens,
        stream=stream,
        session_key=session_key,
        lora_adapter=model if model in adapters else None,
        request_id=request_id,
        kind=kind,
        priority=_priority(body, hdrs, settings.priority_header.lower()),
        arrival=now,
        body=body,
        batch_size=batch_size,
        token_count=len(token_ids) if token_ids is not None else None,
    )


def _kind_of_path(path: str, routed: Sequence[str] = ()) -> RequestKind:
    full = path.split("?", 1)[0]
    p = full.strip("/")
    if p.startswith("v1/"):
        p = p[3:]
    if p == "completions":
        return "completions"
    if p == "chat/completions":
        return "chat"
    if full in routed:
        return "other"
    raise RequestError(404, f"no route for path '{path}'", code="unknown_path")


def _other_prompt(body: dict[str, Any]) -> tuple[str, list[int] | None, int]:
    """The prompt of a body on an extra routed path: its `input` (embeddings) or `prompt`
    when that has a completions prompt's shape, else none (load-only routing)."""
    value = body.get("input", body.get("prompt"))
    if value is None:
        return "", None, 1
    try:
        return _completion_prompt({"prompt": value})
    except RequestError:
        return "", None, 1


def _decode_body(raw: bytes | str | dict[str, Any], limit: int) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        # A character is at most 4 UTF-8 bytes: short strings pass without encoding.
        size = len(raw) if len(raw) * 4 <= limit else len(raw.encode("utf-8", "surrogatepass"))
    elif isinstance(raw, bytes | bytearray | memoryview):
        size = len(raw)
    else:
        raise TypeError(f"parse_request takes bytes, str or dict, not {type(raw).__name__}")
    if size > limit:
        raise RequestError(
            413, f"body is {size} bytes; the limit is {limit}", code="body_too_large"
        )
    if size == 0:
        raise RequestError(400, "body is empty; expected a JSON object", code="invalid_json")
    try:
        body = _json_decode(raw)
    except msgspec.DecodeError as e:
        # msgspec >= 0.23 reports bad UTF-8 as a DecodeError; older versions raise UnicodeError.
        if "utf-8" in str(e).lower():
            raise _not_utf8(e) from e
        raise RequestError(400, _json_problem(raw, e), code="invalid_json") from e
    except UnicodeError as e:  # bad UTF-8 in a bytes body, a lone surrogate in a str body
        raise _not_utf8(e) from e
    except RecursionError as e:
        raise RequestError(
            400, "body is not valid JSON: nested too deeply", code="invalid_json"
        ) from e
    if not isinstance(body, dict):
        raise RequestError(
            400, f"body must be a JSON object, not {_json_type(body)}", code="invalid_json"
        )
    return body


def _not_utf8(error: Exception) -> RequestError:
    return RequestError(400, f"body is not valid UTF-8 text: {error}", code="invalid_json")


def _json_problem(raw: bytes | str | bytearray | memoryview, error: Exception) -> str:
    detail = str(error).removeprefix("JSON is malformed: ")
    if "truncated" not in detail:
        return f"body is not valid JSON: {detail}"
    # msgspec says "truncated" without a position, and says it too for an unpaired
    # \\uD800-\\uDFFF escape (valid JSON, but not text a prompt can hold).
    try:
        json.loads(bytes(raw) if isinstance(raw, memoryview | bytearray) else raw)
    except ValueError as e:
        where = f" (char {e.pos})" if isinstance(e, json.JSONDecodeError) else ""
        msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        return f"body is not valid JSON: {msg}{where}"
    return "body holds an unpaired UTF-16 surrogate escape, which is not text"


def _completion_prompt(body: dict[str, Any]) -> tuple[str, list[int] | None, int]:
    """(prompt text, token ids or None, batch size) of a completions body."""
    prompt = body.get("prompt")
    if prompt is None:
        raise _field_error("prompt", "is required", code="missing_field")
    if isinstance(prompt, str):
        return prompt, None, 1
    if not isinstance(prompt, list) or not prompt:
        raise _field_error("prompt", "must be a string, a list of strings, or a list of token ids")
    first = prompt[0]
    if isinstance(first, str):
        for i, p in enumerate(prompt):
            if not isinstance(p, str):
                raise _field_error(f"prompt[{i}]", "must be a string like prompt[0]")
        return first, None, len(prompt)
    if isinstance(first, list):
        for i, p in enumerate(prompt):
            if not isinstance(p, list):
                raise _field_error(f"prompt[{i}]", "must be a list of token ids like prompt[0]")
        return "", _token_ids(first, "prompt[0]"), len(prompt)
    return "", _token_ids(prompt, "prompt"), 1


def _token_ids(ids: list[Any], name: str) -> list[int]:
    if not ids:
        raise _field_error(name, "must not be an empty list of token ids")
    for t in ids:
        if type(t) is not int or t < 0 or t >= 1 << 32:
            raise _field_error(name, f"must hold token ids (integers in [0, 2^32)), got {t!r}")
    return ids


def _chat_prompt(
    body: dict[str, Any], template: ChatTemplate | None
) -> tuple[str, tuple[str, ...]]:
    raw_messages = body.get("messages")
    if raw_messages is None:
        raise _field_error("messages", "is required", code="missing_field")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _field_error("messages", "must be a non-empty list of messages")
    messages = [_chat_message(m, i) for i, m in enumerate(raw_messages)]

    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _field_error("tools", "must be a list")
    add_gen = body.get("add_generation_prompt", True)
    if not isinstance(add_gen, bool):
        raise _field_error("add_generation_prompt", "must be a boolean")

    if template is None:
        return render_plain(messages, add_generation_prompt=add_gen, tools=tools)
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise _field_error("chat_template_kwargs", "must be an object")
    return template.render_segments(
        messages, add_generation_prompt=add_gen, tools=tools, template_kwargs=kwargs
    )


def _chat_message(m: Any, i: int) -> dict[str, Any]:
    """The message with its content flattened to one string (text parts + opaque markers)."""
    if not isinstance(m, dict):
        raise _field_error(f"messages[{i}]", "must be an object with 'role' and 'content'")
    role = m.get("role")
    if not isinstance(role, str):
        raise _field_error(f"messages[{i}].role", "must be a string")
    calls = m.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise _field_error(f"messages[{i}].tool_calls", "must be a list")
    content = m.get("content")
    if isinstance(content, str):
        return m
    if content is None:
        text = ""
    elif isinstance(content, list):
        text = "\n".join(_content_part(part, i, j) for j, part in enumerate(content))
    else:
        raise _field_error(f"messages[{i}].content", "must be a string or a list of content parts")
    return {**m, "content": text}


def _content_part(part: Any, i: int, j: int) -> str:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise _field_error(f"messages[{i}].content[{j}]", "must be an object with a string 'type'")
    kind = part["type"]
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise _field_error(f"messages[{i}].content[{j}].text", "must be a string")
        return text
    label = _OPAQUE_PART_KINDS.get(kind) or (kind if kind.isidentifier() else "part")
    digest = xxhash.xxh3_64_hexdigest(_canonical_bytes(part, f"messages[{i}].content[{j}]"))
    return f"<|{label}:{digest}|>"


def _canonical_bytes(value: Any, name: str) -> bytes:
    """Sorted-key compact JSON; equal values give equal bytes whatever the key order."""
    try:
        return _canonical_json(value)
    except (TypeError, ValueError, OverflowError) as e:  # only from dict bodies built in code
        raise _field_error(name, f"is not JSON-encodable: {e}") from e


def _opt_count(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise _field_error(name, f"must be a non-negative integer, got {value!r}")
    return value


def _priority(body: dict[str, Any], hdrs: Mapping[str, str], header: str) -> int:
    value = hdrs.get(header)
    if value is not None:
        v = value.strip().lower()
        named = _NAMED_PRIORITIES.get(v)
        if named is not None:
            return named
        try:
            return int(v)
        except ValueError:
            raise RequestError(
                400,
                f"header '{header}' must be 'sheddable', 'standard', 'critical' or an "
                f"integer, got {value!r}",
            ) from None
    vllm_priority = body.get("priority")
    if vllm_priority is None:
        return 0
    if type(vllm_priority) is not int:
        raise _field_error("priority", f"must be an integer, got {vllm_priority!r}")
    return -vllm_priority


def _field_error(name: str, problem: str, code: str = "invalid_request") -> RequestError:
    return RequestError(400, f"'{name}' {problem}", code=code, param=name)


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null" if value is None else type(value).__name__
