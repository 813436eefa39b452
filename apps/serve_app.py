"""The OpenAI-compatible HTTP API of `mmstack serve`, on one pipeline and its continuous-batching engine.

    GET  /health                    200 {"status": "ok", ...engine load}, 503 while the model loads
    GET  /v1/models                 the one model this server holds
    POST /v1/chat/completions       messages with text and image_url parts; stream: true -> SSE chunks
    POST /v1/images/generations     models with a generation path; b64_json PNGs

Bodies are bounded before they are parsed (`BodyLimit`: 413), requests validated (`serve_schemas`: 400),
prompts bounded before they are tokenized (the pipeline: 400), a full engine queue answers 429, and every
error has the OpenAI shape `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .http_limits import BodyLimit
from .serve_errors import APIError, error_response
from .serve_handlers import chat_completion, image_generation
from .serve_media import MediaPolicy
from .serve_schemas import ChatRequest, ImageRequest

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the routes share: the pipeline (None while loading), its public name, and the server's limits."""

    model_name: str
    pipe: object = None
    load_error: Optional[str] = None
    api_key: Optional[str] = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_body_bytes: int = 16 * 1024 * 1024
    created: int = field(default_factory=lambda: int(time.time()))


def build_server(state: ServerState) -> FastAPI:
    """The FastAPI app for `state` (mount the demo on it with `gr.mount_gradio_app` if wanted)."""
    app = FastAPI(title="mmstack", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mmstack = state

    @app.exception_handler(APIError)
    async def _api(request, e: APIError):
        return error_response(e.status, str(e), e.kind, e.code, e.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):  # unreadable bodies, unknown routes: the same error shape
        kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error"}
        return error_response(e.status_code, str(e.detail), kinds.get(e.status_code, "server_error"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_response(400, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request_error",
                              param=where or None)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "")
            if not secrets.compare_digest(got.encode(), f"Bearer {state.api_key}".encode()):
                return error_response(401, "invalid or missing API key (Authorization: Bearer ...)",
                                      "authentication_error", "invalid_api_key")
        return await call_next(request)

    def ready():
        if state.pipe is None:
            if state.load_error:
                raise APIError(503, f"the model failed to load: {state.load_error}", "service_unavailable")
            raise APIError(503, "the model is loading; try again shortly", "service_unavailable", "loading")
        return state.pipe

    @app.get("/health")
    async def health():
        if state.pipe is None:
            return JSONResponse({"status": "error" if state.load_error else "loading", "error": state.load_error},
                                status_code=503)
        return {"status": "ok", "model": state.model_name, **state.pipe.engine.load}

    @app.get("/v1/models")
    async def models():
        ready()
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "mmstack"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        return await chat_completion(ready(), state, req)

    @app.post("/v1/images/generations")
    async def images(req: ImageRequest):
        pipe = ready()
        return await image_generation(pipe, state, req)

    return BodyLimit(app, state.max_body_bytes), app


__all__ = ["ServerState", "build_server", "BodyLimit"]
