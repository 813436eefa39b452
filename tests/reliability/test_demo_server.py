"""The web demo under hostile and heavy use, served for real on a loopback port with the tiny Janus-Pro model:
it binds loopback by default, serves no file outside its own upload and cache folders (path traversal in
every spelling, planted symlinks, API payloads naming server paths), caps uploads, answers "queue full"
when its bounded queue is full instead of falling over, and under a load of 16 concurrent clients fails
no request and stays responsive (the figures are printed and quoted in docs/limits.md)."""
from __future__ import annotations

import concurrent.futures
import inspect
import json
import os
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from net import free_port
import mmstack
from golden import golden_dir, tokenizer_for
from mmstack.apps.demo import build_app, launch

JANUS = golden_dir() / "janus_pro_tiny"
IMAGE = JANUS / "und_image.png"
CHAT = (0.0, 0.9, 8, 1.1)  # temperature (greedy), top_p, max_new_tokens, repetition penalty
UPLOAD_MB = 1
CLIENTS, REQUESTS = 16, 10
# gradio's queue calls pandas APIs that pandas 3 deprecates, once per event: noise for a load test
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.*")


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model gets one core; the server's event loop and the clients the other
    yield mmstack.load(JANUS, device="cpu", tokenizer=tokenizer_for(JANUS))
    torch.set_num_threads(threads)


def _serve(pipe, max_queue: int):
    demo = build_app(pipe, max_queue=max_queue)
    _, url, _ = launch(demo, port=free_port(), max_upload_mb=UPLOAD_MB, prevent_thread_lock=True)
    return demo, url


@pytest.fixture(scope="module")
def server(pipe):
    demo, url = _serve(pipe, max_queue=20)  # the `mmstack demo` default
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    """A file outside every folder the demo may serve (an image, so a leak would also decode)."""
    path = tmp_path_factory.mktemp("private") / "secret.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    return path


def _call(url: str, api: str, data: list) -> tuple[str, str]:
    """One request through gradio's HTTP API (no client-side upload): (event, payload) of its last message."""
    r = httpx.post(f"{url}gradio_api/call/{api}", json={"data": data}, timeout=30)
    r.raise_for_status()
    events = httpx.get(f"{url}gradio_api/call/{api}/{r.json()['event_id']}", timeout=120).text
    blocks = [b for b in events.strip().split("\n\n") if b.startswith("event:")]
    event, _, payload = blocks[-1].partition("\ndata: ")
    return event.removeprefix("event: "), payload


# ------------------------------------------------------------------------------------------ exposure


def test_binds_loopback_by_default(server):
    from mmstack.cli import build_parser

    assert inspect.signature(launch).parameters["host"].default == "127.0.0.1"
    assert build_parser(only="demo").parse_args(["demo"]).host == "127.0.0.1"
    demo, url = server
    assert demo.server_name == "127.0.0.1" and url.startswith("http://127.0.0.1:")


def test_no_file_outside_the_upload_and_cache_folders_is_served(server, secret, tmp_path):
    demo, url = server
    from gradio.utils import get_upload_folder

    upload = Path(get_upload_folder())
    ok = {"files": ("ok.png", IMAGE.read_bytes(), "image/png")}
    uploaded = httpx.post(url + "gradio_api/upload", files=ok).json()[0]
    assert httpx.get(f"{url}gradio_api/file={uploaded}").status_code == 200  # the request form itself works
    planted = upload / f"mmstack-test-link-{os.getpid()}.png"  # a symlink planted in the upload folder
    planted.symlink_to(secret)
    outside = [str(secret), "/etc/passwd", str(JANUS / "config.json"), str(Path.cwd() / "README.md"), str(planted)]
    traversal = ["../../../../../../etc/passwd", "..%2f..%2f..%2f..%2f..%2fetc%2fpasswd", "%2fetc%2fpasswd",
                 "%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "..%252f..%252f..%252fetc%252fpasswd",
                 "..\\..\\..\\..\\etc\\passwd", f"{upload}/../../../etc/passwd", f"{upload}/..%2f..%2f..%2fetc/passwd",
                 f"{Path(uploaded).parent}/../../../../etc/passwd", "README.md", "./pyproject.toml",
                 f"http://127.0.0.1:{url.rsplit(':', 1)[1].strip('/')}/", "file:///etc/passwd"]
    try:
        for path in outside + traversal:
            for prefix in ("gradio_api/file=", "file=", "gradio_api/file/", "static/", "assets/"):
                r = httpx.get(url + prefix + path, timeout=30)
                assert r.status_code in (403, 404), (prefix + path, r.status_code)
                assert b"root:" not in r.content and secret.read_bytes() not in r.content
    finally:
        planted.unlink()


