"""cxr DICOM node foundations: the intake check, the durable work queue and the result objects (SR, FHIR)."""
