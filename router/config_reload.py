"""Config reload for both faces: SIGHUP or a change of the config file applies the new config.

`ConfigReloader` watches the file (its mtime, size and inode, polled like
`router.discovery.static`) and takes SIGHUP (from the main thread). On either it reads the
file and parses it (in a thread: the parse reads the tokenizer file), then, on the event loop,
diffs it against the config in force (`config_changes`): each changed field is either applied
live or named as needing a restart. What applies live:

- `plugins`, `schedulingProfiles`, `saturation`, `request`, `seed`, `shadow_policies` and
  `prefix_index.mode`/`pending_*`: the face builds a new `Scheduler` the way it built the first
  one (same registry, precise index, keyer, the old one's approximate index, so the record of
  picks survives) and swaps it in; requests in flight finish on the scheduler that decided them
  (they hold it), new ones use the new one;
- `pods`: static discovery re-reads them (it watches the same file; SIGHUP makes it re-read);
- `logging.level`, `logging.format`;
- the face's own fields it lists as live (`live_fields`, e.g. most of `proxy:`).

Anything else (ports, `blocks`, `events`, `scrape`, `shared_state`, `tracing`, the index
bounds) is kept as it was and named in the log line as "restart needed". A file that does not
parse, or a config the face cannot build (a profile it names is gone), is refused: its error
is logged, `kvroute_config_reloads_total{result="failure"}` counts it, and the last valid
config stays in force. One log line per reload says what changed and what could not be
applied live.

Metrics (a collector to register on the face's registry): `kvroute_config_reloads_total
{result="success|failure"}` and `kvroute_config_hash{hash}` = 1 for the sha256 prefix of the
file in force (info-style: the label says which file is loaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from router.config import ConfigError, RouterConfig, parse_config
from router.face_metrics import FaceMetrics, time_plugins
from router.feeds import FleetFeeds
from router.log_setup import setup_logging
from router.scheduler import Scheduler
from router.sighup import subscribe_sighup

log = logging.getLogger(__name__)

#: Top-level fields whose change rebuilds the scheduler (applied live).
SCHEDULER_FIELDS = frozenset(
    {
        "plugins",
        "profiles",
        "saturation",
        "request",
        "seed",
        "shadow_policies",
        "prefix_index.mode",
        "prefix_index.pending_ttl_s",
        "prefix_index.pending_max_s",
    }
)
#: Applied live by every face.
COMMON_LIVE_FIELDS = frozenset({"pods", "logging.level", "logging.format"})
#: Top-level sections compared field by field (a change is named `section.field`).
_NESTED = ("prefix_index", "proxy", "extproc", "logging", "tracing", "scrape", "blocks")
HASH_CHARS = 12


def file_hash(data: bytes) -> str:
    """The `kvroute_config_hash` label: a sha256 prefix of the file's bytes."""
    return hashlib.sha256(data).hexdigest()[:HASH_CHARS]


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """What differs between the config in force and a new one, and what of it applies live."""

    live: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()

    @property
    def changed(self) -> tuple[str, ...]:
        return (*self.live, *self.restart)

    @property
    def rebuild_scheduler(self) -> bool:
        return any(name in SCHEDULER_FIELDS for name in self.live)

    def touches(self, prefix: str) -> bool:
        """True when a live change is `prefix` or one of its fields (`proxy` → `proxy.*`)."""
        return any(n == prefix or n.startswith(prefix + ".") for n in self.live)

    def summary(self) -> str:
        if not self.changed:
            return "no change"
        out = f"applied {', '.join(self.live)}" if self.live else "nothing applied"
        if self.restart:
            out += f"; restart needed for {', '.join(self.restart)} (kept as they were)"
        return out


