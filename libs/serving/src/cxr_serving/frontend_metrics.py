"""One /metrics for a node with frontend processes: the executor's own series, and each frontend's
(pushed over its link every second) with a `frontend` label, merged family by family so that each
metric name appears once, as the exposition format requires."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample


class FrontendMetrics(Collector):
    """`base`'s families, plus every frontend's last text under `frontend="<index>"`."""

    def __init__(self, texts: Mapping[int, str], base: CollectorRegistry = REGISTRY) -> None:
        self._texts = texts
        self._base = base

    def collect(self) -> Iterator[Metric]:
        families = {m.name: m for m in self._base.collect()}
        for index, text in sorted(dict(self._texts).items()):
            for fam in text_string_to_metric_families(text):
                target = families.get(fam.name)
                if target is None:
                    target = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    labels = {**s.labels, "frontend": str(index)}
                    target.samples.append(Sample(s.name, labels, s.value, s.timestamp, s.exemplar))
        yield from families.values()


def merged_registry(texts: Mapping[int, str]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(FrontendMetrics(texts))
    return registry
