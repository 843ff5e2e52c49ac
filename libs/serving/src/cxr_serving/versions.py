"""Which loaded version of a model answers a request (Triton's `version_policy`, KServe's canary split),
with no gRPC and no models: names (`name@version`), roles, and the deterministic traffic split.

A request that names a version gets that version. Otherwise the serving version answers, except for the
canary share, which goes to the candidate; a sample of the requests the serving version answers is also
run on the candidate in the background (shadow). Both shares are a counter-based weighted round robin,
so any run of n unpinned requests sends floor(n * p / 100) or one more to the candidate, never a random
number of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from cxr_serving.errors import InvalidInputError


class VersionPolicy(StrEnum):
    """What a plain LoadModel does to the default version (the one unpinned requests get)."""

    LATEST = "latest"  # the version loaded last serves (a LoadModel replaces the serving version)
    PINNED = "pinned"  # the serving version stays until a promote or rollback; new loads go beside it


class VersionRole(StrEnum):
    """What a loaded version does, as ListModels reports it."""

    SERVING = "serving"  # unpinned requests, less the canary share
    CANARY = "canary"  # the candidate with a canary share
    SHADOW = "shadow"  # the candidate that only runs on a sample in the background
    CANARY_SHADOW = "canary+shadow"
    PREVIOUS = "previous"  # the version a rollback returns to
    STANDBY = "standby"  # loaded; only requests that pin it


def split_name(raw: str) -> tuple[str, str]:
    """`name@version` -> (name, version); a bare name has version ""."""
    name, _, version = raw.partition("@")
    return name, version


def check_percent(what: str, value: float) -> float:
    if not (math.isfinite(value) and 0.0 <= value <= 100.0):
        raise InvalidInputError(f"{what} must be within [0, 100]; got {value}", reason="PERCENT_OUT_OF_RANGE")
    return float(value)


@dataclass
class WeightedCounter:
    """Deterministic share: call n takes when floor(n * p) crosses an integer, p in hundredths of a percent."""

    calls: int = 0

    def take(self, percent: float) -> bool:
        basis = round(percent * 100)  # 0..10000
        before = self.calls * basis // 10000
        self.calls += 1
        return self.calls * basis // 10000 > before


@dataclass
class VersionRoute:
    """The routing state of one model: which loaded versions serve, stand by or are tried."""

    policy: VersionPolicy = VersionPolicy.LATEST
    serving: str = ""
    previous: str = ""
    candidate: str = ""
    canary_percent: float = 0.0
    shadow_percent: float = 0.0
    _canary: WeightedCounter = field(default_factory=WeightedCounter)
    _shadow: WeightedCounter = field(default_factory=WeightedCounter)

    def pick(self) -> tuple[str, str, str]:
        """(version, how it was chosen, version to shadow on or "") for one unpinned request."""
        if self.candidate and self.canary_percent and self._canary.take(self.canary_percent):
            return self.candidate, "canary", ""
        if self.candidate and self.shadow_percent and self._shadow.take(self.shadow_percent):
            return self.serving, "serving", self.candidate
        return self.serving, "serving", ""

    def set_candidate(self, version: str, canary_percent: float, shadow_percent: float) -> None:
        self.candidate = version
        self.canary_percent = canary_percent if version else 0.0
        self.shadow_percent = shadow_percent if version else 0.0
        self._canary, self._shadow = WeightedCounter(), WeightedCounter()

    def promote(self, version: str) -> None:
        if version == self.serving:
            return
        self.previous, self.serving = self.serving, version
        if self.candidate in (version, self.previous):
            self.set_candidate("", 0.0, 0.0)

    def forget(self, version: str) -> None:
        """A version was unloaded: nothing routes to it any more."""
        if self.candidate == version:
            self.set_candidate("", 0.0, 0.0)
        if self.previous == version:
            self.previous = ""

    def role(self, version: str) -> VersionRole:
        if version == self.serving:
            return VersionRole.SERVING
        if version == self.candidate and self.canary_percent and self.shadow_percent:
            return VersionRole.CANARY_SHADOW
        if version == self.candidate and self.canary_percent:
            return VersionRole.CANARY
        if version == self.candidate and self.shadow_percent:
            return VersionRole.SHADOW
        if version == self.previous:
            return VersionRole.PREVIOUS
        return VersionRole.STANDBY

    def share(self, version: str) -> float:
        """Percent of unpinned requests this version answers."""
        if version == self.serving:
            return 100.0 - (self.canary_percent if self.candidate else 0.0)
        return self.canary_percent if version == self.candidate else 0.0
