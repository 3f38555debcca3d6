"""Bad input against the real hub process: the right 4xx with a message, never a 500, and the database unchanged."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import httpx
import jwt
import pytest

from tests.conftest import REPO
from tests.test_hub_api import HubProcess, project_with_members, sign_up

pytestmark = pytest.mark.e2e


def dump(hub: HubProcess) -> str:
    with sqlite3.connect(f"file:{hub.db}?mode=ro", uri=True) as conn:
        return "\n".join(conn.iterdump())


def secret(hub: HubProcess) -> str:
    with sqlite3.connect(f"file:{hub.db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT value FROM meta WHERE key = 'jwt_secret'").fetchone()[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A hub with a ready project (coordinator, one participant, and a member who joined with the `used` token) and a
    second project none of them belongs to."""
    hub = HubProcess(tmp_path_factory.mktemp("hub-errors") / "hub.sqlite3").start()
    try:
        pid, (coord, participant) = project_with_members(hub, names=("coord", "member"))
        outsider = sign_up(hub, "outsider")
        used = coord.create_token(pid)["token"]
        outsider.join_project(used)
        other_pid, _ = project_with_members(hub, names=("coord2",))
        outsider_auth = {"Authorization": f"Bearer {outsider._access}"}
        yield {"hub": hub, "pid": pid, "other": other_pid, "used": used,
               "coord": {"Authorization": f"Bearer {coord._access}"},
               "member": {"Authorization": f"Bearer {participant._access}"}, "outsider": outsider_auth}
    finally:
        hub.stop()


def rejected(world: dict, method: str, path: str, expected: int | tuple[int, ...], **kw) -> str:
    """Send one request that must be refused; returns the server's message. Checks status, message and db."""
    hub = world["hub"]
    before = dump(hub)
    response = httpx.request(method, hub.url + path, timeout=30, **kw)
    expected = (expected,) if isinstance(expected, int) else expected
    assert response.status_code in expected, f"{method} {path}: {response.status_code} {response.text}"
    detail = response.json()["detail"]
    assert detail, f"{method} {path}: no message"
    assert dump(hub) == before, f"{method} {path} changed the database although it was refused"
    return detail if isinstance(detail, str) else str(detail)


def test_wrong_password_is_401_and_not_echoed(world):
    message = rejected(world, "POST", "/api/auth/login/", 401,
                       json={"username": "coord@example.org", "password": "pw-wrong-secret"})
    assert "pw-wrong-secret" not in message and "password" in message
    rejected(world, "POST", "/api/auth/login/", 401, json={"username": "nobody@example.org", "password": "x" * 9})


@pytest.mark.parametrize("kind", ["missing", "not-bearer", "garbage", "forged", "expired", "refresh-as-access",
                                  "unknown-user"])
def test_bad_jwt_is_401(world, kind):
    now = int(time.time())
    claims = {"sub": "1", "type": "access", "iat": now, "exp": now + 600}
    token = {
        "garbage": "abc.def.ghi",
        "forged": jwt.encode(claims, "not-the-hub-secret-but-long-enough-for-hs256", algorithm="HS256"),
        "expired": jwt.encode({**claims, "exp": now - 10}, secret(world["hub"]), algorithm="HS256"),
        "refresh-as-access": jwt.encode({**claims, "type": "refresh"}, secret(world["hub"]), algorithm="HS256"),
        "unknown-user": jwt.encode({**claims, "sub": "999"}, secret(world["hub"]), algorithm="HS256"),
    }.get(kind)
    headers = {} if kind == "missing" else {"Authorization": f"Token {token}" if kind == "not-bearer" else
                                            f"Bearer {token}"}
    message = rejected(world, "GET", "/api/user/info/", 401, headers=headers)
    assert ("expired" in message) == (kind == "expired")
    rejected(world, "POST", "/api/projects/", 401, headers=headers, json={"name": "x", "description": ""})


def test_refresh_with_an_access_token_is_401(world):
    access = world["coord"]["Authorization"].split()[1]
    rejected(world, "POST", "/api/auth/token/refresh/", 401, json={"refresh": access})
    rejected(world, "POST", "/api/auth/token/refresh/", 401, json={"refresh": "nonsense"})


def test_unknown_project_is_404(world):
    for method, path, body in [("GET", "/api/projects/987654/", None), ("PUT", "/api/projects/987654/",
                               {"status": "prepare"}), ("POST", "/api/project-tokens/987654/", {"cmd": "create"}),
                               ("POST", "/api/localfc/projects/987654/finalize/", None),
                               ("GET", "/api/localfc/projects/987654/run/", None)]:
        message = rejected(world, method, path, 404, headers=world["coord"], json=body)
        assert "987654" in message


def test_someone_elses_project_is_hidden(world):
    other = world["other"]
    for method, path, body in [("GET", f"/api/projects/{other}/", None),
                               ("PUT", f"/api/projects/{other}/", {"status": "prepare"}),
                               ("PUT", f"/api/projects/{other}/", {"name": "taken over"}),
                               ("GET", f"/api/project-tokens/{other}/", None),
                               ("POST", f"/api/project-tokens/{other}/", {"cmd": "create"}),
                               ("POST", f"/api/localfc/projects/{other}/finalize/", None),
                               ("GET", f"/api/localfc/projects/{other}/run/", None),
                               ("PUT", f"/api/localfc/projects/{other}/runs/1/", {"status": "error"})]:
        rejected(world, method, path, (403, 404), headers=world["outsider"], json=body)
    projects = httpx.get(world["hub"].url + "/api/projects/", headers=world["outsider"]).json()
    assert other not in [p["id"] for p in projects]


