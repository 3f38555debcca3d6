"""The localfc hub: an offline featurecloud.ai (FEATURECLOUD.md §2) — REST API, web GUI and the controllers' relay.

One uvicorn process, state in SQLite (hub_db.py). Every handler is `async` and runs on the event loop thread, so each
request's database work is one short transaction; only password hashing goes to a worker thread, and relay long polls
wait on asyncio events, never on the database.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import jwt
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from fedsim_runner.errors import ConfigError
from fedsim_runner.localfc import store_slugs
from fedsim_runner.localfc.hub_db import HubDB, check_password, hash_password, now

ACCESS_TTL = 3600.0  # s; the real site's access tokens are short-lived too (refresh on 401)
REFRESH_TTL = 7 * 24 * 3600.0
SESSION_TTL = 12 * 3600.0
ONLINE_WITHIN = 30.0  # s since the controller's last heartbeat for the /controller page to say "Online"
MAX_WAIT = 30.0  # s, the longest relay long poll
SESSION_COOKIE = "localfc_session"
FINAL = ("finished", "error", "failed", "stopped")
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def _encodable(value: str) -> str:
    """Reject lone surrogates (valid JSON, not storable as UTF-8) with a 422 instead of a crash."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid UTF-8 (no lone surrogates)") from None
    return value


Text = Annotated[str, StringConstraints(max_length=1000), AfterValidator(_encodable)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True),
                 AfterValidator(_encodable)]
Email = Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+$", max_length=254), AfterValidator(_encodable)]
Password = Annotated[str, StringConstraints(min_length=8, max_length=200), AfterValidator(_encodable)]
Number = Annotated[int, Field(ge=0, le=2**31)]
ProjectId = Annotated[int, PathParam(ge=1, le=2**53)]
ClientId = Annotated[str, Query(pattern=r"^[0-9a-f]{16}$")]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LoginIn(Body):
    username: Text
    password: Text


class RefreshIn(Body):
    refresh: Annotated[str, StringConstraints(max_length=4000), AfterValidator(_encodable)]


class SignupIn(Body):
    email: Email
    password: Password
    firstName: Name
    lastName: Name
    role: Literal["user"] = "user"


class SiteIn(Body):
    name: Name
    organization: Text = ""
    address: Text = ""
    zip: Text = ""
    city: Text = ""
    country: Text = ""
    firstName: Text = ""
    lastName: Text = ""
    phone: Text = ""


class ProjectIn(Body):
    name: Name
    description: Text = ""
    status: Literal[""] = ""


class AppRef(Body):
    id: Number


class WorkflowStepIn(Body):
    id: Number | None = 0
    projectId: Number | None = None
    federatedApp: AppRef
    order: Number = 0
    versionCertificationLevel: Number = 1


class ProjectUpdate(Body):
    id: Number | None = None
    name: Name | None = None
    description: Text | None = None
    status: Literal["ready", "prepare", "shutdown"] | None = None
    workflow: Annotated[list[WorkflowStepIn], Field(max_length=20)] | None = None


class TokenCreate(Body):
    cmd: Literal["create"]


class TokenJoin(Body):
    token: Text
    cmd: Literal["join"]


class RunReport(Body):
    status: Literal["finished", "error"]
    step: Number = 0
    message: Annotated[str, StringConstraints(max_length=20000), AfterValidator(_encodable)] = ""


def iso(timestamp: float | None) -> str | None:
    """Times in answers as the real site gives them: ISO 8601, UTC."""
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _bad(status: int, message: str) -> HTTPException:
    return HTTPException(status, message)


def element_sum(a: Any, b: Any) -> Any:
    """Element-wise sum of two JSON values of the same shape (numbers, lists, objects with the same keys)."""
    if isinstance(a, bool) or isinstance(b, bool):
        raise ValueError("SMPC payloads hold numbers, lists and objects, not booleans")
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a + b
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [element_sum(x, y) for x, y in zip(a, b, strict=True)]
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: element_sum(a[k], b[k]) for k in a}
    raise ValueError("SMPC payloads of the clients differ in shape")


