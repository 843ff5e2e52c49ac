"""cxr_dicom.worker.build_results: the SR's and the SEG's UIDs are fixed by the source image and the algorithms,
so a retried analysis sends the same objects (a PACS keeps one of each) and new weights or a new version new ones.

The SEG is the segmentation service's own (cxr_segmentation.dicom_seg), which draws random UIDs."""

from __future__ import annotations

import io
import re

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from cxr_dicom.results import Algorithm, AlgorithmResult, Finding, Measurement
from cxr_dicom.worker import build_results
from tests.support.paths import DICOM_DIR

SOURCE = DICOM_DIR / "nih-dx-mono2-8bit.dcm"
CLASSIFIER = Algorithm("binary_classifier", "3f1e9c", "3f1e9c", untrained=True)
SEGMENTER = Algorithm("segmentation", "77ab01", "77ab01", untrained=True)
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def results(
    classifier: Algorithm = CLASSIFIER, segmenter: Algorithm = SEGMENTER, threshold: float = 0.5
) -> list[AlgorithmResult]:
    return [
        AlgorithmResult(classifier, findings=(Finding("Effusion", 0.7, threshold, 0.7 >= threshold),)),
        AlgorithmResult(segmenter, measurements=(Measurement("cardiothoracic_ratio", 0.48, "1"),)),
    ]


@pytest.fixture(scope="module")
def source_bytes() -> bytes:
    return SOURCE.read_bytes()


def seg_bytes(data: bytes) -> bytes:
    """A fresh SEG from the segmentation service's builder: new random UIDs on every call, as on every attempt."""
    from cxr_segmentation.dicom_seg import build_dicom_seg

    source = pydicom.dcmread(io.BytesIO(data))
    masks = np.zeros((1, int(source.Rows), int(source.Columns)), dtype=bool)
    masks[0, 50:150, 60:160] = True
    return build_dicom_seg(source, masks, ["heart"], algorithm_name=SEGMENTER.name, algorithm_version="77ab01")


def uids(data: bytes, algorithm_results: list[AlgorithmResult]) -> dict[str, tuple[str, str, str]]:
    """Modality -> (Series Instance UID, SOP Instance UID, file meta Media Storage SOP Instance UID)."""
    datasets, _ = build_results(data, algorithm_results, seg_bytes(data))
    out = {}
    for ds in datasets:
        encoded = io.BytesIO()
        ds.save_as(encoded, enforce_file_format=True)
        back = pydicom.dcmread(io.BytesIO(encoded.getvalue()))
        out[str(back.Modality)] = (
            str(back.SeriesInstanceUID),
            str(back.SOPInstanceUID),
            str(back.file_meta.MediaStorageSOPInstanceUID),
        )
    return out


def test_a_retry_builds_the_same_sr_and_seg_uids_valid_and_consistent_with_the_file_meta(source_bytes):
    first = uids(source_bytes, results())
    again = uids(source_bytes, results())
    assert sorted(first) == ["SEG", "SR"]
    assert again == first  # the SEG bytes differ (random UIDs from the segmentation service); ours do not
    source = pydicom.dcmread(io.BytesIO(source_bytes), stop_before_pixels=True)
    every = [uid for triple in first.values() for uid in triple]
    for uid in every:
        assert len(uid) <= 64 and _UID.match(uid) and UID(uid).is_valid, uid
    for series, sop, media in first.values():
        assert sop == media  # the file meta names the same instance
        assert series != source.SeriesInstanceUID and sop != source.SOPInstanceUID
    assert len({first["SEG"][0], first["SR"][0], first["SEG"][1], first["SR"][1]}) == 4


def test_a_new_version_or_checkpoint_gives_new_uids(source_bytes):
    first = uids(source_bytes, results())
    new_version = Algorithm(SEGMENTER.name, "77ab02", SEGMENTER.checkpoint_hash, untrained=True)
    new_weights = Algorithm(SEGMENTER.name, SEGMENTER.version, "0" * 64, untrained=True)
    for segmenter in (new_version, new_weights):
        other = uids(source_bytes, results(segmenter=segmenter))
        assert other["SEG"][1] != first["SEG"][1] and other["SR"][1] != first["SR"][1]
    # a new classifier changes the SR (it carries its findings), not the SEG (it does not)
    new_classifier = uids(source_bytes, results(classifier=Algorithm(CLASSIFIER.name, "9", "9", untrained=True)))
    assert new_classifier["SR"][1] != first["SR"][1] and new_classifier["SEG"] == first["SEG"]


def test_another_source_image_gives_other_uids(source_bytes):
    ds = pydicom.dcmread(io.BytesIO(source_bytes))
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    first, other = uids(source_bytes, results()), uids(buf.getvalue(), results())
    assert other["SEG"][1] != first["SEG"][1] and other["SR"][1] != first["SR"][1]
    assert other["SEG"][0] == first["SEG"][0]  # same study, same algorithms: the same results series


def test_new_thresholds_give_a_new_sr_and_the_same_seg(source_bytes):
    """Another operating point changes the SR's decisions: a PACS must not keep the first SR as the same object."""
    first, other = uids(source_bytes, results()), uids(source_bytes, results(threshold=0.8))
    assert other["SR"][1] != first["SR"][1] and other["SEG"] == first["SEG"]
    assert uids(source_bytes, results(threshold=0.8)) == other
