"""The page `biogpt serve` gives at / (webui/), in a real browser: headless Chromium from the
machine's Debian packages, driven by Selenium. `.ci/run` installs Chromium where it is missing, so
CI never skips these; elsewhere they skip without it. BIOGPT_SCREENSHOTS=DIR saves each view."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from biogpt_cli import GenerationOptions, generate  # noqa: E402
from biogpt_cli.loading import load_pretrained  # noqa: E402
from biogpt_cli.server import create_app  # noqa: E402
from biogpt_cli.streaming import continuation  # noqa: E402
from tests.conftest import serving  # noqa: E402
from tests.test_tasks import trained  # noqa: E402, F401  (the fixture)

KEY = "sekret"


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        message = "Chromium and its driver are needed (Debian: apt-get install chromium chromium-driver)"
        if os.environ.get("BIOGPT_CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=options)
    yield b
    b.quit()


@pytest.fixture(scope="module")
def site(trained):  # noqa: F811
    lm, tok = load_pretrained(trained)
    base, stop = serving(create_app(lm, tok, ["trained"], api_key=KEY, task="bc5cdr"))
    yield base, lm, tok, trained
    stop()


def wait(browser, condition, seconds=60):
    return WebDriverWait(browser, seconds, poll_frequency=0.1).until(lambda b: condition(b))


def opened(browser, base):
    """The page, its key given (it asks for one: the server has --api-key)."""
    browser.get(base + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(base + "/")
    wait(browser, lambda b: b.find_element(By.ID, "key").is_displayed())
    browser.find_element(By.ID, "key-input").send_keys(KEY)
    browser.find_element(By.ID, "key-save").click()
    wait(browser, lambda b: b.find_element(By.ID, "model").text == "trained")


def snapshot(browser, name):
    folder = os.environ.get("BIOGPT_SCREENSHOTS")
    if folder:
        browser.save_screenshot(str(Path(folder) / f"webui-{name}.png"))


def fill(browser, element_id, value):
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def test_the_playground_streams_generates_text_with_probabilities(browser, site):
    base, lm, tok, _ = site
    opened(browser, base)
    fill(browser, "prompt", "the cat")
    fill(browser, "max_tokens", "8")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda b: "tokens" in b.find_element(By.ID, "stats").text)
    ids = tok.encode("the cat")
    expected = continuation(tok, ids, generate(lm, [ids], GenerationOptions(max_new_tokens=8))[0][0].ids)[0]
    out = browser.find_element(By.ID, "output")
    assert out.text.strip() == expected.strip() and expected.strip()
    spans = out.find_elements(By.CSS_SELECTOR, "span[title]")
    assert spans and all(re.fullmatch(r"\d+\.\d%", s.get_attribute("title")) for s in spans)
    assert "first token after" in browser.find_element(By.ID, "stats").text
    snapshot(browser, "playground")


def test_stop_cancels_the_generation_on_the_server(browser, site, monkeypatch):
    from biogpt_cli import frame

    step, extend = frame.Frame.step, frame.Frame.extend
    monkeypatch.setattr(frame.Frame, "step", lambda self, *a: time.sleep(0.2) or step(self, *a))
    monkeypatch.setattr(frame.Frame, "extend", lambda self, tokens: time.sleep(0.2 * tokens.shape[1])
                        or extend(self, tokens))
    base = site[0]
    opened(browser, base)
    fill(browser, "prompt", "cells divide")  # its text comes a word at a time (a word ends at each token)
    fill(browser, "max_tokens", "100")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda b: b.find_element(By.ID, "output").text.strip())
    browser.find_element(By.ID, "stop-button").click()
    wait(browser, lambda b: b.find_element(By.ID, "stats").text == "stopped")

    def cancelled() -> float:
        text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        return float(re.search(r"^biogpt_requests_cancelled_total (\S+)", text, re.M)[1])
    wait(browser, lambda b: cancelled() >= 1, 30)


def test_the_task_view_highlights_the_commands_offsets(browser, site, cli, tmp_path):
    base, _, _, folder = site
    opened(browser, base)
    browser.find_element(By.ID, "task-tab").click()
    doc = {"title": "Aspirin", "abstract": "It causes ulcer."}
    fill(browser, "field-title", doc["title"])
    fill(browser, "field-abstract", doc["abstract"])
    browser.find_element(By.ID, "run").click()
    wait(browser, lambda b: b.find_element(By.ID, "task-stats").text)
    marks = {(int(m.get_attribute("data-start")), int(m.get_attribute("data-end")), m.text)
             for m in browser.find_elements(By.CSS_SELECTOR, "#highlighted mark")}
    (tmp_path / "in.jsonl").write_text(json.dumps(doc) + "\n")
    code, out, err = cli("extract", "-m", folder, "--task", "bc5cdr", "-i", tmp_path / "in.jsonl", "--format", "jsonl",
                         "--constrained")
    record = json.loads(out)
    text = f"{doc['title']} {doc['abstract']}"
    spans = {(s, e, text[s:e]) for r in record["relations"] for key in ("head_spans", "tail_spans") for s, e in r[key]}
    assert code == 0 and marks == spans and spans, (marks, spans)
    rows = browser.find_elements(By.CSS_SELECTOR, "#results tr")
    assert len(rows) == 1 + len(record["relations"])
    assert browser.find_element(By.ID, "downloads").is_displayed()
    snapshot(browser, "extract")


def test_a_wrong_key_says_so(browser, site):
    base = site[0]
    browser.get(base + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(base + "/")
    wait(browser, lambda b: b.find_element(By.ID, "key").is_displayed())
    assert "needs its API key" in browser.find_element(By.ID, "key-message").text
    browser.find_element(By.ID, "key-input").send_keys("wrong")
    browser.find_element(By.ID, "key-save").click()
    wait(browser, lambda b: "refused this key" in b.find_element(By.ID, "key-message").text)