class Hub:
    """The hub's rules on top of the database: auth, membership, the project state machine, runs and the relay."""

    def __init__(self, db: HubDB) -> None:
        self.db = db
        self.secret = db.meta("jwt_secret")
        self.inbox_events: dict[tuple[int, int, str], asyncio.Event] = {}

    # --- auth -------------------------------------------------------------------------------------------------
    def issue(self, user_id: int, kind: str, ttl: float) -> str:
        t = int(time.time())
        return jwt.encode({"sub": str(user_id), "type": kind, "iat": t, "exp": int(t + ttl),
                           "jti": secrets.token_hex(8)}, self.secret, algorithm="HS256")

    def user_from_token(self, token: str, kind: str) -> dict:
        try:
            claims = jwt.decode(token, self.secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise self.unauthorized(f"the {kind} token has expired; log in again") from None
        except jwt.PyJWTError:
            raise self.unauthorized(f"the {kind} token is invalid; log in again") from None
        row = self.db.one("SELECT * FROM users WHERE id = ?", int(claims["sub"])) if \
            claims.get("type") == kind and str(claims.get("sub", "")).isdigit() else None
        if row is None:
            raise self.unauthorized(f"the {kind} token is invalid; log in again")
        return dict(row)

    async def check_login(self, username: str, password: str) -> dict | None:
        """The user with this e-mail and password, or None (hashing runs off the event loop)."""
        row = self.db.one("SELECT * FROM users WHERE email = ?", username)
        if row is None or not await asyncio.to_thread(check_password, password, row["password_hash"]):
            return None
        return dict(row)

    @staticmethod
    def unauthorized(message: str) -> HTTPException:
        return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})

    # --- projects -----------------------------------------------------------------------------------------------
    def project_of(self, pid: int, user: dict) -> dict:
        """The project if `user` is a member; 404 otherwise (others' projects are not revealed)."""
        row = self.db.one("SELECT p.* FROM projects p JOIN members m ON m.project_id = p.id "
                          "WHERE p.id = ? AND m.user_id = ?", pid, user["id"])
        if row is None:
            raise _bad(404, f"project {pid} not found (or you are not a member of it)")
        return dict(row)

    def coordinated(self, pid: int, user: dict) -> dict:
        project = self.project_of(pid, user)
        if project["owner_id"] != user["id"]:
            raise _bad(403, f"only the coordinator (the creator) of project {pid} may do this")
        return project

    def project_json(self, project: dict, user: dict) -> dict:
        pid = project["id"]
        steps = self.db.all("SELECT w.*, a.slug, a.name FROM workflow_steps w JOIN apps a ON a.id = w.app_id "
                            "WHERE w.project_id = ? ORDER BY w.step_order", pid)
        extra = self.db.one("SELECT (SELECT email FROM users WHERE id = ?) AS owner, "
                            "(SELECT MAX(run_nr) FROM runs WHERE project_id = ?) AS run_nr, "
                            "(SELECT COUNT(*) FROM members WHERE project_id = ?) AS members",
                            project["owner_id"], pid, pid)
        return {
            "id": pid, "name": project["name"], "description": project["description"], "status": project["status"],
            "role": "coordinator" if project["owner_id"] == user["id"] else "participant",
            "coordinator": extra["owner"], "members": extra["members"], "runNr": extra["run_nr"],
            "createdAt": iso(project["created"]), "updatedAt": iso(project["updated"]),
            "workflow": [{"id": s["step_order"], "projectId": pid, "order": s["step_order"],
                          "federatedApp": {"id": s["app_id"], "slug": s["slug"], "name": s["name"]},
                          "versionCertificationLevel": s["certification_level"]} for s in steps],
        }

    def set_status(self, project: dict, status: str) -> None:
        """PUT status (coordinator, already checked): the state machine of FEATURECLOUD.md §2."""
        pid, current = project["id"], project["status"]
        c = self.db.conn
        if status == "ready":
            if current in ("prepare", "running"):
                raise _bad(409, f"project {pid} is {current!r}: shut it down first (status 'shutdown')")
            if not self.db.one("SELECT 1 FROM workflow_steps WHERE project_id = ?", pid):
                raise _bad(409, f"project {pid} has no workflow yet: PUT a workflow with at least one app")
            target = "ready"
        elif status == "prepare":
            if current not in ("ready", "prepare"):
                raise _bad(409, f"project {pid} is {current!r}: only a 'ready' project can be started "
                                "(PUT status 'ready' first)")
            target = "prepare"
        else:  # shutdown
            if current not in ("ready", "prepare", "running", "stopped"):
                raise _bad(409, f"project {pid} is {current!r}: only a ready, preparing or running project can "
                                "be shut down")
            target = "stopped"
            c.execute("UPDATE runs SET status = 'stopped', ended = ? WHERE project_id = ? AND status = 'running'",
                      (now(), pid))
        if target != current:
            c.execute("UPDATE members SET finalized = 0 WHERE project_id = ?", (pid,))
        if target == "ready":  # a new run will start: what earlier runs left undelivered is of no use any more
            c.execute("DELETE FROM relay WHERE project_id = ?", (pid,))
            c.execute("DELETE FROM smpc WHERE project_id = ?", (pid,))
        c.execute("UPDATE projects SET status = ?, updated = ? WHERE id = ?", (target, now(), pid))

    def set_workflow(self, project: dict, steps: list[WorkflowStepIn], user: dict) -> None:
        pid = project["id"]
        if project["status"] in ("prepare", "running"):
            raise _bad(409, f"project {pid} is {project['status']!r}: the workflow can change only before it "
                            "starts or after it ended")
        orders = [s.order for s in steps]
        if len(set(orders)) != len(orders):
            raise _bad(400, "workflow: every step needs its own 'order'")
        c = self.db.conn
        c.execute("DELETE FROM workflow_steps WHERE project_id = ?", (pid,))
        for step in steps:
            app_id = step.federatedApp.id
            if not self.db.one("SELECT 1 FROM apps WHERE id = ?", app_id):
                raise _bad(400, f"workflow: app {app_id} does not exist (GET /api/apps/ lists the app store)")
            if not self.db.one("SELECT 1 FROM library WHERE user_id = ? AND app_id = ?", user["id"], app_id):
                raise _bad(400, f"workflow: app {app_id} is not in your library; POST /api/apps/{app_id}/purchase/ "
                                "first")
            c.execute("INSERT INTO workflow_steps VALUES (?, ?, ?, ?)",
                      (pid, step.order, app_id, step.versionCertificationLevel))
        if not steps and project["status"] != "init":
            c.execute("UPDATE projects SET status = 'init' WHERE id = ?", (pid,))

    def join(self, token: str, user: dict) -> dict:
        row = self.db.one("SELECT * FROM tokens WHERE token = ?", token)
        if row is None:
            raise _bad(404, "project token not found; ask the coordinator for a token of the project")
        if row["used_by"] is not None:
            raise _bad(409, "project token already used; each token admits one participant once: ask the "
                            "coordinator for a new one")
        pid = row["project_id"]
        if self.db.one("SELECT 1 FROM members WHERE project_id = ? AND user_id = ?", pid, user["id"]):
            raise _bad(409, f"you are already a member of project {pid}; the token stays unused")
        project = dict(self.db.one("SELECT * FROM projects WHERE id = ?", pid))
        if project["status"] in ("prepare", "running"):
            raise _bad(409, f"project {pid} is {project['status']!r}: join before the coordinator starts it")
        self.db.conn.execute("UPDATE tokens SET used_by = ?, used_at = ? WHERE id = ?", (user["id"], now(), row["id"]))
        self.db.conn.execute("INSERT INTO members (project_id, user_id, client_id, joined) VALUES (?, ?, ?, ?)",
                             (pid, user["id"], self.db.new_client_id(), now()))
        return project

    def create_token(self, pid: int) -> dict:
        token = secrets.token_urlsafe(18)
        cur = self.db.conn.execute("INSERT INTO tokens (project_id, token, created) VALUES (?, ?, ?)",
                                   (pid, token, now()))
        return self.token_json(self.db.one("SELECT * FROM tokens WHERE id = ?", cur.lastrowid))

    def token_json(self, row) -> dict:
        used = self.db.one("SELECT email FROM users WHERE id = ?", row["used_by"]) if row["used_by"] else None
        return {"id": row["id"], "token": row["token"], "project": row["project_id"], "createdAt": iso(row["created"]),
                "used": row["used_by"] is not None, "usedBy": used["email"] if used else None}

    # --- runs and relay -------------------------------------------------------------------------------------------
    def members(self, pid: int) -> list[dict]:
        """Members with their client ids, the coordinator first, then in joining order."""
        return [dict(r) for r in self.db.all(
            "SELECT m.*, u.email, s.name AS site FROM members m JOIN users u ON u.id = m.user_id "
            "JOIN projects p ON p.id = m.project_id LEFT JOIN sites s ON s.user_id = m.user_id "
            "WHERE m.project_id = ? ORDER BY m.user_id != p.owner_id, m.joined, m.user_id", pid)]

    def client_ids(self, pid: int) -> list[str]:
        """The project's client ids in the order of members(): the coordinator's first."""
        return [r["client_id"] for r in self.db.all(
            "SELECT m.client_id FROM members m JOIN projects p ON p.id = m.project_id WHERE m.project_id = ? "
            "ORDER BY m.user_id != p.owner_id, m.joined, m.user_id", pid)]

    def client_id(self, pid: int, user: dict) -> str:
        return self.db.one("SELECT client_id FROM members WHERE project_id = ? AND user_id = ?", pid,
                           user["id"])["client_id"]

    def run_of(self, pid: int, run_nr: int) -> dict:
        row = self.db.one("SELECT * FROM runs WHERE project_id = ? AND run_nr = ?", pid, run_nr)
        if row is None:
            raise _bad(404, f"project {pid} has no run {run_nr}")
        return dict(row)

    def finalize(self, project: dict, user: dict) -> dict:
        pid = project["id"]
        if project["status"] != "prepare":
            raise _bad(409, f"project {pid} is {project['status']!r}: uploads are finalised only in 'prepare'")
        c = self.db.conn
        c.execute("UPDATE members SET finalized = 1 WHERE project_id = ? AND user_id = ?", (pid, user["id"]))
        pending = self.db.one("SELECT COUNT(*) AS n FROM members WHERE project_id = ? AND finalized = 0", pid)["n"]
        run_nr = None
        if pending == 0:
            run_nr = (self.db.one("SELECT MAX(run_nr) AS nr FROM runs WHERE project_id = ?", pid)["nr"] or 0) + 1
            c.execute("INSERT INTO runs (project_id, run_nr, status, started) VALUES (?, ?, 'running', ?)",
                      (pid, run_nr, now()))
            c.execute("UPDATE projects SET status = 'running', updated = ? WHERE id = ?", (now(), pid))
        status = self.db.one("SELECT status FROM projects WHERE id = ?", pid)["status"]
        return {"projectId": pid, "finalized": True, "pending": pending, "status": status, "runNr": run_nr}

    def run_info(self, project: dict, user: dict) -> dict:
        pid = project["id"]
        members = self.members(pid)
        run = self.db.one("SELECT * FROM runs WHERE project_id = ? ORDER BY run_nr DESC LIMIT 1", pid)
        steps = self.db.all("SELECT w.step_order, w.app_id, a.slug FROM workflow_steps w JOIN apps a "
                            "ON a.id = w.app_id WHERE w.project_id = ? ORDER BY w.step_order", pid)
        return {
            "projectId": pid, "projectStatus": project["status"],
            "runNr": run["run_nr"] if run else None, "status": run["status"] if run else None,
            "clients": [m["client_id"] for m in members],
            "coordinatorId": next(m["client_id"] for m in members if m["user_id"] == project["owner_id"]),
            "clientId": self.client_id(pid, user),
            "workflow": [{"order": s["step_order"], "appId": s["app_id"], "slug": s["slug"]} for s in steps],
            "members": [{"clientId": m["client_id"], "username": m["email"], "site": m["site"],
                         "finalized": bool(m["finalized"])} for m in members],
        }

    def report(self, project: dict, run_nr: int, body: RunReport, user: dict) -> dict:
        """A site's outcome: any error fails the project; the coordinator's `finished` finishes it."""
        pid = project["id"]
        self.run_of(pid, run_nr)
        c = self.db.conn
        c.execute("INSERT OR REPLACE INTO run_reports VALUES (?, ?, ?, ?, ?, ?, ?)",
                  (pid, run_nr, user["id"], body.status, body.step, body.message, now()))
        latest = self.db.one("SELECT MAX(run_nr) AS nr FROM runs WHERE project_id = ?", pid)["nr"]
        if project["status"] == "running" and run_nr == latest:
            if body.status == "error" or project["owner_id"] == user["id"]:
                c.execute("UPDATE runs SET status = ?, ended = ?, step = ?, message = ? WHERE project_id = ? "
                          "AND run_nr = ?", (body.status, now(), body.step, body.message, pid, run_nr))
                c.execute("UPDATE projects SET status = ?, updated = ? WHERE id = ?", (body.status, now(), pid))
        status = self.db.one("SELECT status FROM projects WHERE id = ?", pid)["status"]
        return {"projectId": pid, "runNr": run_nr, "status": status}

    def relay_recipients(self, pid: int, sender: str, destination: str) -> list[str]:
        clients = self.client_ids(pid)
        if destination == "all":
            return [cid for cid in clients if cid != sender]
        if destination == "coordinator":
            return [clients[0]]
        if destination not in clients:
            raise _bad(400, f"destination {destination!r} is not a client of project {pid}; use a client id from "
                            "GET /api/localfc/projects/{pid}/run/, 'all' or 'coordinator'")
        return [destination]

    def enqueue(self, pid: int, run_nr: int, recipients: list[str], sender: str, memo: str | None,
                body: bytes) -> None:
        for recipient in recipients:
            self.db.conn.execute("INSERT INTO relay (project_id, run_nr, recipient, sender, memo, body, created) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)", (pid, run_nr, recipient, sender, memo, body, now()))

    def notify(self, pid: int, run_nr: int, recipients: list[str]) -> None:
        """Wake the long polls of these recipients (after the commit)."""
        for recipient in recipients:
            event = self.inbox_events.pop((pid, run_nr, recipient), None)
            if event is not None:
                event.set()

    def smpc_contribute(self, pid: int, run_nr: int, sender: str, memo: str | None, body: bytes) -> list[str]:
        """Keep one client's JSON payload; once every client sent for (run, memo), queue ONE sum for the
        coordinator. Returns the recipients queued (empty while contributions are missing)."""
        try:
            value = json.loads(body)
            element_sum(value, value)  # shape check: only numbers, lists and objects
        except (ValueError, RecursionError) as e:
            raise _bad(400, f"smpc=1 needs a JSON payload of numbers and (nested) lists: {e}") from None
        key = memo if memo is not None else ""
        c = self.db.conn
        c.execute("INSERT OR REPLACE INTO smpc VALUES (?, ?, ?, ?, ?)", (pid, run_nr, key, sender, body.decode()))
        rows = self.db.all("SELECT sender, body FROM smpc WHERE project_id = ? AND run_nr = ? AND memo = ? "
                           "ORDER BY sender", pid, run_nr, key)
        clients = self.client_ids(pid)
        if {r["sender"] for r in rows} != set(clients):
            return []
        try:
            total = json.loads(rows[0]["body"])
            for r in rows[1:]:
                total = element_sum(total, json.loads(r["body"]))
        except (ValueError, RecursionError) as e:
            raise _bad(400, f"smpc: cannot sum the clients' payloads for memo {memo!r}: {e}") from None
        c.execute("DELETE FROM smpc WHERE project_id = ? AND run_nr = ? AND memo = ?", (pid, run_nr, key))
        coordinator = clients[0]
        self.enqueue(pid, run_nr, [coordinator], coordinator, memo, json.dumps(total).encode())
        return [coordinator]


