"""The localfc hub as a real process, driven by the `api` driver: the whole website flow of FEATURECLOUD.md §2, restart
persistence, the controllers' run bookkeeping and the relay (docs/internals.md "localfc hub ↔ controller")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fedsim_runner.backoff import wait_until
from fedsim_runner.featurecloud.api import FeatureCloudClient, FeatureCloudError
from tests.conftest import CHROMIUM, REPO, free_port, needs_chromium

pytestmark = pytest.mark.e2e
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


class HubProcess:
    """`python -m fedsim_runner hub` on a free loopback port with its own SQLite file; restartable."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = db.with_suffix(".log")
        self.process: subprocess.Popen | None = None

    def start(self) -> HubProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "fedsim_runner", "hub", "--port", str(self.port),
                                         "--db", str(self.db)], cwd=REPO, env=env, stdout=self.log.open("ab"),
                                        stderr=subprocess.STDOUT)
        assert wait_until(self._up, 60), f"hub did not come up:\n{self.log.read_text()[-3000:]}"
        return self

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"hub exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(self.url + "/api/apps/", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self, username: str | None = None, password: str | None = None) -> FeatureCloudClient:
        client = FeatureCloudClient(self.url)
        if username:
            client.login(username, password)
        return client


@pytest.fixture
def hub(tmp_path):
    h = HubProcess(tmp_path / "hub.sqlite3").start()
    yield h
    h.stop()


def sign_up(hub: HubProcess, name: str, site: bool = True) -> FeatureCloudClient:
    email, password = f"{name}@example.org", f"pw-{name}-secret"
    hub.client().signup(email, password, first_name=name, last_name="Tester")
    client = hub.client(email, password)
    if site:
        client.create_site(f"site-{name}", organization="FedSim tests", city="Hamburg", country="DE")
    return client


def project_with_members(hub: HubProcess, names=("coord", "p1", "p2"), slug="federated-svd"):
    """Coordinator with the app in its library, a ready project with that workflow, every other user joined."""
    clients = [sign_up(hub, n) for n in names]
    coord = clients[0]
    app_id = coord.app_by_slug(slug)["id"]
    coord.purchase_app(app_id)
    pid = coord.create_project("study", "hub test")["id"]
    coord.set_workflow(pid, [app_id])
    for participant in clients[1:]:
        participant.join_project(coord.create_token(pid)["token"])
    return pid, clients


def start_run(pid: int, clients: list[FeatureCloudClient]) -> int:
    clients[0].set_project_status(pid, "prepare")
    for c in clients:
        c.finalize(pid)
    info = clients[0].run_info(pid)
    assert info["status"] == "running" and clients[0].project(pid)["status"] == "running"
    return info["runNr"]


def test_whole_api_flow_survives_a_restart(hub):
    apps = hub.client().apps()
    slugs = {a["slug"] for a in apps}
    assert {"federated-svd", "mean-app"} <= slugs
    coord, p1, p2 = (sign_up(hub, n) for n in ("coord", "p1", "p2"))
    assert coord.user_info()["email"] == "coord@example.org"
    svd = coord.app_by_slug("federated-svd")
    assert coord.library() == []
    coord.purchase_app(svd["id"])
    assert [a["slug"] for a in coord.library()] == ["federated-svd"]

    created = coord.create_project("svd study", "three sites")
    pid = created["id"]
    assert created["status"] == "init" and created["role"] == "coordinator"
    ready = coord.set_workflow(pid, [svd["id"]])
    assert ready["status"] == "ready" and ready["workflow"][0]["federatedApp"]["id"] == svd["id"]
    tokens = [coord.create_token(pid) for _ in range(2)]
    assert len({t["token"] for t in tokens}) == 2 and all(t["project"] == pid for t in tokens)
    assert p1.join_project(tokens[0]["token"])["id"] == pid
    assert p2.join_project(tokens[1]["token"])["id"] == pid
    assert p1.project(pid)["role"] == "participant"

    with pytest.raises(FeatureCloudError) as refused:
        p1.set_project_status(pid, "prepare")
    assert refused.value.status == 403 and "coordinator" in refused.value.message
    assert coord.set_project_status(pid, "prepare")["status"] == "prepare"
    client_ids = {m["clientId"] for m in coord.run_info(pid)["members"]}
    assert len(client_ids) == 3 and all(len(c) == 16 and int(c, 16) >= 0 for c in client_ids)

    hub.stop()
    hub.start()

    # the old access token still works: the signing secret lives in the database
    project = coord.project(pid)
    assert project["status"] == "prepare" and project["members"] == 3 and project["role"] == "coordinator"
    again = hub.client("p2@example.org", "pw-p2-secret")
    assert again.project(pid)["role"] == "participant"
    assert [p["id"] for p in again.projects()] == [pid]
    assert again.site()["name"] == "site-p2"
    assert [a["slug"] for a in coord.library()] == ["federated-svd"]
    assert {m["clientId"] for m in coord.run_info(pid)["members"]} == client_ids
    assert [t["used"] for t in httpx.get(f"{hub.url}/api/project-tokens/{pid}/", headers={
        "Authorization": f"Bearer {coord._access}"}).json()] == [True, True]
    assert hub.client().apps() == apps


