"""`mmstack serve`: an OpenAI-compatible server (FastAPI + uvicorn) on one model and its engine.

    mmstack serve                                   # the embedded demo model on http://127.0.0.1:8000/v1
    mmstack serve --model deepseek-ai/deepseek-vl2-tiny --port 8000 --api-key sk-local
    mmstack serve --demo                            # the web demo too, at /demo, on the same engine

Then any OpenAI client: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")`. The server binds
127.0.0.1 unless `--host` says otherwise; the model loads after the port opens (`/health` answers 503
"loading" until then).
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import Optional

from .arg_types import at_least, port, positive_float
from .model_args import add_model_arguments, load_kwargs

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--served-model-name", default=None, help="the model id clients see (default: --model, or 'mmstack-demo')")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port(), default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/ routes")
    p.add_argument("--vae", default=None, help="JanusFlow's VAE folder or hub id, when not inside --model")
    p.add_argument("--max-batch", type=at_least(1), default=32, help="sequences decoded together (engine rows)")
    p.add_argument("--max-waiting", type=at_least(0), default=64, help="requests queued beyond those running; then 429")
    p.add_argument("--max-body-mb", type=positive_float, default=16.0, help="largest request body accepted (413 above)")
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image URLs (off: data: URIs only)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="serve local image paths and file:// URLs inside DIR only (default: none)")
    p.add_argument("--demo", action="store_true", help="also serve the web demo at /demo, on the same engine")


def load_pipeline(args):
    import mmstack
    from mmstack.api import default_model_dir
    from mmstack.engine import EngineConfig

    from .model_settings import demo_settings

    pipe = mmstack.load(args.model or default_model_dir(), vae=args.vae, **load_kwargs(args))
    pipe.engine_config = EngineConfig(max_rows=args.max_batch, max_waiting=args.max_waiting)
    pipe.chat_sampling = {k: v for k, v in demo_settings(pipe).get("chat_sampling", {}).items()
                          if k in ("temperature", "top_p", "repetition_penalty", "max_new_tokens")}
    return pipe


def build(args):
    """(the ASGI app to run, its `ServerState`)."""
    from .serve_app import ServerState, build_server
    from .serve_media import MediaPolicy

    root = Path(args.allowed_local_media_path).resolve() if args.allowed_local_media_path else None
    state = ServerState(model_name=args.served_model_name or args.model or "mmstack-demo", api_key=args.api_key,
                        media=MediaPolicy(allow_remote=args.allow_remote_media, local_root=root),
                        max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    asgi, app = build_server(state)
    if args.demo:  # the demo needs the pipeline to build its page: load first
        import gradio as gr

        from .demo import build_app

        state.pipe = load_pipeline(args)
        gr.mount_gradio_app(app, build_app(state.pipe), path="/demo")
    return asgi, state


def _load_in_background(state, args) -> None:
    def work():
        try:
            state.pipe = load_pipeline(args)
            log.warning("mmstack serve: %s is ready", state.model_name)
        except Exception as e:  # /health and every route answer 503 with the reason
            state.load_error = f"{type(e).__name__}: {e}"
            log.error("mmstack serve: the model failed to load: %s", state.load_error)

    threading.Thread(target=work, name="mmstack-load", daemon=True).start()


def main(args, ready: Optional[threading.Event] = None) -> int:
    """Run the server until interrupted; 2 for a usage error."""
    import uvicorn

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("mmstack serve: listening on %s: reachable from other machines%s", args.host,
                    "" if args.api_key else " (and no --api-key is set)")
    if args.allowed_local_media_path and not Path(args.allowed_local_media_path).is_dir():
        print(f"mmstack serve: error: --allowed-local-media-path {args.allowed_local_media_path} is not a folder",
              file=sys.stderr)
        return 2
    asgi, state = build(args)
    if state.pipe is None:
        _load_in_background(state, args)
    print(f"mmstack serve: http://{args.host}:{args.port}/v1 (model {state.model_name!r})", flush=True)
    server = uvicorn.Server(uvicorn.Config(asgi, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    server.run()
    if state.pipe is not None:
        state.pipe.engine.close()
    return 0


if __name__ == "__main__":
    from .batch_runner import module_main

    sys.exit(module_main("serve", add_arguments, main))
