"""The `api` driver: FeatureCloud's website REST API (FEATURECLOUD.md §2) over httpx, for featurecloud.ai and localfc.

One base URL switches between the real site and the localfc hub. The client is polite to the real site: a User-Agent,
a request rate limit (on for featurecloud.ai, off for other hosts unless asked for), jittered exponential backoff on
connection errors, 429, 5xx and rate-limit 403s. Access tokens are refreshed on a 401. Passwords and tokens live only
in this object: no exception message, log line or repr contains them.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from fedsim_runner import __version__

USER_AGENT = f"FedSim/{__version__} (federated analysis automation; python-httpx)"
REAL_SITE_DOMAIN = "featurecloud.ai"
REAL_SITE_RATE = 4.0  # requests per second towards featurecloud.ai
RETRIES = 6
BACKOFF_FIRST = 0.25  # s, doubled per attempt, full jitter, capped
BACKOFF_CAP = 15.0
RETRY_STATUSES = {429, 500, 502, 503, 504}
IDEMPOTENT = {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}


class FeatureCloudError(Exception):
    """A refused or failed call: the HTTP status (None when the server was not reached) and the server's message."""

    def __init__(self, status: int | None, message: str, method: str = "", path: str = "") -> None:
        self.status = status
        self.message = message
        where = f"{method} {path}: " if method else ""
        super().__init__(f"{where}{status if status is not None else 'no answer'}: {message}")


def server_message(response: httpx.Response) -> str:
    """The server's explanation: `detail` (a string, or FastAPI/DRF validation errors as `field: message`)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # validation errors: never echo the `input` (it may be a password)
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg', '')}" if isinstance(e, dict)
                         else str(e) for e in detail)[:500]
    if isinstance(detail, dict):
        return "; ".join(f"{k}: {v}" for k, v in detail.items())[:500]
    return str(detail)[:500]


def backoff_delay(attempt: int, retry_after: str | None = None) -> float:
    """Full-jitter exponential backoff; a server's Retry-After (seconds) is honoured, capped."""
    if retry_after and retry_after.strip().isdigit():
        return min(float(retry_after), BACKOFF_CAP)
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_FIRST * 2**attempt))


def rate_limited_403(response: httpx.Response) -> bool:
    """A 403 that is the site throttling us (Retry-After or a throttling message), not a permission refusal."""
    if response.status_code != 403:
        return False
    text = response.text[:500].lower()
    return "retry-after" in response.headers or "throttl" in text or "rate limit" in text


def is_real_site(base_url: str) -> bool:
    host = (urlsplit(base_url).hostname or "").lower()
    return host == REAL_SITE_DOMAIN or host.endswith("." + REAL_SITE_DOMAIN)


