"""The configurable rule that makes an incoming instance STAT or routine, so urgent studies jump the queue.

A rule matches on a DICOM attribute (by keyword, e.g. ``RequestedProcedurePriority`` equal to ``STAT``)
or on the calling AE title of the sender (e.g. the emergency department's modality). Rules are tried
in order; the first that matches gives the priority, and an instance no rule matches gets the default.
Values compare after stripping spaces and ignoring case, as DICOM code strings are padded and
senders differ in case.

Config shape (a list under the service's settings)::

    [{"keyword": "RequestedProcedurePriority", "values": ["STAT", "HIGH"], "priority": "stat"},
     {"calling_ae_titles": ["ER_CR1"], "priority": "stat"}]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import tag_for_keyword

from cxr_dicom.work_queue import Priority


def _norm(value: object) -> str:
    return str(value).strip().casefold()


@dataclass(frozen=True)
class PriorityRule:
    """Match ``keyword`` against any of ``values``, or the calling AE title against ``calling_ae_titles``."""

    priority: Priority
    keyword: str | None = None
    values: tuple[str, ...] = ()
    calling_ae_titles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.keyword is None) == (not self.calling_ae_titles):
            raise ValueError("a priority rule needs exactly one of `keyword` (with `values`) or `calling_ae_titles`")
        if self.keyword is not None:
            if tag_for_keyword(self.keyword) is None:
                raise ValueError(f"priority rule: {self.keyword!r} is not a DICOM attribute keyword")
            if not self.values:
                raise ValueError(f"priority rule on {self.keyword}: `values` is empty")

    def matches(self, ds: Any, calling_ae: str | None) -> bool:
        if self.keyword is None:
            return calling_ae is not None and _norm(calling_ae) in {_norm(a) for a in self.calling_ae_titles}
        value = ds.get(self.keyword) if ds is not None else None
        if value is None:
            return False
        found = (
            [_norm(v) for v in value] if isinstance(value, Sequence) and not isinstance(value, str) else [_norm(value)]
        )
        wanted = {_norm(v) for v in self.values}
        return any(v in wanted for v in found)


@dataclass(frozen=True)
class PriorityPolicy:
    """The ordered rules and the priority of an instance none of them matches."""

    rules: tuple[PriorityRule, ...] = ()
    default: Priority = Priority.ROUTINE

    def decide(self, ds: Any, calling_ae: str | None = None) -> Priority:
        for rule in self.rules:
            if rule.matches(ds, calling_ae):
                return rule.priority
        return self.default

    @classmethod
    def from_config(cls, rules: Iterable[Mapping[str, Any]], default: str = "routine") -> PriorityPolicy:
        """Build from config dicts; an unknown key, keyword or priority raises ValueError (never ignored)."""
        parsed = []
        for i, raw in enumerate(rules):
            unknown = set(raw) - {"keyword", "values", "calling_ae_titles", "priority"}
            if unknown:
                raise ValueError(f"priority rule {i}: unknown keys {sorted(unknown)}")
            parsed.append(
                PriorityRule(
                    priority=_priority(raw.get("priority", "stat"), f"priority rule {i}"),
                    keyword=raw.get("keyword"),
                    values=tuple(str(v) for v in raw.get("values", ())),
                    calling_ae_titles=tuple(str(a) for a in raw.get("calling_ae_titles", ())),
                )
            )
        return cls(rules=tuple(parsed), default=_priority(default, "default priority"))


def _priority(name: object, where: str) -> Priority:
    try:
        return Priority[str(name).strip().upper()]
    except KeyError:
        raise ValueError(f"{where}: priority {name!r} is not one of {[p.name.lower() for p in Priority]}") from None
