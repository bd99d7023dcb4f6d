"""The dashboard (/ui/ on the admin listener) in a real headless Chromium: Debian's
chromium and its chromedriver (`make browser` installs them), driven by selenium pointed
at /usr/bin/chromedriver, so nothing is downloaded (SE_OFFLINE too).

zdproxy runs as users run it, with real upstream apps on loopback. Selenium blocks, and
the upstream apps run on the test's event loop: every browser call goes through a
thread (`Page`), so the apps keep answering while the test waits on the page. Every
wait is bounded (WebDriverWait) and fails past its bound.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import ADMIN_TOKEN, Upstream, ZdProxy, admin_api, pools, run_cli, wait_healthy
from tests.test_rollout import load, rollout_config, until_rollout

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 15.0  # seconds for the page to show a change (the feed brings one each second)
MARKUP = "<script>alert(1)</script><img src=x onerror=alert(2)>"


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """One headless Chromium for the module; each test opens its own zdproxy's page."""
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never fetch a driver
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        "--window-size=1400,2000",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()


class Page:
    """The dashboard of one zdproxy in the browser; every call runs off the event loop."""

    def __init__(self, driver: WebDriver, proxy: ZdProxy) -> None:
        self.driver = driver
        self.url = f"{proxy.admin_url}/ui/"

    async def run(self, action: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(action, *args)

    async def until(self, condition: Callable[[WebDriver], Any], within: float = WAIT) -> Any:
        # The panels are redrawn every second: an element found may be replaced by
        # the time it is read, and is then looked up again.
        wait = WebDriverWait(
            self.driver,
            within,
            poll_frequency=0.1,
            ignored_exceptions=[StaleElementReferenceException],
        )
        return await self.run(wait.until, condition)

    async def open(self) -> None:
        await self.run(self.driver.get, self.url)
        await self.until(lambda d: d.find_element(By.ID, "token").is_displayed())

    async def sign_in(self, token: str = ADMIN_TOKEN) -> None:
        """Open the page and enter the token."""
        await self.open()
        await self.connect(token)

    async def connect(self, token: str = ADMIN_TOKEN) -> None:
        def enter() -> None:
            self.driver.find_element(By.ID, "token").send_keys(token)
            self.driver.find_element(By.ID, "connect").click()

        await self.run(enter)

    def text(self, testid: str) -> str:
        return str(self.driver.find_element(By.CSS_SELECTOR, f"[data-testid='{testid}']").text)

    async def until_text(self, testid: str, wanted: str, within: float = WAIT) -> str:
        """Waits until the element shows `wanted`; returns its whole text."""
        return str(
            await self.until(lambda d: wanted in self.text(testid) and self.text(testid), within)
        )

    async def logs(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = await self.run(self.driver.get_log, "browser")
        return entries

    async def click(self, selector: str) -> None:
        await self.run(lambda: self.driver.find_element(By.CSS_SELECTOR, selector).click())

    async def script(self, code: str) -> Any:
        return await self.run(self.driver.execute_script, code)


@pytest.fixture
def page(driver: WebDriver) -> Iterator[Callable[[ZdProxy], Page]]:
    driver.get_log("browser")  # what earlier tests left in the log is theirs
    yield lambda proxy: Page(driver, proxy)
    driver.get("about:blank")  # closes this page's streams before its zdproxy stops


async def two_colors(zdproxy: StartProxy, upstream: StartUpstream) -> ZdProxy:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy({"pools": pools([blue.address], [green.address])})
    await wait_healthy(proxy, "green")
    return proxy


def admin_env(proxy: ZdProxy) -> dict[str, str]:
    return {"ZDPROXY_ADMIN_URL": proxy.admin_address, "ZDPROXY_TOKEN": ADMIN_TOKEN}


async def test_the_page_loads_with_its_security_headers_and_no_console_error(
    zdproxy: StartProxy, upstream: StartUpstream, page: Callable[[ZdProxy], Page]
) -> None:
    proxy = await two_colors(zdproxy, upstream)
    async with aiohttp.ClientSession() as session:  # no token: the page holds no data
        for path in ("/ui/", "/ui/app.js", "/ui/vendor/uPlot.iife.min.js"):
            async with session.get(proxy.admin_url + path) as response:
                assert response.status == 200, path
                policy = response.headers["Content-Security-Policy"]
                assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
                assert "unsafe-inline" not in policy and "base-uri 'none'" in policy
                assert response.headers["X-Content-Type-Options"] == "nosniff"
        async with session.get(proxy.admin_url + "/", allow_redirects=False) as response:
            assert (response.status, response.headers["Location"]) == (308, "/ui/")
        async with session.get(proxy.admin_url + "/ui/nothing.js") as response:
            assert response.status == 404

    dashboard = page(proxy)
    await dashboard.sign_in()
    await dashboard.until_text("split", "live blue, candidate green at 0%")
    await dashboard.until_text("feed-state", "live")
    await dashboard.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".chart canvas"))
    assert ADMIN_TOKEN not in await dashboard.run(lambda: dashboard.driver.current_url)
    errors = [e for e in await dashboard.logs() if e["level"] == "SEVERE"]
    assert errors == []

    # The check can fail: an inline script is refused, and the refusal is in that log.
    ran = await dashboard.script(
        "const s = document.createElement('script'); s.textContent = 'window.inline = 1';"
        "document.body.append(s); return window.inline === 1;"
    )
    assert ran is False
    refusals = [e for e in await dashboard.logs() if "Content Security Policy" in e["message"]]
    assert refusals and refusals[0]["level"] == "SEVERE", refusals


