"""The atheris fuzzer on the decoder, bounded for CI, plus a replay of every input it ever
found (fuzz/regressions/) so that a fixed crash stays fixed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from fuzz.run import run_fuzzer
from tests.support.invariants import decode_outcome
from tests.support.paths import REPO

REGRESSIONS = sorted((REPO / "fuzz" / "regressions").iterdir())
FUZZ_SECONDS = int(os.environ.get("CXR_FUZZ_SECONDS", "20"))


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: p.name)
def test_past_findings_are_refused_cleanly(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        assert decode_outcome(path.read_bytes()) != "ok"
        assert time.perf_counter() - started < 5


# What each finding must decode to now: (reason, a fragment of the message that shows the cause was
# recognised, not swallowed). Every file in fuzz/regressions/ has an entry.
EXPECTED = {
    "dicom-rle-rust-panic.dcm": ("IMAGE_CORRUPT", "PanicException"),
    "dicom-rle-panic-backtrace-oom.dcm": ("IMAGE_CORRUPT", "PanicException"),
    # pydicom read PixelData with a mutated VR of SQ and failed with AttributeError inside pixel_array
    "dicom-pixeldata-vr-sq-attributeerror.dcm": ("IMAGE_CORRUPT", "PixelData has VR SQ"),
    # encapsulated pixel data with no frame: pydicom's frame reader raised StopIteration
    "dicom-encapsulated-no-frames-stopiteration.dcm": ("IMAGE_CORRUPT", "StopIteration"),
    # NumberOfFrames (IS) with several values: our int() of a MultiValue raised TypeError
    "dicom-multivalued-numberofframes-typeerror.dcm": ("IMAGE_CORRUPT", "NumberOfFrames has 3 values"),
    # mutational campaign: TransferSyntaxUID with two values; pydicom's UID() raised TypeError
    "dicom-multivalued-transfersyntaxuid-typeerror.dcm": (
        "IMAGE_CORRUPT",
        "TransferSyntaxUID (0002,0010) must be one UID",
    ),
    # mutational campaign (pixel data cut from 512x512 to 128x128): RescaleIntercept "0\0\x7f", which
    # pydicom keeps as text; its modality LUT added the text to the pixels (UFuncTypeError)
    "dicom-rescaleintercept-text-ufunctypeerror.dcm": ("IMAGE_CORRUPT", "RescaleIntercept '0"),
    # mutational campaign: TransferSyntaxUID with VR SH; pydicom's "not supported" message read .name of a str
    "dicom-transfersyntaxuid-not-ui-attributeerror.dcm": (
        "IMAGE_CORRUPT",
        "TransferSyntaxUID (0002,0010) must be one UID",
    ),
    # mutational campaign: implicit-VR PixelData (OB or OW) without BitsAllocated; reading it to check its VR
    # made pydicom resolve the ambiguous VR, which raised AttributeError
    "dicom-ambiguous-pixeldata-vr-no-bitsallocated-attributeerror.dcm": ("IMAGE_CORRUPT", "['BitsAllocated']"),
    # mutational campaign: an empty RescaleSlope; pydicom's modality LUT multiplied the pixels by "" (UFuncTypeError)
    "dicom-rescaleslope-empty-ufunctypeerror.dcm": ("IMAGE_CORRUPT", "RescaleSlope '' is not one number"),
    # mutational campaign: BitsAllocated with VR LO ("US"); pydicom compared 1 <= "US" (TypeError)
    "dicom-bitsallocated-vr-lo-typeerror.dcm": ("IMAGE_CORRUPT", "BitsAllocated 'US' is not one integer"),
    # mutational campaign (the worker's hang watchdog fired): a 1024x1024 JPEG-baseline DICOM whose JPEG SOF says
    # 65535x65535; libjpeg went on decoding 4 gigapixels (> 120 s, unbounded memory)
    "dicom-jpeg-sof-65535x65535-hang.dcm": (
        "IMAGE_CORRUPT",
        "declares 65535x65535 pixels but Rows/Columns say 1024x1024",
    ),
    # mutational campaign (hang watchdog): a corrupt segment length after the quantization tables ended our
    # header walk, and libjpeg resynchronised on a later frame header of 65535x65535 (> 25 s)
    "dicom-jpeg-corrupt-segment-length-hang.dcm": (
        "IMAGE_CORRUPT",
        "declares 65535x65535 pixels but Rows/Columns say 1024x1024",
    ),
    # fuzzer, session 31: SamplesPerPixel with VR PN; int() of the PersonName (TypeError)
    "dicom-samplesperpixel-vr-pn-typeerror.dcm": ("IMAGE_CORRUPT", "SamplesPerPixel '\\x01' is not one integer"),
    # fuzzer in a CI run: SpecificCharacterSet with VR PN; pydicom's reader sliced the PersonName (TypeError)
    "dicom-specificcharacterset-vr-pn-typeerror.dcm": (
        "IMAGE_CORRUPT",
        "SpecificCharacterSet (0008,0005) could not be used",
    ),
}


def test_every_regression_has_an_expected_outcome():
    assert sorted(EXPECTED) == sorted(p.name for p in REGRESSIONS)


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: p.name)
def test_past_findings_are_refused_for_their_cause(path: Path):
    from cxr_serving.errors import ImageRejectedError
    from cxr_serving.images import decode_image

    reason, fragment = EXPECTED[path.name]
    with warnings.catch_warnings(), pytest.raises(ImageRejectedError) as err:
        warnings.simplefilter("ignore")
        decode_image(path.read_bytes())
    assert (err.value.reason, fragment in err.value.message) == (reason, True), err.value.message


@pytest.mark.slow
def test_fuzz_decode_image_finds_nothing(tmp_path):
    result = run_fuzzer("decode_image", seconds=FUZZ_SECONDS, workdir=tmp_path, small_seeds=True)
    (tmp_path / "decode_image.json").write_text(json.dumps(result, indent=2))
    out_dir = os.environ.get("CXR_FUZZ_RESULTS_DIR")  # CI can keep the summary as an artifact
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "decode_image.json").write_text(json.dumps(result, indent=2))
    for finding in result["findings"]:  # keep the inputs for triage beyond pytest's tmp rotation
        keep = Path(tempfile.gettempdir()) / "cxr-fuzz-findings"
        keep.mkdir(exist_ok=True)
        shutil.copy(finding["input"], keep / Path(finding["input"]).name)
    confirmed = [f for f in result["findings"] if f["confirmed"]]
    assert confirmed == [], json.dumps(result["findings"], indent=2) + result["log_tail"]
    # an OOM/timeout that an uninstrumented replay does not reproduce is instrumentation overhead
    assert result["exit_code"] == 0 or result["findings"], result["log_tail"]
    if not result["findings"]:  # a replayed resource finding ends the run early
        assert result["executions"] and result["executions"] > 200, result  # ~40/s instrumented on 2 busy cores
        assert result["coverage_edges"] and result["coverage_edges"] > 1000, result  # pydicom, PIL instrumented


def test_replay_peak_rss_is_the_decoders_not_the_test_process():
    """getrusage's peak survives fork+exec; a big parent must not turn a small decode into an OOM."""
    import numpy as np

    from fuzz.run import replay

    ballast = np.ones((400, 1024, 1024), dtype=np.uint8)  # ~400 MB resident in this process
    result = replay(sorted(REGRESSIONS)[0], rss_limit_mb=300)
    assert ballast[0, 0, 0] == 1
    assert result["ok"], result
    assert result["peak_rss_mb"] < 300


def test_mutational_fuzzing_reaches_the_decoders_and_finds_nothing(tmp_path):
    """The uninstrumented mutational mode (fuzz/mutate.py), bounded: 2,000 executions or 20 s. Its
    inputs must get past format sniffing into the decoders, or its execution count means nothing."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fuzz.mutate", "--seed=7", "--executions=2000", "--seconds=20", f"--out={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["findings"] == [], json.dumps(stats["findings"], indent=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert stats["executions"] == 2000 or stats["seconds"] >= 20, stats
    assert stats["executions"] >= 300, stats  # ~500/s on one idle core; 20 s bounds a busy one
    assert stats["past_sniffing_total"] >= 0.30, stats["past_sniffing_fraction"]
    assert set(stats["past_sniffing_fraction"]) == {"png", "jpeg", "dcm"}, stats["past_sniffing_fraction"]
    assert stats["decoded_total"] > 0.01, stats["decoded_fraction"]  # mutants still decode, not all refused
