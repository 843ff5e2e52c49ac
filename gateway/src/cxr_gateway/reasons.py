"""google.rpc.ErrorInfo reasons of the gateway's own refusals: the strings the services use for
the same refusal (cxr_serving's ApiKeyInterceptor and admin check), in the same domain, so a
client handles a 401/403 the same way whether Kong or the service refused it."""

from __future__ import annotations

from cxr_serving.grpc_errors import ERROR_DOMAIN

DOMAIN = ERROR_DOMAIN
API_KEY_MISSING = "API_KEY_MISSING"  # 401, as the service's ApiKeyInterceptor
API_KEY_INVALID = "API_KEY_INVALID"  # 401, as the service's ApiKeyInterceptor
ADMIN_REQUIRED = "ADMIN_REQUIRED"  # 403: an inference key on an admin RPC
GROUP_NOT_ALLOWED = "GROUP_NOT_ALLOWED"  # 403: the consumer is in none of the route's acl groups
RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"  # 429: rate-limiting plugin
REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"  # 413: request-size-limiting plugin
CONTENT_LENGTH_REQUIRED = "CONTENT_LENGTH_REQUIRED"  # 411: request-size-limiting, require_content_length
