"""One YAML file → typed router configuration.

Owns the config schema: the static fleet, block keying, the prefix index, request limits, and
the scheduling plugins and profiles in llm-d's `EndpointPickerConfig` shape (a `plugins:` list,
then `schedulingProfiles:` referring to them by name). Every field has a default; an unknown
field, an unknown plugin type or a wrongly typed value is a `ConfigError` naming it and its
line in the file.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from envoy_extproc.settings import ExtProcSettings
from router.blocks import BlockConfig
from router.discovery.pod_list import PodListError, pods_from_yaml_list
from router.events.settings import EventsSettings
from router.ops_settings import LoggingSettings, TracingSettings
from router.pods import Pod, Role
from router.proxy.settings import ProxySettings
from router.request import RequestSettings
from router.scrape import ScrapeSettings
from router.shared_state.settings import SharedStateSettings


class ConfigError(ValueError):
    """A config file problem; the message names the field and the line."""


# --------------------------------------------------------------------------- YAML with lines
class _LineDict(dict):
    """A mapping that remembers the line (1-based) of each key and of itself."""

    line: int = 0
    key_lines: dict[Any, int]


class _LineList(list):
    line: int = 0
    #: The line of each item.
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    out = _LineDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _LineList:
    out = _LineList(loader.construct_object(n, deep=True) for n in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [n.start_mark.line + 1 for n in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _line_of(node: Any, key: Any = None) -> int:
    if key is not None and isinstance(node, _LineDict):
        return node.key_lines.get(key, node.line)
    return getattr(node, "line", 0)


# --------------------------------------------------------------------------- schema
@dataclass(frozen=True, slots=True)
class PrefixIndexSettings:
    """Which prefix index plugins read by default, and the approximate index's bounds."""

    #: "auto" = precise when KV events feed the router, else approximate.
    mode: str = "auto"
    lru_capacity_per_pod: int = 31_250
    ttl_s: float | None = None
    tier_weights: tuple[float, float, float] = (1.0, 0.8, 0.5)
    #: Precise index: each decision is recorded as pending (speculative) until the engine's KV
    #: events confirm it. It expires `pending_ttl_s` after the prefill ran (first token; the
    #: events are due by then, like vllm-router's and llm-d's 2 s speculative inserts) and at
    #: the latest `pending_max_s` after the pick (a request that never reports back). None
    #: disables pending entries.
    pending_ttl_s: float | None = 2.0
    pending_max_s: float = 120.0


@dataclass(frozen=True, slots=True)
class SaturationSettings:
    """When a pod counts as saturated (GAIE's defaults); sheddable requests are refused (429)
    when every candidate is."""

    queue_threshold: int = 5
    kv_threshold: float = 0.8


@dataclass(frozen=True, slots=True)
class PluginSpec:
    type: str
    name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    line: int = 0


@dataclass(frozen=True, slots=True)
class PluginRef:
    ref: str
    weight: float = 1.0
    line: int = 0


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    name: str
    plugins: tuple[PluginRef, ...]
    line: int = 0


@dataclass(frozen=True, slots=True)
class RouterConfig:
    pods: tuple[Pod, ...] = ()
    blocks: BlockConfig = field(default_factory=BlockConfig)
    prefix_index: PrefixIndexSettings = field(default_factory=PrefixIndexSettings)
    request: RequestSettings = field(default_factory=RequestSettings)
    saturation: SaturationSettings = field(default_factory=SaturationSettings)
    plugins: tuple[PluginSpec, ...] = ()
    profiles: tuple[ProfileSpec, ...] = ()
    #: vLLM KV events (ZMQ); None = off (the prefix index is the router's own picks).
    events: EventsSettings | None = None
    scrape: ScrapeSettings = field(default_factory=ScrapeSettings)
    #: `kvroute serve` (Envoy ext_proc endpoint picker) ports and behaviour.
    extproc: ExtProcSettings = field(default_factory=ExtProcSettings)
    #: `kvroute proxy` (OpenAI-compatible proxy) listening, forwarding and admission.
    proxy: ProxySettings = field(default_factory=ProxySettings)
    #: State shared with other router replicas through a store; None = this replica alone.
    shared_state: SharedStateSettings | None = None
    #: OpenTelemetry tracing of requests (off by default).
    tracing: TracingSettings = field(default_factory=TracingSettings)
    #: Log level, format and the access log of both faces.
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    #: Policies (`kvroute simulate --policies` names) also run on each live request, for
    #: what they would have picked (`router.shadow`); they send nothing.
    shadow_policies: tuple[str, ...] = ()
    #: Seed of the pickers' random tie-breaks (None = from the OS).
    seed: int | None = None
    source: str = "<default>"

    @property
    def handler(self) -> PluginSpec:
        for p in self.plugins:
            if p.type in PROFILE_HANDLERS:
                return p
        return PluginSpec("single-profile-handler", "single-profile-handler")


