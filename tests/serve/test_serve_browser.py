"""The chat page in headless Chromium: send a message, watch the answer stream in, keep the
conversation, reset it. Needs Debian's chromium and chromium-driver (`.ci/run` installs them in CI):
skipped without them on a developer's machine, a failure in CI."""
from __future__ import annotations

import os
import shutil

import pytest
from serve_fixtures import WINDOW, live, reference, serve_checkpoint  # noqa: F401

from jneox.chat import TURN_STOP, format_prompt
from jneox.generate import generate
from jneox.sampling import SamplingParams

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="module")
def browser():
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromium-driver", DRIVER)) if not path]
    if missing:
        message = f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if IN_CI:
            pytest.fail(message + ": .ci/run should have installed it")
        pytest.skip(message)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


# counts how often the answer's text changes while it streams
WATCH = """
window.updates = 0;
new MutationObserver(() => {
  const last = [...document.querySelectorAll('.msg.assistant .text')].pop();
  if (last && last.textContent) window.updates++;
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


def ask(driver, text: str) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 60).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) > before
        or d.find_elements(By.CSS_SELECTOR, ".msg.error"))
    assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error"), driver.find_element(By.CSS_SELECTOR, ".msg.error").text
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[-1].get_attribute("textContent")


def test_page_streams_an_answer_and_keeps_the_conversation(browser, live, reference):
    from selenium.webdriver.common.by import By

    browser.get(live.url + "/")
    assert "jneox" in browser.title
    browser.find_element(By.TAG_NAME, "summary").click()
    key = browser.find_element(By.ID, "api_key")
    key.send_keys("test-key-123")
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    max_tokens = browser.find_element(By.ID, "max_tokens")
    max_tokens.clear()
    max_tokens.send_keys("40")
    browser.execute_script(WATCH)

    model, tokenizer = reference
    params = SamplingParams(temperature=0, max_new_tokens=40, stop=(TURN_STOP,))
    first = generate(model, tokenizer, format_prompt([{"role": "user", "content": "こんにちは"}]), params).text
    answer = ask(browser, "こんにちは")
    assert answer == first
    assert browser.execute_script("return window.updates") >= 2  # it arrived in pieces, as they came

    # the second question is asked with the first exchange as history
    turns = [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": first},
             {"role": "user", "content": "山"}]
    second = generate(model, tokenizer, format_prompt(turns), params).text
    assert ask(browser, "山") == second
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 4

    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    third = generate(model, tokenizer, format_prompt([{"role": "user", "content": "山"}]), params).text
    assert ask(browser, "山") == third  # a fresh conversation: no history sent


def test_page_drops_the_oldest_exchange_when_the_window_is_full(browser, live, reference):
    """A conversation longer than the context window goes on: the page forgets its oldest exchanges."""
    from selenium.webdriver.common.by import By

    browser.get(live.url + "/")
    browser.find_element(By.TAG_NAME, "summary").click()
    browser.find_element(By.ID, "api_key").send_keys("test-key-123")
    for field, value in (("temperature", "0"), ("max_tokens", "40")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    model, tokenizer = reference
    params = SamplingParams(temperature=0, max_new_tokens=40, stop=(TURN_STOP,))
    history: list[dict] = []
    dropped = 0
    for i in range(4):
        question = f"{i}: " + "吾輩は猫である。名前はまだ無い。" * 8
        history.append({"role": "user", "content": question})
        while len(tokenizer.encode(format_prompt(history))) + 40 > WINDOW and len(history) > 2:
            history, dropped = history[2:], dropped + 1  # what the page does on context_length_exceeded
        want = generate(model, tokenizer, format_prompt(history), params).text
        assert ask(browser, question) == want
        history.append({"role": "assistant", "content": want})
    assert dropped >= 1  # the window really overflowed, and the conversation went on