async def current_user(request: Request) -> dict:
    """The user of the request's Bearer access token; 401 when it is missing, expired or forged."""
    hub: Hub = request.app.state.hub
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise hub.unauthorized("not logged in: send 'Authorization: Bearer <access token>' (POST /api/auth/login/)")
    return hub.user_from_token(token.strip(), "access")


User = Annotated[dict, Depends(current_user)]


def create_app(db_path: Path) -> FastAPI:
    db = HubDB(db_path)
    db.seed_apps(store_slugs())
    hub = Hub(db)
    app = FastAPI(title="localfc hub", description="offline featurecloud.ai: REST API (FEATURECLOUD.md §2), "
                  "controller relay and web GUI", version="1")
    app.state.hub = hub

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> Response:
        """422 naming each bad field, without echoing the input (it may be a password or not even encodable)."""
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return Response(json.dumps({"detail": detail}), status_code=422, media_type="application/json")

    def user_json(u: dict) -> dict:
        return {"id": u["id"], "email": u["email"], "username": u["email"], "firstName": u["first_name"],
                "lastName": u["last_name"], "role": u["role"]}

    def site_json(s: dict) -> dict:
        return {"id": s["id"], "name": s["name"], "organization": s["organization"], "address": s["address"],
                "zip": s["zip"], "city": s["city"], "country": s["country"], "firstName": s["first_name"],
                "lastName": s["last_name"], "phone": s["phone"], "lastSeen": iso(s["last_seen"])}

    # --- auth and users ---------------------------------------------------------------------------------------
    @app.post("/api/auth/login/")
    async def login(body: LoginIn) -> dict:
        user = await hub.check_login(body.username, body.password)
        if user is None:
            raise hub.unauthorized("wrong e-mail or password")
        return {"access": hub.issue(user["id"], "access", ACCESS_TTL),
                "refresh": hub.issue(user["id"], "refresh", REFRESH_TTL)}

    @app.post("/api/auth/token/refresh/")
    async def refresh(body: RefreshIn) -> dict:
        user = hub.user_from_token(body.refresh, "refresh")
        return {"access": hub.issue(user["id"], "access", ACCESS_TTL)}

    @app.post("/api/auth/user/signup/", status_code=201)
    async def signup(body: SignupIn) -> dict:
        hashed = await asyncio.to_thread(hash_password, body.password)
        with db.tx() as c:
            if db.one("SELECT 1 FROM users WHERE email = ?", body.email):
                raise _bad(409, f"a user with the e-mail {body.email} already exists; log in instead")
            cur = c.execute("INSERT INTO users (email, password_hash, first_name, last_name, role, created) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (body.email, hashed, body.firstName, body.lastName,
                                                          body.role, now()))
        return user_json(dict(db.one("SELECT * FROM users WHERE id = ?", cur.lastrowid)))

    @app.get("/api/user/info/")
    async def user_info(user: User) -> dict:
        return user_json(user)

    # --- sites ---------------------------------------------------------------------------------------------------
    @app.get("/api/site/")
    async def get_site(user: User) -> dict:
        row = db.one("SELECT * FROM sites WHERE user_id = ?", user["id"])
        if row is None:
            raise _bad(404, "you have no site yet: POST /api/site/ to register one")
        return site_json(dict(row))

    @app.post("/api/site/")
    async def create_site(body: SiteIn, user: User) -> dict:
        values = (body.name, body.organization, body.address, body.zip, body.city, body.country, body.firstName,
                  body.lastName, body.phone)
        with db.tx() as c:
            if db.one("SELECT 1 FROM sites WHERE user_id = ?", user["id"]):
                c.execute("UPDATE sites SET name = ?, organization = ?, address = ?, zip = ?, city = ?, country = ?, "
                          "first_name = ?, last_name = ?, phone = ? WHERE user_id = ?", (*values, user["id"]))
            else:
                c.execute("INSERT INTO sites (name, organization, address, zip, city, country, first_name, "
                          "last_name, phone, user_id, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (*values, user["id"], now()))
        return site_json(dict(db.one("SELECT * FROM sites WHERE user_id = ?", user["id"])))

    # --- apps and library -------------------------------------------------------------------------------------
    def app_json(row) -> dict:
        return {"id": row["id"], "slug": row["slug"], "name": row["name"], "description": row["description"]}

    @app.get("/api/apps/")
    async def apps() -> list[dict]:
        return [app_json(r) for r in db.all("SELECT * FROM apps ORDER BY id")]

    @app.get("/api/apps/purchase/")
    async def library(user: User) -> list[dict]:
        return [app_json(r) for r in db.all("SELECT a.* FROM apps a JOIN library l ON l.app_id = a.id "
                                            "WHERE l.user_id = ? ORDER BY a.id", user["id"])]

    def store_app(app_id: int):
        row = db.one("SELECT * FROM apps WHERE id = ?", app_id)
        if row is None:
            raise _bad(404, f"app {app_id} does not exist (GET /api/apps/ lists the app store)")
        return row

    @app.post("/api/apps/{app_id}/purchase/")
    async def purchase(app_id: Annotated[int, PathParam(ge=0, le=2**53)], user: User) -> dict:
        row = store_app(app_id)
        with db.tx() as c:
            c.execute("INSERT OR IGNORE INTO library VALUES (?, ?, ?)", (user["id"], app_id, now()))
        return app_json(row)

    @app.delete("/api/apps/{app_id}/purchase/")
    async def remove(app_id: Annotated[int, PathParam(ge=0, le=2**53)], user: User) -> dict:
        row = store_app(app_id)
        with db.tx() as c:
            if c.execute("DELETE FROM library WHERE user_id = ? AND app_id = ?", (user["id"], app_id)).rowcount == 0:
                raise _bad(404, f"app {app_id} is not in your library")
        return app_json(row)

    # --- projects and tokens ------------------------------------------------------------------------------------
    @app.get("/api/projects/")
    async def projects(user: User) -> list[dict]:
        rows = db.all("SELECT p.* FROM projects p JOIN members m ON m.project_id = p.id WHERE m.user_id = ? "
                      "ORDER BY p.id", user["id"])
        return [hub.project_json(dict(r), user) for r in rows]

    @app.post("/api/projects/", status_code=201)
    async def create_project(body: ProjectIn, user: User) -> dict:
        with db.tx() as c:
            t = now()
            cur = c.execute("INSERT INTO projects (name, description, status, owner_id, created, updated) "
                            "VALUES (?, ?, 'init', ?, ?, ?)", (body.name, body.description, user["id"], t, t))
            c.execute("INSERT INTO members (project_id, user_id, client_id, joined) VALUES (?, ?, ?, ?)",
                      (cur.lastrowid, user["id"], db.new_client_id(), t))
        return hub.project_json(hub.project_of(cur.lastrowid, user), user)

    @app.get("/api/projects/{pid}/")
    async def project(pid: ProjectId, user: User) -> dict:
        return hub.project_json(hub.project_of(pid, user), user)

    @app.put("/api/projects/{pid}/")
    async def update_project(pid: ProjectId, body: ProjectUpdate, user: User) -> dict:
        with db.tx() as c:
            project = hub.coordinated(pid, user)
            if body.id is not None and body.id != pid:
                raise _bad(400, f"body id {body.id} does not match the project {pid} in the URL")
            if body.name is not None or body.description is not None:
                c.execute("UPDATE projects SET name = ?, description = ?, updated = ? WHERE id = ?",
                          (body.name or project["name"], project["description"] if body.description is None
                           else body.description, now(), pid))
            if body.workflow is not None:
                hub.set_workflow(project, body.workflow, user)
                project = hub.project_of(pid, user)
            if body.status is not None:
                hub.set_status(project, body.status)
        return hub.project_json(hub.project_of(pid, user), user)

    @app.get("/api/project-tokens/{pid}/")
    async def tokens(pid: ProjectId, user: User) -> list[dict]:
        hub.coordinated(pid, user)
        return [hub.token_json(r) for r in db.all("SELECT * FROM tokens WHERE project_id = ? ORDER BY id", pid)]

    @app.post("/api/project-tokens/{pid}/", status_code=201)
    async def create_token(pid: ProjectId, body: TokenCreate, user: User) -> dict:
        with db.tx():
            hub.coordinated(pid, user)
            return hub.create_token(pid)

    @app.post("/api/project-tokens/")
    async def join(body: TokenJoin, user: User) -> dict:
        with db.tx():
            project = hub.join(body.token, user)
        return hub.project_json(hub.project_of(project["id"], user), user)

    # --- localfc: controllers (docs/internals.md "localfc hub ↔ controller") -------------------------------------
    @app.post("/api/localfc/site/heartbeat/")
    async def heartbeat(user: User) -> dict:
        with db.tx() as c:
            if c.execute("UPDATE sites SET last_seen = ? WHERE user_id = ?", (now(), user["id"])).rowcount == 0:
                raise _bad(404, "you have no site yet: POST /api/site/ before the controller's heartbeat")
        return site_json(dict(db.one("SELECT * FROM sites WHERE user_id = ?", user["id"])))

    @app.post("/api/localfc/projects/{pid}/finalize/")
    async def finalize(pid: ProjectId, user: User) -> dict:
        with db.tx():
            return hub.finalize(hub.project_of(pid, user), user)

    @app.get("/api/localfc/projects/{pid}/run/")
    async def run_info(pid: ProjectId, user: User) -> dict:
        return hub.run_info(hub.project_of(pid, user), user)

    @app.put("/api/localfc/projects/{pid}/runs/{run_nr}/")
    async def report_run(pid: ProjectId, run_nr: Annotated[int, PathParam(ge=0, le=2**31)], body: RunReport,
                         user: User) -> dict:
        with db.tx():
            return hub.report(hub.project_of(pid, user), run_nr, body, user)

    relay_body = {"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                     "format": "binary"}}}}}

    @app.post("/api/localfc/relay/{pid}/{run_nr}/", openapi_extra=relay_body)
    async def relay_send(request: Request, pid: ProjectId, run_nr: Annotated[int, PathParam(ge=0, le=2**31)],
                         user: User, sender: ClientId,
                         destination: Annotated[str, Query(pattern=r"^([0-9a-f]{16}|all|coordinator)$")],
                         memo: Annotated[str | None, Query(pattern=r"^[\x20-\x7e]{0,200}$")] = None,
                         smpc: Annotated[int, Query(ge=0, le=1)] = 0) -> dict:
        payload = await request.body()
        with db.tx():
            hub.project_of(pid, user)
            hub.run_of(pid, run_nr)
            if sender != hub.client_id(pid, user):
                raise _bad(403, f"sender {sender} is not your client id in project {pid}")
            if smpc:
                recipients = hub.smpc_contribute(pid, run_nr, sender, memo, payload)
            else:
                recipients = hub.relay_recipients(pid, sender, destination)
                hub.enqueue(pid, run_nr, recipients, sender, memo, payload)
        hub.notify(pid, run_nr, recipients)
        return {"projectId": pid, "runNr": run_nr, "recipients": recipients, "bytes": len(payload)}

    @app.get("/api/localfc/relay/{pid}/{run_nr}/", responses={204: {"description": "nothing arrived in time"}})
    async def relay_receive(request: Request, pid: ProjectId, run_nr: Annotated[int, PathParam(ge=0, le=2**31)],
                            user: User, client: ClientId,
                            wait: Annotated[float, Query(ge=0, allow_inf_nan=False)] = 0.0) -> Response:
        hub.project_of(pid, user)
        hub.run_of(pid, run_nr)
        if client != hub.client_id(pid, user):
            raise _bad(403, f"client {client} is not your client id in project {pid}: you receive only your own "
                            "messages")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait, MAX_WAIT)
        key = (pid, run_nr, client)
        waited = False
        while True:
            row = db.one("SELECT * FROM relay WHERE project_id = ? AND run_nr = ? AND recipient = ? ORDER BY seq "
                         "LIMIT 1", pid, run_nr, client)
            if row is not None and waited and await request.is_disconnected():
                return Response(status_code=204)  # the poller gave up: keep the message for its next poll
            if row is not None:
                with db.tx() as c:
                    c.execute("DELETE FROM relay WHERE seq = ?", (row["seq"],))
                headers = {"X-FC-Sender": row["sender"], "X-FC-Seq": str(row["seq"])}
                if row["memo"] is not None:
                    headers["X-FC-Memo"] = row["memo"]
                return Response(row["body"], media_type="application/octet-stream", headers=headers)
            remaining = deadline - loop.time()
            if remaining <= 0 or await request.is_disconnected():
                return Response(status_code=204)
            event = hub.inbox_events.setdefault(key, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                pass
            waited = True

    add_gui(app, hub)
    return app


def add_gui(app: FastAPI, hub: Hub) -> None:
    """The web GUI (FEATURECLOUD.md §2 selectors), server-rendered, with a cookie session: the browser driver's site."""
    db = hub.db

    def session_user(request: Request) -> dict | None:
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        try:
            return hub.user_from_token(token, "session")
        except HTTPException:
            return None

    def page(request: Request, name: str, user: dict | None, status: int = 200, **context) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, name, {"user": user, **context}, status_code=status)

    def to_login() -> RedirectResponse:
        return RedirectResponse("/account?p=login", status_code=303)

    async def form_field(request: Request, name: str) -> str:
        value = (await request.form()).get(name)
        return value[:1000] if isinstance(value, str) else ""

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/projects", status_code=303)

    @app.get("/account", include_in_schema=False)
    async def account(request: Request, p: str = "login") -> Response:
        if p == "logout":
            response = to_login()
            response.delete_cookie(SESSION_COOKIE)
            return response
        return page(request, "login.html", session_user(request))

    @app.post("/account", include_in_schema=False)
    async def account_login(request: Request) -> Response:
        email = await form_field(request, "loginEmail")
        user = await hub.check_login(email, await form_field(request, "loginPassword"))
        if user is None:
            return page(request, "login.html", None, 401, error="Wrong e-mail or password.", email=email)
        response = RedirectResponse("/projects", status_code=303)
        response.set_cookie(SESSION_COOKIE, hub.issue(user["id"], "session", SESSION_TTL), max_age=int(SESSION_TTL),
                            httponly=True, samesite="lax")
        return response

    def projects_page(request: Request, user: dict, status: int = 200, error: str | None = None) -> HTMLResponse:
        rows = db.all("SELECT p.* FROM projects p JOIN members m ON m.project_id = p.id WHERE m.user_id = ? "
                      "ORDER BY p.id", user["id"])
        return page(request, "projects.html", user, status, error=error,
                    projects=[hub.project_json(dict(r), user) for r in rows])

    @app.get("/projects", include_in_schema=False)
    async def projects_list(request: Request) -> Response:
        user = session_user(request)
        return projects_page(request, user) if user else to_login()

    @app.post("/join", include_in_schema=False)
    async def join_form(request: Request) -> Response:
        user = session_user(request)
        if user is None:
            return to_login()
        token = (await form_field(request, "token")).strip()  # read before the transaction: no await inside one
        try:
            with db.tx():
                project = hub.join(token, user)
        except HTTPException as e:
            return projects_page(request, user, e.status_code, error=e.detail)
        return RedirectResponse(f"/project/{project['id']}", status_code=303)

    def project_page(request: Request, pid: int, user: dict, status: int = 200,
                     error: str | None = None) -> HTMLResponse:
        try:
            project = hub.project_json(hub.project_of(pid, user), user)
        except HTTPException as e:
            return page(request, "error.html", user, e.status_code, error=e.detail)
        tokens = [hub.token_json(r) for r in db.all("SELECT * FROM tokens WHERE project_id = ? ORDER BY id", pid)] \
            if project["role"] == "coordinator" else []
        members = hub.members(pid)
        return page(request, "project.html", user, status, error=error, project=project, tokens=tokens,
                    members=members, controller_url=request.query_params.get("controller", "http://localhost:8000"))

    @app.get("/project/{pid}", include_in_schema=False)
    async def project_view(request: Request, pid: ProjectId) -> Response:
        user = session_user(request)
        return project_page(request, pid, user) if user else to_login()

    async def coordinator_action(request: Request, pid: int, action) -> Response:
        user = session_user(request)
        if user is None:
            return to_login()
        try:
            with db.tx():
                action(hub.coordinated(pid, user))
        except HTTPException as e:
            return project_page(request, pid, user, e.status_code, error=e.detail)
        return RedirectResponse(f"/project/{pid}", status_code=303)

    @app.post("/project/{pid}/tokens", include_in_schema=False)
    async def token_form(request: Request, pid: ProjectId) -> Response:
        return await coordinator_action(request, pid, lambda project: hub.create_token(project["id"]))

    @app.post("/project/{pid}/start", include_in_schema=False)
    async def start_form(request: Request, pid: ProjectId) -> Response:
        return await coordinator_action(request, pid, lambda project: hub.set_status(project, "prepare"))

    @app.get("/controller", include_in_schema=False)
    async def controller_page(request: Request) -> Response:
        user = session_user(request)
        if user is None:
            return to_login()
        site = db.one("SELECT * FROM sites WHERE user_id = ?", user["id"])
        online = bool(site and site["last_seen"] and now() - site["last_seen"] < ONLINE_WITHIN)
        return page(request, "controller.html", user, site=dict(site) if site else None, online=online)


def serve(hosts: list[str], port: int, db: Path) -> None:
    """Run the hub on every address in `hosts` (one socket each, the same port) until SIGTERM/SIGINT."""
    sockets = []
    try:
        for host in hosts:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # port 0: the others take the same port as the first
            sock.listen(2048)
            sock.set_inheritable(True)
            sockets.append(sock)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"hub: cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") \
            from None
    try:
        app = create_app(Path(db))
    except (sqlite3.Error, OSError) as e:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"hub: cannot use the database {db} ({e}); choose another --db") from None
    print(f"localfc hub listening on {', '.join(f'http://{h}:{port}' for h in hosts)} (db {db})", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30))
    server.run(sockets=sockets)
