"""The chat page in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium) against the
local server: a non-image is refused with a message, an image is attached, a question is answered (streamed) and
a second turn follows; the page's replies equal `model.generate` for the same conversation."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image

MAX_NEW = 6
INSTALLER = Path(__file__).resolve().parents[2] / "tools" / "install_browser.sh"


def browser_paths():
    """(chromium, chromedriver), installing them with tools/install_browser.sh when missing; skip if impossible."""
    def find():
        return (shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver"))

    chromium, driver = find()
    if not (chromium and driver):
        proc = subprocess.run(["bash", str(INSTALLER)], capture_output=True, text=True, timeout=900)
        chromium, driver = find()
        if not (chromium and driver):
            pytest.skip(f"chromium/chromedriver cannot be installed here ({INSTALLER.name} exit {proc.returncode}: "
                        f"{(proc.stderr or proc.stdout).strip()[-500:]})")
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = browser_paths()
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is in the test extra: pip install -e '.[test]'")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ghostvis_chromium_")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                 f"--user-data-dir={profile}", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)  # no Selenium Manager
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_upload_ask_and_ask_again_in_the_page(server, model, photo, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    wait = WebDriverWait(browser, 120)
    browser.get(url + "/")
    assert "GhostVis" in browser.title
    max_new = browser.find_element(By.ID, "max-new-tokens")
    max_new.clear()
    max_new.send_keys(str(MAX_NEW))

    # A file that is not an image is refused with a message naming it, and nothing is attached.
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    browser.find_element(By.ID, "file").send_keys(str(notes))
    wait.until(lambda d: "notes.txt" in d.find_element(By.ID, "error").text)
    assert "not an image" in browser.find_element(By.ID, "error").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#pending img")

    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pending img"))
    assert browser.find_element(By.ID, "error").text == ""

    def ask(question, turn):
        box = browser.find_element(By.ID, "prompt")
        box.send_keys(question)
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == turn
                   or d.find_element(By.ID, "error").text)
        assert browser.find_element(By.ID, "error").text == ""
        bubble = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")[-1]
        return bubble.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent"), bubble

    image = Image.open(photo)
    first = [{"role": "user", "content": "<image>\nWhat is in the picture?"}]
    reply1, bubble1 = ask("What is in the picture?", 1)
    expected1 = model.generate({"messages": first, "images": [image]}, max_new_tokens=MAX_NEW)[0]
    assert reply1 == expected1 and reply1.strip()
    assert int(bubble1.get_attribute("data-deltas") or 0) >= 2  # it arrived in streamed pieces
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user img")  # the question shows its image
    assert not browser.find_elements(By.CSS_SELECTOR, "#pending img")  # and the attachment was used up

    second = first + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "What color is it?"}]
    reply2, _ = ask("What color is it?", 2)
    expected2 = model.generate({"messages": second, "images": [image]}, max_new_tokens=MAX_NEW, seed=1)[0]
    assert reply2 == expected2
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user .text")] == [
        "What is in the picture?", "What color is it?"]
    if os.environ.get("GHOSTVIS_SCREENSHOT"):
        browser.save_screenshot(os.environ["GHOSTVIS_SCREENSHOT"])
