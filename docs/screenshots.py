"""Re-create the README's demo screenshots: `python docs/screenshots.py [--model DIR] [--out docs/img]`.

Serves `mmstack demo` on the embedded model (loopback, a free port), drives it in headless Chromium
(Debian's `chromium` through Playwright's Python package, as the browser test does) and saves what a
person sees: a caption and a grounding query (with the boxes drawn) about a held-out synthetic scene, each
in a fresh chat, and the text-to-image tab. The inputs are drawn by `mmstack.apps.synth` with a seed the demo model
never trained on, so the screenshots show the model as it is, good or bad.
"""
from __future__ import annotations

import argparse
import random
import shutil
import socket
import tempfile
from pathlib import Path

SETTLED = """() => [...document.querySelectorAll('[data-testid=status-tracker]')].every(e => e.classList.contains('hide'))
    && [...document.images].every(i => i.complete || !i.offsetParent)"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask(page, text: str, image: Path | None, turn: int) -> None:
    box = page.locator("#chat-input")
    if image is not None:
        box.locator("input[type=file]").set_input_files(str(image))
    box.locator("textarea").fill(text)
    box.locator("textarea").press("Enter")
    page.wait_for_function(f"() => document.querySelectorAll('#chatbot [data-testid=bot]').length > {turn}",
                           timeout=60_000)
    page.wait_for_function(SETTLED, timeout=120_000)


def main() -> int:
    import mmstack
    from mmstack.api import default_model_dir
    from mmstack.apps import synth
    from mmstack.apps.demo import build_app, launch
    from playwright.sync_api import sync_playwright

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    p.add_argument("--out", default=str(Path(__file__).parent / "img"))
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--seed", type=int, default=7, help="seed of the synthetic scene (the training set used 0)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pipe = mmstack.load(args.model or default_model_dir(), device="cpu")
    rng = random.Random(args.seed)
    while True:  # a scene with two or more objects shows captions and grounding best
        img, _, _, meta = synth.scene_sample(rng, 64)
        if len(meta["objects"]) >= 2:
            break
    tmp = Path(tempfile.mkdtemp(prefix="mmstack-shots-"))
    scene = tmp / "scene.png"
    img.save(scene)  # at the training size: a larger copy would be tiled differently (2x2 local tiles)
    target = meta["objects"][0]

    port = _free_port()
    demo = build_app(pipe)
    launch(demo, port=port, prevent_thread_lock=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}/")
            # one question per chat, as the model was trained (single-turn)
            _ask(page, synth.CAPTION_QUESTION, scene, 0)
            page.screenshot(path=str(out / "demo-chat.png"), animations="disabled")
            page.get_by_role("button", name="Clear", exact=True).last.click()
            page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=bot]')", timeout=30_000)
            again = tmp / "scene-2.png"  # the browser ignores re-selecting the same file
            shutil.copy(scene, again)
            _ask(page, f"<|ref|>the {target['colour']} {target['shape']}<|/ref|>.", again, 0)
            page.screenshot(path=str(out / "demo-ground.png"), animations="disabled")

            page.get_by_role("tab", name="Text to image").click()
            page.locator("#gen-prompt textarea").fill("a red circle")
            page.locator("#gen-button").click()
            page.wait_for_function("() => document.querySelectorAll('#gallery img').length >= 1", timeout=120_000)
            page.wait_for_function(SETTLED, timeout=120_000)
            page.screenshot(path=str(out / "demo-generate.png"), animations="disabled")
            browser.close()
    finally:
        demo.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote demo-chat.png, demo-ground.png and demo-generate.png in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
