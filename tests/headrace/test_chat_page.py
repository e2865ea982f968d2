"""The chat page at `/` of a real `headrace serve --api-key`: served self-contained, its calls work with the
key and fail without it, closing its stream aborts the request in the engine, and in a headless Chromium
(from the OS packages, driven by Selenium) a message streams back and Stop ends it server-side."""

from __future__ import annotations

import json
import re
import shutil
import time

import httpx
import pytest

from tests.headrace.server_process import running_server

pytestmark = pytest.mark.slow
KEY = "page-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = "Write a very long story about a lighthouse keeper and the sea, with many chapters."


@pytest.fixture(scope="module")
def server():
    with running_server("--max-model-len", "1024", "--api-key", KEY) as srv:
        yield srv


def running(server) -> float:
    """The engine's running-request gauge, from /metrics."""
    m = re.search(r"^headrace:num_requests_running\{[^}]*\} (\S+)$", server.get("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def test_page_is_served_self_contained_and_without_the_key(server):
    r = server.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert KEY not in page
    # Nothing loads from elsewhere: no absolute or protocol-relative URL, no src/href at all but anchors.
    assert not re.search(r"(https?:)?//[\w.-]+\.\w", page)
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page, re.I)
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert re.findall(r'fetch\("([^"]+)"', page) == ["/v1/chat/completions"]


def test_the_pages_request_streams_with_the_key_and_is_refused_without(server):
    body = {"messages": [{"role": "system", "content": "Answer in one word."},
                         {"role": "user", "content": "What is the capital of France?"}],
            "stream": True, "temperature": 0, "max_tokens": 8}
    assert server.post("/v1/chat/completions", json=body).status_code == 401
    r = server.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                   for line in r.text.splitlines() if line.startswith("data: {"))
    assert "Paris" in text


def test_closing_the_stream_aborts_the_request(server):
    body = {"messages": [{"role": "user", "content": LONG}], "stream": True, "max_tokens": 900,
            "ignore_eos": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        wait_for(lambda: running(server) == 1, 10, "the request runs")
    started = time.monotonic()
    wait_for(lambda: running(server) == 0, 5, "the request is aborted after the stream closed")
    assert time.monotonic() - started < 5


def _browser():
    """A headless Chromium from the OS (chromium + chromedriver), or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver")
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no Chromium browser and chromedriver on PATH (Debian/Ubuntu: apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def test_chat_in_a_headless_browser_streams_and_stops(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(server.base_url + "/")
        find = lambda id_: browser.find_element(By.ID, id_)  # noqa: E731
        wait = WebDriverWait(browser, 60, poll_frequency=0.05)
        # Without the key the server refuses, and the page says why.
        find("prompt").send_keys("Hello")
        find("send").click()
        wait.until(lambda _: find("status").text == "error")
        assert "API key" in browser.find_element(By.CSS_SELECTOR, ".msg.error").text
        # With it: set the knobs, send, watch text stream in, then stop.
        find("api-key").send_keys(KEY)
        find("system").send_keys("You are a storyteller.")
        for field, value in (("temperature", "0"), ("max-tokens", "900")):
            find(field).clear()
            find(field).send_keys(value)
        find("prompt").send_keys(LONG)
        find("send").click()
        reply = lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text  # noqa: E731
        wait.until(lambda _: len(reply()) > 0)
        first = reply()
        wait.until(lambda _: len(reply()) > len(first))  # streamed: more text arrives after the first
        wait_for(lambda: running(server) == 1, 10, "the request runs")
        find("stop").click()
        wait.until(lambda _: find("status").text == "stopped")
        wait_for(lambda: running(server) == 0, 5, "Stop aborts the request in the engine")
        assert find("send").is_enabled() and not find("stop").is_enabled()
    finally:
        browser.quit()
