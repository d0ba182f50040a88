"""The chat web page of ``slmforge serve`` (serve/webpage.py, serve/static/): served at ``/`` with the right content
types and no external URLs, shipped as package data, the per-request calculator switch it sends, and the page in a
real headless Chromium (Selenium) against a real ``slmforge serve``: the API key asked for on a 401, a streamed
answer equal to the API's non-streamed one at temperature 0, and the error shown for a bad key."""

import os
import re
import shutil
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
import torch

from slmforge.checkpoint import load_for_inference
from slmforge.serve import worker
from slmforge.serve.server import build_app, running_server
from slmforge.serve.webpage import FILES, STATIC
from slmforge.train.checkpoint import save_checkpoint
from tests.conftest import make_run, memorize
from tests.serve.test_serve_process import _start, _wait_up
from tests.serve.test_tools import JUNK, PREFIX, scripted

KEY = "sk-web-test"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(loaded):
    with running_server(build_app(*loaded, model_name="web", api_key=KEY)) as url:
        yield url


def test_page_and_files_are_served_without_the_key(server):
    pages = {"/": "text/html", "/static/chat.js": "text/javascript", "/static/chat.css": "text/css"}
    for path, kind in pages.items():
        r = httpx.get(server + path)
        assert r.status_code == 200 and r.headers["content-type"].split(";")[0] == kind, (path, r.headers)
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert r.text == (STATIC / ("index.html" if path == "/" else path.rsplit("/", 1)[1])).read_text()
    # The API behind the page still needs the key; a file the page does not ship is a JSON 404.
    assert httpx.get(server + "/v1/models").status_code == 401
    missing = httpx.get(server + "/static/../server.py")
    assert missing.status_code == 404 and "error" in missing.json()


def test_static_files_are_self_contained_and_shipped():
    assert sorted(p.name for p in STATIC.iterdir()) == sorted(FILES)
    for path in STATIC.iterdir():
        text = path.read_text()
        # No CDN, font or image from elsewhere: no absolute or protocol-relative URL at all.
        assert not re.findall(r"(?:https?:)?//[\w-]+(?:\.[\w-]+)+", text), path.name
        assert "@import" not in text and "<script>" not in text, path.name  # no inline script (the CSP forbids it)
    js = (STATIC / "chat.js").read_text()
    # Model output and errors go in as text: no HTML sinks anywhere in the script.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "localStorage",
                 "sessionStorage", "document.cookie"):
        assert sink not in js, sink
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert all(any(fnmatch(f"static/{name}", p) for p in patterns["slmforge.serve"]) for name in FILES)


