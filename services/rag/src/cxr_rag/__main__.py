"""`python -m cxr_rag --config FILE` serves the RAG gRPC service."""

from cxr_rag.service import main

if __name__ == "__main__":
    main()
