"""Re-create the README's demo screenshots: `python docs/screenshots.py [--model DIR] [--out docs/img]`.

Serves `mmstack demo` on the embedded model (loopback, a free port), drives it in headless Chromium
(Debian's `chromium` through Playwright's Python package, as the browser tests do) and saves what a
person sees: the banner, then the model's own examples (`demo.json` "examples", drawn by
`docs/demo_examples.py` from held-out seeds) clicked and answered: a caption and a plain "Where is ...?"
(boxes drawn) in Chat, a chart read into a table in Documents, and the Text to image tab. Each PNG is saved
with an adaptive palette to stay small.
"""
from __future__ import annotations

import argparse
import shutil
import socket
from pathlib import Path

SETTLED = """() => [...document.querySelectorAll('[data-testid=status-tracker]')].every(e => e.classList.contains('hide'))
    && [...document.images].every(i => i.complete || !i.offsetParent)"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shot(page, path: Path) -> None:
    from PIL import Image

    page.wait_for_function(SETTLED, timeout=120_000)
    page.screenshot(path=str(path), animations="disabled")
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def _ask_example(page, k: int, turn: int) -> None:
    """Click chat example `k` (it fills the box), press Enter, wait for answer `turn`."""
    page.locator(".gallery-item:visible").nth(k).click()
    page.wait_for_function("() => document.querySelector('#chat-input textarea').value.length > 0", timeout=10_000)
    page.locator("#chat-input textarea").press("Enter")
    page.wait_for_function(f"() => document.querySelectorAll('#chatbot [data-testid=bot]').length > {turn}",
                           timeout=60_000)
    page.wait_for_function(SETTLED, timeout=120_000)


def main() -> int:
    import mmstack
    from mmstack.api import default_model_dir
    from mmstack.apps.demo import build_app, launch
    from playwright.sync_api import sync_playwright

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    p.add_argument("--out", default=str(Path(__file__).parent / "img"))
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pipe = mmstack.load(args.model or default_model_dir(), device="cpu")
    port = _free_port()
    demo = build_app(pipe)
    launch(demo, port=port, prevent_thread_lock=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1100, "height": 860})
            page.goto(f"http://127.0.0.1:{port}/")
            _ask_example(page, 0, 0)  # one question per chat, as the model was trained (single-turn)
            page.evaluate("window.scrollTo(0, 0)")  # the banner in view
            _shot(page, out / "demo-chat.png")
            page.get_by_role("button", name="Clear", exact=True).last.click()
            page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=bot]')", timeout=30_000)
            _ask_example(page, 1, 0)
            page.locator("#chat-boxes").scroll_into_view_if_needed()
            _shot(page, out / "demo-ground.png")

            page.get_by_role("tab", name="Documents").click()
            page.locator(".gallery-item:visible").first.click()
            page.get_by_role("button", name="Chart to table").click()
            page.wait_for_function("() => document.querySelector('#doc-answer textarea').value.length > 0",
                                   timeout=120_000)
            page.evaluate("window.scrollTo(0, 0)")
            _shot(page, out / "demo-documents.png")

            page.get_by_role("tab", name="Text to image").click()
            page.locator("#gen-prompt textarea").fill("a red circle")
            page.locator("#gen-button").click()
            page.wait_for_function("() => document.querySelectorAll('#gallery img').length >= 1", timeout=120_000)
            _shot(page, out / "demo-generate.png")
            browser.close()
    finally:
        demo.close()
    print(f"wrote demo-chat.png, demo-ground.png, demo-documents.png and demo-generate.png in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
