"""`python -m cxr_dicom --config FILE`: the DICOM node (same as `python -m cxr_serving dicom`)."""

from cxr_dicom.service import build_binding
from cxr_serving.cli import run_service

if __name__ == "__main__":
    raise SystemExit(run_service("dicom", build_binding))
