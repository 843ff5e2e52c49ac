"""`python -m cxr_serving <service> --config FILE`: start a catalog service by its name."""

from cxr_serving.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