def test_runs_move_through_the_state_machine(hub):
    pid, (coord, p1, p2) = project_with_members(hub)
    coord.set_project_status(pid, "prepare")
    coord.finalize(pid)
    p1.finalize(pid)
    assert sorted(m["finalized"] for m in coord.run_info(pid)["members"]) == [False, True, True]
    assert coord.project(pid)["status"] == "prepare"
    p2.finalize(pid)
    info = p1.run_info(pid)
    assert (info["runNr"], info["status"]) == (1, "running")
    assert info["clientId"] != info["coordinatorId"] and info["clients"][0] == info["coordinatorId"]
    assert info["workflow"] == [{"order": 0, "appId": coord.app_by_slug("federated-svd")["id"],
                                 "slug": "federated-svd"}]

    assert p1.report_run(pid, 1, "finished", 1)["status"] == "running"  # only the coordinator's finish ends it
    assert coord.report_run(pid, 1, "finished", 1)["status"] == "finished"
    with pytest.raises(FeatureCloudError) as busy:
        coord.set_project_status(pid, "prepare")
    assert busy.value.status == 409

    p1_id = p1.run_info(pid)["clientId"]
    coord.relay_send(pid, 1, info["coordinatorId"], p1_id, b"left over")  # the finished run's relay still works
    assert coord.set_project_status(pid, "ready")["status"] == "ready"  # reset a finished project
    assert p1.relay_receive(pid, 1, p1_id) is None  # … and a reset drops what the old run left undelivered
    assert start_run(pid, [coord, p1, p2]) == 2
    assert p2.report_run(pid, 2, "error", 1, "Traceback: boom")["status"] == "error"
    assert coord.set_project_status(pid, "ready")["status"] == "ready"
    assert start_run(pid, [coord, p1, p2]) == 3
    assert coord.set_project_status(pid, "shutdown")["status"] == "stopped"
    assert coord.run_info(pid)["status"] == "stopped"
    with pytest.raises(FeatureCloudError) as closed:
        p1.finalize(pid)
    assert closed.value.status == 409 and "prepare" in closed.value.message


def test_relay_unicast_broadcast_coordinator_and_order(hub):
    pid, clients = project_with_members(hub)
    run = start_run(pid, clients)
    info = [c.run_info(pid) for c in clients]
    ids = [i["clientId"] for i in info]
    coord, p1, p2 = clients

    p1.relay_send(pid, run, ids[1], ids[2], b"to p2", memo="r1")
    got = p2.relay_receive(pid, run, ids[2], wait=5)
    assert (got.body, got.sender, got.memo) == (b"to p2", ids[1], "r1")
    assert p2.relay_receive(pid, run, ids[2], wait=0) is None  # delivered once

    coord.relay_send(pid, run, ids[0], "all", b"\x00broadcast\xff")
    for c, cid in zip(clients[1:], ids[1:], strict=True):
        message = c.relay_receive(pid, run, cid, wait=5)
        assert message.body == b"\x00broadcast\xff" and message.memo is None and message.sender == ids[0]
    assert coord.relay_receive(pid, run, ids[0]) is None  # not echoed to the sender

    for k in range(3):
        p2.relay_send(pid, run, ids[2], "coordinator", f"m{k}".encode(), memo=f"round {k}")
    received = [coord.relay_receive(pid, run, ids[0], wait=5) for _ in range(3)]
    assert [m.body for m in received] == [b"m0", b"m1", b"m2"]
    assert [m.seq for m in received] == sorted(m.seq for m in received)

    with pytest.raises(FeatureCloudError) as foreign:
        p1.relay_receive(pid, run, ids[2])
    assert foreign.value.status == 403
    with pytest.raises(FeatureCloudError) as spoofed:
        p1.relay_send(pid, run, ids[2], ids[0], b"as someone else")
    assert spoofed.value.status == 403


