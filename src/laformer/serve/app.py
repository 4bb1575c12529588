"""The FastAPI application: routes, Bearer auth, and OpenAI-style JSON errors for everything that goes wrong.

Every failure (bad JSON, a wrong type, an unknown route, a full queue, a bug) becomes
``{"error": {"message", "type", "code", "param"}}`` with its status, so one bad request never stops the server.
"""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager

from laformer.extras import require

require("fastapi", "serve", "laformer serve")

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from laformer.errors import LaFormerError
from laformer.serve import completions, encode
from laformer.serve.errors import APIError
from laformer.serve.metrics import Metrics
from laformer.serve.protocol import ChatCompletionRequest, ClassifyRequest, CompletionRequest, EmbeddingRequest
from laformer.serve.served import ServedModel

PUBLIC_PATHS = ("/health", "/metrics")  # probes and scrapers need no key
KNOWN_PATHS = PUBLIC_PATHS + ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                              "/v1/classify")
UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}  # pydantic's names for union members
log = logging.getLogger("laformer.serve")


def create_app(served: ServedModel, api_key: str | None = None):
    """The ASGI app serving ``served``; with ``api_key`` every /v1 route needs ``Authorization: Bearer <key>``."""
    metrics = Metrics(served)

    @asynccontextmanager
    async def lifespan(app):
        yield
        served.close()

    app = FastAPI(title="laformer", description="OpenAI-compatible API over a laformer model", lifespan=lifespan)
    app.add_middleware(Gate, api_key=api_key, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        return error(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", "not_found"
                              if exc.status_code == 404 else None))

    @app.exception_handler(LaFormerError)
    async def laformer_error(request, exc: LaFormerError):
        return error(APIError(400, str(exc), "invalid_request"))

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return error(APIError(500, f"internal error ({type(exc).__name__}: {exc}); the server keeps running, "
                                   "please report this", "internal_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        served.check_model(model_id)
        return _model_card(served)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        return await completions.chat_completions(served, metrics, body, request) or Response(status_code=499)

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest, request: Request):
        return await completions.completions(served, metrics, body, request) or Response(status_code=499)

    @app.post("/v1/embeddings")
    async def embed(body: EmbeddingRequest):
        return await encode.embeddings(served, metrics, body)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest):
        return await encode.classify(served, metrics, body)

    return app


def error(exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status)


class Gate:
    """ASGI middleware: refuses /v1 requests without the API key and counts responses by route and status.

    Plain ASGI rather than ``@app.middleware``, whose wrapper would hide a streaming client's disconnect.
    """

    def __init__(self, app, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = []

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        path = scope["path"]
        try:
            if self.api_key and path not in PUBLIC_PATHS and not _authorized(
                    Headers(scope=scope).get("authorization"), self.api_key):
                refusal = error(APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>' "
                                              "with the key the server was started with (--api-key)",
                                         "invalid_api_key"))
                await refusal(scope, receive, send_and_record)
            else:
                await self.app(scope, receive, send_and_record)
        finally:
            route = "/v1/models/{id}" if path.startswith("/v1/models/") else path if path in KNOWN_PATHS else "other"
            self.metrics.count_request(route, status[0] if status else 500)


def _authorized(header: str | None, api_key: str) -> bool:
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())


def _validation_error(exc) -> APIError:
    """pydantic's first complaint, with the field it is about in OpenAI's spelling (``messages[0].role``)."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('msg')}); send a JSON object",
                        "invalid_json")
    field = _param(first.get("loc", ()))
    what = f"{field}: " if field else ""
    return APIError(400, f"invalid request: {what}{first.get('msg')} (got {first.get('input')!r:.200})",
                    "invalid_request", field)


def _param(location: tuple) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``messages[0].role``; stops at a union member's tag (``str``)."""
    param = ""
    for part in location[1:] if location[:1] == ("body",) else location:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.isidentifier() and part not in UNION_TAGS:
            param += f".{part}" if param else part
        else:
            break
    return param or None


def _model_card(served: ServedModel) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "laformer",
            "task": served.task, "max_model_len": served.max_length}
