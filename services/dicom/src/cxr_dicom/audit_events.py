"""The node's audit trail: a FHIR AuditEvent (R4; validated with ``fhir.resources.R4B``, identical for AuditEvent)
shaped by IHE Basic Audit Log Patterns (BALP), one JSON line each on the ``cxr.audit`` logger, whenever a study's
instance is received or refused and whenever its results are sent to a destination (success or failure).

Codes (services/dicom/README.md, "Audit trail", says the same):

- DICOM instances received (C-STORE or STOW-RS) and DICOM results sent (STOW-RS, C-STORE): ``type`` DCM 110104
  "DICOM Instances Transferred" (the DICOM PS3.15 A.5.3.4 message that IHE uses for network transfers of
  instances; DCM 110107 "Import" and 110106 "Export" are for media), ``action`` C (the node created its copy)
  when receiving, R when sending.
- FHIR results sent (to a FHIR server or folder): ``type`` DCM 110106 "Export", ``action`` R: the data leaves
  the node's custody, as in BALP's export/disclosure pattern.
- ``subtype``: the intake or destination (``urn:cxr:dicom:transfer``#dimse|stow|cstore|fhir|fhir_folder).
- BALP's agents: one Source Role ID (DCM 110153) and one Destination Role ID (DCM 110152). The sender is the
  calling AE title (C-STORE) or the API key's fingerprint (STOW-RS; never the key); the receiver is the node's
  AE title or the destination (AE title, or URL without credentials or query). The sender's network address is
  the connection's peer; for STOW-RS behind a gateway (the peer is one of ``security.trusted_proxies``) it is
  the client X-Forwarded-For names (from the right, the first address that is no trusted proxy), as the
  gRPC allow-list reads it. ``source``: the node, type 4 "Application Server".
- ``entity``: the study, ``what.identifier`` = its Study Instance UID (``urn:oid:``, identifier type DCM 110180
  "Study Instance UID"; absent when a refused instance's header names none), type 2 "System Object", role 3
  "Report"; ``detail`` says which objects (sr, seg, fhir_bundle) or how many instances. No patient data: the
  audit repository links the study to its patient.
- ``outcome``: 0 success; 4 minor failure for an instance the node refused (``outcomeDesc``: the status and the
  refusal kind, e.g. ``0xA900 SOP_CLASS_NOT_SUPPORTED``); 8 serious failure of a send (``outcomeDesc``, the
  error class only).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cxr_serving.audit import AUDIT

DCM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
NETWORK_TYPE = "http://hl7.org/fhir/network-type"  # R4's code system of agent.network.type (1 name, 2 IP, 5 URI)
TRANSFER_SYSTEM = "urn:cxr:dicom:transfer"
AE_TITLE_SYSTEM = "urn:cxr:dicom:ae-title"
API_KEY_SYSTEM = "urn:cxr:api-key-id"
URL_SYSTEM = "urn:ietf:rfc:3986"
DICOM_UID_SYSTEM = "urn:dicom:uid"

INSTANCES_TRANSFERRED = {"system": DCM, "code": "110104", "display": "DICOM Instances Transferred"}
EXPORT = {"system": DCM, "code": "110106", "display": "Export"}
SOURCE_ROLE = {"system": DCM, "code": "110153", "display": "Source Role ID"}
DESTINATION_ROLE = {"system": DCM, "code": "110152", "display": "Destination Role ID"}
STUDY_UID_TYPE = {"system": DCM, "code": "110180", "display": "Study Instance UID"}
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"


def _agent(role: dict[str, str], who: dict[str, Any], *, requestor: bool, address: str = "") -> dict[str, Any]:
    agent: dict[str, Any] = {"type": {"coding": [role]}, "who": who, "requestor": requestor}
    if address:
        agent["network"] = {"address": address, "type": _address_type(address)}
    return agent


def _address_type(address: str) -> str:
    if "://" in address:
        return "5"
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "1"
    return "2"


def _ae(title: str) -> dict[str, Any]:
    return {"identifier": {"system": AE_TITLE_SYSTEM, "value": title}, "display": title}


def _who(calling_ae: str | None, api_key_id: str | None) -> dict[str, Any]:
    if calling_ae:
        return _ae(calling_ae)
    if api_key_id:
        return {"identifier": {"system": API_KEY_SYSTEM, "value": api_key_id}, "display": "API key " + api_key_id}
    return {"display": "unauthenticated sender"}


def public_url(url: str) -> str:
    """``url`` without user info, query or fragment: an audit line never carries a credential."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _study(study_uid: str, details: dict[str, str]) -> dict[str, Any]:
    """The study entity; without ``what`` when the study is not known (an instance refused unread)."""
    entity: dict[str, Any] = {
        "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
        "role": {"system": OBJECT_ROLE, "code": "3", "display": "Report"},
        "detail": [{"type": k, "valueString": v} for k, v in details.items()],
    }
    if study_uid:
        entity["what"] = {
            "identifier": {
                "type": {"coding": [STUDY_UID_TYPE]},
                "system": DICOM_UID_SYSTEM,
                "value": f"urn:oid:{study_uid}",
            }
        }
    return entity


