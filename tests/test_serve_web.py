"""The web page in a real browser: headless Chromium from the system (Debian's
``chromium``) driven by Playwright; no browser is downloaded. The page is served by
the API app on loopback; the test writes a prompt, attaches an image, picks Fast,
watches progress, plays the result, sees it in the recent jobs, and saves a
screenshot (``DUET_ARTIFACTS`` or the test's temporary folder)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from serve.config import serve_config_from
from serve.local import ServerThread, build_local_app

KEY = "web-test-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="system chromium missing (make installs it)")
def test_the_page_generates_and_plays_a_clip(tiny_checkpoint, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    config = serve_config_from(
        {
            "checkpoint": tiny_checkpoint,
            "jobs_uri": str(tmp_path / "jobs"),
            "api_keys": [KEY],
            "fast": {"steps": 2, "sampler": "euler"},
            "full": {"steps": 2, "sampler": "euler"},
        }
    )
    image = tmp_path / "product.png"
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (220, 40, 40)).save(buf, format="PNG")
    image.write_bytes(buf.getvalue())
    shot = Path(os.environ.get("DUET_ARTIFACTS", tmp_path)) / "serve_web_page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    app, backend = build_local_app(config)
    with ServerThread(app) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            page.goto(server.url)
            expect(page).to_have_title("Duet: generate audio and video")
            # Without a key the API refuses, and the page says so.
            page.fill("#prompt", "a red ball bounces on a wooden floor")
            page.click("#submit")
            expect(page.locator("#error")).to_contain_text("API key")
            page.fill("#api-key", KEY)
            page.select_option("#quality", "fast")
            page.set_input_files("#images", str(image))
            page.click("#submit")
            expect(page.locator("#error")).to_have_text("")
            expect(page.locator("#job-status")).to_have_text("succeeded", timeout=180_000)
            expect(page.locator("#job-progress")).to_have_js_property("value", 1)
            player = page.locator("#player")
            expect(player).to_be_visible()
            assert int(player.get_attribute("data-bytes")) > 1000
            # The browser decodes the MP4: metadata loads and the duration is the clip's.
            duration = page.evaluate(
                """() => new Promise((resolve) => {
                    const v = document.getElementById("player");
                    if (v.readyState >= 1) resolve(v.duration);
                    v.addEventListener("loadedmetadata", () => resolve(v.duration));
                    v.addEventListener("error", () => resolve(-1));
                })"""
            )
            assert 1.5 < duration < 2.5, duration
            expect(page.locator("#jobs tr").first).to_contain_text("a red ball bounces")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    backend.close()
    assert shot.stat().st_size > 10_000
