"""Browser fixtures: Debian's headless Chromium driven by Playwright's Python package.

The collector runs on the session's PostgreSQL database and is filled by real training runs
(``client_hooks.demo.train``). Screenshots go to ``$GRADSENTRY_ARTIFACTS`` (default: a
directory of the test session's tmp dir) and the path is printed at the end of the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from server.migrate import upgrade
from server.settings import Settings
from tests.conftest import TEST_LIMITS, Collector, serve_in_thread

CHROMIUM = "/usr/bin/chromium"
_ARTIFACTS: list[Path] = []


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("GRADSENTRY_ARTIFACTS")
    path = Path(env) / "screenshots" if env else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    _ARTIFACTS.append(path)
    return path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for path in _ARTIFACTS:
        terminalreporter.write_line(f"dashboard screenshots: {path}")


@pytest.fixture(scope="session")
def pg_collector(database_urls: dict[str, str]) -> Iterator[Collector]:
    """A live collector on PostgreSQL (the browser tests need one backend, not both)."""
    settings = Settings(database_url=database_urls["postgres"], **TEST_LIMITS)
    upgrade(settings.database_url)
    url, server, thread = serve_in_thread(settings)
    yield Collector(url=url, settings=settings, backend="postgres")
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        yield b
        b.close()


class WatchedPage:
    """A page that records console errors and uncaught exceptions."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.errors.append(f"console: {msg.text} at {msg.location}")


@pytest.fixture
def page(browser: Browser) -> Iterator[WatchedPage]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    watched = WatchedPage(context.new_page())
    yield watched
    context.close()
