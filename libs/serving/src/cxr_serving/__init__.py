"""Shared serving runtime of the cxr platform.

Model code imports only `lifecycle`, `errors`, `images` and `device`; gRPC lives in
`server`, `auth`, `observability`, `model_admin` and `grpc_errors`. The module map is libs/serving/README.md.
"""

__version__ = "0.1.0"
