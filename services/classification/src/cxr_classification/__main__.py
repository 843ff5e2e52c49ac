"""`python -m cxr_classification --config config/local.json`."""

from cxr_classification.service import main

if __name__ == "__main__":
    main()
