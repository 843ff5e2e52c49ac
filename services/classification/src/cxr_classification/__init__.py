"""cxr classification service: normal/abnormal (timm Swin) and 14 NIH findings (DenseNet-121)."""

from cxr_classification.config import BINARY_MODEL, MULTILABEL_MODEL, NIH_LABELS

__all__ = ["BINARY_MODEL", "MULTILABEL_MODEL", "NIH_LABELS"]