def test_api_payloads_naming_server_paths_are_refused(server, secret):
    """Files reach the handlers only through uploads: a FileData, a chat file or a history entry naming a path
    on the server (or a URL on loopback) is refused before any handler opens it."""
    demo, url = server
    fd = {"path": str(secret), "meta": {"_type": "gradio.FileData"}}
    loopback = {"path": url + "gradio_api/info", "meta": {"_type": "gradio.FileData"}}
    history = [{"role": "user", "content": [{"type": "file", "file": fd}, {"type": "text", "text": "Describe it."}]}]
    for api, data in [("ocr", [fd, 1, 8]), ("chart", [fd, 1, 8]), ("ocr", [loopback, 1, 8]),
                      ("chat", [{"text": "What is it?", "files": [fd]}, [], *CHAT]),
                      ("chat", [{"text": "What is it?", "files": [str(secret)]}, [], *CHAT]),
                      ("regenerate", [history, *CHAT])]:
        event, payload = _call(url, api, data)
        assert event == "error", (api, payload[:300])
        assert "uploaded" in payload or "validation" in payload or payload in ("null", ""), (api, payload[:300])


def test_uploads_over_the_size_limit_are_refused(server):
    demo, url = server
    too_big = ("big.png", os.urandom((UPLOAD_MB + 1) << 20), "image/png")
    assert httpx.post(url + "gradio_api/upload", files={"files": too_big}).status_code == 413
    assert httpx.post(url + "gradio_api/upload", files={"files": ("ok.png", IMAGE.read_bytes(), "image/png")}
                      ).status_code == 200


# ------------------------------------------------------------------------------------------ load


def test_a_full_queue_answers_busy_and_the_server_recovers(pipe):
    from gradio_client import Client
    from gradio_client.utils import QueueError

    demo, url = _serve(pipe, max_queue=2)
    try:
        client = Client(url, verbose=False)
        jobs = [client.submit("a red apple", 1, k, 5.0, 1.0, 30, "vq", api_name="/generate") for k in range(10)]
        busy, done = 0, 0
        for job in jobs:
            try:
                assert len(job.result(timeout=300)) == 1
                done += 1
            except QueueError:
                busy += 1
        assert busy >= 1 and done >= 1 and busy + done == len(jobs), (busy, done)
        assert len(client.predict("a red apple", 1, 0, 5.0, 1.0, 30, "vq", api_name="/generate")) == 1
    finally:
        demo.close()


def test_load_of_16_clients_fails_no_request_and_stays_responsive(server):
    """16 clients x 10 requests (about one in three text to image, the rest chat about an uploaded image)
    against one model slot and a queue of 20: every request completes (none is even turned away as busy),
    and a health probe meanwhile answers within 5 s each time. Prints requests/s and latencies."""
    from gradio_client import Client, handle_file
    from gradio_client.utils import QueueError

    demo, url = server
    latencies: dict[str, list[float]] = {"chat": [], "t2i": []}
    busy, errors, probes, stop = [], [], [], threading.Event()

    def client_run(c: int):
        client = Client(url, verbose=False)
        for k in range(REQUESTS):
            kind = "t2i" if (c + k) % 3 == 0 else "chat"
            t0 = time.perf_counter()
            try:
                if kind == "t2i":
                    out = client.predict(f"a red apple {c}", 1, c * 100 + k, 5.0, 1.0, 30, "vq", api_name="/generate")
                    assert len(out) == 1
                else:
                    message = {"text": f"What is in image {k}?", "files": [handle_file(str(IMAGE))]}
                    history, _, _ = client.predict(message, [], *CHAT, api_name="/chat")
                    assert history[-1]["role"] == "assistant"
                latencies[kind].append(time.perf_counter() - t0)
            except QueueError:
                busy.append(kind)
            except Exception as e:  # noqa: BLE001  every other failure is a failed request
                errors.append(f"{kind}: {type(e).__name__}: {e}")

    def probe():
        while not stop.is_set():
            t0 = time.perf_counter()
            ok = httpx.get(url + "gradio_api/info", timeout=30).status_code == 200
            probes.append((ok, time.perf_counter() - t0))
            stop.wait(0.5)

    watcher = threading.Thread(target=probe, daemon=True)
    watcher.start()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client_run, range(CLIENTS)))
    wall = time.perf_counter() - start
    stop.set()
    watcher.join()

    every = sorted(latencies["chat"] + latencies["t2i"])
    q = statistics.quantiles(every, n=20)
    figures = {"requests": len(every), "busy": len(busy), "failed": len(errors), "wall_s": round(wall, 1),
               "requests_per_s": round(len(every) / wall, 2), "p50_s": round(statistics.median(every), 2),
               "p95_s": round(q[18], 2), "chat_p50_s": round(statistics.median(latencies["chat"]), 2),
               "t2i_p50_s": round(statistics.median(latencies["t2i"]), 2),
               "probe_max_s": round(max(t for _, t in probes), 2), "probes": len(probes)}
    print("\nload test:", json.dumps(figures))
    assert not errors, errors[:5]
    assert not busy and len(every) == CLIENTS * REQUESTS
    assert probes and all(ok for ok, _ in probes) and figures["probe_max_s"] < 5.0, figures