async def test_a_wrong_token_is_refused_and_shows_no_data(
    zdproxy: StartProxy, upstream: StartUpstream, page: Callable[[ZdProxy], Page]
) -> None:
    proxy = await two_colors(zdproxy, upstream)
    dashboard = page(proxy)
    await dashboard.sign_in("wrong-token-0123456789")
    await dashboard.until_text("login-problem", "refused this token")
    assert not await dashboard.run(
        lambda: dashboard.driver.find_element(By.ID, "dashboard").is_displayed()
    )
    assert await dashboard.script("return document.getElementById('split').textContent") == ""
    assert await dashboard.script("return sessionStorage.length") == 0


async def test_the_token_shows_the_split_and_a_cli_shift_appears_without_a_reload(
    zdproxy: StartProxy, upstream: StartUpstream, page: Callable[[ZdProxy], Page]
) -> None:
    proxy = await two_colors(zdproxy, upstream)
    dashboard = page(proxy)
    await dashboard.sign_in()
    await dashboard.until_text("split", "live blue, candidate green at 0%")
    # Kept in this tab's session storage only, and the page is the same one throughout.
    assert await dashboard.script("return sessionStorage.getItem('zdproxy.admin-token')") == (
        ADMIN_TOKEN
    )
    await dashboard.script("window.samePage = true")

    shifted = await run_cli("shift", "25", env=admin_env(proxy))
    assert shifted.code == 0, shifted.err
    await dashboard.until_text("split", "live blue, candidate green at 25%")
    assert await dashboard.script("return window.samePage") is True
    events = await dashboard.until_text("events", "split_changed")
    assert "[cli]" in events


async def test_a_second_tab_follows_the_first_tabs_stream(
    zdproxy: StartProxy, upstream: StartUpstream, page: Callable[[ZdProxy], Page]
) -> None:
    """A browser opens 6 connections to a host at most: the tabs share one stream."""
    proxy = await two_colors(zdproxy, upstream)
    first = page(proxy)
    await first.sign_in()
    await first.until_text("feed-state", "live")
    driver = first.driver
    home = driver.current_window_handle
    await first.run(driver.switch_to.new_window, "tab")
    try:
        second = page(proxy)
        await second.sign_in()  # its own session storage: the token is asked again
        await second.until_text("feed-state", "through another tab")
        await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": 1000})
        await second.until_text("split", "candidate green at 10%")
    finally:
        await first.run(driver.close)
        await first.run(driver.switch_to.window, home)


