"""Debian's headless Chromium, driven by selenium through the system's chromedriver
(`make browser` installs both): nothing is downloaded, selenium-manager never runs."""

from __future__ import annotations

import os
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def chromium(profile: Path, width: int = 1400, height: int = 1000) -> WebDriver:
    """A headless Chromium with its own profile directory (`--no-sandbox`: as root)."""
    os.environ["SE_OFFLINE"] = "true"
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def open_dashboard(driver: WebDriver, admin_url: str, token: str, within: float = 15) -> None:
    """Opens /ui/, enters the token, and waits until the page follows the live feed."""
    driver.get(f"{admin_url}/ui/")
    wait = WebDriverWait(driver, within, poll_frequency=0.1)
    wait.until(lambda d: d.find_element(By.ID, "token").is_displayed())
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "connect").click()
    wait.until(lambda d: "live" in d.find_element(By.ID, "feed-state").text)
