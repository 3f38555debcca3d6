"""The `api` driver's own behaviour: retries with backoff (connection errors, 429, 5xx, rate-limit 403s), refresh on
401, User-Agent, the rate limit chosen by base URL, and errors that carry the server's message but never a secret.

The transient failures come from a small real HTTP server in a thread that answers from a script; the rest runs
against the real hub process."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest

from fedsim_runner.featurecloud.api import FeatureCloudClient, FeatureCloudError, is_real_site
from fedsim_runner.featurecloud.controller_client import ControllerClient
from tests.conftest import REPO, free_port
from tests.test_hub_api import HubProcess, hub, sign_up  # noqa: F401  (hub is a fixture)


class ScriptedServer:
    """Answers each request with the next (status, headers, body) of a script, then 200 {"ok": true}; records the
    requests' paths and User-Agents."""

    def __init__(self, script: list[tuple[int, dict, str]]) -> None:
        self.script = list(script)
        self.seen: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                outer.seen.append({"path": self.path, "agent": self.headers.get("User-Agent"), "at": time.monotonic()})
                status, headers, body = outer.script.pop(0) if outer.script else (200, {}, '{"ok": true}')
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_retries_429_and_5xx_then_succeeds_with_a_user_agent():
    script = [(503, {}, '{"detail": "busy"}'), (429, {"Retry-After": "0"}, '{"detail": "slow down"}'),
              (502, {}, "bad gateway")]
    with ScriptedServer(script) as server:
        assert FeatureCloudClient(server.url).apps() == {"ok": True}
    assert len(server.seen) == 4
    assert all(s["agent"].startswith("FedSim/") for s in server.seen)


def test_a_rate_limit_403_is_retried_a_permission_403_is_not():
    with ScriptedServer([(403, {}, '{"detail": "Request was throttled: rate limit exceeded"}')]) as server:
        assert FeatureCloudClient(server.url).apps() == {"ok": True}
        assert len(server.seen) == 2
    with ScriptedServer([(403, {}, '{"detail": "You do not have permission"}')]) as server:
        with pytest.raises(FeatureCloudError) as refused:
            FeatureCloudClient(server.url).apps()
        assert refused.value.status == 403 and "permission" in refused.value.message
        assert len(server.seen) == 1


def test_gives_up_after_the_retries_with_the_servers_message():
    with ScriptedServer([(500, {}, '{"detail": "database on fire"}')] * 3) as server:
        with pytest.raises(FeatureCloudError) as failed:
            FeatureCloudClient(server.url, retries=2).apps()
    assert failed.value.status == 500 and failed.value.message == "database on fire"
    assert "GET /api/apps/" in str(failed.value)


def test_connection_errors_are_retried_until_the_hub_is_up(tmp_path):
    """The hub starts while the client is already retrying: the call succeeds without any wait in the test."""
    port = free_port()
    client = FeatureCloudClient(f"http://127.0.0.1:{port}", retries=12)
    process = subprocess.Popen([sys.executable, "-m", "fedsim_runner", "hub", "--port", str(port), "--db",
                                str(tmp_path / "h.db")], cwd=REPO, env={"PATH": os.environ.get("PATH", "")},
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        assert "federated-svd" in {a["slug"] for a in client.apps()}
    finally:
        process.terminate()
        process.wait(timeout=20)
    with pytest.raises(FeatureCloudError) as down:
        FeatureCloudClient(f"http://127.0.0.1:{port}", retries=1).apps()
    assert down.value.status is None and "unreachable" in down.value.message


def test_rate_limit_is_chosen_by_base_url():
    assert is_real_site("https://featurecloud.ai") and is_real_site("https://api.featurecloud.ai/")
    assert not is_real_site("http://127.0.0.1:8080") and not is_real_site("https://featurecloud.ai.example.org")
    assert FeatureCloudClient("https://featurecloud.ai").rate_limiter is not None
    assert FeatureCloudClient("http://127.0.0.1:8080").rate_limiter is None
    assert FeatureCloudClient("https://featurecloud.ai", rate_limit=0).rate_limiter is None
    with ScriptedServer([]) as server:
        client = FeatureCloudClient(server.url, rate_limit=20.0)
        for _ in range(5):
            client.apps()
    gaps = [b["at"] - a["at"] for a, b in zip(server.seen, server.seen[1:], strict=False)]
    assert min(gaps) >= 0.04  # 20 requests/s: one every 50 ms (minus scheduling slack)


def test_expired_access_token_is_refreshed_on_401(hub):  # noqa: F811
    client = sign_up(hub, "refresher")
    with sqlite3.connect(f"file:{hub.db}?mode=ro", uri=True) as conn:
        secret = conn.execute("SELECT value FROM meta WHERE key = 'jwt_secret'").fetchone()[0]
    claims = jwt.decode(client._access, secret, algorithms=["HS256"])
    client._access = jwt.encode({**claims, "exp": int(time.time()) - 5}, secret, algorithm="HS256")
    assert client.user_info()["email"] == "refresher@example.org"
    assert jwt.decode(client._access, secret, algorithms=["HS256"])["exp"] > time.time()


def test_errors_name_the_problem_and_never_the_secret(hub):  # noqa: F811
    password = "pw-very-secret-value"
    hub.client().signup("who@example.org", password, first_name="Who", last_name="Ever")
    with pytest.raises(FeatureCloudError) as wrong:
        hub.client().login("who@example.org", password + "x")
    assert wrong.value.status == 401 and password not in str(wrong.value) and "password" in str(wrong.value)
    with pytest.raises(FeatureCloudError) as short:
        hub.client().signup("new@example.org", "tiny", first_name="N", last_name="N")
    assert short.value.status == 422 and "password" in short.value.message and "tiny" not in str(short.value)
    client = hub.client("who@example.org", password)
    assert client._access not in repr(client) and password not in repr(client)
    with pytest.raises(FeatureCloudError) as missing:
        client.app_by_slug("no-such-app")
    assert "federated-svd" in missing.value.message
    with pytest.raises(FeatureCloudError) as not_logged_in:
        hub.client().projects()
    assert "login" in not_logged_in.value.message
    assert client.site() is None


def test_controller_client_against_a_scripted_controller():
    runs = [{"runNr": 2, "startedOn": "x", "logSteps": [1], "resultSteps": [1]}]
    script = [(200, {}, '{"fileName": "a.csv"}'), (200, {}, '{"finalized": true}'), (200, {}, json.dumps(runs)),
              (200, {"Content-Type": "application/zip"}, "PK-zip"), (404, {}, '{"detail": "no log for run 9"}')]
    with ScriptedServer(script) as server:
        controller = ControllerClient(server.url)
        assert controller.upload(3, "a.csv", b"1,2,3") == {"fileName": "a.csv"}
        assert controller.finalize(3) == {"finalized": True}
        assert controller.project_runs(3) == runs
        assert controller.download_result(3, 1, 2) == b"PK-zip"
        with pytest.raises(FeatureCloudError) as missing:
            controller.download_log(3, 1, 9)
        assert missing.value.status == 404 and "run 9" in missing.value.message
        assert controller.ping()
    paths = [s["path"] for s in server.seen]
    assert paths[0] == "/file-upload/?projectId=3&fileName=a.csv&finalize=false&consent=true"
    assert paths[1] == "/file-upload/?projectId=3&fileName=&finalize=true&consent=true"
    assert not ControllerClient(f"http://127.0.0.1:{free_port()}").ping()
