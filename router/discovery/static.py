"""Static discovery: the fleet is the `pods:` list of a YAML file, re-read when it changes.

Owns reading that one section of the file (other top-level keys are ignored, so the file can be
the main router config) and applying it with `PodRegistry.replace_all`, which keeps the
in-flight state of pods that stay and fires `on_remove` for pods that leave. Changes are noticed
by polling the file's mtime, size and inode, and on SIGHUP when started from the main thread. A
reload that fails (unreadable file, bad YAML, bad entry) keeps the current fleet, is logged and
counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from router.discovery.pod_list import PodListError, pods_from_yaml_list
from router.pods import Pod, PodRegistry
from router.sighup import subscribe_sighup

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StaticDiscoverySettings:
    #: YAML file with a top-level `pods:` list ("" = the main config file, filled in by config).
    path: str = ""
    #: How often the file's mtime/size/inode is checked; 0 disables polling (SIGHUP only).
    poll_interval_s: float = 1.0
    reload_on_sighup: bool = True

    def __post_init__(self) -> None:
        if self.poll_interval_s < 0:
            raise ValueError("static discovery poll_interval_s must be >= 0")


@dataclass(slots=True)
class StaticDiscoveryStats:
    reloads: int = 0
    reload_failures: int = 0
    last_error: str | None = None


def read_pods_file(path: Path) -> list[Pod]:
    """Parse the `pods:` section of the YAML file at `path`; raise PodListError on any problem."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PodListError(f"{source}: cannot read: {exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PodListError(f"{source}: invalid YAML: {exc}") from exc
    if not isinstance(doc, dict) or "pods" not in doc:
        raise PodListError(f"{source}: expected a mapping with a top-level 'pods:' list")
    return pods_from_yaml_list(doc["pods"], source)


class StaticDiscovery:
    def __init__(self, registry: PodRegistry, settings: StaticDiscoverySettings) -> None:
        if not settings.path:
            raise ValueError("static discovery needs a file path")
        self.registry = registry
        self.settings = settings
        self.path = Path(settings.path)
        self.stats = StaticDiscoveryStats()
        self._signature: tuple[int, int, int] | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._unsubscribe_sighup: Callable[[], None] | None = None

    def load(self) -> None:
        """Read the file and make it the fleet; raises PodListError (use at startup)."""
        signature = self._stat()
        pods = read_pods_file(self.path)
        self._signature = signature
        before = {p.endpoint for p in self.registry.all()}
        first = self.stats.reloads == 0
        self.registry.replace_all(pods)
        self.stats.reloads += 1
        # A file saved for another section (a config reload) is no fleet change: no line.
        level = logging.INFO if first or before != {p.endpoint for p in pods} else logging.DEBUG
        log.log(level, "static discovery: %d pods from %s", len(pods), self.path)

    def reload(self) -> bool:
        """Re-read the file; on error keep the current fleet, log, count, and return False."""
        try:
            self.load()
        except PodListError as exc:
            self.stats.reload_failures += 1
            self.stats.last_error = str(exc)
            log.error(
                "static discovery: reload failed, keeping %d pods: %s", len(self.registry), exc
            )
            return False
        self.stats.last_error = None
        return True

    def check_for_change(self) -> bool:
        """Reload if the file's signature changed since the last attempt; True if it reloaded."""
        signature = self._stat()
        if signature == self._signature:
            return False
        # Record the attempt even if it fails, so a bad file is reported once, not every poll.
        self._signature = signature
        return self.reload()

    async def start(self) -> None:
        """Load the file (raising if it is bad), then watch it."""
        if self._signature is None:
            self.load()
        if self.settings.poll_interval_s > 0 and self._poll_task is None:
            self._poll_task = asyncio.create_task(self._poll(), name="static-discovery")
        if self.settings.reload_on_sighup and self._unsubscribe_sighup is None:
            self._unsubscribe_sighup = subscribe_sighup(self._on_sighup)

    async def stop(self) -> None:
        if self._unsubscribe_sighup is not None:
            self._unsubscribe_sighup()
            self._unsubscribe_sighup = None
        task, self._poll_task = self._poll_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _on_sighup(self) -> None:
        log.info("static discovery: SIGHUP, reloading %s", self.path)
        self._signature = self._stat()
        self.reload()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            self.check_for_change()

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError:
            return (-1, -1, -1)
        return (st.st_mtime_ns, st.st_size, st.st_ino)
