"""Debian's Chromium driven by Playwright, for the web UI's tests and screenshots (not a test module).

Playwright's own browser download is not used (it cannot be reached here): :func:`open_browser` launches
``/usr/bin/chromium`` and skips the test, with the reason, when it or Playwright is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from peers import CHROMIUM, chromium_or_skip

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

#: The viewport of the pages' screenshots: the UI is made to work at 1280 px.
VIEWPORT = {"width": 1280, "height": 900}
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-sync"]


@contextmanager
def open_browser() -> Iterator[Browser]:
    """Launch headless Chromium (Debian's); skip with the reason when it or Playwright is absent."""
    from playwright.sync_api import sync_playwright

    chromium_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def new_page(browser: Browser, base_url: str) -> Iterator[Page]:
    """A page in a fresh browser context (its own cookies) at 1280 px, whose failed requests and console errors
    are collected in ``page.problems`` (a list of strings)."""
    context = browser.new_context(base_url=base_url, viewport=VIEWPORT)  # type: ignore[arg-type]
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
    page.problems = problems  # type: ignore[attr-defined]
    try:
        yield page
    finally:
        context.close()


def sign_in(page: Page, token: str, next_path: str = "/ui") -> None:
    """Sign in with the form, as a person does, and wait for the page it leads to."""
    page.goto(f"/ui/login?next={next_path}")
    page.fill("input[name=token]", token)
    with page.expect_navigation():
        page.click("button[type=submit]")


def shoot(page: Page, path: str, png: Path) -> None:
    """Open ``path`` and save a full-page screenshot to ``png``."""
    page.goto(path)
    page.wait_for_load_state("networkidle")
    png.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(png), full_page=True)