def test_relay_long_poll_waits_and_wakes(hub):
    pid, clients = project_with_members(hub, names=("coord", "p1"))
    run = start_run(pid, clients)
    coord_id = clients[0].run_info(pid)["clientId"]
    p1_id = clients[1].run_info(pid)["clientId"]

    started = time.monotonic()
    assert clients[0].relay_receive(pid, run, coord_id, wait=0.5) is None
    assert time.monotonic() - started >= 0.45  # a long poll, not an immediate 204

    got: list = []
    waiter = threading.Thread(target=lambda: got.append(clients[0].relay_receive(pid, run, coord_id, wait=20)))
    started = time.monotonic()
    waiter.start()
    clients[1].relay_send(pid, run, p1_id, "coordinator", b"late data")
    waiter.join(timeout=15)
    assert not waiter.is_alive() and got[0].body == b"late data"
    assert time.monotonic() - started < 10  # woken by the send, not by the end of the 20 s poll


def test_smpc_sums_every_clients_payload_once(hub):
    pid, clients = project_with_members(hub)
    run = start_run(pid, clients)
    ids = [c.run_info(pid)["clientId"] for c in clients]
    payloads = [[[1, 2], 3.5], [[10, 20], 0.5], [[100, 200], -4]]
    for c, cid, value in zip(clients[1:], ids[1:], payloads[1:], strict=True):
        c.relay_send(pid, run, cid, "coordinator", json.dumps(value).encode(), memo="sum1", smpc=True)
    assert clients[0].relay_receive(pid, run, ids[0], wait=0.2) is None  # the coordinator's share is missing
    clients[0].relay_send(pid, run, ids[0], "coordinator", json.dumps(payloads[0]).encode(), memo="sum1", smpc=True)
    total = clients[0].relay_receive(pid, run, ids[0], wait=5)
    assert json.loads(total.body) == [[111, 222], 0.0] and total.sender == ids[0] and total.memo == "sum1"
    assert clients[0].relay_receive(pid, run, ids[0], wait=0) is None
    for c, cid in zip(clients[1:], ids[1:], strict=True):
        assert c.relay_receive(pid, run, cid, wait=0) is None  # only the coordinator gets the aggregate
    with pytest.raises(FeatureCloudError) as bad:
        clients[1].relay_send(pid, run, ids[1], "coordinator", b"not json", memo="sum2", smpc=True)
    assert bad.value.status == 400

    # objects sum key by key; a share of another shape is refused (400) and can be sent again correctly
    clients[0].relay_send(pid, run, ids[0], "coordinator", b'{"n": 1, "s": [1, 1]}', memo="sum3", smpc=True)
    clients[1].relay_send(pid, run, ids[1], "coordinator", b'{"n": 2, "s": [2, 2]}', memo="sum3", smpc=True)
    with pytest.raises(FeatureCloudError) as shape:
        clients[2].relay_send(pid, run, ids[2], "coordinator", b'{"n": 3, "s": [3]}', memo="sum3", smpc=True)
    assert shape.value.status == 400 and "shape" in shape.value.message
    clients[2].relay_send(pid, run, ids[2], "coordinator", b'{"n": 3, "s": [3, 3]}', memo="sum3", smpc=True)
    assert json.loads(clients[0].relay_receive(pid, run, ids[0], wait=5).body) == {"n": 6, "s": [6, 6]}


def test_hub_listens_on_every_given_address(tmp_path):
    port = free_port()
    log = tmp_path / "hub.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    process = subprocess.Popen([sys.executable, "-m", "fedsim_runner", "hub", "--host", "127.0.0.1", "--host",
                                "127.0.0.2", "--port", str(port), "--db", str(tmp_path / "h.db")], cwd=REPO, env=env,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        def up(host: str) -> bool:
            try:
                return httpx.get(f"http://{host}:{port}/api/apps/", timeout=2).status_code == 200
            except httpx.TransportError:
                assert process.poll() is None, log.read_text()
                return False
        assert wait_until(lambda: up("127.0.0.1"), 60) and up("127.0.0.2")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)


