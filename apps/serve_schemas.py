"""Request bodies of `mmstack serve` (the OpenAI API shapes the `openai` client sends), validated with bounds
before any work: counts, lengths and ranges are limited here; the body size is limited before parsing
(`serve_app.BodyLimit`) and the prompt's characters and tokens by the pipeline. Unknown fields are ignored, as
the OpenAI API and vLLM do; fields that would change the answer but are not supported are refused by name.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_MESSAGES = 256
MAX_PARTS = 64
MAX_STOP = 8


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str = Field(max_length=64 * 1024 * 1024)
    detail: Optional[str] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url", "input_image", "image"]
    text: Optional[str] = None
    image_url: Optional[Union[ImageURL, str]] = None

    def url(self) -> Optional[str]:
        ref = self.image_url
        return ref.url if isinstance(ref, ImageURL) else ref


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[ContentPart], None] = None

    @field_validator("content")
    @classmethod
    def _parts(cls, v):
        if isinstance(v, list) and len(v) > MAX_PARTS:
            raise ValueError(f"at most {MAX_PARTS} content parts per message")
        return v


class ChatRequest(BaseModel):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0, le=10.0)
    seed: Optional[int] = Field(default=None, ge=0, lt=2**63)
    stop: Union[str, list[str], None] = None
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stream_options: Optional[dict] = None
    tools: Optional[list] = None
    response_format: Optional[dict] = None
    logprobs: Optional[bool] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP or any(len(s) > 256 for s in stops):
            raise ValueError(f"at most {MAX_STOP} stop strings of at most 256 characters")
        return v

    def unsupported(self) -> Optional[str]:
        """The first requested feature this server cannot honour, named (None when all is fine)."""
        if self.tools:
            return "tools are not supported by this model"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return f"response_format {self.response_format.get('type')!r} is not supported (only text)"
        if self.logprobs:
            return "logprobs are not supported"
        return None

    def sampling(self) -> dict:
        """The request's sampling options, in the pipeline's names (None: the pipeline's default)."""
        return dict(max_new_tokens=self.max_completion_tokens or self.max_tokens, temperature=self.temperature,
                    top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=self.seed,
                    stop_strings=tuple([self.stop] if isinstance(self.stop, str) else (self.stop or ())))


class ImageRequest(BaseModel):
    """POST /v1/images/generations (guidance and steps as extra fields, as other servers take them)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = Field(min_length=1, max_length=32_000)
    model: Optional[str] = None
    n: int = Field(default=1, ge=1, le=16)
    size: Optional[str] = Field(default=None, max_length=32)
    response_format: Literal["b64_json", "url"] = "b64_json"
    seed: Optional[int] = Field(default=None, ge=0, lt=2**63)
    guidance_scale: Optional[float] = Field(default=None, ge=0.0, le=100.0)
    cfg: Optional[float] = Field(default=None, ge=0.0, le=100.0)
    num_inference_steps: Optional[int] = Field(default=None, ge=1, le=1000)
    steps: Optional[int] = Field(default=None, ge=1, le=1000)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    quality: Optional[str] = None
    style: Optional[str] = None

    def side(self) -> Optional[int]:
        """`size` "WxH" -> the side of a square image; ValueError for anything else."""
        if self.size in (None, "auto"):
            return None
        w, sep, h = self.size.lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit():
            raise ValueError(f"size must be WIDTHxHEIGHT, got {self.size!r}")
        if w != h:
            raise ValueError(f"size must be square, got {self.size!r}")
        return int(w)
