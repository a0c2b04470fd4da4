"""Fleet specs: the text a user writes to describe a simulated fleet, parsed into pod groups.

Grammar (whitespace ignored, case-insensitive)::

    fleet   := group ("," group)*
    group   := COUNT [ROLE] (":" option)*       e.g.  8   4p:tp1   1d:tp4:profile=NAME
             | (COUNT ROLE)+                    shorthand without options, e.g.  4p1d
    ROLE    := "b" (both, the default) | "p" (prefill) | "d" (decode)
    option  := "tp" INT                         GPUs per pod (tensor parallel degree)
             | "profile=" NAME                  engine profile for this group's pods

Examples: ``8`` = 8 `both` pods; ``4p1d`` = 4 prefill pods + 1 decode pod; ``4p:tp1,1d:tp4``
the same with explicit TP. A group without `tp` or `profile` takes the defaults the caller
passes (the CLI's `--profile`, and that profile's own TP). A fleet with prefill pods needs
decode pods and vice versa; `both` pods may not be mixed with P/D pods.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from router.pods import Role

_ROLES = {"b": Role.BOTH, "p": Role.PREFILL, "d": Role.DECODE, "": Role.BOTH}
_GROUP = re.compile(r"^(\d+)([bpd]?)((?::[^:]+)*)$")
_SHORTHAND = re.compile(r"^(?:\d+[bpd])+$")
_SHORT_PART = re.compile(r"(\d+)([bpd])")


class FleetSpecError(ValueError):
    """A fleet spec that does not parse; the message quotes the offending part."""


@dataclass(frozen=True, slots=True)
class PodGroup:
    count: int
    role: Role
    #: GPUs per pod; None = the profile's default.
    tp: int | None = None
    #: Engine profile name; None = the run's default profile.
    profile: str | None = None


@dataclass(frozen=True, slots=True)
class FleetSpec:
    text: str
    groups: tuple[PodGroup, ...]

    @property
    def pods(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def disaggregated(self) -> bool:
        return any(g.role is not Role.BOTH for g in self.groups)

    def gpus(self, default_tp: int) -> int:
        """GPUs the fleet uses; groups without `tp` run at `default_tp` (the profile's)."""
        return sum(g.count * (g.tp or default_tp) for g in self.groups)


def _options(group: str, raw: str) -> tuple[int | None, str | None]:
    tp: int | None = None
    profile: str | None = None
    for opt in filter(None, raw.split(":")):
        if re.fullmatch(r"tp\d+", opt):
            tp = int(opt[2:])
            if tp < 1:
                raise FleetSpecError(f"fleet group {group!r}: tp must be >= 1")
        elif opt.startswith("profile="):
            profile = opt[len("profile=") :]
            if not profile:
                raise FleetSpecError(f"fleet group {group!r}: empty profile name")
        else:
            raise FleetSpecError(
                f"fleet group {group!r}: unknown option {opt!r} (tpN, profile=NAME)"
            )
    return tp, profile


def parse_fleet(text: str) -> FleetSpec:
    """Parse a fleet spec; raises FleetSpecError naming the part that is wrong."""
    spec = re.sub(r"\s+", "", text)
    if not spec:
        raise FleetSpecError("empty fleet spec")
    groups: list[PodGroup] = []
    for part in spec.split(","):
        lowered = part.lower()
        profile_case = part  # profile names keep their case
        if _SHORTHAND.match(lowered) and not _GROUP.match(lowered):
            for count, role in _SHORT_PART.findall(lowered):
                groups.append(PodGroup(int(count), _ROLES[role]))
            continue
        m = _GROUP.match(lowered)
        if m is None:
            raise FleetSpecError(
                f"fleet group {part!r} is not COUNT[b|p|d][:tpN][:profile=NAME] or like 4p1d"
            )
        count, role, opts = m.groups()
        tp, profile = _options(part, profile_case[len(count) + len(role) :])
        if tp is None and profile is None and opts:
            raise FleetSpecError(f"fleet group {part!r}: empty option")
        groups.append(PodGroup(int(count), _ROLES[role], tp, profile))
    for g in groups:
        if g.count < 1:
            raise FleetSpecError(f"fleet spec {text!r}: a group has no pods")
    roles = {g.role for g in groups}
    if Role.BOTH in roles and len(roles) > 1:
        raise FleetSpecError(f"fleet spec {text!r} mixes 'both' pods with prefill/decode pods")
    if (Role.PREFILL in roles) != (Role.DECODE in roles):
        raise FleetSpecError(f"fleet spec {text!r} needs both prefill and decode pods")
    return FleetSpec(text, tuple(groups))
