"""The side-by-side web page in a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                                 reason="Debian chromium not installed (CI installs it: .ci/run)"),
              pytest.mark.slow]  # a real browser against a live server


def test_page_streams_two_tenants_side_by_side(server):
    httpx = pytest.importorskip("httpx")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    prompt = "To be, or not to be"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_selector('#models input[value="shakespeare"]', timeout=30_000)
            page.check('#models input[value="shakespeare"]')
            page.check('#models input[value="gsm8k"]')
            page.fill("#prompt", prompt)
            page.fill("#max_tokens", "48")
            # count DOM updates of each answer column, to see the answers arrive piece by piece
            page.evaluate("""() => {
                window.updates = {};
                new MutationObserver((ms) => { for (const m of ms) {
                    const col = m.target.closest && m.target.closest('.answer')
                                || m.target.parentElement.closest('.answer');
                    if (col && m.target.classList && m.target.classList.contains('text'))
                        window.updates[col.dataset.model] = (window.updates[col.dataset.model] || 0) + 1;
                }}).observe(document.getElementById('answers'), {subtree: true, childList: true, characterData: true});
            }""")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.answer[data-done]').length === 2", timeout=60_000)
            texts = {m: page.text_content(f'.answer[data-model="{m}"] pre') for m in ("shakespeare", "gsm8k")}
            done = {m: page.get_attribute(f'.answer[data-model="{m}"]', "data-done") for m in texts}
            updates = page.evaluate("window.updates")
        finally:
            browser.close()
    assert not errors, errors
    assert done == {"shakespeare": "1", "gsm8k": "1"}
    assert all(t.strip() for t in texts.values()), texts
    assert texts["shakespeare"] != texts["gsm8k"]
    assert updates.get("shakespeare", 0) >= 2 and updates.get("gsm8k", 0) >= 2, updates  # streamed, not one block
    # what the page shows is exactly what the API answers
    for model, shown in texts.items():
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 48, "temperature": 0})
        assert r.json()["choices"][0]["message"]["content"] == shown