PROFILE_HANDLERS = ("single-profile-handler", "pd-profile-handler")
_HANDLER_PARAMS = {
    "single-profile-handler": {"profile": str},
    "pd-profile-handler": {
        "threshold": int,
        "decodeProfile": str,
        "prefillProfile": str,
        "mode": str,
    },
}

#: kvroute's default profile: route to the pod with the lowest predicted time to first token
#: (`scorers/predicted_ttft.py`; README "Scheduling"). Its score keeps ratios (min/ttft), so
#: the max-score picker takes the lowest prediction.
DEFAULT_PLUGINS_YAML = """
plugins:
  - type: predicted-ttft-scorer
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: predicted-ttft-scorer
        weight: 1
      - pluginRef: max-score-picker
"""


def _check_tokenizer_file(path: str, source: str, line: int) -> None:
    """Fail at load time with a line naming the file, not with a traceback at first use."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(
            f"{source}:{line}: blocks.tokenizer_path {path}: cannot read it ({e.strerror})"
        ) from None
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ConfigError(
            f"{source}:{line}: blocks.tokenizer_path {path}: not valid JSON ({e})"
        ) from None
    if not isinstance(doc, dict) or "model" not in doc:
        raise ConfigError(
            f"{source}:{line}: blocks.tokenizer_path {path}: not a tokenizer.json file "
            "(a Hugging Face tokenizers file has a 'model' object)"
        )


# --------------------------------------------------------------------------- loading
def load_config(path: str | Path) -> RouterConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror}") from e
    return parse_config(text, source=str(p))


def parse_config(text: str, source: str = "<string>") -> RouterConfig:
    try:
        doc = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    if doc is None:
        doc = _LineDict()
        doc.key_lines = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    return _build(doc, source)


def default_config() -> RouterConfig:
    return parse_config("", "<default>")


_TOP_LEVEL = {
    "pods",
    "blocks",
    "prefix_index",
    "request",
    "saturation",
    "plugins",
    "schedulingProfiles",
    "seed",
    "events",
    "scrape",
    "extproc",
    "proxy",
    "shared_state",
    "tracing",
    "logging",
    "shadow_policies",
    "apiVersion",
    "kind",
}


def _build(doc: dict, source: str) -> RouterConfig:
    for key in doc:
        if key not in _TOP_LEVEL:
            raise ConfigError(
                f"{source}:{_line_of(doc, key)}: unknown field '{key}' "
                f"(known: {', '.join(sorted(_TOP_LEVEL))})"
            )
    ctx = _Ctx(source)
    try:
        pods = tuple(pods_from_yaml_list(doc.get("pods"), source, _line_of))
    except PodListError as e:
        raise ConfigError(str(e)) from None
    blocks = ctx.dataclass(BlockConfig, doc.get("blocks"), "blocks", _line_of(doc, "blocks"))
    if blocks.mode not in ("tokens", "chars"):
        raise ConfigError(f"{source}: blocks.mode must be 'tokens' or 'chars'")
    if blocks.mode == "tokens" and not blocks.tokenizer_path:
        raise ConfigError(f"{source}: blocks.mode 'tokens' needs blocks.tokenizer_path")
    if blocks.tokenizer_path and not Path(blocks.tokenizer_path).is_absolute():
        # Relative tokenizer paths are relative to the config file.
        base = Path.cwd() if source.startswith("<") else Path(source).parent
        blocks = dataclasses.replace(blocks, tokenizer_path=str(base / blocks.tokenizer_path))
    if blocks.block_size <= 0 or blocks.chars_per_block <= 0:
        raise ConfigError(f"{source}: blocks sizes must be > 0")
    if blocks.tokenizer_path:
        line = _line_of(doc.get("blocks"), "tokenizer_path")
        _check_tokenizer_file(blocks.tokenizer_path, source, line)
    prefix_index = ctx.dataclass(
        PrefixIndexSettings, doc.get("prefix_index"), "prefix_index", _line_of(doc, "prefix_index")
    )
    if prefix_index.mode not in ("auto", "precise", "approximate"):
        where = _line_of(doc.get("prefix_index"), "mode")
        raise ConfigError(
            f"{source}:{where}: prefix_index.mode must be auto, precise or approximate, "
            f"not {prefix_index.mode!r}"
        )
    request = ctx.dataclass(
        RequestSettings, doc.get("request"), "request", _line_of(doc, "request")
    )
    saturation = ctx.dataclass(
        SaturationSettings, doc.get("saturation"), "saturation", _line_of(doc, "saturation")
    )
    if "plugins" in doc or "schedulingProfiles" in doc:
        plugins_doc, profiles_doc = doc.get("plugins") or [], doc.get("schedulingProfiles") or []
        pctx = ctx
    else:
        default = yaml.load(DEFAULT_PLUGINS_YAML, Loader=_LineLoader)
        plugins_doc, profiles_doc = default["plugins"], default["schedulingProfiles"]
        pctx = _Ctx("<default profile>")
    plugins = tuple(_parse_plugins(plugins_doc, pctx))
    profiles = tuple(_parse_profiles(profiles_doc, plugins, pctx))
    events = None
    if "events" in doc:
        events = ctx.dataclass(EventsSettings, doc["events"], "events", _line_of(doc, "events"))
    scrape = ctx.dataclass(ScrapeSettings, doc.get("scrape"), "scrape", _line_of(doc, "scrape"))
    extproc = ctx.dataclass(
        ExtProcSettings, doc.get("extproc"), "extproc", _line_of(doc, "extproc")
    )
    proxy = ctx.dataclass(ProxySettings, doc.get("proxy"), "proxy", _line_of(doc, "proxy"))
    shared_state = None
    if "shared_state" in doc:
        shared_state = ctx.dataclass(
            SharedStateSettings, doc["shared_state"], "shared_state", _line_of(doc, "shared_state")
        )
    tracing = ctx.dataclass(
        TracingSettings, doc.get("tracing"), "tracing", _line_of(doc, "tracing")
    )
    logging_ = ctx.dataclass(
        LoggingSettings, doc.get("logging"), "logging", _line_of(doc, "logging")
    )
    shadow_policies = _parse_shadow_policies(doc, ctx)
    seed = doc.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"{source}:{_line_of(doc, 'seed')}: seed must be an integer")
    return RouterConfig(
        pods=pods,
        blocks=blocks,
        prefix_index=prefix_index,
        request=request,
        saturation=saturation,
        plugins=plugins,
        profiles=profiles,
        events=events,
        scrape=scrape,
        extproc=extproc,
        proxy=proxy,
        shared_state=shared_state,
        tracing=tracing,
        logging=logging_,
        shadow_policies=shadow_policies,
        seed=seed,
        source=source,
    )


def _parse_shadow_policies(doc: dict, ctx: _Ctx) -> tuple[str, ...]:
    """`shadow_policies: [NAME, ...]`, each a `kvroute simulate --policies` name."""
    # Imported here: router.sim.policies builds its configs with this module.
    from router.sim.policies import POLICIES

    node = doc.get("shadow_policies")
    if node is None:
        return ()
    if not isinstance(node, list):
        raise ctx.err(_line_of(doc, "shadow_policies"), "'shadow_policies' must be a list")
    names: list[str] = []
    lines = getattr(node, "item_lines", None) or [_line_of(doc, "shadow_policies")] * len(node)
    for i, name in enumerate(node):
        if name not in POLICIES:
            raise ctx.err(
                lines[i],
                f"shadow_policies[{i}]: unknown policy {name!r} (known: {', '.join(POLICIES)})",
            )
        if name in names:
            raise ctx.err(lines[i], f"shadow_policies: {name!r} is listed twice")
        names.append(name)
    return tuple(names)


class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def err(self, line: int, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}:{line}: {msg}")

    def mapping(self, node: Any, what: str, line: int) -> dict:
        if node is None:
            return {}
        if not isinstance(node, dict):
            raise self.err(line, f"'{what}' must be a mapping")
        return node

    def dataclass(self, cls: type, node: Any, what: str, line: int) -> Any:
        """Fill dataclass `cls` from a mapping, checking names and types field by field."""
        node = self.mapping(node, what, line)
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {}
        for key, value in node.items():
            kline = _line_of(node, key)
            if key not in fields:
                raise self.err(
                    kline, f"unknown field '{what}.{key}' (known: {', '.join(sorted(fields))})"
                )
            kwargs[key] = self.coerce(value, hints[key], f"{what}.{key}", kline)
        try:
            return cls(**kwargs)
        except ValueError as e:  # the settings class's own validation
            raise self.err(line, f"{what}: {e}") from None

    def coerce(self, value: Any, hint: Any, what: str, line: int) -> Any:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            errors = []
            for arg in args:
                if arg is type(None):
                    continue
                try:
                    return self.coerce(value, arg, what, line)
                except ConfigError as e:
                    errors.append(str(e))
            raise errors[0] if len(errors) == 1 else self.err(line, f"'{what}' has a bad type")
        if origin is typing.Literal:
            if value not in args:
                raise self.err(line, f"'{what}' must be one of {list(args)}, got {value!r}")
            return value
        if origin is tuple:
            if not isinstance(value, list):
                raise self.err(line, f"'{what}' must be a list")
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(self.coerce(v, args[0], what, line) for v in value)
            if len(value) != len(args):
                raise self.err(line, f"'{what}' must have {len(args)} items")
            return tuple(self.coerce(v, a, what, line) for v, a in zip(value, args, strict=True))
        if origin in (list, frozenset, set):
            if not isinstance(value, list):
                raise self.err(line, f"'{what}' must be a list")
            items = [self.coerce(v, args[0], what, line) for v in value] if args else list(value)
            return origin(items)
        if origin in (dict, Mapping) or hint is dict:
            if not isinstance(value, dict):
                raise self.err(line, f"'{what}' must be a mapping")
            return dict(value)
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            return self.dataclass(hint, value, what, line)
        if hint is bool:
            if not isinstance(value, bool):
                raise self.err(line, f"'{what}' must be true or false")
            return value
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.err(line, f"'{what}' must be an integer, got {value!r}")
            return value
        if hint is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self.err(line, f"'{what}' must be a number, got {value!r}")
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise self.err(line, f"'{what}' must be a string, got {value!r}")
            return value
        if isinstance(hint, type) and issubclass(hint, Role):
            try:
                return Role(value)
            except ValueError:
                raise self.err(
                    line, f"'{what}' must be one of {[r.value for r in Role]}, got {value!r}"
                ) from None
        return value


def _parse_plugins(items: Any, ctx: _Ctx) -> list[PluginSpec]:
    from scorers.registry import PLUGINS

    if not isinstance(items, list):
        raise ctx.err(_line_of(items), "'plugins' must be a list")
    out: list[PluginSpec] = []
    names: set[str] = set()
    for i, item in enumerate(items):
        line = _line_of(item)
        if not isinstance(item, dict):
            raise ctx.err(line, f"plugins[{i}] must be a mapping with 'type'")
        for key in item:
            if key not in ("type", "name", "parameters"):
                raise ctx.err(
                    _line_of(item, key),
                    f"unknown field 'plugins[{i}].{key}' (known: type, name, parameters)",
                )
        ptype = item.get("type")
        if not isinstance(ptype, str):
            raise ctx.err(line, f"plugins[{i}] needs a 'type'")
        if ptype not in PLUGINS and ptype not in PROFILE_HANDLERS:
            known = ", ".join(sorted([*PLUGINS, *PROFILE_HANDLERS]))
            raise ctx.err(_line_of(item, "type"), f"unknown plugin type '{ptype}' (known: {known})")
        name = item.get("name") or ptype
        if not isinstance(name, str):
            raise ctx.err(_line_of(item, "name"), f"plugins[{i}].name must be a string")
        if name in names:
            raise ctx.err(line, f"plugin name '{name}' is used twice")
        names.add(name)
        params = ctx.mapping(item.get("parameters"), f"plugins[{i}].parameters", line)
        if ptype in PROFILE_HANDLERS:
            allowed = _HANDLER_PARAMS[ptype]
            for key, value in params.items():
                if key not in allowed:
                    raise ctx.err(
                        _line_of(params, key),
                        f"plugin '{ptype}' has no parameter '{key}' (known: {sorted(allowed)})",
                    )
                ctx.coerce(value, allowed[key], f"{name}.{key}", _line_of(params, key))
        out.append(PluginSpec(ptype, name, dict(params), line))
    handlers = [p for p in out if p.type in PROFILE_HANDLERS]
    if len(handlers) > 1:
        raise ctx.err(handlers[1].line, "only one profile handler may be configured")
    return out


def _parse_profiles(items: Any, plugins: tuple[PluginSpec, ...], ctx: _Ctx) -> list[ProfileSpec]:
    from scorers.registry import plugin_kind

    if not isinstance(items, list) or not items:
        raise ctx.err(_line_of(items), "'schedulingProfiles' must be a non-empty list")
    by_name = {p.name: p for p in plugins}
    out: list[ProfileSpec] = []
    for i, item in enumerate(items):
        line = _line_of(item)
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ctx.err(line, f"schedulingProfiles[{i}] needs a 'name'")
        for key in item:
            if key not in ("name", "plugins"):
                raise ctx.err(
                    _line_of(item, key),
                    f"unknown field 'schedulingProfiles[{i}].{key}' (known: name, plugins)",
                )
        refs: list[PluginRef] = []
        pickers = 0
        for j, ref in enumerate(item.get("plugins") or []):
            rline = _line_of(ref)
            if not isinstance(ref, dict) or not isinstance(ref.get("pluginRef"), str):
                raise ctx.err(rline, f"profile '{item['name']}' plugins[{j}] needs 'pluginRef'")
            for key in ref:
                if key not in ("pluginRef", "weight"):
                    raise ctx.err(
                        _line_of(ref, key),
                        f"unknown field '{key}' in profile '{item['name']}' plugins[{j}]",
                    )
            spec = by_name.get(ref["pluginRef"])
            if spec is None:
                raise ctx.err(
                    _line_of(ref, "pluginRef"),
                    f"profile '{item['name']}' refers to unknown plugin '{ref['pluginRef']}'",
                )
            if spec.type in PROFILE_HANDLERS:
                raise ctx.err(rline, f"profile handler '{spec.name}' cannot be in a profile")
            weight = ctx.coerce(ref.get("weight", 1.0), float, "weight", _line_of(ref, "weight"))
            if weight < 0:
                raise ctx.err(_line_of(ref, "weight"), "weight must be >= 0")
            pickers += plugin_kind(spec.type) == "picker"
            refs.append(PluginRef(spec.name, weight, rline))
        if pickers > 1:
            raise ctx.err(line, f"profile '{item['name']}' has more than one picker")
        out.append(ProfileSpec(item["name"], tuple(refs), line))
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ctx.err(_line_of(items), "profile names must be unique")
    return out
