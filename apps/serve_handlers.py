"""The work behind `/v1/chat/completions` and `/v1/images/generations`: requests prepared in a worker thread
(image decoding, tokenization), submitted to the engine, and awaited without blocking the event loop; streams
as server-sent events in the OpenAI chunk format. A client that goes away cancels its requests at the next
engine step, so its rows are freed.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid

from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from .serve_errors import APIError, api_error
from .serve_media import resolve_messages
from .serve_schemas import ChatRequest, ImageRequest


def _sampling(pipe, req: ChatRequest) -> dict:
    s = {k: v for k, v in req.sampling().items() if v is not None and v != ()}
    settings = getattr(pipe, "chat_sampling", None) or {}
    for k, v in settings.items():  # the model folder's recommended sampling, where the request says nothing
        s.setdefault(k, v)
    return s


def _submit(pipe, state, req: ChatRequest) -> list:
    """Prepare and submit `req.n` requests (a worker thread: images are decoded and prompts tokenized here)."""
    messages = resolve_messages(req.messages, state.media)
    sampling = _sampling(pipe, req)
    handles = []
    try:
        for k in range(req.n):
            s = dict(sampling)
            if req.seed is not None:
                s["seed"] = req.seed + k  # n seeded choices differ, each reproducible
            handles.append(pipe.submit_chat(messages, **s) if pipe.understanding is not None
                           else _submit_text(pipe, messages, s))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


def _submit_text(pipe, messages, sampling):
    """A text-only model: the chat template over the text, completed on the engine."""
    chat = pipe.cfg.chat
    if chat is None:
        raise APIError(400, "this model has no chat template: use a model with one", "invalid_request_error")
    if any(not isinstance(m["content"], str) for m in messages):
        raise APIError(400, "this model reads text only: send string contents", "invalid_request_error")
    pipe.check_prompt_chars(messages)
    text = chat.prompt([m for m in messages if m["role"] != "system"],
                       next((m["content"] for m in messages if m["role"] == "system"), None))
    ids = pipe.tokenizer.encode(text)
    params = pipe._params(sampling)
    pipe.check_prompt_length(len(ids), params.max_new_tokens)
    return pipe._run([pipe._text_request(params, prompt_ids=ids)])[0]


def _usage(results) -> dict:
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def chat_completion(pipe, state, req: ChatRequest):
    why = req.unsupported()
    if why:
        raise APIError(400, why, "invalid_request_error")
    try:
        handles = await run_in_threadpool(_submit, pipe, state, req)
    except Exception as e:
        raise api_error(e) from None
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(handles, rid, created, state.model_name, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        results = await asyncio.gather(*(h.aresult() for h in handles))
    except asyncio.CancelledError:
        for h in handles:
            h.cancel()
        raise
    except Exception as e:
        raise api_error(e) from None
    choices = [{"index": k, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                "finish_reason": "length" if r.finish_reason == "length" else "stop"} for k, r in enumerate(results)]
    return {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
            "choices": choices, "usage": _usage(results)}


async def _sse(handles, rid: str, created: int, model: str, include_usage: bool):
    """Chunks: the role first, then content deltas, then each choice's finish reason; `[DONE]` last."""
    def chunk(choices, usage=None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, h) -> None:
        try:
            async for ev in h.aevents():
                if ev.text:
                    await queue.put((k, ev.text, None))
            await queue.put((k, None, h.result()))
        except Exception as e:  # the request failed inside the engine: end this choice with the error
            await queue.put((k, None, e))

    try:
        for k in range(len(handles)):
            yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        tasks = [asyncio.create_task(pump(k, h)) for k, h in enumerate(handles)]
        results, left = [None] * len(handles), len(handles)
        while left:
            k, text, end = await queue.get()
            if text is not None:
                yield chunk([{"index": k, "delta": {"content": text}, "finish_reason": None}])
                continue
            left -= 1
            if isinstance(end, Exception):
                err = api_error(end)
                yield f"data: {json.dumps({'error': {'message': str(err), 'type': err.kind, 'code': err.code}})}\n\n"
                continue
            results[k] = end
            reason = "length" if end.finish_reason == "length" else "stop"
            yield chunk([{"index": k, "delta": {}, "finish_reason": reason}])
        await asyncio.gather(*tasks)
        if include_usage:
            yield chunk([], _usage([r for r in results if r is not None]))
        yield "data: [DONE]\n\n"
    finally:  # a client that disconnects frees its rows at the next engine step
        for h in handles:
            h.cancel()


async def image_generation(pipe, state, req: ImageRequest) -> dict:
    if req.response_format != "b64_json":
        raise APIError(400, "response_format 'url' is not supported (this server keeps no files): use b64_json",
                       "invalid_request_error", param="response_format")
    try:
        side = req.side()
    except ValueError as e:
        raise APIError(400, str(e), "invalid_request_error", param="size") from None
    cfg = req.guidance_scale if req.guidance_scale is not None else req.cfg
    steps = req.num_inference_steps if req.num_inference_steps is not None else req.steps
    try:
        job = await run_in_threadpool(pipe.submit_generate, req.prompt, req.n, req.seed, cfg, req.temperature,
                                      steps, side)
    except Exception as e:
        raise api_error(e) from None
    try:
        result = await job.handle.aresult()
    except asyncio.CancelledError:
        job.handle.cancel()
        raise
    except Exception as e:
        raise api_error(e) from None
    images = await run_in_threadpool(job.images, result)

    def b64(im) -> str:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")

    return {"created": int(time.time()), "data": [{"b64_json": b64(im)} for im in images]}
