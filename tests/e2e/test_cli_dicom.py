"""`cxr dicom status|dead-letters|retry`, the client calls under them and the MCP tool `dicom_study_status`,
against the real DICOM node of the test stack (tests/support/client_stack.py): a shared DICOM is sent to it by
C-STORE as a new study, and the node dead-letters it after its one attempt (its destination is a closed port)."""

from __future__ import annotations

import json
import time

import pydicom
import pytest
from mcp import Client
from pydicom.uid import generate_uid
from pynetdicom import AE

from cxr_client import CxrClient
from cxr_client.cli import main
from cxr_client.mcp.server import build_server
from cxr_protos.dicom.v1 import dicom_service_pb2 as dicom_pb
from tests.support.client_stack import get_stack, use_stack_env
from tests.support.paths import dicom_files
from tests.support.servers import TEST_KEY

pytestmark = pytest.mark.slow  # starts the real stack (shared with the other e2e tests)

WAIT_S = 90.0


@pytest.fixture(scope="module")
def stack():
    return get_stack("real")


@pytest.fixture
def env(stack, monkeypatch):
    return use_stack_env(stack, monkeypatch)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def wait_dead(client: CxrClient, study: str, attempts: int = 1) -> dicom_pb.GetStudyStatusResponse:
    deadline = time.monotonic() + WAIT_S
    while True:
        st = client.study_status(study)
        if st.dead == 1 and st.finished and st.instances[0].attempts == attempts:
            return st
        assert time.monotonic() < deadline, f"not dead-lettered in {WAIT_S}s: {st}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def dead_study(stack) -> tuple[str, str]:
    """(study UID, SOP UID) of an instance the stack's node accepted by C-STORE and then dead-lettered."""
    node = stack.servers["dicom"].binding.extra["node"]
    ds = pydicom.dcmread(dicom_files()[0])
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title=node.cfg.ae_title)
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(ds).Status) == 0x0000
    finally:
        assoc.release()
    with CxrClient(stack.config()) as client:
        wait_dead(client, ds.StudyInstanceUID)
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


def test_cli_dicom_status_table_json_and_exit_code(env, capsys, dead_study):
    study, sop = dead_study
    rc, out, _ = run_cli(capsys, "dicom", "status", study)
    assert rc == 1  # a dead-lettered instance needs an operator
    assert f"study {study}: finished (queued 0, in progress 0, done 0, dead 1)" in out
    row = next(line for line in out.splitlines() if line.startswith(sop))
    assert row.split()[1:4] == ["dead", "routine", "1"] and len(row.split()) > 4 and not row.endswith(" -")

    rc, out, _ = run_cli(capsys, "--json", "dicom", "status", study)
    data = json.loads(out)
    assert rc == 1
    assert (data["study_instance_uid"], data["queued"], data["in_progress"], data["done"], data["dead"]) == (
        study,
        0,
        0,
        0,
        1,
    )
    assert data["finished"] is True
    (inst,) = data["instances"]
    assert inst["sop_instance_uid"] == sop and inst["state"] == "INSTANCE_STATE_DEAD"
    assert inst["priority"] == "PRIORITY_ROUTINE" and inst["attempts"] == 1 and inst["last_error"]


def test_cli_dicom_status_of_an_unknown_study(env, capsys, dead_study):
    unknown = generate_uid()
    rc, out, err = run_cli(capsys, "dicom", "status", unknown)
    assert rc == 1 and out == ""
    assert f"study {unknown} is unknown to the DICOM node" in err and "NOT_FOUND" in err
    rc, out, _ = run_cli(capsys, "--json", "dicom", "status", unknown)
    assert rc == 1 and json.loads(out)["error"]["code"] == "NOT_FOUND"


def test_cli_dicom_dead_letters_and_retry_with_the_admin_key(env, capsys, monkeypatch, dead_study):
    study, sop = dead_study
    rc, out, _ = run_cli(capsys, "--json", "dicom", "dead-letters", "--study", study)
    assert rc == 0
    (inst,) = json.loads(out)
    assert inst["sop_instance_uid"] == sop and inst["state"] == "INSTANCE_STATE_DEAD" and inst["last_error"]
    rc, out, _ = run_cli(capsys, "dicom", "dead-letters")
    assert rc == 0 and sop in out
    rc, out, _ = run_cli(capsys, "dicom", "dead-letters", "--study", generate_uid())
    assert rc == 0 and out.strip() == "no dead-lettered instance"

    # the inference key cannot retry: the node refuses it as an admin RPC
    rc, _, err = run_cli(capsys, "--admin-api-key", TEST_KEY, "dicom", "retry", sop)
    assert rc == 1 and "PERMISSION_DENIED" in err
    # an unknown instance is not requeued: exit 1
    rc, out, _ = run_cli(capsys, "--json", "dicom", "retry", generate_uid())
    assert rc == 1 and json.loads(out)["requeued"] is False

    rc, out, _ = run_cli(capsys, "dicom", "retry", sop)
    assert rc == 0 and out.strip() == f"{sop}: queued again"
    # requeued with its attempts reset: the next failure is its first attempt again, not its second
    with CxrClient(get_stack("real").config()) as client:
        wait_dead(client, study, attempts=1)

    monkeypatch.delenv("CXR_ADMIN_API_KEY")
    rc, _, err = run_cli(capsys, "dicom", "retry", sop)
    assert rc == 2 and "no admin key is configured" in err  # nothing sent without an admin key


async def test_mcp_dicom_study_status(stack, dead_study):
    study, sop = dead_study
    async with Client(build_server(stack.config(), admin_tools=False)) as mcp:
        res = await mcp.call_tool("dicom_study_status", {"study_instance_uid": study})
        assert not res.is_error, res.content
        data = res.structured_content
        assert data["dead"] == 1 and data["finished"] is True and data["queued"] == 0
        (inst,) = data["instances"]
        assert (inst["sop_instance_uid"], inst["state"], inst["priority"]) == (sop, "dead", "routine")
        res = await mcp.call_tool("dicom_study_status", {"study_instance_uid": generate_uid()})
        assert res.is_error and "NOT_FOUND" in res.content[0].text


def test_cli_dicom_retry_all_requeues_every_dead_letter_of_the_study(env, capsys, dead_study):
    study, sop = dead_study
    with CxrClient(get_stack("real").config()) as client:
        wait_dead(client, study, attempts=1)
    rc, _, err = run_cli(capsys, "dicom", "retry", "--study", study)
    assert rc == 2 and "--all" in err  # --study alone would not say which instances
    rc, out, _ = run_cli(capsys, "--json", "dicom", "retry", "--all", "--study", study)
    assert rc == 0 and json.loads(out) == {"requeued": [sop], "skipped": 0}
    with CxrClient(get_stack("real").config()) as client:
        assert client.study_status(study).dead == 0  # queued again (or in progress) right after
        wait_dead(client, study, attempts=1)
    rc, out, _ = run_cli(capsys, "dicom", "retry", "--all", "--study", generate_uid())
    assert rc == 0 and out.strip() == "0 dead-lettered instance(s) queued again"
