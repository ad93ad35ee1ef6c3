"""API keys at the gateway: `Authorization: Bearer <key>` on HTTP, `authorization` metadata on gRPC.

Off only in dev mode (`SPECMESH_GATEWAY__DEV_MODE=true`, which `make up` sets and says so).
Outside dev mode with no key configured every request is refused, with a message saying
how to configure one. `/health`, `/version`, `/metrics` and the gRPC health service stay open.
Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac

import grpc
from fastapi.responses import JSONResponse

from shared.settings import Settings

OPEN_PATHS = ("/health", "/version", "/metrics", "/docs", "/openapi.json", "/redoc")


class ApiKeys:
    def __init__(self, settings: Settings):
        self.dev_mode = settings.gateway.dev_mode
        self.keys = [k.get_secret_value().encode() for k in settings.gateway.api_keys]

    def check(self, authorization: str | None) -> str | None:
        """None if the request may proceed, else the reason it may not."""
        if self.dev_mode:
            return None
        if not self.keys:
            return ("This gateway has no API keys configured: set SPECMESH_GATEWAY__API_KEYS='[\"<key>\"]' "
                    "(or SPECMESH_GATEWAY__DEV_MODE=true for development).")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "Missing API key: send the header 'Authorization: Bearer <key>'."
        presented = token.strip().encode()
        if not any(hmac.compare_digest(presented, key) for key in self.keys):
            return "Invalid API key."
        return None


def http_middleware(keys: ApiKeys):
    """A FastAPI middleware refusing /v1 requests without a valid key (OpenAI's 401 shape)."""

    async def middleware(request, call_next):
        if request.url.path.startswith(OPEN_PATHS):
            return await call_next(request)
        reason = keys.check(request.headers.get("authorization"))
        if reason is not None:
            return JSONResponse({"error": {"message": reason, "type": "invalid_request_error", "param": None,
                                           "code": "invalid_api_key"}}, status_code=401)
        return await call_next(request)

    return middleware


class GrpcAuth(grpc.aio.ServerInterceptor):
    """Refuses TextGeneration calls without a valid key with UNAUTHENTICATED; health stays open."""

    def __init__(self, keys: ApiKeys):
        self.keys = keys

    async def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health."):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        reason = self.keys.check(metadata.get("authorization"))
        if reason is None:
            return await continuation(details)
        handler = await continuation(details)

        async def deny_unary(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
            yield  # pragma: no cover  (makes this an async generator)

        if handler is None:
            return None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny_unary, handler.request_deserializer, handler.response_serializer)
        return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer, handler.response_serializer)