def config_changes(
    old: RouterConfig, new: RouterConfig, live_fields: Collection[str] = ()
) -> ConfigChange:
    """Diff two configs: changed fields that apply live (scheduler fields, the common ones and
    the face's `live_fields`) and the others."""
    live_set = SCHEDULER_FIELDS | COMMON_LIVE_FIELDS | frozenset(live_fields)
    live: list[str] = []
    restart: list[str] = []
    for f in dataclasses.fields(old):
        if f.name == "source":
            continue
        a, b = getattr(old, f.name), getattr(new, f.name, None)
        if f.name == "pods":  # the Pod objects of a config carry live state: compare the spec
            a, b = _pod_specs(a), _pod_specs(b)
        elif f.name in ("plugins", "profiles"):  # not the lines they are on
            a, b = _without_lines(a), _without_lines(b)
        if a == b:
            continue
        names = [f.name]
        if f.name in _NESTED and dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            names = [
                f"{f.name}.{sub.name}"
                for sub in dataclasses.fields(a)
                if getattr(a, sub.name) != getattr(b, sub.name)
            ]
        for name in names:
            (live if name in live_set else restart).append(name)
    return ConfigChange(tuple(live), tuple(restart))


def _pod_specs(pods: Any) -> list[tuple[Any, ...]]:
    return [
        (
            p.endpoint,
            p.role,
            p.labels,
            p.models,
            p.adapters,
            p.kv_events_endpoint,
            p.kv_replay_endpoint,
        )
        for p in pods or ()
    ]


def _without_lines(specs: Any) -> list[Any]:
    """Plugin or profile specs minus their `line` (moving a section is no change)."""
    out = []
    for spec in specs or ():
        spec = dataclasses.replace(spec, line=0)
        if hasattr(spec, "plugins"):
            spec = dataclasses.replace(
                spec, plugins=tuple(dataclasses.replace(r, line=0) for r in spec.plugins)
            )
        out.append(spec)
    return out


