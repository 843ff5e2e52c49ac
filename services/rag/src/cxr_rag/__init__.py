"""cxr RAG service: literature retrieval on ChromaDB + BM25 and grounded, cited answers."""

__version__ = "0.1.0"
