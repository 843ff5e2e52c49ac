"""The node's kept results (cxr_dicom.worker save/load/discard/sweep) on real files and a real SQLite queue: a
retry reads back exactly what the first build wrote, and nothing stays once an instance is done."""

from __future__ import annotations

import io
import os
import time

import pydicom

from cxr_dicom.results import Algorithm, AlgorithmResult, Finding, Measurement
from cxr_dicom.work_queue import Priority, WorkQueue
from cxr_dicom.worker import (
    RESULTS_DIR,
    TMP_PREFIX,
    TMP_STALE_S,
    build_results,
    discard_results,
    load_results,
    results_path,
    save_results,
    sweep_results,
)
from tests.support.paths import DICOM_DIR

RESULTS = [
    AlgorithmResult(Algorithm("binary_classifier", "v1", "v1"), findings=(Finding("Effusion", 0.7, 0.5, True),)),
    AlgorithmResult(
        Algorithm("segmentation", "v2", "v2"), measurements=(Measurement("cardiothoracic_ratio", 0.5, "1"),)
    ),
]


def _encoded(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_saved_build_reads_back_byte_for_byte_and_a_second_save_keeps_the_first(tmp_path):
    data = (DICOM_DIR / "nih-dx-mono2-8bit.dcm").read_bytes()
    sop = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
    assert load_results(tmp_path, sop) is None
    built, bundle = build_results(data, RESULTS, b"")
    sent, sent_bundle = save_results(tmp_path, sop, built, bundle)
    assert sent_bundle == bundle
    again, again_bundle = load_results(tmp_path, sop) or ([], {})
    assert [o.data for o in again] == [o.data for o in sent] == [_encoded(o.dataset) for o in sent]
    assert again_bundle == bundle
    rebuilt, rebuilt_bundle = build_results(data, RESULTS, b"")
    assert _encoded(rebuilt[0]) != sent[0].data  # a rebuild differs (new content date, tracking UIDs)
    kept, _ = save_results(tmp_path, sop, rebuilt, rebuilt_bundle)  # a folder already there wins
    assert [o.data for o in kept] == [o.data for o in sent]
    assert [p.name for p in (tmp_path / RESULTS_DIR).iterdir()] == [sop]  # no temporary folder left
    discard_results(tmp_path, sop)
    assert not results_path(tmp_path, sop).exists()


def test_the_sweep_removes_results_of_done_and_unknown_instances_and_keeps_the_rest(tmp_path):
    queue = WorkQueue(tmp_path)
    for sop in ("1.1", "1.2", "1.3"):
        queue.enqueue(sop, "9.9", "9.8", Priority.ROUTINE, "{}")
    done = queue.claim("w")
    assert done is not None and queue.complete(done)
    failed = queue.claim("w")
    assert failed is not None
    queue.fail(failed, "boom")  # queued again (or failed-lettered): not done, so its results stay
    root = tmp_path / RESULTS_DIR
    for name in (done.sop_uid, failed.sop_uid, "1.3", "1.4", TMP_PREFIX + "old", TMP_PREFIX + "new"):
        (root / name).mkdir(parents=True)
    old = time.time() - TMP_STALE_S - 10
    os.utime(root / (TMP_PREFIX + "old"), (old, old))
    assert sweep_results(tmp_path, queue) == 3  # done, unknown (1.4), the stale temporary folder
    assert sorted(p.name for p in root.iterdir()) == sorted([failed.sop_uid, "1.3", TMP_PREFIX + "new"])
