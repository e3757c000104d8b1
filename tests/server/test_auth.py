"""Access control against live collectors that require tokens, on SQLite and Postgres.

Project isolation is checked route family by route family (every request a token of
project A makes about project B is refused, and B is unchanged afterwards); a route walk
checks that no route outside the open list answers without a token.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from server.app import create_app
from server.auth import store
from server.db import make_engine
from server.migrate import upgrade
from server.settings import Settings
from tests.conftest import (
    BACKENDS,
    free_port,
    fresh_pg_database,
    new_run_id,
    serve_in_thread,
    spawn_collector,
)

LAYERS = ["l0", "l1"]


@dataclass
class AuthCollector:
    url: str
    database_url: str
    backend: str
    tokens: dict[str, str]  # name -> token string
    ids: dict[str, Any] = field(default_factory=dict)  # objects made in project B

    def client(self, token: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[token]}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)


TOKENS = {  # name: (project, scopes)
    "root": (None, ["admin"]),
    "a_rw": ("proj-a", ["ingest", "read"]),
    "a_read": ("proj-a", ["read"]),
    "a_ingest": ("proj-a", ["ingest"]),
    "a_admin": ("proj-a", ["admin"]),
    "b_rw": ("proj-b", ["ingest", "read"]),
    "all_read": (None, ["read"]),
}


def make_tokens(database_url: str) -> dict[str, str]:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            return {name: store.create(session, project, scopes, name).token
                    for name, (project, scopes) in TOKENS.items()}
    finally:
        engine.dispose()


@contextlib.contextmanager
def database(backend: str, tmp: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield Settings(database_url=f"sqlite:///{tmp / 'auth.db'}").database_url
        return
    with fresh_pg_database("gradsentry_auth") as url:
        yield Settings(database_url=url).database_url


def _steps(steps: list[int], loss: Any = 1.0) -> dict[str, Any]:
    return {"wire_version": 1, "steps": [
        {"step": s, "loss": loss, "grad_norm": 1.0, "layer_grad_norms": [0.5, 0.5]}
        for s in steps]}


def _populate(c: AuthCollector) -> None:
    """Runs in A and B; in B an alert, a silence, a receiver and a notification."""
    with c.client("root") as root, c.client("a_rw") as a, c.client("b_rw") as b:
        receiver = root.post("/api/v1/receivers", json={
            "name": "b-hook", "kind": "webhook", "project": "proj-b",
            "url": "http://127.0.0.1:9/hook"})
        assert receiver.status_code == 201, receiver.text
        c.ids["receiver_b"] = receiver.json()["id"]
        for client, project, key in ((a, "proj-a", "run_a"), (b, "proj-b", "run_b")):
            run_id = new_run_id(project)
            r = client.post("/api/v1/runs", json={"id": run_id, "project": project,
                                                  "layers": LAYERS})
            assert r.status_code == 201, r.text
            assert client.post(f"/api/v1/runs/{run_id}/steps",
                               json=_steps([0, 1, 2])).status_code == 200
            c.ids[key] = run_id
        nan = b.post(f"/api/v1/runs/{c.ids['run_b']}/steps", json=_steps([3], "NaN"))
        assert nan.status_code == 200, nan.text
        alerts = b.get("/api/v1/alerts", params={"run": c.ids["run_b"]}).json()["alerts"]
        assert alerts, "a NaN loss raises an alert at once"
        c.ids["alert_b"] = alerts[0]["id"]
        silence = b.post("/api/v1/silences", json={"project": "proj-b", "comment": "b's own"})
        assert silence.status_code == 201, silence.text
        c.ids["silence_b"] = silence.json()["id"]
        deadline = time.monotonic() + 10
        while not b.get("/api/v1/notifications").json()["notifications"]:
            assert time.monotonic() < deadline, "the B alert queued no notification"
            time.sleep(0.1)
        tokens = root.get("/api/v1/tokens", params={"project": "proj-b"}).json()["tokens"]
        c.ids["token_b"] = tokens[0]["id"]


@pytest.fixture(scope="module", params=BACKENDS)
def auth_collector(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthCollector]:
    backend: str = request.param
    with database(backend, tmp_path_factory.mktemp("auth")) as url:
        upgrade(url)
        tokens = make_tokens(url)
        base, server, thread = serve_in_thread(Settings(database_url=url, auth="required"))
        c = AuthCollector(base, url, backend, tokens)
        _populate(c)
        yield c
        server.should_exit = True
        thread.join(timeout=10)


# -- 401: no usable token ------------------------------------------------------------------


def test_missing_token_is_401_with_a_message_and_a_bearer_challenge(
    auth_collector: AuthCollector,
) -> None:
    with auth_collector.client() as anon:
        r = anon.get("/api/v1/runs")
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"] == "Unauthorized"
        assert "requires an API token" in r.json()["detail"]
        assert anon.post("/api/v1/runs", json={"id": "x", "project": "proj-a"}).status_code == 401
        assert anon.get("/healthz").status_code == 200  # liveness stays open


@pytest.mark.parametrize(("header", "detail"), [
    ("Bearer nonsense", "malformed"),
    ("Basic dXNlcjpwdw==", "Bearer <token>"),
    ("Bearer gs_0123456789ab_" + "A" * 43, "unknown API token"),
])
def test_malformed_or_unknown_token_is_401(
    auth_collector: AuthCollector, header: str, detail: str
) -> None:
    with httpx.Client(base_url=auth_collector.url, headers={"Authorization": header}) as c:
        r = c.get("/api/v1/runs")
    assert r.status_code == 401 and detail in r.json()["detail"], r.text
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_right_id_wrong_secret_is_401(auth_collector: AuthCollector) -> None:
    real = auth_collector.tokens["a_rw"]
    forged = real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB")
    with httpx.Client(base_url=auth_collector.url,
                      headers={"Authorization": f"Bearer {forged}"}) as c:
        r = c.get("/api/v1/runs")
    assert r.status_code == 401 and r.json()["detail"] == "unknown API token"


# -- 403: wrong scope ------------------------------------------------------------------------


def test_wrong_scope_is_403_with_a_message(auth_collector: AuthCollector) -> None:
    run_a = auth_collector.ids["run_a"]
    with auth_collector.client("a_read") as reader, auth_collector.client("a_ingest") as writer:
        r = reader.post(f"/api/v1/runs/{run_a}/steps", json=_steps([9]))
        assert r.status_code == 403 and "lacks the 'ingest' scope" in r.json()["detail"]
        assert reader.post("/api/v1/runs", json={"id": new_run_id(), "project": "proj-a"}
                           ).status_code == 403
        r = writer.get(f"/api/v1/runs/{run_a}")
        assert r.status_code == 403 and "lacks the 'read' scope" in r.json()["detail"]
        assert writer.get("/api/v1/runs").status_code == 403
        # admin routes: tokens, rules, receivers
        assert reader.get("/api/v1/tokens").status_code == 403
        assert reader.put("/api/v1/projects/proj-a/rules", json={}).status_code == 403
        assert reader.get("/api/v1/receivers").status_code == 403
        # what read allows: reading, acknowledging and silencing in its project
        assert reader.get(f"/api/v1/runs/{run_a}").status_code == 200
        assert reader.get("/api/v1/projects/proj-a/rules").status_code == 200
        silence = reader.post("/api/v1/silences", json={"project": "proj-a", "comment": "x"})
        assert silence.status_code == 201
        assert reader.delete(f"/api/v1/silences/{silence.json()['id']}").status_code == 204
    with auth_collector.client("a_admin") as admin:  # admin implies read and ingest
        assert admin.get(f"/api/v1/runs/{run_a}").status_code == 200
        assert admin.post(f"/api/v1/runs/{run_a}/steps", json=_steps([3])).status_code == 200
        assert admin.put("/api/v1/projects/proj-a/rules", json={}).status_code == 200


# -- project isolation -------------------------------------------------------------------------


def _b_state(c: AuthCollector) -> dict[str, Any]:
    """Everything of project B a request from A could have changed."""
    with c.client("root") as root:
        run = root.get(f"/api/v1/runs/{c.ids['run_b']}").json()
        alert = root.get(f"/api/v1/alerts/{c.ids['alert_b']}").json()
        return {
            "run": (run["status"], run["num_steps"], run["last_step"], run["tags"]),
            "alert_ack": alert["acknowledged_at"],
            "silences": root.get("/api/v1/silences", params={"project": "proj-b"}).json(),
            "rules": root.get("/api/v1/projects/proj-b/rules").json()["overrides"],
            "receivers": [(r["id"], r["url"]) for r in
                          root.get("/api/v1/receivers").json()["receivers"]],
            "tokens": [(t["id"], t["revoked_at"]) for t in
                       root.get("/api/v1/tokens").json()["tokens"]],
            "runs_b": [r["id"] for r in
                       root.get("/api/v1/runs", params={"project": "proj-b"}).json()],
        }


def test_a_token_of_project_a_can_neither_read_nor_write_project_b(
    auth_collector: AuthCollector,
) -> None:
    c = auth_collector
    rb, alert, silence = c.ids["run_b"], c.ids["alert_b"], c.ids["silence_b"]
    before = _b_state(c)
    forbidden = {
        "a_rw": [
            ("POST", "/api/v1/runs", {"id": new_run_id(), "project": "proj-b"}),
            ("POST", f"/api/v1/runs/{rb}/steps", _steps([7])),
            ("POST", f"/api/v1/runs/{rb}/finish", None),
            ("GET", f"/api/v1/runs/{rb}", None),
            ("GET", f"/api/v1/runs/{rb}/series", None),
            ("GET", f"/api/v1/runs/{rb}/layers", None),
            ("GET", f"/api/v1/runs/{rb}/noise-scale", None),
            ("GET", f"/api/v1/runs/{rb}/alerts", None),
            ("GET", "/api/v1/runs?project=proj-b", None),
            ("GET", "/api/v1/alerts?project=proj-b", None),
            ("GET", f"/api/v1/alerts/{alert}", None),
            ("POST", f"/api/v1/alerts/{alert}/ack", {"by": "intruder"}),
            ("GET", "/api/v1/silences?project=proj-b", None),
            ("POST", "/api/v1/silences", {"project": "proj-b", "comment": "mute b"}),
            ("DELETE", f"/api/v1/silences/{silence}", None),
            ("GET", "/api/v1/projects/proj-b/rules", None),
            ("GET", f"/runs/{rb}", None),
            ("GET", f"/runs/{rb}/figures.json", None),
            ("GET", f"/runs/{rb}/layer.json?name=l0", None),
            ("GET", f"/compare?runs={c.ids['run_a']},{rb}", None),
            ("GET", f"/compare/figures.json?runs={c.ids['run_a']},{rb}", None),
            ("GET", "/metrics", None),  # every project's gauges
        ],
        "a_admin": [
            ("PUT", "/api/v1/projects/proj-b/rules", {"nan": {"cooldown_steps": 1}}),
            ("GET", "/api/v1/receivers?project=proj-b", None),
            ("POST", "/api/v1/receivers", {"name": "b-hook", "kind": "webhook",
                                           "project": "proj-a", "url": "http://evil/"}),
            ("POST", "/api/v1/receivers", {"name": "global", "kind": "webhook",
                                           "url": "http://evil/"}),
            ("DELETE", f"/api/v1/receivers/{c.ids['receiver_b']}", None),
            ("POST", "/api/v1/tokens", {"project": "proj-b", "scopes": ["read"]}),
            ("POST", "/api/v1/tokens", {"project": None, "scopes": ["read"]}),
            ("GET", "/api/v1/tokens?project=proj-b", None),
            ("DELETE", f"/api/v1/tokens/{c.ids['token_b']}", None),
        ],
    }
    for name, calls in forbidden.items():
        with c.client(name) as client:
            for method, path, body in calls:
                r = client.request(method, path, json=body)
                assert r.status_code == 403, (name, method, path, r.status_code, r.text)
                assert r.json()["error"] == "Forbidden" and r.json()["detail"]
    assert _b_state(c) == before  # nothing of B changed


def test_listings_show_only_the_tokens_project(auth_collector: AuthCollector) -> None:
    c = auth_collector
    with c.client("a_admin") as a, c.client("root") as root:
        assert {p["name"] for p in a.get("/api/v1/projects").json()} == {"proj-a"}
        assert {r["project"] for r in a.get("/api/v1/runs").json()} == {"proj-a"}
        assert c.ids["run_a"] in {r["id"] for r in a.get("/api/v1/runs").json()}
        assert {x["project"] for x in a.get("/api/v1/alerts").json()["alerts"]} <= {"proj-a"}
        assert {x["project"] for x in a.get("/api/v1/silences").json()["silences"]} <= {
            "proj-a"}
        assert a.get("/api/v1/notifications").json()["notifications"] == []
        assert a.get("/api/v1/receivers").json()["receivers"] == []
        assert {t["project"] for t in a.get("/api/v1/tokens").json()["tokens"]} == {"proj-a"}
        page = a.get("/")
        assert page.status_code == 200
        assert c.ids["run_a"] in page.text and c.ids["run_b"] not in page.text
        # the all-projects admin sees both
        assert {"proj-a", "proj-b"} <= {p["name"] for p in root.get("/api/v1/projects").json()}
        assert root.get("/api/v1/notifications").json()["notifications"]
        assert root.get("/metrics").status_code == 200
    with c.client("all_read") as reader:
        assert reader.get("/metrics").status_code == 200  # a Prometheus scraper's token


@pytest.mark.parametrize("auth_collector", ["sqlite"], indirect=True)  # the same app on both
def test_every_route_but_the_open_ones_needs_a_token(auth_collector: AuthCollector) -> None:
    """Walks the app's routes, so a route added later without a scope fails here."""
    open_paths = {"/healthz", "/login", "/logout", "/docs", "/docs/oauth2-redirect", "/redoc",
                  "/openapi.json", "/static/plotly.min.js", "/static/gradsentry.js"}
    app = create_app(Settings(database_url=auth_collector.database_url, auth="required"))
    values = {"run_id": auth_collector.ids["run_b"], "alert_id": "1", "silence_id": "1",
              "receiver_id": "1", "token_id": "0123456789ab", "project": "proj-b"}
    checked = 0
    with auth_collector.client(follow_redirects=False) as anon:
        for route in _routes(app.routes):
            path = getattr(route, "path", "")
            if path in open_paths or not path:
                continue
            url = path.format(**values)
            for method in getattr(route, "methods", {"GET"}) - {"HEAD", "OPTIONS"}:
                r = anon.request(method, url, params={"runs": "a,b", "name": "l0"})
                page = not isinstance(route, APIRoute) or not route.include_in_schema
                if page and r.status_code == 303:
                    assert r.headers["location"].startswith("/login?next=")
                else:
                    assert r.status_code == 401, (method, url, r.status_code, r.text)
                checked += 1
    assert checked >= 30  # the walk found the routes (34 when written)