def in_force(old: RouterConfig, new: RouterConfig, change: ConfigChange) -> RouterConfig:
    """`new` with the fields that need a restart kept as in `old`: the config the process runs
    on after a reload (and the base of the next diff)."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name in change.restart:
        section, _, sub = name.partition(".")
        if sub:
            nested.setdefault(section, {})[sub] = getattr(getattr(old, section), sub)
        else:
            top[name] = getattr(old, name)
    for section, fields in nested.items():
        top[section] = dataclasses.replace(getattr(new, section), **fields)
    return dataclasses.replace(new, **top)


#: What a face does with a new config (`in_force`: restart-needed fields as they were): build
#: what it needs (raising `ValueError` or `ConfigError` leaves everything as it was), then
#: swap it in.
ApplyFn = Callable[[RouterConfig, ConfigChange], None]


class ConfigReloader:
    def __init__(
        self,
        path: str | Path,
        config: RouterConfig,
        apply: ApplyFn,
        *,
        live_fields: Collection[str] = (),
        poll_interval_s: float = 1.0,
        on_sighup: Callable[[], Any] | None = None,
        log_level_override: str | None = None,
    ) -> None:
        """`apply`: the face's part (scheduler swap, its settings). `on_sighup`: also run on
        SIGHUP (static discovery's re-read: this reloader owns the signal). `log_level_override`:
        a `--log-level` given on the command line, which a file's `logging.level` does not
        override."""
        self.path = Path(path)
        self.config = config
        self._apply = apply
        self.live_fields = frozenset(live_fields)
        self.poll_interval_s = poll_interval_s
        self._on_sighup = on_sighup
        self.log_level_override = log_level_override
        self.results = {"success": 0, "failure": 0}
        self.last_error: str | None = None
        self._signature = self._stat()
        try:
            self.hash = file_hash(self.path.read_bytes())
        except OSError:
            self.hash = ""
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe_sighup: Callable[[], None] | None = None
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ reloading
    def reload(self, why: str = "requested") -> bool:
        """Read, check and apply the file; False (and the last valid config kept) on failure."""
        return self._apply_read(why, self._read())

    async def reload_async(self, why: str = "requested") -> bool:
        """`reload`, with the file read and parsed in a thread: the parse checks the tokenizer
        file (megabytes of JSON), which must not stall the event loop. One at a time."""
        async with self._lock:
            return self._apply_read(why, await asyncio.to_thread(self._read))

    def _read(self) -> tuple[bytes, RouterConfig] | str:
        """(file bytes, parsed config), or why the file cannot be used."""
        try:
            data = self.path.read_bytes()
            return data, parse_config(data.decode("utf-8"), source=str(self.path))
        except (OSError, UnicodeDecodeError) as e:
            return f"{self.path}: cannot read config: {e}"
        except ConfigError as e:
            return str(e)

    def _apply_read(self, why: str, read: tuple[bytes, RouterConfig] | str) -> bool:
        if isinstance(read, str):
            return self._refused(why, read)
        data, new = read
        digest = file_hash(data)
        change = config_changes(self.config, new, self.live_fields)
        new = in_force(self.config, new, change)
        try:
            self._apply(new, change)
        except (ConfigError, ValueError) as e:
            return self._refused(why, str(e))
        if change.touches("logging"):
            level = self.log_level_override or new.logging.level
            setup_logging(level, new.logging.format)
        self.config = new
        self.hash = digest
        self.results["success"] += 1
        self.last_error = None
        log.info("config reload (%s), hash %s: %s", why, digest, change.summary())
        return True

    def _refused(self, why: str, error: str) -> bool:
        self.results["failure"] += 1
        self.last_error = error
        log.error(
            "config reload (%s) refused, keeping the config in force (hash %s): %s",
            why,
            self.hash,
            error,
        )
        return False

    def changed(self) -> bool:
        """True (once) when the file's signature changed since the last look. Recorded even
        when the reload then fails, so a bad file is reported once, not every poll."""
        signature = self._stat()
        if signature == self._signature:
            return False
        self._signature = signature
        return True

    def check_for_change(self) -> bool:
        """Reload when the file changed since the last look; True if it reloaded."""
        return self.changed() and self.reload("file changed")

    # ------------------------------------------------------------------ lifetime
    async def start(self) -> None:
        if self.poll_interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._poll(), name="config-reload")
        if self._unsubscribe_sighup is None:
            self._unsubscribe_sighup = subscribe_sighup(self._sighup)

    async def stop(self) -> None:
        if self._unsubscribe_sighup is not None:
            self._unsubscribe_sighup()
            self._unsubscribe_sighup = None
        tasks = [t for t in (self._task, *self._pending) if t is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _sighup(self) -> None:
        self._signature = self._stat()
        if self._on_sighup is not None:
            self._on_sighup()
        task = asyncio.get_running_loop().create_task(self._guarded("SIGHUP"))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            if self.changed():
                await self._guarded("file changed")

    async def _guarded(self, why: str) -> None:
        try:
            await self.reload_async(why)
        except Exception:  # a bug in a face's apply must not end the watching
            log.exception("config reload (%s) failed", why)

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError:
            return (-1, -1, -1)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    # ------------------------------------------------------------------ metrics
    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        reloads = CounterMetricFamily(
            "kvroute_config_reloads",
            "Config reloads (SIGHUP or file change) by result; a failure keeps the old config",
            labels=["result"],
        )
        for result, n in self.results.items():
            reloads.add_metric([result], n)
        yield reloads
        info = GaugeMetricFamily(
            "kvroute_config_hash",
            "1 for the sha256 prefix of the config file in force",
            labels=["hash"],
        )
        info.add_metric([self.hash], 1)
        yield info


def face_reloader(
    config_path: str | Path | None,
    config: RouterConfig,
    apply: ApplyFn,
    live_fields: Collection[str],
    discovery: Any,
) -> ConfigReloader | None:
    """A face's reloader of `config_path` (None without a file): `apply` swaps what the face
    built from the config; `discovery`'s `reload` (static discovery) also runs on SIGHUP."""
    if config_path is None:
        return None
    return ConfigReloader(
        config_path,
        config,
        apply,
        live_fields=live_fields,
        on_sighup=getattr(discovery, "reload", None),
    )


def face_scheduler(
    config: RouterConfig,
    feeds: FleetFeeds,
    metrics: FaceMetrics,
    tracing: Any,
    previous: Scheduler | None = None,
) -> Scheduler:
    """A face's scheduler for `config`, built alike at start-up and on a reload (`previous`:
    the one it replaces; its keyer, approximate index and shared-state observer go on): on the
    face's fleet, its plugins timed into `metrics`, traced when `tracing` is on."""
    sched = Scheduler(
        config,
        feeds.registry,
        precise_index=feeds.precise_index,
        keyer=previous.keyer if previous is not None else None,
        approx_index=previous.approx_index if previous is not None else None,
    )
    if previous is not None:
        sched.observer = previous.observer
    time_plugins(sched, metrics)
    if tracing is not None:
        tracing.trace_scheduler(sched)
    return sched
