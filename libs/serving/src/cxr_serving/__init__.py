"""Shared serving runtime of the cxr platform (DESIGN.md §3).

Model code imports only `lifecycle`, `errors`, `images` and `device`; gRPC lives in
`server`, `interceptors` and `grpc_errors`.
"""

__version__ = "0.1.0"
