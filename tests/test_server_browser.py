"""The chat page in headless Chromium (Debian's `chromium`, driven by Playwright): type, see tokens stream in,
stop a reply, go on to a second turn; a screenshot is saved (set GYRFALCON_SCREENSHOT to choose where)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("uvicorn")

CHROMIUM = os.environ.get("GYRFALCON_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def live(falcon_dir):
    import torch

    import gyrfalcon
    from gyrfalcon.server import ServerConfig, create_app

    from .test_server import LiveServer

    # Chromium's processes share the CPUs with the model: with one intra-op thread the engine never waits at an
    # OpenMP barrier for a thread the browser has pushed off its core (on 2 cores that can cost 100x).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    s = LiveServer(create_app(gyrfalcon.load(falcon_dir), ServerConfig(model_name="random-falcon")))
    yield s
    s.stop()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def page(live):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1000, "height": 700})
        pg.set_default_timeout(120_000)
        yield pg
        browser.close()


def set_max_tokens(page, n: int) -> None:
    page.click("details.settings summary")  # open the settings panel, as a person would
    page.fill("#max_tokens", str(n))
    page.click("details.settings summary")


def test_chat_page_streams_stops_and_keeps_the_conversation(live, page, tmp_path):
    page.goto(live.url + "/")
    sync_api.expect(page.locator("#model")).to_have_text("random-falcon")
    set_max_tokens(page, 16)

    # A first turn: tokens arrive while the reply is streaming, then the stream ends with its finish reason.
    page.fill("#input", "Hello, who are you?")
    page.keyboard.press("Enter")
    first = page.locator(".msg.assistant").nth(0)
    sync_api.expect(page.locator(".msg.user").nth(0)).to_have_text("Hello, who are you?")
    page.wait_for_function("document.querySelector('.msg.assistant .meta') !== null")
    assert "length" in first.locator(".meta").inner_text() or "stop" in first.locator(".meta").inner_text()
    reply = first.inner_text()
    assert len(reply.split("\n")[0].strip()) > 0

    # A second turn, stopped mid-stream with the Stop button: the server cancels it (metrics) and the page
    # keeps the partial reply.
    before = live.metric("gyrfalcon_requests_total", route="chat_completions", outcome="cancelled")
    set_max_tokens(page, 2000)
    page.fill("#input", "Tell me a long story.")
    page.click("#send")
    second = page.locator(".msg.assistant").nth(1)
    page.wait_for_function("(document.querySelectorAll('.msg.assistant')[1] || {}).textContent?.length > 8")
    page.click("#stop")
    sync_api.expect(second.locator(".meta")).to_contain_text("stopped")
    live.wait_for(lambda: live.metric("gyrfalcon_requests_total", route="chat_completions", outcome="cancelled")
                  == before + 1, "the stopped reply to be cancelled on the server")
    live.wait_for(lambda: live.metric("gyrfalcon_kv_blocks_used") == 0, "its blocks to be freed")
    assert page.locator(".msg.user").count() == 2 and page.is_visible("#send")

    out = Path(os.environ.get("GYRFALCON_SCREENSHOT") or tmp_path / "chat.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 10_000
