"""Errors of `mmstack serve` in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}` with the
status a client can act on (400 bad request, 401 key, 413 too large, 429 busy, 500, 503 loading)."""
from __future__ import annotations

import logging
from typing import Optional

from fastapi.responses import JSONResponse

from mmstack.errors import CapabilityError, ConfigError, EngineBusy, GenerationError, TokenizerError
from mmstack.vision.image_io import ImageError

from .serve_media import MediaError

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param


def error_response(status: int, message: str, kind: str, code: Optional[str] = None, param: Optional[str] = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def api_error(e: Exception) -> APIError:
    """A pipeline / engine exception -> the HTTP error a client should see."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineBusy):
        return APIError(429, str(e), "rate_limit_error", "server_busy")
    if isinstance(e, CapabilityError):
        return APIError(400, str(e), "invalid_request_error", "unsupported")
    if isinstance(e, (GenerationError, TokenizerError, MediaError, ImageError, ConfigError, ValueError)):
        return APIError(400, str(e), "invalid_request_error")
    log.exception("request failed")
    return APIError(500, f"internal error ({type(e).__name__})", "server_error")



__all__ = ["APIError", "error_response", "api_error"]