def _routes(routes: list[Any]) -> Iterator[Any]:
    """Every route, also those of included routers (recent FastAPI nests them)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        yield from _routes(inner.routes) if inner is not None else [route]


# -- revocation --------------------------------------------------------------------------------


def _spawn_collector(database_url: str, port: int, *extra: str,
                     env: dict[str, str] | None = None,
                     host: str = "127.0.0.1") -> subprocess.Popen[bytes]:
    """``gradsentry serve`` in a process of its own (output kept for ``_stop``)."""
    return spawn_collector(database_url, port, *extra, env=env, host=host,
                           stdout=subprocess.PIPE)


def _stop(proc: subprocess.Popen[bytes]) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out.decode()


def test_revoked_token_stops_working_at_once(auth_collector: AuthCollector) -> None:
    c = auth_collector
    with c.client("root") as root:
        made = root.post("/api/v1/tokens", json={"project": "proj-a", "scopes": ["read"],
                                                 "name": "short-lived"})
        assert made.status_code == 201
        token = made.json()["token"]
        listed = {t["id"]: t for t in root.get("/api/v1/tokens").json()["tokens"]}
        assert listed[made.json()["id"]]["revoked_at"] is None
        assert "token" not in listed[made.json()["id"]]  # the secret is never listed
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{c.url}/api/v1/runs", headers=headers).status_code == 200
        assert root.delete(f"/api/v1/tokens/{made.json()['id']}").status_code == 204
        r = httpx.get(f"{c.url}/api/v1/runs", headers=headers)
        assert r.status_code == 401 and "revoked" in r.json()["detail"]
        assert root.delete("/api/v1/tokens/0123456789ab").status_code == 404


@pytest.mark.postgres
@pytest.mark.parametrize("auth_collector", ["postgres"], indirect=True)  # processes share it
def test_revoke_in_one_collector_process_is_rejected_at_once_in_another(
    auth_collector: AuthCollector,
) -> None:
    c = auth_collector
    port = free_port()
    other = _spawn_collector(c.database_url, port, env={"GRADSENTRY_AUTH": "required"})
    try:
        with c.client("root") as root:
            token = root.post("/api/v1/tokens", json={"project": "proj-a",
                                                      "scopes": ["read"]}).json()
        there = httpx.Client(base_url=f"http://127.0.0.1:{port}",
                             headers={"Authorization": f"Bearer {token['token']}"})
        with there:
            assert there.get("/api/v1/runs").status_code == 200  # known to the other process
            with c.client("root") as root:  # revoked through this process's REST API
                assert root.delete(f"/api/v1/tokens/{token['id']}").status_code == 204
            r = there.get("/api/v1/runs")  # the very next request over there
            assert r.status_code == 401 and "revoked" in r.json()["detail"]
    finally:
        _stop(other)


# -- dashboard sign-in -----------------------------------------------------------------------


def test_dashboard_signs_in_with_a_cookie(auth_collector: AuthCollector) -> None:
    c = auth_collector
    with httpx.Client(base_url=c.url, follow_redirects=False) as browser:
        r = browser.get(f"/runs/{c.ids['run_a']}")
        assert r.status_code == 303
        assert r.headers["location"] == f"/login?next=%2Fruns%2F{c.ids['run_a']}"
        form = browser.get(r.headers["location"])
        assert form.status_code == 200 and 'name="token"' in form.text
        bad = browser.post("/login", data={"token": "gs_nope", "next": "/"})
        assert bad.status_code == 401 and "malformed" in bad.text
        assert "set-cookie" not in bad.headers
        ok = browser.post("/login", data={"token": c.tokens["a_read"],
                                          "next": f"/runs/{c.ids['run_a']}"})
        assert ok.status_code == 303 and ok.headers["location"] == f"/runs/{c.ids['run_a']}"
        cookie = ok.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        # pages and the API calls their scripts make now carry the cookie
        assert browser.get(f"/runs/{c.ids['run_a']}").status_code == 200
        assert browser.get(f"/runs/{c.ids['run_a']}/figures.json").status_code == 200
        assert browser.get("/api/v1/runs").status_code == 200
        assert browser.get(f"/api/v1/runs/{c.ids['run_b']}").status_code == 403
        assert browser.get("/logout").status_code == 303
        assert browser.get("/api/v1/runs").status_code == 401
        # an ingest-only token cannot sign in; an off-site next is ignored
        assert browser.post("/login", data={"token": c.tokens["a_ingest"]}).status_code == 403
        away = browser.get("/login", params={"token": c.tokens["a_read"],
                                             "next": "//evil.example/x"})
        assert away.status_code == 303 and away.headers["location"] == "/"


# -- CLI -------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_token_cli_create_list_revoke_round_trip(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    made = _cli("token", "create", "--project", "cli-proj", "--scope", "ingest", "--scope",
                "read", "--name", "ci", "--database-url", url)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("gs_") and "shown only once" in made.stderr
    token_id = token.split("_")[1]
    listed = _cli("token", "list", "--database-url", url)
    assert listed.returncode == 0 and token_id in listed.stdout
    assert "ingest,read" in listed.stdout and "active" in listed.stdout
    assert token.split("_", 2)[2] not in listed.stdout  # never the secret

    base, server, thread = serve_in_thread(Settings(database_url=url, auth="required"))
    try:
        headers = {"Authorization": f"Bearer {token}"}
        r = httpx.post(f"{base}/api/v1/runs", headers=headers,
                       json={"id": new_run_id(), "project": "cli-proj"})
        assert r.status_code == 201
        revoked = _cli("token", "revoke", token_id, "--database-url", url)
        assert revoked.returncode == 0 and "revoked" in revoked.stdout
        r = httpx.get(f"{base}/api/v1/runs", headers=headers)  # another process revoked it
        assert r.status_code == 401 and "revoked" in r.json()["detail"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert "revoked" in _cli("token", "list", "--database-url", url).stdout
    assert _cli("token", "revoke", "0123456789ab", "--database-url", url).returncode == 1
