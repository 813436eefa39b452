"""`mmstack serve` driven by the official `openai` client, on the embedded demo model named by a hub id that
resolves from an offline Hugging Face cache laid out by the test (loopback, an ephemeral port)."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from net import free_port

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "assets" / "demo-model"
HUB_ID = "mmstack/demo-tiny"


def hub_cache(root: Path) -> Path:
    """The embedded model as `mmstack/demo-tiny` in a Hugging Face cache layout (refs/main -> a snapshot)."""
    sha = "1" * 40
    repo = root / "models--mmstack--demo-tiny"
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in DEMO.iterdir():
        if f.is_file():
            (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return root


class Server:
    def __init__(self, tmp: Path, *extra: str):
        self.port = free_port()
        env = {**os.environ, "HF_HUB_CACHE": str(hub_cache(tmp / "hub")), "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        self.proc = subprocess.Popen([sys.executable, "-m", "mmstack.apps.serve", "--model", HUB_ID, "--port",
                                      str(self.port), *extra], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stdout.read()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.3)
        raise RuntimeError("the server did not become healthy in 120 s")

    def client(self, key: str = "unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), "--max-batch", "16", "--max-waiting", "48")
    yield s
    s.close()


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def ocr_images(tmp_path_factory):
    from mmstack.apps import synth

    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, 16, seed=5, kinds=("ocr",), image_size=64)
    return sorted((out / "images").glob("*.png"))


def ocr_messages(path: Path) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(path)}},
                                         {"type": "text", "text": "Read the text in the image."}]}]


def test_models_chat_streamed_chat_and_two_images(server, ocr_images):
    c = server.client()
    assert [m.id for m in c.models.list().data] == [HUB_ID]
    r = c.chat.completions.create(model=HUB_ID, messages=ocr_messages(ocr_images[0]), max_tokens=24)
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 16 and r.usage.completion_tokens >= 1
    stream = c.chat.completions.create(model=HUB_ID, messages=ocr_messages(ocr_images[0]), max_tokens=24, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].choices[0].finish_reason == "stop"
    gen = c.images.generate(model=HUB_ID, prompt="a red circle", n=2, response_format="b64_json", extra_body={"seed": 3})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in gen.data]
    assert len(images) == 2 and all(im.size == images[0].size and im.mode == "RGB" for im in images)


def test_a_text_only_turn_and_the_openai_sampling_names(server):
    c = server.client()
    r = c.chat.completions.create(model=HUB_ID, messages=[{"role": "user", "content": "Describe this image."}],
                                  max_completion_tokens=5, temperature=0.7, top_p=0.9, seed=1, n=2, stop=["\n"])
    assert len(r.choices) == 2 and all(ch.finish_reason in ("stop", "length") for ch in r.choices)
    assert r.usage.completion_tokens <= 10


def test_sixteen_concurrent_chats_batch_and_give_the_sequential_answers(server, ocr_images):
    c = server.client()
    ask = lambda p: c.chat.completions.create(model=HUB_ID, messages=ocr_messages(p),  # noqa: E731
                                              max_tokens=24).choices[0].message.content
    sequential = [ask(p) for p in ocr_images]
    with cf.ThreadPoolExecutor(16) as ex:
        together = list(ex.map(ask, ocr_images))
    assert together == sequential


def test_errors_have_the_openai_shape_and_status(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError, match="n"):
        c.chat.completions.create(model=HUB_ID, messages=[{"role": "user", "content": "hi"}], n=0)
    with pytest.raises(openai.BadRequestError, match=r"generates \d+x\d+ images only"):
        c.images.generate(model=HUB_ID, prompt="a red circle", size="1024x1024")
    with pytest.raises(openai.BadRequestError, match="remote images are not allowed"):
        c.chat.completions.create(model=HUB_ID, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    with pytest.raises(openai.BadRequestError, match="local files are not allowed"):
        c.chat.completions.create(model=HUB_ID, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}])
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "error" in json.loads(e.value.read())


def test_oversized_bodies_huge_prompts_and_a_hundred_requests_stay_bounded(server):
    idle = server.rss_mb()
    body = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"a" * (40 << 20) + b'"}]}'
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.time()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 413 and json.loads(e.value.read())["error"]["code"] == "request_too_large"
    assert time.time() - t0 < 30
    c = server.client()
    with pytest.raises(openai.BadRequestError, match="characters"):
        c.chat.completions.create(model=HUB_ID, messages=[{"role": "user", "content": "ab " * 2_000_000}])
    statuses = []

    def one(k):
        try:
            c.chat.completions.create(model=HUB_ID, messages=[{"role": "user", "content": f"Describe {k}."}],
                                      max_tokens=8)
            return 200
        except openai.RateLimitError:
            return 429
    with cf.ThreadPoolExecutor(100) as ex:
        statuses = list(ex.map(one, range(100)))
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 48
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    assert server.rss_mb() - idle < 1024


def test_an_api_key_is_required_when_set(tmp_path):
    s = Server(tmp_path, "--api-key", "sk-test")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert [m.id for m in s.client("sk-test").models.list().data] == [HUB_ID]
    finally:
        s.close()


def test_the_demo_mounts_on_the_same_server_and_engine(tmp_path):
    from gradio_client import Client, handle_file

    from mmstack.apps import synth

    synth.generate(tmp_path / "d", 2, seed=1, kinds=("ocr",), image_size=64, progress=False)
    image = sorted((tmp_path / "d" / "images").glob("*.png"))[0]
    s = Server(tmp_path, "--demo")
    try:
        demo = Client(s.url + "/demo/", verbose=False)
        history = demo.predict({"text": "Read the text in the image.", "files": [handle_file(str(image))]}, [],
                               0.0, 1.0, 24, 1.0, api_name="/chat")[0]
        answer = "".join(c["text"] for c in history[-1]["content"] if c["type"] == "text")
        api = s.client().chat.completions.create(model=HUB_ID, messages=ocr_messages(image), max_tokens=24)
        assert answer and answer == api.choices[0].message.content  # one model, one engine, one answer
    finally:
        s.close()
