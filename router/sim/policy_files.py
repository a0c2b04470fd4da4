"""Router config files as simulator policies (`kvroute simulate --policy-config NAME=FILE`).

Owns turning any file `kvroute proxy --config` accepts into a policy the runner can run next
to the built-in ones, so a user's own weights, or a peer's published configuration rewritten
as a kvroute config (see `configs/policies/`), are compared without code.

The file is read with the router's own `load_config`, so it is validated exactly as the live
faces validate it (unknown plugins and parameters are errors naming them). What the simulator
then changes, as `router.sim.policies.policy_config` does for the built-in policies:

- `pods` is dropped: the fleet comes from `--fleet` / `--pods`;
- `blocks` becomes chars mode with `block_size` = the engines' KV block size and 4 characters
  a token: simulated requests carry token ids, which the router keys in blocks of the engine
  block size whatever the file says (a tokenizer file would not exist here);
- `seed` is the run's `--seed` unless the file sets one;
- `prefix_index.mode: auto` is resolved as a live face resolves it: precise when the file
  configures KV `events`, else approximate.

Whether the engines' KV events feed the precise index follows from the plugins: when any of
them (or the P/D handler) reads the precise index, it is fed, as for `prefix-precise`.
A P/D fleet needs a file with a `pd-profile-handler` (its decode and prefill profiles).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from router.blocks import BlockConfig
from router.config import ConfigError, RouterConfig, load_config
from router.pods import PodRegistry


@dataclass(frozen=True, slots=True)
class PolicyFile:
    """A policy named on the command line, read from a router config file."""

    name: str
    path: Path
    config: RouterConfig

    def config_for(self, *, block_size: int, disaggregated: bool, seed: int) -> RouterConfig:
        """The file's config adapted to a simulated fleet (see the module doc)."""
        if disaggregated and self.config.handler.type != "pd-profile-handler":
            raise ValueError(
                f"policy {self.name!r} ({self.path}): a prefill/decode fleet needs a config "
                "with a pd-profile-handler and decode/prefill scheduling profiles"
            )
        pi = self.config.prefix_index
        if pi.mode == "auto":
            mode = "precise" if self.config.events is not None else "approximate"
            pi = dataclasses.replace(pi, mode=mode)
        blocks = BlockConfig(mode="chars", block_size=block_size, chars_per_block=4 * block_size)
        return dataclasses.replace(
            self.config,
            pods=(),
            blocks=blocks,
            prefix_index=pi,
            seed=self.config.seed if self.config.seed is not None else seed,
        )

    def reads_precise_index(self, *, block_size: int = 16, disaggregated: bool = False) -> bool:
        """True when a plugin (or the P/D handler) of the file reads the precise index, so
        the engines' KV events must feed it."""
        from router.scheduler import PDProfileHandler, Scheduler

        config = self.config_for(block_size=block_size, disaggregated=disaggregated, seed=0)
        probe = Scheduler(config, PodRegistry())
        modes = {getattr(p, "mode", None) for p in probe.plugins.values()}
        if isinstance(probe.handler, PDProfileHandler):
            modes.add(probe.handler.mode)
        return "precise" in modes


def parse_policy_file(spec: str) -> PolicyFile:
    """`NAME=FILE` → the loaded policy. Errors name the spec and what is wrong with it."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    path = path.strip()
    if not sep or not name or not path:
        raise ValueError(f"--policy-config {spec!r}: expected NAME=FILE, e.g. mine=router.yaml")
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise ValueError(f"--policy-config {name}: {exc}") from None
    if not config.profiles:
        raise ValueError(
            f"--policy-config {name}: {path} has no schedulingProfiles (nothing to route with)"
        )
    return PolicyFile(name, Path(path), config)


def load_policy_files(specs: Iterable[str], reserved: Iterable[str] = ()) -> dict[str, PolicyFile]:
    """Parse every `NAME=FILE`; a NAME may not repeat nor shadow a built-in policy."""
    taken = set(reserved)
    out: dict[str, PolicyFile] = {}
    for spec in specs:
        name = spec.partition("=")[0].strip()
        if name in out:
            raise ValueError(f"--policy-config: policy name {name!r} given twice")
        if name in taken:
            raise ValueError(
                f"--policy-config: {name!r} is a built-in policy name; pick another name"
            )
        pf = parse_policy_file(spec)
        out[pf.name] = pf
    return out
