"""What an operator sees in Flower, in a real headless Chromium: the GPU worker online,
its ``gpu`` queue, and its GPU state (model, reserved memory, health) as it changes.

Chromium comes from Debian's packages (``scripts/setup test`` installs it); Playwright
drives it without a browser download of its own. Screenshots of what a person sees are
left in the test's tmp_path.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from taskmesh.hardware.simulated import SimulationControl
from taskmesh.run.stack import free_port, port_in_use

from .conftest import marked, wait_for_workers


def find_chromium() -> str | None:
    """Debian's chromium, else the build ``playwright install chromium`` left in its cache (Ubuntu)."""
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    cache = Path(os.environ.get("PLAYWRIGHT_BROWSERS_PATH") or Path.home() / ".cache" / "ms-playwright")
    builds = sorted(cache.glob("chromium-*/chrome-linux*/chrome"))
    return str(builds[-1]) if builds else None


CHROMIUM = find_chromium()
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
APP = "tests.apps.gpu_app"
NODE = f"gpu0@{socket.gethostname()}"
LOGIN = ("ops", "s3cret")

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: scripts/setup test installs Debian's chromium, or Playwright's where there is none",
)


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Callable[..., BrowserContext]]:
    """Opens Chromium, each time with a fresh profile so no earlier cookie or login counts."""
    with sync_playwright() as playwright:
        opened: list[BrowserContext] = []

        def open_browser(**options) -> BrowserContext:
            profile = tmp_path / f"chromium-{len(opened)}"
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900},
                reduced_motion="reduce", **options,  # no fading tabs: what is asserted is what is on screen
            )
            opened.append(context)
            return context

        yield open_browser
        for context in opened:
            context.close()


def start_flower(processes, app: str = APP) -> str:
    """A real Flower with basic auth on a free loopback port; returns its base URL once it answers."""
    port = free_port()
    processes.start([sys.executable, "-m", "celery", "-A", app, "flower", "--address=127.0.0.1",
                     f"--port={port}", f"--basic-auth={':'.join(LOGIN)}", "--logging=warning"])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{url}/api/workers", auth=LOGIN, timeout=2).status_code == 200:
                return url
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"Flower did not answer on {url} within 60s")
        time.sleep(0.2)


def show_tab(page: Page, name: str) -> None:
    """Click a worker-page tab and wait until its pane is the one on screen."""
    page.click(f"#worker-tab-{name}")
    page.locator(f"#tab-{name}.active.show").wait_for(state="visible")


def gpu_line(page: Page, url: str, wanted: tuple[str, ...], timeout: float = 60) -> str:
    """The visible ``taskmesh_gpus`` line of the worker page once it says all of *wanted*.

    Flower renders a cached worker at once and asks the worker again in the background,
    so a fresh state shows on a later load: reload until it does.
    """
    deadline = time.monotonic() + timeout
    while True:
        page.goto(url)
        show_tab(page, "other")
        value = page.locator("#tab-other tr", has_text="taskmesh_gpus").locator("td").nth(1)
        line = value.inner_text() if value.is_visible() else ""
        if all(text in line for text in wanted) or time.monotonic() > deadline:
            return line
        time.sleep(1)


@pytest.mark.slow
@needs_chromium
def test_flower_shows_the_gpu_worker_its_queue_and_its_live_gpu_state(gpu_app, broker, processes, chromium, tmp_path):
    processes.taskmesh("-A", APP, "worker", "--profile", "gpu", "--loglevel", "WARNING",
                       env={"TASKMESH_SIMULATE_GPUS": "1x24GiB"})
    wait_for_workers(gpu_app.app, [NODE])
    flower = start_flower(processes)
    running = gpu_app.ten_gib.apply_async((100,), ignore_result=True)  # holds 10GiB while the pages are read
    SimulationControl(broker).use(0, 2 * 1024)  # another process uses 2GiB of the GPU
    try:
        with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
            chromium().new_page().goto(f"{flower}/workers")  # no login, no page

        page = chromium(http_credentials={"username": LOGIN[0], "password": LOGIN[1]}).new_page()
        page.goto(f"{flower}/workers")
        row = page.locator("#workers-table tbody tr", has_text=NODE)
        expect(row.locator(".badge")).to_have_text("Online", timeout=30_000)
        page.screenshot(path=tmp_path / "flower-workers.png", full_page=True)

        row.get_by_role("link", name=NODE).click()
        expect(page.locator("h1#workername")).to_have_text(NODE)
        worker_url = page.url
        show_tab(page, "queues")
        expect(page.locator("#worker-queues tr td").first).to_have_text("gpu")

        line = gpu_line(page, worker_url, ("10GiB of 24GiB reserved", "1 running"))
        assert line == "GPU 0 Simulated GPU: 10GiB of 24GiB reserved, 22GiB free, healthy, 1 running", line
        page.screenshot(path=tmp_path / "flower-worker-gpu.png", full_page=True)

        SimulationControl(broker).fail(0)
        line = gpu_line(page, worker_url, ("UNHEALTHY",))
        assert line.startswith("GPU 0 Simulated GPU: ") and "UNHEALTHY" in line, line
        page.screenshot(path=tmp_path / "flower-worker-gpu-unhealthy.png", full_page=True)
    finally:
        gpu_app.app.control.revoke(running.id, terminate=True)


@pytest.mark.parametrize("auth", ["nopassword", "ops:", ":s3cret", "", "ops:s3cret,eve:x"])
def test_up_refuses_malformed_flower_credentials_before_starting_anything(auth, processes, tmp_path):
    marker, redis_port, logs = uuid.uuid4().hex, free_port(), tmp_path / "logs"
    # through the processes fixture: should ``up`` start after all, SIGTERM at the end stops its stack
    proc = processes.taskmesh(
        "-A", "tests.apps.e2e_app", "up", "--redis-port", str(redis_port), "--flower-port", str(free_port()),
        "--flower-auth", auth, "--logdir", str(logs),
        env={"TASKMESH_TEST_MARKER": marker}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "--flower-auth must be user:password" in err and "Traceback" not in err, err
    assert not logs.exists(), "a process was started (each writes DIR/<name>.log)"
    assert marked(marker) == [] and not port_in_use(redis_port)
