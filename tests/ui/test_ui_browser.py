"""The UI in a real browser (Debian's Chromium, driven by Playwright): signing in, the overview's polling, a button
with its confirmation, and no script error or refused resource (the pages' Content-Security-Policy included)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from browser import new_page, open_browser, sign_in
from conftest import LiveServer
from ui_data import TOKENS, add_job, ui_settings

pytestmark = pytest.mark.slow
expect = pytest.importorskip("playwright.sync_api", reason="playwright not installed (make test installs it)").expect


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    with LiveServer(ui_settings(tmp_path / "data")) as live:
        yield live


@pytest.fixture
def browser() -> Iterator[Any]:
    with open_browser() as launched:
        yield launched


def test_sign_in_see_a_job_and_cancel_it(server: LiveServer, browser: Any) -> None:
    job = add_job(server.app.state.store, state="received", description="Chest routine")
    add_job(server.app.state.store, state="failed", description="Knee")
    with new_page(browser, server.url) as page:
        page.goto("/ui/jobs")
        assert page.locator("input[name=token]").is_visible(), "the sign-in form, for a page that needs one"
        page.problems.clear()  # type: ignore[attr-defined]  # the 401 of that page is logged as a console error
        page.fill("input[name=token]", TOKENS["write"])
        with page.expect_navigation():
            page.click("button[type=submit]")
        assert page.url.endswith("/ui/jobs"), "back to the page asked for"
        assert page.locator("text=Signed in as").is_visible()
        page.select_option("select[name=state]", "failed")  # the filter applies on change, and the URL follows
        page.wait_for_url("**/ui/jobs?state=failed*")
        expect(page.locator("tbody tr")).to_have_count(1)
        assert "Knee" in page.locator("tbody").inner_text()
        page.go_back()
        page.wait_for_url("**/ui/jobs")
        page.click(f"a[href='/ui/jobs/{job}']")
        page.wait_for_url(f"**/ui/jobs/{job}")
        page.on("dialog", lambda dialog: dialog.accept())
        page.click("text=Cancel job")
        page.wait_for_selector("text=The job is cancelled.")
        assert page.locator("h1 .badge").inner_text() == "cancelled"
        assert page.problems == []  # type: ignore[attr-defined]


def test_a_wrong_token_is_said_and_the_overview_refreshes_itself(server: LiveServer, browser: Any) -> None:
    with new_page(browser, server.url) as page:
        page.goto("/ui/login")
        page.fill("input[name=token]", "wrong-token-0000000000000000")
        page.click("button[type=submit]")
        page.wait_for_selector("text=That token is not known to this gateway.")
        assert len(page.problems) == 2, page.problems  # type: ignore[attr-defined]  # the 401, as browser and htmx log it
        page.problems.clear()  # type: ignore[attr-defined]
        sign_in(page, TOKENS["read"])
        assert page.url.endswith("/ui")
        before = page.locator("#live p.muted.small").last.inner_text()
        add_job(server.app.state.store, state="failed")
        failed = page.locator("li", has=page.locator('a[href="/ui/jobs?state=failed"]')).locator("strong")
        expect(failed).to_have_text("1", timeout=15_000)  # within a poll or three (every 5 s)
        assert page.locator("#live p.muted.small").last.inner_text() != before
        assert page.problems == []  # type: ignore[attr-defined]


def test_sign_out_ends_the_session_in_the_browser(server: LiveServer, browser: Any) -> None:
    with new_page(browser, server.url) as page:
        sign_in(page, TOKENS["admin"], "/ui/models")
        with page.expect_navigation():
            page.click("text=Sign out")
        assert "/ui/login" in page.url
        page.goto("/ui/models")
        assert page.locator("input[name=token]").is_visible()
        cookies = {c["name"]: c for c in page.context.cookies()}
        assert (
            "gw_session" not in cookies
            and cookies["gw_csrf"]["httpOnly"]
            and cookies["gw_csrf"]["sameSite"] == "Strict"
        )