def test_participant_may_not_coordinate(world):
    pid = world["pid"]
    for body in [{"status": "prepare"}, {"status": "shutdown"}, {"name": "renamed"},
                 {"workflow": [], "status": "ready"}]:
        message = rejected(world, "PUT", f"/api/projects/{pid}/", 403, headers=world["member"], json=body)
        assert "coordinator" in message
    rejected(world, "POST", f"/api/project-tokens/{pid}/", 403, headers=world["member"], json={"cmd": "create"})


def test_reused_unknown_and_redundant_tokens(world):
    message = rejected(world, "POST", "/api/project-tokens/", 409, headers=world["member"],
                       json={"token": world["used"], "cmd": "join"})
    assert "already used" in message
    message = rejected(world, "POST", "/api/project-tokens/", 404, headers=world["member"],
                       json={"token": "no-such-token", "cmd": "join"})
    assert "not found" in message
    fresh = httpx.post(f"{world['hub'].url}/api/project-tokens/{world['pid']}/", headers=world["coord"],
                       json={"cmd": "create"}).json()["token"]
    message = rejected(world, "POST", "/api/project-tokens/", 409, headers=world["member"],
                       json={"token": fresh, "cmd": "join"})
    assert "already a member" in message


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/api/auth/login/", b"{not json"),
    ("POST", "/api/auth/login/", b'{"username": 5, "password": ["x"]}'),
    ("POST", "/api/auth/login/", b"[]"),
    ("POST", "/api/auth/user/signup/", b'{"email": "no-at-sign", "password": "long enough", "firstName": "a", '
                                       b'"lastName": "b"}'),
    ("POST", "/api/auth/user/signup/", b'{"email": "a@b.c", "password": "short", "firstName": "a", "lastName": "b"}'),
    ("POST", "/api/auth/user/signup/", b'{"email": "a@b.c", "password": "long enough", "firstName": "a", '
                                       b'"lastName": "b", "role": "admin"}'),
    ("POST", "/api/projects/", b'{"name": "\\ud800 lone surrogate", "description": ""}'),
    ("POST", "/api/projects/", b'{"name": "", "description": ""}'),
    ("PUT", "/api/projects/{pid}/", b'{"status": "running"}'),
    ("PUT", "/api/projects/{pid}/", b'{"status": 7}'),
    ("PUT", "/api/projects/{pid}/", b'{"workflow": [{"federatedApp": {"id": "x"}}]}'),
    ("PUT", "/api/projects/{pid}/", b'{"workflow": [{"federatedApp": {"id": 99999999999999999999}}]}'),
    ("GET", "/api/projects/abc/", None),
    ("GET", "/api/projects/99999999999999999999999/", None),
    ("POST", "/api/project-tokens/{pid}/", b'{"cmd": "delete"}'),
    ("POST", "/api/project-tokens/", b'{"token": null, "cmd": "join"}'),
    ("GET", "/api/localfc/relay/{pid}/1/?client=zzz", None),
    ("GET", "/api/localfc/relay/{pid}/1/?client=0123456789abcdef&wait=nan", None),
    ("POST", "/api/localfc/relay/{pid}/1/?sender=0123456789abcdef&destination=everyone", b"x"),
])
def test_malformed_input_is_422(world, method, path, body):
    headers = {**world["coord"], "Content-Type": "application/json"}
    rejected(world, method, path.format(pid=world["pid"]), 422, headers=headers, content=body)


def test_rule_violations_are_4xx_with_a_message(world):
    pid, coord = world["pid"], world["coord"]
    assert "library" in rejected(world, "PUT", f"/api/projects/{pid}/", 400, headers=coord,
                                 json={"status": "ready", "workflow": [{"federatedApp": {"id": 2}, "order": 0}]})
    assert "does not exist" in rejected(world, "PUT", f"/api/projects/{pid}/", 400, headers=coord,
                                        json={"workflow": [{"federatedApp": {"id": 4242}}]})
    assert "prepare" in rejected(world, "POST", f"/api/localfc/projects/{pid}/finalize/", 409, headers=coord)
    assert "no run" in rejected(world, "PUT", f"/api/localfc/projects/{pid}/runs/1/", 404, headers=coord,
                                json={"status": "finished", "step": 1, "message": ""})
    assert "no run" in rejected(world, "GET", f"/api/localfc/relay/{pid}/1/?client=0123456789abcdef",
                                404, headers=coord)
    rejected(world, "POST", "/api/apps/4242/purchase/", 404, headers=coord)
    rejected(world, "DELETE", "/api/apps/2/purchase/", 404, headers=coord)
    rejected(world, "POST", "/api/auth/user/signup/", 409, json={
        "email": "coord@example.org", "password": "another one", "firstName": "x", "lastName": "y"})


def test_unusable_database_or_port_is_one_line_and_exit_2(tmp_path, world):
    bad = tmp_path / "not-a-db.sqlite3"
    bad.write_text("this is not SQLite")
    busy_port = str(world["hub"].port)
    for args in (["--port", "0", "--db", str(bad)], ["--port", busy_port, "--db", str(tmp_path / "ok.sqlite3")]):
        done = subprocess.run([sys.executable, "-m", "fedsim_runner", "hub", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert ("--db" in done.stderr) if args[-1] == str(bad) else ("--port" in done.stderr)
    assert bad.read_text() == "this is not SQLite"
