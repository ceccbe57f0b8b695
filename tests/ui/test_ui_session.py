"""Signing in to the web UI: the session cookie, CSRF on every change, scopes, and how a session ends."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from gateway.admin_token import reset_admin_token
from gateway.api.auth import CSRF_COOKIE, SESSION_COOKIE, SessionSigner
from gateway.config import HttpSettings, TokenSettings, hash_token
from gateway.errors import ConfigError
from gateway.ui.session import SESSION_KEY_FILE, SessionKeyFile

from conftest import make_settings
from ui_data import TOKENS, add_delivery, add_job, bearer, csrf_of, sign_in, ui_client, ui_settings

LOOPBACK = ("127.0.0.1", 50123)


def set_cookie_headers(response: object) -> dict[str, str]:
    """Set-Cookie headers of a response by cookie name."""
    found = {}
    for value in response.headers.get_list("set-cookie"):  # type: ignore[attr-defined]
        found[value.split("=", 1)[0]] = value
    return found


def test_sign_in_gives_an_httponly_strict_session_cookie_that_holds_no_token(tmp_path: Path) -> None:
    with ui_client(ui_settings(tmp_path / "data")) as client:
        page = client.get("/ui/login")
        assert page.status_code == 200 and 'name="token"' in page.text
        csrf_cookie = set_cookie_headers(page)[CSRF_COOKIE].lower()
        assert "httponly" in csrf_cookie and "samesite=strict" in csrf_cookie and "path=/" in csrf_cookie
        response = client.post(
            "/ui/login",
            data={"token": TOKENS["write"], "next": "/ui/jobs"},
            headers={"X-CSRF-Token": csrf_of(page.text), "HX-Request": "true"},
        )
        assert response.status_code == 200 and response.headers["HX-Redirect"] == "/ui/jobs"
        cookie = set_cookie_headers(response)[SESSION_COOKIE]
        assert all(part in cookie.lower() for part in ("httponly", "samesite=strict", "path=/", "max-age=43200"))
        assert "secure" not in cookie.lower(), "plain http: a Secure cookie would never come back"
        value = client.cookies[SESSION_COOKIE]
        assert TOKENS["write"] not in value and hash_token(TOKENS["write"]) not in value
        assert client.cookies[CSRF_COOKIE] != csrf_of(page.text), "a new CSRF token at sign-in"
        jobs = client.get("/ui/jobs")
        assert jobs.status_code == 200 and "Signed in as <strong>write-user</strong>" in jobs.text
        assert client.get("/api/jobs").status_code == 200, "the API takes the session too"


def test_over_https_the_cookies_are_secure(tmp_path: Path) -> None:
    with ui_client(ui_settings(tmp_path / "data"), base_url="https://localhost") as client:
        page = client.get("/ui/login")
        assert "secure" in set_cookie_headers(page)[CSRF_COOKIE].lower()
        response = client.post(
            "/ui/login",
            data={"token": TOKENS["read"]},
            headers={"X-CSRF-Token": csrf_of(page.text)},
            follow_redirects=False,
        )
        assert response.status_code == 303 and response.headers["location"] == "/ui"
        assert "secure" in set_cookie_headers(response)[SESSION_COOKIE].lower()


def test_sign_in_needs_the_pages_csrf_token(tmp_path: Path) -> None:
    with ui_client(ui_settings(tmp_path / "data")) as client:
        token = csrf_of(client.get("/ui/login").text)
        for headers in ({}, {"X-CSRF-Token": "x" * 43}, {"X-CSRF-Token": ""}):
            response = client.post("/ui/login", data={"token": TOKENS["admin"]}, headers=headers)
            assert response.status_code == 401, headers
            assert SESSION_COOKIE not in client.cookies
        client.cookies.delete(CSRF_COOKIE)
        response = client.post("/ui/login", data={"token": TOKENS["admin"]}, headers={"X-CSRF-Token": token})
        assert response.status_code == 401, "the header alone is not enough: it must match the cookie"


def test_an_unknown_token_gets_the_form_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with ui_client(ui_settings(tmp_path / "data")) as client:
        page = client.get("/ui/login")
        response = client.post(
            "/ui/login", data={"token": "not-a-token-0123456789"}, headers={"X-CSRF-Token": csrf_of(page.text)}
        )
        assert response.status_code == 401 and "not known to this gateway" in response.text
        assert SESSION_COOKIE not in client.cookies
    assert "not-a-token-0123456789" not in caplog.text
    assert "refused sign-in to the web UI" in caplog.text


@pytest.mark.parametrize("target", ["https://evil.example/x", "//evil.example/ui", "/api/jobs", "/ui\\..", "/uix"])
def test_sign_in_goes_on_to_a_ui_page_only(tmp_path: Path, target: str) -> None:
    with ui_client(ui_settings(tmp_path / "data")) as client:
        page = client.get("/ui/login", params={"next": target})
        assert 'name="next" value="/ui"' in page.text
        response = client.post(
            "/ui/login",
            data={"token": TOKENS["read"], "next": target},
            headers={"X-CSRF-Token": csrf_of(page.text), "HX-Request": "true"},
        )
        assert response.headers["HX-Redirect"] == "/ui"


def test_a_page_without_a_session_shows_the_sign_in_form_with_401(tmp_path: Path) -> None:
    with ui_client(ui_settings(tmp_path / "data")) as client:
        response = client.get("/ui/jobs?state=failed")
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert 'name="token"' in response.text
        assert 'value="/ui/jobs?state=failed"' in response.text, "back to the page asked for"
        polled = client.get(
            "/ui/overview/live", headers={"HX-Request": "true", "HX-Current-URL": "http://localhost/ui"}
        )
        assert polled.status_code == 401 and polled.headers["HX-Redirect"] == "/ui/login?next=/ui"


def test_a_change_with_the_session_cookie_alone_is_refused(tmp_path: Path) -> None:
    """What a page of another site can make the browser send: the cookie (were SameSite not honoured), no CSRF
    header (a custom header needs a preflight the gateway never grants)."""
    with ui_client(ui_settings(tmp_path / "data")) as client:
        csrf = sign_in(client, TOKENS["write"])
        job = add_job(client.app.state.store, state="failed")  # type: ignore[attr-defined]
        delivery = add_delivery(client.app.state.store, job, state="dead")  # type: ignore[attr-defined]
        form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "https://evil.example"}
        for path in (f"/ui/jobs/{job}/retry", f"/ui/jobs/{job}/cancel", f"/api/jobs/{job}/retry", "/ui/logout"):
            assert client.post(path, headers=form).status_code == 401, path
            wrong = client.post(path, headers={**form, "X-CSRF-Token": csrf[::-1]})
            assert wrong.status_code == 401, path
        assert client.get(f"/api/jobs/{job}").json()["deliveries"][0]["state"] == "dead"
        done = client.post(f"/ui/jobs/{job}/retry", headers={"X-CSRF-Token": csrf, "HX-Request": "true"})
        assert done.status_code == 200 and "1 delivery back in the queue" in done.text
        assert client.get(f"/api/jobs/{job}").json()["deliveries"][0]["state"] == "pending"
        assert delivery


def test_a_forged_or_expired_session_is_refused(tmp_path: Path) -> None:
    settings = ui_settings(tmp_path / "data")
    with ui_client(settings) as client:
        sign_in(client, TOKENS["admin"])
        good = client.cookies[SESSION_COOKIE]
        payload, mac = good.split(".")
        signer = SessionSigner(SessionKeyFile(settings.store.data_dir).key)
        entry = TokenSettings(name="admin-user", sha256=hash_token(TOKENS["admin"]), scopes=["admin"])
        other_key = SessionSigner(lambda: b"k" * 32).sign(entry, hours=1)
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        stretched = (
            base64.urlsafe_b64encode(json.dumps({**claims, "e": claims["e"] + 10**6}).encode()).decode().rstrip("=")
        )
        for value in (
            f"{stretched}.{mac}",  # a longer life, the old signature
            other_key,  # signed with another key
            signer.sign(entry, hours=1, now=time.time() - 7200),  # expired an hour ago
            f"{payload}.",
            "garbage",
        ):
            client.cookies.set(SESSION_COOKIE, value)
            assert client.get("/ui").status_code == 401, value
            assert client.get("/api/jobs").status_code == 401, value
        client.cookies.set(SESSION_COOKIE, good)
        assert client.get("/ui").status_code == 200


def test_resetting_the_admin_token_ends_its_sessions(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", http=HttpSettings(host="127.0.0.1", port=0))
    with ui_client(settings) as client:  # not loopback: no anonymous reads
        token = client.app.state.gateway.new_admin_token  # type: ignore[attr-defined]
        sign_in(client, token)
        assert client.get("/ui/models").status_code == 200
        reset_admin_token(settings.store.data_dir)
        assert client.get("/ui/models").status_code == 401
        assert client.get("/api/jobs").status_code == 401


def test_sign_out_ends_the_session(tmp_path: Path) -> None:
    with ui_client(ui_settings(tmp_path / "data")) as client:
        csrf = sign_in(client, TOKENS["read"])
        response = client.post("/ui/logout", headers={"X-CSRF-Token": csrf, "HX-Request": "true"})
        assert response.headers["HX-Redirect"] == "/ui/login"
        assert SESSION_COOKIE not in client.cookies
        assert client.get("/ui").status_code == 401


def test_each_scope_sees_the_buttons_it_may_use_and_the_server_refuses_the_rest(tmp_path: Path) -> None:
    with ui_client(ui_settings(tmp_path / "data")) as client:
        store = client.app.state.store  # type: ignore[attr-defined]
        job = add_job(store, state="failed", detail={"failure": {"stage": "infer", "reason": "boom"}})
        add_delivery(store, job, state="dead")
        seen = {}
        for scope, token in TOKENS.items():
            page = client.get(f"/ui/jobs/{job}", headers=bearer(token))
            models = client.get("/ui/models", headers=bearer(token))
            seen[scope] = ("Retry dead deliveries" in page.text, "Upload and register" in models.text)
        assert seen == {"read": (False, False), "write": (True, False), "admin": (True, True)}
        form = {"X-CSRF-Token": "n/a"}  # a bearer token needs no CSRF token
        assert client.post(f"/ui/jobs/{job}/retry", headers={**form, **bearer(TOKENS["read"])}).status_code == 403
        refused = client.post("/ui/models/tiny/disable", headers=bearer(TOKENS["write"]))
        assert refused.status_code == 403 and "lacks the &#39;admin&#39; scope" in refused.text
        assert client.post("/ui/models/tiny/disable", headers=bearer(TOKENS["admin"])).status_code == 404


def test_anonymous_loopback_readers_see_the_pages_and_no_buttons(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", http=HttpSettings(host="127.0.0.1", port=0))
    with ui_client(settings, client=LOOPBACK) as client:
        job = add_job(client.app.state.store, state="failed")  # type: ignore[attr-defined]
        page = client.get(f"/ui/jobs/{job}")
        assert page.status_code == 200 and "Not signed in" in page.text
        assert "hx-post" not in page.text.replace('hx-post="/ui/logout"', "")
        assert client.post(f"/ui/jobs/{job}/cancel", headers={"X-CSRF-Token": csrf_of(page.text)}).status_code == 401


def test_the_session_key_is_made_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = SessionKeyFile(data).key()
    path = data / SESSION_KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600 and len(key) == 32
    assert SessionKeyFile(data).key() == key, "read again, not replaced"
    assert [p.name for p in data.iterdir()] == [SESSION_KEY_FILE], "no staging file left behind"
    path.chmod(0o644)
    assert SessionKeyFile(data).key() == key and path.stat().st_mode & 0o777 == 0o600
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="does not hold a session key"):
        SessionKeyFile(data).key()


def test_pages_without_a_scope_check_still_say_who_is_signed_in(tmp_path: Path) -> None:
    with ui_client(ui_settings(tmp_path / "data")) as client:
        sign_in(client, TOKENS["write"])
        for path in ("/ui/login", "/ui/no-such-page"):
            assert "Signed in as <strong>write-user</strong> (write)" in client.get(path).text, path


def test_a_refused_button_says_why_to_the_signed_in_reader(tmp_path: Path) -> None:
    with ui_client(ui_settings(tmp_path / "data")) as client:
        csrf = sign_in(client, TOKENS["read"])
        job = add_job(client.app.state.store, state="received")  # type: ignore[attr-defined]
        refused = client.post(f"/ui/jobs/{job}/cancel", headers={"X-CSRF-Token": csrf, "HX-Request": "true"})
        assert refused.status_code == 403 and "lacks the &#39;write&#39; scope" in refused.text
        assert "Signed in as <strong>read-user</strong> (read)" in refused.text