async def test_a_drain_is_confirmed_first_and_cancel_changes_nothing(
    zdproxy: StartProxy, upstream: StartUpstream, page: Callable[[ZdProxy], Page]
) -> None:
    proxy = await two_colors(zdproxy, upstream)
    dashboard = page(proxy)
    await dashboard.sign_in()
    await dashboard.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-action='drain-green']"))

    await dashboard.click("[data-action='drain-green']")
    assert "Drain every upstream of green?" in await dashboard.until_text("confirm-text", "?")
    await dashboard.click("[data-testid='confirm-no']")
    status = await admin_api(proxy, "GET", "/v1/status")
    assert not status["pools"]["green"]["upstreams"][0]["drained"]

    await dashboard.click("[data-action='drain-green']")
    await dashboard.until(lambda d: d.find_element(By.ID, "confirm").is_displayed())
    await dashboard.click("[data-testid='confirm-yes']")
    await dashboard.until_text("notice", "/v1/drain: green/")
    status = await admin_api(proxy, "GET", "/v1/status")
    assert status["pools"]["green"]["upstreams"][0]["drained"]
    state = "[data-testid='pool-green'] tbody td:nth-child(2)"  # the upstream's state
    await dashboard.until(lambda d: d.find_element(By.CSS_SELECTOR, state).text == "drained")


async def test_a_failing_candidate_is_rolled_back_and_the_chart_marks_it(
    zdproxy: StartProxy, upstream: StartUpstream, page: Callable[[ZdProxy], Page], tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green", failing={"status": 500})
    config = rollout_config(blue, green, tmp_path, steps=[{"weight": 50, "hold": "30s"}])
    config["retry"] = {"statuses": [500, 502, 503, 504]}  # users get blue's answers
    proxy = zdproxy(config)
    await wait_healthy(proxy, "green")
    dashboard = page(proxy)
    await dashboard.sign_in()
    await dashboard.until_text("rollout-state", "No rollout yet")
    async with load(proxy.url):
        await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
        rolled = await until_rollout(proxy, lambda r: r["state"] not in ("preflight", "step"))
    assert rolled["state"] == "rolled_back", rolled
    state = await dashboard.until_text("rollout-state", "rolled back")
    assert f"Rollout {rolled['id']}: green (from blue)" in state
    # The line on the charts, with its label (an element over each chart's canvas).
    marker = "[data-testid='marker-rolled_back']"
    label = await dashboard.until(lambda d: d.find_element(By.CSS_SELECTOR, marker).text)
    assert label == "rolled back"
    assert "error rate above" in await dashboard.until_text("judge-verdict", "Judge: fail")
    assert "judge failed green" in await dashboard.until_text("rollout-history", "rolled back")


async def test_markup_in_an_event_reason_shows_as_text(
    zdproxy: StartProxy, upstream: StartUpstream, page: Callable[[ZdProxy], Page]
) -> None:
    proxy = await two_colors(zdproxy, upstream)
    dashboard = page(proxy)
    await dashboard.sign_in()
    await dashboard.until_text("feed-state", "live")
    green = (await admin_api(proxy, "GET", "/v1/pools/green"))["upstreams"]
    await admin_api(proxy, "PUT", "/v1/pools/green", {"upstreams": green, "version": MARKUP})

    events = await dashboard.until_text("events", "pool_changed")
    assert f"version {MARKUP}" in events  # the characters, as they came
    assert f"version {MARKUP}," in await dashboard.until_text("pool-green", MARKUP)
    injected = await dashboard.run(
        lambda: dashboard.driver.find_elements(By.CSS_SELECTOR, "main script, main img")
    )
    assert injected == []
    with pytest.raises(NoAlertPresentException):
        await dashboard.run(lambda: dashboard.driver.switch_to.alert.text)
