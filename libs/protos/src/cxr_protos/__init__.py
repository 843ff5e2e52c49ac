"""Generated gRPC stubs of the cxr API. Do not edit: run `make generate`."""
