"""`meg ui`: the preview-refine page over real HTTP, and in a real headless browser."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from meg.services.background import RunningServer
from meg.services.client import ClientConfig, DeviceClient
from meg.session import PreviewSession
from meg.ui import UiServer, make_ui_server


@pytest.fixture()
def page(edge: RunningServer, pipeline: Any) -> Iterator[tuple[UiServer, PreviewSession]]:
    with DeviceClient(edge.address, ClientConfig(runtime="eager", fallback=False), pipeline=pipeline) as client:
        session = PreviewSession(client, pipeline)
        server = make_ui_server(session)
        yield server, session
        server.close()


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_api_previews_refines_and_refuses_bad_input(page: tuple[UiServer, PreviewSession]) -> None:
    server, session = page
    with urllib.request.urlopen(server.url, timeout=10) as response:
        assert b"Refine on the edge" in response.read()
    assert _post(server.url + "api/final", {}) == (400, {"error": "final before any preview: type a prompt first",
                                                         "field": "session.rounds"})
    status, data = _post(server.url + "api/preview", {"prompt": ""})
    assert status == 400 and data["field"] == "prompt"
    status, data = _post(server.url + "api/preview", {"prompt": "a red circle"})
    assert status == 200 and data["round"] == 1 and len(data["png"]) > 100
    status, data = _post(server.url + "api/final", {"strength": 0.5})
    assert status == 200 and data["refined"] and data["report"]["recipe"] == "preview-refine"
    assert len(session.rounds) == 1


# CI installs Debian's chromium and chromium-driver and sets MEG_REQUIRE_BROWSER, so there a
# missing browser fails the test; elsewhere it is skipped, and says so.
_NO_BROWSER = shutil.which("chromium") is None or shutil.which("chromedriver") is None


@pytest.mark.skipif(_NO_BROWSER and not os.environ.get("MEG_REQUIRE_BROWSER"),
                    reason="needs Debian's chromium and chromium-driver (CI installs them)")
def test_the_page_in_headless_chromium(page: tuple[UiServer, PreviewSession]) -> None:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, session = page
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                              options=options)
    try:
        driver.get(server.url)
        wait = WebDriverWait(driver, 30)
        driver.find_element(By.ID, "refine").click()  # before any preview: an error on the page
        wait.until(lambda d: "final before any preview" in d.find_element(By.ID, "error").text)
        for n, prompt in enumerate(("a red circle", "a blue circle"), 1):
            box = driver.find_element(By.ID, "prompt")
            box.clear()
            box.send_keys(prompt)
            driver.find_element(By.ID, "preview").click()
            wait.until(lambda d, n=n: len(d.find_elements(By.CSS_SELECTOR, "img.round")) == n)
        assert driver.find_element(By.ID, "live").get_attribute("src").startswith("data:image/png;base64,")
        assert driver.find_element(By.ID, "error").text == ""
        driver.find_element(By.ID, "refine").click()
        wait.until(lambda d: d.find_element(By.ID, "state").text == "refined by the edge")
        report = json.loads(driver.find_element(By.ID, "report").text)
        assert report["recipe"] == "preview-refine" and report["extra"]["preview_refine"]["refined"]
        assert [r.prompt for r in session.rounds] == ["a red circle", "a blue circle"]
    finally:
        driver.quit()
