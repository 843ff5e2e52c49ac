"""cxr segmentation service: anatomy masks, cardiothoracic ratio, overlay and DICOM-SEG over gRPC."""

__version__ = "0.1.0"
