"""`models.dicom`: the DICOM node's own config schema, validated through `Settings.model_section`.

Intakes (the C-STORE SCP and the STOW-RS route), the durable queue, the priority rule, the services that
analyse each image (reached through `cxr_client`), where results go, and the retry backoff. Every key is
also reachable as `CXR_MODELS__DICOM__<KEY>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cxr_dicom.priority import PriorityPolicy
from cxr_serving.errors import ConfigError
from cxr_serving.settings import Settings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _ae_title(value: str) -> str:
    value = value.strip()
    if not 1 <= len(value) <= 16 or "\\" in value or not value.isprintable():
        raise ValueError(f"AE title {value!r}: 1 to 16 printable characters without a backslash")
    return value


class AnalysisConfig(_Strict):
    """The platform services each image goes through (the same client settings as `cxr_client`)."""

    classification_endpoint: str | None = Field(
        None, description="classification gRPC endpoint; None: the client's (CXR_CLASSIFICATION_ENDPOINT)"
    )
    segmentation_endpoint: str | None = Field(
        None, description="segmentation gRPC endpoint; None: the client's (CXR_SEGMENTATION_ENDPOINT)"
    )
    api_key: str | None = Field(None, description="key sent to those services; None: api_key_file, then CXR_API_KEY")
    api_key_file: Path | None = Field(None, description="file whose first line is that key (a mounted secret)")
    timeout_s: float = Field(120, gt=0, description="deadline of one classification or segmentation call")
    classification_models: list[str] = Field(
        default_factory=list, description="classifiers to run; empty: every ready classifier"
    )


class CStorePeer(_Strict):
    """A PACS that receives the results by C-STORE."""

    host: str = Field(..., description="the PACS host")
    port: int = Field(..., ge=1, le=65535, description="the PACS DIMSE port")
    ae_title: str = Field(..., description="the PACS (called) AE title")

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _ae_title(v)


class DestinationsConfig(_Strict):
    """Where the SR, the SEG and the FHIR bundle go; at least one DICOM destination is required."""

    stow_url: str | None = Field(None, description="DICOMweb base URL receiving SR and SEG by STOW-RS")
    stow_headers: dict[str, str] = Field(
        default_factory=dict, description="extra HTTP headers of the STOW-RS requests (e.g. Authorization)"
    )
    cstore: CStorePeer | None = Field(None, description="PACS receiving SR and SEG by C-STORE")
    fhir_url: str | None = Field(None, description="FHIR R4 base URL receiving the transaction bundle")
    fhir_headers: dict[str, str] = Field(
        default_factory=dict,
        description="extra HTTP headers of the FHIR POST (e.g. Authorization; a secret: set it by"
        " CXR_MODELS__DICOM__DESTINATIONS__FHIR_HEADERS from a Secret, not in the config file)",
    )
    fhir_folder: Path | None = Field(
        None, description="folder receiving the bundle as <report uuid>.json (relative: under data_path)"
    )
    timeout_s: float = Field(60, gt=0, description="time limit of one send (STOW-RS, C-STORE or FHIR)")

    @model_validator(mode="after")
    def _somewhere(self) -> DestinationsConfig:
        if self.stow_url is None and self.cstore is None:
            raise ValueError("destinations: set stow_url and/or cstore, or the results would go nowhere")
        return self


class DicomConfig(_Strict):
    """`models.dicom`: the DICOM node (C-STORE SCP and STOW-RS in, SR/SEG/FHIR out)."""

    ae_title: str = Field("CXR", description="the node's AE title (called AE title of the C-STORE SCP)")
    dimse_port: int = Field(11112, ge=0, le=65535, description="C-STORE SCP port; 0 picks a free one (tests)")
    accepted_calling_ae_titles: list[str] = Field(
        default_factory=list, description="calling AE titles allowed to send; empty: any"
    )
    stow_port: int = Field(8043, ge=0, le=65535, description="STOW-RS HTTP port; 0 picks a free one (tests)")
    stow_max_request_mb: float = Field(512, gt=0, description="larger STOW-RS requests are refused (413)")
    data_path: Path = Field(
        Path("dicom"), description="received files and the SQLite queue (relative: under the top-level data_path)"
    )
    max_queue_size: int = Field(10_000, ge=1, description="unfinished instances; more get 0xA700 / 503 Retry-After")
    max_attempts: int = Field(
        5,
        ge=1,
        description="failed attempts (one a killed node left included) before an instance is dead-lettered; a"
        " transient failure (a service or destination down) spends none",
    )
    max_transient_retry_s: float = Field(
        86400,
        gt=0,
        description="how long an instance is retried, with backoff and no attempt spent, while its failures are"
        " transient: analysis UNAVAILABLE/DEADLINE_EXCEEDED/RESOURCE_EXHAUSTED, a send's connection error or"
        " timeout, HTTP 5xx/429 from STOW-RS or FHIR, no C-STORE association or answer; then dead-lettered",
    )
    lease_s: float = Field(
        600,
        gt=0,
        description="time a worker holds an instance before another may take it; a restarted node takes back"
        " the claims of the process before it at once; must exceed analysis.timeout_s plus destinations.timeout_s"
        " per configured send (STOW-RS, C-STORE, FHIR URL)",
    )
    workers: int = Field(
        2,
        ge=1,
        le=64,
        description="instances analysed at once; as many more may be having their results built and sent meanwhile",
    )
    done_retention_s: float = Field(
        7 * 24 * 3600,
        ge=0,
        description="finished instances are forgotten after this; a re-send within it is not analysed again",
    )
    retry_backoff_initial_s: float = Field(
        5, ge=0, description="delay before the first retry (doubles each time, transient retries included)"
    )
    retry_backoff_max_s: float = Field(600, ge=0, description="longest delay between retries, transient ones included")
    busy_retry_after_s: int = Field(30, ge=1, description="Retry-After of a STOW-RS 503 while the queue is full")
    priority_rules: list[dict[str, Any]] = Field(
        default_factory=list,
        description='STAT rules, first match wins: {"keyword": "RequestedProcedurePriority", "values": ["STAT"]} '
        'or {"calling_ae_titles": ["ER_DX"]}, each with "priority": "stat"|"routine"',
    )
    default_priority: Literal["stat", "routine"] = Field("routine", description="priority when no rule matches")
    analysis: AnalysisConfig = Field(
        default_factory=AnalysisConfig,  # type: ignore[arg-type]
        description="the classification and segmentation services",
    )
    destinations: DestinationsConfig = Field(..., description="where the results go")

    @field_validator("ae_title")
    @classmethod
    def _own_ae(cls, v: str) -> str:
        return _ae_title(v)

    @field_validator("accepted_calling_ae_titles")
    @classmethod
    def _callers(cls, v: list[str]) -> list[str]:
        return [_ae_title(a) for a in v]

    @model_validator(mode="after")
    def _check(self) -> DicomConfig:
        self.priority_policy()  # an unknown key, keyword or priority is refused at start
        if self.retry_backoff_initial_s > self.retry_backoff_max_s:
            raise ValueError("retry_backoff_initial_s must not exceed retry_backoff_max_s")
        longest = self.longest_attempt_s()
        if self.lease_s <= longest:
            raise ValueError(
                f"lease_s ({self.lease_s:g}) must exceed the longest attempt, {longest:g}s: analysis.timeout_s"
                f" ({self.analysis.timeout_s:g}) plus destinations.timeout_s ({self.destinations.timeout_s:g}) per"
                " configured send; otherwise another worker takes the instance while it is still being sent"
            )
        return self

    def longest_attempt_s(self) -> float:
        """The analysis (classification and segmentation run at once) plus each configured send's time limit."""
        d = self.destinations
        sends = sum(x is not None for x in (d.stow_url, d.cstore, d.fhir_url))
        return float(self.analysis.timeout_s + d.timeout_s * sends)

    def priority_policy(self) -> PriorityPolicy:
        return PriorityPolicy.from_config(self.priority_rules, self.default_priority)

    def backoff_s(self, attempts: int) -> float:
        """Delay before the retry that follows the ``attempts``-th failed attempt."""
        return float(min(self.retry_backoff_max_s, self.retry_backoff_initial_s * 2 ** max(0, attempts - 1)))


def dicom_config(settings: Settings) -> DicomConfig:
    """`models.dicom` validated, with relative paths under the top-level data_path."""
    cfg = settings.model_section("dicom", DicomConfig)
    if cfg is None:
        raise ConfigError("models.dicom: missing; the dicom service needs at least models.dicom.destinations")
    dest = cfg.destinations
    folder = None if dest.fhir_folder is None else settings.resolve_data_path(dest.fhir_folder)
    return cfg.model_copy(
        update={
            "data_path": settings.resolve_data_path(cfg.data_path),
            "destinations": dest.model_copy(update={"fhir_folder": folder}),
        }
    )
