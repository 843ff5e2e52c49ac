"""`python -m cxr_segmentation --config config/local.json`"""

from cxr_segmentation.service import build_binding
from cxr_serving.cli import run_service


def main() -> None:
    raise SystemExit(run_service("segmentation", build_binding))


if __name__ == "__main__":
    main()