def _event(
    kind: dict[str, str],
    action: str,
    subtype: str,
    agents: list[dict[str, Any]],
    node_ae: str,
    study: dict[str, Any],
    error: str | None,
    failure: str = SERIOUS_FAILURE,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(uuid.uuid4()),
        "type": kind,
        "subtype": [{"system": TRANSFER_SYSTEM, "code": subtype}],
        "action": action,
        "recorded": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "outcome": SUCCESS if error is None else failure,
        "agent": agents,
        "source": {
            "site": node_ae,
            "observer": {"display": f"cxr-dicom {node_ae} on {socket.gethostname()}"},
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": [study],
    }
    if error is not None:
        event["outcomeDesc"] = error
    return validate(event)


def validate(event: dict[str, Any]) -> dict[str, Any]:
    """The event as fhir.resources (R4B) accepts it; ValueError when it is not a valid AuditEvent."""
    from fhir.resources.R4B.auditevent import AuditEvent

    try:
        AuditEvent.model_validate(event)
    except Exception as exc:  # pydantic.ValidationError
        raise ValueError(f"invalid AuditEvent: {exc}") from None
    return event


def import_event(
    study_uid: str,
    *,
    intake: str,
    node_ae: str,
    calling_ae: str | None = None,
    api_key_id: str | None = None,
    peer: str = "",
    sop_instances: int = 1,
    refused: str | None = None,
) -> dict[str, Any]:
    """A study's instances received by an intake (``dimse`` or ``stow``), sent by an AE title or an API key from
    the address ``peer``; with ``refused`` (the status and kind) the node refused them: outcome 4, minor failure."""
    agents = [
        _agent(SOURCE_ROLE, _who(calling_ae, api_key_id), requestor=True, address=peer),
        _agent(DESTINATION_ROLE, _ae(node_ae), requestor=False),
    ]
    study = _study(study_uid, {"instances": str(sop_instances)})
    return _event(INSTANCES_TRANSFERRED, "C", intake, agents, node_ae, study, refused, MINOR_FAILURE)


def export_event(
    study_uid: str,
    *,
    destination: str,
    target: str,
    node_ae: str,
    objects: Sequence[str],
    error: str | None = None,
) -> dict[str, Any]:
    """A study's results sent to one ``destination`` kind at ``target`` (an AE title@host:port or a URL)."""
    dicom = destination in ("stow", "cstore")
    if destination == "cstore":
        title, _, address = target.partition("@")
        who, host = _ae(title), address.rsplit(":", 1)[0]
    else:
        url = public_url(target) if "://" in target else target
        who = {"identifier": {"system": URL_SYSTEM, "value": url}, "display": url}
        host = url if "://" in url else ""
    agents = [
        _agent(SOURCE_ROLE, _ae(node_ae), requestor=True),
        _agent(DESTINATION_ROLE, who, requestor=False, address=host),
    ]
    study = _study(study_uid, {"objects": ",".join(objects)})
    return _event(INSTANCES_TRANSFERRED if dicom else EXPORT, "R", destination, agents, node_ae, study, error)


def emit(event: dict[str, Any]) -> None:
    """One JSON line on ``cxr.audit``: ``audit`` true, ``event`` (dicom.<action>), ``auditEvent`` the resource."""
    action = "import" if event["action"] == "C" else "export"
    AUDIT.info("audit", extra={"fields": {"audit": True, "event": f"dicom.{action}", "auditEvent": event}})


def received(study_uid: str, **kwargs: Any) -> None:
    """Emit the import event (``refused=...``: of a refusal); auditing never fails the transfer it records."""
    try:
        emit(import_event(study_uid, **kwargs))
    except Exception:
        logging.getLogger(__name__).exception("could not write the import audit event")


@contextmanager
def exporting(study_uid: str, *, destination: str, target: str, node_ae: str, objects: Sequence[str]) -> Iterator[None]:
    """Emit the export event of the block: success when it returns, failure (error class) when it raises."""
    error: str | None = None
    try:
        yield
    except Exception as exc:
        error = f"{type(exc).__name__}"
        raise
    finally:
        try:
            emit(
                export_event(
                    study_uid, destination=destination, target=target, node_ae=node_ae, objects=objects, error=error
                )
            )
        except Exception:
            logging.getLogger(__name__).exception("could not write the export audit event")
