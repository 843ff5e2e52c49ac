"""The DICOM node's priority rule reaches the analysis services: a study the rule makes STAT (C-STORE from the
calling AE title ER_DX) is analysed with `priority` STAT on both its classification and segmentation calls, a
routine one with ROUTINE (real services behind a recording proxy, a real Orthanc; the stack of test_dicom_node)."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom

from cxr_dicom.service import build_binding as dicom_binding
from cxr_protos.classification.v1 import classification_service_pb2 as cls_pb
from cxr_protos.common.v1 import common_pb2
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as seg_pb
from tests.support.dicom_node import WAIT_S, LoopThread, Stack, c_store, copy_with_new_uids, node_settings, start_server
from tests.support.grpc_recorder import RecordingProxy
from tests.support.paths import dicom_files


def test_a_stat_study_is_analysed_with_stat_priority(stack: Stack, tmp_path: Path) -> None:
    loop = LoopThread()
    proxies = [RecordingProxy(f"127.0.0.1:{port}") for port in stack.analysis_ports]
    try:
        for proxy in proxies:
            loop.run(proxy.start())
        settings = node_settings(tmp_path, stack.orthanc, proxies[0].port, proxies[1].port)
        server = loop.run(start_server(settings, dicom_binding(settings)))
        mine = Stack(loop, stack.orthanc, server, tmp_path)
        try:
            _, routine = copy_with_new_uids(dicom_files()[0], tmp_path / "routine")
            _, stat = copy_with_new_uids(dicom_files()[0], tmp_path / "stat")
            assert c_store(mine.node.dimse_port, routine) == 0x0000
            assert c_store(mine.node.dimse_port, stat, calling="ER_DX") == 0x0000
            answers = mine.wait_finished([str(routine.StudyInstanceUID), str(stat.StudyInstanceUID)], WAIT_S)
            assert all(a.done == 1 for a in answers.values()), answers
        finally:
            mine.channel.close()
            loop.run(server.stop(grace=1), timeout=60)
    finally:
        for proxy in proxies:
            loop.run(proxy.stop(), timeout=30)
        loop.close()

    sent = [cls_pb.ClassifyImageRequest.FromString(b) for b in proxies[0].of("/ClassifyImage")]
    sent += [seg_pb.SegmentImageRequest.FromString(b) for b in proxies[1].of("/SegmentImage")]
    by_sop: dict[str, list[int]] = {}
    for request in sent:
        sop = str(pydicom.dcmread(io.BytesIO(request.image.data), stop_before_pixels=True).SOPInstanceUID)
        by_sop.setdefault(sop, []).append(request.priority)
    assert by_sop == {
        str(routine.SOPInstanceUID): [common_pb2.PRIORITY_ROUTINE] * 2,
        str(stat.SOPInstanceUID): [common_pb2.PRIORITY_STAT] * 2,
    }