def test_request_can_ask_for_the_calculator(server, loaded, monkeypatch):
    tok = loaded[1]
    ids = tok.encode(PREFIX) + tok.encode(JUNK)
    body = {"model": "web", "prompt": "Question: x", "max_tokens": len(ids), "temperature": 0}
    texts = []
    for extra in ({}, {"tools": "calculator"}, {"tools": [{"type": "function", "function": {"name": "f"}}]}):
        scripted(monkeypatch, ids, worker, "_sample")
        r = httpx.post(server + "/v1/completions", json={**body, **extra}, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=60)
        texts.append(r.json()["choices"][0]["text"])
    # Off (and OpenAI's function-tool lists, which are ignored): the model's own "99"; on: the result spliced in.
    assert texts[0] == texts[2] == PREFIX + JUNK
    assert texts[1].startswith("Tom has <<3*4=12>>")
    r = httpx.post(server + "/v1/completions", json={**body, "tools": "abacus"},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "unknown tool; expected calculator" in r.json()["error"]["message"]


# ---------------------------------------------------------------- the page in a real browser

MESSAGE = "Tom has <b>3</b> apples."  # markup typed by a user, or written by the model, shows as characters
REPLY = "<i>Tom</i> has 3 apples & *2* pens."
MAX_TOKENS = 36  # the reply is 29 tokens and <|end|>; the prompt 24 of the context's 64


def _trained_run(root: Path) -> Path:
    """``make_run``'s tiny run folder with a newer checkpoint whose model memorized one exchange, MESSAGE -> REPLY."""
    run_dir = make_run(root, "web")
    model, tok, _ = load_for_inference(run_dir)
    ids = torch.tensor([[tok.eos_id] + tok.encode_chat([{"role": "user", "content": MESSAGE}]) + tok.encode_text(REPLY)
                        + [tok.token_id("<|end|>")]])
    model.train()
    opt, loss = memorize(model, ids)
    assert loss.item() < 0.05
    save_checkpoint(run_dir / "checkpoints", 1, model, opt, {})
    return run_dir


def _browser(tmp_path: Path):
    """Headless Chromium through Selenium, with Debian's chromium and chromedriver (never a downloaded driver)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("the browser test needs Debian's chromium and chromium-driver packages "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs them where it can)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,760", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_chat_page_in_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser(tmp_path)
    run_dir = _trained_run(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "SLMFORGE_API_KEY"}
    proc, url = _start(run_dir, ["--api-key", KEY], env)
    try:
        _wait_up(proc, url)
        wait, find = WebDriverWait(browser, 60), browser.find_element
        browser.get(url + "/")
        # The server wants a key: the page shows the server's 401 and asks for it.
        wait.until(lambda b: find(By.ID, "key-form").is_displayed())
        assert "Error 401 (invalid_api_key): Incorrect API key provided." in find(By.ID, "error").text
        _give_key(browser, KEY)
        wait.until(lambda b: find(By.ID, "model").text == "web")
        assert not find(By.ID, "error").is_displayed()

        streamed, pieces, finish = _ask(browser, wait, MESSAGE)
        body = {"model": "web", "messages": [{"role": "user", "content": MESSAGE}], "temperature": 0, "top_p": 1,
                "max_tokens": MAX_TOKENS}
        answer = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                            timeout=60).json()["choices"][0]
        assert streamed == answer["message"]["content"] == REPLY and finish == answer["finish_reason"] == "stop"
        assert pieces > 1  # it arrived as several chunks, each appended as its own text node
        user = find(By.CSS_SELECTOR, ".msg.user .text")
        assert user.get_attribute("textContent") == MESSAGE
        assert not browser.find_elements(By.CSS_SELECTOR, "#log b, #log i")  # no markup became elements
        browser.save_screenshot(str(tmp_path / "webpage_answer.png"))
        find(By.ID, "regenerate").click()  # the answer is asked for again, in place of the last one
        again = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-finish]"))
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1
        assert again[0].find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent") == REPLY

        # A bad key: the server's error is shown, the key asked for again, and nothing new is answered.
        find(By.ID, "change-key").click()
        _give_key(browser, "sk-wrong")
        wait.until(lambda b: find(By.ID, "error").is_displayed())
        find(By.ID, "prompt").send_keys("and now?")
        find(By.ID, "send").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2)
        wait.until(lambda b: find(By.ID, "key-form").is_displayed() and find(By.ID, "send").is_enabled())
        assert find(By.ID, "error").text.startswith("Error 401 (invalid_api_key): Incorrect API key provided.")
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1
        browser.save_screenshot(str(tmp_path / "webpage.png"))
        assert (tmp_path / "webpage.png").stat().st_size > 10_000
    finally:
        browser.quit()
        proc.terminate()
        proc.wait(timeout=10)


def _give_key(browser, key: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.ID, "key-ok").click()


def _ask(browser, wait, message: str) -> tuple[str, int, str]:
    """Send ``message`` at temperature 0 -> (the streamed answer's text, how many pieces it came in, finish)."""
    from selenium.webdriver.common.by import By

    for field, value in (("temperature", "0"), ("max-tokens", str(MAX_TOKENS))):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "prompt").send_keys(message)
    browser.find_element(By.ID, "send").click()
    done = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-finish]"))[0]
    text = done.find_element(By.CSS_SELECTOR, ".text")
    pieces = browser.execute_script("return arguments[0].childNodes.length", text)
    return text.get_attribute("textContent"), pieces, done.get_attribute("data-finish")