@pytest.mark.browser
@needs_chromium
def test_gui_login_token_join_and_start(hub):
    from playwright.sync_api import expect, sync_playwright

    coord, member = sign_up(hub, "coord"), sign_up(hub, "member")
    app_id = coord.app_by_slug("mean-app")["id"]
    coord.purchase_app(app_id)
    pid = coord.create_project("gui study", "through the web GUI")["id"]
    coord.set_workflow(pid, [app_id])
    coord.heartbeat()  # what the coordinator's controller does

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            def logged_in(email: str, password: str):
                page = browser.new_context().new_page()
                page.goto(f"{hub.url}/account?p=login")
                page.fill("#loginEmail", email)
                page.fill("#loginPassword", password)
                page.get_by_role("button", name="Log in").click()
                expect(page).to_have_url(f"{hub.url}/projects")
                return page

            wrong = browser.new_context().new_page()
            wrong.goto(f"{hub.url}/account?p=login")
            wrong.fill("#loginEmail", "coord@example.org")
            wrong.fill("#loginPassword", "not the password")
            wrong.get_by_role("button", name="Log in").click()
            expect(wrong.locator("#error")).to_contain_text("Wrong e-mail or password")

            page = logged_in("coord@example.org", "pw-coord-secret")
            page.get_by_role("link", name="gui study").click()
            expect(page.locator("#status")).to_have_text("ready")
            page.get_by_role("button", name="Create token").click()
            token = page.locator("code.token").first.inner_text()
            assert token

            other = logged_in("member@example.org", "pw-member-secret")
            other.fill("#joinToken", token)
            other.get_by_role("button", name="Join").click()
            expect(other).to_have_url(f"{hub.url}/project/{pid}")
            expect(other.locator("#role")).to_have_text("participant")
            expect(other.get_by_role("button", name="Start")).to_have_count(0)

            page.reload()
            expect(page.locator("#tokens")).to_contain_text("used by member@example.org")
            page.get_by_role("button", name="Start").click()
            expect(page.locator("#status")).to_have_text("prepare")
            assert member.project(pid)["status"] == "prepare"
            expect(page.locator("#upload")).to_be_visible()
            expect(page.get_by_role("button", name="Upload")).to_be_visible()
            expect(page.get_by_role("button", name="Yes")).to_be_hidden()
            page.get_by_role("button", name="Continue workflow").click()
            expect(page.get_by_role("button", name="Yes")).to_be_visible()

            page.goto(f"{hub.url}/controller")
            for text in ("Online", "Docker is available", "Site is registered"):
                expect(page.get_by_text(text)).to_have_count(1)
            other.goto(f"{hub.url}/controller")  # its controller never sent a heartbeat
            expect(other.get_by_text("Online", exact=True)).to_have_count(0)
            expect(other.get_by_text("Site is registered")).to_have_count(1)
        finally:
            browser.close()


class UploadRecorder:
    """A stand-in for the participant's controller that only records /file-upload/ calls (with CORS, as the page's
    script posts cross-origin from the hub's page to the controller)."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlsplit

        self.calls: list[tuple[dict, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _cors(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Access-Control-Allow-Origin", "*")
                self.send_header("Access-Control-Allow-Methods", "POST")
                self.send_header("Access-Control-Allow-Headers", "*")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def do_OPTIONS(self) -> None:
                self._cors(204)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}
                outer.calls.append((query, body))
                self._cors(200)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.browser
@needs_chromium
def test_gui_upload_posts_files_to_the_participants_controller(hub, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    pid, (coord, member) = project_with_members(hub, names=("coord", "member"), slug="mean-app")
    coord.set_project_status(pid, "prepare")
    data = tmp_path / "data.csv"
    data.write_text("1,2,3")
    controller = UploadRecorder()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_context().new_page()
                page.goto(f"{hub.url}/account?p=login")
                page.fill("#loginEmail", "member@example.org")
                page.fill("#loginPassword", "pw-member-secret")
                page.get_by_role("button", name="Log in").click()
                page.goto(f"{hub.url}/project/{pid}?controller={controller.url}")
                page.set_input_files("#upload", str(data))
                page.get_by_role("button", name="Upload").click()
                expect(page.locator("#uploadStatus")).to_have_text("Uploaded 1 file(s).")
                page.get_by_role("button", name="Continue workflow").click()
                page.get_by_role("button", name="Yes").click()
                expect(page.locator("#uploadStatus")).to_contain_text("Finalised")
            finally:
                browser.close()
    finally:
        controller.close()
    (upload, body), (final, empty) = controller.calls
    assert upload == {"projectId": str(pid), "consent": "true", "fileName": "data.csv", "finalize": "false"}
    assert body == b"1,2,3"
    assert final["finalize"] == "true" and final["fileName"] == "" and empty == b""


def test_parallel_finalisations_start_exactly_one_run(hub):
    from concurrent.futures import ThreadPoolExecutor

    names = [f"site{i}" for i in range(8)]
    pid, clients = project_with_members(hub, names=names)
    clients[0].set_project_status(pid, "prepare")
    with ThreadPoolExecutor(len(clients)) as pool:
        answers = list(pool.map(lambda c: c.finalize(pid), clients))
    assert [a["runNr"] for a in answers if a["runNr"] is not None] == [1]
    assert clients[3].run_info(pid)["runNr"] == 1 and clients[0].project(pid)["status"] == "running"