class RateLimiter:
    """At most `rate` requests per second from this client (all threads together)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            start = max(time.monotonic(), self._next)
            self._next = start + self.interval
        pause = start - time.monotonic()
        if pause > 0:
            time.sleep(pause)


@dataclass(frozen=True)
class RelayMessage:
    body: bytes
    sender: str
    memo: str | None
    seq: int


class FeatureCloudClient:
    """One user's session with the website (or the localfc hub).

    `rate_limit`: requests per second; None decides by the base URL (REAL_SITE_RATE for featurecloud.ai, off
    elsewhere), 0 turns it off.
    """

    def __init__(self, base_url: str, user_agent: str = USER_AGENT, rate_limit: float | None = None,
                 timeout: float = 60.0, retries: int = RETRIES) -> None:
        self.base_url = base_url.rstrip("/")
        rate = (REAL_SITE_RATE if is_real_site(self.base_url) else 0.0) if rate_limit is None else rate_limit
        self.rate_limiter = RateLimiter(rate) if rate > 0 else None
        self.retries = retries
        self.username: str | None = None
        self._access: str | None = None
        self._refresh: str | None = None
        self._http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout, connect=10.0),
                                  headers={"User-Agent": user_agent, "Accept": "application/json"})

    def __repr__(self) -> str:
        return f"FeatureCloudClient({self.base_url!r}, user={self.username!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FeatureCloudClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transport ---------------------------------------------------------------------------------------------
    def _send(self, method: str, path: str, auth: bool, **kw) -> httpx.Response:
        """One call with retries on transient failures; the raw response (any status)."""
        extra = kw.pop("headers", {})
        for attempt in range(self.retries + 1):
            if self.rate_limiter:
                self.rate_limiter.wait()
            headers = {**extra, "Authorization": f"Bearer {self._access}"} if auth and self._access else extra
            try:
                response = self._http.request(method, path, headers=headers, **kw)
            except httpx.TransportError as e:
                # a request that never left (connect errors) is safe to repeat; others only when idempotent
                safe = isinstance(e, httpx.ConnectError | httpx.ConnectTimeout) or method in IDEMPOTENT
                if not safe or attempt == self.retries:
                    raise FeatureCloudError(None, f"{self.base_url} unreachable ({type(e).__name__})", method,
                                            path) from None
                time.sleep(backoff_delay(attempt))
                continue
            if (response.status_code in RETRY_STATUSES or rate_limited_403(response)) and attempt < self.retries:
                time.sleep(backoff_delay(attempt, response.headers.get("retry-after")))
                continue
            return response
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, *, auth: bool = True, expect: tuple[int, ...] = (),
                **kw) -> httpx.Response:
        """A call as the logged-in user: refreshes the access token once on a 401; FeatureCloudError on a refusal
        (any 4xx/5xx not listed in `expect`)."""
        if auth and self._access is None:
            raise FeatureCloudError(None, "not logged in: call login() first", method, path)
        response = self._send(method, path, auth, **kw)
        if response.status_code == 401 and auth and self._refresh is not None:
            self.refresh()
            response = self._send(method, path, auth, **kw)
        if response.status_code >= 400 and response.status_code not in expect:
            raise FeatureCloudError(response.status_code, server_message(response), method, path)
        return response

    def _json(self, method: str, path: str, **kw) -> Any:
        response = self.request(method, path, **kw)
        try:
            return response.json()
        except ValueError:
            raise FeatureCloudError(response.status_code, "the answer is not JSON", method, path) from None

    # --- auth and users ----------------------------------------------------------------------------------------
    def login(self, username: str, password: str) -> None:
        """Log in (the username is the e-mail); keeps the access and refresh tokens in this object only."""
        tokens = self._json("POST", "/api/auth/login/", auth=False, json={"username": username, "password": password})
        self.username, self._access, self._refresh = username, tokens["access"], tokens["refresh"]

    def refresh(self) -> None:
        """A new access token from the refresh token."""
        response = self._send("POST", "/api/auth/token/refresh/", False, json={"refresh": self._refresh})
        if response.status_code != 200:
            self._access = self._refresh = None
            raise FeatureCloudError(response.status_code, f"the session of {self.username} expired "
                                    f"({server_message(response)}); log in again", "POST", "/api/auth/token/refresh/")
        self._access = response.json()["access"]

    def signup(self, email: str, password: str, first_name: str, last_name: str) -> dict:
        return self._json("POST", "/api/auth/user/signup/", auth=False, json={
            "email": email, "password": password, "firstName": first_name, "lastName": last_name, "role": "user"})

    def user_info(self) -> dict:
        return self._json("GET", "/api/user/info/")

    # --- site --------------------------------------------------------------------------------------------------
    def site(self) -> dict | None:
        """The user's site (what the controller keeps as site_info.json), or None when there is none yet."""
        response = self.request("GET", "/api/site/", expect=(404,))
        if response.status_code == 404:
            return None
        return response.json() or None

    def create_site(self, name: str, organization: str = "", address: str = "", zip: str = "", city: str = "",
                    country: str = "", first_name: str = "", last_name: str = "", phone: str = "") -> dict:
        return self._json("POST", "/api/site/", json={
            "name": name, "organization": organization, "address": address, "zip": zip, "city": city,
            "country": country, "firstName": first_name, "lastName": last_name, "phone": phone})

    # --- apps --------------------------------------------------------------------------------------------------
    def apps(self) -> list[dict]:
        """The app store (no login needed)."""
        return self._json("GET", "/api/apps/", auth=False)

    def app_by_slug(self, slug: str) -> dict:
        apps = self.apps()
        for app in apps:
            if app.get("slug") == slug:
                return app
        raise FeatureCloudError(404, f"app {slug!r} is not in the app store of {self.base_url}; available: "
                                f"{', '.join(sorted(str(a.get('slug')) for a in apps))}", "GET", "/api/apps/")

    def library(self) -> list[dict]:
        return self._json("GET", "/api/apps/purchase/")

    def purchase_app(self, app_id: int) -> dict:
        return self._json("POST", f"/api/apps/{int(app_id)}/purchase/")

    def remove_app(self, app_id: int) -> dict:
        return self._json("DELETE", f"/api/apps/{int(app_id)}/purchase/")

    # --- projects and tokens -----------------------------------------------------------------------------------
    def projects(self) -> list[dict]:
        return self._json("GET", "/api/projects/")

    def project(self, project_id: int) -> dict:
        """{id, status, role ("coordinator" for its creator), workflow, ...}"""
        return self._json("GET", f"/api/projects/{int(project_id)}/")

    def create_project(self, name: str, description: str = "") -> dict:
        return self._json("POST", "/api/projects/", json={"name": name, "description": description, "status": ""})

    def set_workflow(self, project_id: int, app_ids: list[int]) -> dict:
        """The project's workflow (apps in order, each already in the library); the project becomes `ready`."""
        pid = int(project_id)
        current = self.project(pid)
        return self._json("PUT", f"/api/projects/{pid}/", json={
            "id": pid, "name": current["name"], "description": current.get("description", ""), "status": "ready",
            "workflow": [{"id": 0, "projectId": pid, "federatedApp": {"id": int(app_id)}, "order": order,
                          "versionCertificationLevel": 1} for order, app_id in enumerate(app_ids)]})

    def set_project_status(self, project_id: int, status: str) -> dict:
        """`ready`, `prepare` (coordinator only) or `shutdown`; the project afterwards."""
        return self._json("PUT", f"/api/projects/{int(project_id)}/", json={"status": status})

    def create_token(self, project_id: int) -> dict:
        """One join token (one per participant): {id, token, project, ...}."""
        return self._json("POST", f"/api/project-tokens/{int(project_id)}/", json={"cmd": "create"})

    def join_project(self, token: str) -> dict:
        """Join the token's project; the project."""
        return self._json("POST", "/api/project-tokens/", json={"token": token, "cmd": "join"})

    # --- localfc only (docs/internals.md "localfc hub ↔ controller") ------------------------------------------
    def heartbeat(self) -> dict:
        return self._json("POST", "/api/localfc/site/heartbeat/")

    def finalize(self, project_id: int) -> dict:
        return self._json("POST", f"/api/localfc/projects/{int(project_id)}/finalize/")

    def run_info(self, project_id: int) -> dict:
        return self._json("GET", f"/api/localfc/projects/{int(project_id)}/run/")

    def report_run(self, project_id: int, run_nr: int, status: str, step: int = 0, message: str = "") -> dict:
        return self._json("PUT", f"/api/localfc/projects/{int(project_id)}/runs/{int(run_nr)}/",
                          json={"status": status, "step": step, "message": message})

    def relay_send(self, project_id: int, run_nr: int, sender: str, destination: str, payload: bytes,
                   memo: str | None = None, smpc: bool = False) -> dict:
        params: dict[str, Any] = {"sender": sender, "destination": destination, "smpc": int(smpc)}
        if memo is not None:
            params["memo"] = memo
        return self._json("POST", f"/api/localfc/relay/{int(project_id)}/{int(run_nr)}/", params=params,
                          content=payload, headers={"Content-Type": "application/octet-stream"})

    def relay_receive(self, project_id: int, run_nr: int, client: str, wait: float = 0.0) -> RelayMessage | None:
        """The next message for `client`, or None when nothing arrived within `wait` seconds (long poll)."""
        response = self.request("GET", f"/api/localfc/relay/{int(project_id)}/{int(run_nr)}/",
                                params={"client": client, "wait": wait}, timeout=wait + 30.0)
        if response.status_code == 204:
            return None
        return RelayMessage(response.content, response.headers["X-FC-Sender"], response.headers.get("X-FC-Memo"),
                            int(response.headers["X-FC-Seq"]))


FeatureCloudAPI = FeatureCloudClient  # the name tests/test_localfc_e2e.py and bench/bench_localfc.py import
