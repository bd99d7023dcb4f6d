"""The README's screenshots of the dashboard, from a real run (`make screenshots`).

Starts `zdproxy demo` on free ports in a temporary directory (its apps, its own users,
its canary plan), opens the dashboard in headless Chromium, and:

1. after LEAD_IN seconds of traffic, deploys green and waits until the rollout is in
   its 50% step: dashboard-rollout.png;
2. waits until green is live, makes blue (now the candidate) answer 500 with the demo
   app's own switch, deploys blue, and waits until the judge rolled it back:
   dashboard-rollback.png.

Every wait is bounded; the demo and the browser are stopped on exit.

    .venv/bin/python benchmarks/screenshots.py docs/img
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from browser import chromium, open_dashboard
from harness import die_with_parent, free_port, zdproxy_bin
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

LEAD_IN = 25.0  # seconds of traffic on blue before the deploy: the charts' left part
SETTLE = 4.0  # seconds after the rollback, so that the chart shows blue alone again
WIDTH, HEIGHT = 1400, 1450  # the header, the overview, the charts and the rollout panel


def until(what: str, check: Callable[[], Any], within: float) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise TimeoutError(f"not within {within:g}s: {what}")


@contextlib.contextmanager
def demo(directory: Path) -> Iterator[tuple[str, str, dict[str, str]]]:
    """`zdproxy demo`: (its admin URL, its token, each color's app URL)."""
    admin = f"http://127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            zdproxy_bin(),
            "demo",
            "--port",
            str(free_port()),
            "--admin-port",
            admin.rpartition(":")[2],
            "--dir",
            str(directory),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=die_with_parent,
    )
    try:
        assert process.stdout is not None
        banner = ""
        for line in process.stdout:
            banner += line
            if line.startswith("Ctrl-C stops everything"):
                break
        apps = dict(re.findall(r"^\s+(blue|green) \(.*?\)\s+(http://\S+)$", banner, re.MULTILINE))
        if set(apps) != {"blue", "green"}:
            raise RuntimeError(f"zdproxy demo did not start:\n{banner}")
        yield admin, (directory / "admin.token").read_text().strip(), apps
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


def call(url: str, token: str | None = None, body: Any = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(
        url, data=data, headers=headers, method="POST" if data is not None else "GET"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def shoot(driver: WebDriver, path: Path) -> None:
    driver.execute_script("window.scrollTo(0, 0)")
    path.write_bytes(driver.get_screenshot_as_png())
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("output", type=Path, help="the directory of the PNG files")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zdproxy-screenshots-") as tmp:
        root = Path(tmp)
        with demo(root / "demo") as (admin, token, apps):
            rollout = lambda: call(f"{admin}/v1/rollout", token)  # noqa: E731
            driver = chromium(root / "chromium", WIDTH, HEIGHT)
            try:
                open_dashboard(driver, admin, token)
                time.sleep(LEAD_IN)  # traffic to draw, not a wait for a condition
                call(f"{admin}/v1/rollouts", token, {"color": "green"})
                until("green's 50% step", lambda: rollout()["step"] == 2, 60)
                until(
                    "the page at step 2",
                    lambda: "step 2 of 3" in driver.find_element(By.ID, "rollout-state").text,
                    10,
                )
                time.sleep(2)  # two more seconds of the 50% step on the charts
                shoot(driver, args.output / "dashboard-rollout.png")

                until("green live", lambda: rollout()["state"] == "done", 90)
                call(f"{apps['blue']}/_demo/fail", body={})
                call(f"{admin}/v1/rollouts", token, {"color": "blue"})
                until("the rollback", lambda: rollout()["state"] == "rolled_back", 60)
                until(
                    "the chart's marker",
                    lambda: driver.find_elements(
                        By.CSS_SELECTOR, "[data-testid='marker-rolled_back']"
                    ),
                    10,
                )
                time.sleep(SETTLE)
                shoot(driver, args.output / "dashboard-rollback.png")
            finally:
                driver.quit()


if __name__ == "__main__":
    main()
